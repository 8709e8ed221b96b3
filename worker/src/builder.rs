//! The validated configuration of a worker and the builder that produces it.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::Endpoint;

use crate::context::TaskContext;
use crate::error::{BuildError, TaskError};
use crate::exec::{Exec, ExecOptions};
use crate::handler::{Handler, IntoOutput};
use crate::worker::Worker;

/// The largest `max_workers` accepted.
pub const MAX_WORKERS_LIMIT: usize = 100_000;

/// Everything a running worker needs, checked by [`WorkerBuilder::build`].
#[derive(Debug)]
pub(crate) struct Config {
    pub(crate) endpoint: Endpoint,
    pub(crate) broker: String,
    pub(crate) token: Option<AsciiMetadataValue>,
    pub(crate) queues: Vec<String>,
    pub(crate) max_workers: usize,
    pub(crate) worker_id: String,
    pub(crate) host: String,
    pub(crate) shutdown_grace: Duration,
    pub(crate) cancel_grace: Duration,
    pub(crate) ack_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) reconnect_initial: Duration,
    pub(crate) reconnect_max: Duration,
    pub(crate) handlers: HashMap<String, Handler>,
}

/// Builds a [`Worker`]; see [`Worker::builder`]. Every setting has a default named in its doc.
#[must_use]
pub struct WorkerBuilder {
    broker: String,
    token: Option<String>,
    queues: Vec<String>,
    max_workers: Option<usize>,
    worker_id: Option<String>,
    host: Option<String>,
    shutdown_grace: Duration,
    cancel_grace: Duration,
    ack_timeout: Duration,
    connect_timeout: Duration,
    reconnect_initial: Duration,
    reconnect_max: Duration,
    handlers: Vec<(String, Handler)>,
    exec: Option<ExecOptions>,
}

