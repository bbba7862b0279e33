//! The integration tests of tally-core, one binary (see matklad, "Delete Cargo Integration
//! Tests"). Each module covers one area through a `check` helper that takes the case as data.

mod batch_verify;
mod batches;
mod common;
mod conservation;
mod divergence;
mod envelopes;
mod errors;
mod golden;
mod golden_replication;
mod history;
mod ledger;
mod mem_raft_log;
mod merkle;
mod rotation;
mod script;
mod signing;
mod state;
mod stateless;
mod threshold_apply;
mod tlog;
mod two_phase;
mod two_phase_model;
