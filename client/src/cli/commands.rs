//! One function per subcommand. Each returns the exit status, or a [`CliError`].

use std::collections::HashSet;
use std::io::Read;
use std::time::Duration;

use futures::FutureExt;
use futures::stream::{FuturesUnordered, StreamExt};
use serde_json::{Value, json};
use taskd_client::{Client, Error, ListTasks, Outcome, ServingStatus, Task, TaskFuture, pb};
use tokio::time::Instant;
use uuid::Uuid;

use super::args::{
    CancelArgs, Cli, Command, ExecArgs, GetArgs, HealthArgs, LsArgs, MapArgs, RetryArgs,
    SubmitArgs, TaskOpts, WaitArgs, WatchArgs,
};
use super::render::{self, outcome_summary, state_name, table, task_human, task_json, time_human};
use super::{CliError, exit, exit_code, output};

/// Runs the parsed command line.
///
/// Each command validates its input first and connects only then (through [`Connector`]), so
/// that bad input is reported as such even when the broker is down.
pub(crate) async fn run(cli: Cli) -> Result<u8, CliError> {
    let client = &Connector {
        broker: cli.broker.clone(),
        token: cli.token.clone().unwrap_or_default(),
    };
    let json = cli.json;
    match cli.command {
        Command::Submit(a) => submit(client, json, a).await,
        Command::Exec(a) => exec(client, json, a).await,
        Command::Map(a) => map(client, json, a).await,
        Command::Get(a) => get(client, json, a).await,
        Command::Wait(a) => wait(client, json, a).await,
        Command::Cancel(a) => cancel(client, json, a).await,
        Command::Ls(a) => ls(client, json, a).await,
        Command::Watch(a) => watch(client, json, a).await,
        Command::Retry(a) => retry(client, json, a).await,
        Command::Queues => queues(client, json).await,
        Command::Workers => workers(client, json).await,
        Command::Health(a) => health(client, json, a).await,
    }
}

/// Connects on demand.
pub(crate) struct Connector {
    broker: String,
    token: String,
}

impl Connector {
    async fn client(&self) -> Result<Client, CliError> {
        Ok(Client::builder(&self.broker)
            .token(self.token.clone())
            .connect_timeout(Duration::from_secs(3))
            .retry_budget(Duration::from_secs(30))
            .connect()
            .await?)
    }
}

fn parse_id(s: &str) -> Result<Uuid, CliError> {
    Uuid::parse_str(s.trim())
        .map_err(|_| CliError::usage(format!("'{s}' is not a task id (a UUID)")))
}

fn read_stdin() -> Result<Vec<u8>, CliError> {
    let mut buf = Vec::new();
    std::io::stdin()
        .read_to_end(&mut buf)
        .map_err(|e| CliError::usage(format!("cannot read stdin: {e}")))?;
    Ok(buf)
}

fn apply_opts(mut task: Task, o: &TaskOpts) -> Task {
    if let Some(q) = &o.queue {
        task = task.queue(q.clone());
    }
    if let Some(p) = o.priority {
        task = task.priority(p);
    }
    if let Some(d) = o.delay {
        task = task.delay(d);
    }
    if let Some(n) = o.max_attempts {
        task = task.max_attempts(n);
    }
    if let Some(t) = o.timeout {
        task = task.timeout(t);
    }
    task
}

fn exit_for_state(state: pb::TaskState) -> u8 {
    match state {
        pb::TaskState::Succeeded => exit::OK,
        s if s.is_terminal() => exit::TASK_FAILED,
        _ => exit::TIMEOUT,
    }
}

/// Waits for `fut` (bounded), then prints the task's outcome; returns the exit status.
async fn wait_and_print(
    client: &Client,
    json: bool,
    fut: &TaskFuture,
    bound: Option<Duration>,
) -> Result<u8, CliError> {
    if let Err(e) = fut.outcome(bound).await {
        return Err(match e {
            Error::Timeout(t) => CliError {
                code: exit::TIMEOUT,
                message: format!(
                    "task {} did not complete within {}",
                    fut.id(),
                    humantime::format_duration(t)
                ),
            },
            e => e.into(),
        });
    }
    let task = client.get(fut.id()).await?;
    if json {
        output::json(&task_json(&task));
        return Ok(exit_for_state(task.state()));
    }
    match task.outcome.as_ref().and_then(|o| o.result.as_ref()) {
        Some(pb::outcome::Result::Success(s)) => {
            if let Some(r) = exec_result(&s.content_type, &s.output) {
                output::bytes(&r.stdout);
                output::err_bytes(&r.stderr);
            } else {
                output::bytes(&s.output);
                if !s.output.ends_with(b"\n") {
                    output::line("");
                }
            }
            Ok(exit::OK)
        }
        _ => {
            eprintln!("taskctl: task {}: {}", task.id, outcome_summary(&task));
            Ok(exit_for_state(task.state()))
        }
    }
}