impl std::fmt::Debug for WorkerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerBuilder")
            .field("broker", &self.broker)
            .field("queues", &self.queues)
            .field("max_workers", &self.max_workers)
            .field("worker_id", &self.worker_id)
            .field(
                "handlers",
                &self.handlers.iter().map(|h| &h.0).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl WorkerBuilder {
    pub(crate) fn new(broker: impl Into<String>) -> Self {
        WorkerBuilder {
            broker: broker.into(),
            token: None,
            queues: vec![taskd_proto::DEFAULT_QUEUE.to_string()],
            max_workers: None,
            worker_id: None,
            host: None,
            shutdown_grace: Duration::from_secs(30),
            cancel_grace: Duration::from_secs(5),
            ack_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            reconnect_initial: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            handlers: Vec::new(),
            exec: None,
        }
    }

    /// The bearer token sent as `authorization: Bearer <token>`. Defaults to none; an empty
    /// token also means none (so an empty `TASKD_TOKEN` behaves like an unset one).
    pub fn token<S: Into<String>>(mut self, token: Option<S>) -> Self {
        self.token = token.map(Into::into).filter(|t| !t.is_empty());
        self
    }

    /// The queues to serve, in order of preference. Defaults to `["default"]`.
    pub fn queues<I, S>(mut self, queues: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.queues = queues.into_iter().map(Into::into).collect();
        self
    }

    /// How many attempts may run at once (the worker's slots). Defaults to the number of CPUs.
    pub fn max_workers(mut self, slots: usize) -> Self {
        self.max_workers = Some(slots);
        self
    }

    /// The id the broker knows this worker by; it must be unique among live workers and stays
    /// the same across reconnects. Defaults to `<hostname>-<pid>`.
    pub fn worker_id(mut self, id: impl Into<String>) -> Self {
        self.worker_id = Some(id.into());
        self
    }

    /// The host name reported to the broker. Defaults to the machine's hostname.
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.host = Some(host.into());
        self
    }

    /// How long running attempts may go on after shutdown starts before they are cancelled and
    /// handed back. Defaults to 30 s.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// How long a handler may go on after its token fired (cancel, timeout, shutdown) before
    /// the worker stops waiting for it. Defaults to 5 s.
    pub fn cancel_grace(mut self, grace: Duration) -> Self {
        self.cancel_grace = grace;
        self
    }

    /// How long shutdown waits for the broker to acknowledge the last outcomes. Defaults to 5 s.
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = timeout;
        self
    }

    /// Bound on connecting and the hello exchange. Defaults to 5 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Reconnect delays: doubling from `initial` to `max`, with jitter. Defaults to 100 ms
    /// and 5 s.
    pub fn reconnect_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.reconnect_initial = initial;
        self.reconnect_max = max.max(initial);
        self
    }

    /// Registers an async handler for tasks named `name`; it gets the raw payload bytes.
    pub fn handler<F, Fut, O>(mut self, name: impl Into<String>, f: F) -> Self
    where
        F: Fn(TaskContext, Vec<u8>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, TaskError>> + Send + 'static,
        O: IntoOutput,
    {
        self.handlers.push((name.into(), Handler::from_async(f)));
        self
    }

    /// Registers a blocking (CPU-bound) handler, run on tokio's blocking pool.
    pub fn blocking_handler<F, O>(mut self, name: impl Into<String>, f: F) -> Self
    where
        F: Fn(TaskContext, Vec<u8>) -> Result<O, TaskError> + Send + Sync + 'static,
        O: IntoOutput,
    {
        self.handlers.push((name.into(), Handler::from_blocking(f)));
        self
    }

    /// Registers an async handler whose input and output are JSON (serde). A payload that does
    /// not decode fails the attempt for good (kind `"bad_payload"`).
    pub fn typed_handler<I, O, F, Fut>(mut self, name: impl Into<String>, f: F) -> Self
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + 'static,
        F: Fn(TaskContext, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, TaskError>> + Send + 'static,
    {
        self.handlers.push((name.into(), Handler::from_typed(f)));
        self
    }

    /// Registers the `exec` handler that runs command-line tasks (see [`crate::exec`]).
    pub fn exec(mut self, options: ExecOptions) -> Self {
        self.exec = Some(options);
        self
    }

    /// Checks the configuration and returns the worker.
    pub fn build(self) -> Result<Worker, BuildError> {
        let broker = normalize_broker(&self.broker);
        let endpoint =
            Endpoint::from_shared(broker.clone()).map_err(|e| BuildError::InvalidBroker {
                address: self.broker.clone(),
                reason: e.to_string(),
            })?;
        let endpoint = endpoint
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .tcp_keepalive(Some(Duration::from_secs(10)))
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);

        let token = match self.token {
            Some(token) => Some(
                MetadataValue::try_from(format!("Bearer {token}"))
                    .map_err(|_| BuildError::InvalidToken)?,
            ),
            None => None,
        };

        if self.queues.is_empty() {
            return Err(BuildError::NoQueues);
        }
        let mut seen = std::collections::HashSet::new();
        for queue in &self.queues {
            check_name("queue", queue)?;
            if !seen.insert(queue.as_str()) {
                return Err(BuildError::Duplicate {
                    what: "queue",
                    name: queue.clone(),
                });
            }
        }

        let mut handlers = HashMap::new();
        let mut registrations = self.handlers;
        if let Some(options) = self.exec {
            let exec = std::sync::Arc::new(Exec::new(options)?);
            registrations.push((taskd_proto::EXEC_TASK_NAME.to_string(), exec.handler()));
        }
        for (name, handler) in registrations {
            check_name("handler name", &name)?;
            if handlers.insert(name.clone(), handler).is_some() {
                return Err(BuildError::Duplicate {
                    what: "handler name",
                    name,
                });
            }
        }
        if handlers.is_empty() {
            return Err(BuildError::NoHandlers);
        }

        let max_workers = self.max_workers.unwrap_or_else(default_slots);
        if max_workers == 0 || max_workers > MAX_WORKERS_LIMIT {
            return Err(BuildError::InvalidMaxWorkers {
                got: max_workers,
                max: MAX_WORKERS_LIMIT,
            });
        }

        let host = self.host.unwrap_or_else(hostname);
        let worker_id = self
            .worker_id
            .unwrap_or_else(|| format!("{host}-{}", std::process::id()));
        if !valid_name(&worker_id) {
            return Err(BuildError::InvalidWorkerId(worker_id));
        }

        Ok(Worker::new(Config {
            endpoint,
            broker,
            token,
            queues: self.queues,
            max_workers,
            worker_id,
            host,
            shutdown_grace: self.shutdown_grace,
            cancel_grace: self.cancel_grace,
            ack_timeout: self.ack_timeout,
            connect_timeout: self.connect_timeout,
            reconnect_initial: self.reconnect_initial,
            reconnect_max: self.reconnect_max,
            handlers,
        }))
    }
}

