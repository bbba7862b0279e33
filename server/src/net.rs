//! The client listener: TLS over TCP, one tokio task per connection reading frames and one
//! writing answers, with many requests in flight matched by correlation id.
//!
//! Limits (decided in `limits.rs`, applied here):
//! - connections: `connections_max` open, `connections_per_address_max` from one address; a
//!   connection beyond either is closed at once. `accept` failing for want of descriptors
//!   pauses the listener for [`ACCEPT_PAUSE_MS`].
//! - memory: each request reserves its largest reply before it is handled, from its
//!   connection's budget (`reply_bytes_per_connection_max`: when spent the reader stops reading,
//!   which pushes back through TCP) and from the server's (`reply_bytes_total_max`: when spent
//!   the request is answered `busy`); `requests_in_flight_per_connection_max` likewise. The
//!   reservation is returned once the reply was written. The read buffer holds at most one
//!   frame and one read.
//! - time: deadlines for the TLS handshake, for the first request after it, for each whole
//!   frame from its first byte, for an idle connection, and for each reply to be written (a
//!   client that does not read is closed).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tally_wire::{decode_frame, Decoded, ErrorCode, ErrorReply, Message, ReadMode, WireError};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::channels::RaftEvent;
use crate::channels::{Job, Outgoing, ReplyTo, StorageCmd, Submission};
use crate::limits::{
    is_out_of_descriptors, reply_bytes_bound, AddressLimit, HandshakeRate, ReplyBudget, Reserved,
    SpareDescriptors, ACCEPT_PAUSE_MS, SMALL_REPLY_BYTES_MAX,
};
use crate::metrics::Metrics;
use crate::pipeline::{self, PipelineHandle};
use crate::rate_log;
use crate::ratelog::{RateLog, RATE_LOG_INTERVAL_MS};
use std::sync::atomic::{AtomicBool, Ordering};

/// Bytes a connection's writer gathers before handing them to TLS (each flush sends sooner).
const WRITE_BUFFER_BYTES: usize = 64 * 1024;
/// Bytes the reader asks the socket for at a time (the buffer grows only for a larger frame).
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// How long a closing connection waits for answers still in the pipeline.
const CLOSE_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// What a client whose request met a spent server reply budget is told to wait.
const REPLY_BUDGET_RETRY_MS: u32 = 100;

static REFUSED_LOG: RateLog = RateLog::new(RATE_LOG_INTERVAL_MS);
static ACCEPT_LOG: RateLog = RateLog::new(RATE_LOG_INTERVAL_MS);
static HANDSHAKE_LOG: RateLog = RateLog::new(RATE_LOG_INTERVAL_MS);
static DEADLINE_LOG: RateLog = RateLog::new(RATE_LOG_INTERVAL_MS);
static BUDGET_LOG: RateLog = RateLog::new(RATE_LOG_INTERVAL_MS);

#[derive(Clone, Debug)]
pub struct NetLimits {
    pub connections_max: usize,
    pub connections_per_address_max: usize,
    pub handshakes_per_address_per_second: u32,
    pub in_flight_max: usize,
    pub frame_bytes_max: u32,
    pub reply_bytes_per_connection_max: usize,
    pub reply_bytes_total_max: usize,
    pub handshake_timeout: Duration,
    pub first_request_timeout: Duration,
    pub frame_timeout: Duration,
    pub idle_timeout: Duration,
    pub write_timeout: Duration,
    pub envelopes_in_flight_max: usize,
}

/// What every connection of one listener shares.
struct Shared {
    acceptor: TlsAcceptor,
    pipeline: PipelineHandle,
    limits: NetLimits,
    connections: Arc<Semaphore>,
    addresses: Arc<AddressLimit>,
    handshake_rate: HandshakeRate,
    reply_bytes: Arc<Semaphore>,
    /// `limits.envelopes_in_flight_max`: envelopes between arrival and sequencing.
    envelopes: Arc<Semaphore>,
}

