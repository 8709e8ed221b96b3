//! The results of a run: JSON, and a Markdown table with each goal of the issue.

use std::fmt::Write;
use std::time::Duration;

use serde::{Serialize, Serializer};

use crate::cli::{Params, SyncMode, Workload};
use crate::procs::CpuUse;
use crate::workloads::scaling::ScalingMeasure;
use crate::workloads::w1::W1Measure;
use crate::workloads::w2::W2Measure;
use crate::workloads::w3::W3Measure;

/// Goals of the issue (on 2 cores, `--sync fsync`).
const GOAL_W1_PER_S: f64 = 100_000.0;
const GOAL_W2_P50_US: f64 = 600.0;
const GOAL_W2_P99_US: f64 = 3_000.0;
const GOAL_W3_OVERHEAD_PCT: f64 = 10.0;
const GOAL_RSS_KIB: u64 = 1024 * 1024;
const GOAL_RESTART_SECS: f64 = 5.0;
/// "W1 not slower with 1M queued": within this fraction of the rate with nothing queued
/// (run-to-run noise on a shared 2-core machine is about this large).
const SCALING_TOLERANCE: f64 = 0.9;

/// Serializes a duration as fractional milliseconds.
pub(crate) fn ser_ms<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

/// The machine the run was made on.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Machine {
    pub(crate) cpus: usize,
    pub(crate) cpu_model: String,
    pub(crate) kernel: String,
    /// /proc/loadavg before the run (other load on a shared machine skews figures).
    pub(crate) loadavg: String,
}

impl Machine {
    /// Reads the CPU count, model name and kernel release.
    pub(crate) fn detect() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        let loadavg = std::fs::read_to_string("/proc/loadavg")
            .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|_| "unknown".into());
        Machine {
            loadavg,
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            cpu_model,
            kernel,
        }
    }
}

/// One workload's result.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Entry {
    pub(crate) workload: Workload,
    pub(crate) sync: SyncMode,
    pub(crate) workers: usize,
    pub(crate) slots_per_worker: usize,
    /// CPU used by each process during the measure (W1, W2, W3).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) cpu: Option<CpuUse>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) w1: Option<W1Measure>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) w2: Option<W2Measure>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) w3: Option<W3Measure>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) scaling: Option<ScalingMeasure>,
}

impl Entry {
    /// An entry with no measure yet.
    pub(crate) fn new(workload: Workload, sync: SyncMode, workers: usize, slots: usize) -> Entry {
        Entry {
            workload,
            sync,
            workers,
            slots_per_worker: slots,
            cpu: None,
            w1: None,
            w2: None,
            w3: None,
            scaling: None,
        }
    }
}

/// A whole run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    /// UTC, RFC 3339.
    pub(crate) date: String,
    pub(crate) machine: Machine,
    pub(crate) params: Params,
    pub(crate) results: Vec<Entry>,
}

fn thousands(n: f64) -> String {
    let s = format!("{:.0}", n.max(0.0));
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn mib(kib: u64) -> String {
    format!("{:.0} MiB", kib as f64 / 1024.0)
}

/// "; median of 3 runs: 31,000 / 35,000 / 40,000", or nothing for one run.
fn runs_note(m: &W1Measure) -> String {
    if m.runs_tasks_per_s.len() < 2 {
        return String::new();
    }
    let runs: Vec<String> = m.runs_tasks_per_s.iter().map(|r| thousands(*r)).collect();
    format!("; median of {} runs: {}", runs.len(), runs.join(" / "))
}

/// "; CPU broker 0.31 s, workers 0.20 s, client 0.15 s", or nothing.
fn cpu_note(cpu: Option<&CpuUse>) -> String {
    cpu.map(|c| {
        format!(
            "; CPU: broker {:.2} s, workers {:.2} s, client {:.2} s",
            c.broker_secs, c.workers_secs, c.client_secs
        )
    })
    .unwrap_or_default()
}

fn yes(ok: bool) -> &'static str {
    if ok { "yes" } else { "**no**" }
}

