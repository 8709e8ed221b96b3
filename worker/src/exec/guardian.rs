//! The guardian: a tiny `sh` process, started once per worker process, that kills the process
//! groups of running exec tasks when the worker dies, however it dies (even SIGKILL).
//!
//! `PR_SET_PDEATHSIG` only reaches a task's direct child; a shell's background jobs or a
//! pipeline's other members would outlive a SIGKILLed worker. So every task's process group is
//! registered with the guardian (`+ PGID` on its stdin) and unregistered when it ends
//! (`- PGID`). When the worker exits, the kernel closes the pipe, the guardian reads end of
//! input and SIGKILLs every group still registered. It ignores SIGINT/SIGTERM/SIGHUP and runs in
//! its own process group, so a Ctrl-C aimed at the worker does not take it down first.
//!
//! Without `sh` the worker runs on, with the death signal alone (logged once).

use std::io::Write;
use std::os::fd::AsRawFd;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};

const SCRIPT: &str = r#"trap '' INT TERM HUP
set -f
groups=" "
while read -r op pg; do
  case "$op" in
    +) groups="$groups$pg " ;;
    -) case "$groups" in *" $pg "*) groups="${groups%% $pg *} ${groups#* $pg }" ;; esac ;;
  esac
done
for pg in $groups; do kill -KILL -"$pg" 2>/dev/null; done
"#;

/// The guardian's stdin. A std mutex: held only for one non-blocking write of a few bytes.
static GUARDIAN: OnceLock<Option<Mutex<ChildStdin>>> = OnceLock::new();

fn guardian() -> Option<&'static Mutex<ChildStdin>> {
    GUARDIAN
        .get_or_init(|| match start() {
            Ok(stdin) => Some(Mutex::new(stdin)),
            Err(error) => {
                tracing::warn!(
                    %error,
                    "cannot start the exec guardian; if this worker is killed, processes its \
                     tasks started in the background may survive it"
                );
                None
            }
        })
        .as_ref()
}

fn start() -> std::io::Result<ChildStdin> {
    use std::os::unix::process::CommandExt;
    let mut child = Command::new("sh")
        .args(["-c", SCRIPT, "taskd-exec-guardian"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()?;
    let stdin = child
        .stdin
        .take()
        .ok_or_else(|| std::io::Error::other("no stdin pipe"))?;
    // Never block the runtime on the guardian: a full pipe drops a registration instead.
    let fd = stdin.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own; no memory is passed.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
    // Dropping a std Child neither kills nor waits: the guardian runs on until the worker dies.
    drop(child);
    Ok(stdin)
}

fn send(line: &str) {
    if let Some(stdin) = guardian() {
        if let Ok(mut stdin) = stdin.lock() {
            if let Err(error) = stdin.write_all(line.as_bytes()) {
                tracing::debug!(%error, "could not tell the exec guardian");
            }
        }
    }
}

/// Starts the guardian now (it is otherwise started by the first registration).
pub(crate) fn ensure_started() {
    let _ = guardian();
}

/// Asks the guardian to kill group `pgid` if the worker dies.
pub(crate) fn register(pgid: libc::pid_t) {
    send(&format!("+ {pgid}\n"));
}

/// The group ended: forget it.
pub(crate) fn unregister(pgid: libc::pid_t) {
    send(&format!("- {pgid}\n"));
}
