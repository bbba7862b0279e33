//! tally-chaos: a chaos monkey for tally clusters, in two modes.
//!
//! - `live` ([`live`]): real `tally-server` processes on 127.0.0.1, every replica link through
//!   a proxy the harness cuts ([`proxy`], [`cluster`]), concurrent clients with client-chosen
//!   ids ([`load`]), seeded faults ([`faults`]): SIGKILL, SIGSTOP, SIGTERM, partitions
//!   (isolation, splits, one-way cuts) and client connections dropped between a request and its
//!   answer. At the end everything is healed and the invariants are judged ([`verdict`]) on
//!   every replica; [`report`] prints them and [`svg`] draws the run.
//! - `sim` ([`sim`]): an in-process cluster of `tally_core::replica::Replica`s with sequencer,
//!   batch replay and in-memory stores, over a simulated network and clock where every choice
//!   (loss, delay, duplication, partitions, crashes, restarts) comes from one seed, so any
//!   failing seed replays exactly.
//!
//! The invariants (both modes): balances are conserved; every confirmed request is applied
//! exactly once, refused ones never, indeterminate ones at most once; retries with the same id
//! are never applied twice; all replicas end with the same height, state and header chain;
//! every confirmation verifies against a signed header of the final chain; there are never two
//! signed headers for one height; the height a client observes never goes backwards.
//!
//! Caveats:
//! - Errors are `anyhow` throughout: this crate is a harness whose errors are only reported.
//! - Forced leader transfers are not injected: the server has no client-facing trigger.
//! - Live runs depend on timing: the fault schedule replays from the seed, but which replica
//!   leads when a fault fires, and so the run itself, does not. Simulated runs replay exactly.
//! - The simulation models the server's replication glue (leadership hand-off, epochs,
//!   skipped batches, replays) in [`sim`]; a change there must be mirrored by hand. It differs
//!   from the server in one place on purpose: a leader treats a heartbeat response as the end
//!   of a snapshot send, without which a lost snapshot acknowledgement stalls that follower
//!   until the next election (`sim --inject-bug server-snapshot-stall` replays the server's
//!   behaviour).
//! - Linearizable reads that a replica answers as stale (it knows no leader) are counted apart
//!   and left out of the height checks: the reply says so.

pub mod cli;
pub mod cluster;
pub mod faults;
pub mod history;
pub mod live;
pub mod load;
pub mod proxy;
pub mod report;
pub mod sim;
pub mod svg;
pub mod verdict;