/// `host:port` becomes `http://host:port`; URLs are kept.
pub(crate) fn normalize_broker(address: &str) -> String {
    let address = address.trim();
    if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    }
}

/// The number of CPUs (1 when it cannot be read).
pub fn default_slots() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn hostname() -> String {
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(100)
        .collect();
    if host.is_empty() {
        "localhost".to_string()
    } else {
        host
    }
}

/// The contract's naming rule: 1..=128 bytes of printable ASCII without spaces.
pub(crate) fn valid_name(name: &str) -> bool {
    (1..=128).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_graphic())
}

fn check_name(what: &'static str, name: &str) -> Result<(), BuildError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(BuildError::InvalidName {
            what,
            name: name.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Worker;

    fn noop(b: WorkerBuilder) -> WorkerBuilder {
        b.handler("noop", |_ctx, _payload| async { Ok(()) })
    }

    #[test]
    fn builds_with_defaults() {
        let worker = noop(Worker::builder("127.0.0.1:50051")).build().unwrap();
        assert_eq!(worker.config().broker, "http://127.0.0.1:50051");
        assert_eq!(worker.config().queues, vec!["default".to_string()]);
        assert_eq!(worker.config().max_workers, default_slots());
        assert!(
            worker
                .worker_id()
                .ends_with(&format!("-{}", std::process::id()))
        );
    }

    #[test]
    fn refuses_bad_configs() {
        assert!(matches!(
            Worker::builder("http://x").build(),
            Err(BuildError::NoHandlers)
        ));
        assert!(matches!(
            noop(Worker::builder("http://x")).max_workers(0).build(),
            Err(BuildError::InvalidMaxWorkers { got: 0, .. })
        ));
        assert!(matches!(
            noop(Worker::builder("http://x")).queues(["a b"]).build(),
            Err(BuildError::InvalidName { what: "queue", .. })
        ));
        assert!(matches!(
            noop(Worker::builder("http://x")).queues(["a", "a"]).build(),
            Err(BuildError::Duplicate { what: "queue", .. })
        ));
        assert!(matches!(
            noop(Worker::builder("http://x"))
                .queues(Vec::<String>::new())
                .build(),
            Err(BuildError::NoQueues)
        ));
        assert!(matches!(
            noop(noop(Worker::builder("http://x"))).build(),
            Err(BuildError::Duplicate {
                what: "handler name",
                ..
            })
        ));
        assert!(matches!(
            noop(Worker::builder("http://bad host:1")).build(),
            Err(BuildError::InvalidBroker { .. })
        ));
        assert!(matches!(
            noop(Worker::builder("http://x"))
                .token(Some("a\nb"))
                .build(),
            Err(BuildError::InvalidToken)
        ));
        assert!(matches!(
            noop(Worker::builder("http://x")).worker_id("").build(),
            Err(BuildError::InvalidWorkerId(_))
        ));
    }
}
