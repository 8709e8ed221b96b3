//! `taskctl` end to end through its binary, against a real `taskd` and real workers.

mod common;

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::{WAIT, broker, client, sdk_worker, taskworker, workers_connected};
use serde_json::Value;
use taskd_client::{Task, pb};
use tokio::io::AsyncWriteExt;

/// What one run of taskctl did.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Result<Value> {
        serde_json::from_str(self.stdout.trim())
            .with_context(|| format!("stdout is not one JSON document: {self:?}"))
    }

    fn json_lines(&self) -> Result<Vec<Value>> {
        self.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l}")))
            .collect()
    }

    /// The single `taskctl: error: ...` line on stderr.
    fn error_line(&self) -> Result<&str> {
        let lines: Vec<&str> = self.stderr.lines().collect();
        ensure!(
            lines.len() == 1,
            "expected one stderr line, got {:?}",
            self.stderr
        );
        ensure!(lines[0].starts_with("taskctl: error: "), "{:?}", lines[0]);
        ensure!(!self.stderr.contains("panicked") && !self.stderr.contains("backtrace"));
        Ok(lines[0])
    }
}

async fn taskctl(broker: &str, args: &[&str], stdin: Option<&str>) -> Result<Run> {
    taskctl_env(broker, args, stdin, &[]).await
}

