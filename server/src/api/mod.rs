//! The gRPC layer: thin tonic services that validate input, call the [`crate::core::Broker`]
//! and map its errors to `tonic::Status` once ([`errors`]).

pub mod auth;
pub mod errors;
pub mod tasks;
pub mod validate;
pub mod watch;
pub mod work;

use std::sync::{Arc, OnceLock};

use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::config::Config;
use crate::core::Broker;

/// What every service shares: the broker (set once recovery is done), limits and the
/// shutdown signal for streams.
#[derive(Clone)]
pub struct Api {
    broker: Arc<OnceLock<Arc<Broker>>>,
    /// Validation limits and task defaults.
    pub cfg: Arc<Config>,
    /// Cancelled when the broker shuts down: every stream ends with UNAVAILABLE.
    pub shutdown: CancellationToken,
}

impl Api {
    /// A new api over a broker that is set later ([`Api::set_broker`]).
    pub fn new(cfg: Arc<Config>, shutdown: CancellationToken) -> Api {
        Api {
            broker: Arc::new(OnceLock::new()),
            cfg,
            shutdown,
        }
    }

    /// Makes the broker available (after recovery).
    pub fn set_broker(&self, broker: Arc<Broker>) {
        let _ = self.broker.set(broker);
    }

    /// The broker, or UNAVAILABLE while starting or shutting down.
    pub fn broker(&self) -> Result<Arc<Broker>, Status> {
        if self.shutdown.is_cancelled() {
            return Err(Status::unavailable("taskd is shutting down"));
        }
        self.broker
            .get()
            .cloned()
            .ok_or_else(|| Status::unavailable("taskd is starting: the store is being recovered"))
    }
}
