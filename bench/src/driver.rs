//! The lean load driver (`--driver lean`, the default for requests).
//!
//! The load generator shares the server's machine: every microsecond it spends on a request is
//! one the server does not get. Through the client library (`--driver library`) a request costs
//! a task's future, a channel to the writer, a timer, a map entry, a reply channel and a whole
//! decoded confirmation (~3.7 us of CPU per request, 11% of a 2-core machine at 60k/s). Here
//! each connection is one writer and one reader task over its own TLS stream:
//! - the writer keeps `in_flight` requests outstanding (a semaphore of that many permits),
//!   encoding every request it may send into one buffer per write; a request's correlation id
//!   is its position in the pool plus one, and its send time goes into a table by position;
//! - the reader cuts replies in place and takes from a confirmation only what the report needs:
//!   that it is a confirmation of the request sent (its 208 request bytes), and its batch's
//!   height and size from the header. One confirmation per batch (the report's sample) is
//!   decoded whole and verified after the clock stops, as on the library path. Any other reply
//!   is decoded whole: a refusal counts by its code, anything else as a protocol violation.
//!
//! Bounds: `in_flight` outstanding per connection; the read buffer holds at most what the
//! server sent for those (a frame is capped at the protocol's default payload maximum); a
//! reply that does not come within `timeout` of the last one ends the connection's run, and its
//! outstanding requests count as `timeout` errors, a closed connection's as `disconnected`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tally_client::Error;
use tally_wire::{
    encode_frame, Decoded, FrameHeader, Header, Message, RawFrame, FRAME_HEADER_BYTES,
    FRAME_PAYLOAD_BYTES_MAX_DEFAULT, HEADER_BYTES, RECEIPT_BYTES, REQUEST_BYTES,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, Semaphore, TryAcquireError};
use tokio::task::JoinSet;

use crate::load::{progress, Answer, Phase, Pool, Presigned, Schedule};
use crate::stats::{Live, Recorder};

/// Where a `Confirmed` payload holds the header: after the replayed flag, the request and the
/// receipt (PROTOCOL.md §4.6).
const HEADER_AT: usize = 1 + REQUEST_BYTES + RECEIPT_BYTES;
/// Bytes the reader asks the stream for at once.
const READ_BYTES: usize = 256 * 1024;
/// Bytes the writer gathers before it writes them (it writes sooner when the window is full or
/// the next send is not due yet).
const WRITE_BYTES: usize = 64 * 1024;
/// An open-loop send this late after its scheduled time is counted as late (as the library's).
const LATE_SEND: Duration = Duration::from_millis(10);

/// What one connection's writer and reader share.
struct Side {
    pool: Arc<Pool>,
    live: Arc<Live>,
    /// Send times by pool position, in nanoseconds since `start`.
    sent_at: Arc<Vec<AtomicU64>>,
    start: Instant,
    window: Semaphore,
    /// Requests the writer sent (counted before they go out), final once `done` is set.
    sent: AtomicU64,
    /// Open loop: sends later than [`LATE_SEND`] after their scheduled time.
    late: AtomicU64,
    done: AtomicBool,
    wake: Notify,
}

/// The timed phase over `streams`, one per connection, `schedule`'s in-flight count
/// outstanding on each at most (the lean driver's [`crate::load::timed_phase`]).
pub async fn phase<S>(
    streams: Vec<S>,
    pool: Arc<Pool>,
    schedule: Schedule,
    timeout: Duration,
) -> Phase
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let live = Arc::new(Live::default());
    let sent_at: Arc<Vec<AtomicU64>> =
        Arc::new((0..pool.len()).map(|_| AtomicU64::new(0)).collect());
    let start = Instant::now();
    let (pace, in_flight) = match schedule {
        Schedule::Closed {
            in_flight,
            deadline,
        } => (
            Pace::Closed {
                deadline: deadline.map(|d| start + d),
            },
            in_flight,
        ),
        Schedule::Open { rate, in_flight } => (Pace::Open { rate }, in_flight),
    };
    let progress = tokio::spawn(progress(live.clone(), start));
    let mut connections = JoinSet::new();
    for stream in streams {
        let side = Arc::new(Side {
            pool: pool.clone(),
            live: live.clone(),
            sent_at: sent_at.clone(),
            start,
            window: Semaphore::new(in_flight),
            sent: AtomicU64::new(0),
            late: AtomicU64::new(0),
            done: AtomicBool::new(false),
            wake: Notify::new(),
        });
        connections.spawn(connection(stream, side, pace, timeout));
    }
    let (mut recorder, mut late_sends) = (Recorder::default(), 0);
    while let Some(result) = connections.join_next().await {
        let (r, late) = result.expect("a connection's load task panicked");
        recorder.merge(r);
        late_sends += late;
    }
    let elapsed = start.elapsed();
    progress.abort();
    Phase {
        recorder,
        sent: Live::get(&live.sent),
        elapsed,
        pool_exhausted: pool.exhausted(),
        late_sends,
    }
}

