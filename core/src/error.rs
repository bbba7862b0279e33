//! The error type of tally-core.

use tally_wire::{ErrorCode, WireError};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, phrased as what the caller must do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing durable state failed. Not deterministic: the node must stop rather than
    /// go on with state that other replicas do not share.
    #[error("storage failed: {0}")]
    Storage(String),
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

impl Error {
    /// Deterministic errors come out the same on every replica for the same input; the others
    /// (IO) must never be allowed to make one replica's state differ from another's.
    pub fn is_deterministic(&self) -> bool {
        matches!(self, Error::Verify(_) | Error::Wire(_))
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
