//! `tally-chaos sim`: the invariants against an in-process cluster over a simulated network
//! and clock, deterministic per seed.
//!
//! Each seed draws a cluster (3 or 5 replicas), its tuning (batch window and size, in-flight
//! bound, compaction threshold) and its network (loss, duplication, delay; random delays
//! reorder), then runs clients and faults (crashes and restarts, isolation, splits, one-way
//! cuts) for `steps` ticks, heals, resolves every unknown outcome and checks (see
//! [`world`]): the same ledger on every replica; a contiguous, linked, signed chain; no request
//! applied twice; every confirmed request in the final chain where its confirmation says, every
//! refused one absent; balances equal to the model and conserved; never two signed headers for
//! one height; heights a client observes never going backwards. A panic counts as a failure.
//!
//! A tenth of the clients' writes are envelopes of 2 to 8 operations from one account, atomic
//! or not, retried with the same bytes like requests; the checks above cover their operations,
//! and [`crate::envelopes`] adds its own: an atomic envelope all applied (consecutively) or not
//! at all, an independent one all in the chain or none of it, failed operations moving nothing.
//!
//! Some of the other writes are two-phase operations ([`crate::two_phase`], one to an
//! envelope), with timeouts of a few batch windows or of seconds on the simulated clock (which
//! is the batches' time), so reserves expire during partitions and leader changes too;
//! [`crate::reserves`] checks them from the final chain's bodies, compares the reserves left
//! open with every replica's store, and hands what they moved to the balance model.
//!
//! Replay: everything comes from the seed, including each replica's election timeouts (drawn
//! here and handed to `Replica::set_election_timeout_ticks`, since raft-rs draws its own from a
//! thread-local generator no seed reaches), so `--seeds 17..18` reruns seed 17 exactly.
//!
//! Cost: confirmations are verified without the request signature (the harness signed the
//! requests itself) and each distinct header's signature once.

mod log;
mod node;
mod world;

use std::fmt::Write as _;
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::Serialize;
use tally_wire::Hash;

use crate::reserves::ReserveCounts;

pub use log::SimLog;

/// A deliberately broken component, to show that the checks catch it, or a behaviour of the
/// server that the simulation otherwise corrects, to replay what it leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimBug {
    /// The leader confirms a batch as soon as it proposes it, before it is committed.
    ConfirmBeforeCommit,
    /// As the server's raft thread did until tally-chaos found it: compact the log to the
    /// applied raft index even when that is past the log's commit (after installing a newer
    /// ledger than the snapshot named), which panics the raft thread.
    ServerCompactsPastCommit,
    /// As the server: never report a snapshot as finished, so a lost acknowledgement of an
    /// installed snapshot pauses that follower until the next election.
    ServerSnapshotStall,
    /// The engine's replication stage serves linearizable reads from the applied state as soon
    /// as it leads, without a read index (`engine::PlantedBug::ReadWithoutReadIndex`).
    ReadWithoutReadIndex,
}

impl SimBug {
    pub const NAMES: &'static [(&'static str, SimBug)] = &[
        ("confirm-before-commit", SimBug::ConfirmBeforeCommit),
        (
            "server-compacts-past-commit",
            SimBug::ServerCompactsPastCommit,
        ),
        ("server-snapshot-stall", SimBug::ServerSnapshotStall),
        ("read-without-read-index", SimBug::ReadWithoutReadIndex),
    ];

    pub fn parse(text: &str) -> Result<SimBug> {
        match SimBug::NAMES.iter().find(|(name, _)| *name == text) {
            Some((_, bug)) => Ok(*bug),
            None => {
                let names: Vec<&str> = SimBug::NAMES.iter().map(|(n, _)| *n).collect();
                bail!("unknown bug {text:?}; known: {}", names.join(", "))
            }
        }
    }

    pub fn name(self) -> &'static str {
        SimBug::NAMES
            .iter()
            .find(|(_, b)| *b == self)
            .map(|(n, _)| *n)
            .expect("every bug has a name")
    }
}

#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Steps (10 ms ticks) of load and faults before the heal.
    pub steps: u64,
    pub bug: Option<SimBug>,
    /// One line per seed on stderr.
    pub verbose: bool,
}

impl Default for SimOptions {
    fn default() -> SimOptions {
        SimOptions {
            steps: 3000,
            bug: None,
            verbose: false,
        }
    }
}

/// The settings of one simulated cluster (drawn from the seed).
#[derive(Debug, Clone)]
pub struct Tuning {
    pub chain_id: Hash,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    pub batch_window_ms: u64,
    pub batch_requests_max: u32,
    pub in_flight_max: u64,
    pub compaction_entries: u64,
    pub bug: Option<SimBug>,
}

