//! [`run`]: opens the store, recovers, serves the gRPC services until shutdown, then drains.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use taskd_proto::pb;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic_health::ServingStatus;

use crate::api::Api;
use crate::api::auth::Auth;
use crate::api::tasks::TaskApi;
use crate::api::work::WorkApi;
use crate::config::{Config, ConfigError};
use crate::core::state::{Effects, Now, State};
use crate::core::{Broker, CoreConfig};
use crate::store::committer::Committer;
use crate::store::sled::SledStore;
use crate::store::{Store, StoreError};

/// How long shutdown waits for connections to close before it stops waiting.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A setting is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store could not be opened, read or closed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The reflection service could not be built.
    #[error("reflection service: {0}")]
    Reflection(String),
    /// An internal task failed.
    #[error("internal: {0}")]
    Internal(String),
}

/// Serves taskd on `listener` until `shutdown` resolves, then shuts down gracefully.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    run_with_ready(listener, config, shutdown, |_| {}).await
}

/// Like [`run`]; `on_ready` is called with the bound address once the store is open, the
/// indexes are rebuilt and the services answer (health SERVING).
pub async fn run_with_ready(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
    on_ready: impl FnOnce(SocketAddr) + Send + 'static,
) -> Result<(), ServerError> {
    let hooks = Hooks {
        on_ready: Some(Box::new(on_ready)),
        before_recovery: None,
    };
    run_with_hooks(listener, config, shutdown, hooks).await
}

/// Optional callbacks into [`run_with_hooks`].
#[derive(Default)]
pub struct Hooks {
    /// Called with the bound address once the broker is ready (health SERVING).
    pub on_ready: Option<Box<dyn FnOnce(SocketAddr) + Send>>,
    /// Awaited after the server accepts connections (health NOT_SERVING) and before the store
    /// is opened; tests use it to observe the NOT_SERVING phase.
    pub before_recovery: Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks").finish_non_exhaustive()
    }
}

/// [`run`] with [`Hooks`].
pub async fn run_with_hooks(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
    hooks: Hooks,
) -> Result<(), ServerError> {
    let config = Arc::new(config.validate()?);
    let addr = listener
        .local_addr()
        .map_err(|e| ServerError::Internal(format!("listener address: {e}")))?;
    let (health, health_svc) = tonic_health::server::health_reporter();
    const TASK_SVC: &str = "taskd.v1.TaskService";
    const WORK_SVC: &str = "taskd.v1.WorkerService";
    for name in ["", TASK_SVC, WORK_SVC] {
        health
            .set_service_status(name, ServingStatus::NotServing)
            .await;
    }
    let streams_stop = CancellationToken::new();
    let api = Api::new(config.clone(), streams_stop.clone());
    let auth = Auth::new(config.token.as_deref());
    let max_msg = config.max_message_bytes().max(64 * 1024 * 1024);
    let task_svc = pb::task_service_server::TaskServiceServer::new(TaskApi(api.clone()))
        .max_decoding_message_size(max_msg)
        .max_encoding_message_size(max_msg);
    let work_svc = pb::worker_service_server::WorkerServiceServer::new(WorkApi(api.clone()))
        .max_decoding_message_size(max_msg)
        .max_encoding_message_size(max_msg);
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(taskd_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;
    let serve_stop = CancellationToken::new();
    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(health_svc)
        .add_service(InterceptedService::new(reflection, auth.clone()))
        .add_service(InterceptedService::new(task_svc, auth.clone()))
        .add_service(InterceptedService::new(work_svc, auth));
    let stop = serve_stop.clone();
    // tonic's `tcp_nodelay` applies only to listeners it binds itself: set it on ours, or small
    // replies wait for delayed ACKs (~40 ms each).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut server = tokio::spawn(
        router.serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await }),
    );

    if let Some(wait) = hooks.before_recovery {
        wait.await;
    }
    // Open and recover the store while health says NOT_SERVING; records are turned into
    // the in-memory state one by one as they are read.
    let core_cfg = CoreConfig {
        lease: config.lease,
        heartbeat: config.heartbeat,
        grace: config.grace,
        max_message_bytes: max_msg,
        max_result_bytes: config.max_result_bytes,
    };
    let opened = {
        let cfg = config.clone();
        tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
            let store = SledStore::open(&cfg.data_dir, cfg.sync, cfg.cache_capacity)?;
            let now = Now::now();
            let mut state = State::new(core_cfg, rand::random::<u64>());
            let mut eff = Effects::default();
            let mut phantoms = HashMap::new();
            let started = std::time::Instant::now();
            let count = store.load(&mut |t| state.recover_one(now, t, &mut phantoms, &mut eff))?;
            tracing::info!(tasks = count, took = ?started.elapsed(), "store recovered");
            Ok((store, state, eff, count))
        })
        .await
    };
    let (store, state, eff, recovered) = match opened {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            serve_stop.cancel();
            let _ = server.await;
            return Err(e.into());
        }
        Err(e) => {
            serve_stop.cancel();
            let _ = server.await;
            return Err(ServerError::Internal(format!("store open task: {e}")));
        }
    };
    let committer = Arc::new(Committer::start(Arc::new(store)));
    let broker = Broker::from_state(state, eff, committer.clone());
    let timers_stop = CancellationToken::new();
    let timers = tokio::spawn(broker.clone().run_timers(timers_stop.clone()));
    api.set_broker(broker.clone());
    for name in ["", TASK_SVC, WORK_SVC] {
        health
            .set_service_status(name, ServingStatus::Serving)
            .await;
    }
    // A failed write poisons the store: report NOT_SERVING from then on.
    let poison_watch = {
        let mut durable = committer.durable_watch();
        let health = health.clone();
        tokio::spawn(async move {
            if durable.wait_for(|d| d.failed).await.is_ok() {
                tracing::error!("the store failed; reporting NOT_SERVING");
                for name in ["", TASK_SVC, WORK_SVC] {
                    health
                        .set_service_status(name, ServingStatus::NotServing)
                        .await;
                }
            }
        })
    };
    tracing::info!(%addr, recovered, epoch = broker.epoch(), data_dir = %config.data_dir.display(), "taskd ready");
    if let Some(on_ready) = hooks.on_ready {
        on_ready(addr);
    }

    let mut server_result = None;
    tokio::select! {
        _ = shutdown => {}
        r = &mut server => server_result = Some(r),
    }
    tracing::info!("shutting down");
    for name in ["", TASK_SVC, WORK_SVC] {
        health
            .set_service_status(name, ServingStatus::NotServing)
            .await;
    }
    // Initiate: refuse new work, end every stream (UNAVAILABLE), stop accepting.
    broker.close_streams();
    streams_stop.cancel();
    serve_stop.cancel();
    // Drain: in-flight unary calls finish (their commits complete), bounded.
    let served = match server_result {
        Some(r) => r,
        None => match tokio::time::timeout(DRAIN_TIMEOUT, &mut server).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!("connections did not close within {DRAIN_TIMEOUT:?}; closing them");
                server.abort();
                Ok(Ok(()))
            }
        },
    };
    timers_stop.cancel();
    let _ = timers.await;
    poison_watch.abort();
    // Finalize: flush the last group and close the store.
    let stopped = tokio::task::spawn_blocking(move || committer.stop())
        .await
        .map_err(|e| ServerError::Internal(format!("store close task: {e}")))?;
    stopped?;
    match served {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e.into()),
        Err(e) => return Err(ServerError::Internal(format!("server task: {e}"))),
    }
    tracing::info!("taskd stopped");
    Ok(())
}
