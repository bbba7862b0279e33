//! The archive's lag during a timed phase: the leader's `Status` sampled every 100 ms
//! (applied height minus the archive's height), and how long the archive takes to catch up
//! once the load stops.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tally_client::Client;

const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// How long the catch-up after the load may take before it is reported as not reached.
const CATCH_UP_MAX: Duration = Duration::from_secs(120);

/// The archive's lag over a run, in batches.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ArchiveLag {
    pub samples: u64,
    pub p50_batches: u64,
    pub p99_batches: u64,
    pub max_batches: u64,
    /// Seconds from the end of the load until the archive held every applied batch (None:
    /// not within two minutes).
    pub caught_up_seconds: Option<f64>,
}

/// Samples the lag until `stop` is set; `None` when the server has no archive.
pub async fn sample(client: Arc<Client>, stop: Arc<AtomicBool>) -> Option<Vec<u64>> {
    let mut lags = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        if let Ok(s) = client.status().await {
            lags.push(s.applied_height.saturating_sub(s.archive_height?));
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    Some(lags)
}

/// Waits until the archive holds every applied batch; returns the seconds it took.
pub async fn catch_up(client: &Client) -> Option<f64> {
    let started = Instant::now();
    while started.elapsed() < CATCH_UP_MAX {
        let s = client.status().await.ok()?;
        if s.archive_height? >= s.applied_height {
            return Some(started.elapsed().as_secs_f64());
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    None
}

impl ArchiveLag {
    pub fn from_samples(mut lags: Vec<u64>, caught_up_seconds: Option<f64>) -> ArchiveLag {
        lags.sort_unstable();
        let at = |q: f64| -> u64 {
            if lags.is_empty() {
                return 0;
            }
            lags[((lags.len() - 1) as f64 * q).round() as usize]
        };
        ArchiveLag {
            samples: lags.len() as u64,
            p50_batches: at(0.5),
            p99_batches: at(0.99),
            max_batches: lags.last().copied().unwrap_or(0),
            caught_up_seconds,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_the_samples() {
        let lag = ArchiveLag::from_samples((1..=100).rev().collect(), Some(1.5));
        assert_eq!(
            (lag.samples, lag.p50_batches, lag.p99_batches),
            (100, 51, 99)
        );
        assert_eq!(lag.max_batches, 100);
        assert_eq!(ArchiveLag::from_samples(vec![], None).max_batches, 0);
    }
}

/// Sizes of the archive's state snapshots for a ledger of `accounts` funded accounts (one
/// deposit each) after transfers touching `change` of them: a full snapshot before, the
/// differential one the transfers give, and how much of a second full snapshot the first one
/// already holds (chunks are content-addressed). Built with the writer's own code
/// (`tally_core::snapshot::Delta`), rows as receipts give them.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotSizes {
    pub accounts: usize,
    pub changed_accounts: usize,
    pub full_bytes: u64,
    pub full_chunks: usize,
    pub diff_bytes: u64,
    pub diff_chunks: usize,
    /// Bytes of the second full snapshot whose chunks the first one already stored.
    pub full_again_shared_bytes: u64,
    pub full_again_bytes: u64,
    pub build_seconds: f64,
}

pub fn snapshot_sizes(accounts: usize, change: f64, seed: u64) -> SnapshotSizes {
    use rand::{Rng, SeedableRng};
    use tally_core::snapshot::{Delta, RequestAt};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let depositor = [0xde; 32];
    let mut full = Delta::default();
    let key = |rng: &mut rand::rngs::StdRng| -> [u8; 32] { rng.gen() };
    for i in 0..accounts {
        let k = key(&mut rng);
        full.accounts.insert(k, 1_000);
        let at = RequestAt {
            height: 1 + i as u64 / 8192,
            index: (i % 8192) as u32,
            request_hash: key(&mut rng),
        };
        full.requests.insert((depositor, i as u128), at);
    }
    let keys: Vec<[u8; 32]> = full.accounts.keys().copied().collect();
    // Each transfer touches two accounts and adds one request record.
    let transfers = ((accounts as f64 * change) / 2.0).ceil() as usize;
    let mut diff = Delta::default();
    for t in 0..transfers {
        let (a, b) = (
            keys[rng.gen_range(0..keys.len())],
            keys[rng.gen_range(0..keys.len())],
        );
        diff.accounts.insert(a, 999);
        diff.accounts.insert(b, 1_001);
        let at = RequestAt {
            height: 1_000_000,
            index: t as u32,
            request_hash: key(&mut rng),
        };
        diff.requests.insert((a, t as u128), at);
    }
    let sum = |chunks: &[Vec<u8>]| chunks.iter().map(|c| c.len() as u64).sum::<u64>();
    let full_chunks = full.chunks();
    let diff_chunks = diff.chunks();
    let first: std::collections::HashSet<&Vec<u8>> = full_chunks.iter().collect();
    let mut again = full.clone();
    again.merge(diff.clone());
    let again_chunks = again.chunks();
    let shared = again_chunks
        .iter()
        .filter(|c| first.contains(c))
        .map(|c| c.len() as u64)
        .sum();
    SnapshotSizes {
        accounts,
        changed_accounts: diff.accounts.len(),
        full_bytes: sum(&full_chunks),
        full_chunks: full_chunks.len(),
        diff_bytes: sum(&diff_chunks),
        diff_chunks: diff_chunks.len(),
        full_again_shared_bytes: shared,
        full_again_bytes: sum(&again_chunks),
        build_seconds: started.elapsed().as_secs_f64(),
    }
}
