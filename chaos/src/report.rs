//! The report of a live run: what was injected, what happened to every operation, which
//! invariants held, failover times and throughput over time. Printed as text and written as
//! JSON (`--json`); [`crate::svg`] draws it.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::history::percentile;
use crate::load::{History, OpState};

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub mode: &'static str,
    pub seed: u64,
    pub nodes: u64,
    pub clients: usize,
    pub accounts: usize,
    /// Length of the load phase (faults included), seconds.
    pub duration_s: f64,
    pub faults_enabled: Vec<String>,
    /// Requested fault kinds the harness cannot inject, with the reason.
    pub unsupported_faults: Vec<String>,
    pub injected_bug: Option<String>,
    pub faults_by_kind: BTreeMap<String, u64>,
    pub fault_log: Vec<FaultEvent>,
    pub leader_disruptions: u64,
    pub ops: OpsSummary,
    pub client_library: ClientLibrary,
    pub invariants: Vec<Invariant>,
    pub failover: Failover,
    /// One entry per second of the run.
    pub throughput: Vec<Second>,
    pub final_height: u64,
    pub archive: ArchiveSummary,
    /// The total-loss ending, when the run had one (`--total-loss`).
    pub total_loss: Option<TotalLoss>,
    /// Every `replace` fault: its steps and how the removed replica ended.
    pub replacements: Vec<crate::membership::Replacement>,
    /// The replicas that were members at the end (the ones judged).
    pub members_at_end: Vec<u64>,
    /// Where the replicas' data and logs are, when they were kept.
    pub data_dir: Option<String>,
    pub ok: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct FaultEvent {
    pub at_ms: u64,
    pub healed_at_ms: u64,
    pub kind: String,
    pub targets: Vec<u64>,
    pub disrupts_leader: bool,
    /// The leader (id, term) when the fault was applied.
    pub leader: Option<(u64, u64)>,
    pub detail: String,
}

/// The archive the replicas wrote.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ArchiveSummary {
    /// An `s3://` URL or a local directory.
    pub url: String,
    /// Whether the replicas reached the store through the harness's proxy (archive outages).
    pub proxied: bool,
    /// `archive.max_lag_batches` of every replica.
    pub max_lag_batches: u64,
}

