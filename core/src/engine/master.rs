//! The master stage: sequencing while this replica leads.
//!
//! It takes requests that passed the stateless and snapshot stages, judges each against the
//! speculative state (the [`Sequencer`]), keeps the open batch's waiters, and decides when the
//! batch closes. A batch closes when it is full, when `window_ms` passed since its first
//! request, at shutdown, or (group commit, `close_idle`) as soon as no batch is replicating or
//! being applied, unless requests are still on their way through validation: then it waits for
//! them for at most a fifth of the window. At most `in_flight_max` sealed batches may be ahead
//! of the applied height (a shutdown seals regardless).

use std::sync::Arc;

use tally_wire::{Envelope, Hash, Request};

use crate::batch::BatchBody;
use crate::crypto::request_hash;
use crate::ports::{LedgerRead, RequestRecord};
use crate::sequencer::{Sequencer, SequencerConfig, Submitted};
use crate::state::LedgerMeta;
use crate::state_map::StateMap;
use crate::{Rejection, Result};
use tally_wire::ErrorCode;

use super::{answer_or_stop, Refusal, Waiter};

/// How long an idle close waits for requests still in validation: this fraction of the window.
pub const IDLE_WAIT_WINDOW_FRACTION: u64 = 5;
/// Idle closes come at most once per this fraction of the window after the last seal (10 ms
/// of the default 100). A lone request on a quiet operator still closes its batch at once; a
/// steady load gets batches of at least this long's requests instead of one per apply (every
/// ~6 ms at 22,000/s, 130 requests each), whose per-batch costs (synced writes, the archive's
/// history rows per account and batch, archive objects) doubled the CPU per request until the
/// archive fell behind and the lag bound stalled the pipeline for seconds: at 22,000/s p99
/// 4.9-7.3 s before, 146-1,373 ms after, three runs each (`tally-bench --start-server
/// --duration 60s --rate 22000`, docs/PERFORMANCE.md).
pub const IDLE_SPACING_WINDOW_FRACTION: u64 = 10;

#[derive(Debug, Clone)]
pub struct MasterConfig {
    pub sequencer: SequencerConfig,
    pub window_ms: u64,
    /// Close a batch as soon as none is in flight (group commit).
    pub close_idle: bool,
    /// Sealed batches allowed ahead of the applied height.
    pub in_flight_max: u64,
}

/// Why a batch closed; the `reason` label of `tally_batches_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchClose {
    /// `batch_window_ms` passed since the batch's first request.
    Window,
    /// It reached `batch_requests_max`.
    Full,
    /// The node is shutting down and sealed what it had.
    Shutdown,
    /// No batch was replicating or being applied (`batch_close_idle`, group commit).
    Idle,
}

impl BatchClose {
    pub const ALL: [BatchClose; 4] = [
        BatchClose::Window,
        BatchClose::Full,
        BatchClose::Shutdown,
        BatchClose::Idle,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BatchClose::Window => "window",
            BatchClose::Full => "full",
            BatchClose::Shutdown => "shutdown",
            BatchClose::Idle => "idle",
        }
    }
}

/// Commands of the master stage.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per batch, moved: boxing buys nothing
pub enum MasterOut<R> {
    /// Propose this sealed batch (to [`super::replication::Replication::propose`]).
    Propose {
        body: BatchBody,
        waiters: Vec<Waiter<R>>,
        /// The sequencer's state map after the batch (for
        /// [`super::replication::Replication::propose`]).
        sealed: StateMap,
        epoch: u64,
        close: BatchClose,
        /// How long the batch was open, in ms.
        open_ms: u64,
    },
    /// Answer with the original confirmation once the batch at `height` is applied (to
    /// [`super::apply::Applier::replay`]).
    Replay {
        height: u64,
        index: u32,
        request_hash: tally_wire::Hash,
        reply: R,
    },
    Refuse(R, Refusal),
    /// A deterministic refusal of the request itself.
    Reject(R, Rejection),
    /// An atomic envelope applied nothing: its operation `index` failed.
    Fail(R, u32, Rejection),
}

