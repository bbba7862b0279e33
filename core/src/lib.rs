//! tally-core: the deterministic, sans-IO heart of tally.
//!
//! - [`validate`]: stateless checks (chain id, deposit keys, strict Ed25519).
//! - [`sequencer`]: the master's authoritative checks and speculative apply; seals batches.
//! - [`archive`]: the archive's object names and encodings, and the checks a reader makes.
//! - [`snapshot`]: state snapshots in the archive: rows, chunks, manifests, deltas.
//! - [`rules`]: what an operation does to balances, judged and replayed alike.
//! - [`batch`]: batch bodies (requests and envelopes), replaying a committed batch into one
//!   durable write.
//! - [`merkle`]: RFC 6962 trees (rs_merkle) and proof verification.
//! - [`crypto`]: hashes, header signing, request signatures.
//! - [`state`]: the ledger summary and its state digest.
//! - [`state_map`]: the authenticated map of accounts and reserves the state digest commits to.
//! - [`threshold`]: FROST (RFC 9591) threshold signing of headers: dealing, the two rounds,
//!   aggregation.
//! - [`tlog`]: the archive's C2SP tlog-tiles log of signed headers, checkpoints, signed notes.
//! - [`history`]: per-account history entries and running counters derived from a batch body.
//! - [`key_chain`]: operator key rotation: which key signs which header, and the proof of it.
//! - [`ports`]: the storage traits this crate needs, and an in-memory store for tests.
//! - [`verify`]: offline verification of confirmations.
//! - [`replica`]: the sans-IO Raft driver around raft-rs's `RawNode`, and the raft log port.
//! - [`engine`]: the replica engine: the master, replication and apply stages, every decision
//!   a replica makes; the server and the simulator are runtimes around it.
//!
//! Core never touches sockets, threads, clocks or files: callers pass time in and carry results
//! out. The same committed batches give the same bytes on every replica.
//!
//! Caveats: the state map is held in memory (see [`state_map`]); the account cache in
//! [`sequencer`] evicts in map order.

pub mod archive;
pub mod batch;
pub mod crypto;
pub mod engine;
mod error;
pub mod header_log;
pub mod history;
pub mod key_chain;
pub mod merkle;
pub mod ports;
pub mod replica;
pub mod reserve;
pub mod rules;
pub mod sequencer;
pub mod signing;
pub mod snapshot;
pub mod state;
pub mod state_map;
pub mod threshold;
pub mod tlog;
pub mod validate;
pub mod verify;
pub mod witness;

pub use error::{Disposition, Error, Rejection, Result};
