//! The replica engine: every decision a replica makes, sans-IO.
//!
//! A replica is three stages, each a state machine that takes inputs and pushes commands into
//! a `Vec` the caller executes:
//!
//! - [`master::Master`] sequences requests while this replica leads: the exactly-once decision
//!   (through [`crate::sequencer::Sequencer`]), when a batch closes (window, full, idle, shutdown)
//!   and how many may be in flight;
//! - [`replication::Replication`] owns raft-rs (through [`crate::replica::Replica`]): proposals,
//!   the leadership hand-off (the master leads only once the term's first entry is applied),
//!   linearizable reads, what a committed entry becomes, and when the raft log is compacted;
//! - [`apply::Applier`] applies committed batches in log order: skips what is applied, skips a
//!   batch that does not extend the chain (and asks the master to resynchronize), replays the
//!   rest against the ledger, answers resubmissions with their original confirmation.
//!
//! The server runs each stage on its own thread (pipelining: the master seals batch N+1 while
//! raft replicates N and the storage thread writes N-1) and carries the commands across queues;
//! the simulator (`tally-chaos sim`) runs the same three in one thread with a simulated
//! network, disk and clock. Neither runtime decides anything the engine decides.
//!
//! Time enters as numbers: a monotonic `now_ms` for the batch window, and the wall clock for the
//! header only (`Header::time_unix_ms`).

pub mod apply;
pub mod master;
pub mod members;
pub mod replication;

use tally_wire::ErrorCode;

use crate::{Disposition, Error, Rejection, Result};

/// A client waiting for one request of a batch: where the answer goes (`R` is the runtime's
/// handle: a connection in the server, a client number in the simulator).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiter<R> {
    /// The request's position in its batch.
    pub index: u32,
    pub reply: R,
    /// A resubmission of a request already in the batch: its confirmation says `replayed`.
    pub replayed: bool,
}

/// An error met while serving one client's request, settled by [`Error::disposition`]: a
/// deterministic error becomes that client's answer (`Ok`) and the stage goes on; any other comes
/// back as `Err`, and the runtime must stop the replica. Errors met applying a committed batch are
/// never settled here: they always stop the replica (see [`apply::Applier::committed`]).
pub fn answer_or_stop<R>(e: Error, reply: R) -> Result<(R, Rejection)> {
    match e.disposition() {
        Disposition::Reply(code) => Ok((reply, Rejection::new(code, e.to_string()))),
        Disposition::Stop => Err(e),
    }
}

/// Why a replica cannot serve a request now. Every refusal is retryable with the same id: the
/// request was not applied, or its confirmation comes back on the retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// This replica does not lead, or leads but has not caught up (the runtime names the leader
    /// when it knows one: `not_leader`, else `unavailable`).
    NotWritable,
    /// The request's batch was superseded by a leader change and never applied.
    Superseded,
    /// Too many resubmissions wait for their batch.
    Busy,
}

impl Refusal {
    /// The error code a client gets, when the runtime has no better one (`NotWritable` becomes
    /// `not_leader` where a leader is known).
    pub fn code(self) -> ErrorCode {
        match self {
            Refusal::NotWritable | Refusal::Superseded => ErrorCode::Unavailable,
            Refusal::Busy => ErrorCode::Busy,
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Refusal::NotWritable => "this replica does not take writes now",
            Refusal::Superseded => {
                "the request's batch was superseded by a leader change; retry with the same id"
            }
            Refusal::Busy => "too many resubmissions wait for their batch",
        }
    }
}

/// Safety checks a test may switch off to show that the simulator catches their absence
/// (a checker that cannot fail is not a checker). Never set outside tests and `tally-chaos`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlantedBug {
    /// Compact the raft log past the commit index after a snapshot install.
    CompactPastCommit,
    /// Do not release a follower paused for a snapshot whose acknowledgement was lost.
    SnapshotStall,
    /// Serve a linearizable read at once from the applied state, on any replica, without a
    /// read index.
    ReadWithoutReadIndex,
}
