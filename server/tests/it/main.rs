//! End-to-end tests of the real `tally-server` binary over TLS on 127.0.0.1.

mod archive;
mod attack;
mod bad_input;
mod balance_proofs;
mod cluster;
mod cluster_harness;
mod consistency;
mod envelopes;
mod explorer;
mod harness;
mod history;
mod key_rotation;
mod layering;
mod membership;
mod metrics;
mod rotation_archive;
mod single_node;
mod threshold;
mod two_phase;
