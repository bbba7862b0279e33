//! The error type of tally-core, and the one place that decides what an error means for a
//! replica ([`Error::disposition`]).

use std::fmt;

use tally_wire::{ErrorCode, WireError};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, phrased as what the caller must do about it. Every variant but `Verify`
/// and `Wire` is environmental: see [`Error::disposition`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// Reading or writing durable state failed: a database, a file, a directory, a fetch.
    #[error("storage failed: {what}: {message}")]
    Io { what: String, message: String },
    /// Stored bytes (or a ledger dump) that do not decode, exceed their limits or do not check
    /// out against what they must agree with.
    #[error("storage is corrupt: {what}")]
    Corrupt { what: String },
    /// A row that must exist is absent.
    #[error("storage is missing {what}")]
    Missing { what: String },
    /// A thread or channel this work depends on is gone.
    #[error("{what} has stopped")]
    Stopped { what: String },
    /// Storage or raft was opened with settings that do not fit what is on disk (raft's own
    /// config, the voters a raft log was created for, a directory that must be empty).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A committed batch does not replay to the state its header claims. Replicas would diverge:
    /// the node must stop.
    #[error("state diverged from the committed batch: {0}")]
    Diverged(String),
    /// A proof, signature or chain link does not check out (offline verification).
    #[error("verification failed: {0}")]
    Verify(String),
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// What an error means for the replica that meets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Deterministic: the same input fails alike on every replica. The client whose request
    /// met it is answered with this code, and the replica goes on.
    Reply(ErrorCode),
    /// Environmental (IO, corrupt or missing storage, a stopped thread, bad configuration,
    /// divergence): the replica stops rather than go on with state the others may not share.
    /// Restarting recovers from disk.
    Stop,
}

impl Error {
    /// The one place that decides what an error means: answered or fatal.
    pub fn disposition(&self) -> Disposition {
        match self {
            Error::Wire(e) => Disposition::Reply(e.code()),
            Error::Verify(_) => Disposition::Reply(ErrorCode::MalformedRequest),
            Error::Io { .. }
            | Error::Corrupt { .. }
            | Error::Missing { .. }
            | Error::Stopped { .. }
            | Error::Config(_)
            | Error::Diverged(_) => Disposition::Stop,
        }
    }

    /// Deterministic errors come out the same on every replica for the same input; the others
    /// (IO) must never be allowed to make one replica's state differ from another's.
    pub fn is_deterministic(&self) -> bool {
        matches!(self.disposition(), Disposition::Reply(_))
    }

    /// `what` (an action: "reading the ledger") failed with `e`.
    pub fn io(what: impl fmt::Display, e: impl fmt::Display) -> Error {
        Error::Io {
            what: what.to_string(),
            message: e.to_string(),
        }
    }

    pub fn corrupt(what: impl fmt::Display) -> Error {
        Error::Corrupt {
            what: what.to_string(),
        }
    }

    pub fn missing(what: impl fmt::Display) -> Error {
        Error::Missing {
            what: what.to_string(),
        }
    }

    /// `what` (a thread or a peer: "the storage thread") has stopped.
    pub fn stopped(what: impl fmt::Display) -> Error {
        Error::Stopped {
            what: what.to_string(),
        }
    }
}

/// A request refused by validation or sequencing: answered to the client, never fatal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: ErrorCode,
    pub message: String,
}

impl Rejection {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Rejection {
        Rejection {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}
