//! The report: one struct, written as JSON (`--json`) and as a markdown table (stdout).
//!
//! JSON field names are a contract with scripts (`fraction_of_bound` above all): add fields,
//! never rename them.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use crate::args::Driver;
use crate::bound::Bound;
use crate::server::ReplicaMemory;
use crate::stats::{Batches, Latency};

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// "closed" or "open".
    pub mode: &'static str,
    pub connections: usize,
    /// Requests in flight per connection (closed loop), or the cap on them (open loop).
    pub in_flight: usize,
    /// Offered requests per second (open loop only).
    pub rate: Option<f64>,
    /// The timed phase's planned length (`--duration`), if it was not a count.
    pub duration_seconds: Option<f64>,
    /// The timed phase's planned count (`--requests`), if it was not a length.
    pub requests: Option<u64>,
    pub accounts: usize,
    pub nodes: usize,
    pub cores: usize,

    /// Requests sent in the timed phase; every one ends confirmed, rejected or in error.
    pub sent: u64,
    pub confirmed: u64,
    /// Confirmed requests per second over the timed phase (first send to last answer).
    pub confirmed_per_second: f64,
    pub elapsed_seconds: f64,
    /// Refusals by the server's error code name.
    pub rejected: BTreeMap<String, u64>,
    /// Requests without an answer (timeout, disconnected, ...) by name.
    pub errors: BTreeMap<String, u64>,
    pub latency_ms: Latency,
    pub batches: Batches,
    pub bound: Bound,
    /// `confirmed_per_second / bound.bound_per_second`.
    pub fraction_of_bound: f64,
    /// `confirmed_per_second / bound.cached_key_bound_per_second`: against a server that never
    /// decodes a key (not the bound; lower than `fraction_of_bound`).
    pub fraction_of_cached_key_bound: f64,

    /// Transfers signed before the timed phase.
    pub presigned: u64,
    /// Whether the transfers went out with nonce hints (`SubmitHinted`, batch-verified by the
    /// server) or as plain `Submit`s (`--no-hints`: strict verification one by one).
    pub hinted: bool,
    /// `--envelope N`: transfers went out in envelopes of N, one signature each; `sent`,
    /// `confirmed` and the rates count transfers, the latency is per envelope.
    pub envelope: Option<usize>,
    /// True if a `--duration` run used up its pre-signed transfers before the deadline.
    pub pool_exhausted: bool,
    /// How the timed phase sent (`--driver`; envelopes and the open loop use the library).
    pub driver: Driver,
    /// Open loop: requests sent more than 10 ms after their scheduled time (the generator could
    /// not keep up, or the in-flight cap was reached). Their latency counts from the schedule.
    pub late_sends: u64,
    /// Seconds spent creating and funding accounts and signing transfers (not timed).
    pub setup_seconds: f64,
    /// Confirmations (one per batch, a sample) verified against the operator key after the run.
    pub sample_verified: u64,
    /// Sampled confirmations that failed verification (should be 0).
    pub sample_failed: u64,

    /// The hot working set: timed-phase transfers went between the first this many accounts
    /// (`--hot`; all of them by default).
    pub hot_accounts: usize,
    /// The started replicas' account cache (`cache.accounts_max`: `--cache-accounts`, or the
    /// server's default); null against a server this run did not start.
    pub cache_accounts: Option<usize>,
    /// Seconds of the setup spent funding the accounts (one deposit each, confirmed).
    pub funding_seconds: f64,
    /// With --start-server: the largest VmRSS over the replicas at the end of the timed phase.
    pub server_rss_bytes: Option<u64>,
    /// With --start-server: the largest VmHWM (peak resident memory since the start, funding
    /// included) over the replicas at the end of the timed phase.
    pub server_peak_rss_bytes: Option<u64>,
    /// With --start-server: the largest VmRSS over the replicas after funding, before the timed
    /// phase.
    pub server_rss_after_setup_bytes: Option<u64>,
    /// With --start-server: each replica's figures at the end of the timed phase.
    pub server_memory: Vec<ReplicaMemory>,
    /// With --start-server: CPU time of the replicas (every thread of every replica) per
    /// confirmed request during the timed phase, in microseconds. What a request costs the
    /// operator's machines whatever else shares them (the load generator, an S3 server).
    pub server_cpu_us_per_request: Option<f64>,
    /// The archive's lag behind the applied height during the timed phase (None: the server
    /// has no archive).
    pub archive_lag: Option<crate::archive::ArchiveLag>,
}