/// Accepts connections until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    pipeline: PipelineHandle,
    limits: NetLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let shared = Arc::new(Shared {
        acceptor,
        pipeline,
        connections: Arc::new(Semaphore::new(limits.connections_max)),
        addresses: AddressLimit::new(limits.connections_per_address_max),
        handshake_rate: HandshakeRate::new(limits.handshakes_per_address_per_second),
        reply_bytes: Arc::new(Semaphore::new(limits.reply_bytes_total_max)),
        envelopes: Arc::new(Semaphore::new(limits.envelopes_in_flight_max)),
        limits,
    });
    let mut spares = SpareDescriptors::new();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => admit(&shared, stream, peer, &shutdown),
                Err(e) if is_out_of_descriptors(&e) => {
                    rate_log!(ACCEPT_LOG, warn, "accept failed ({e}); pausing accepts for {ACCEPT_PAUSE_MS} ms");
                    spares.release();
                    tokio::time::sleep(Duration::from_millis(ACCEPT_PAUSE_MS)).await;
                    while !spares.refill() && !*shutdown.borrow() {
                        tokio::time::sleep(Duration::from_millis(ACCEPT_PAUSE_MS)).await;
                    }
                }
                Err(e) => rate_log!(ACCEPT_LOG, debug, "accept failed: {e}"),
            },
        }
    }
}

/// Starts a connection's task, or closes the connection at once when its address or the
/// listener is at its limit (before the TLS handshake: a refused connection costs no signature).
fn admit(
    shared: &Arc<Shared>,
    stream: TcpStream,
    peer: std::net::SocketAddr,
    shutdown: &watch::Receiver<bool>,
) {
    let metrics = &shared.pipeline.metrics;
    if !shared
        .handshake_rate
        .try_take(peer.ip(), std::time::Instant::now())
    {
        rate_log!(REFUSED_LOG, info, %peer, "connection refused: limits.handshakes_per_address_per_second reached");
        metrics.connections.rate_limited_total.inc();
        return;
    }
    let Some(slot) = shared.addresses.try_enter(peer.ip()) else {
        rate_log!(REFUSED_LOG, info, %peer, "connection refused: limits.connections_per_address_max reached");
        metrics.connections.refused_total.inc();
        return;
    };
    let Ok(permit) = shared.connections.clone().try_acquire_owned() else {
        rate_log!(REFUSED_LOG, info, %peer, "connection refused: limits.connections_max reached");
        metrics.connections.refused_total.inc();
        return;
    };
    let (shared, shutdown) = (Arc::clone(shared), shutdown.clone());
    tokio::spawn(async move {
        let open = shared.pipeline.metrics.connections.open.clone();
        open.inc();
        connection(stream, &shared, shutdown).await;
        open.dec();
        drop((permit, slot));
    });
}

async fn connection(stream: TcpStream, shared: &Shared, shutdown: watch::Receiver<bool>) {
    let _ = stream.set_nodelay(true);
    let limits = &shared.limits;
    let accept = shared.acceptor.accept(stream);
    let tls = match tokio::time::timeout(limits.handshake_timeout, accept).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            rate_log!(HANDSHAKE_LOG, debug, "TLS handshake failed: {e}");
            return;
        }
        Err(_) => {
            rate_log!(DEADLINE_LOG, debug, "closed: handshake_timeout_ms passed");
            shared.pipeline.metrics.timed_out("handshake");
            return;
        }
    };
    let (rd, wr) = tokio::io::split(tls);
    let (tx, rx) = mpsc::channel::<Outgoing>(limits.in_flight_max);
    let metrics = shared.pipeline.metrics.clone();
    let writer = tokio::spawn(write_replies(wr, rx, limits.write_timeout, metrics));
    let budget = ReplyBudget::new(
        limits.in_flight_max,
        limits.reply_bytes_per_connection_max,
        shared.reply_bytes.clone(),
    );
    let mut conn = Connection {
        shared,
        tx,
        budget,
        // Cleared by the stateless stage when this connection sends a bad signature with a
        // nonce hint: from then on its hints are ignored (strict checks only), so that one
        // connection cannot keep spoiling batch equations that other connections' requests
        // share.
        hints: Arc::new(AtomicBool::new(true)),
    };
    conn.read_requests(rd, shutdown).await;
    // Let answers still in the pipeline reach the client, then close. Pending answers hold
    // in-flight permits; once all are back (or dropped) the writer finishes.
    let Connection { tx, budget, .. } = conn;
    drop(tx);
    budget.drained(CLOSE_DRAIN_TIMEOUT).await;
    let _ = writer.await;
}