fn exec_result(content_type: &str, bytes: &[u8]) -> Option<pb::ExecResult> {
    use prost::Message;
    (content_type == taskd_proto::EXEC_RESULT_CONTENT_TYPE)
        .then(|| pb::ExecResult::decode(bytes).ok())
        .flatten()
}

/// The exit status a finished program asks for.
fn program_status(r: &pb::ExecResult) -> u8 {
    match (r.exit_code, r.signal) {
        (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(1),
        (None, Some(sig)) => u8::try_from((128 + sig) & 0xff).unwrap_or(1),
        (None, None) => exit::TASK_FAILED,
    }
}

async fn submit(conn: &Connector, json: bool, a: SubmitArgs) -> Result<u8, CliError> {
    let payload = match (&a.payload, &a.payload_file) {
        (Some(p), _) if p == "-" => Some(read_stdin()?),
        (Some(p), _) => Some(p.clone().into_bytes()),
        (None, Some(f)) => Some(std::fs::read(f).map_err(|e| {
            CliError::usage(format!("cannot read payload file {}: {e}", f.display()))
        })?),
        (None, None) => None,
    };
    let mut task = Task::new(a.name.clone());
    if let Some(p) = payload {
        serde_json::from_slice::<Value>(&p)
            .map_err(|e| CliError::usage(format!("the payload is not valid JSON: {e}")))?;
        task = task.payload(p, taskd_proto::DEFAULT_CONTENT_TYPE);
    }
    task = apply_opts(task, &a.opts);
    if let Some(k) = &a.key {
        task = task.idempotency_key(k.clone());
    }
    let client = &conn.client().await?;
    let fut = client.submit(task).await?;
    if a.wait {
        return wait_and_print(client, json, &fut, a.wait_timeout).await;
    }
    if json {
        output::json(&json!({"id": fut.id().to_string()}));
    } else {
        output::line(fut.id());
    }
    Ok(exit::OK)
}

async fn exec(conn: &Connector, json: bool, a: ExecArgs) -> Result<u8, CliError> {
    let mut env = Vec::new();
    for kv in &a.env {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| CliError::usage(format!("--env {kv}: expected KEY=VALUE")))?;
        env.push((k.to_string(), v.to_string()));
    }
    let mut task = Task::exec(a.argv.clone());
    if !env.is_empty() {
        task = task.env(env);
    }
    if let Some(cwd) = &a.cwd {
        task = task.cwd(cwd);
    }
    if a.stdin {
        task = task.stdin(read_stdin()?);
    }
    task = apply_opts(task, &a.opts);
    let client = &conn.client().await?;
    let fut = client.submit(task).await?;
    if !a.wait {
        if json {
            output::json(&json!({"id": fut.id().to_string()}));
        } else {
            output::line(fut.id());
        }
        return Ok(exit::OK);
    }
    let outcome = fut.outcome(a.wait_timeout).await.map_err(|e| match e {
        Error::Timeout(t) => CliError {
            code: exit::TIMEOUT,
            message: format!(
                "task {} did not complete within {}",
                fut.id(),
                humantime::format_duration(t)
            ),
        },
        e => e.into(),
    })?;
    let result = match &outcome {
        Outcome::Succeeded(o) => o.exec().ok(),
        Outcome::Failed(f) => f.exec(),
        Outcome::Cancelled(_) => None,
    };
    if json {
        let task = client.get(fut.id()).await?;
        output::json(&task_json(&task));
    } else if let Some(r) = &result {
        output::bytes(&r.stdout);
        output::err_bytes(&r.stderr);
    }
    match (&outcome, &result) {
        (_, Some(r)) => {
            if let Outcome::Failed(f) = &outcome {
                if f.kind != "exit_code" && !json {
                    eprintln!(
                        "taskctl: task {} failed ({}): {}",
                        fut.id(),
                        f.kind,
                        f.message
                    );
                }
            }
            Ok(program_status(r))
        }
        (Outcome::Succeeded(_), None) => Ok(exit::OK),
        (Outcome::Failed(f), None) => {
            if !json {
                eprintln!(
                    "taskctl: task {} failed ({}): {}",
                    fut.id(),
                    f.kind,
                    f.message
                );
            }
            Ok(exit::TASK_FAILED)
        }
        (Outcome::Cancelled(reason), None) => {
            if !json {
                eprintln!(
                    "taskctl: task {} was cancelled{}",
                    fut.id(),
                    if reason.is_empty() {
                        String::new()
                    } else {
                        format!(": {reason}")
                    }
                );
            }
            Ok(exit::TASK_FAILED)
        }
    }
}