/// Runs one connection until its writer stopped and every answer is in (or `timeout` passed
/// without one); what it recorded, and its late sends.
async fn connection<S>(stream: S, side: Arc<Side>, pace: Pace, timeout: Duration) -> (Recorder, u64)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    assert_eq!(
        side.sent_at.len(),
        side.pool.len(),
        "a send time per pooled request"
    );
    let (reader, writer) = tokio::io::split(stream);
    let writing = tokio::spawn(write_side(writer, side.clone(), pace));
    let recorder = read_side(reader, &side, timeout).await;
    writing.abort();
    (recorder, side.late.load(Ordering::Relaxed))
}

/// How the writer paces its sends.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// As fast as the window allows, until the pool is empty or `deadline` has passed.
    Closed { deadline: Option<Instant> },
    /// Request `i` of the pool at `start + i / rate`, until the pool is empty. Its latency
    /// counts from that time, whenever it went out (no coordinated omission).
    Open { rate: f64 },
}

/// Frames encoded and not yet written.
struct Outbox {
    buffer: Vec<u8>,
    payload: Vec<u8>,
    /// Requests in `buffer`.
    count: u64,
}

impl Outbox {
    fn push(&mut self, i: usize, request: &Presigned) {
        let Presigned::Request(request, hint) = request else {
            panic!("the lean driver sends requests; envelopes go through the library");
        };
        let message = match hint {
            Some(hint) => Message::SubmitHinted(request.clone(), *hint),
            None => Message::Submit(request.clone()),
        };
        self.payload.clear();
        message.encode_payload(&mut self.payload);
        let id = i as u64 + 1;
        encode_frame(&mut self.buffer, message.message_type(), id, &self.payload);
        self.count += 1;
    }

    /// Counts and writes what is buffered; false if the connection is gone.
    async fn flush<W: AsyncWrite + Unpin>(&mut self, w: &mut W, s: &Side) -> bool {
        if self.count == 0 {
            return true;
        }
        s.sent.fetch_add(self.count, Ordering::SeqCst);
        s.live.sent.fetch_add(self.count, Ordering::Relaxed);
        s.live.in_flight.fetch_add(self.count, Ordering::Relaxed);
        self.count = 0;
        let ok = w.write_all(&self.buffer).await.is_ok() && w.flush().await.is_ok();
        self.buffer.clear();
        ok
    }
}

async fn write_side<W: AsyncWrite + Unpin>(mut w: W, s: Arc<Side>, pace: Pace) {
    let mut out = Outbox {
        buffer: Vec::with_capacity(WRITE_BYTES + REQUEST_BYTES + 64),
        payload: Vec::with_capacity(REQUEST_BYTES + 64),
        count: 0,
    };
    while let Some((i, request)) = next(&s, pace) {
        let scheduled = match pace {
            Pace::Open { rate } => Some(s.start + Duration::from_secs_f64(i as f64 / rate)),
            Pace::Closed { .. } => None,
        };
        if let Some(at) = scheduled.filter(|at| *at > Instant::now()) {
            if !out.flush(&mut w, &s).await {
                break;
            }
            tokio::time::sleep_until(at.into()).await;
        }
        if !take_permit(&mut w, &mut out, &s).await {
            break;
        }
        out.push(i, request);
        let now = Instant::now();
        if scheduled.is_some_and(|at| now.duration_since(at) > LATE_SEND) {
            s.late.fetch_add(1, Ordering::Relaxed);
        }
        let from = scheduled.unwrap_or(now).duration_since(s.start);
        s.sent_at[i].store(from.as_nanos() as u64, Ordering::Relaxed);
        if out.buffer.len() >= WRITE_BYTES && !out.flush(&mut w, &s).await {
            break;
        }
    }
    out.flush(&mut w, &s).await;
    s.done.store(true, Ordering::SeqCst);
    s.wake.notify_one();
}

