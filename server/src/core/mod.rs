//! The broker core: the task state machine, dispatch, leases, timers and watchers, in memory.
//!
//! No gRPC and no sled in here. [`state::State`] is a synchronous state machine: every
//! operation takes the current time ([`state::Now`]) and returns [`state::Effects`] (records to
//! write, tasks that completed). [`broker::Broker`] wraps it in a mutex, hands the writes to the
//! group committer and delivers acknowledgements and notifications only once they are durable.

pub mod broker;
pub mod dispatch;
pub mod state;
pub mod submit;
pub mod task;
pub mod timers;
pub mod watch;
pub mod workers;

#[cfg(test)]
mod tests;

pub use broker::{Broker, BrokerError};
pub use state::{CloseReason, CoreConfig, NewTask, SendOutcome, WatchSink, WorkerSink};
