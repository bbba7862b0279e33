//! `tally-bench --state-map-accounts N`: what the state map (PROTOCOL.md §4.13) costs, measured
//! on the map alone: building it for N accounts (what opening a ledger does), memory per
//! entry, and the time to fold one batch of K changed accounts into it (what the sequencer's
//! seal and each replica's replay add per batch), beside this machine's own bound for it: the
//! same number of SHA-256 compressions of 65-byte inputs.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use serde::Serialize;
use tally_core::crypto::sha256;
use tally_core::state_map::{account_path, account_value_hash, StateMap};

#[derive(Debug, Serialize)]
pub struct StateMapCost {
    pub accounts: usize,
    pub changes_per_batch: usize,
    pub build_seconds: f64,
    /// VmRSS after the build minus before, per account (Linux; 0 elsewhere).
    pub bytes_per_account: f64,
    /// Median over the rounds of folding one batch of changes (hashing the new values included).
    pub batch_ms_median: f64,
    pub batch_ms_rounds: Vec<f64>,
    /// The hashes one batch takes: its changed leaves' value and leaf hashes plus the inner
    /// nodes on their paths, counted on the map.
    pub hashes_per_batch: u64,
    /// This machine's time for that many 65-byte SHA-256 hashes, the bound.
    pub bound_ms: f64,
    /// VmRSS after the rounds minus after the build, per account: what the churn of replaced
    /// nodes leaves in the allocator (the last 8 versions are kept alive, as in-flight batches
    /// keep theirs).
    pub churn_bytes_per_account: f64,
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| crate::server::parse_memory(&s))
        .map_or(0, |(rss, _)| rss)
}

pub fn state_map_cost(accounts: usize, changes: usize, rounds: usize, seed: u64) -> StateMapCost {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let keys: Vec<[u8; 32]> = (0..accounts).map(|_| rng.gen()).collect();
    let before = rss_bytes();
    let started = Instant::now();
    let entries = keys
        .iter()
        .map(|k| (account_path(k), account_value_hash(1_000)))
        .collect();
    let mut map = StateMap::from_entries(entries);
    let build_seconds = started.elapsed().as_secs_f64();
    let bytes_per_account = rss_bytes().saturating_sub(before) as f64 / accounts.max(1) as f64;
    let after_build = rss_bytes();
    let mut batch_ms_rounds = Vec::new();
    let mut kept = std::collections::VecDeque::new();
    for round in 0..rounds {
        let started = Instant::now();
        for _ in 0..changes {
            let k = &keys[rng.gen_range(0..accounts)];
            map.set_account(k, 1_000 + round as u64);
        }
        map.flush();
        batch_ms_rounds.push(started.elapsed().as_secs_f64() * 1e3);
        kept.push_back(map.clone());
        if kept.len() > 8 {
            kept.pop_front();
        }
    }
    let churn_bytes_per_account =
        rss_bytes().saturating_sub(after_build) as f64 / accounts.max(1) as f64;
    let hashes_per_batch = hashes_for(accounts, changes);
    let bound_ms = sha256_ms(hashes_per_batch);
    let mut sorted = batch_ms_rounds.clone();
    sorted.sort_by(f64::total_cmp);
    StateMapCost {
        accounts,
        changes_per_batch: changes,
        build_seconds,
        bytes_per_account,
        batch_ms_median: sorted[sorted.len() / 2],
        batch_ms_rounds,
        hashes_per_batch,
        bound_ms,
        churn_bytes_per_account,
    }
}

/// Expected hashes to fold `k` random changes into a map of `n`: per change its path, value and
/// leaf hashes, plus the distinct inner nodes on the changed paths (a level of 2^d nodes with
/// k changes spread over it touches 2^d·(1 − (1 − 2^−d)^k) of them), down to depth log2(n).
fn hashes_for(n: usize, k: usize) -> u64 {
    let depth = (n.max(2) as f64).log2().ceil() as i32;
    let mut inner = 0.0;
    for d in 0..depth {
        let nodes = 2f64.powi(d);
        inner += nodes * (1.0 - (1.0 - 1.0 / nodes).powi(k as i32));
    }
    (3.0 * k as f64 + inner) as u64
}

/// Time for `n` SHA-256 hashes of 65 bytes (the size of an inner node's and a leaf's input).
fn sha256_ms(n: u64) -> f64 {
    let input = [7u8; 65];
    let mut acc = [0u8; 32];
    let started = Instant::now();
    for _ in 0..n {
        acc = sha256(&[&input[..33], &acc]);
    }
    std::hint::black_box(acc);
    started.elapsed().as_secs_f64() * 1e3
}