/// Writes replies as they come; a reply the socket does not take within `write_timeout` closes
/// the connection (the client does not read), which drops every reply still queued and so
/// returns their reservations.
async fn write_replies(
    wr: WriteHalf<TlsStream<TcpStream>>,
    mut rx: mpsc::Receiver<Outgoing>,
    write_timeout: Duration,
    metrics: Arc<Metrics>,
) {
    // tokio-rustls seals and sends a TLS record on every write; buffering here makes the
    // coalesced frames below one record (of up to 16 KiB) and one syscall per buffer instead
    // of one each per confirmation.
    let mut wr = tokio::io::BufWriter::with_capacity(WRITE_BUFFER_BYTES, wr);
    while let Some(mut out) = rx.recv().await {
        loop {
            // `reply_bytes_bound` is an upper bound for every reply; in a release build a
            // reply past it is logged rather than stopping the connection.
            let (len, reserved) = (out.bytes.len(), out._permit.reserved_bytes());
            debug_assert!(len <= reserved, "a {len}-byte reply reserved {reserved}");
            if len > reserved {
                rate_log!(
                    BUDGET_LOG,
                    error,
                    len,
                    reserved,
                    "a reply outgrew its reservation"
                );
            }
            let write = tokio::time::timeout(write_timeout, wr.write_all(&out.bytes)).await;
            if write.is_err() {
                metrics.timed_out("write");
            }
            if !matches!(write, Ok(Ok(()))) {
                rate_log!(
                    DEADLINE_LOG,
                    debug,
                    "closed: write_timeout_ms passed or the write failed"
                );
                return;
            }
            // Coalesce whatever else is ready into the same TLS flush.
            match rx.try_recv() {
                Ok(next) => out = next,
                Err(_) => break,
            }
        }
        let flush = tokio::time::timeout(write_timeout, wr.flush()).await;
        if flush.is_err() {
            metrics.timed_out("write");
        }
        if !matches!(flush, Ok(Ok(()))) {
            rate_log!(
                DEADLINE_LOG,
                debug,
                "closed: write_timeout_ms passed or the flush failed"
            );
            return;
        }
    }
    let _ = tokio::time::timeout(write_timeout, wr.shutdown()).await;
}

/// Gives back the memory of a large frame once it was handled: the buffer returns to its
/// usual size instead of keeping the largest frame's capacity for the connection's life.
fn shrink(buf: &mut BytesMut) {
    if buf.capacity() > 4 * READ_BUFFER_BYTES && buf.len() <= READ_BUFFER_BYTES {
        let mut small = BytesMut::with_capacity(READ_BUFFER_BYTES);
        small.extend_from_slice(buf);
        *buf = small;
    }
}

/// One client connection after its TLS handshake. It owns the connection's framing (the read
/// buffer and the frame deadlines, which [`Connection::read_requests`] keeps while it reads),
/// its reply budget and its per-connection state: the queue to its writer task and whether its
/// nonce hints are still used.
struct Connection<'a> {
    shared: &'a Shared,
    tx: mpsc::Sender<Outgoing>,
    budget: ReplyBudget,
    hints: Arc<AtomicBool>,
}

/// Which deadline the next read runs against.
enum Waiting {
    FirstRequest,
    Frame,
    Idle,
}

