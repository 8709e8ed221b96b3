//! W2 latency: one client, one task at a time: submit a no-op task and wait for its
//! completion event; warm-ups first, then the measured round trips.

use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;
use taskd_client::{Client, Task};

use crate::workers::NOOP;
use crate::workloads::w1::check_success;

/// What W2 measured, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct W2Measure {
    /// Measured round trips.
    pub(crate) rounds: usize,
    /// Warm-up round trips (not measured).
    pub(crate) warmup: usize,
    pub(crate) p50_us: f64,
    pub(crate) p90_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) mean_us: f64,
    pub(crate) min_us: f64,
    pub(crate) max_us: f64,
}

/// Runs `warmup` then `rounds` sequential round trips; each waits at most `bound`.
pub(crate) async fn run(
    client: &Client,
    warmup: usize,
    rounds: usize,
    bound: Duration,
) -> Result<W2Measure> {
    let mut samples = Vec::with_capacity(rounds);
    for i in 0..warmup + rounds {
        let task = Task::new(NOOP);
        let start = Instant::now();
        let fut = client.submit(task).await?;
        let outcome = fut.outcome(Some(bound)).await;
        let took = start.elapsed();
        check_success(&fut, outcome)?;
        if i >= warmup {
            samples.push(took.as_secs_f64() * 1e6);
        }
    }
    samples.sort_by(f64::total_cmp);
    Ok(W2Measure {
        rounds,
        warmup,
        p50_us: percentile(&samples, 50.0),
        p90_us: percentile(&samples, 90.0),
        p99_us: percentile(&samples, 99.0),
        mean_us: samples.iter().sum::<f64>() / samples.len().max(1) as f64,
        min_us: samples.first().copied().unwrap_or(0.0),
        max_us: samples.last().copied().unwrap_or(0.0),
    })
}

/// The nearest-rank percentile `p` (0..=100) of ascending `sorted` (0 when empty).
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[7.0], 90.0), 7.0);
        assert_eq!(percentile(&[], 90.0), 0.0);
        let w: Vec<f64> = (1..=500).map(f64::from).collect();
        assert_eq!(percentile(&w, 99.0), 495.0);
    }
}