impl Report {
    /// The short markdown summary printed to stdout.
    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        let load = match self.rate {
            Some(rate) => format!(
                "open loop at {} req/s over {} connections (cap {} in flight each)",
                thousands(rate),
                self.connections,
                self.in_flight
            ),
            None => format!(
                "closed loop, {} connections × {} in flight",
                self.connections, self.in_flight
            ),
        };
        let length = match (self.duration_seconds, self.requests) {
            (Some(seconds), _) => format!("{seconds} s"),
            (None, Some(n)) => format!("{n} requests"),
            (None, None) => String::new(),
        };
        let nodes = if self.nodes == 1 {
            "1 node".to_string()
        } else {
            format!("{} nodes", self.nodes)
        };
        let hot = if self.hot_accounts < self.accounts {
            format!(" (hot {})", self.hot_accounts)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "## tally-bench: {load}, {length}, {nodes}, {} accounts{hot}, {} cores\n",
            self.accounts, self.cores
        );
        let _ = writeln!(out, "| metric | value |");
        let _ = writeln!(out, "|---|---|");
        let mut row = |metric: &str, value: String| {
            let _ = writeln!(out, "| {metric} | {value} |");
        };
        row(
            "confirmed / sent",
            format!("{} / {}", self.confirmed, self.sent),
        );
        row(
            "confirmed per second",
            format!(
                "{} (over {:.2} s)",
                thousands(self.confirmed_per_second),
                self.elapsed_seconds
            ),
        );
        row(
            "fraction of bound",
            format!(
                "{:.1}% of {}/s",
                self.fraction_of_bound * 100.0,
                thousands(self.bound.bound_per_second)
            ),
        );
        let l = &self.latency_ms;
        row(
            "fraction of the cached-key figure",
            format!(
                "{:.1}% of {}/s",
                self.fraction_of_cached_key_bound * 100.0,
                thousands(self.bound.cached_key_bound_per_second)
            ),
        );
        row("latency p50", format!("{:.1} ms", l.p50));
        row("latency p90", format!("{:.1} ms", l.p90));
        row("latency p99", format!("{:.1} ms", l.p99));
        row("latency p99.9", format!("{:.1} ms", l.p999));
        row("latency max", format!("{:.1} ms", l.max));
        let b = &self.batches;
        row(
            "batches",
            format!(
                "{} (size mean {:.1}, p50 {}, max {})",
                b.count, b.mean_size, b.p50_size, b.max_size
            ),
        );
        row("rejected", counts(&self.rejected));
        row("errors", counts(&self.errors));
        row(
            &format!(
                "bound: strict verification ({} threads)",
                self.bound.threads
            ),
            format!(
                "{}/s",
                thousands(self.bound.strict_verifications_per_second)
            ),
        );
        row(
            &format!(
                "bound: batch verification ({} per batch)",
                self.bound.batch_size
            ),
            format!("{}/s", thousands(self.bound.batch_verifications_per_second)),
        );
        row(
            "strict / batch with cached keys (not the bound)",
            format!(
                "{}/s / {}/s",
                thousands(self.bound.strict_cached_key_verifications_per_second),
                thousands(self.bound.batch_cached_key_verifications_per_second)
            ),
        );
        row(
            "tally's fast path (hinted batches, cached keys, not the bound)",
            format!(
                "{}/s",
                thousands(self.bound.hinted_batch_verifications_per_second)
            ),
        );
        row(
            "setup (not timed)",
            format!(
                "{:.1} s: {} accounts funded, {} transfers signed ({}){}",
                self.setup_seconds,
                self.accounts,
                thousands(self.presigned as f64),
                match (self.envelope, self.hinted) {
                    (Some(n), _) => format!("in envelopes of {n}"),
                    (None, true) => "with nonce hints".into(),
                    (None, false) => "plain Submit".into(),
                },
                if self.pool_exhausted {
                    " (ran out before the deadline)"
                } else {
                    ""
                }
            ),
        );
        row(
            "funding (not timed)",
            format!(
                "{:.1} s, {}/s",
                self.funding_seconds,
                thousands(self.accounts as f64 / self.funding_seconds.max(1e-9))
            ),
        );
        row(
            "load driver",
            match self.driver {
                Driver::Lean => "lean (raw frames, a writer and a reader per connection)",
                Driver::Library => "the client library (a call per request)",
            }
            .into(),
        );
        if let Some(cache) = self.cache_accounts {
            row(
                "account cache (per replica)",
                format!("{} accounts", thousands(cache as f64)),
            );
        }
        if let (Some(rss), Some(peak)) = (self.server_rss_bytes, self.server_peak_rss_bytes) {
            let replicas = if self.server_memory.len() > 1 {
                format!(", max over {} replicas", self.server_memory.len())
            } else {
                String::new()
            };
            row(
                "server RSS at the end",
                format!("{} (peak {}{replicas})", mib(rss), mib(peak)),
            );
        }
        if let Some(rss) = self.server_rss_after_setup_bytes {
            row("server RSS after funding", mib(rss));
        }
        if let Some(us) = self.server_cpu_us_per_request {
            row(
                "server CPU per request (all replicas, all threads)",
                format!("{us:.1} µs"),
            );
        }
        if let Some(lag) = &self.archive_lag {
            row(
                "archive lag (batches)",
                format!(
                    "p50 {}, p99 {}, max {} ({} samples); caught up {} after the load",
                    lag.p50_batches,
                    lag.p99_batches,
                    lag.max_batches,
                    lag.samples,
                    lag.caught_up_seconds
                        .map_or("not within 120 s".to_string(), |s| format!("{s:.1} s"))
                ),
            );
        }
        if self.rate.is_some() {
            row("late sends (> 10 ms)", self.late_sends.to_string());
        }
        row(
            "sampled confirmations verified",
            if self.sample_failed == 0 {
                self.sample_verified.to_string()
            } else {
                format!(
                    "{} ok, **{} FAILED**",
                    self.sample_verified, self.sample_failed
                )
            },
        );
        out
    }
}

