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
