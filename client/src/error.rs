//! The error type of tally-client.

use std::path::PathBuf;

use tally_wire::{ErrorReply, Retry};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, phrased as what the caller must do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A local file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The profile does not parse or holds an invalid value: fix the file.
    #[error("profile {}: {message}", path.display())]
    Profile { path: PathBuf, message: String },
    /// A key file is not a PKCS#8 PEM Ed25519 private key.
    #[error("key file {}: {message}", path.display())]
    Key { path: PathBuf, message: String },
    /// Refused to overwrite a file that already exists (keys are never clobbered).
    #[error("{} already exists; refusing to overwrite it", path.display())]
    AlreadyExists { path: PathBuf },
    /// An argument (a hex key, an id) is malformed.
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    /// TLS could not be set up or the handshake failed (wrong CA, wrong server name, ...).
    #[error("TLS: {0}")]
    Tls(String),
    /// The TCP connection could not be opened.
    #[error("cannot connect to {address}: {source}")]
    Connect {
        address: String,
        #[source]
        source: std::io::Error,
    },
    /// The connection closed before the answer arrived. The request may or may not have been
    /// applied: resubmit the same request (same id) to find out; it never applies twice.
    #[error("the connection to the server was lost")]
    Disconnected,
    /// No answer within the client's timeout. As with [`Error::Disconnected`], the request may
    /// have been applied: resubmit it with the same id.
    #[error("no answer from the server within the timeout")]
    Timeout,
    /// The server refused the request with a stable error code.
    #[error("rejected: {}", describe_reply(.0))]
    Rejected(ErrorReply),
    /// The server answered with something this client cannot accept (a reply of the wrong type,
    /// a malformed payload, a confirmation for another request).
    #[error("protocol violation by the server: {0}")]
    Protocol(String),
    /// A confirmation or header does not verify, or a confirmation file is malformed or has been
    /// edited.
    #[error("verification failed: {0}")]
    Verify(String),
    /// The operator signed two histories: two different headers of one height (or two
    /// checkpoints of one size with different roots). Both are saved under `evidence`; trust
    /// nothing this operator says until it is explained.
    #[error(
        "SPLIT VIEW: the operator signed two different histories at height {height}; both \
         are saved as evidence in {}",
        evidence.display()
    )]
    SplitView { height: u64, evidence: PathBuf },
    /// A [`crate::ClusterClient`] had no usable connection and `queue_max` operations were
    /// already waiting for one. Nothing was sent: retry later or shed load.
    #[error(
        "no connection to the cluster and {queue_max} operations already wait for one \
         (queue_max); nothing was sent"
    )]
    QueueFull { queue_max: usize },
    /// A [`crate::ClusterClient`] submit gave up (total timeout, or the wait queue filled while it
    /// was retrying) after at least one attempt may have reached a replica. The request may or
    /// may not have been applied: resubmit the *same* request (same id) to find out; it never
    /// applies twice.
    #[error(
        "outcome unknown: gave up after {elapsed_ms} ms and {attempts} attempt(s); the request \
         may or may not have been applied, resubmit it with the same id to find out \
         (last error: {last})"
    )]
    Indeterminate {
        attempts: u32,
        elapsed_ms: u64,
        last: Box<Error>,
    },
    /// An atomic envelope applied nothing: its operation `failed_index` could not apply (or an
    /// operation of any envelope broke a rule, such as a used id).
    #[error("envelope refused at operation {}: {}: {}", .0.failed_index, .0.code, .0.message)]
    EnvelopeFailed(tally_wire::EnvelopeFailed),
    /// A [`crate::ClusterClient`] operation gave up within its total timeout without an answer.
    /// For a submit this means no attempt was ever sent, so nothing was applied.
    #[error("{}", describe_gave_up(*.attempts, *.elapsed_ms, .last))]
    GaveUp {
        attempts: u32,
        elapsed_ms: u64,
        last: Box<Error>,
    },
}

impl Error {
    /// A stable, machine-readable name: the server's code name for a rejection, else a name for
    /// the local failure (used in the CLI's JSON errors).
    pub fn code_name(&self) -> &'static str {
        match self {
            Error::Io { .. } => "io",
            Error::Profile { .. } => "bad_profile",
            Error::Key { .. } => "bad_key_file",
            Error::AlreadyExists { .. } => "already_exists",
            Error::Invalid { .. } => "invalid_argument",
            Error::Tls(_) => "tls",
            Error::Connect { .. } => "connect_failed",
            Error::Disconnected => "disconnected",
            Error::Timeout => "timeout",
            Error::Rejected(reply) => reply.code.name(),
            Error::EnvelopeFailed(f) => f.code.name(),
            Error::Protocol(_) => "protocol_violation",
            Error::Verify(_) => "verification_failed",
            Error::SplitView { .. } => "split_view",
            Error::QueueFull { .. } => "queue_full",
            Error::Indeterminate { .. } => "indeterminate",
            Error::GaveUp { .. } => "gave_up",
        }
    }

    /// Whether retrying the same request can succeed, where that is known.
    pub fn retry(&self) -> Option<Retry> {
        match self {
            Error::Rejected(reply) => Some(reply.retry),
            Error::EnvelopeFailed(f) => Some(f.code.retry()),
            // The outcome is unknown; resubmitting the same request is safe and tells.
            Error::Disconnected
            | Error::Timeout
            | Error::Connect { .. }
            | Error::QueueFull { .. }
            | Error::Indeterminate { .. }
            | Error::GaveUp { .. } => Some(Retry::Later),
            _ => None,
        }
    }

    /// True when a submit's outcome is unknown: it may or may not have been applied, and only a
    /// resubmission of the same request (same id) tells. Every other error from a submit means
    /// it was not applied by that call.
    pub fn outcome_unknown(&self) -> bool {
        matches!(
            self,
            Error::Indeterminate { .. } | Error::Timeout | Error::Disconnected
        )
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// The name of a retry class, as the CLI prints it.
pub fn retry_name(retry: Retry) -> &'static str {
    match retry {
        Retry::Never => "never",
        Retry::Later => "later",
        Retry::Elsewhere => "elsewhere",
    }
}

fn describe_reply(reply: &ErrorReply) -> String {
    let mut text = format!("{}: {}", reply.code, reply.message);
    if !reply.leader_hint.is_empty() {
        text.push_str(&format!(" (leader: {})", reply.leader_hint));
    }
    text.push_str(&format!(" [retry {}]", retry_name(reply.retry)));
    text
}

fn describe_gave_up(attempts: u32, elapsed_ms: u64, last: &Error) -> String {
    if attempts == 0 {
        format!(
            "gave up after {elapsed_ms} ms without reaching a replica; nothing was sent \
             (last error: {last})"
        )
    } else {
        format!("gave up after {elapsed_ms} ms and {attempts} attempt(s) (last error: {last})")
    }
}