/// The argv for one input line: `{}` replaced, or the line appended when no argument has `{}`.
fn substitute(argv: &[String], line: &str) -> Vec<String> {
    if argv.iter().any(|a| a.contains("{}")) {
        argv.iter().map(|a| a.replace("{}", line)).collect()
    } else {
        let mut v = argv.to_vec();
        v.push(line.to_string());
        v
    }
}

async fn map(conn: &Connector, json: bool, a: MapArgs) -> Result<u8, CliError> {
    let input =
        String::from_utf8(read_stdin()?).map_err(|_| CliError::usage("stdin is not UTF-8 text"))?;
    let lines: Vec<String> = input
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    let client = &conn.client().await?;
    let jobs = a.jobs as usize;
    // A timeout beyond what an `Instant` can hold (`--wait-timeout 1000000000y`) is none.
    let deadline = a.wait_timeout.and_then(|t| Instant::now().checked_add(t));
    let mut in_flight = FuturesUnordered::new();
    let mut next = 0usize;
    let mut failed = 0usize;
    loop {
        let free = jobs.saturating_sub(in_flight.len());
        if free > 0 && next < lines.len() {
            let end = (next + free).min(lines.len());
            let tasks: Vec<Task> = lines[next..end]
                .iter()
                .map(|l| apply_opts(Task::exec(substitute(&a.argv, l)), &a.opts))
                .collect();
            let futs = client.submit_many(tasks).await?;
            for (line, f) in lines[next..end].iter().cloned().zip(futs) {
                in_flight.push(async move {
                    let outcome = f.outcome(None).await;
                    (line, f.id(), outcome)
                });
            }
            next = end;
        }
        let first = match deadline {
            Some(at) => match tokio::time::timeout_at(at, in_flight.next()).await {
                Ok(v) => v,
                Err(_) => {
                    return Err(CliError {
                        code: exit::TIMEOUT,
                        message: format!(
                            "--wait-timeout reached with {} task(s) unfinished and {} not submitted",
                            in_flight.len(),
                            lines.len() - next
                        ),
                    });
                }
            },
            None => in_flight.next().await,
        };
        let Some(first) = first else { break };
        let mut ready = vec![first];
        // Drain what else is complete, so that the refill is one batched submit.
        while let Some(Some(more)) = in_flight.next().now_or_never() {
            ready.push(more);
        }
        for (line, id, outcome) in ready {
            if !print_map_outcome(json, &line, id, outcome) {
                failed += 1;
            }
        }
    }
    if failed > 0 {
        if !json {
            eprintln!("taskctl: {failed} of {} task(s) failed", lines.len());
        }
        return Ok(exit::TASK_FAILED);
    }
    Ok(exit::OK)
}