impl Report {
    /// The results as a Markdown table (workload, sync, setup, result, goal, met).
    pub(crate) fn table(&self) -> String {
        let mut rows: Vec<[String; 6]> = Vec::new();
        for e in &self.results {
            let sync = e.sync.as_str().to_string();
            let fsync = e.sync == SyncMode::Fsync;
            let goal = |g: String, ok: bool| -> (String, String) {
                if fsync {
                    (g, yes(ok).to_string())
                } else {
                    (format!("({g}, fsync only)"), "–".to_string())
                }
            };
            if let Some(m) = &e.w1 {
                let (g, ok) = goal(
                    format!("≥ {} tasks/s", thousands(GOAL_W1_PER_S)),
                    m.tasks_per_s >= GOAL_W1_PER_S,
                );
                rows.push([
                    "W1 throughput".into(),
                    sync.clone(),
                    format!(
                        "{} no-op tasks, {} workers × {} slots",
                        thousands(m.tasks as f64),
                        e.workers,
                        e.slots_per_worker
                    ),
                    format!(
                        "**{} tasks/s** ({:.3} s; submits acked after {:.3} s){}{}",
                        thousands(m.tasks_per_s),
                        m.secs,
                        m.submit_secs,
                        runs_note(m),
                        cpu_note(e.cpu.as_ref())
                    ),
                    g,
                    ok,
                ]);
            }
            if let Some(m) = &e.w2 {
                let (g, ok) = goal(
                    format!(
                        "p50 ≤ {} µs, p99 ≤ {} ms",
                        GOAL_W2_P50_US,
                        GOAL_W2_P99_US / 1e3
                    ),
                    m.p50_us <= GOAL_W2_P50_US && m.p99_us <= GOAL_W2_P99_US,
                );
                rows.push([
                    "W2 latency".into(),
                    sync.clone(),
                    format!(
                        "{} round trips after {} warm-ups, {} workers × {} slots",
                        m.rounds, m.warmup, e.workers, e.slots_per_worker
                    ),
                    format!(
                        "**p50 {:.0} µs**, p90 {:.0} µs, **p99 {:.0} µs** (max {:.0} µs; p50 of \
                         submit ack {:.0} µs, then completion {:.0} µs; a GetTask {:.0} µs)",
                        m.p50_us,
                        m.p90_us,
                        m.p99_us,
                        m.max_us,
                        m.submit_p50_us,
                        m.complete_p50_us,
                        m.get_p50_us
                    ),
                    g,
                    ok,
                ]);
            }
            if let Some(m) = &e.w3 {
                let (g, ok) = goal(
                    format!("≤ {:.3} s (ideal + 10%)", m.ideal_secs * 1.1),
                    m.overhead_pct <= GOAL_W3_OVERHEAD_PCT,
                );
                rows.push([
                    "W3 concurrency".into(),
                    sync.clone(),
                    format!(
                        "{} tasks × {:.0} ms sleep, {} slots ({} workers × {})",
                        m.tasks, m.sleep_ms, m.slots, e.workers, e.slots_per_worker
                    ),
                    format!(
                        "**{:.3} s** (ideal {:.3} s, {:+.1}%)",
                        m.secs, m.ideal_secs, m.overhead_pct
                    ),
                    g,
                    ok,
                ]);
            }
            if let Some(s) = &e.scaling {
                let base = s
                    .levels
                    .iter()
                    .find(|l| l.queued == 0)
                    .map(|l| l.w1.tasks_per_s);
                for l in &s.levels {
                    let rss_ok = l.memory.rss_kib <= GOAL_RSS_KIB;
                    let speed_ok = base.is_none_or(|b| l.w1.tasks_per_s >= b * SCALING_TOLERANCE);
                    let rel = base
                        .filter(|_| l.queued > 0)
                        .map(|b| format!(", {:.2}× the rate with 0 queued", l.w1.tasks_per_s / b))
                        .unwrap_or_default();
                    let pre = if l.prequeued > 0 {
                        format!(
                            "; pre-queue of {} took {:.1} s ({} tasks/s)",
                            thousands(l.prequeued as f64),
                            l.prequeue_secs,
                            thousands(l.prequeue_per_s)
                        )
                    } else {
                        String::new()
                    };
                    let (g, ok) = goal(
                        "RSS ≤ 1 GiB; W1 not slower than with 0 queued".into(),
                        rss_ok && speed_ok,
                    );
                    rows.push([
                        "Scaling".into(),
                        sync.clone(),
                        format!(
                            "W1 ({} tasks) with {} queued on an idle queue",
                            thousands(l.w1.tasks as f64),
                            thousands(l.queued as f64)
                        ),
                        format!(
                            "**{} tasks/s**{rel}{}{}; RSS **{}** (peak {}); data dir {}{pre}",
                            thousands(l.w1.tasks_per_s),
                            runs_note(&l.w1),
                            cpu_note(Some(&l.cpu)),
                            mib(l.memory.rss_kib),
                            mib(l.memory.peak_kib),
                            mib(l.disk_bytes / 1024)
                        ),
                        g,
                        ok,
                    ]);
                }
                if let Some(r) = &s.restart {
                    let (g, ok) = goal(
                        format!("≤ {GOAL_RESTART_SECS} s; RSS ≤ 1 GiB"),
                        r.first_task_secs <= GOAL_RESTART_SECS && r.memory.rss_kib <= GOAL_RSS_KIB,
                    );
                    rows.push([
                        "Restart".into(),
                        sync.clone(),
                        format!(
                            "SIGKILL, restart with {} queued, until a worker gets a task",
                            thousands(r.queued as f64)
                        ),
                        format!(
                            "**{:.2} s** (serving after {:.2} s); RSS {}",
                            r.first_task_secs,
                            r.ready_secs,
                            mib(r.memory.rss_kib)
                        ),
                        g,
                        ok,
                    ]);
                }
            }
        }
        let mut out = String::new();
        let _ = writeln!(
            out,
            "taskd-bench, {} — {} CPUs ({}), Linux {}, load average {} before the run\n",
            self.date,
            self.machine.cpus,
            self.machine.cpu_model,
            self.machine.kernel,
            self.machine.loadavg
        );
        let _ = writeln!(out, "| workload | sync | setup | result | goal | met |");
        let _ = writeln!(out, "| --- | --- | --- | --- | --- | --- |");
        for r in rows {
            let _ = writeln!(out, "| {} |", r.join(" | "));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::thousands;

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1234567.0), "1,234,567");
    }
}
