//! [`Client`]: one HTTP/2 channel to the broker, the unary calls (retried where idempotent),
//! and the shared watch stream that completes every [`TaskFuture`] of this client.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::stream::BoxStream;
use prost::Message;
use taskd_proto::pb;
use taskd_proto::pb::task_service_client::TaskServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::future::{Shared, TaskFuture};
use crate::options::ClientOptions;
use crate::retry::{self, Backoff};
use crate::task::Task;
use crate::watch::WatchHandle;

/// The generated TaskService client over the authenticated channel.
pub(crate) type Rpc = TaskServiceClient<InterceptedService<Channel, Auth>>;

/// Largest encoded size of one Submit request; bigger batches are split.
const SUBMIT_CHUNK_BYTES: usize = 2 * 1024 * 1024;
/// Most tasks in one Submit request.
const SUBMIT_CHUNK_TASKS: usize = 5_000;
/// Largest message the client accepts from the broker.
const MAX_DECODE_BYTES: usize = 64 * 1024 * 1024;

/// The longest long-poll the broker accepts (`GetTaskRequest.wait_ms`: at most 5 minutes).
const MAX_LONG_POLL: Duration = Duration::from_secs(5 * 60);

/// Adds `authorization: Bearer <token>` to every call when a token is configured.
#[derive(Clone, Debug)]
pub(crate) struct Auth(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut()
                .insert(taskd_proto::AUTHORIZATION_HEADER, v.clone());
        }
        Ok(req)
    }
}

/// A connection to a taskd broker. Cheap to clone: clones share one HTTP/2 channel and one
/// watch stream.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    /// Unary calls made (retries included); see [`Client::calls_made`].
    calls: AtomicU64,
    options: ClientOptions,
    rpc: Rpc,
    health: HealthClient<InterceptedService<Channel, Auth>>,
    watch: WatchHandle,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.inner.url)
            .finish()
    }
}

/// Which tasks [`Client::list_tasks`] returns.
#[derive(Debug, Clone, Default)]
pub struct ListTasks {
    /// Only this queue (`None`: every queue).
    pub queue: Option<String>,
    /// Only this state (`None`: every state).
    pub state: Option<pb::TaskState>,
    /// Page size (`None`: the broker's default, 100; at most 1000).
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// One page of [`Client::list_tasks`].
#[derive(Debug, Clone)]
pub struct TaskPage {
    /// The tasks, ordered by id.
    pub tasks: Vec<pb::Task>,
    /// Pass as [`ListTasks::cursor`] for the next page; `None` on the last page.
    pub next_cursor: Option<String>,
}

impl Client {
    /// Connects to the broker at `addr` (`http://host:port` or `host:port`) with default
    /// options and no token. See [`Client::builder`] for more.
    pub async fn connect(addr: impl AsRef<str>) -> Result<Client> {
        ClientOptions::new(addr).connect().await
    }

    /// Options for connecting to `addr`: token, timeouts, retry budget.
    pub fn builder(addr: impl AsRef<str>) -> ClientOptions {
        ClientOptions::new(addr)
    }

