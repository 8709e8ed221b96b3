//! How tasks, queues and workers look: human lines and tables, and their JSON form.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use serde_json::{Value, json};
use taskd_client::pb;

/// A state as output spells it ("queued", "running", ...).
pub(crate) fn state_name(state: pb::TaskState) -> &'static str {
    match state {
        pb::TaskState::Unspecified => "unknown",
        pb::TaskState::Queued => "queued",
        pb::TaskState::Scheduled => "scheduled",
        pb::TaskState::Running => "running",
        pb::TaskState::Succeeded => "succeeded",
        pb::TaskState::Failed => "failed",
        pb::TaskState::Cancelled => "cancelled",
    }
}

/// A Unix-ms time as RFC 3339 (seconds precision), `None` for 0.
pub(crate) fn time(ms: u64) -> Option<String> {
    (ms != 0).then(|| {
        humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
    })
}

/// A Unix-ms time for people: "2026-11-25T09:30:00Z (3s ago)" / "(in 5s)".
pub(crate) fn time_human(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let at = UNIX_EPOCH + Duration::from_millis(ms);
    let stamp = humantime::format_rfc3339_seconds(at).to_string();
    let now = SystemTime::now();
    let rel = match now.duration_since(at) {
        Ok(ago) => format!("{} ago", short_duration(ago)),
        Err(e) => format!("in {}", short_duration(e.duration())),
    };
    format!("{stamp} ({rel})")
}

/// A duration rounded for people ("1m 5s", "350ms").
pub(crate) fn short_duration(d: Duration) -> String {
    let d = if d >= Duration::from_secs(1) {
        Duration::from_secs(d.as_secs())
    } else {
        Duration::from_millis(d.as_millis() as u64)
    };
    humantime::format_duration(d).to_string()
}

fn text_or_json(content_type: &str, bytes: &[u8]) -> Value {
    if content_type.is_empty() || content_type == taskd_proto::DEFAULT_CONTENT_TYPE {
        if let Ok(v) = serde_json::from_slice::<Value>(bytes) {
            return v;
        }
    }
    Value::String(String::from_utf8_lossy(bytes).into_owned())
}

/// The JSON form of an exec result.
pub(crate) fn exec_json(r: &pb::ExecResult) -> Value {
    json!({
        "exit_code": r.exit_code,
        "signal": r.signal,
        "stdout": String::from_utf8_lossy(&r.stdout),
        "stderr": String::from_utf8_lossy(&r.stderr),
        "stdout_truncated": r.stdout_truncated,
        "stderr_truncated": r.stderr_truncated,
        "duration_ms": r.duration_ms,
    })
}

fn decode_exec(content_type: &str, bytes: &[u8]) -> Option<pb::ExecResult> {
    (content_type == taskd_proto::EXEC_RESULT_CONTENT_TYPE)
        .then(|| pb::ExecResult::decode(bytes).ok())
        .flatten()
}

/// The JSON form of an outcome (`null` while the task is not terminal).
pub(crate) fn outcome_json(task: &pb::Task) -> Value {
    let Some(result) = task.outcome.as_ref().and_then(|o| o.result.as_ref()) else {
        return Value::Null;
    };
    match result {
        pb::outcome::Result::Success(s) => {
            let mut v = json!({"status": "succeeded", "content_type": s.content_type});
            match decode_exec(&s.content_type, &s.output) {
                Some(r) => v["exec"] = exec_json(&r),
                None => v["output"] = text_or_json(&s.content_type, &s.output),
            }
            v
        }
        pb::outcome::Result::Failure(e) => {
            let mut v = json!({
                "status": "failed", "kind": e.kind, "message": e.message, "retryable": e.retryable,
            });
            if let Some(r) = decode_exec(&e.details_content_type, &e.details) {
                v["exec"] = exec_json(&r);
            }
            v
        }
        pb::outcome::Result::Cancelled(c) => json!({"status": "cancelled", "reason": c.reason}),
    }
}

/// The JSON form of a task.
pub(crate) fn task_json(task: &pb::Task) -> Value {
    let spec = task.spec.clone().unwrap_or_default();
    let payload = if spec.content_type == taskd_proto::EXEC_SPEC_CONTENT_TYPE {
        match pb::ExecSpec::decode(spec.payload.as_slice()) {
            Ok(e) => json!({"argv": e.argv, "env": e.env, "cwd": e.cwd}),
            Err(_) => Value::Null,
        }
    } else {
        text_or_json(&spec.content_type, &spec.payload)
    };
    json!({
        "id": task.id,
        "queue": spec.queue,
        "name": spec.name,
        "state": state_name(task.state()),
        "attempt": task.attempt,
        "max_attempts": spec.max_attempts,
        "priority": spec.priority,
        "timeout_ms": spec.timeout_ms,
        "idempotency_key": spec.idempotency_key,
        "content_type": spec.content_type,
        "payload": payload,
        "submitted_at": time(task.submitted_at_unix_ms),
        "not_before": time(task.not_before_unix_ms),
        "finished_at": time(task.finished_at_unix_ms),
        "expires_at": time(task.expires_at_unix_ms),
        "retry_of": task.retry_of,
        "retried_by": task.retried_by,
        "cancel_requested": task.cancel_requested,
        "cancel_reason": task.cancel_reason,
        "outcome": outcome_json(task),
        "attempts": task.attempts.iter().map(|a| json!({
            "number": a.number,
            "worker_id": a.worker_id,
            "worker_addr": a.worker_addr,
            "started_at": time(a.started_at_unix_ms),
            "ended_at": time(a.ended_at_unix_ms),
            "error": a.error,
        })).collect::<Vec<_>>(),
    })
}