/// The next request to send, if any.
fn next(s: &Side, pace: Pace) -> Option<(usize, &Presigned)> {
    match pace {
        Pace::Closed { deadline } if deadline.is_some_and(|d| Instant::now() >= d) => None,
        _ => s.pool.take_ref(),
    }
}

/// A place in the window: at once if one is free, else once what is buffered has gone out
/// and an answer freed one. False if the window closed (the connection is gone).
async fn take_permit<W: AsyncWrite + Unpin>(w: &mut W, out: &mut Outbox, s: &Side) -> bool {
    match s.window.try_acquire() {
        Ok(permit) => permit.forget(),
        Err(TryAcquireError::Closed) => return false,
        Err(TryAcquireError::NoPermits) => {
            if !out.flush(w, s).await {
                return false;
            }
            match s.window.acquire().await {
                Ok(permit) => permit.forget(),
                Err(_) => return false,
            }
        }
    }
    true
}

async fn read_side<R: AsyncRead + Unpin>(mut r: R, s: &Side, timeout: Duration) -> Recorder {
    let mut recorder = Recorder::default();
    let mut buffer: Vec<u8> = Vec::with_capacity(READ_BYTES);
    let mut received = 0u64;
    let ended = loop {
        if s.done.load(Ordering::SeqCst) && received == s.sent.load(Ordering::SeqCst) {
            break None;
        }
        let read = tokio::select! {
            read = tokio::time::timeout(timeout, r.read_buf(&mut buffer)) => read,
            _ = s.wake.notified() => continue,
        };
        match read {
            Err(_) => break Some(Error::Timeout),
            Ok(Ok(0)) | Ok(Err(_)) => break Some(Error::Disconnected),
            Ok(Ok(_)) => {}
        }
        let (n, failure) = cut_replies(&mut buffer, s, &mut recorder);
        received += n;
        if let Some(e) = failure {
            break Some(e);
        }
        if buffer.capacity() - buffer.len() < READ_BYTES / 4 {
            buffer.reserve(READ_BYTES);
        }
    };
    if let Some(e) = ended {
        // Whatever is still outstanding will not be answered on this connection.
        s.window.close();
        // Saturating: a server that answers an id twice must not make this wrap.
        let outstanding = wait_sent(s, timeout).await.saturating_sub(received);
        for _ in 0..outstanding {
            recorder.record(Err(unanswered(&e)), Duration::ZERO);
        }
        s.live.failed.fetch_add(outstanding, Ordering::Relaxed);
        s.live.in_flight.fetch_sub(outstanding, Ordering::Relaxed);
    }
    recorder
}

/// The writer's final count, once it stopped (the window is closed, so it stops soon), or
/// after `timeout` if it is stuck writing to a peer that does not read (then it is aborted).
async fn wait_sent(s: &Side, timeout: Duration) -> u64 {
    let done = async {
        while !s.done.load(Ordering::SeqCst) {
            s.wake.notified().await;
        }
    };
    let _ = tokio::time::timeout(timeout, done).await;
    s.sent.load(Ordering::SeqCst)
}

/// What a request still outstanding counts as when its connection's run ended with `e`:
/// `timeout` after a silence, else `disconnected` (a closed or broken stream).
fn unanswered(e: &Error) -> Error {
    match e {
        Error::Timeout => Error::Timeout,
        _ => Error::Disconnected,
    }
}

/// Records every whole reply at the front of `buffer` and removes them: how many there were,
/// and what ended the stream if a frame broke it (the replies before it still count).
fn cut_replies(buffer: &mut Vec<u8>, s: &Side, recorder: &mut Recorder) -> (u64, Option<Error>) {
    let (mut used, mut n, mut confirmed) = (0, 0u64, 0);
    let now = s.start.elapsed().as_nanos() as u64;
    let failure = loop {
        let header = match FrameHeader::decode(&buffer[used..], FRAME_PAYLOAD_BYTES_MAX_DEFAULT) {
            Ok(Decoded::Complete(header, _)) => header,
            Ok(Decoded::Incomplete { .. }) => break None,
            Err(e) => break Some(Error::Protocol(format!("a broken frame: {e}"))),
        };
        let end = used + FRAME_HEADER_BYTES + header.payload_len as usize;
        if buffer.len() < end {
            break None;
        }
        let payload = &buffer[used + FRAME_HEADER_BYTES..end];
        match record_reply(&header, payload, s, now, recorder) {
            Ok(ok) => confirmed += ok as u64,
            Err(e) => break Some(e),
        }
        used = end;
        n += 1;
    };
    buffer.drain(..used);
    s.window.add_permits(n as usize);
    s.live.confirmed.fetch_add(confirmed, Ordering::Relaxed);
    s.live.failed.fetch_add(n - confirmed, Ordering::Relaxed);
    s.live.in_flight.fetch_sub(n, Ordering::Relaxed);
    (n, failure)
}

