//! `as_completed` and `wait` over many futures, as in `concurrent.futures`.

use std::time::Duration;

use futures::stream::{BoxStream, FuturesUnordered, StreamExt};
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::future::TaskFuture;
use crate::outcome::Outcome;

/// When [`wait`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReturnWhen {
    /// As soon as any future completes.
    FirstCompleted,
    /// As soon as any future fails (a task failure or an error ending its watch; a cancelled
    /// task is not an exception), or when all have completed.
    FirstException,
    /// When every future has completed.
    AllCompleted,
}

/// Yields the futures as they complete (those already done first), then ends.
///
/// With a `timeout` (measured from this call), yields one `Err(Error::Timeout)` when time runs
/// out before all have completed, and ends.
pub fn as_completed<I>(
    futures: I,
    timeout: Option<Duration>,
) -> BoxStream<'static, Result<TaskFuture>>
where
    I: IntoIterator<Item = TaskFuture>,
{
    // A timeout beyond what an `Instant` can hold is none (`Instant + Duration` would panic).
    let deadline = timeout.and_then(|t| Some((Instant::now().checked_add(t)?, t)));
    let pending: FuturesUnordered<_> = futures
        .into_iter()
        .map(|f| async move {
            let _ = f.outcome(None).await;
            f
        })
        .collect();
    futures::stream::unfold(
        (pending, deadline, false),
        |(mut pending, deadline, ended)| async move {
            if ended {
                return None;
            }
            let next = match deadline {
                Some((at, t)) => match tokio::time::timeout_at(at, pending.next()).await {
                    Ok(next) => next,
                    Err(_) => return Some((Err(Error::Timeout(t)), (pending, deadline, true))),
                },
                None => pending.next().await,
            };
            next.map(|f| (Ok(f), (pending, deadline, false)))
        },
    )
    .boxed()
}

/// Waits, at most `timeout` (`None`: for ever), until `return_when` holds, and returns the
/// futures split into `(done, not_done)`, each in input order. Never fails: a timeout just
/// returns what is done by then.
pub async fn wait<I>(
    futures: I,
    timeout: Option<Duration>,
    return_when: ReturnWhen,
) -> (Vec<TaskFuture>, Vec<TaskFuture>)
where
    I: IntoIterator<Item = TaskFuture>,
{
    let all: Vec<TaskFuture> = futures.into_iter().collect();
    let mut pending: FuturesUnordered<_> = all
        .iter()
        .map(|f| {
            let f = f.clone();
            async move { f.outcome(None).await }
        })
        .collect();
    let watch = async {
        while let Some(outcome) = pending.next().await {
            let exception = !matches!(
                outcome,
                Ok(Outcome::Succeeded(_)) | Ok(Outcome::Cancelled(_))
            );
            match return_when {
                ReturnWhen::FirstCompleted => return,
                ReturnWhen::FirstException if exception => return,
                _ => {}
            }
        }
    };
    match timeout {
        Some(t) => {
            let _ = tokio::time::timeout(t, watch).await;
        }
        None => watch.await,
    }
    all.into_iter().partition(TaskFuture::done)
}