impl Connection<'_> {
    /// Reads and dispatches requests until the client closes, a deadline passes, the stream is
    /// out of step, the writer gave up, or the server stops.
    async fn read_requests(
        &mut self,
        mut rd: ReadHalf<TlsStream<TcpStream>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let limits = &self.shared.limits;
        let first_deadline = Instant::now() + limits.first_request_timeout;
        let mut buf = BytesMut::with_capacity(READ_BUFFER_BYTES);
        let mut requests_seen = false;
        let mut frame_started: Option<Instant> = None;
        let mut large_frame = None;
        loop {
            let Some((handled, frame_bytes)) = self.handle_frames(&mut buf).await else {
                return;
            };
            requests_seen |= handled > 0;
            if buf.is_empty() {
                frame_started = None;
            } else if handled > 0 || frame_started.is_none() {
                frame_started = Some(Instant::now());
            }
            let (waiting, deadline) = match frame_started {
                _ if !requests_seen => (Waiting::FirstRequest, first_deadline),
                Some(start) => (Waiting::Frame, start + limits.frame_timeout),
                None => (Waiting::Idle, Instant::now() + limits.idle_timeout),
            };
            if handled > 0 {
                large_frame = None;
            }
            if frame_bytes <= READ_BUFFER_BYTES {
                large_frame = None;
                shrink(&mut buf);
            } else if large_frame.is_none() {
                match self.hold_large_frame(frame_bytes, deadline).await {
                    Ok(permit) => large_frame = Some(permit),
                    Err(()) => return self.deadline_passed(waiting, true).await,
                }
            }
            buf.reserve(READ_BUFFER_BYTES);
            let read = tokio::time::timeout_at(deadline.into(), rd.read_buf(&mut buf));
            tokio::select! {
                biased;
                _ = shutdown.changed() => return,
                _ = self.tx.closed() => return,
                read = read => match read {
                    Ok(Ok(0)) | Ok(Err(_)) => return,
                    Ok(Ok(_)) => {}
                    Err(_) => return self.deadline_passed(waiting, !buf.is_empty()).await,
                },
            }
        }
    }

    /// A frame larger than the read buffer holds server memory while it arrives: it takes its
    /// bytes from the server's reply budget first, waiting (the reader stops) until `deadline`.
    async fn hold_large_frame(
        &self,
        frame_bytes: usize,
        deadline: Instant,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, ()> {
        let n = u32::try_from(frame_bytes).expect("frames are capped far below 4 GiB");
        let acquire = self.shared.reply_bytes.clone().acquire_many_owned(n);
        match tokio::time::timeout_at(deadline.into(), acquire).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(()),
        }
    }

    /// Handles every whole frame in `buf`, consuming them; the number handled and the size of
    /// the frame under way (0 when none), or `None` when the connection must close.
    async fn handle_frames(&mut self, buf: &mut BytesMut) -> Option<(usize, usize)> {
        let mut handled = 0;
        loop {
            let (decoded, correlation_id, used) =
                match decode_frame(buf, self.shared.limits.frame_bytes_max) {
                    Ok(Decoded::Complete(frame, used)) => {
                        (Message::decode_request(&frame), frame.correlation_id, used)
                    }
                    Ok(Decoded::Incomplete { needed }) => {
                        let under_way = if buf.is_empty() {
                            0
                        } else {
                            buf.len() + needed
                        };
                        return Some((handled, under_way));
                    }
                    Err(e) => {
                        // The stream is out of step: answer once (correlation id 0) and close.
                        self.answer_error(0, ErrorReply::from(&e)).await;
                        return None;
                    }
                };
            // O(1): the buffer's start moves; its space is reused once the rest was read.
            buf.advance(used);
            handled += 1;
            self.handle_request(decoded, correlation_id).await?;
        }
    }

    /// Reserves the request's reply and hands the request on (or answers `busy` when the
    /// server's reply budget is spent).
    async fn handle_request(
        &mut self,
        decoded: Result<Message, WireError>,
        correlation_id: u64,
    ) -> Option<()> {
        let bound = match &decoded {
            Ok(message) => reply_bytes_bound(message),
            Err(_) => SMALL_REPLY_BYTES_MAX,
        };
        let reserved = tokio::select! {
            biased;
            _ = self.tx.closed() => None,
            r = self.budget.reserve(bound) => r,
        }?;
        let pipeline = &self.shared.pipeline;
        let reply = |permit| {
            ReplyTo::connection(
                self.tx.clone(),
                correlation_id,
                permit,
                pipeline.metrics.clone(),
            )
        };
        match (reserved, decoded) {
            (Reserved::Full(permit), Ok(message)) => {
                dispatch(self.shared, message, reply(permit), &self.hints)
            }
            (Reserved::Full(permit), Err(e)) => {
                reply(permit).send(&Message::Error(ErrorReply::from(&e)))
            }
            (Reserved::BusyOnly(permit), _) => {
                rate_log!(
                    BUDGET_LOG,
                    info,
                    "limits.reply_bytes_total_max reached: answering busy"
                );
                pipeline.metrics.busy("reply_budget");
                reply(permit).busy("the server's reply budget", REPLY_BUDGET_RETRY_MS)
            }
        }
        Some(())
    }

    /// Answers once outside the request flow (correlation id 0), if the budget allows.
    async fn answer_error(&mut self, correlation_id: u64, error: ErrorReply) {
        if let Some(Reserved::Full(permit) | Reserved::BusyOnly(permit)) =
            self.budget.reserve(SMALL_REPLY_BYTES_MAX).await
        {
            ReplyTo::connection(
                self.tx.clone(),
                correlation_id,
                permit,
                self.shared.pipeline.metrics.clone(),
            )
            .send(&Message::Error(error));
        }
    }

    async fn deadline_passed(&mut self, waiting: Waiting, partial_frame: bool) {
        let (which, deadline) = match waiting {
            Waiting::FirstRequest => ("first_request_timeout_ms", "first_request"),
            Waiting::Frame => ("frame_timeout_ms", "frame"),
            Waiting::Idle => ("idle_timeout_ms", "idle"),
        };
        rate_log!(DEADLINE_LOG, debug, "closed: {which} passed");
        self.shared.pipeline.metrics.timed_out(deadline);
        if partial_frame {
            let message = format!("frame not completed within {which}");
            let error = ErrorReply::new(ErrorCode::MalformedFrame, message);
            self.answer_error(0, error).await;
        }
    }
}