/// Prints one map outcome; true when the task succeeded.
fn print_map_outcome(json: bool, line: &str, id: Uuid, outcome: Result<Outcome, Error>) -> bool {
    let (ok, result, error) = match &outcome {
        Ok(Outcome::Succeeded(o)) => (true, o.exec().ok(), None),
        Ok(Outcome::Failed(f)) => (
            false,
            f.exec(),
            Some(format!("failed ({}): {}", f.kind, f.message)),
        ),
        Ok(Outcome::Cancelled(r)) => (
            false,
            None,
            Some(format!("cancelled {r}").trim().to_string()),
        ),
        Err(e) => (false, None, Some(e.to_string())),
    };
    if json {
        let mut v = json!({
            "input": line,
            "id": id.to_string(),
            "state": match &outcome {
                Ok(Outcome::Succeeded(_)) => "succeeded",
                Ok(Outcome::Failed(_)) => "failed",
                Ok(Outcome::Cancelled(_)) => "cancelled",
                Err(_) => "unknown",
            },
            "error": error,
        });
        if let Some(r) = &result {
            if let (Value::Object(m), Value::Object(e)) = (&mut v, render::exec_json(r)) {
                m.extend(e);
            }
        }
        output::json(&v);
    } else {
        if let Some(r) = &result {
            output::bytes(&r.stdout);
            output::err_bytes(&r.stderr);
        }
        if let Some(e) = &error {
            eprintln!("taskctl: {line}: {e}");
        }
    }
    ok
}

async fn get(conn: &Connector, json: bool, a: GetArgs) -> Result<u8, CliError> {
    let id = parse_id(&a.id)?;
    let client = &conn.client().await?;
    let task = client.get(id).await?;
    if json {
        output::json(&task_json(&task));
    } else {
        for l in task_human(&task) {
            output::line(l);
        }
    }
    Ok(exit::OK)
}

async fn wait(conn: &Connector, json: bool, a: WaitArgs) -> Result<u8, CliError> {
    let ids = a
        .ids
        .iter()
        .map(|s| parse_id(s))
        .collect::<Result<Vec<_>, _>>()?;
    let client = &conn.client().await?;
    let futs: Vec<TaskFuture> = ids.iter().map(|id| client.future(*id)).collect();
    let mut stream = taskd_client::as_completed(futs.clone(), a.timeout);
    let mut code = exit::OK;
    while let Some(next) = stream.next().await {
        let f = match next {
            Ok(f) => f,
            Err(Error::Timeout(t)) => {
                let left: Vec<String> = futs
                    .iter()
                    .filter(|f| !f.done())
                    .map(|f| f.id().to_string())
                    .collect();
                eprintln!(
                    "taskctl: error: timed out after {} waiting for {} task(s): {}",
                    humantime::format_duration(t),
                    left.len(),
                    left.join(" ")
                );
                return Ok(exit::TIMEOUT);
            }
            Err(e) => return Err(e.into()),
        };
        match f.try_outcome() {
            Some(Ok(_)) => {
                let task = client.get(f.id()).await?;
                if task.state() != pb::TaskState::Succeeded && code == exit::OK {
                    code = exit::TASK_FAILED;
                }
                if json {
                    output::json(&task_json(&task));
                } else {
                    output::line(format!("{}  {}", task.id, outcome_summary(&task)));
                }
            }
            Some(Err(e)) => {
                eprintln!("taskctl: error: {e}");
                code = code.max(exit_code(&e));
            }
            None => {
                return Err(CliError {
                    code: exit::BROKER,
                    message: "internal: completed future has no outcome".into(),
                });
            }
        }
    }
    Ok(code)
}

async fn cancel(conn: &Connector, json: bool, a: CancelArgs) -> Result<u8, CliError> {
    let ids = a
        .ids
        .iter()
        .map(|s| parse_id(s))
        .collect::<Result<Vec<_>, _>>()?;
    let client = &conn.client().await?;
    let results = client.cancel(&ids, &a.reason).await?;
    let mut code = exit::OK;
    for r in &results {
        let state = r.state();
        if state == pb::TaskState::Unspecified {
            code = exit::NOT_FOUND;
        }
        if json {
            output::json(&json!({
                "id": r.id, "cancelled": r.cancelled, "cancel_requested": r.cancel_requested,
                "state": state_name(state),
            }));
        } else if r.cancelled {
            output::line(format!("{}  cancelled", r.id));
        } else if r.cancel_requested {
            output::line(format!(
                "{}  cancel requested (it is running; it ends cancelled or with its outcome)",
                r.id
            ));
        } else if state == pb::TaskState::Unspecified {
            eprintln!("taskctl: error: task {} not found", r.id);
        } else {
            output::line(format!(
                "{}  not cancelled: already {}",
                r.id,
                state_name(state)
            ));
        }
    }
    Ok(code)
}