/// Records one reply; true if it confirmed its request.
fn record_reply(
    frame: &FrameHeader,
    payload: &[u8],
    s: &Side,
    now: u64,
    recorder: &mut Recorder,
) -> Result<bool, Error> {
    let unknown = || Error::Protocol(format!("a reply to id {}", frame.correlation_id));
    let i = usize::try_from(frame.correlation_id.wrapping_sub(1)).map_err(|_| unknown())?;
    let Some(Presigned::Request(request, _)) = s.pool.get(i) else {
        return Err(unknown());
    };
    let sent = s.sent_at[i].load(Ordering::Relaxed);
    let latency = Duration::from_nanos(now.saturating_sub(sent));
    s.live.latency(latency);
    if frame.message_type == tally_wire::message_type::CONFIRMED {
        if let Some(header) = confirmed_header(payload, &request.encode()) {
            let sample = || match Message::decode(&raw(frame, payload)) {
                Ok(Message::Confirmed(c)) => Some(Answer::Request(*c)),
                _ => None,
            };
            recorder.confirmed_in(header.height, header.request_count, 1, latency, sample);
            return Ok(true);
        }
    }
    let outcome = match Message::decode(&raw(frame, payload)) {
        Ok(Message::Error(reply)) => Error::Rejected(reply),
        Ok(other) => Error::Protocol(format!("message type {:#04x}", other.message_type())),
        Err(e) => Error::Protocol(format!("malformed reply: {e}")),
    };
    recorder.record(Err(outcome), latency);
    Ok(false)
}

fn raw(frame: &FrameHeader, payload: &[u8]) -> RawFrame {
    RawFrame {
        message_type: frame.message_type,
        correlation_id: frame.correlation_id,
        payload: payload.to_vec(),
    }
}

