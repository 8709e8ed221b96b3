//! The service surface: bad input (precise codes, nothing changed), token, health, reflection,
//! graceful shutdown of open streams.

mod common;

use std::time::Duration;

use common::*;
use taskd_proto::pb;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

async fn channel(url: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn code_of<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => {
            assert!(
                !s.message().is_empty(),
                "a status needs a message a person can act on"
            );
            s.code()
        }
    }
}

#[tokio::test]
async fn bad_input_gets_precise_codes_and_changes_nothing() {
    let server = Server::start(|c| c.max_payload_bytes = 1024).await;
    let mut c = server.client().await;
    let kept = submit(&mut c, vec![spec("ok", "1")]).await.remove(0);

    let bad_specs: Vec<(&str, pb::TaskSpec, Code)> = vec![
        ("empty name", spec("", "1"), Code::InvalidArgument),
        ("name with space", spec("a b", "1"), Code::InvalidArgument),
        (
            "long name",
            spec(&"n".repeat(129), "1"),
            Code::InvalidArgument,
        ),
        (
            "queue non-ascii",
            pb::TaskSpec {
                queue: "quéue".into(),
                ..spec("a", "1")
            },
            Code::InvalidArgument,
        ),
        (
            "bad id",
            pb::TaskSpec {
                id: "xyz".into(),
                ..spec("a", "1")
            },
            Code::InvalidArgument,
        ),
        (
            "payload too big",
            pb::TaskSpec {
                payload: vec![0; 1025],
                ..spec("a", "")
            },
            Code::ResourceExhausted,
        ),
        (
            "delay and not_before",
            pb::TaskSpec {
                delay_ms: 5,
                not_before_unix_ms: 5,
                ..spec("a", "1")
            },
            Code::InvalidArgument,
        ),
        (
            "priority",
            pb::TaskSpec {
                priority: i32::MAX,
                ..spec("a", "1")
            },
            Code::InvalidArgument,
        ),
        (
            "max attempts",
            pb::TaskSpec {
                max_attempts: 5000,
                ..spec("a", "1")
            },
            Code::InvalidArgument,
        ),
        (
            "backoff order",
            pb::TaskSpec {
                backoff_initial_ms: 10,
                backoff_max_ms: 5,
                ..spec("a", "1")
            },
            Code::InvalidArgument,
        ),
        (
            "huge delay",
            pb::TaskSpec {
                delay_ms: u64::MAX,
                ..spec("a", "1")
            },
            Code::InvalidArgument,
        ),
        (
            "huge ttl",
            pb::TaskSpec {
                result_ttl_ms: u64::MAX,
                ..spec("a", "1")
            },
            Code::InvalidArgument,
        ),
        (
            "exec payload",
            spec("exec", "not a spec"),
            Code::InvalidArgument,
        ),
        (
            "content type",
            pb::TaskSpec {
                content_type: "a\u{7}".into(),
                ..spec("a", "1")
            },
            Code::InvalidArgument,
        ),
    ];
    for (what, bad, code) in bad_specs {
        // Always next to a good task: the whole call is refused.
        let r = c
            .submit(pb::SubmitRequest {
                tasks: vec![spec("ok", "2"), bad],
            })
            .await;
        assert_eq!(code_of(r).await, code, "{what}");
    }
    assert_eq!(
        code_of(c.submit(pb::SubmitRequest { tasks: vec![] }).await).await,
        Code::InvalidArgument
    );

    let get = |id: &str, wait_ms| pb::GetTaskRequest {
        id: id.into(),
        wait_ms,
    };
    assert_eq!(
        code_of(c.get_task(get("nope", 0)).await).await,
        Code::InvalidArgument
    );
    assert_eq!(
        code_of(c.get_task(get(&uuid::Uuid::now_v7().to_string(), 0)).await).await,
        Code::NotFound
    );
    assert_eq!(
        code_of(c.get_task(get(&kept, 300_001)).await).await,
        Code::InvalidArgument
    );

    let unknown = uuid::Uuid::now_v7().to_string();
    let cancel = |ids: Vec<String>| pb::CancelRequest {
        ids,
        reason: String::new(),
    };
    assert_eq!(
        code_of(c.cancel(cancel(vec![])).await).await,
        Code::InvalidArgument
    );
    assert_eq!(
        code_of(c.cancel(cancel(vec!["x".into()])).await).await,
        Code::InvalidArgument
    );
    assert_eq!(
        code_of(c.cancel(cancel(vec![kept.clone(), unknown.clone()])).await).await,
        Code::NotFound
    );
    assert_eq!(
        code_of(
            c.retry(pb::RetryRequest {
                id: unknown.clone()
            })
            .await
        )
        .await,
        Code::NotFound
    );
    assert_eq!(
        code_of(c.retry(pb::RetryRequest { id: kept.clone() }).await).await,
        Code::FailedPrecondition
    );

    let list = |limit, cursor: &str, state, queue: &str| pb::ListTasksRequest {
        queue: queue.into(),
        state,
        limit,
        cursor: cursor.into(),
    };
    assert_eq!(
        code_of(c.list_tasks(list(1001, "", 0, "")).await).await,
        Code::InvalidArgument
    );
    assert_eq!(
        code_of(c.list_tasks(list(10, "zz", 0, "")).await).await,
        Code::InvalidArgument
    );
    assert_eq!(
        code_of(c.list_tasks(list(10, "", 99, "")).await).await,
        Code::InvalidArgument
    );
    assert_eq!(
        code_of(c.list_tasks(list(10, "", 0, "a b")).await).await,
        Code::InvalidArgument
    );

    // Nothing changed: the one good task, still queued.
    let all = c
        .list_tasks(list(1000, "", 0, ""))
        .await
        .unwrap()
        .into_inner()
        .tasks;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].id, kept);
    assert_eq!(state(&all[0]), pb::TaskState::Queued);
    let queues = c
        .list_queues(pb::ListQueuesRequest {})
        .await
        .unwrap()
        .into_inner()
        .queues;
    assert_eq!(queues.len(), 1);
    assert_eq!(queues[0].queued, 1);
}

