//! The storage thread: the one owner of the ledger database, and a runtime around the engine's
//! apply stage (`tally_core::engine::apply`). It applies committed entries in the order they
//! arrive and serves reads in between; an IO error or a divergence stops the process, since
//! going on could let this replica's state differ from the others'.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use tally_core::engine::apply::{Applied, Applier, ApplyOut, Committed};
use tally_core::ports::LedgerStore;
use tally_core::Result as CoreResult;

use super::confirm::ConfirmJob;
use super::{ArchiveGate, SnapshotTransfer};
use crate::channels::{self, RaftEvent, ReplyTo, StorageCmd};
use crate::fail::fatal;
use crate::metrics::Metrics;
use crate::view::ClusterView;

pub(super) struct StorageThread<S> {
    pub engine: Applier<ReplyTo>,
    pub archive: Option<Arc<ArchiveGate>>,
    /// Always Some, except while a snapshot installer has it.
    pub store: Option<S>,
    pub node_id: u64,
    /// The applied height, for the master's in-flight bound (on a threshold operator's replica
    /// the signed height: a batch is in flight until signed).
    pub applied_height: Arc<AtomicU64>,
    /// Events for the raft thread's signing stage not queued yet (its queue was full); never
    /// dropped, or a header would wait for a signature nobody asks for. Bounded in practice:
    /// at most two events per batch, and the master seals no batch beyond its in-flight bound
    /// until these batches are signed, which takes these events.
    pub sign_events: std::collections::VecDeque<RaftEvent>,
    /// The applied raft index and meta, for the raft thread.
    pub applied: Arc<channels::Applied>,
    pub raft: Sender<RaftEvent>,
    pub wake: Sender<()>,
    pub confirm: Sender<ConfirmJob>,
    pub installer: Box<dyn SnapshotTransfer<S>>,
    pub view: Arc<ClusterView>,
    /// The store's request-lookup totals as last added to the metrics.
    pub lookups_seen: (u64, u64, u64),
    pub metrics: Arc<Metrics>,
    /// The key chain as last read, with the rotation it ends at: `GetKeyChain` reads up to 64
    /// rotation bodies, once per rotation rather than once per request.
    pub key_links: Option<(tally_core::state::Rotation, Vec<tally_wire::KeyLink>)>,
}

type Out = Vec<ApplyOut<ReplyTo>>;

impl<S: LedgerStore> StorageThread<S> {
    pub fn run(mut self, rx: Receiver<StorageCmd>) {
        let mut out: Out = Vec::new();
        while let Ok(cmd) = rx.recv() {
            self.metrics.storage.queue_depth.set(rx.len() as i64);
            match cmd {
                StorageCmd::Committed(entry) => {
                    self.committed(entry, &mut out);
                    // Compactions the write made due run now if nothing waits, not inside
                    // the next batch's write.
                    if rx.is_empty() {
                        self.maintain();
                    }
                }
                StorageCmd::InstallSnapshot { index, descriptor } => {
                    if let Err(e) = self.install(index, &descriptor, &mut out) {
                        fatal("installing a snapshot", &e);
                    }
                }
                StorageCmd::Replay {
                    height,
                    index,
                    request_hash,
                    reply,
                } => {
                    let store = self.store.as_mut().expect("store");
                    let result =
                        self.engine
                            .replay(store, height, index, request_hash, reply, &mut out);
                    if let Err(e) = result {
                        fatal("reading a stored batch", &e);
                    }
                }
                StorageCmd::Stop => break,
                read => self.read(read),
            }
            self.execute(&mut out);
        }
        self.stop();
    }

    /// Applies one committed entry through the engine and publishes what it changed.
    fn committed(&mut self, entry: Committed<ReplyTo>, out: &mut Out) {
        let started = Instant::now();
        let store = self.store.as_mut().expect("store");
        let mut timed = super::timed::TimedStore::new(store);
        let applied = self
            .engine
            .committed(&mut timed, entry, out)
            .unwrap_or_else(|e| fatal("applying a committed batch", &e));
        let write_seconds = timed.write_seconds;
        if let Applied::Signed(item) = &applied {
            tracing::debug!(height = item.height, kind = ?item.kind, "signature applied");
            if item.kind == tally_core::signing::Kind::Checkpoint {
                // The batch's confirmations are out: it is no longer in flight, and the
                // archive writer may read it (signed) from the ledger.
                self.applied_height.store(item.height, Ordering::SeqCst);
                if let Some(gate) = &self.archive {
                    gate.applied.notify_one();
                }
            }
        }
        if let Applied::Written(write) = applied {
            let m = self.metrics.clone();
            let total = started.elapsed().as_secs_f64();
            m.ledger
                .apply_prepare_seconds
                .observe(total - write_seconds);
            m.ledger.durable_write_seconds.observe(write_seconds);
            m.storage.seconds.observe(total);
            m.ledger.batch_body_bytes.observe(write.body.len() as f64);
            let height = write.meta.height;
            *self.applied.meta.lock().expect("meta lock") = write.meta.clone();
            self.publish_compactable();
            if let Some(gate) = self
                .archive
                .as_ref()
                .filter(|_| !self.engine.is_threshold())
            {
                // The archive writer takes it from here instead of reading it back; when it
                // is behind (a full queue), it reads from the ledger later. (A threshold
                // operator's header is not signed yet: the writer reads it once it is.)
                let body = bytes::Bytes::from(write.body);
                let _ = gate.feed.try_send((write.signed_header, body));
                gate.applied.notify_one();
            }
            m.applied_height.set(height as i64);
            tracing::debug!(height, "batch applied");
            if !self.engine.is_threshold() {
                self.applied_height.store(height, Ordering::SeqCst);
            }
        }
        self.publish_index();
    }

