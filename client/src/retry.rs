//! When and how calls are retried: the retryable status codes (kept here, in one place) and a
//! bounded exponential backoff with jitter.

use std::time::{Duration, Instant};

use rand::Rng;

/// Status codes that mean "the broker was not there, try again": a restart, a lost connection.
///
/// Only idempotent calls are retried (every submit carries a client-chosen id, so a resubmit
/// after a lost reply creates nothing new).
const RETRYABLE_CODES: &[tonic::Code] = &[tonic::Code::Unavailable, tonic::Code::Aborted];

/// Codes that are retryable only when produced locally by the transport (the status has a
/// source error), never when the broker sent them: a connection reset mid-call surfaces as
/// one of these.
const TRANSPORT_CODES: &[tonic::Code] = &[
    tonic::Code::Unknown,
    tonic::Code::Cancelled,
    tonic::Code::Internal,
];

/// Whether a call that failed with `status` may be retried.
pub(crate) fn is_retryable(status: &tonic::Status) -> bool {
    RETRYABLE_CODES.contains(&status.code()) || is_transport_failure(status)
}

/// Whether `status` reports a broken or refused connection rather than a broker decision.
pub(crate) fn is_transport_failure(status: &tonic::Status) -> bool {
    if status.code() == tonic::Code::Unavailable {
        return true;
    }
    TRANSPORT_CODES.contains(&status.code())
        && (std::error::Error::source(status).is_some()
            || status.message().contains("transport error")
            || status.message().contains("h2 protocol error"))
}

/// Bounded exponential backoff with full jitter: delays grow from `initial` doubling up to
/// `max`; the whole retry loop gives up after `budget`.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
    deadline: Option<Instant>,
}

impl Backoff {
    /// A backoff starting at `initial`, capped at `max`, giving up `budget` from now
    /// (`None`: never).
    pub(crate) fn new(initial: Duration, max: Duration, budget: Option<Duration>) -> Backoff {
        Backoff {
            initial,
            max,
            next: initial,
            // A budget too large for an `Instant` is no budget.
            deadline: budget.and_then(|b| Instant::now().checked_add(b)),
        }
    }

    /// The delay before the next try, or `None` when the budget is spent.
    pub(crate) fn next_delay(&mut self) -> Option<Duration> {
        let base = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        // Jitter in [base/2, base]: spreads reconnects of many clients after a restart.
        let half = base / 2;
        let jitter = rand::rng().random_range(0..=half.as_millis().max(1) as u64);
        let delay = half + Duration::from_millis(jitter);
        match self.deadline {
            Some(deadline) => {
                let now = Instant::now();
                if now >= deadline {
                    None
                } else {
                    Some(delay.min(deadline - now))
                }
            }
            None => Some(delay),
        }
    }

    /// Starts over from the initial delay (after a success).
    pub(crate) fn reset(&mut self) {
        self.next = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(400), None);
        let d: Vec<Duration> = (0..5).filter_map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100));
        assert!(d[1] >= Duration::from_millis(100) && d[1] <= Duration::from_millis(200));
        assert!(d[4] >= Duration::from_millis(200) && d[4] <= Duration::from_millis(400));
        b.reset();
        assert!(
            b.next_delay()
                .is_some_and(|d| d <= Duration::from_millis(100))
        );
    }

    #[test]
    fn backoff_gives_up_after_budget() {
        let mut b = Backoff::new(
            Duration::from_millis(1),
            Duration::from_millis(1),
            Some(Duration::ZERO),
        );
        assert_eq!(b.next_delay(), None);
    }

    #[test]
    fn broker_decisions_are_not_retried() {
        assert!(is_retryable(&tonic::Status::unavailable("down")));
        assert!(!is_retryable(&tonic::Status::invalid_argument("bad")));
        assert!(!is_retryable(&tonic::Status::unknown("handler said so")));
        assert!(!is_retryable(&tonic::Status::unauthenticated("no")));
    }
}