/// A one-line summary of a task's outcome for people.
pub(crate) fn outcome_summary(task: &pb::Task) -> String {
    let Some(result) = task.outcome.as_ref().and_then(|o| o.result.as_ref()) else {
        return state_name(task.state()).to_string();
    };
    match result {
        pb::outcome::Result::Success(s) => match decode_exec(&s.content_type, &s.output) {
            Some(r) => format!(
                "succeeded: exit 0 in {}",
                short_duration(Duration::from_millis(r.duration_ms))
            ),
            None => format!(
                "succeeded: {}",
                one_line(&String::from_utf8_lossy(&s.output), 120)
            ),
        },
        pb::outcome::Result::Failure(e) => {
            format!("failed ({}): {}", e.kind, one_line(&e.message, 200))
        }
        pb::outcome::Result::Cancelled(c) if c.reason.is_empty() => "cancelled".into(),
        pb::outcome::Result::Cancelled(c) => format!("cancelled: {}", c.reason),
    }
}

/// `s` on one line, cut at `max` chars.
pub(crate) fn one_line(s: &str, max: usize) -> String {
    let flat: String = s.trim().replace(['\n', '\r'], " ⏎ ");
    if flat.chars().count() > max {
        let cut: String = flat.chars().take(max).collect();
        format!("{cut}…")
    } else {
        flat
    }
}

/// A task for people: "key: value" lines.
pub(crate) fn task_human(task: &pb::Task) -> Vec<String> {
    let spec = task.spec.clone().unwrap_or_default();
    let mut lines = vec![
        format!("id:          {}", task.id),
        format!("name:        {}", spec.name),
        format!("queue:       {}", spec.queue),
        format!(
            "state:       {}{}",
            state_name(task.state()),
            match (task.cancel_requested, task.cancel_reason.is_empty()) {
                (true, true) => " (cancel requested)".to_string(),
                (true, false) => format!(" (cancel requested: {})", task.cancel_reason),
                _ => String::new(),
            }
        ),
        format!("attempt:     {} of {}", task.attempt, spec.max_attempts),
        format!("priority:    {}", spec.priority),
        format!("submitted:   {}", time_human(task.submitted_at_unix_ms)),
    ];
    if spec.content_type == taskd_proto::EXEC_SPEC_CONTENT_TYPE {
        if let Ok(e) = pb::ExecSpec::decode(spec.payload.as_slice()) {
            lines.push(format!("command:     {}", e.argv.join(" ")));
        }
    } else if !spec.payload.is_empty() {
        lines.push(format!(
            "payload:     {}",
            one_line(&String::from_utf8_lossy(&spec.payload), 200)
        ));
    }
    if spec.timeout_ms != 0 {
        lines.push(format!(
            "timeout:     {}",
            short_duration(Duration::from_millis(spec.timeout_ms))
        ));
    }
    if task.not_before_unix_ms != 0 {
        lines.push(format!(
            "not before:  {}",
            time_human(task.not_before_unix_ms)
        ));
    }
    if task.finished_at_unix_ms != 0 {
        lines.push(format!(
            "finished:    {}",
            time_human(task.finished_at_unix_ms)
        ));
    }
    if task.outcome.is_some() {
        lines.push(format!("outcome:     {}", outcome_summary(task)));
    }
    if !task.retry_of.is_empty() {
        lines.push(format!("retry of:    {}", task.retry_of));
    }
    if !task.retried_by.is_empty() {
        lines.push(format!("retried by:  {}", task.retried_by));
    }
    for a in &task.attempts {
        let took = if a.ended_at_unix_ms >= a.started_at_unix_ms && a.ended_at_unix_ms != 0 {
            format!(
                " took {}",
                short_duration(Duration::from_millis(
                    a.ended_at_unix_ms - a.started_at_unix_ms
                ))
            )
        } else {
            " running".to_string()
        };
        let err = if a.error.is_empty() {
            String::new()
        } else {
            format!(": {}", one_line(&a.error, 120))
        };
        lines.push(format!(
            "attempt {}:   worker {} ({}) started {}{took}{err}",
            a.number,
            a.worker_id,
            a.worker_addr,
            time_human(a.started_at_unix_ms)
        ));
    }
    lines
}

/// Left-aligned columns, two spaces apart.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> Vec<String> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let fmt = |cells: Vec<String>| -> String {
        let n = cells.len();
        cells
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                if i + 1 == n {
                    c
                } else {
                    format!("{c:<w$}", w = widths[i])
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
    };
    let mut out = vec![fmt(header.iter().map(|h| h.to_string()).collect())];
    out.extend(rows.iter().map(|r| fmt(r.clone())));
    out
}