/// What a client refused with `archive_behind` is told to wait.
const ARCHIVE_BEHIND_RETRY_MS: u32 = 1000;

/// Why this replica cannot take a write now, if it cannot: one place for every such rule.
fn write_refusal(pipeline: &PipelineHandle) -> Option<ErrorReply> {
    let view = &pipeline.view;
    if pipeline.read_only {
        return Some(ErrorReply::new(
            ErrorCode::Recovering,
            "this replica was restored below the archive's tip and serves reads only",
        ));
    }
    // Only the leader takes writes; others answer at once with where to go.
    if !view.writable.load(Ordering::SeqCst) {
        return Some(view.not_writable());
    }
    let applied = pipeline.applied_height.load(Ordering::SeqCst);
    let gate = pipeline.archive.as_ref()?;
    if let Some(why) = gate.refuses_writes(applied) {
        return Some(ErrorReply::new(ErrorCode::Recovering, why));
    }
    if gate.lag(applied) >= gate.max_lag_batches {
        let mut r = ErrorReply::new(
            ErrorCode::ArchiveBehind,
            "more committed batches than archive.max_lag_batches wait for the archive; retry \
             later",
        );
        r.retry_after_ms = ARCHIVE_BEHIND_RETRY_MS;
        return Some(r);
    }
    None
}

fn dispatch(shared: &Shared, message: Message, reply: ReplyTo, hints: &Arc<AtomicBool>) {
    let pipeline = &shared.pipeline;
    let view = &pipeline.view;
    if matches!(
        message,
        Message::Submit(_) | Message::SubmitHinted(..) | Message::SubmitEnvelope(_)
    ) {
        if let Some(refusal) = write_refusal(pipeline) {
            reply.send(&Message::Error(refusal));
            return;
        }
    }
    match message {
        Message::Submit(request) => pipeline::submit(
            pipeline,
            Job {
                submission: Submission::Request(request),
                hint: None,
                reply,
                snapshot_height: 0,
            },
        ),
        Message::SubmitEnvelope(envelope) => submit_envelope(shared, *envelope, reply),
        Message::SubmitHinted(request, hint) => pipeline::submit(
            pipeline,
            Job {
                submission: Submission::Request(request),
                hint: hints
                    .load(Ordering::Relaxed)
                    .then(|| (hint, Arc::clone(hints))),
                reply,
                snapshot_height: 0,
            },
        ),
        Message::GetBalance { account, mode } => read_balance(pipeline, account, mode, reply),
        Message::GetSupply => pipeline::read(pipeline, StorageCmd::Supply { reply }),
        Message::GetBalanceProof { account } => {
            pipeline::read(pipeline, StorageCmd::BalanceProof { account, reply })
        }
        Message::GetKeyChain => pipeline::read(pipeline, StorageCmd::KeyChain { reply }),
        m @ (Message::GetHeaders { .. }
        | Message::GetCheckpoint
        | Message::GetConsistency { .. }) => read_log(pipeline, m, reply),
        m @ (Message::GetHistory { .. }
        | Message::GetAccount { .. }
        | Message::GetConfirmationByReceipt { .. }) => {
            pipeline::read(pipeline, StorageCmd::accounting(m, reply))
        }
        Message::GetConfirmation { signer, id } => {
            pipeline::read(pipeline, StorageCmd::FindConfirmation { signer, id, reply })
        }
        Message::GetStatus => read_status(pipeline, reply),
        Message::Admin(req) => {
            crate::admin::dispatch(&pipeline.admin, &pipeline.raft_tx, *req, reply)
        }
        Message::GetInfo => match &view.info {
            Some(info) => reply.send(&Message::Info(Box::new(info.clone()))),
            None => reply.error(ErrorCode::Unavailable, "this replica is starting"),
        },
        other => reply.error(
            ErrorCode::UnknownMessageType,
            format!(
                "message type 0x{:02x} is a reply, not a request",
                other.message_type()
            ),
        ),
    }
}

