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
    /// p50 of the submit call alone (until the broker acknowledged the task as durable).
    pub(crate) submit_p50_us: f64,
    /// p50 of the rest: from the submit acknowledgement to the completion event.
    pub(crate) complete_p50_us: f64,
    /// p50 of a GetTask call for a finished task (after the round trips): the floor of one
    /// unary call through client, network and broker, without storage.
    pub(crate) get_p50_us: f64,
}

/// Runs `warmup` then `rounds` sequential round trips; each waits at most `bound`.
pub(crate) async fn run(
    client: &Client,
    warmup: usize,
    rounds: usize,
    bound: Duration,
) -> Result<W2Measure> {
    let mut samples = Vec::with_capacity(rounds);
    let mut submits = Vec::with_capacity(rounds);
    let mut rests = Vec::with_capacity(rounds);
    let mut last = None;
    for i in 0..warmup + rounds {
        let task = Task::new(NOOP);
        let start = Instant::now();
        let fut = client.submit(task).await?;
        let acked = start.elapsed();
        let outcome = fut.outcome(Some(bound)).await;
        let took = start.elapsed();
        check_success(&fut, outcome)?;
        last = Some(fut.id());
        if i >= warmup {
            samples.push(took.as_secs_f64() * 1e6);
            submits.push(acked.as_secs_f64() * 1e6);
            rests.push((took - acked).as_secs_f64() * 1e6);
        }
    }
    let mut gets = Vec::with_capacity(rounds);
    if let Some(id) = last {
        for _ in 0..rounds {
            let start = Instant::now();
            client.get(id).await?;
            gets.push(start.elapsed().as_secs_f64() * 1e6);
        }
    }
    gets.sort_by(f64::total_cmp);
    samples.sort_by(f64::total_cmp);
    submits.sort_by(f64::total_cmp);
    rests.sort_by(f64::total_cmp);
    Ok(W2Measure {
        rounds,
        warmup,
        p50_us: percentile(&samples, 50.0),
        p90_us: percentile(&samples, 90.0),
        p99_us: percentile(&samples, 99.0),
        mean_us: samples.iter().sum::<f64>() / samples.len().max(1) as f64,
        min_us: samples.first().copied().unwrap_or(0.0),
        max_us: samples.last().copied().unwrap_or(0.0),
        submit_p50_us: percentile(&submits, 50.0),
        complete_p50_us: percentile(&rests, 50.0),
        get_p50_us: percentile(&gets, 50.0),
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