/// What the runtime knows at a poll: times, the applied height and the queues before the master.
#[derive(Debug, Clone, Copy)]
pub struct Poll {
    /// Monotonic milliseconds (any origin).
    pub now_ms: u64,
    /// Wall clock, for the header of a batch sealed now.
    pub unix_ms: u64,
    pub applied_height: u64,
    /// No request waits in validation or in the master's own queue.
    pub upstream_empty: bool,
    /// The node is stopping and nothing more will come: seal what is open.
    pub stopping: bool,
}

struct Leading {
    sequencer: Sequencer,
    term: u64,
    epoch: u64,
}

impl Leading {
    /// Tells the sequencer what is applied (never beyond what it sealed).
    fn catch_up(&mut self, p: &Poll) {
        let applied = p.applied_height.min(self.sequencer.sealed_height());
        self.sequencer.applied(applied);
    }

    /// Sealed batches not yet applied.
    fn in_flight(&self, applied_height: u64) -> u64 {
        self.sequencer
            .sealed_height()
            .saturating_sub(applied_height)
    }
}

pub struct Master<R> {
    cfg: MasterConfig,
    leading: Option<Leading>,
    open: Vec<Waiter<R>>,
    /// The admin waiting for the open batch's rotation.
    rotation_waiter: Option<R>,
    opened_at: Option<u64>,
    /// When the last batch was sealed (monotonic ms), for the idle closes' spacing.
    sealed_at: Option<u64>,
}

impl<R> Master<R> {
    pub fn new(cfg: MasterConfig) -> Master<R> {
        assert!(
            cfg.in_flight_max >= 1,
            "at least one batch must be able to fly"
        );
        Master {
            cfg,
            leading: None,
            open: Vec::new(),
            rotation_waiter: None,
            opened_at: None,
            sealed_at: None,
        }
    }

    /// Sequence from `meta`, the applied state once the term's first entry is applied.
    pub fn lead(&mut self, term: u64, epoch: u64, meta: LedgerMeta, out: &mut Vec<MasterOut<R>>) {
        self.void_open(out);
        let sequencer = Sequencer::new(self.cfg.sequencer.clone(), meta);
        self.leading = Some(Leading {
            sequencer,
            term,
            epoch,
        });
    }

    /// Stop sequencing: the open batch's requests are refused (retryable).
    pub fn follow(&mut self, out: &mut Vec<MasterOut<R>>) {
        self.void_open(out);
        self.leading = None;
    }

    fn void_open(&mut self, out: &mut Vec<MasterOut<R>>) {
        out.extend(
            self.open
                .drain(..)
                .map(|w| MasterOut::Refuse(w.reply, Refusal::NotWritable)),
        );
        if let Some(reply) = self.rotation_waiter.take() {
            out.push(MasterOut::Refuse(reply, Refusal::NotWritable));
        }
        self.opened_at = None;
    }

    pub fn is_leading(&self) -> bool {
        self.leading.is_some()
    }

    /// The open batch takes no more requests: the runtime stops taking them (backpressure).
    pub fn is_full(&self) -> bool {
        self.leading.as_ref().is_some_and(|l| l.sequencer.is_full())
    }

    pub fn open_len(&self) -> usize {
        self.leading.as_ref().map_or(0, |l| l.sequencer.open_len())
    }

    /// Account lookups the sequencer's cache answered since the last call.
    pub fn take_cache_hits(&mut self) -> u64 {
        self.leading
            .as_mut()
            .map_or(0, |l| l.sequencer.take_cache_hits())
    }

    /// Judges one request. `snapshot_height` is the applied height the snapshot stage checked
    /// it against. A deterministic error from the store is the client's answer; an `Err` is
    /// environmental (a failed read): the replica must stop ([`answer_or_stop`]).
    pub fn submit(
        &mut self,
        request: Request,
        snapshot_height: u64,
        reply: R,
        p: &Poll,
        store: &mut impl LedgerRead,
        out: &mut Vec<MasterOut<R>>,
    ) -> Result<()> {
        let rh = request_hash(&request);
        self.sequence(reply, rh, p, out, |seq| {
            seq.submit_hashed(request, rh, snapshot_height, p.unix_ms, store)
        })
    }

