//! The broker under test: a `taskd` process on 127.0.0.1 with a temp data dir that is removed
//! when the [`Broker`] drops.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cli::SyncMode;
use crate::procs::{self, Memory, Proc};

/// A running `taskd`.
#[derive(Debug)]
pub(crate) struct Broker {
    // Field order matters: the process dies before its data dir is removed.
    proc: Option<Proc>,
    bin: PathBuf,
    sync: SyncMode,
    extra: Vec<String>,
    /// Where the broker's log goes (`None`: `taskd.log` in the temp dir, removed with it).
    log_dir: Option<PathBuf>,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Broker {
    /// Starts `bin` with `--sync sync` plus `extra`, on a free loopback port, and waits at most
    /// `timeout` for it to be ready.
    pub(crate) async fn start(
        bin: &Path,
        sync: SyncMode,
        extra: &[String],
        log_dir: Option<&Path>,
        timeout: Duration,
    ) -> Result<Broker> {
        let dir = tempfile::Builder::new()
            .prefix("taskd-bench-")
            .tempdir()
            .context("creating the broker's temp dir")?;
        let mut broker = Broker {
            proc: None,
            bin: bin.to_path_buf(),
            sync,
            extra: extra.to_vec(),
            log_dir: log_dir.map(Path::to_path_buf),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            dir,
        };
        broker.spawn("127.0.0.1:0", timeout).await?;
        Ok(broker)
    }

    /// The broker's URL.
    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The broker's pid (0 while it is not running).
    pub(crate) fn pid(&self) -> u32 {
        self.proc.as_ref().map(Proc::pid).unwrap_or(0)
    }

    /// The broker's resident and peak memory now.
    pub(crate) fn memory(&self) -> Result<Memory> {
        procs::memory(self.pid())
    }

    /// Bytes the broker's data dir occupies on disk (allocated blocks).
    pub(crate) fn disk_bytes(&self) -> Result<u64> {
        fn walk(dir: &Path) -> std::io::Result<u64> {
            use std::os::unix::fs::MetadataExt;
            let mut total = 0;
            for entry in std::fs::read_dir(dir)? {
                let entry = entry?;
                let meta = entry.metadata()?;
                total += if meta.is_dir() {
                    walk(&entry.path())?
                } else {
                    meta.blocks() * 512
                };
            }
            Ok(total)
        }
        let data = self.dir.path().join("data");
        walk(&data).with_context(|| format!("measuring {}", data.display()))
    }

    /// Kills the broker with SIGKILL (the data dir stays).
    pub(crate) fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Starts the broker again on the same port and data dir; returns how long it took from
    /// spawning the process until it reported its address (ready to serve).
    pub(crate) async fn restart(&mut self, timeout: Duration) -> Result<Duration> {
        self.kill();
        let listen = self.addr.to_string();
        let deadline = Instant::now() + timeout;
        loop {
            let started = Instant::now();
            match self.spawn(&listen, timeout).await {
                Ok(()) => return Ok(started.elapsed()),
                // The old port can linger briefly after a kill; retry, bounded.
                Err(e) if Instant::now() < deadline && self.log_tail().contains("in use") => {
                    tracing::warn!(error = %e, "taskd restart failed, retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Fails when the broker process has exited.
    pub(crate) fn check_running(&mut self) -> Result<()> {
        match self.proc.as_mut() {
            Some(p) => p.check_running().map_err(|e| e.context(self.log_hint())),
            None => bail!("taskd is not running"),
        }
    }

    fn log_path(&self) -> PathBuf {
        match &self.log_dir {
            Some(dir) => {
                let run = self
                    .dir
                    .path()
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                dir.join(format!("{run}-{}.log", self.sync.as_str()))
            }
            None => self.dir.path().join("taskd.log"),
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn log_hint(&self) -> String {
        format!("taskd log (last lines):\n{}", self.log_tail())
    }

    async fn spawn(&mut self, listen: &str, timeout: Duration) -> Result<()> {
        let addr_file = self.dir.path().join("addr");
        let _ = std::fs::remove_file(&addr_file);
        // Appended to, so a restart keeps the log of the killed broker.
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .with_context(|| format!("opening {}", self.log_path().display()))?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--listen")
            .arg(listen)
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .arg("--addr-file")
            .arg(&addr_file)
            .arg("--sync")
            .arg(self.sync.as_str())
            .args(&self.extra)
            .env(
                "TASKD_LOG",
                std::env::var("TASKD_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        let (mut proc, _) = Proc::spawn("taskd", cmd, false)?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(text) = std::fs::read_to_string(&addr_file) {
                if let Ok(addr) = text.trim().parse::<SocketAddr>() {
                    self.addr = addr;
                    self.proc = Some(proc);
                    return Ok(());
                }
            }
            if let Err(e) = proc.check_running() {
                return Err(e.context(self.log_hint()));
            }
            if Instant::now() >= deadline {
                bail!(
                    "taskd did not report its address within {timeout:?}\n{}",
                    self.log_hint()
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}