async fn ls(conn: &Connector, json: bool, a: LsArgs) -> Result<u8, CliError> {
    let client = &conn.client().await?;
    let page = client
        .list_tasks(&ListTasks {
            queue: a.queue,
            state: a.state.map(|s| s.to_pb()),
            limit: a.limit,
            cursor: a.cursor,
        })
        .await?;
    if json {
        output::json(&json!({
            "tasks": page.tasks.iter().map(task_json).collect::<Vec<_>>(),
            "next_cursor": page.next_cursor,
        }));
        return Ok(exit::OK);
    }
    let rows: Vec<Vec<String>> = page
        .tasks
        .iter()
        .map(|t| {
            let spec = t.spec.clone().unwrap_or_default();
            vec![
                t.id.clone(),
                spec.queue,
                spec.name,
                state_name(t.state()).to_string(),
                t.attempt.to_string(),
                render::time(t.submitted_at_unix_ms).unwrap_or_default(),
                if t.outcome.is_some() {
                    outcome_summary(t)
                } else {
                    String::new()
                },
            ]
        })
        .collect();
    for l in table(
        &[
            "ID",
            "QUEUE",
            "NAME",
            "STATE",
            "ATTEMPT",
            "SUBMITTED",
            "OUTCOME",
        ],
        &rows,
    ) {
        output::line(l);
    }
    if let Some(c) = page.next_cursor {
        output::line(format!("(more: taskctl ls --cursor {c})"));
    }
    Ok(exit::OK)
}

async fn watch(conn: &Connector, json: bool, a: WatchArgs) -> Result<u8, CliError> {
    if a.ids.is_empty() && a.queue.is_empty() {
        return Err(CliError::usage("name task ids to watch, or --queue Q"));
    }
    let ids = a
        .ids
        .iter()
        .map(|s| parse_id(s))
        .collect::<Result<Vec<_>, _>>()?;
    let mut waiting: HashSet<String> = ids.iter().map(Uuid::to_string).collect();
    let until_ids = a.queue.is_empty();
    let client = &conn.client().await?;
    let mut stream = client.watch(&ids, &a.queue).await?;
    let what = match (ids.len(), a.queue.len()) {
        (n, 0) => format!("{n} task(s)"),
        (0, _) => format!("queue(s) {}", a.queue.join(", ")),
        (n, _) => format!("{n} task(s) and queue(s) {}", a.queue.join(", ")),
    };
    eprintln!("taskctl: watching {what}");
    // A timeout beyond what an `Instant` can hold (`--wait-timeout 1000000000y`) is none.
    let deadline = a.wait_timeout.and_then(|t| Instant::now().checked_add(t));
    let mut seen = 0u64;
    let mut code = exit::OK;
    loop {
        if until_ids && waiting.is_empty() {
            break;
        }
        if a.count.is_some_and(|c| seen >= c) {
            break;
        }
        let next = match deadline {
            Some(at) => match tokio::time::timeout_at(at, stream.next()).await {
                Ok(n) => n,
                Err(_) if until_ids || a.count.is_some() => {
                    eprintln!("taskctl: error: --wait-timeout reached after {seen} event(s)");
                    return Ok(exit::TIMEOUT);
                }
                // Watching queues for a while is the expected way to end such a watch.
                Err(_) => return Ok(code),
            },
            None => stream.next().await,
        };
        match next {
            Some(Ok(task)) => {
                seen += 1;
                waiting.remove(&task.id);
                if json {
                    output::json(&task_json(&task));
                } else {
                    let spec = task.spec.clone().unwrap_or_default();
                    output::line(format!(
                        "{}  {}  {}  {}  {}",
                        time_human(task.finished_at_unix_ms),
                        task.id,
                        spec.queue,
                        spec.name,
                        outcome_summary(&task)
                    ));
                }
            }
            Some(Err(Error::NotFound(m))) => {
                eprintln!("taskctl: error: not found: {m}");
                if let Some(id) = m.split_whitespace().nth(1) {
                    waiting.remove(id);
                }
                code = exit::NOT_FOUND;
            }
            Some(Err(e)) => return Err(e.into()),
            None => {
                return Err(CliError {
                    code: exit::CONNECTION,
                    message: "the broker closed the watch stream".into(),
                });
            }
        }
    }
    Ok(code)
}