/// The header of a `Confirmed` payload, if it confirms the request whose bytes are `request`
/// (not verified: the sample is, after the clock stops).
fn confirmed_header(payload: &[u8], request: &[u8; REQUEST_BYTES]) -> Option<Header> {
    let header = payload.get(HEADER_AT..HEADER_AT + HEADER_BYTES)?;
    if payload.get(1..1 + REQUEST_BYTES)? != request {
        return None;
    }
    Header::decode(header).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use tally_wire::{
        decode_frame, Confirmation, ErrorCode, ErrorReply, InclusionProof, Op, Receipt, Request,
        SignedHeader,
    };
    use tokio::io::DuplexStream;

    fn request(id: u128) -> Request {
        let key = SigningKey::from_bytes(&[9; 32]);
        tally_client::build_request(&key, [1; 32], Op::Transfer, id, [8; 32], 5)
    }

    fn confirmation() -> Confirmation {
        confirmation_of(request(42), 77)
    }

    fn confirmation_of(request: Request, height: u64) -> Confirmation {
        let header = Header {
            chain_id: [1; 32],
            height,
            term: 3,
            time_unix_ms: 1_700_000_000_000,
            request_count: 1234,
            prev_hash: [2; 32],
            merkle_root: [3; 32],
            state_digest: [4; 32],
            operator_key_id: [5; 8],
        };
        Confirmation {
            replayed: false,
            request,
            receipt: Receipt {
                request_hash: [9; 32],
                height: 77,
                index: 3,
                op: Op::Transfer,
                failed: None,
                op_index: 0,
                signer_balance: 10,
                to_balance: 20,
            },
            header: SignedHeader {
                header,
                signature: [6; 64],
            },
            proof: InclusionProof {
                leaf_index: 3,
                tree_size: 4,
                path: vec![[10; 32], [11; 32]],
            },
        }
    }

    /// A fake server: answers every request with a confirmation in batch `id / 10`, except
    /// ids divisible by 7 (refused `busy`) and, after `answer_max` answers, nothing at all
    /// (it writes `last`, then hangs up).
    async fn fake_server(mut s: DuplexStream, answer_max: usize, last: &'static [u8]) {
        let (mut buffer, mut answered) = (Vec::new(), 0);
        loop {
            while let Ok(Decoded::Complete(frame, n)) = decode_frame(&buffer, 1 << 20) {
                buffer.drain(..n);
                if answered == answer_max {
                    let _ = s.write_all(last).await;
                    return;
                }
                let Ok(Message::SubmitHinted(r, _) | Message::Submit(r)) =
                    Message::decode_request(&frame)
                else {
                    panic!("the driver sent something else than a request");
                };
                let reply = match r.id % 7 {
                    0 => Message::Error(ErrorReply::new(ErrorCode::Busy, "busy")),
                    _ => {
                        let height = (r.id / 10) as u64;
                        Message::Confirmed(Box::new(confirmation_of(r, height)))
                    }
                };
                s.write_all(&reply.encode_frame(frame.correlation_id))
                    .await
                    .unwrap();
                answered += 1;
            }
            if s.read_buf(&mut buffer).await.unwrap_or(0) == 0 {
                return;
            }
        }
    }

    async fn run(requests: u128, answer_max: usize, last: &'static [u8]) -> Phase {
        let pool = (1..=requests).map(|id| Presigned::Request(request(id), None));
        let pool = Arc::new(Pool::new(pool.collect()));
        let mut streams = Vec::new();
        for _ in 0..2 {
            let (ours, theirs) = tokio::io::duplex(4096);
            tokio::spawn(fake_server(theirs, answer_max, last));
            streams.push(ours);
        }
        let schedule = Schedule::Closed {
            in_flight: 5,
            deadline: None,
        };
        phase(streams, pool, schedule, Duration::from_secs(10)).await
    }

    /// Every request is answered once and counted by its answer: confirmations with their
    /// batch (height and size from the header), refusals by code; a sample per batch kept.
    #[tokio::test]
    async fn every_answer_is_counted_by_what_it_says() {
        let phase = run(100, usize::MAX, b"").await;
        let busy = (1..=100).filter(|id| id % 7 == 0).count() as u64;
        assert_eq!(phase.sent, 100);
        assert_eq!(phase.recorder.confirmed, 100 - busy);
        assert_eq!(phase.recorder.rejected.get("busy"), Some(&busy));
        assert_eq!(phase.recorder.errors_total(), 0);
        assert_eq!(phase.recorder.latency_us.len(), 100 - busy);
        let heights: Vec<u64> = phase.recorder.batch_sizes.keys().copied().collect();
        assert_eq!(
            heights.len(),
            11,
            "ids 1..=100 fall in batches 0..=10: {heights:?}"
        );
        assert!(phase.recorder.batch_sizes.values().all(|&n| n == 1234));
        // A sample per batch and connection.
        let samples = &phase.recorder.samples;
        let sampled: std::collections::BTreeSet<u64> =
            samples.iter().map(|a| a.header().height).collect();
        assert_eq!(sampled.len(), 11);
        assert!(samples.len() <= 2 * 11);
        assert!(phase.pool_exhausted);
    }

    /// A server that stops answering and hangs up: what it never answered counts as
    /// `disconnected`, and the phase ends.
    #[tokio::test]
    async fn what_a_closed_connection_never_answered_is_disconnected() {
        let phase = run(100, 20, b"").await;
        let r = &phase.recorder;
        let answered = r.confirmed + r.rejected_total();
        assert_eq!(answered, 40, "20 answers on each of 2 connections");
        assert_eq!(r.errors.get("disconnected"), Some(&(phase.sent - 40)));
    }

    /// A broken frame ends the connection's run, but the answers read with it still count,
    /// each once, and the rest are `disconnected` (not counted twice, not wrapped around).
    #[tokio::test]
    async fn a_broken_frame_keeps_the_answers_before_it() {
        let phase = run(100, 20, b"not a frame header at all").await;
        let r = &phase.recorder;
        assert_eq!(r.confirmed + r.rejected_total(), 40);
        assert_eq!(r.errors.get("disconnected"), Some(&(phase.sent - 40)));
        assert_eq!(r.errors_total(), phase.sent - 40);
    }

    /// The lean reading takes the header a whole decode takes, and only for its request.
    #[test]
    fn the_header_is_where_the_whole_decode_finds_it() {
        let c = confirmation();
        let payload = c.encode();
        let header = confirmed_header(&payload, &c.request.encode()).expect("its own request");
        assert_eq!(
            header,
            Confirmation::decode(&payload).unwrap().header.header
        );
        let mut other = c.request.clone();
        other.id += 1;
        assert!(confirmed_header(&payload, &other.encode()).is_none());
        assert!(confirmed_header(
            &payload[..HEADER_AT + HEADER_BYTES - 1],
            &c.request.encode()
        )
        .is_none());
    }
}
