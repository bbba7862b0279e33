//! What the timed phase records, and the summaries computed from it.
//!
//! Each connection records into its own [`Recorder`] (behind a mutex held for a few hundred
//! nanoseconds per answer); [`Live`] holds the atomic counters the progress line reads. At the
//! end the recorders are merged and summarized.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::load::Answer;
use hdrhistogram::Histogram;
use serde::Serialize;
use tally_client::Error;

/// Latencies are recorded in microseconds, from 1 µs to this many (longer ones saturate).
const LATENCY_US_MAX: u64 = 10 * 60 * 1_000_000;
/// Confirmations kept per recorder to verify after the run (one per batch height).
const SAMPLES_MAX: usize = 16;

/// Counters the progress line reads while the phase runs.
#[derive(Default)]
pub struct Live {
    pub sent: AtomicU64,
    pub confirmed: AtomicU64,
    pub failed: AtomicU64,
    pub in_flight: AtomicU64,
    /// The longest latency recorded since the progress line last took it, in microseconds.
    pub latency_max_us: AtomicU64,
}

impl Live {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn latency(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_max_us.fetch_max(us, Ordering::Relaxed);
    }
}

/// The outcome of every request one connection sent.
pub struct Recorder {
    pub latency_us: Histogram<u64>,
    pub confirmed: u64,
    /// Server refusals by error code name.
    pub rejected: BTreeMap<String, u64>,
    /// Everything else (timeouts, disconnects, protocol violations) by name.
    pub errors: BTreeMap<String, u64>,
    /// Requests in each batch seen, by height (from the confirmations' headers).
    pub batch_sizes: HashMap<u64, u32>,
    /// A few confirmations from distinct batches, to verify once the clock has stopped.
    pub samples: Vec<Answer>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            latency_us: Histogram::new_with_bounds(1, LATENCY_US_MAX, 3)
                .expect("valid histogram bounds"),
            confirmed: 0,
            rejected: BTreeMap::new(),
            errors: BTreeMap::new(),
            batch_sizes: HashMap::new(),
            samples: Vec::new(),
        }
    }
}

impl Recorder {
    /// Records one answer. Only confirmations have a latency: a refusal that comes back fast
    /// would otherwise flatter the percentiles.
    pub fn record(&mut self, outcome: Result<Answer, Error>, latency: Duration) {
        match outcome {
            Ok(confirmation) => {
                let (operations, header) = (confirmation.operations(), confirmation.header());
                let (height, size) = (header.height, header.request_count);
                self.confirmed_in(height, size, operations, latency, || Some(confirmation));
            }
            Err(Error::Rejected(reply)) => {
                *self
                    .rejected
                    .entry(reply.code.name().to_string())
                    .or_default() += 1;
            }
            Err(other) => {
                *self
                    .errors
                    .entry(other.code_name().to_string())
                    .or_default() += 1;
            }
        }
    }

    /// Records `operations` confirmed in the batch at `height` of `size` requests; `sample`
    /// gives the whole confirmation if it is kept to be verified (one per batch, a few).
    pub fn confirmed_in(
        &mut self,
        height: u64,
        size: u32,
        operations: u64,
        latency: Duration,
        sample: impl FnOnce() -> Option<Answer>,
    ) {
        self.confirmed += operations;
        self.latency_us
            .saturating_record(latency.as_micros().clamp(1, LATENCY_US_MAX as u128) as u64);
        let new_height = self.batch_sizes.insert(height, size).is_none();
        if new_height && self.samples.len() < SAMPLES_MAX {
            self.samples.extend(sample());
        }
    }