async fn work_error(url: &str, first: pb::WorkerMessage) -> tonic::Status {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(first).await.unwrap();
    let mut client = pb::worker_service_client::WorkerServiceClient::connect(url.to_string())
        .await
        .unwrap();
    let mut stream = match client.work(ReceiverStream::new(rx)).await {
        Ok(s) => s.into_inner(),
        Err(s) => return s,
    };
    let r = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("answer in time");
    drop(tx);
    match r {
        Err(s) => s,
        Ok(m) => panic!("expected an error, got {m:?}"),
    }
}

#[tokio::test]
async fn bad_worker_input() {
    let server = Server::start(|c| c.max_result_bytes = 100).await;
    let url = server.url();
    let s = work_error(
        &url,
        pb::WorkerMessage {
            credits: 1,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("hello"), "{s:?}");
    let s = work_error(
        &url,
        pb::WorkerMessage {
            hello: Some(hello("w", &[], 1)),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(s.code(), Code::InvalidArgument);
    let s = work_error(
        &url,
        pb::WorkerMessage {
            hello: Some(hello("bad id", &["a"], 1)),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(s.code(), Code::InvalidArgument);
    // A second hello on one stream.
    let mut w = RawWorker::connect(&url, hello("w", &["a"], 1)).await;
    w.send(pb::WorkerMessage {
        hello: Some(hello("w", &["a"], 1)),
        ..Default::default()
    })
    .await;
    let r = tokio::time::timeout(WAIT, w.rx.message()).await.unwrap();
    assert_eq!(r.unwrap_err().code(), Code::InvalidArgument);
    // A result above the limit fails the task (not retried) rather than being dropped.
    let mut c = server.client().await;
    let id = submit(&mut c, vec![spec("a", "1")]).await.remove(0);
    let mut w = RawWorker::connect(&url, hello("w2", &["a"], 1)).await;
    w.assignments(1).await;
    w.succeed(&id, 1, &"x".repeat(101), 0).await;
    assert!(w.acks(1).await[0].accepted);
    let t = wait_terminal(&mut c, &id).await;
    assert_eq!(state(&t), pb::TaskState::Failed);
    match t.outcome.and_then(|o| o.result) {
        Some(pb::outcome::Result::Failure(e)) => assert_eq!(e.kind, "result_too_large"),
        other => panic!("{other:?}"),
    }
    // A watch with a bad queue name ends with INVALID_ARGUMENT.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::WatchRequest {
        add_queues: vec!["bad queue".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut stream = c.watch(ReceiverStream::new(rx)).await.unwrap().into_inner();
    let r = tokio::time::timeout(WAIT, stream.message()).await.unwrap();
    assert_eq!(r.unwrap_err().code(), Code::InvalidArgument);
}

#[tokio::test]
async fn token_is_required_when_configured() {
    let server = Server::start(|c| c.token = Some("s3cret".into())).await;
    let mut c = server.client().await;
    let req = |t: Option<&str>| {
        let mut r = tonic::Request::new(pb::ListQueuesRequest {});
        if let Some(t) = t {
            r.metadata_mut().insert("authorization", t.parse().unwrap());
        }
        r
    };
    assert_eq!(
        c.list_queues(req(None)).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(
        c.list_queues(req(Some("Bearer wrong")))
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    assert_eq!(
        c.list_queues(req(Some("s3cret"))).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert!(c.list_queues(req(Some("Bearer s3cret"))).await.is_ok());
    let mut sub = tonic::Request::new(pb::SubmitRequest {
        tasks: vec![spec("a", "1")],
    });
    sub.metadata_mut()
        .insert("authorization", "Bearer nope".parse().unwrap());
    assert_eq!(
        c.submit(sub).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    // The Work stream too.
    let err = RawWorker::try_connect(&server.url(), hello("w", &["a"], 1), None)
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        RawWorker::try_connect(&server.url(), hello("w", &["a"], 1), Some("s3cret"))
            .await
            .is_ok()
    );
    // Nothing was stored by the refused submit.
    let mut ok = tonic::Request::new(pb::ListTasksRequest::default());
    ok.metadata_mut()
        .insert("authorization", "Bearer s3cret".parse().unwrap());
    assert!(
        c.list_tasks(ok)
            .await
            .unwrap()
            .into_inner()
            .tasks
            .is_empty()
    );
    // Reflection needs the token too.
    {
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        let req = tonic_reflection::pb::v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut r = ServerReflectionClient::new(channel(&server.url()).await);
        let err = match r
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
        {
            Ok(s) => s.into_inner().message().await.unwrap_err(),
            Err(e) => e,
        };
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    // Health stays open.
    let mut h = tonic_health::pb::health_client::HealthClient::new(channel(&server.url()).await);
    let r = h
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(
        r.into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

#[tokio::test]
async fn health_is_not_serving_until_recovered_and_reflection_answers() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (gate_tx, gate_rx) = tokio::sync::oneshot::channel::<()>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let hooks = taskd_server::Hooks {
        on_ready: None,
        before_recovery: Some(Box::pin(async move {
            let _ = gate_rx.await;
        })),
    };
    let cfg = test_config(dir.path());
    let server = tokio::spawn(taskd_server::run_with_hooks(
        listener,
        cfg,
        async move {
            let _ = stop_rx.await;
        },
        hooks,
    ));
    let url = format!("http://{addr}");
    let mut h = tonic_health::pb::health_client::HealthClient::new(channel(&url).await);
    for service in ["", "taskd.v1.TaskService", "taskd.v1.WorkerService"] {
        let r = h
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap();
        assert_eq!(
            r.into_inner().status,
            ServingStatus::NotServing as i32,
            "{service}"
        );
    }
    let mut c = pb::task_service_client::TaskServiceClient::connect(url.clone())
        .await
        .unwrap();
    let err = c.list_queues(pb::ListQueuesRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    gate_tx.send(()).unwrap();
    taskd_testkit::eventually(WAIT, "health SERVING", || {
        let mut h = h.clone();
        async move {
            let r = h
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .ok()?;
            (r.into_inner().status == ServingStatus::Serving as i32).then_some(())
        }
    })
    .await
    .unwrap();
    assert!(c.list_queues(pb::ListQueuesRequest {}).await.is_ok());

    // Reflection lists the services.
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut r = ServerReflectionClient::new(channel(&url).await);
    let req = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = r
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let msg = resp.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("unexpected reflection answer {msg:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "taskd.v1.TaskService",
        "taskd.v1.WorkerService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    stop_tx.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn shutdown_ends_open_streams_with_unavailable() {
    let mut server = Server::start(|_| {}).await;
    let mut c = server.client().await;
    let id = submit(&mut c, vec![spec("s", "1")]).await.remove(0);
    let mut w = RawWorker::connect(&server.url(), hello("w", &["s"], 1)).await;
    w.assignments(1).await;
    let (wtx, wrx) = tokio::sync::mpsc::channel(4);
    wtx.send(pb::WatchRequest {
        add_ids: vec![id.clone()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut watch = c
        .watch(ReceiverStream::new(wrx))
        .await
        .unwrap()
        .into_inner();
    let mut c2 = c.clone();
    let poll = tokio::spawn(async move {
        c2.get_task(pb::GetTaskRequest {
            id,
            wait_ms: 60_000,
        })
        .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopped = tokio::time::timeout(Duration::from_secs(10), server.stop())
        .await
        .expect("stops in time");
    assert!(stopped.is_ok(), "{stopped:?}");
    let r = tokio::time::timeout(WAIT, w.rx.message()).await.unwrap();
    assert_eq!(r.unwrap_err().code(), Code::Unavailable);
    let r = tokio::time::timeout(WAIT, watch.message()).await.unwrap();
    assert_eq!(r.unwrap_err().code(), Code::Unavailable);
    let r = poll.await.unwrap();
    assert_eq!(r.unwrap_err().code(), Code::Unavailable);
    drop(wtx);
}