/// The reads of headers and the header log: headers and consistency proofs (on the storage
/// thread) and the witnessed checkpoint (`GetCheckpoint`, from memory).
fn read_log(pipeline: &PipelineHandle, message: Message, reply: ReplyTo) {
    match message {
        Message::GetHeaders { from_height, limit } => pipeline::read(
            pipeline,
            StorageCmd::Headers {
                from_height,
                limit,
                reply,
            },
        ),
        Message::GetCheckpoint => match pipeline.witnessed.latest() {
            Some(note) => reply.send(&Message::Checkpoint(note)),
            None => reply.error(
                ErrorCode::NotFound,
                "no checkpoint cosigned by a witness on this replica (ask the leader)",
            ),
        },
        Message::GetConsistency {
            from_height,
            to_height,
        } => pipeline::read(
            pipeline,
            StorageCmd::Consistency {
                from: from_height,
                to: to_height,
                reply,
            },
        ),
        other => unreachable!("not a header log read: 0x{:02x}", other.message_type()),
    }
}

/// Asks the raft thread for this replica's status (`GetStatus`); a full queue is `busy`.
fn read_status(pipeline: &PipelineHandle, reply: ReplyTo) {
    if let Err(e) = pipeline.raft_tx.try_send(RaftEvent::Status { reply }) {
        if let Some(reply) = e.into_inner().into_cmd_reply() {
            reply.busy("the raft queue", 20);
        }
    }
}

/// Hands an envelope on, holding one of `limits.envelopes_in_flight_max` until it is
/// sequenced (none left: `busy`).
fn submit_envelope(shared: &Shared, envelope: tally_wire::Envelope, reply: ReplyTo) {
    let Ok(permit) = shared.envelopes.clone().try_acquire_owned() else {
        shared.pipeline.metrics.busy("envelopes");
        reply.busy("limits.envelopes_in_flight_max", 50);
        return;
    };
    let hash = tally_core::crypto::envelope_hash(&envelope);
    let submission = Submission::Envelope {
        envelope: Arc::new(envelope),
        hash,
        _permit: permit,
    };
    pipeline::submit(
        &shared.pipeline,
        Job {
            submission,
            hint: None,
            reply,
            snapshot_height: 0,
        },
    );
}

/// A balance: stale reads from this replica's applied state, linearizable ones through a raft
/// read index.
fn read_balance(
    pipeline: &PipelineHandle,
    account: tally_wire::PublicKey,
    mode: ReadMode,
    reply: ReplyTo,
) {
    let view = &pipeline.view;
    let leader = view.leader_id.load(Ordering::SeqCst);
    if mode == ReadMode::Stale || leader == 0 {
        // Stale reads on request, and degraded mode with no leader: this replica's
        // applied state, marked stale, with the height it was read at.
        let mode = ReadMode::Stale;
        pipeline::read(
            pipeline,
            StorageCmd::Balance {
                account,
                mode,
                reply,
            },
        )
    } else if view.writable.load(Ordering::SeqCst) {
        // Linearizable: served once a raft read index is applied.
        let mode = ReadMode::Linearizable;
        let cmd = StorageCmd::Balance {
            account,
            mode,
            reply,
        };
        if let Err(e) = pipeline.raft_tx.try_send(RaftEvent::Read { cmd }) {
            if let Some(reply) = e.into_inner().into_cmd_reply() {
                reply.busy("the raft queue", 20);
            }
        }
    } else {
        reply.send(&Message::Error(view.not_writable()))
    }
}