/// What happened in one seed (summed over seeds in a summary).
#[derive(Debug, Clone, Default, Serialize)]
pub struct SimStats {
    pub nodes: u64,
    pub steps: u64,
    pub height: u64,
    pub confirmed: u64,
    pub resolved_applied: u64,
    pub rejected: u64,
    pub resolved_not_applied: u64,
    pub confirmations: u64,
    /// Envelopes sent, envelopes in the final chain, and failed operations (of independent
    /// envelopes) among theirs.
    pub envelopes: u64,
    pub envelopes_applied: u64,
    pub envelope_ops_failed: u64,
    /// Two-phase operations sent (one-operation envelopes), and what the final chains did.
    pub two_phase: u64,
    pub reserves: ReserveCounts,
    pub reads: u64,
    pub attempts: u64,
    pub elections: u64,
    pub crashes: u64,
    pub restarts: u64,
    pub partitions: u64,
    pub snapshots_installed: u64,
    /// Replicas replaced: a new one added as a learner, promoted, and an old voter removed.
    pub replacements: u64,
    pub fatal_stops: u64,
    pub messages: u64,
    pub messages_dropped: u64,
    pub messages_duplicated: u64,
    /// Requests refused as `insufficient_funds` (or another "final" code) on a retry while an
    /// earlier copy was still in flight, and applied after all.
    pub refused_then_applied: u64,
    /// The first such request, described.
    #[serde(skip)]
    pub refused_then_applied_example: Option<(u64, String)>,
    pub violations: u64,
    #[serde(skip)]
    pub last_fatal: Option<String>,
}

impl SimStats {
    fn add(&mut self, o: &SimStats) {
        self.nodes += o.nodes;
        self.steps += o.steps;
        self.height += o.height;
        self.confirmed += o.confirmed;
        self.resolved_applied += o.resolved_applied;
        self.rejected += o.rejected;
        self.resolved_not_applied += o.resolved_not_applied;
        self.confirmations += o.confirmations;
        self.envelopes += o.envelopes;
        self.envelopes_applied += o.envelopes_applied;
        self.envelope_ops_failed += o.envelope_ops_failed;
        self.two_phase += o.two_phase;
        self.reserves.add(&o.reserves);
        self.replacements += o.replacements;
        self.reads += o.reads;
        self.attempts += o.attempts;
        self.elections += o.elections;
        self.crashes += o.crashes;
        self.restarts += o.restarts;
        self.partitions += o.partitions;
        self.snapshots_installed += o.snapshots_installed;
        self.fatal_stops += o.fatal_stops;
        self.messages += o.messages;
        self.messages_dropped += o.messages_dropped;
        self.messages_duplicated += o.messages_duplicated;
        self.refused_then_applied += o.refused_then_applied;
        if self.refused_then_applied_example.is_none() {
            self.refused_then_applied_example = o.refused_then_applied_example.clone();
        }
        self.violations += o.violations;
    }
}

/// The result of one seed.
#[derive(Debug, Clone, Serialize)]
pub struct SeedOutcome {
    pub seed: u64,
    pub violations: Vec<String>,
    pub stats: SimStats,
    /// SHA-256 chained over every event the run delivered, in order (zeros after a panic).
    #[serde(skip)]
    pub event_digest: Hash,
}

impl SeedOutcome {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Runs one seed. A panic inside the simulation is caught and reported as a violation.
pub fn run_seed(seed: u64, opts: &SimOptions) -> SeedOutcome {
    let result = catch_unwind(AssertUnwindSafe(|| {
        world::World::new(seed, opts).run(opts.steps)
    }));
    match result {
        Ok((violations, mut stats, event_digest)) => {
            if let Some((_, text)) = stats.refused_then_applied_example.take() {
                stats.refused_then_applied_example = Some((seed, text));
            }
            SeedOutcome {
                seed,
                violations,
                stats,
                event_digest,
            }
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic".into());
            SeedOutcome {
                seed,
                violations: vec![format!("panicked: {what}")],
                stats: SimStats::default(),
                event_digest: [0; 32],
            }
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SimSummary {
    pub seeds: u64,
    pub failed: Vec<SeedOutcome>,
    pub totals: SimStats,
    #[serde(skip)]
    pub elapsed: Duration,
}

/// Runs every seed in `seeds` on `threads` threads.
pub fn run_seeds(seeds: Range<u64>, opts: &SimOptions, threads: usize) -> SimSummary {
    let started = Instant::now();
    let next = AtomicU64::new(seeds.start);
    let results: Mutex<Vec<SeedOutcome>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::SeqCst);
                if seed >= seeds.end {
                    return;
                }
                let outcome = run_seed(seed, opts);
                if opts.verbose {
                    eprintln!(
                        "seed {seed}: {} ({} replicas, height {}, {} confirmed, {} crashes, {} \
                         partitions, {} elections, {} snapshots)",
                        if outcome.ok() { "ok" } else { "FAILED" },
                        outcome.stats.nodes,
                        outcome.stats.height,
                        outcome.stats.confirmed + outcome.stats.resolved_applied,
                        outcome.stats.crashes,
                        outcome.stats.partitions,
                        outcome.stats.elections,
                        outcome.stats.snapshots_installed
                    );
                }
                results
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(outcome);
            });
        }
    });
    let mut all = results.into_inner().unwrap_or_else(|e| e.into_inner());
    all.sort_by_key(|o| o.seed);
    let mut totals = SimStats::default();
    for o in &all {
        totals.add(&o.stats);
    }
    SimSummary {
        seeds: all.len() as u64,
        failed: all.into_iter().filter(|o| !o.ok()).collect(),
        totals,
        elapsed: started.elapsed(),
    }
}