    /// Carries out the engine's commands.
    fn execute(&mut self, out: &mut Out) {
        for command in out.drain(..) {
            match command {
                ApplyOut::Confirm {
                    body,
                    leaves,
                    signed,
                    waiters,
                } => {
                    let _ = self.confirm.send(ConfirmJob {
                        body,
                        leaves,
                        signed,
                        waiters,
                    });
                    let depth = self.confirm.len() as i64;
                    self.metrics.confirm.queue_depth.set(depth);
                }
                ApplyOut::Replayed(reply, c) => reply.confirmed(c),
                ApplyOut::Refuse(reply, r) => reply.refuse(r, &self.view),
                ApplyOut::Reject(reply, r) => reply.reject(r),
                ApplyOut::Resync => {
                    tracing::warn!("a committed batch did not extend the chain: skipped");
                    let _ = self.raft.try_send(RaftEvent::Resync);
                }
                ApplyOut::Unsigned(header) => {
                    self.sign_events.push_back(RaftEvent::Unsigned(header))
                }
                ApplyOut::HeaderSigned {
                    height,
                    checkpoint,
                    key,
                } => self.sign_events.push_back(RaftEvent::HeaderSigned {
                    height,
                    checkpoint,
                    key,
                }),
                ApplyOut::CheckpointSigned(h) => {
                    self.sign_events.push_back(RaftEvent::CheckpointSigned(h))
                }
            }
        }
        while let Some(event) = self.sign_events.pop_front() {
            if let Err(e) = self.raft.try_send(event) {
                self.sign_events.push_front(e.into_inner());
                break;
            }
        }
    }

    fn install(&mut self, index: u64, descriptor: &[u8], out: &mut Out) -> CoreResult<()> {
        let result = self.installer.install(&mut self.store, index, descriptor);
        let Some(store) = self.store.as_mut() else {
            let e = result.err().unwrap_or_else(|| {
                tally_core::Error::missing("the ledger store after a snapshot install")
            });
            fatal("installing a snapshot", &e);
        };
        self.engine
            .installed(store, index, out)
            .unwrap_or_else(|e| fatal("reading ledger meta", &e));
        result?;
        let meta = self.engine.meta().clone();
        *self.applied.meta.lock().expect("meta lock") = meta.clone();
        self.publish_compactable();
        self.applied_height.store(meta.height, Ordering::SeqCst);
        self.publish_index();
        Ok(())
    }

    fn maintain(&mut self) {
        let started = Instant::now();
        if let Err(e) = self.db().maintain() {
            fatal("storage housekeeping", &e);
        }
        let seconds = started.elapsed().as_secs_f64();
        self.metrics.ledger.maintain_seconds.observe(seconds);
        self.publish_compactable();
    }

    /// A clean stop: the store may save what speeds up the next open (the request filter,
    /// unless it is off or the archive never caught up). Failing that only slows the next open
    /// down, so it is logged, not fatal.
    fn stop(&mut self) {
        let stopping = Instant::now();
        match self.db().shutdown() {
            Ok(()) => tracing::info!(
                ms = stopping.elapsed().as_millis() as u64,
                "ledger stopped cleanly"
            ),
            Err(e) => tracing::warn!("saving state for a fast restart failed: {e}"),
        }
    }

    /// The newest height a read may name in an answer that carries signatures: the applied
    /// height, but on a threshold operator's replica the newest whose header and checkpoint
    /// are signed.
    pub(super) fn readable_height(&self) -> u64 {
        self.engine.signed_through().1
    }

    pub(super) fn db(&mut self) -> &mut S {
        self.store
            .as_mut()
            .expect("the ledger store is open outside snapshot installs")
    }

    /// Tells the raft thread how far it may compact its log (see `Applied::compactable`).
    fn publish_compactable(&mut self) {
        let compactable = self
            .db()
            .compactable_meta()
            .unwrap_or_else(|e| fatal("archiving applied batches", &e));
        let lag = self.db().archive_lag();
        *self.applied.compactable.lock().expect("meta lock") = compactable;
        self.metrics.ledger.history_lag_batches.set(lag as i64);
    }

    fn publish_index(&self) {
        let index = self.engine.applied_index();
        self.applied.index.fetch_max(index, Ordering::SeqCst);
        let published = self.applied.index.load(Ordering::SeqCst);
        self.metrics.raft.applied_index.set(published as i64);
        let _ = self.wake.try_send(());
    }
}
