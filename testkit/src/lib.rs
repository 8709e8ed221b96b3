//! Test support shared by the taskd crates.
//!
//! Tests talk to real things: [`Taskd`] starts the real `taskd` binary on `127.0.0.1:0` with a
//! temp data dir, [`Child`] runs any other workspace binary (`taskworker`, `taskctl`), and
//! [`eventually`] polls a condition with a bound instead of sleeping.
//!
//! Binaries are found next to the test executable (`target/<profile>/`); `cargo test
//! --workspace` and `cargo nextest run --workspace` build them before the tests run.

use std::ffi::OsStr;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub mod netns;

/// How long [`Taskd::start`] waits for the broker to report its address.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The path of workspace binary `name` (e.g. `"taskd"`, `"taskworker"`, `"taskctl"`).
///
/// Fails when the binary has not been built.
pub fn binary_path(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test executable")?;
    // target/<profile>/deps/<test>-<hash>  →  target/<profile>/<name>
    let mut dir = exe.parent().context("test executable has no parent dir")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("deps dir has no parent")?;
    }
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "binary {} not found; build it first (cargo build --workspace --bins)",
            path.display()
        );
    }
    Ok(path)
}

/// Polls `check` every 20 ms until it returns `Some`, for at most `timeout`.
///
/// Returns the value, or an error naming `what` when the time runs out.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A child process that is killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct Child {
    inner: Option<std::process::Child>,
    name: String,
}

