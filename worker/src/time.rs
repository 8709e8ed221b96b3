//! Deadlines from durations that may be huge (user flags, broker replies) without panicking.

use std::time::Duration;

use tokio::time::Instant;

/// About 30 years: "never" for a deadline, yet far from `Instant`'s overflow.
const FAR: Duration = Duration::from_secs(30 * 365 * 24 * 3600);

/// The instant `d` from now, or about 30 years from now when `d` is larger than that
/// (`Instant + Duration` panics on overflow, e.g. for `--shutdown-grace 1000000000y`).
pub(crate) fn after(d: Duration) -> Instant {
    Instant::now() + d.min(FAR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_durations_do_not_overflow() {
        let at = after(Duration::MAX);
        assert!(at > Instant::now() + Duration::from_secs(365 * 24 * 3600));
        let at = after(Duration::from_millis(u64::MAX));
        assert!(at > Instant::now());
    }
}