/// `code: n, code: n`, or `0`.
fn counts(map: &BTreeMap<String, u64>) -> String {
    if map.is_empty() {
        return "0".to_string();
    }
    map.iter()
        .map(|(code, n)| format!("{code}: {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Bytes as mebibytes with one decimal: `123.4 MiB`.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// A rate rounded to a whole number, with thousands separated by commas: `12,345`.
pub fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_separators() {
        for (value, text) in [
            (0.0, "0"),
            (999.4, "999"),
            (999.6, "1,000"),
            (12345.0, "12,345"),
            (1234567.0, "1,234,567"),
            (-3.0, "0"),
        ] {
            assert_eq!(thousands(value), text, "{value}");
        }
    }

    pub(crate) fn sample() -> Report {
        Report {
            mode: "closed",
            connections: 4,
            in_flight: 256,
            rate: None,
            duration_seconds: Some(20.0),
            requests: None,
            accounts: 1000,
            nodes: 1,
            cores: 2,
            sent: 1010,
            confirmed: 1000,
            confirmed_per_second: 12_500.0,
            elapsed_seconds: 20.0,
            rejected: BTreeMap::from([("busy".into(), 7), ("insufficient_funds".into(), 1)]),
            errors: BTreeMap::from([("timeout".into(), 2)]),
            latency_ms: Latency {
                p50: 100.0,
                p90: 150.0,
                p99: 200.0,
                p999: 250.0,
                max: 300.0,
                mean: 110.0,
            },
            batches: Batches {
                count: 10,
                mean_size: 100.0,
                p50_size: 100,
                max_size: 120,
            },
            bound: Bound {
                strict_verifications_per_second: 36_000.0,
                batch_verifications_per_second: 100_000.0,
                strict_cached_key_verifications_per_second: 45_000.0,
                batch_cached_key_verifications_per_second: 125_000.0,
                cached_key_bound_per_second: 125_000.0,
                hinted_batch_verifications_per_second: 80_000.0,
                bound_per_second: 100_000.0,
                threads: 2,
                batch_size: 256,
                seconds_each: 1.5,
                rounds: 3,
            },
            fraction_of_bound: 0.125,
            fraction_of_cached_key_bound: 0.1,
            presigned: 1_000_000,
            pool_exhausted: false,
            hinted: true,
            driver: Driver::Lean,
            envelope: None,
            late_sends: 0,
            setup_seconds: 3.25,
            sample_verified: 10,
            sample_failed: 0,
            hot_accounts: 1000,
            cache_accounts: None,
            funding_seconds: 2.5,
            server_rss_bytes: None,
            server_peak_rss_bytes: None,
            server_rss_after_setup_bytes: None,
            server_memory: Vec::new(),
            server_cpu_us_per_request: None,
            archive_lag: None,
        }
    }

    #[test]
    fn markdown_has_every_figure() {
        let text = sample().to_markdown();
        for expected in [
            "closed loop, 4 connections × 256 in flight, 20 s, 1 node",
            "| metric | value |",
            "| confirmed / sent | 1000 / 1010 |",
            "| confirmed per second | 12,500 (over 20.00 s) |",
            "| fraction of bound | 12.5% of 100,000/s |",
            "| latency p50 | 100.0 ms |",
            "| latency p99.9 | 250.0 ms |",
            "| latency max | 300.0 ms |",
            "| batches | 10 (size mean 100.0, p50 100, max 120) |",
            "| rejected | busy: 7, insufficient_funds: 1 |",
            "| errors | timeout: 2 |",
            "| bound: strict verification (2 threads) | 36,000/s |",
            "| bound: batch verification (256 per batch) | 100,000/s |",
            "1,000,000 transfers signed (with nonce hints) |",
            "| fraction of the cached-key figure | 10.0% of 125,000/s |",
            "| strict / batch with cached keys (not the bound) | 45,000/s / 125,000/s |",
            "| tally's fast path (hinted batches, cached keys, not the bound) | 80,000/s |",
        ] {
            assert!(
                text.contains(expected),
                "{expected:?} missing from:\n{text}"
            );
        }
        assert!(
            !text.contains("late sends"),
            "closed loops have no schedule"
        );

        let open = Report {
            mode: "open",
            rate: Some(20_000.0),
            pool_exhausted: true,
            hinted: false,
            sample_failed: 1,
            ..sample()
        }
        .to_markdown();
        assert!(open.contains("open loop at 20,000 req/s over 4 connections"));
        assert!(open.contains("| late sends (> 10 ms) | 0 |"));
        assert!(open.contains("ran out before the deadline"));
        assert!(open.contains("transfers signed (plain Submit)"));
        assert!(open.contains("**1 FAILED**"));
        assert!(!text.contains("server RSS"), "not measured");
        assert!(!text.contains("account cache"), "not known");
        assert!(!text.contains("(hot "), "every account is hot");
        assert!(
            text.contains("| funding (not timed) | 2.5 s, 400/s |"),
            "{text}"
        );

        let large = Report {
            accounts: 1_000_000,
            hot_accounts: 1000,
            cache_accounts: Some(10_000),
            server_rss_bytes: Some(100 * 1024 * 1024),
            server_peak_rss_bytes: Some(300 * 1024 * 1024 + 512 * 1024),
            server_rss_after_setup_bytes: Some(90 * 1024 * 1024),
            archive_lag: None,
            server_memory: vec![ReplicaMemory {
                id: 1,
                rss_bytes: 100 * 1024 * 1024,
                peak_rss_bytes: 300 * 1024 * 1024 + 512 * 1024,
            }],
            ..sample()
        }
        .to_markdown();
        for expected in [
            "1 node, 1000000 accounts (hot 1000), 2 cores",
            "| account cache (per replica) | 10,000 accounts |",
            "| server RSS at the end | 100.0 MiB (peak 300.5 MiB) |",
            "| server RSS after funding | 90.0 MiB |",
        ] {
            assert!(
                large.contains(expected),
                "{expected:?} missing from:\n{large}"
            );
        }
    }

    #[test]
    fn json_has_the_contract_fields() {
        let value = serde_json::to_value(sample()).unwrap();
        for field in [
            "confirmed",
            "confirmed_per_second",
            "rejected",
            "errors",
            "latency_ms",
            "batches",
            "bound",
            "fraction_of_bound",
            "fraction_of_cached_key_bound",
            "connections",
            "in_flight",
            "rate",
            "duration_seconds",
            "requests",
            "accounts",
            "nodes",
            "cores",
            "hot_accounts",
            "cache_accounts",
            "funding_seconds",
            "server_rss_bytes",
            "server_peak_rss_bytes",
            "server_memory",
            "server_cpu_us_per_request",
        ] {
            assert!(value.get(field).is_some(), "{field} missing from {value}");
        }
        assert_eq!(value["rejected"]["busy"], 7);
        assert_eq!(value["latency_ms"]["p999"], 250.0);
        assert_eq!(value["batches"]["p50_size"], 100);
        assert_eq!(value["bound"]["bound_per_second"], 100_000.0);
        assert_eq!(value["fraction_of_bound"], 0.125);
    }
}