impl Child {
    /// Spawns workspace binary `name` with `args`; stdout and stderr go to the test's stderr
    /// unless `TASKD_TEST_QUIET` is set.
    pub fn spawn<I, S>(name: &str, args: I) -> Result<Child>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(binary_path(name)?);
        cmd.args(args);
        Child::spawn_command(name, cmd)
    }

    /// Spawns a prepared command (e.g. one run inside a network namespace).
    pub fn spawn_command(name: &str, mut cmd: Command) -> Result<Child> {
        if std::env::var_os("TASKD_TEST_QUIET").is_some() {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
        cmd.stdin(Stdio::null());
        let inner = cmd.spawn().with_context(|| format!("spawning {name}"))?;
        Ok(Child {
            inner: Some(inner),
            name: name.to_string(),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.inner.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the process.
    pub fn signal(&self, signal: i32) -> Result<()> {
        let pid = self.pid() as libc::pid_t;
        // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
        if pid == 0 || unsafe { libc::kill(pid, signal) } != 0 {
            bail!("sending signal {signal} to {} ({pid})", self.name);
        }
        Ok(())
    }

    /// Kills the process with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.inner.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits at most `timeout` for the process to exit and returns its exit code
    /// (`None` when killed by a signal). Kills it and fails when it does not exit in time.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<i32>> {
        let deadline = Instant::now() + timeout;
        let child = self.inner.as_mut().context("process already reaped")?;
        loop {
            if let Some(status) = child.try_wait()? {
                self.inner = None;
                return Ok(status.code());
            }
            if Instant::now() >= deadline {
                self.kill();
                bail!("{} did not exit within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.inner.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A real `taskd` process on `127.0.0.1:0` with its own temp data dir.
///
/// The data dir outlives restarts of the process ([`Taskd::kill`], [`Taskd::restart`]) and is
/// removed when the value is dropped.
#[derive(Debug)]
pub struct Taskd {
    child: Option<Child>,
    addr: SocketAddr,
    data_dir: tempfile::TempDir,
    extra_args: Vec<String>,
    /// Command prefix the binary runs under (e.g. `ip netns exec NS`); empty: none.
    wrapper: Vec<String>,
}

impl Taskd {
    /// Starts `taskd` with default settings plus `extra_args` (e.g. `["--lease", "2s"]`).
    pub async fn start(extra_args: &[&str]) -> Result<Taskd> {
        let data_dir = tempfile::tempdir().context("creating temp data dir")?;
        let extra_args: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        let (child, addr) = Self::spawn(data_dir.path(), "127.0.0.1:0", &extra_args, &[]).await?;
        Ok(Taskd {
            child: Some(child),
            addr,
            data_dir,
            extra_args,
            wrapper: Vec::new(),
        })
    }

    /// Starts `taskd` under a command prefix (e.g. `["ip", "netns", "exec", "ns1"]`, which
    /// execs the binary, so the pid is taskd's) listening on `listen` (e.g. `"10.201.3.2:0"`).
    pub async fn start_wrapped(
        wrapper: &[&str],
        listen: &str,
        extra_args: &[&str],
    ) -> Result<Taskd> {
        let data_dir = tempfile::tempdir().context("creating temp data dir")?;
        let extra_args: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        let wrapper: Vec<String> = wrapper.iter().map(|s| s.to_string()).collect();
        let (child, addr) = Self::spawn(data_dir.path(), listen, &extra_args, &wrapper).await?;
        Ok(Taskd {
            child: Some(child),
            addr,
            data_dir,
            extra_args,
            wrapper,
        })
    }

    /// Where taskd writes its bound address: beside the data dir.
    fn addr_file(data_dir: &Path) -> PathBuf {
        data_dir.with_extension("addr")
    }

    async fn spawn(
        data_dir: &Path,
        listen: &str,
        extra_args: &[String],
        wrapper: &[String],
    ) -> Result<(Child, SocketAddr)> {
        let addr_file = Self::addr_file(data_dir);
        let _ = std::fs::remove_file(&addr_file);
        let mut args: Vec<String> = vec![
            "--listen".into(),
            listen.into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--addr-file".into(),
            addr_file.display().to_string(),
            // Tests must not pay for fdatasync unless they ask for it.
            "--sync".into(),
            "flush".into(),
        ];
        args.extend(extra_args.iter().cloned());
        let mut child = match wrapper.split_first() {
            None => Child::spawn("taskd", &args)?,
            Some((program, prefix)) => {
                let mut cmd = Command::new(program);
                cmd.args(prefix).arg(binary_path("taskd")?).args(&args);
                Child::spawn_command("taskd", cmd)?
            }
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(text) = std::fs::read_to_string(&addr_file) {
                if let Ok(addr) = text.trim().parse::<SocketAddr>() {
                    return Ok((child, addr));
                }
            }
            if !child.is_running() {
                bail!("taskd exited before it was ready (args: {args:?})");
            }
            if Instant::now() >= deadline {
                bail!("taskd did not report its address within {START_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The address the broker listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The broker's URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The data dir (kept across restarts).
    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    /// The running process, if any.
    pub fn child(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }

    /// Kills the broker with SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
    }

    /// Sends SIGTERM and waits at most `timeout` for a clean exit; returns the exit code.
    pub fn terminate(&mut self, timeout: Duration) -> Result<Option<i32>> {
        let mut child = self.child.take().context("taskd is not running")?;
        child.signal(libc::SIGTERM)?;
        child.wait_timeout(timeout)
    }

    /// Starts the broker again on the same address and data dir (after [`Taskd::kill`] or
    /// [`Taskd::terminate`]; kills a running one first).
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        let listen = self.addr.to_string();
        // The old port can linger briefly; retry the bind for a bounded time.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match Self::spawn(
                self.data_dir.path(),
                &listen,
                &self.extra_args,
                &self.wrapper,
            )
            .await
            {
                Ok((child, addr)) => {
                    self.child = Some(child);
                    self.addr = addr;
                    return Ok(());
                }
                Err(e) if Instant::now() < deadline => {
                    eprintln!("taskd restart failed, retrying: {e:#}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for Taskd {
    fn drop(&mut self) {
        self.kill();
        // The addr file sits next to the data dir (not in it, which is taskd's), so the
        // TempDir does not remove it.
        let _ = std::fs::remove_file(Self::addr_file(self.data_dir.path()));
    }
}