async fn taskctl_env(
    broker: &str,
    args: &[&str],
    stdin: Option<&str>,
    env: &[(&str, &str)],
) -> Result<Run> {
    let mut cmd = tokio::process::Command::new(taskd_testkit::binary_path("taskctl")?);
    cmd.env_remove("TASKD_BROKER")
        .env_remove("TASKD_TOKEN")
        .envs(env.iter().copied())
        .arg("--broker")
        .arg(broker)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).await?;
        drop(pipe);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .with_context(|| format!("taskctl {args:?} did not finish"))??;
    Ok(Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

#[tokio::test]
async fn submit_get_wait_and_json() -> Result<()> {
    let taskd = broker(&[]).await?;
    let url = taskd.url();
    let _w = sdk_worker(&taskd, 4)?;

    // submit prints the id; --json prints {"id": ...}.
    let run = taskctl(&url, &["submit", "add", "--payload", "[20, 22]"], None).await?;
    ensure!(run.code == 0, "{run:?}");
    let id = run.stdout.trim().to_string();
    uuid::Uuid::parse_str(&id)?;
    let run = taskctl(&url, &["wait", &id, "--timeout", "30s", "--json"], None).await?;
    ensure!(run.code == 0, "{run:?}");
    let v = &run.json_lines()?[0];
    ensure!(
        v["id"] == id.as_str() && v["state"] == "succeeded" && v["outcome"]["output"] == 42,
        "{v}"
    );
    let run = taskctl(&url, &["get", &id, "--json"], None).await?;
    let v = run.json()?;
    ensure!(
        v["name"] == "add"
            && v["queue"] == "default"
            && v["payload"] == serde_json::json!([20, 22]),
        "{v}"
    );
    ensure!(v["attempts"].as_array().is_some_and(|a| a.len() == 1));
    let run = taskctl(&url, &["get", &id], None).await?;
    ensure!(
        run.code == 0 && run.stdout.contains("succeeded") && run.stdout.contains(&id),
        "{run:?}"
    );

    // --wait prints the outcome; payload from stdin; options are passed on.
    let run = taskctl(
        &url,
        &[
            "submit",
            "add",
            "--payload",
            "-",
            "--queue",
            "other",
            "--priority",
            "-3",
            "--max-attempts",
            "2",
            "--timeout",
            "10s",
            "--wait",
        ],
        Some("[1, 2]"),
    )
    .await?;
    ensure!(run.code == 0 && run.stdout.trim() == "3", "{run:?}");
    let run = taskctl(
        &url,
        &[
            "submit",
            "echo",
            "--payload",
            "{\"a\": 1}",
            "--key",
            "k1",
            "--json",
            "--wait",
            "--wait-timeout",
            "30s",
        ],
        None,
    )
    .await?;
    let v = run.json()?;
    ensure!(
        run.code == 0 && v["outcome"]["output"]["a"] == 1 && v["idempotency_key"] == "k1",
        "{run:?}"
    );
    let again = taskctl(
        &url,
        &["submit", "echo", "--payload", "{}", "--key", "k1"],
        None,
    )
    .await?;
    ensure!(
        again.stdout.trim() == v["id"].as_str().unwrap_or_default(),
        "same key, same task: {again:?}"
    );
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("p.json");
    std::fs::write(&file, "[5, 5]")?;
    let run = taskctl(
        &url,
        &[
            "submit",
            "add",
            "--payload-file",
            &file.display().to_string(),
            "--wait",
        ],
        None,
    )
    .await?;
    ensure!(run.code == 0 && run.stdout.trim() == "10", "{run:?}");

    // A failed task: --wait exits 1; wait exits 1.
    let run = taskctl(&url, &["submit", "fail", "--wait"], None).await?;
    ensure!(run.code == 1 && run.stderr.contains("boom"), "{run:?}");
    let failed = taskctl(&url, &["submit", "fail"], None)
        .await?
        .stdout
        .trim()
        .to_string();
    let run = taskctl(&url, &["wait", &failed, &id, "--timeout", "30s"], None).await?;
    ensure!(
        run.code == 1 && run.stdout.contains("failed (handler): boom"),
        "{run:?}"
    );
    // A wait that runs out: exit 6.
    let slow = taskctl(&url, &["submit", "sleep", "--payload", "10000"], None)
        .await?
        .stdout
        .trim()
        .to_string();
    let run = taskctl(&url, &["wait", &slow, "--timeout", "300ms"], None).await?;
    ensure!(run.code == 6 && run.stderr.contains("timed out"), "{run:?}");
    // An unknown id: exit 5.
    let unknown = uuid::Uuid::now_v7().to_string();
    let run = taskctl(&url, &["get", &unknown], None).await?;
    ensure!(run.code == 5, "{run:?}");
    run.error_line()?;
    Ok(())
}

#[tokio::test]
async fn exec_and_map() -> Result<()> {
    let taskd = broker(&[]).await?;
    let url = taskd.url();
    let _w = taskworker(&taskd, 4, &[])?;

    let run = taskctl(
        &url,
        &[
            "exec",
            "--wait",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 0",
        ],
        None,
    )
    .await?;
    ensure!(
        run.code == 0 && run.stdout == "out\n" && run.stderr == "err\n",
        "{run:?}"
    );
    let run = taskctl(
        &url,
        &[
            "exec",
            "--max-attempts",
            "1",
            "--wait",
            "--",
            "sh",
            "-c",
            "echo partial; exit 7",
        ],
        None,
    )
    .await?;
    ensure!(run.code == 7 && run.stdout == "partial\n", "{run:?}");
    let run = taskctl(
        &url,
        &[
            "exec",
            "-e",
            "X=42",
            "--stdin",
            "--wait",
            "--",
            "sh",
            "-c",
            "read l; echo $l $X",
        ],
        Some("in\n"),
    )
    .await?;
    ensure!(run.code == 0 && run.stdout == "in 42\n", "{run:?}");
    let run = taskctl(
        &url,
        &["exec", "--json", "--wait", "--", "echo", "hi"],
        None,
    )
    .await?;
    let v = run.json()?;
    ensure!(
        run.code == 0
            && v["outcome"]["exec"]["stdout"] == "hi\n"
            && v["payload"]["argv"][0] == "echo",
        "{run:?}"
    );
    // Without --wait: the id.
    let run = taskctl(&url, &["exec", "--", "true"], None).await?;
    ensure!(
        run.code == 0 && uuid::Uuid::parse_str(run.stdout.trim()).is_ok(),
        "{run:?}"
    );

    // --timeout is the task's execution timeout: the program is stopped (SIGTERM: 128 + 15).
    let run = taskctl(
        &url,
        &[
            "exec",
            "--timeout",
            "300ms",
            "--max-attempts",
            "1",
            "--wait",
            "--",
            "sleep",
            "10",
        ],
        None,
    )
    .await?;
    ensure!(
        run.code == 143 && run.stderr.contains("failed (timeout)"),
        "{run:?}"
    );
    // A program that cannot start.
    let run = taskctl(
        &url,
        &[
            "exec",
            "--max-attempts",
            "1",
            "--wait",
            "--",
            "no-such-program-here",
        ],
        None,
    )
    .await?;
    ensure!(
        run.code == 1 && run.stderr.contains("no-such-program-here"),
        "{run:?}"
    );

    // map -j 1 keeps one task in flight: starts and ends alternate.
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("log");
    let script = format!(
        "echo start {{}} >> {0}; sleep 0.1; echo end {{}} >> {0}",
        log.display()
    );
    let run = taskctl(
        &url,
        &["map", "-j", "1", "--", "sh", "-c", &script],
        Some("a\nb\nc\n"),
    )
    .await?;
    ensure!(run.code == 0, "{run:?}");
    let text = std::fs::read_to_string(&log)?;
    let events: Vec<&str> = text
        .lines()
        .map(|l| l.split(' ').next().unwrap_or(""))
        .collect();
    ensure!(
        events == ["start", "end", "start", "end", "start", "end"],
        "{text}"
    );

    // map: one task per line, {} replaced, outcomes as they complete.
    let run = taskctl(
        &url,
        &["map", "-j", "2", "--", "sh", "-c", "echo x{}"],
        Some("1\n2\n3\n\n4\n"),
    )
    .await?;
    ensure!(run.code == 0, "{run:?}");
    let mut lines: Vec<&str> = run.stdout.lines().collect();
    lines.sort();
    ensure!(lines == vec!["x1", "x2", "x3", "x4"], "{run:?}");
    let run = taskctl(
        &url,
        &[
            "map",
            "--max-attempts",
            "1",
            "--json",
            "--",
            "sh",
            "-c",
            "test {} -lt 3",
        ],
        Some("1\n5\n2\n"),
    )
    .await?;
    ensure!(run.code == 1, "{run:?}");
    let items = run.json_lines()?;
    ensure!(items.len() == 3);
    for item in &items {
        let ok = item["input"] != "5";
        ensure!(
            (item["state"] == "succeeded") == ok && (item["exit_code"] == 0) == ok,
            "{item}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn cancel_ls_retry_queues_workers_health() -> Result<()> {
    let taskd = broker(&[]).await?;
    let url = taskd.url();
    let _w = sdk_worker(&taskd, 2)?;
    let client = client(&taskd).await?;
    workers_connected(&client, 1).await?;

    let delayed = taskctl(&url, &["submit", "noop", "--delay", "1m"], None)
        .await?
        .stdout
        .trim()
        .to_string();
    let run = taskctl(&url, &["cancel", &delayed, "--json"], None).await?;
    let v = &run.json_lines()?[0];
    ensure!(
        run.code == 0 && v["cancelled"] == true && v["state"] == "cancelled",
        "{run:?}"
    );
    let run = taskctl(&url, &["cancel", &delayed], None).await?;
    ensure!(
        run.code == 0 && run.stdout.contains("already cancelled"),
        "{run:?}"
    );

    let run = taskctl(&url, &["retry", &delayed, "--json"], None).await?;
    let v = run.json()?;
    ensure!(
        run.code == 0 && v["retry_of"] == delayed.as_str(),
        "{run:?}"
    );
    let new_id = v["id"].as_str().unwrap_or_default().to_string();
    let run = taskctl(&url, &["get", &new_id, "--json"], None).await?;
    ensure!(run.json()?["retry_of"] == delayed.as_str());
    client
        .future(uuid::Uuid::parse_str(&new_id)?)
        .result(Some(WAIT))
        .await?;

    for i in 0..3 {
        client
            .submit(Task::new("add").json(&(i, i))?.queue("other"))
            .await?
            .result(Some(WAIT))
            .await?;
    }
    // ls: pages with a cursor, filters.
    let run = taskctl(&url, &["ls", "--limit", "2", "--json"], None).await?;
    let page1 = run.json()?;
    ensure!(
        page1["tasks"].as_array().is_some_and(|t| t.len() == 2),
        "{page1}"
    );
    let cursor = page1["next_cursor"]
        .as_str()
        .context("a next cursor")?
        .to_string();
    let run = taskctl(
        &url,
        &["ls", "--limit", "10", "--cursor", &cursor, "--json"],
        None,
    )
    .await?;
    let page2 = run.json()?;
    ensure!(
        page2["tasks"].as_array().is_some_and(|t| t.len() == 3) && page2["next_cursor"].is_null(),
        "{page2}"
    );
    let run = taskctl(
        &url,
        &["ls", "--queue", "other", "--state", "succeeded", "--json"],
        None,
    )
    .await?;
    ensure!(
        run.json()?["tasks"]
            .as_array()
            .is_some_and(|t| t.len() == 3)
    );
    let run = taskctl(&url, &["ls", "--limit", "2"], None).await?;
    ensure!(
        run.code == 0 && run.stdout.starts_with("ID") && run.stdout.contains("--cursor"),
        "{run:?}"
    );

    let run = taskctl(&url, &["queues", "--json"], None).await?;
    let queues = run.json()?;
    let other = queues
        .as_array()
        .and_then(|q| q.iter().find(|q| q["name"] == "other"))
        .context("queue other")?;
    ensure!(other["succeeded"] == 3, "{queues}");
    let run = taskctl(&url, &["queues"], None).await?;
    ensure!(
        run.stdout.starts_with("QUEUE") && run.stdout.contains("other"),
        "{run:?}"
    );
    let run = taskctl(&url, &["workers", "--json"], None).await?;
    let workers = run.json()?;
    ensure!(
        workers
            .as_array()
            .is_some_and(|w| w.iter().any(|w| w["connected"] == true && w["slots"] == 2)),
        "{workers}"
    );
    let run = taskctl(&url, &["workers"], None).await?;
    ensure!(run.code == 0 && run.stdout.starts_with("WORKER"), "{run:?}");
    let run = taskctl(&url, &["health", "--json"], None).await?;
    ensure!(
        run.code == 0 && run.json()?["status"] == "SERVING",
        "{run:?}"
    );
    let run = taskctl(&url, &["health"], None).await?;
    ensure!(run.code == 0 && run.stdout.trim() == "SERVING");
    Ok(())
}

#[tokio::test]
async fn watch_ids_and_queues() -> Result<()> {
    let taskd = broker(&[]).await?;
    let url = taskd.url();
    let _w = sdk_worker(&taskd, 4)?;
    let client = client(&taskd).await?;

    // Ids: one event each (already-done ones at once), then exit.
    let done = client.submit(Task::new("add").json(&(1, 1))?).await?;
    done.result(Some(WAIT)).await?;
    let later = client.submit(Task::new("sleep").json(&300)?).await?;
    let run = taskctl(
        &url,
        &[
            "watch",
            &done.id().to_string(),
            &later.id().to_string(),
            "--json",
            "--wait-timeout",
            "30s",
        ],
        None,
    )
    .await?;
    ensure!(run.code == 0, "{run:?}");
    let events = run.json_lines()?;
    ensure!(
        events.len() == 2 && events.iter().all(|e| e["state"] == "succeeded"),
        "{events:?}"
    );

    // A queue: events of tasks completed after the watch started.
    let mut cmd = tokio::process::Command::new(taskd_testkit::binary_path("taskctl")?);
    cmd.args([
        "--broker",
        &url,
        "watch",
        "--queue",
        "other",
        "--count",
        "2",
        "--json",
        "--wait-timeout",
        "30s",
    ])
    .env_remove("TASKD_TOKEN")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let child = cmd.spawn()?;
    let output = tokio::spawn(child.wait_with_output());
    // Keep completing tasks in the queue until the watcher has seen two.
    let submitter = {
        let client = client.clone();
        tokio::spawn(async move {
            loop {
                if let Ok(f) = client.submit(Task::new("noop").queue("other")).await {
                    let _ = f.result(Some(WAIT)).await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let out = tokio::time::timeout(WAIT, output).await???;
    submitter.abort();
    ensure!(out.status.code() == Some(0), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let events: Vec<Value> = stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    ensure!(
        events.len() == 2 && events.iter().all(|e| e["queue"] == "other"),
        "{stdout}"
    );
    // Unknown id: exit 5.
    let run = taskctl(
        &url,
        &[
            "watch",
            &uuid::Uuid::now_v7().to_string(),
            "--wait-timeout",
            "10s",
        ],
        None,
    )
    .await?;
    ensure!(run.code == 5, "{run:?}");
    Ok(())
}

#[tokio::test]
async fn errors_are_one_line_with_distinct_exit_codes() -> Result<()> {
    // Unreachable broker.
    let run = taskctl("127.0.0.1:1", &["ls"], None).await?;
    ensure!(run.code == 3, "{run:?}");
    ensure!(
        run.error_line()?
            .contains("cannot reach the broker at http://127.0.0.1:1")
    );
    // The default broker comes from TASKD_BROKER too.
    let run = taskctl_env(
        "127.0.0.1:1",
        &["queues"],
        None,
        &[("TASKD_BROKER", "127.0.0.1:2")],
    )
    .await?;
    ensure!(run.code == 3);
    // Bad flags and bad input (checked before connecting).
    let run = taskctl("127.0.0.1:1", &["ls", "--bogus"], None).await?;
    ensure!(
        run.code == 2 && run.error_line()?.contains("--bogus"),
        "{run:?}"
    );
    let run = taskctl("127.0.0.1:1", &["submit", "x", "--payload", "{nope"], None).await?;
    ensure!(
        run.code == 2 && run.error_line()?.contains("not valid JSON"),
        "{run:?}"
    );
    let run = taskctl("127.0.0.1:1", &["get", "not-a-uuid"], None).await?;
    ensure!(
        run.code == 2 && run.error_line()?.contains("not a task id"),
        "{run:?}"
    );
    let run = taskctl("127.0.0.1:1", &["submit", "x", "--delay", "soon"], None).await?;
    ensure!(run.code == 2, "{run:?}");
    run.error_line()?;
    let run = taskctl("127.0.0.1:1", &["watch"], None).await?;
    ensure!(run.code == 2, "{run:?}");
    run.error_line()?;
    // --help everywhere, exit 0, documents the exit codes.
    for args in [
        &["--help"][..],
        &["submit", "--help"],
        &["map", "--help"],
        &["wait", "--help"],
    ] {
        let run = taskctl("127.0.0.1:1", args, None).await?;
        ensure!(
            run.code == 0 && run.stdout.contains("Exit status") && run.stdout.contains("--broker"),
            "{args:?}: {run:?}"
        );
    }

    // A refused token, and a broker-side invalid argument.
    let taskd = broker(&["--token", "right"]).await?;
    let url = taskd.url();
    let run = taskctl(&url, &["ls"], None).await?;
    ensure!(
        run.code == 4 && run.error_line()?.contains("refused the token"),
        "{run:?}"
    );
    let run = taskctl(&url, &["--token", "wrong", "queues"], None).await?;
    ensure!(run.code == 4, "{run:?}");
    let run = taskctl_env(
        &url,
        &["queues", "--json"],
        None,
        &[("TASKD_TOKEN", "right")],
    )
    .await?;
    ensure!(run.code == 0 && run.json()?.is_array(), "{run:?}");
    let run = taskctl(&url, &["--token", "right", "submit", "bad name"], None).await?;
    ensure!(
        run.code == 2 && run.error_line()?.contains("invalid argument"),
        "{run:?}"
    );
    // A payload over the broker's limit: bad input too.
    let dir = tempfile::tempdir()?;
    let big = dir.path().join("big.json");
    std::fs::write(&big, serde_json::to_vec(&"x".repeat(5 * 1024 * 1024))?)?;
    let run = taskctl(
        &url,
        &[
            "--token",
            "right",
            "submit",
            "echo",
            "--payload-file",
            &big.display().to_string(),
        ],
        None,
    )
    .await?;
    ensure!(
        run.code == 2 && run.error_line()?.contains("payload"),
        "{run:?}"
    );
    // Task failure states from the broker still go through their codes.
    let client = taskd_client::Client::builder(&url)
        .token("right")
        .connect()
        .await?;
    let t = client
        .submit(Task::new("noop").delay(Duration::from_secs(60)))
        .await?;
    ensure!(t.cancel().await?);
    let run = taskctl(
        &url,
        &[
            "--token",
            "right",
            "wait",
            &t.id().to_string(),
            "--timeout",
            "10s",
        ],
        None,
    )
    .await?;
    ensure!(run.code == 1 && run.stdout.contains("cancelled"), "{run:?}");
    let _ = pb::TaskState::Cancelled;
    Ok(())
}

#[tokio::test]
async fn watch_survives_a_broker_restart() -> Result<()> {
    use tokio::io::AsyncBufReadExt;
    let mut taskd = broker(&[]).await?;
    let url = taskd.url();
    let _w = taskworker(&taskd, 2, &[])?;
    let client = client(&taskd).await?;
    let fut = client
        .submit(Task::exec(["sh", "-c", "sleep 1.5; echo survived"]))
        .await?;
    let mut cmd = tokio::process::Command::new(taskd_testkit::binary_path("taskctl")?);
    cmd.args([
        "--broker",
        &url,
        "watch",
        &fut.id().to_string(),
        "--json",
        "--wait-timeout",
        "60s",
    ])
    .env_remove("TASKD_TOKEN")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    let stderr = child.stderr.take().context("stderr")?;
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    let first = tokio::time::timeout(WAIT, lines.next_line())
        .await??
        .unwrap_or_default();
    ensure!(first.starts_with("taskctl: watching"), "{first}");
    taskd_testkit::eventually(WAIT, "the task to run", || async {
        client
            .get(fut.id())
            .await
            .ok()
            .filter(|t| t.state() == pb::TaskState::Running)
    })
    .await?;
    taskd.kill();
    taskd.restart().await?;
    let out = tokio::time::timeout(WAIT, child.wait_with_output()).await??;
    ensure!(out.status.code() == Some(0), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let event: Value = serde_json::from_str(stdout.trim())?;
    ensure!(
        event["state"] == "succeeded" && event["outcome"]["exec"]["stdout"] == "survived\n",
        "{stdout}"
    );
    Ok(())
}
