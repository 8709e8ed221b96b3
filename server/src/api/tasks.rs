//! `taskd.v1.TaskService`: submit, read, cancel, retry, list (Watch lives in [`super::watch`]).

use std::time::Duration;

use taskd_proto::pb;
use tonic::{Request, Response, Status, Streaming};

use super::Api;
use super::validate::{self, MAX_BATCH, MAX_PAGE, MAX_WAIT_MS};
use crate::core::state::wall_ms;

/// The client-facing service.
#[derive(Clone)]
pub struct TaskApi(pub Api);

#[tonic::async_trait]
impl pb::task_service_server::TaskService for TaskApi {
    async fn submit(
        &self,
        request: Request<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        let broker = self.0.broker()?;
        let specs = request.into_inner().tasks;
        if specs.is_empty() {
            return Err(Status::invalid_argument(
                "tasks is empty: submit at least one task",
            ));
        }
        if specs.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "{} tasks in one Submit; at most {MAX_BATCH} are allowed",
                specs.len()
            )));
        }
        let now = wall_ms();
        let mut tasks = Vec::with_capacity(specs.len());
        for (i, spec) in specs.into_iter().enumerate() {
            tasks.push(validate::new_task(&self.0.cfg, spec, now, i)?);
        }
        let results = broker.submit(tasks).await?;
        Ok(Response::new(pb::SubmitResponse { results }))
    }

    async fn get_task(
        &self,
        request: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        let broker = self.0.broker()?;
        let req = request.into_inner();
        let id = validate::parse_id("id", &req.id)?;
        if req.wait_ms > MAX_WAIT_MS {
            return Err(Status::invalid_argument(format!(
                "wait_ms is {}; at most {MAX_WAIT_MS} (5 minutes) is allowed",
                req.wait_ms
            )));
        }
        let wait = (req.wait_ms > 0).then(|| Duration::from_millis(req.wait_ms));
        tokio::select! {
            r = broker.get(id, wait) => Ok(Response::new(r?)),
            _ = self.0.shutdown.cancelled() => Err(Status::unavailable("taskd is shutting down")),
        }
    }

    async fn cancel(
        &self,
        request: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelResponse>, Status> {
        let broker = self.0.broker()?;
        let req = request.into_inner();
        if req.ids.is_empty() {
            return Err(Status::invalid_argument(
                "ids is empty: name at least one task",
            ));
        }
        if req.ids.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "{} ids in one Cancel; at most {MAX_BATCH} are allowed",
                req.ids.len()
            )));
        }
        if req.reason.len() > validate::MAX_MESSAGE_BYTES {
            return Err(Status::invalid_argument("reason is longer than 64 KiB"));
        }
        let ids = req
            .ids
            .iter()
            .enumerate()
            .map(|(i, s)| validate::parse_id(&format!("ids[{i}]"), s))
            .collect::<Result<Vec<_>, _>>()?;
        let reason = if req.reason.is_empty() {
            "cancelled by request".to_string()
        } else {
            req.reason
        };
        let results = broker.cancel(ids, reason).await?;
        Ok(Response::new(pb::CancelResponse { results }))
    }

    async fn retry(
        &self,
        request: Request<pb::RetryRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        let broker = self.0.broker()?;
        let id = validate::parse_id("id", &request.into_inner().id)?;
        Ok(Response::new(broker.retry(id).await?))
    }

    type WatchStream = super::watch::WatchStream;

    async fn watch(
        &self,
        request: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        super::watch::open(&self.0, request.into_inner())
    }

    async fn list_tasks(
        &self,
        request: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        let broker = self.0.broker()?;
        let req = request.into_inner();
        if !req.queue.is_empty() {
            validate::check_name("queue", &req.queue)?;
        }
        let state = match pb::TaskState::try_from(req.state) {
            Ok(pb::TaskState::Unspecified) => None,
            Ok(s) => Some(s),
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "state {} is not a TaskState",
                    req.state
                )));
            }
        };
        if req.limit > MAX_PAGE {
            return Err(Status::invalid_argument(format!(
                "limit is {}; at most {MAX_PAGE} is allowed",
                req.limit
            )));
        }
        let limit = if req.limit == 0 {
            100
        } else {
            req.limit as usize
        };
        let cursor = if req.cursor.is_empty() {
            None
        } else {
            Some(validate::parse_id("cursor", &req.cursor)?)
        };
        let page = broker.list_tasks(&req.queue, state, limit, cursor).await?;
        Ok(Response::new(page))
    }

    async fn list_queues(
        &self,
        _request: Request<pb::ListQueuesRequest>,
    ) -> Result<Response<pb::ListQueuesResponse>, Status> {
        let broker = self.0.broker()?;
        Ok(Response::new(pb::ListQueuesResponse {
            queues: broker.list_queues(),
        }))
    }

    async fn list_workers(
        &self,
        _request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let broker = self.0.broker()?;
        Ok(Response::new(pb::ListWorkersResponse {
            workers: broker.list_workers(),
        }))
    }
}
