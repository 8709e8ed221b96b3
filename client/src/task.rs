//! [`Task`]: what to run, built fluently and turned into the contract's `TaskSpec`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use taskd_proto::pb;
use uuid::Uuid;

use crate::error::{Error, Result};

/// A task to submit: a handler name, a payload and options.
///
/// Every task gets a client-chosen UUIDv7 id when it is built (see [`Task::id`]), so a submit
/// retried after a lost reply is idempotent.
///
/// ```
/// # use std::time::Duration;
/// # use taskd_client::Task;
/// let task = Task::new("resize")
///     .json(&serde_json::json!({"image": "a.png", "width": 640}))?
///     .queue("images")
///     .priority(5)
///     .max_attempts(5)
///     .timeout(Duration::from_secs(30));
/// # Ok::<(), taskd_client::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Task {
    spec: pb::TaskSpec,
    id: Uuid,
}

impl Task {
    /// A task for handler `name` with an empty JSON payload (`null` is not sent: no bytes).
    pub fn new(name: impl Into<String>) -> Task {
        Task {
            spec: pb::TaskSpec {
                name: name.into(),
                ..Default::default()
            },
            id: Uuid::now_v7(),
        }
    }

    /// An exec task running `argv` (argv[0] looked up in PATH on the worker, no shell).
    /// Set its environment, directory and standard input with [`Task::env`], [`Task::cwd`]
    /// and [`Task::stdin`].
    pub fn exec<I, S>(argv: I) -> Task
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let exec = pb::ExecSpec {
            argv: argv.into_iter().map(Into::into).collect(),
            ..Default::default()
        };
        let mut task = Task::new(taskd_proto::EXEC_TASK_NAME);
        task.set_exec(exec);
        task
    }

    fn exec_spec(&self) -> pb::ExecSpec {
        if self.spec.content_type == taskd_proto::EXEC_SPEC_CONTENT_TYPE {
            pb::ExecSpec::decode(self.spec.payload.as_slice()).unwrap_or_default()
        } else {
            pb::ExecSpec::default()
        }
    }

    fn set_exec(&mut self, exec: pb::ExecSpec) {
        self.spec.name = taskd_proto::EXEC_TASK_NAME.to_string();
        self.spec.content_type = taskd_proto::EXEC_SPEC_CONTENT_TYPE.to_string();
        self.spec.payload = exec.encode_to_vec();
    }

    /// Adds environment variables to an exec task (turns the task into one if it is not).
    pub fn env<I, K, V>(mut self, vars: I) -> Task
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let mut exec = self.exec_spec();
        let mut env: BTreeMap<String, String> = exec.env.into_iter().collect();
        env.extend(vars.into_iter().map(|(k, v)| (k.into(), v.into())));
        exec.env = env.into_iter().collect();
        self.set_exec(exec);
        self
    }

    /// Sets an exec task's working directory on the worker.
    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Task {
        let mut exec = self.exec_spec();
        exec.cwd = dir.into().display().to_string();
        self.set_exec(exec);
        self
    }

    /// Sets the bytes written to an exec task's standard input.
    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Task {
        let mut exec = self.exec_spec();
        exec.stdin = bytes.into();
        self.set_exec(exec);
        self
    }

    /// Sets the payload to `value` encoded as JSON (content type `application/json`).
    pub fn json<T: serde::Serialize + ?Sized>(mut self, value: &T) -> Result<Task> {
        self.spec.payload = serde_json::to_vec(value).map_err(|e| {
            Error::InvalidArgument(format!("payload cannot be encoded as JSON: {e}"))
        })?;
        self.spec.content_type = taskd_proto::DEFAULT_CONTENT_TYPE.to_string();
        Ok(self)
    }

    /// Sets raw payload bytes and their media type.
    pub fn payload(mut self, bytes: impl Into<Vec<u8>>, content_type: impl Into<String>) -> Task {
        self.spec.payload = bytes.into();
        self.spec.content_type = content_type.into();
        self
    }

    /// The queue the task waits in. Defaults to `default`.
    pub fn queue(mut self, queue: impl Into<String>) -> Task {
        self.spec.queue = queue.into();
        self
    }

    /// Higher runs first. Defaults to 0.
    pub fn priority(mut self, priority: i32) -> Task {
        self.spec.priority = priority;
        self
    }

    /// Runs no earlier than `delay` after the broker accepts the task.
    pub fn delay(mut self, delay: Duration) -> Task {
        self.spec.delay_ms = millis(delay);
        self.spec.not_before_unix_ms = 0;
        self
    }

    /// Runs no earlier than `at`.
    pub fn not_before(mut self, at: SystemTime) -> Task {
        self.spec.not_before_unix_ms = at
            .duration_since(UNIX_EPOCH)
            .map(millis)
            .unwrap_or(1)
            .max(1);
        self.spec.delay_ms = 0;
        self
    }

    /// How many times the task may run in all. Defaults to the broker's (3).
    pub fn max_attempts(mut self, n: u32) -> Task {
        self.spec.max_attempts = n;
        self
    }

    /// Backoff before a retry: `initial` doubling up to `max`. Defaults to the broker's (1 s, 60 s).
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Task {
        self.spec.backoff_initial_ms = millis(initial);
        self.spec.backoff_max_ms = millis(max);
        self
    }

    /// Longest a single attempt may run. Defaults to no limit.
    pub fn timeout(mut self, timeout: Duration) -> Task {
        self.spec.timeout_ms = millis(timeout);
        self
    }

    /// A key that makes a second submit with the same key return the first task.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Task {
        self.spec.idempotency_key = key.into();
        self
    }

    /// How long the finished task and its outcome are kept. Defaults to the broker's (7 days).
    pub fn result_ttl(mut self, ttl: Duration) -> Task {
        self.spec.result_ttl_ms = millis(ttl);
        self
    }

    /// Uses `id` instead of the generated UUIDv7 (resubmitting an id is idempotent).
    pub fn id(mut self, id: Uuid) -> Task {
        self.id = id;
        self
    }

    /// The task's id (chosen by the client).
    pub fn task_id(&self) -> Uuid {
        self.id
    }

    /// The handler name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The contract's `TaskSpec` for this task, id included.
    pub fn to_spec(&self) -> pb::TaskSpec {
        let mut spec = self.spec.clone();
        spec.id = self.id.to_string();
        spec
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_task_encodes_spec() {
        let t = Task::exec(["echo", "hi"])
            .env([("A", "1")])
            .cwd("/tmp")
            .stdin("in");
        let spec = t.to_spec();
        assert_eq!(spec.name, taskd_proto::EXEC_TASK_NAME);
        assert_eq!(spec.content_type, taskd_proto::EXEC_SPEC_CONTENT_TYPE);
        let exec = pb::ExecSpec::decode(spec.payload.as_slice()).unwrap();
        assert_eq!(exec.argv, vec!["echo", "hi"]);
        assert_eq!(exec.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(exec.cwd, "/tmp");
        assert_eq!(exec.stdin, b"in");
        assert_eq!(spec.id, t.task_id().to_string());
        assert_eq!(t.task_id().get_version_num(), 7);
    }

    #[test]
    fn options_fill_the_spec() {
        let t = Task::new("n")
            .json(&serde_json::json!({"a": 1}))
            .unwrap()
            .queue("q")
            .priority(-2)
            .delay(Duration::from_millis(1500))
            .max_attempts(4)
            .backoff(Duration::from_secs(1), Duration::from_secs(8))
            .timeout(Duration::from_secs(3))
            .idempotency_key("k")
            .result_ttl(Duration::from_secs(60));
        let s = t.to_spec();
        assert_eq!(s.payload, br#"{"a":1}"#);
        assert_eq!((s.queue.as_str(), s.priority, s.delay_ms), ("q", -2, 1500));
        assert_eq!(
            (s.max_attempts, s.backoff_initial_ms, s.backoff_max_ms),
            (4, 1000, 8000)
        );
        assert_eq!(
            (s.timeout_ms, s.idempotency_key.as_str(), s.result_ttl_ms),
            (3000, "k", 60000)
        );
    }
}