    pub(crate) async fn from_options(options: ClientOptions) -> Result<Client> {
        let url = options.normalized_url()?;
        let auth = match &options.token {
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| {
                        Error::InvalidArgument("the token must be printable ASCII".into())
                    })?,
            ),
            None => None,
        };
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| {
                Error::InvalidArgument(format!("{url} is not a valid broker address: {e}"))
            })?
            .connect_timeout(options.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true);
        let channel = if options.lazy {
            endpoint.connect_lazy()
        } else {
            endpoint.connect().await.map_err(|e| Error::Connection {
                addr: url.clone(),
                message: error_chain(&e),
            })?
        };
        let auth = Auth(auth);
        let rpc = TaskServiceClient::with_interceptor(channel.clone(), auth.clone())
            .max_decoding_message_size(MAX_DECODE_BYTES);
        let health = HealthClient::with_interceptor(channel, auth);
        let watch = WatchHandle::spawn(rpc.clone(), url.clone());
        Ok(Client {
            inner: Arc::new(Inner {
                url,
                calls: AtomicU64::new(0),
                options,
                rpc,
                health,
                watch,
            }),
        })
    }

    /// The broker's URL.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// How many unary calls this client (all its clones) has made so far, retries included;
    /// the watch stream is not counted. For diagnostics, and to check batching.
    pub fn calls_made(&self) -> u64 {
        self.inner.calls.load(Ordering::Relaxed)
    }

    /// Runs one unary call, retrying retryable failures with backoff when `idempotent`.
    async fn call<T, F, Fut>(&self, idempotent: bool, extra: Duration, mut f: F) -> Result<T>
    where
        F: FnMut(Rpc) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let opts = &self.inner.options;
        let mut backoff = Backoff::new(
            Duration::from_millis(50),
            Duration::from_secs(2),
            Some(opts.retry_budget),
        );
        let bound = opts.request_timeout.saturating_add(extra);
        loop {
            self.inner.calls.fetch_add(1, Ordering::Relaxed);
            let status = match tokio::time::timeout(bound, f(self.inner.rpc.clone())).await {
                Ok(Ok(resp)) => return Ok(resp.into_inner()),
                Ok(Err(status)) => status,
                Err(_) => return Err(Error::Timeout(bound)),
            };
            if idempotent && retry::is_retryable(&status) {
                if let Some(delay) = backoff.next_delay() {
                    tracing::debug!(code = ?status.code(), message = status.message(), ?delay, "call failed, retrying");
                    tokio::time::sleep(delay).await;
                    continue;
                }
            }
            return Err(Error::from_status(&status, &self.inner.url));
        }
    }

    /// Submits one task and returns its future once the broker has made it durable.
    ///
    /// Retried through a broker restart within the retry budget; the task's client-chosen id
    /// makes that safe. When the id or idempotency key matches an existing task, the future
    /// follows that task.
    pub async fn submit(&self, task: Task) -> Result<TaskFuture> {
        let mut futures = self.submit_many([task]).await?;
        futures
            .pop()
            .ok_or_else(|| Error::Protocol("Submit returned no result".into()))
    }

    /// Submits many tasks in as few calls as their size allows (up to 5,000 tasks or 2 MiB a
    /// call) and returns their futures in input order.
    ///
    /// On error, tasks of earlier calls may have been submitted; submitting the same [`Task`]
    /// values again is safe (their ids are fixed when they are built).
    pub async fn submit_many(
        &self,
        tasks: impl IntoIterator<Item = Task>,
    ) -> Result<Vec<TaskFuture>> {
        let specs: Vec<pb::TaskSpec> = tasks.into_iter().map(|t| t.to_spec()).collect();
        let mut futures = Vec::with_capacity(specs.len());
        for chunk in chunk_specs(specs) {
            let expected = chunk.len();
            let request = pb::SubmitRequest { tasks: chunk };
            let resp = self
                .call(true, Duration::ZERO, |mut rpc| {
                    let request = request.clone();
                    async move { rpc.submit(request).await }
                })
                .await?;
            if resp.results.len() != expected {
                return Err(Error::Protocol(format!(
                    "Submit of {expected} tasks returned {} results",
                    resp.results.len()
                )));
            }
            let mut registrations = Vec::with_capacity(expected);
            for r in resp.results {
                let id = parse_id(&r.id)?;
                let shared = Shared::new(id);
                registrations.push((id.to_string(), shared.clone()));
                futures.push(TaskFuture::new(shared, self.clone()));
            }
            self.inner.watch.register(registrations);
        }
        Ok(futures)
    }

    /// A future for an existing task (e.g. one submitted by another process). An unknown id
    /// completes the future with [`Error::NotFound`].
    pub fn future(&self, id: Uuid) -> TaskFuture {
        let shared = Shared::new(id);
        self.inner
            .watch
            .register(vec![(id.to_string(), shared.clone())]);
        TaskFuture::new(shared, self.clone())
    }

    /// The task with this id, as the broker knows it now.
    pub async fn get(&self, id: Uuid) -> Result<pb::Task> {
        self.get_wait(id, Duration::ZERO).await
    }

    /// The task with this id, waiting (long-poll) at most `wait` for it to become terminal.
    /// The broker allows at most 5 minutes per call, so a longer `wait` is cut to that.
    pub async fn get_wait(&self, id: Uuid, wait: Duration) -> Result<pb::Task> {
        let wait = wait.min(MAX_LONG_POLL);
        let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        let request = pb::GetTaskRequest {
            id: id.to_string(),
            wait_ms,
        };
        self.call(true, wait, |mut rpc| {
            let request = request.clone();
            async move { rpc.get_task(request).await }
        })
        .await
    }

    /// Cancels tasks (one call). See [`TaskFuture::cancel`] for the semantics; one result per
    /// id, in order.
    pub async fn cancel(&self, ids: &[Uuid], reason: &str) -> Result<Vec<pb::CancelResult>> {
        let request = pb::CancelRequest {
            ids: ids.iter().map(Uuid::to_string).collect(),
            reason: reason.to_string(),
        };
        let resp = self
            .call(true, Duration::ZERO, |mut rpc| {
                let request = request.clone();
                async move { rpc.cancel(request).await }
            })
            .await?;
        Ok(resp.results)
    }

    /// Creates a new task from a failed or cancelled one (linked to it) and returns the new
    /// task's future. Not retried automatically (it is not idempotent).
    pub async fn retry(&self, id: Uuid) -> Result<TaskFuture> {
        let request = pb::RetryRequest { id: id.to_string() };
        let task = self
            .call(false, Duration::ZERO, |mut rpc| {
                let request = request.clone();
                async move { rpc.retry(request).await }
            })
            .await?;
        Ok(self.future(parse_id(&task.id)?))
    }

    /// One page of tasks, filtered by queue and state, ordered by id.
    pub async fn list_tasks(&self, query: &ListTasks) -> Result<TaskPage> {
        let request = pb::ListTasksRequest {
            queue: query.queue.clone().unwrap_or_default(),
            state: query.state.unwrap_or(pb::TaskState::Unspecified) as i32,
            limit: query.limit.unwrap_or(0),
            cursor: query.cursor.clone().unwrap_or_default(),
        };
        let resp = self
            .call(true, Duration::ZERO, |mut rpc| {
                let request = request.clone();
                async move { rpc.list_tasks(request).await }
            })
            .await?;
        Ok(TaskPage {
            tasks: resp.tasks,
            next_cursor: Some(resp.next_cursor).filter(|c| !c.is_empty()),
        })
    }

    /// The queues the broker knows, with their depths.
    pub async fn list_queues(&self) -> Result<Vec<pb::QueueInfo>> {
        let resp = self
            .call(true, Duration::ZERO, |mut rpc| async move {
                rpc.list_queues(pb::ListQueuesRequest {}).await
            })
            .await?;
        Ok(resp.queues)
    }

    /// The connected (and recently disconnected) workers.
    pub async fn list_workers(&self) -> Result<Vec<pb::WorkerInfo>> {
        let resp = self
            .call(true, Duration::ZERO, |mut rpc| async move {
                rpc.list_workers(pb::ListWorkersRequest {}).await
            })
            .await?;
        Ok(resp.workers)
    }

    /// The broker's `grpc.health.v1` status for `service` (`""`: the whole broker). Not retried.
    pub async fn health(&self, service: &str) -> Result<ServingStatus> {
        let mut health = self.inner.health.clone();
        let request = tonic_health::pb::HealthCheckRequest {
            service: service.to_string(),
        };
        let bound = self.inner.options.request_timeout;
        let resp = tokio::time::timeout(bound, health.check(request))
            .await
            .map_err(|_| Error::Timeout(bound))?
            .map_err(|s| Error::from_status(&s, &self.inner.url))?;
        Ok(resp.into_inner().status())
    }

    /// Opens a dedicated Watch stream (not the one shared by futures) for these ids and
    /// queues, and yields each completed task as the broker reports it; an id the broker does
    /// not know yields [`Error::NotFound`]. The stream reconnects after a broker restart (for
    /// up to the retry budget per outage), adding again the ids not reported yet. It never
    /// ends by itself while it watches a queue or an unreported id.
    pub async fn watch(
        &self,
        ids: &[Uuid],
        queues: &[String],
    ) -> Result<BoxStream<'static, Result<pb::Task>>> {
        crate::events::open(
            self.inner.rpc.clone(),
            self.inner.url.clone(),
            ids.iter().map(Uuid::to_string).collect(),
            queues.to_vec(),
            self.inner.options.retry_budget,
        )
        .await
    }
}

