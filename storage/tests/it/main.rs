//! The integration tests of tally-storage, in one binary.

mod archive;
mod corrupt;
mod crash;
mod history;
mod ledger;
mod leveldb;
mod raft_cluster;
mod raft_crash;
mod raft_log;
mod raft_model;
mod reserves;
mod support;
mod transfer;