    /// Judges one envelope (`hash` its SHA-256) as [`Master::submit`] a request.
    #[allow(clippy::too_many_arguments)]
    pub fn submit_envelope(
        &mut self,
        envelope: Arc<Envelope>,
        hash: Hash,
        snapshot_height: u64,
        reply: R,
        p: &Poll,
        store: &mut impl LedgerRead,
        out: &mut Vec<MasterOut<R>>,
    ) -> Result<()> {
        let n = envelope.ops.len() as u32;
        if let Some(l) = self.leading.as_ref() {
            let max = l.sequencer.batch_requests_max();
            if n > max {
                let why = format!("the envelope's {n} operations exceed the {max} of one batch");
                out.push(MasterOut::Reject(
                    reply,
                    Rejection::new(ErrorCode::MalformedRequest, why),
                ));
                return Ok(());
            }
            // An envelope is never split: the open batch closes first to make room.
            if !l.sequencer.fits(n) && !self.seal(p, BatchClose::Full, out) {
                out.push(MasterOut::Refuse(reply, Refusal::Busy));
                return Ok(());
            }
        }
        self.sequence(reply, hash, p, out, |seq| {
            seq.submit_envelope(envelope, hash, snapshot_height, p.unix_ms, store)
        })
    }

    /// Hands what was submitted to the sequencer (`submit`) and settles its waiter.
    fn sequence(
        &mut self,
        reply: R,
        hash: Hash,
        p: &Poll,
        out: &mut Vec<MasterOut<R>>,
        submit: impl FnOnce(&mut Sequencer) -> Result<Submitted>,
    ) -> Result<()> {
        let Some(l) = self.leading.as_mut() else {
            out.push(MasterOut::Refuse(reply, Refusal::NotWritable));
            return Ok(());
        };
        l.catch_up(p);
        if l.sequencer.is_full() {
            out.push(MasterOut::Refuse(reply, Refusal::Busy));
            return Ok(());
        }
        let open_height = l.sequencer.sealed_height() + 1;
        let submitted = match submit(&mut l.sequencer) {
            Ok(submitted) => submitted,
            Err(e) => {
                let (reply, r) = answer_or_stop(e, reply)?;
                out.push(MasterOut::Reject(reply, r));
                return Ok(());
            }
        };
        match submitted {
            Submitted::Accepted { index, .. } => {
                self.opened_at.get_or_insert(p.now_ms);
                self.open.push(Waiter {
                    index,
                    reply,
                    replayed: false,
                });
            }
            Submitted::InFlight { height, index } if height == open_height => {
                self.open.push(Waiter {
                    index,
                    reply,
                    replayed: true,
                });
            }
            // Sealed earlier: the applier answers it once that batch is applied.
            Submitted::InFlight { height, index }
            | Submitted::Applied(RequestRecord { height, index, .. }) => {
                out.push(MasterOut::Replay {
                    height,
                    index,
                    request_hash: hash,
                    reply,
                });
            }
            Submitted::Rejected(r) => out.push(MasterOut::Reject(reply, r)),
            Submitted::Failed { index, rejection } => {
                out.push(MasterOut::Fail(reply, index, rejection))
            }
        }
        Ok(())
    }

    /// With no batch open, opens one for the reserves whose deadline the clock has reached, if
    /// any (an idle leader's expiries); [`Master::poll`] then closes it by the usual rules. An
    /// `Err` is a failed read: the replica must stop.
    pub fn expire(&mut self, p: &Poll, store: &mut impl LedgerRead) -> Result<()> {
        let Some(l) = self.leading.as_mut() else {
            return Ok(());
        };
        if self.opened_at.is_some() || l.sequencer.expiry_hint() > p.unix_ms {
            return Ok(());
        }
        l.catch_up(p);
        l.sequencer.open_batch(p.unix_ms, 0, store)?;
        if l.sequencer.open_len() > 0 {
            self.opened_at = Some(p.now_ms);
        }
        Ok(())
    }

