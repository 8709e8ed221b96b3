//! Child processes that cannot outlive the benchmark: SIGKILLed when their guard drops, and
//! (through `PR_SET_PDEATHSIG`) when the benchmark itself dies.

use std::io::BufRead;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use tokio::sync::mpsc;

/// A running child process, killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub(crate) struct Proc {
    name: String,
    child: Option<std::process::Child>,
}

/// A line the child wrote on its stdout, with the time the benchmark read it.
pub(crate) type Line = (Instant, String);

impl Proc {
    /// Spawns `cmd`; its stdout lines go to the returned receiver when `capture_stdout`.
    pub(crate) fn spawn(
        name: &str,
        mut cmd: Command,
        capture_stdout: bool,
    ) -> Result<(Proc, Option<mpsc::UnboundedReceiver<Line>>)> {
        cmd.stdin(Stdio::null());
        if capture_stdout {
            cmd.stdout(Stdio::piped());
        }
        // SAFETY: prctl(2) is async-signal-safe and touches no memory of the parent; it runs
        // in the forked child before exec. The signal is sent when the spawning thread exits:
        // the benchmark spawns from its runtime's worker threads, which live as long as it.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().with_context(|| format!("spawning {name}"))?;
        let lines = match child.stdout.take() {
            Some(out) => {
                let (tx, rx) = mpsc::unbounded_channel();
                std::thread::Builder::new()
                    .name(format!("{name}-stdout"))
                    .spawn(move || {
                        for line in std::io::BufReader::new(out).lines() {
                            let Ok(line) = line else { break };
                            if tx.send((Instant::now(), line)).is_err() {
                                break;
                            }
                        }
                    })
                    .context("starting a stdout reader thread")?;
                Some(rx)
            }
            None => None,
        };
        Ok((
            Proc {
                name: name.to_string(),
                child: Some(child),
            },
            lines,
        ))
    }

    /// The process id (0 once reaped).
    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Fails when the process has exited.
    pub(crate) fn check_running(&mut self) -> Result<()> {
        let name = self.name.clone();
        let child = self.child.as_mut().context("process already reaped")?;
        if let Some(status) = child.try_wait()? {
            self.child = None;
            bail!("{name} exited unexpectedly ({status})");
        }
        Ok(())
    }

    /// Sends SIGKILL and reaps the process.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The path of binary `name` next to this executable (how `cargo build` lays them out).
pub(crate) fn sibling_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the taskd-bench executable")?;
    let dir = exe.parent().context("the executable has no parent dir")?;
    let dir: &Path = if dir.ends_with("deps") {
        dir.parent().unwrap_or(dir)
    } else {
        dir
    };
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} not found; build it first (cargo build --release -p taskd-server --bin taskd) \
             or pass --taskd PATH",
            path.display()
        );
    }
    Ok(path)
}

/// Resident and peak memory of a process, from /proc/<pid>/status.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub(crate) struct Memory {
    /// VmRSS in KiB.
    pub(crate) rss_kib: u64,
    /// VmHWM (peak RSS) in KiB.
    pub(crate) peak_kib: u64,
}

/// Reads VmRSS and VmHWM of `pid`.
pub(crate) fn memory(pid: u32) -> Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |key: &str| -> Result<u64> {
        let line = text
            .lines()
            .find(|l| l.starts_with(key))
            .with_context(|| format!("{path} has no {key}"))?;
        line[key.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<u64>()
            .with_context(|| format!("parsing {key} in {path}: {line}"))
    };
    Ok(Memory {
        rss_kib: field("VmRSS:")?,
        peak_kib: field("VmHWM:")?,
    })
}

/// CPU time (user + system) a process has used so far, in seconds.
pub(crate) fn cpu_secs(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) may hold spaces; the fields after its closing paren are fixed.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("parsing {path}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the paren: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("parsing field {} of {path}", i + 3))
    };
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    Ok((ticks(11)? + ticks(12)?) as f64 / hz)
}

/// CPU seconds used by the broker, the workers and this process (the client) during a
/// measured interval.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub(crate) struct CpuUse {
    pub(crate) broker_secs: f64,
    pub(crate) workers_secs: f64,
    pub(crate) client_secs: f64,
}

/// A CPU-time reading of the broker, the workers and this process.
#[derive(Debug, Clone)]
pub(crate) struct CpuMeter {
    broker: u32,
    workers: Vec<u32>,
    start: CpuUse,
}

impl CpuMeter {
    /// Starts measuring.
    pub(crate) fn start(broker: u32, workers: Vec<u32>) -> Result<CpuMeter> {
        let mut m = CpuMeter {
            broker,
            workers,
            start: CpuUse::default(),
        };
        m.start = m.read()?;
        Ok(m)
    }

    fn read(&self) -> Result<CpuUse> {
        let mut workers = 0.0;
        for &pid in &self.workers {
            workers += cpu_secs(pid)?;
        }
        Ok(CpuUse {
            broker_secs: cpu_secs(self.broker)?,
            workers_secs: workers,
            client_secs: cpu_secs(std::process::id())?,
        })
    }

    /// CPU used since [`CpuMeter::start`].
    pub(crate) fn used(&self) -> Result<CpuUse> {
        let now = self.read()?;
        Ok(CpuUse {
            broker_secs: now.broker_secs - self.start.broker_secs,
            workers_secs: now.workers_secs - self.start.workers_secs,
            client_secs: now.client_secs - self.start.client_secs,
        })
    }
}
