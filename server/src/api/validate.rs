//! Input validation: every public field checked before the broker sees it, with messages a
//! person can act on. Nothing is changed when a request is refused.

use prost::Message;
use taskd_proto::pb;
use uuid::Uuid;

use super::errors::InputError;
use crate::config::Config;
use crate::core::NewTask;

/// Longest name, queue or worker id, in bytes.
pub const MAX_NAME_BYTES: usize = 128;
/// Longest idempotency key or content type, in bytes.
pub const MAX_KEY_BYTES: usize = 256;
/// Most tasks in one Submit, ids in one Cancel.
pub const MAX_BATCH: usize = 10_000;
/// Longest GetTask wait.
pub const MAX_WAIT_MS: u64 = 5 * 60 * 1000;
/// Largest ListTasks page.
pub const MAX_PAGE: u32 = 1000;
/// Longest delay, backoff, timeout or TTL a task may ask for (365 days).
pub const MAX_DURATION_MS: u64 = 365 * 24 * 3600 * 1000;
/// Priorities lie within ±this.
pub const MAX_PRIORITY: i32 = 1_000_000;
/// Most attempts a task may ask for.
pub const MAX_ATTEMPTS: u32 = 1000;
/// Longest error message or cancel reason kept (longer ones are cut).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

fn invalid(m: String) -> InputError {
    InputError::Invalid(m)
}

/// A name or queue: 1..=128 bytes of printable ASCII without spaces.
pub fn check_name(field: &str, v: &str) -> Result<(), InputError> {
    if v.is_empty() {
        return Err(invalid(format!("{field} must not be empty")));
    }
    if v.len() > MAX_NAME_BYTES {
        return Err(invalid(format!(
            "{field} is {} bytes; at most {MAX_NAME_BYTES} are allowed",
            v.len()
        )));
    }
    if let Some(c) = v.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(invalid(format!(
            "{field} {v:?} contains {c:?}; only printable ASCII without spaces is allowed"
        )));
    }
    Ok(())
}

fn check_text(field: &str, v: &str, max: usize) -> Result<(), InputError> {
    if v.len() > max {
        return Err(invalid(format!(
            "{field} is {} bytes; at most {max} are allowed",
            v.len()
        )));
    }
    if v.chars().any(|c| !(c == ' ' || c.is_ascii_graphic())) {
        return Err(invalid(format!("{field} {v:?} must be printable ASCII")));
    }
    Ok(())
}

/// A task id: a UUID in text form.
pub fn parse_id(field: &str, v: &str) -> Result<Uuid, InputError> {
    if v.is_empty() {
        return Err(invalid(format!("{field} must not be empty")));
    }
    v.parse::<Uuid>()
        .map_err(|_| invalid(format!("{field} {v:?} is not a UUID")))
}

fn check_ms(field: &str, v: u64) -> Result<(), InputError> {
    if v > MAX_DURATION_MS {
        return Err(invalid(format!(
            "{field} is {v} ms; at most {MAX_DURATION_MS} (365 days) is allowed"
        )));
    }
    Ok(())
}