    /// An admin's key rotation (PROTOCOL.md §4.14): opens a batch if none is open and makes it
    /// name `new_key`; the batch then closes by the usual rules, and `reply` is answered with
    /// the rotation's key link once it is applied. Refused to `reply` when this replica does
    /// not lead, the key signs already, the ledger has had as many rotations as a chain holds,
    /// or the open batch is full. An `Err` is a failed read: the replica must stop.
    pub fn rotate(
        &mut self,
        new_key: tally_wire::PublicKey,
        reply: R,
        p: &Poll,
        store: &mut impl LedgerRead,
        out: &mut Vec<MasterOut<R>>,
    ) -> Result<()> {
        let Some(l) = self.leading.as_mut() else {
            out.push(MasterOut::Refuse(reply, Refusal::NotWritable));
            return Ok(());
        };
        l.catch_up(p);
        l.sequencer.open_batch(p.unix_ms, 1, store)?;
        if let Err(r) = l.sequencer.rotate(new_key) {
            out.push(MasterOut::Reject(reply, r));
            return Ok(());
        }
        if let Some(earlier) = self.rotation_waiter.replace(reply) {
            let why = "a later rotation in the same batch replaced this one";
            out.push(MasterOut::Reject(
                earlier,
                Rejection::new(ErrorCode::Busy, why),
            ));
        }
        self.opened_at.get_or_insert(p.now_ms);
        Ok(())
    }

    /// Seals the open batch if it is due and the in-flight bound allows; returns whether it did.
    pub fn poll(&mut self, p: &Poll, out: &mut Vec<MasterOut<R>>) -> bool {
        match self.due(p) {
            Some(close) => self.seal(p, close, out),
            None => false,
        }
    }

    /// Seals the open batch now, if it has anything and the in-flight bound allows (a shutdown
    /// seals regardless); returns whether it did.
    fn seal(&mut self, p: &Poll, close: BatchClose, out: &mut Vec<MasterOut<R>>) -> bool {
        let Some(l) = self.leading.as_mut() else {
            return false;
        };
        if l.in_flight(p.applied_height) >= self.cfg.in_flight_max && !p.stopping {
            return false;
        }
        let open_ms = self.opened_at.map_or(0, |t| p.now_ms.saturating_sub(t));
        self.opened_at = None;
        let Some(body) = l.sequencer.seal(l.term) else {
            assert!(self.open.is_empty(), "waiters without requests");
            return false;
        };
        self.sealed_at = Some(p.now_ms);
        let mut waiters = std::mem::take(&mut self.open);
        let leaves = body.leaf_count();
        if let Some(reply) = self.rotation_waiter.take() {
            waiters.push(Waiter {
                index: leaves as u32 - 1,
                reply,
                replayed: false,
            });
        }
        assert!(
            waiters.iter().all(|w| (w.index as usize) < leaves),
            "a waiter outside its batch"
        );
        out.push(MasterOut::Propose {
            body,
            waiters,
            sealed: l.sequencer.meta().map.clone(),
            epoch: l.epoch,
            close,
            open_ms,
        });
        true
    }

    /// Whether the open batch should close now, and why.
    fn due(&mut self, p: &Poll) -> Option<BatchClose> {
        let spaced = self.idle_spacing_end().is_none_or(|end| p.now_ms >= end);
        let l = self.leading.as_mut()?;
        l.catch_up(p);
        let in_flight = l.in_flight(p.applied_height);
        let open_for = self.opened_at.map(|t| p.now_ms.saturating_sub(t));
        let window_over = open_for.is_some_and(|ms| ms >= self.cfg.window_ms);
        let idle = self.cfg.close_idle
            && in_flight == 0
            && spaced
            && open_for.is_some_and(|ms| {
                p.upstream_empty || ms >= self.cfg.window_ms / IDLE_WAIT_WINDOW_FRACTION
            });
        let close = if l.sequencer.is_full() {
            BatchClose::Full
        } else if window_over {
            BatchClose::Window
        } else if idle {
            BatchClose::Idle
        } else if p.stopping {
            BatchClose::Shutdown
        } else {
            return None;
        };
        (in_flight < self.cfg.in_flight_max || p.stopping).then_some(close)
    }

