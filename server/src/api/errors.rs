//! The one mapping from typed errors to gRPC status codes.

use tonic::Status;

use crate::core::BrokerError;
use crate::store::StoreError;

impl From<BrokerError> for Status {
    fn from(e: BrokerError) -> Status {
        match e {
            BrokerError::NotFound(id) => Status::not_found(format!("task {id} not found")),
            BrokerError::Precondition(m) => Status::failed_precondition(m),
            BrokerError::ShuttingDown => Status::unavailable("taskd is shutting down"),
            BrokerError::Store(StoreError::Unavailable(m)) => {
                Status::unavailable(format!("the store is unavailable: {m}"))
            }
            BrokerError::Store(e) => {
                Status::unavailable(format!("the write was not made durable: {e}"))
            }
        }
    }
}

/// Why a request was refused before it reached the broker.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// A field is malformed.
    #[error("{0}")]
    Invalid(String),
    /// A size limit was exceeded.
    #[error("{0}")]
    TooLarge(String),
}

impl From<InputError> for Status {
    fn from(e: InputError) -> Status {
        match e {
            InputError::Invalid(m) => Status::invalid_argument(m),
            InputError::TooLarge(m) => Status::resource_exhausted(m),
        }
    }
}
