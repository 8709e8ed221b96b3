//! Smoke run of the benchmark with tiny counts, so it cannot rot: every workload in both sync
//! modes must finish, exit 0 and print JSON naming every workload. Figures are not checked
//! (timing belongs to real runs, not tests).
//!
//! Needs the `taskd` and `taskd-bench` binaries of the same profile:
//! `cargo build -p taskd-server --bin taskd -p taskd-bench`.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BOUND: Duration = Duration::from_secs(90);

#[test]
fn tiny_run_of_every_workload_in_both_sync_modes() {
    let bench = taskd_testkit::binary_path("taskd-bench").expect("taskd-bench is built");
    taskd_testkit::binary_path("taskd").expect("taskd is built (cargo build -p taskd-server)");
    let mut child = Command::new(bench)
        .args([
            "--json",
            "--workloads",
            "w1,w2,w3,scaling",
            "--sync-modes",
            "fsync,flush",
            "--tasks",
            "200",
            "--batch",
            "50",
            "--warmup",
            "5",
            "--rounds",
            "20",
            "--w3-tasks",
            "20",
            "--w3-sleep",
            "10ms",
            "--scaling-levels",
            "0,1000",
            "--scaling-tasks",
            "200",
            "--prequeue-batch",
            "300",
            "--repeat",
            "2",
            "--timeout",
            "30s",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawning taskd-bench");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + BOUND;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for taskd-bench") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("taskd-bench did not finish within {BOUND:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = reader.join().expect("stdout reader");
    assert!(
        status.success(),
        "taskd-bench failed ({status}); stdout:\n{out}"
    );

    let report: Value = serde_json::from_str(&out).expect("stdout is JSON");
    let results = report["results"].as_array().expect("results array");
    let has = |workload: &str, sync: &str| {
        results
            .iter()
            .any(|r| r["workload"] == workload && r["sync"] == sync)
    };
    for sync in ["fsync", "flush"] {
        assert!(has("w1", sync), "no W1 {sync} result: {out}");
        assert!(has("w2", sync), "no W2 {sync} result: {out}");
    }
    assert!(has("w3", "fsync"), "no W3 result: {out}");
    assert!(has("scaling", "fsync"), "no Scaling result: {out}");

    let w1 = results
        .iter()
        .find(|r| r["workload"] == "w1")
        .expect("a W1 result");
    assert_eq!(w1["w1"]["tasks"], 200);
    assert!(w1["w1"]["tasks_per_s"].as_f64().is_some_and(|v| v > 0.0));
    let w2 = results
        .iter()
        .find(|r| r["workload"] == "w2")
        .expect("a W2 result");
    let p50 = w2["w2"]["p50_us"].as_f64().expect("p50");
    let p99 = w2["w2"]["p99_us"].as_f64().expect("p99");
    assert!(p50 > 0.0 && p50 <= p99, "p50 {p50} p99 {p99}");
    let scaling = &results
        .iter()
        .find(|r| r["workload"] == "scaling")
        .expect("a Scaling result")["scaling"];
    let levels = scaling["levels"].as_array().expect("levels");
    assert_eq!(levels.len(), 2);
    assert_eq!(levels[1]["queued"], 1000);
    assert!(
        levels[1]["memory"]["rss_kib"]
            .as_u64()
            .is_some_and(|v| v > 0)
    );
    assert_eq!(scaling["restart"]["queued"], 1000);
    assert!(
        scaling["restart"]["first_task_secs"]
            .as_f64()
            .is_some_and(|v| v > 0.0)
    );
}
