//! What the server does with an error it cannot go on from, and the wall clock. The one place
//! where the replica stops (exit 70) rather than risk state other replicas do not share.

use std::time::{SystemTime, UNIX_EPOCH};

use tally_core::{Disposition, Error as CoreError};

use crate::channels::ReplyTo;

/// The runtime's rule for an error met in the apply path while a client waits for the answer,
/// as [`tally_core::Error::disposition`] decides: a deterministic error answers that client
/// with its code and the node goes on; any other stops the node ([`fatal`]).
pub fn on_error(what: &str, e: CoreError, reply: ReplyTo) {
    match e.disposition() {
        Disposition::Reply(code) => reply.error(code, format!("{what}: {e}")),
        Disposition::Stop => fatal(what, &e),
    }
}

/// Stops the node: state on disk may be ahead of or behind what we hold in memory, and going on
/// could let this replica diverge. Restarting recovers from disk. For errors with no client to
/// answer: those the engine returns (it answers deterministic ones itself,
/// `tally_core::engine::answer_or_stop`), and any error applying a committed batch, which
/// stops the node whatever its disposition.
pub fn fatal(what: &str, e: &CoreError) -> ! {
    tracing::error!("fatal: {what}: {e}; stopping the node");
    eprintln!("tally-server: fatal: {what}: {e}; stopping the node");
    std::process::exit(70)
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