async fn retry(conn: &Connector, json: bool, a: RetryArgs) -> Result<u8, CliError> {
    let id = parse_id(&a.id)?;
    let client = &conn.client().await?;
    let fut = client.retry(id).await?;
    if json {
        output::json(&json!({"id": fut.id().to_string(), "retry_of": id.to_string()}));
    } else {
        output::line(fut.id());
    }
    Ok(exit::OK)
}

async fn queues(conn: &Connector, json: bool) -> Result<u8, CliError> {
    let client = &conn.client().await?;
    let queues = client.list_queues().await?;
    if json {
        output::json(&Value::Array(
            queues
                .iter()
                .map(|q| json!({
                    "name": q.name, "queued": q.queued, "scheduled": q.scheduled, "running": q.running,
                    "succeeded": q.succeeded, "failed": q.failed, "cancelled": q.cancelled,
                }))
                .collect(),
        ));
        return Ok(exit::OK);
    }
    let rows: Vec<Vec<String>> = queues
        .iter()
        .map(|q| {
            vec![
                q.name.clone(),
                q.queued.to_string(),
                q.scheduled.to_string(),
                q.running.to_string(),
                q.succeeded.to_string(),
                q.failed.to_string(),
                q.cancelled.to_string(),
            ]
        })
        .collect();
    for l in table(
        &[
            "QUEUE",
            "QUEUED",
            "SCHEDULED",
            "RUNNING",
            "SUCCEEDED",
            "FAILED",
            "CANCELLED",
        ],
        &rows,
    ) {
        output::line(l);
    }
    Ok(exit::OK)
}

async fn workers(conn: &Connector, json: bool) -> Result<u8, CliError> {
    let client = &conn.client().await?;
    let workers = client.list_workers().await?;
    if json {
        output::json(&Value::Array(
            workers
                .iter()
                .map(|w| json!({
                    "worker_id": w.worker_id, "host": w.host, "peer_addr": w.peer_addr,
                    "queues": w.queues, "names": w.names, "slots": w.slots, "running": w.running,
                    "connected": w.connected, "connected_at": render::time(w.connected_at_unix_ms),
                    "disconnected_at": render::time(w.disconnected_at_unix_ms),
                }))
                .collect(),
        ));
        return Ok(exit::OK);
    }
    let rows: Vec<Vec<String>> = workers
        .iter()
        .map(|w| {
            vec![
                w.worker_id.clone(),
                w.host.clone(),
                w.peer_addr.clone(),
                w.queues.join(","),
                w.names.join(","),
                format!("{}/{}", w.running, w.slots),
                if w.connected {
                    format!("connected {}", time_human(w.connected_at_unix_ms))
                } else {
                    format!("disconnected {}", time_human(w.disconnected_at_unix_ms))
                },
            ]
        })
        .collect();
    for l in table(
        &[
            "WORKER", "HOST", "PEER", "QUEUES", "HANDLERS", "BUSY", "STATUS",
        ],
        &rows,
    ) {
        output::line(l);
    }
    Ok(exit::OK)
}

async fn health(conn: &Connector, json: bool, a: HealthArgs) -> Result<u8, CliError> {
    let client = &conn.client().await?;
    let status = client.health(&a.service).await?;
    let name = status.as_str_name();
    if json {
        output::json(&json!({"status": name}));
    } else {
        output::line(name);
    }
    Ok(if status == ServingStatus::Serving {
        exit::OK
    } else {
        exit::TASK_FAILED
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitute_replaces_or_appends() {
        let argv = vec!["echo".to_string(), "x{}y".to_string()];
        assert_eq!(substitute(&argv, "1"), vec!["echo", "x1y"]);
        assert_eq!(
            substitute(&["echo".to_string()], "a b"),
            vec!["echo", "a b"]
        );
    }

    #[test]
    fn program_status_follows_exit_and_signal() {
        let r = |c: Option<i32>, s: Option<i32>| pb::ExecResult {
            exit_code: c,
            signal: s,
            ..Default::default()
        };
        assert_eq!(program_status(&r(Some(3), None)), 3);
        assert_eq!(program_status(&r(None, Some(9))), 137);
        assert_eq!(program_status(&r(None, None)), 1);
    }
}