    pub fn merge(&mut self, other: Recorder) {
        self.latency_us
            .add(&other.latency_us)
            .expect("histograms with equal bounds add");
        self.confirmed += other.confirmed;
        for (code, n) in other.rejected {
            *self.rejected.entry(code).or_default() += n;
        }
        for (code, n) in other.errors {
            *self.errors.entry(code).or_default() += n;
        }
        self.batch_sizes.extend(other.batch_sizes);
        self.samples.extend(other.samples);
    }

    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }

    pub fn errors_total(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// Confirmation latency percentiles, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Latency {
    /// All zero for an empty histogram.
    pub fn from_histogram_us(h: &Histogram<u64>) -> Latency {
        let ms = |us: u64| us as f64 / 1000.0;
        if h.is_empty() {
            return Latency {
                p50: 0.0,
                p90: 0.0,
                p99: 0.0,
                p999: 0.0,
                max: 0.0,
                mean: 0.0,
            };
        }
        Latency {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

/// Sizes of the batches the confirmations came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Batches {
    /// Distinct batch heights seen.
    pub count: u64,
    pub mean_size: f64,
    /// Nearest-rank median.
    pub p50_size: u64,
    pub max_size: u64,
}

impl Batches {
    pub fn from_sizes(sizes: &HashMap<u64, u32>) -> Batches {
        let mut sorted: Vec<u64> = sizes.values().map(|&n| u64::from(n)).collect();
        sorted.sort_unstable();
        if sorted.is_empty() {
            return Batches {
                count: 0,
                mean_size: 0.0,
                p50_size: 0,
                max_size: 0,
            };
        }
        let count = sorted.len();
        Batches {
            count: count as u64,
            mean_size: sorted.iter().sum::<u64>() as f64 / count as f64,
            // Nearest rank: the smallest value with at least half of them at or below it.
            p50_size: sorted[count.div_ceil(2) - 1],
            max_size: sorted[count - 1],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_wire::{ErrorCode, ErrorReply};

    fn check_latency(values_ms: impl IntoIterator<Item = u64>, expected: Latency) {
        let mut recorder = Recorder::default();
        for ms in values_ms {
            recorder
                .latency_us
                .record(ms * 1000)
                .expect("in the histogram's range");
        }
        let got = Latency::from_histogram_us(&recorder.latency_us);
        // Three significant digits: every value within 0.1% of the exact one.
        for (name, g, e) in [
            ("p50", got.p50, expected.p50),
            ("p90", got.p90, expected.p90),
            ("p99", got.p99, expected.p99),
            ("p999", got.p999, expected.p999),
            ("max", got.max, expected.max),
            ("mean", got.mean, expected.mean),
        ] {
            assert!(
                (g - e).abs() <= e * 0.001 + 1e-9,
                "{name}: got {g}, expected {e}"
            );
        }
    }

    #[test]
    fn latency_percentiles_on_known_inputs() {
        check_latency(
            1..=1000,
            Latency {
                p50: 500.0,
                p90: 900.0,
                p99: 990.0,
                p999: 999.0,
                max: 1000.0,
                mean: 500.5,
            },
        );
        // 999 fast answers and one slow one: only p99.9 and max see it.
        check_latency(
            std::iter::repeat_n(10, 999).chain([5000]),
            Latency {
                p50: 10.0,
                p90: 10.0,
                p99: 10.0,
                p999: 10.0,
                max: 5000.0,
                mean: (999.0 * 10.0 + 5000.0) / 1000.0,
            },
        );
        check_latency(
            [7],
            Latency {
                p50: 7.0,
                p90: 7.0,
                p99: 7.0,
                p999: 7.0,
                max: 7.0,
                mean: 7.0,
            },
        );
        let empty = Latency::from_histogram_us(&Recorder::default().latency_us);
        assert_eq!(empty.max, 0.0);
    }

    #[test]
    fn batch_sizes_on_known_inputs() {
        let check = |sizes: &[(u64, u32)], count, mean_size, p50_size, max_size| {
            let map: HashMap<u64, u32> = sizes.iter().copied().collect();
            assert_eq!(
                Batches::from_sizes(&map),
                Batches {
                    count,
                    mean_size,
                    p50_size,
                    max_size
                },
                "{sizes:?}"
            );
        };
        check(&[], 0, 0.0, 0, 0);
        check(&[(1, 5)], 1, 5.0, 5, 5);
        check(&[(1, 1), (2, 2), (3, 3), (4, 10)], 4, 4.0, 2, 10);
        check(&[(7, 100), (8, 300), (9, 200)], 3, 200.0, 200, 300);
    }

    #[test]
    fn outcomes_are_counted_and_merged() {
        let mut a = Recorder::default();
        let busy = ErrorReply::new(ErrorCode::Busy, "queue full");
        a.record(Err(Error::Rejected(busy.clone())), Duration::from_millis(1));
        a.record(Err(Error::Rejected(busy)), Duration::from_millis(1));
        a.record(Err(Error::Timeout), Duration::from_secs(10));
        let mut b = Recorder::default();
        b.record(
            Err(Error::Rejected(ErrorReply::new(
                ErrorCode::InsufficientFunds,
                "",
            ))),
            Duration::ZERO,
        );
        b.record(Err(Error::Disconnected), Duration::ZERO);
        a.merge(b);
        assert_eq!(a.confirmed, 0);
        assert_eq!(
            a.rejected,
            BTreeMap::from([("busy".into(), 2), ("insufficient_funds".into(), 1)])
        );
        assert_eq!(
            a.errors,
            BTreeMap::from([("disconnected".into(), 1), ("timeout".into(), 1)])
        );
        assert_eq!((a.rejected_total(), a.errors_total()), (3, 2));
        // Refusals and errors carry no latency.
        assert!(a.latency_us.is_empty());
    }
}