/// What the total-loss ending did (its verdicts are among the invariants).
#[derive(Debug, Clone, Default, Serialize)]
pub struct TotalLoss {
    /// The archive's height once it had caught up with the applied ledger, before the loss.
    pub archive_height: u64,
    /// From the end of the verdict to the archive catching up.
    pub catch_up_ms: u64,
    /// Replicas restored from the archive (all of them, unless a restore failed).
    pub restored: u64,
    /// The slowest `tally-server restore`.
    pub restore_ms_max: u64,
    /// Acknowledged requests resubmitted to the restored cluster.
    pub replays_checked: u64,
    /// The archive's height at the very end (a new write after the restore adds one).
    pub final_archive_height: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct OpsSummary {
    pub total: u64,
    /// Applied, with a confirmation in hand (first try or resolved).
    pub confirmed: u64,
    pub confirmed_transfers: u64,
    pub confirmed_withdrawals: u64,
    pub deposits: u64,
    /// Confirmations flagged `replayed` (a resubmission answered with the original).
    pub replayed: u64,
    pub rejected_by_code: BTreeMap<String, u64>,
    pub not_sent: u64,
    /// Operations whose outcome was unknown at some point.
    pub indeterminate: u64,
    pub resolved_applied_during_run: u64,
    pub resolved_applied_at_end: u64,
    pub resolved_not_applied_at_end: u64,
    pub unresolved: u64,
    pub linearizable_reads: u64,
    /// Linearizable reads answered as stale (by a replica that knew no leader).
    pub reads_downgraded: u64,
    pub headers_observed: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ClientLibrary {
    pub operations: u64,
    pub attempts: u64,
    pub redirects: u64,
    pub reconnects: u64,
    pub connect_failures: u64,
    pub backoffs: u64,
    pub indeterminate: u64,
    pub gave_up: u64,
    /// Connections the client proxies closed between a request and its answer.
    pub answers_dropped: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Invariant {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Failover {
    /// Leader disruptions followed by a confirmation from a newer term.
    pub count: u64,
    pub p50_ms: u64,
    pub p99_ms: u64,
    pub max_ms: u64,
    /// Leader disruptions never followed by such a confirmation.
    pub unrecovered: u64,
    pub samples_ms: Vec<u64>,
    /// The samples of the disruptions that began while no other fault was under way (every
    /// other replica up and reachable): the failover the replicas decide alone. One that began
    /// while another replica was down or cut off may have had no majority left until that
    /// healed, and measures the healing as much as the election.
    pub alone_count: u64,
    pub alone_p50_ms: u64,
    pub alone_p99_ms: u64,
    pub alone_max_ms: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Second {
    pub second: u64,
    pub confirmed: u64,
    pub p99_latency_ms: u64,
}

impl Report {
    pub fn invariant(&self, name: &str) -> Option<&Invariant> {
        self.invariants.iter().find(|i| i.name == name)
    }

    pub fn failed_invariants(&self) -> Vec<&'static str> {
        self.invariants
            .iter()
            .filter(|i| !i.ok)
            .map(|i| i.name)
            .collect()
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report serializes")
    }

    /// The text report.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let w = &mut out;
        let _ = writeln!(
            w,
            "tally-chaos live: seed {}, {} replicas, {} clients over {} accounts, {:.0} s of load",
            self.seed, self.nodes, self.clients, self.accounts, self.duration_s
        );
        let _ = writeln!(
            w,
            "  faults enabled: {}",
            if self.faults_enabled.is_empty() {
                "none".to_string()
            } else {
                self.faults_enabled.join(",")
            }
        );
        let _ = writeln!(
            w,
            "  archive: {} (lag bound {} batches{})",
            self.archive.url,
            self.archive.max_lag_batches,
            if self.archive.proxied {
                ", the store behind the harness's proxy"
            } else {
                ""
            }
        );
        for u in &self.unsupported_faults {
            let _ = writeln!(w, "  unsupported, skipped: {u}");
        }
        if let Some(bug) = &self.injected_bug {
            let _ = writeln!(w, "  INJECTED BUG: {bug}");
        }
        let total: u64 = self.faults_by_kind.values().sum();
        let _ = writeln!(
            w,
            "faults injected: {total} ({} disrupted the leader)",
            self.leader_disruptions
        );
        for (kind, n) in &self.faults_by_kind {
            let _ = writeln!(w, "  {kind:<42} {n:>5}");
        }
        let o = &self.ops;
        let _ = writeln!(
            w,
            "operations: {} ({} confirmed: {} transfers, {} withdrawals, {} deposits; {} \
             answered as replays)",
            o.total,
            o.confirmed,
            o.confirmed_transfers,
            o.confirmed_withdrawals,
            o.deposits,
            o.replayed
        );
        let rejected: Vec<String> = o
            .rejected_by_code
            .iter()
            .map(|(c, n)| format!("{c} {n}"))
            .collect();
        let _ = writeln!(
            w,
            "  rejected: {}",
            if rejected.is_empty() {
                "none".to_string()
            } else {
                rejected.join(", ")
            }
        );
        let _ = writeln!(
            w,
            "  indeterminate: {} (applied, found by a retry during the run: {}; resolved at the \
             end: {} applied, {} not applied; unresolved: {}); never sent: {}",
            o.indeterminate,
            o.resolved_applied_during_run,
            o.resolved_applied_at_end,
            o.resolved_not_applied_at_end,
            o.unresolved,
            o.not_sent
        );
        let _ = writeln!(
            w,
            "  linearizable reads: {} (and {} answered as stale by a replica that knew no \
             leader, not counted); signed headers observed: {}",
            o.linearizable_reads, o.reads_downgraded, o.headers_observed
        );
        let c = &self.client_library;
        let _ = writeln!(
            w,
            "client library: {} attempts for {} operations, {} redirects, {} reconnects, {} \
             failed connects, {} backoffs, {} indeterminate, {} gave up; {} answers dropped by \
             the client proxies",
            c.attempts,
            c.operations,
            c.redirects,
            c.reconnects,
            c.connect_failures,
            c.backoffs,
            c.indeterminate,
            c.gave_up,
            c.answers_dropped
        );
        let f = &self.failover;
        let _ = writeln!(
            w,
            "failover (leader disruption → first confirmation from a newer term): {} samples, \
             p50 {} ms, p99 {} ms, max {} ms; {} without a newer-term confirmation; {} began \
             with no other fault under way: p50 {} ms, p99 {} ms, max {} ms",
            f.count,
            f.p50_ms,
            f.p99_ms,
            f.max_ms,
            f.unrecovered,
            f.alone_count,
            f.alone_p50_ms,
            f.alone_p99_ms,
            f.alone_max_ms
        );
        let counts: Vec<u64> = self.throughput.iter().map(|s| s.confirmed).collect();
        if !counts.is_empty() {
            let sum: u64 = counts.iter().sum();
            let mut sorted = counts.clone();
            sorted.sort_unstable();
            let _ = writeln!(
                w,
                "throughput: mean {:.0}/s, median {}/s, min {}/s, max {}/s over {} s; seconds \
                 with no confirmation: {}",
                sum as f64 / counts.len() as f64,
                percentile(&sorted, 50.0),
                sorted[0],
                sorted[sorted.len() - 1],
                counts.len(),
                counts.iter().filter(|&&c| c == 0).count()
            );
            let _ = writeln!(w, "  per 10 s: {}", per_ten_seconds(&self.throughput));
        }
        let _ = writeln!(w, "final height: {}", self.final_height);
        if !self.replacements.is_empty() {
            let done = self.replacements.iter().filter(|r| r.completed).count();
            let _ = writeln!(
                w,
                "replacements: {done} completed of {}; members at the end {:?}",
                self.replacements.len(),
                self.members_at_end
            );
            for e in self
                .fault_log
                .iter()
                .filter(|e| e.kind.starts_with("replace"))
            {
                let _ = writeln!(w, "  +{} ms: {}", e.at_ms, e.detail);
            }
        }
        if let Some(t) = &self.total_loss {
            let _ = writeln!(
                w,
                "total loss: the archive caught up at height {} in {} ms; every replica killed \
                 and wiped, {} restored from the archive (slowest {} ms); {} acknowledged \
                 requests resubmitted; archive height at the end {}",
                t.archive_height,
                t.catch_up_ms,
                t.restored,
                t.restore_ms_max,
                t.replays_checked,
                t.final_archive_height
            );
        }
        let _ = writeln!(w, "invariants:");
        for i in &self.invariants {
            let _ = writeln!(
                w,
                "  {} {:<36} {}",
                if i.ok { "ok  " } else { "FAIL" },
                i.name,
                i.detail
            );
        }
        if self.ok {
            let _ = writeln!(w, "result: OK");
        } else {
            let _ = writeln!(
                w,
                "result: FAILED ({})",
                self.failed_invariants().join(", ")
            );
        }
        if let Some(dir) = &self.data_dir {
            let _ = writeln!(w, "replica data directories and logs kept in {dir}");
        }
        out
    }
}

fn per_ten_seconds(seconds: &[Second]) -> String {
    seconds
        .chunks(10)
        .map(|c| c.iter().map(|s| s.confirmed).sum::<u64>().to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Counts operations by outcome. `load_end_ms` separates resolutions during the run from those
/// after it.
pub fn summarize_ops(h: &History, load_end_ms: u64) -> OpsSummary {
    use crate::history::Effect;
    let mut s = OpsSummary {
        total: h.ops.len() as u64,
        linearizable_reads: h.reads,
        reads_downgraded: h.reads_downgraded,
        headers_observed: h.headers.observations,
        ..OpsSummary::default()
    };
    for op in &h.ops {
        if op.retried {
            s.indeterminate += 1;
        }
        if let Some(c) = op.state.confirmed() {
            s.confirmed += 1;
            if c.replayed {
                s.replayed += 1;
            }
            match op.effect {
                Effect::Deposit { .. } => s.deposits += 1,
                Effect::Transfer { .. } => s.confirmed_transfers += 1,
                Effect::Withdraw { .. } => s.confirmed_withdrawals += 1,
                // Two-phase operations travel in envelopes only.
                Effect::TwoPhase => {}
            }
        }
        match &op.state {
            OpState::Rejected(code) => {
                *s.rejected_by_code
                    .entry(code.name().to_string())
                    .or_default() += 1
            }
            OpState::NotSent => s.not_sent += 1,
            OpState::ResolvedApplied(c) if c.at_ms <= load_end_ms => {
                s.resolved_applied_during_run += 1
            }
            OpState::ResolvedApplied(_) => s.resolved_applied_at_end += 1,
            OpState::ResolvedNotApplied(_) => s.resolved_not_applied_at_end += 1,
            OpState::Unresolved(_) | OpState::Indeterminate(_) | OpState::InFlight => {
                s.unresolved += 1
            }
            OpState::Confirmed(_) => {}
        }
    }
    s
}

/// Confirmations per second and the p99 latency of first-try confirmations in each second.
pub fn throughput(h: &History, seconds: u64) -> Vec<Second> {
    let mut counts = vec![0u64; seconds as usize + 1];
    let mut latencies: Vec<Vec<u64>> = vec![Vec::new(); seconds as usize + 1];
    for op in &h.ops {
        if op.client == usize::MAX {
            continue;
        }
        let Some(c) = op.state.confirmed() else {
            continue;
        };
        let s = (c.at_ms / 1000) as usize;
        if s < counts.len() {
            counts[s] += 1;
            if let OpState::Confirmed(_) = op.state {
                latencies[s].push(c.latency_ms);
            }
        }
    }
    counts
        .into_iter()
        .zip(latencies)
        .enumerate()
        .map(|(second, (confirmed, mut l))| {
            l.sort_unstable();
            Second {
                second: second as u64,
                confirmed,
                p99_latency_ms: percentile(&l, 99.0),
            }
        })
        .collect()
}

/// For each leader disruption, the time to the first confirmation sealed in a newer term.
pub fn failover(h: &History, faults: &[FaultEvent]) -> Failover {
    let mut confirmations: Vec<(u64, u64)> = h
        .ops
        .iter()
        .filter_map(|o| o.state.confirmed())
        .map(|c| (c.at_ms, c.term))
        .collect();
    confirmations.sort_unstable();
    let (mut samples, mut alone) = (Vec::new(), Vec::new());
    let mut unrecovered = 0;
    for (i, f) in faults.iter().enumerate().filter(|(_, f)| f.disrupts_leader) {
        let Some((_, term)) = f.leader else {
            continue;
        };
        match confirmations
            .iter()
            .find(|&&(at, t)| at >= f.at_ms && t > term)
        {
            Some(&(at, _)) => {
                samples.push(at - f.at_ms);
                if !overlapped(i, faults) {
                    alone.push(at - f.at_ms);
                }
            }
            None => unrecovered += 1,
        }
    }
    let mut sorted = samples.clone();
    sorted.sort_unstable();
    alone.sort_unstable();
    Failover {
        count: samples.len() as u64,
        p50_ms: percentile(&sorted, 50.0),
        p99_ms: percentile(&sorted, 99.0),
        max_ms: sorted.last().copied().unwrap_or(0),
        unrecovered,
        samples_ms: samples,
        alone_count: alone.len() as u64,
        alone_p50_ms: percentile(&alone, 50.0),
        alone_p99_ms: percentile(&alone, 99.0),
        alone_max_ms: alone.last().copied().unwrap_or(0),
    }
}

/// Whether another fault was under way when fault `i` began.
fn overlapped(i: usize, faults: &[FaultEvent]) -> bool {
    let at = faults[i].at_ms;
    faults
        .iter()
        .enumerate()
        .any(|(j, g)| j != i && g.at_ms <= at && g.healed_at_ms > at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(at_ms: u64, healed_at_ms: u64, kind: &str) -> FaultEvent {
        FaultEvent {
            at_ms,
            healed_at_ms,
            kind: kind.into(),
            targets: vec![1],
            disrupts_leader: kind == "kill-leader",
            leader: Some((1, 1)),
            detail: String::new(),
        }
    }

    #[test]
    fn a_disruption_overlaps_only_a_fault_under_way_when_it_began() {
        let faults = [
            fault(0, 2_000, "kill-backup"),
            fault(1_000, 3_000, "kill-leader"),
            fault(2_000, 2_500, "kill-leader"),
            fault(5_000, 6_000, "kill-leader"),
        ];
        // Began while the backup was down; began while the second was under way (the backup
        // healed at exactly 2,000); began alone.
        assert!(overlapped(1, &faults));
        assert!(overlapped(2, &faults));
        assert!(!overlapped(3, &faults));
        assert!(!overlapped(0, &faults));
    }
}