/// Validates a submitted spec and fills in the defaults (`tasks[index]` in messages).
pub fn new_task(
    cfg: &Config,
    mut spec: pb::TaskSpec,
    now_ms: u64,
    index: usize,
) -> Result<NewTask, InputError> {
    let at = |f: &str| format!("tasks[{index}].{f}");
    let id = if spec.id.is_empty() {
        Uuid::now_v7()
    } else {
        parse_id(&at("id"), &spec.id)?
    };
    spec.id = id.to_string();
    if spec.queue.is_empty() {
        spec.queue = taskd_proto::DEFAULT_QUEUE.to_string();
    }
    check_name(&at("queue"), &spec.queue)?;
    check_name(&at("name"), &spec.name)?;
    if spec.payload.len() > cfg.max_payload_bytes {
        return Err(InputError::TooLarge(format!(
            "{} is {} bytes; this taskd accepts at most {} (--max-payload-bytes)",
            at("payload"),
            spec.payload.len(),
            cfg.max_payload_bytes
        )));
    }
    check_text(&at("content_type"), &spec.content_type, MAX_KEY_BYTES)?;
    if spec.name == taskd_proto::EXEC_TASK_NAME {
        if spec.content_type.is_empty() {
            spec.content_type = taskd_proto::EXEC_SPEC_CONTENT_TYPE.to_string();
        }
        if spec.content_type != taskd_proto::EXEC_SPEC_CONTENT_TYPE {
            return Err(invalid(format!(
                "{} of an exec task must be {:?}",
                at("content_type"),
                taskd_proto::EXEC_SPEC_CONTENT_TYPE
            )));
        }
        let exec = pb::ExecSpec::decode(spec.payload.as_slice()).map_err(|e| {
            invalid(format!(
                "{} of an exec task is not an encoded ExecSpec: {e}",
                at("payload")
            ))
        })?;
        if exec.argv.is_empty() || exec.argv[0].is_empty() {
            return Err(invalid(format!(
                "{}: the ExecSpec's argv is empty",
                at("payload")
            )));
        }
    }
    if spec.content_type.is_empty() {
        spec.content_type = taskd_proto::DEFAULT_CONTENT_TYPE.to_string();
    }
    if !(-MAX_PRIORITY..=MAX_PRIORITY).contains(&spec.priority) {
        return Err(invalid(format!(
            "{} is {}; it must lie within ±{MAX_PRIORITY}",
            at("priority"),
            spec.priority
        )));
    }
    if spec.delay_ms != 0 && spec.not_before_unix_ms != 0 {
        return Err(invalid(format!(
            "{} and {} are exclusive; set one",
            at("delay_ms"),
            at("not_before_unix_ms")
        )));
    }
    check_ms(&at("delay_ms"), spec.delay_ms)?;
    if spec.not_before_unix_ms > now_ms.saturating_add(MAX_DURATION_MS) {
        return Err(invalid(format!(
            "{} is more than 365 days ahead",
            at("not_before_unix_ms")
        )));
    }
    if spec.delay_ms != 0 {
        spec.not_before_unix_ms = now_ms.saturating_add(spec.delay_ms);
        spec.delay_ms = 0;
    }
    if spec.max_attempts > MAX_ATTEMPTS {
        return Err(invalid(format!(
            "{} is {}; at most {MAX_ATTEMPTS} is allowed",
            at("max_attempts"),
            spec.max_attempts
        )));
    }
    if spec.max_attempts == 0 {
        spec.max_attempts = cfg.max_attempts;
    }
    check_ms(&at("backoff_initial_ms"), spec.backoff_initial_ms)?;
    check_ms(&at("backoff_max_ms"), spec.backoff_max_ms)?;
    if spec.backoff_initial_ms != 0
        && spec.backoff_max_ms != 0
        && spec.backoff_initial_ms > spec.backoff_max_ms
    {
        return Err(invalid(format!(
            "{} ({}) is above {} ({})",
            at("backoff_initial_ms"),
            spec.backoff_initial_ms,
            at("backoff_max_ms"),
            spec.backoff_max_ms
        )));
    }
    if spec.backoff_initial_ms == 0 {
        spec.backoff_initial_ms = cfg.backoff_initial.as_millis() as u64;
    }
    if spec.backoff_max_ms == 0 {
        spec.backoff_max_ms = (cfg.backoff_max.as_millis() as u64).max(spec.backoff_initial_ms);
    }
    spec.backoff_initial_ms = spec.backoff_initial_ms.min(spec.backoff_max_ms);
    check_ms(&at("timeout_ms"), spec.timeout_ms)?;
    check_text(&at("idempotency_key"), &spec.idempotency_key, MAX_KEY_BYTES)?;
    check_ms(&at("result_ttl_ms"), spec.result_ttl_ms)?;
    if spec.result_ttl_ms == 0 {
        spec.result_ttl_ms = cfg.result_ttl.as_millis() as u64;
    }
    Ok(NewTask::new(id, spec))
}

/// Validates a worker's hello; an empty queue list means the default queue.
pub fn hello(h: &mut pb::Hello) -> Result<(), InputError> {
    check_name("hello.worker_id", &h.worker_id)?;
    check_text("hello.host", &h.host, MAX_KEY_BYTES)?;
    if h.queues.is_empty() {
        h.queues.push(taskd_proto::DEFAULT_QUEUE.to_string());
    }
    for (i, q) in h.queues.iter().enumerate() {
        check_name(&format!("hello.queues[{i}]"), q)?;
    }
    if h.names.is_empty() {
        return Err(invalid(
            "hello.names is empty: register at least one handler name".into(),
        ));
    }
    for (i, n) in h.names.iter().enumerate() {
        check_name(&format!("hello.names[{i}]"), n)?;
    }
    if h.slots == 0 {
        return Err(invalid("hello.slots must be at least 1".into()));
    }
    for (i, r) in h.held.iter().enumerate() {
        parse_id(&format!("hello.held[{i}].task_id"), &r.task_id)?;
    }
    Ok(())
}

fn cut(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// Makes an outcome acceptable: an oversized result becomes a non-retryable failure (the
/// attempt did finish; its output cannot be kept), long messages are cut.
pub fn outcome(cfg: &Config, o: &mut pb::WorkerOutcome) {
    use pb::worker_outcome::Result as R;
    let limit = cfg.max_result_bytes;
    let too_big = match &o.result {
        Some(R::Success(s)) => s.output.len() > limit,
        Some(R::Failure(f)) => f.details.len() > limit,
        _ => false,
    };
    if too_big {
        o.result = Some(R::Failure(pb::TaskError {
            message: format!(
                "the attempt's result exceeds this taskd's limit of {limit} bytes (--max-result-bytes)"
            ),
            retryable: false,
            kind: "result_too_large".into(),
            ..Default::default()
        }));
    }
    match &mut o.result {
        Some(R::Failure(f)) => cut(&mut f.message, MAX_MESSAGE_BYTES),
        Some(R::Cancelled(c)) => cut(&mut c.reason, MAX_MESSAGE_BYTES),
        _ => {}
    }
    if let Some(R::Success(s)) = &mut o.result {
        if s.content_type.is_empty() {
            s.content_type = taskd_proto::DEFAULT_CONTENT_TYPE.to_string();
        }
    }
}
