//! The `taskd.v1` gRPC contract, shared by the broker, the workers and the clients.
//!
//! The generated messages, clients and servers live in [`pb`]; this crate adds the few
//! constants and helpers every side needs so that they agree on them.

/// Generated code for the `taskd.v1` package.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("taskd.v1");
}

/// The encoded `FileDescriptorSet` of the contract, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("taskd_descriptor");

/// The reserved task name of command-line tasks, whose payload is an encoded [`pb::ExecSpec`].
pub const EXEC_TASK_NAME: &str = "exec";
/// Content type of an exec task's payload (an encoded [`pb::ExecSpec`]).
pub const EXEC_SPEC_CONTENT_TYPE: &str = "application/vnd.taskd.exec-spec+protobuf";
/// Content type of an exec task's output or failure details (an encoded [`pb::ExecResult`]).
pub const EXEC_RESULT_CONTENT_TYPE: &str = "application/vnd.taskd.exec-result+protobuf";
/// Content type assumed when a payload or output names none.
pub const DEFAULT_CONTENT_TYPE: &str = "application/json";
/// The queue used when a task names none.
pub const DEFAULT_QUEUE: &str = "default";
/// Metadata key carrying the bearer token (`authorization: Bearer <token>`).
pub const AUTHORIZATION_HEADER: &str = "authorization";

impl pb::TaskState {
    /// Whether the state is final: SUCCEEDED, FAILED or CANCELLED.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            pb::TaskState::Succeeded | pb::TaskState::Failed | pb::TaskState::Cancelled
        )
    }
}

impl pb::LeaseRef {
    /// A lease reference for `attempt` of `task_id`.
    pub fn new(task_id: impl Into<String>, attempt: u32) -> Self {
        pb::LeaseRef {
            task_id: task_id.into(),
            attempt,
        }
    }
}
