//! The client listener: TLS over TCP, one tokio task per connection reading frames and one
//! writing answers, with many requests in flight matched by correlation id.
//!
//! Limits: `connections_max` open connections (beyond it a new connection is closed at once);
//! `requests_in_flight_per_connection_max` unanswered requests per connection (beyond it the
//! reader stops reading, which pushes back through TCP); deadlines for the TLS handshake, for a
//! frame that has started arriving, and for an idle connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tally_wire::{decode_frame, Decoded, ErrorCode, ErrorReply, Message, ReadMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::pipeline::{self, Job, Outgoing, PipelineHandle, ReplyTo, StorageCmd};
use crate::replication::RaftEvent;
use std::sync::atomic::{AtomicBool, Ordering};

/// Bytes a connection's writer gathers before handing them to TLS (each flush sends sooner).
const WRITE_BUFFER_BYTES: usize = 64 * 1024;

#[derive(Clone, Debug)]
pub struct NetLimits {
    pub connections_max: usize,
    pub in_flight_max: usize,
    pub frame_bytes_max: u32,
    pub handshake_timeout: Duration,
    pub frame_timeout: Duration,
    pub idle_timeout: Duration,
}

/// Accepts connections until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    pipeline: PipelineHandle,
    limits: NetLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let connections = Arc::new(Semaphore::new(limits.connections_max));
    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => return,
            accepted = listener.accept() => {
                let Ok((stream, _peer)) = accepted else { continue };
                let Ok(permit) = connections.clone().try_acquire_owned() else {
                    tracing::debug!("connection refused: connections_max reached");
                    pipeline.metrics.connections_refused_total.inc();
                    drop(stream);
                    continue;
                };
                let (acceptor, pipeline, limits, shutdown) =
                    (acceptor.clone(), pipeline.clone(), limits.clone(), shutdown.clone());
                tokio::spawn(async move {
                    let open = pipeline.metrics.connections_open.clone();
                    open.inc();
                    connection(stream, acceptor, pipeline, limits, shutdown).await;
                    open.dec();
                    drop(permit);
                });
            }
        }
    }
}

async fn connection(
    stream: TcpStream,
    acceptor: TlsAcceptor,
    pipeline: PipelineHandle,
    limits: NetLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let tls = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        _ => return,
    };
    let (mut rd, wr) = tokio::io::split(tls);
    let (tx, mut rx) = mpsc::channel::<Outgoing>(limits.in_flight_max);
    // Cleared by the stateless stage when this connection sends a bad signature with a nonce
    // hint: from then on its hints are ignored (strict checks only), so that one connection
    // cannot keep spoiling batch equations that other connections' requests share.
    let hints = Arc::new(AtomicBool::new(true));
    let permits = Arc::new(Semaphore::new(limits.in_flight_max));
    let writer = tokio::spawn(async move {
        // tokio-rustls seals and sends a TLS record on every write; buffering here makes the
        // coalesced frames below one record (of up to 16 KiB) and one syscall per buffer
        // instead of one each per confirmation.
        let mut wr = tokio::io::BufWriter::with_capacity(WRITE_BUFFER_BYTES, wr);
        while let Some(out) = rx.recv().await {
            if wr.write_all(&out.bytes).await.is_err() {
                return;
            }
            drop(out);
            // Coalesce whatever else is ready into the same TLS flush.
            while let Ok(out) = rx.try_recv() {
                if wr.write_all(&out.bytes).await.is_err() {
                    return;
                }
            }
            if wr.flush().await.is_err() {
                return;
            }
        }
        let _ = wr.shutdown().await;
    });

    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    'conn: loop {
        // Handle every whole frame in the buffer.
        loop {
            match decode_frame(&buf, limits.frame_bytes_max) {
                Ok(Decoded::Complete(frame, used)) => {
                    buf.drain(..used);
                    let Ok(permit) = permits.clone().acquire_owned().await else {
                        break 'conn;
                    };
                    let reply = ReplyTo {
                        tx: tx.clone(),
                        correlation_id: frame.correlation_id,
                        permit,
                        received: Instant::now(),
                        metrics: pipeline.metrics.clone(),
                    };
                    match Message::decode_request(&frame) {
                        Ok(message) => dispatch(&pipeline, message, reply, &hints),
                        Err(e) => reply.send(&Message::Error(ErrorReply::from(&e))),
                    }
                }
                Ok(Decoded::Incomplete { .. }) => break,
                Err(e) => {
                    // The stream is out of step: answer once (correlation id 0) and close.
                    if let Ok(permit) = permits.clone().acquire_owned().await {
                        ReplyTo {
                            tx: tx.clone(),
                            correlation_id: 0,
                            permit,
                            received: Instant::now(),
                            metrics: pipeline.metrics.clone(),
                        }
                        .send(&Message::Error(ErrorReply::from(&e)));
                    }
                    break 'conn;
                }
            }
        }
        let deadline = if buf.is_empty() {
            limits.idle_timeout
        } else {
            limits.frame_timeout
        };
        tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            read = tokio::time::timeout(deadline, rd.read_buf(&mut buf)) => match read {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(_)) => {}
                Err(_) => {
                    if !buf.is_empty() {
                        if let Ok(permit) = permits.clone().acquire_owned().await {
                            let reply = ReplyTo {
                                tx: tx.clone(),
                                correlation_id: 0,
                                permit,
                                received: Instant::now(),
                                metrics: pipeline.metrics.clone(),
                            };
                            reply.error(ErrorCode::MalformedFrame, "frame not completed within frame_timeout_ms");
                        }
                    }
                    break;
                }
            },
        }
    }
    // Let answers still in the pipeline reach the client, then close. Pending answers hold
    // permits; once all are back (or the pipeline dropped them) the writer finishes.
    drop(tx);
    let _ = tokio::time::timeout(
        Duration::from_secs(30),
        permits.acquire_many(limits.in_flight_max as u32),
    )
    .await;
    let _ = writer.await;
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

fn dispatch(pipeline: &PipelineHandle, message: Message, reply: ReplyTo, hints: &Arc<AtomicBool>) {
    let view = &pipeline.view;
    if matches!(message, Message::Submit(_) | Message::SubmitHinted(..)) {
        if let Some(refusal) = write_refusal(pipeline) {
            reply.send(&Message::Error(refusal));
            return;
        }
    }
    match message {
        Message::Submit(request) => pipeline::submit(
            pipeline,
            Job {
                request,
                hint: None,
                reply,
                snapshot_height: 0,
            },
        ),
        Message::SubmitHinted(request, hint) => pipeline::submit(
            pipeline,
            Job {
                request,
                hint: hints
                    .load(Ordering::Relaxed)
                    .then(|| (hint, Arc::clone(hints))),
                reply,
                snapshot_height: 0,
            },
        ),
        Message::GetBalance { account, mode } => {
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
        Message::GetHeaders { from_height, limit } => pipeline::read(
            pipeline,
            StorageCmd::Headers {
                from_height,
                limit,
                reply,
            },
        ),
        Message::GetStatus => {
            if let Err(e) = pipeline.raft_tx.try_send(RaftEvent::Status { reply }) {
                if let Some(reply) = e.into_inner().into_cmd_reply() {
                    reply.busy("the raft queue", 20);
                }
            }
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