impl SimSummary {
    pub fn to_text(&self, seeds: &Range<u64>, opts: &SimOptions) -> String {
        let mut w = String::new();
        let t = &self.totals;
        let _ = writeln!(
            w,
            "tally-chaos sim: seeds {}..{} ({} runs of {} steps{}) in {:.1} s",
            seeds.start,
            seeds.end,
            self.seeds,
            opts.steps,
            match opts.bug {
                Some(b) => format!(", INJECTED BUG {}", b.name()),
                None => String::new(),
            },
            self.elapsed.as_secs_f64()
        );
        let _ = writeln!(
            w,
            "  totals: {} batches, {} operations confirmed ({} after an unknown outcome), {} \
             refused ({} at the final resolution), {} reads, {} elections, {} crashes, {} \
             restarts, {} partitions, {} snapshots installed, {} replicas replaced, {} replica \
             stops",
            t.height,
            t.confirmed + t.resolved_applied,
            t.resolved_applied,
            t.rejected + t.resolved_not_applied,
            t.resolved_not_applied,
            t.reads,
            t.elections,
            t.crashes,
            t.restarts,
            t.partitions,
            t.snapshots_installed,
            t.replacements,
            t.fatal_stops
        );
        let _ = writeln!(
            w,
            "  envelopes: {} sent, {} applied, {} of their operations failed (independent \
             envelopes)",
            t.envelopes, t.envelopes_applied, t.envelope_ops_failed
        );
        write_two_phase(&mut w, t);
        let _ = writeln!(
            w,
            "  network: {} packets, {} dropped, {} duplicated",
            t.messages, t.messages_dropped, t.messages_duplicated
        );
        if t.refused_then_applied > 0 {
            let _ = writeln!(
                w,
                "  note: {} requests were refused with a \"final\" code on a retry while an \
                 earlier copy was in flight, and applied after all",
                t.refused_then_applied
            );
            if let Some((seed, example)) = &t.refused_then_applied_example {
                let _ = writeln!(w, "    e.g. seed {seed}: {example}");
            }
        }
        self.write_result(&mut w, opts);
        w
    }
    /// The result line, and each failed seed (the first 20) with how to replay it.
    fn write_result(&self, w: &mut String, opts: &SimOptions) {
        if self.failed.is_empty() {
            let _ = writeln!(w, "result: OK, every seed held every invariant");
        } else {
            let _ = writeln!(w, "result: FAILED on {} seeds", self.failed.len());
            for f in self.failed.iter().take(20) {
                let _ = writeln!(
                    w,
                    "  seed {} (replay: tally-chaos sim --seeds {}..{} --steps {}{}):",
                    f.seed,
                    f.seed,
                    f.seed + 1,
                    opts.steps,
                    match opts.bug {
                        Some(b) => format!(" --inject-bug {}", b.name()),
                        None => String::new(),
                    }
                );
                for v in f.violations.iter().take(5) {
                    let _ = writeln!(w, "    {v}");
                }
                if f.violations.len() > 5 {
                    let _ = writeln!(w, "    ... and {} more", f.violations.len() - 5);
                }
            }
        }
    }
}

/// The two-phase line of a summary: what was sent, how the final chains' reserves ended, and
/// the refusals by code.
fn write_two_phase(w: &mut String, t: &SimStats) {
    let r = &t.reserves;
    let refused: Vec<String> = r.refused.iter().map(|(c, n)| format!("{n} {c}")).collect();
    let _ = writeln!(
        w,
        "  two-phase: {} sent; in the final chains {} reserves, {} posted ({} partly, {} by \
         the party), {} voided, {} renewed, {} expired ({} under a newer leader); refused: {}",
        t.two_phase,
        r.reserves,
        r.posted,
        r.posted_partly,
        r.posted_by_party,
        r.voided,
        r.renewed,
        r.expired,
        r.expired_under_new_leader,
        refused.join(", ")
    );
}
