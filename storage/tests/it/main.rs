//! The integration tests of tally-storage, in one binary.

mod corrupt;
mod crash;
mod ledger;
mod support;
