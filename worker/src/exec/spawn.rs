//! Starting child processes so that they die with the worker, and killing process groups.
//!
//! Every child is spawned in its own process group (`process_group(0)`) with
//! `PR_SET_PDEATHSIG = SIGKILL`. The kernel sends that signal when the *thread* that forked
//! the child exits, not the process; so children are forked from one dedicated thread that
//! lives as long as the process, never from a runtime thread (which may be retired, e.g. by
//! `block_in_place`). The death signal reaches the direct child only; the rest of the group
//! (background jobs, pipelines) is killed by the [guardian](super::guardian) when the worker
//! dies, and by [`GroupGuard`] on a timeout, a cancel or any other end of the task.

use std::io;
use std::sync::OnceLock;
use std::sync::mpsc;

use tokio::process::{Child, Command};
use tokio::sync::oneshot;

struct SpawnRequest {
    command: Command,
    handle: tokio::runtime::Handle,
    reply: oneshot::Sender<io::Result<Child>>,
}

static SPAWNER: OnceLock<Result<mpsc::Sender<SpawnRequest>, String>> = OnceLock::new();

fn spawner() -> io::Result<&'static mpsc::Sender<SpawnRequest>> {
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("taskd-exec-spawner".to_string())
            .spawn(move || {
                // Lives for the whole process: the sender is in a static and never dropped.
                for request in rx {
                    let _runtime = request.handle.enter();
                    let mut command = request.command;
                    let _ = request.reply.send(command.spawn());
                }
            })
            .map(|_| tx)
            .map_err(|e| format!("cannot start the spawner thread: {e}"))
    });
    spawner.as_ref().map_err(|e| io::Error::other(e.clone()))
}

/// Prepares `command`: own process group, death signal, and spawns it from the spawner thread.
pub(crate) async fn spawn(mut command: Command) -> io::Result<Child> {
    let parent = libc::pid_t::try_from(std::process::id()).unwrap_or(0);
    command.process_group(0);
    // SAFETY: the closure runs in the forked child before exec and only calls
    // async-signal-safe functions (prctl, getppid) and builds an io::Error from a raw code.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) == -1
            {
                return Err(io::Error::last_os_error());
            }
            // The worker may have died between fork and prctl: then nobody would kill us.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let (reply, rx) = oneshot::channel();
    spawner()?
        .send(SpawnRequest {
            command,
            handle: tokio::runtime::Handle::current(),
            reply,
        })
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    rx.await
        .map_err(|_| io::Error::other("the spawner thread dropped the request"))?
}

/// A child's process group, SIGKILLed when this guard drops (unless disarmed), so that no
/// path out of a task — error, panic, a dropped future — leaves its processes running.
#[derive(Debug)]
pub(crate) struct GroupGuard {
    pgid: Option<libc::pid_t>,
}

impl GroupGuard {
    /// Guards the group led by `pid` (the child was spawned with `process_group(0)`).
    /// The group is also registered with the [guardian](super::guardian), which kills it if
    /// the worker dies first.
    pub(crate) fn new(pid: Option<u32>) -> Self {
        let pgid = pid
            .and_then(|p| libc::pid_t::try_from(p).ok())
            .filter(|p| *p > 0);
        if let Some(pgid) = pgid {
            super::guardian::register(pgid);
        }
        GroupGuard { pgid }
    }

    /// Sends `signal` to every process of the group; false when none is left.
    pub(crate) fn signal(&self, signal: libc::c_int) -> bool {
        match self.pgid {
            // SAFETY: kill(2) on a negative pid signals a process group; no memory involved.
            Some(pgid) => unsafe { libc::kill(-pgid, signal) == 0 },
            None => false,
        }
    }

    /// Kills what is left of the group now and stops guarding it.
    pub(crate) fn kill_and_disarm(&mut self) {
        self.signal(libc::SIGKILL);
        if let Some(pgid) = self.pgid.take() {
            super::guardian::unregister(pgid);
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill_and_disarm();
    }
}