/// Splits specs into Submit-sized chunks.
fn chunk_specs(specs: Vec<pb::TaskSpec>) -> Vec<Vec<pb::TaskSpec>> {
    let mut chunks = Vec::new();
    let mut current = Vec::new();
    let mut bytes = 0usize;
    for spec in specs {
        let len = spec.encoded_len() + 8;
        if !current.is_empty()
            && (bytes + len > SUBMIT_CHUNK_BYTES || current.len() >= SUBMIT_CHUNK_TASKS)
        {
            chunks.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += len;
        current.push(spec);
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

fn parse_id(id: &str) -> Result<Uuid> {
    Uuid::parse_str(id).map_err(|e| {
        Error::Protocol(format!(
            "broker returned a task id that is not a UUID ({id}): {e}"
        ))
    })
}

/// `e` and its causes on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg = format!("{msg}: {text}");
        }
        source = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_thousand_small_tasks_make_two_calls() {
        let specs: Vec<_> = (0..10_000)
            .map(|i| Task::new("n").json(&i).unwrap().to_spec())
            .collect();
        let chunks = chunk_specs(specs);
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks.iter().map(Vec::len).sum::<usize>(), 10_000);
    }

    #[test]
    fn big_payloads_split_by_bytes() {
        let specs: Vec<_> = (0..5)
            .map(|_| {
                Task::new("n")
                    .payload(vec![0u8; 1024 * 1024], "x")
                    .to_spec()
            })
            .collect();
        let chunks = chunk_specs(specs);
        assert!(chunks.len() >= 3, "{}", chunks.len());
    }
}