    /// When the runtime must poll again at the latest (monotonic ms): if a batch is open, the
    /// end of an idle close's wait while it is ahead, then the end of the window; if none is,
    /// the earliest reserve deadline (by the wall clock `unix_ms`) while leading. None while
    /// the in-flight bound holds a batch back: nothing can seal before an apply, and the
    /// runtime polls after each (a deadline already past would have it spin until then).
    pub fn next_poll_ms(&self, now_ms: u64, unix_ms: u64, applied_height: u64) -> Option<u64> {
        let leading = self.leading.as_ref()?;
        let Some(t) = self.opened_at else {
            let hint = leading.sequencer.expiry_hint();
            return (hint != u64::MAX).then(|| now_ms + hint.saturating_sub(unix_ms));
        };
        if leading.in_flight(applied_height) >= self.cfg.in_flight_max {
            return None;
        }
        let mut next = t + self.cfg.window_ms;
        if self.cfg.close_idle {
            let idle_wait = t + self.cfg.window_ms / IDLE_WAIT_WINDOW_FRACTION;
            for at in [Some(idle_wait), self.idle_spacing_end()]
                .into_iter()
                .flatten()
            {
                if at > now_ms {
                    next = next.min(at);
                }
            }
        }
        Some(next)
    }

    /// The earliest an idle close may come (see [`IDLE_SPACING_WINDOW_FRACTION`]).
    fn idle_spacing_end(&self) -> Option<u64> {
        let spacing = self.cfg.window_ms / IDLE_SPACING_WINDOW_FRACTION;
        self.sealed_at.map(|t| t + spacing)
    }
}

/// What the snapshot stage decides for a request, from the applied state: the request record
/// under its (signer, id), if any, and the signer's balance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Precheck {
    /// On to the master, which decides against the speculative state.
    Pass,
    /// Applied already: answer with the original confirmation.
    Replay(RequestRecord),
    Reject(Rejection),
}

/// The snapshot stage's rule for an envelope, from the records of its operations' keys in
/// order: the envelope applied already (its first operation's record names it) is replayed; an
/// operation under a used id fails the envelope (`id_conflict`, with its index); otherwise on
/// to the master (balances are the master's to judge).
pub fn precheck_envelope(
    hash: &Hash,
    records: &[Option<RequestRecord>],
) -> std::result::Result<Precheck, (u32, Rejection)> {
    match records.iter().position(Option::is_some) {
        None => Ok(Precheck::Pass),
        Some(0) if records[0].as_ref().is_some_and(|r| &r.request_hash == hash) => {
            Ok(Precheck::Replay(records[0].expect("present")))
        }
        Some(i) => Err((
            i as u32,
            Rejection::new(
                ErrorCode::IdConflict,
                "this id was already used by this signer for a different request",
            ),
        )),
    }
}

/// The snapshot stage's rule: a request already applied is replayed (or, under another
/// request's id, refused `id_conflict`); a debit from an unknown account or beyond the balance
/// as of the applied state is refused. Everything else is left to the master.
pub fn precheck(
    request: &Request,
    record: Option<RequestRecord>,
    balance: Option<u64>,
) -> Precheck {
    use tally_wire::{ErrorCode, Op};
    if let Some(record) = record {
        return if record.request_hash == request_hash(request) {
            Precheck::Replay(record)
        } else {
            Precheck::Reject(Rejection::new(
                ErrorCode::IdConflict,
                "this id was already used by this signer for a different request",
            ))
        };
    }
    if request.op == Op::Deposit {
        return Precheck::Pass;
    }
    match balance {
        None => Precheck::Reject(Rejection::new(
            ErrorCode::UnknownAccount,
            "the account does not exist (as of the latest applied batch)",
        )),
        Some(b) if b < request.amount => Precheck::Reject(Rejection::new(
            ErrorCode::InsufficientFunds,
            format!(
                "balance {b} is less than {} (as of the latest applied batch)",
                request.amount
            ),
        )),
        Some(_) => Precheck::Pass,
    }
}
