//! The master thread: a runtime around the engine's master stage
//! (`tally_core::engine::master`). It takes validated requests from its queue (none while the
//! open batch is full: backpressure), polls the engine for a due batch at the times it names,
//! and carries proposals to the raft thread and resubmissions to the storage thread.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};
use tally_core::engine::master::{Master, MasterOut, Poll};

use super::validate::StorageReader;
use crate::channels::{Job, MasterEvent, RaftEvent, ReplyTo, StorageCmd, Submission};
use crate::fail::{fatal, unix_ms};
use crate::metrics::Metrics;
use crate::view::ClusterView;

/// How long the queues before the master must stay empty during a shutdown before it seals.
const SHUTDOWN_QUIET: Duration = Duration::from_millis(100);

/// The longest the master sleeps: it samples its queues' depths at least this often.
const IDLE_WAKE: Duration = Duration::from_millis(50);

/// Most requests the master judges per wake (see `MasterThread::take`).
const TAKE_MAX: usize = 256;

pub(super) struct MasterThread {
    pub engine: Master<ReplyTo>,
    pub rx: Receiver<Job>,
    pub storage: Sender<StorageCmd>,
    pub raft: Sender<RaftEvent>,
    pub events: Receiver<MasterEvent>,
    pub view: Arc<ClusterView>,
    pub wake: Receiver<()>,
    pub applied_height: Arc<AtomicU64>,
    /// A threshold operator's replica: `applied_height` is the signed height, kept by the
    /// storage thread alone.
    pub threshold: bool,
    pub shutdown: Arc<AtomicBool>,
    /// The queues upstream of the master, watched at shutdown so the batch in progress is whole.
    pub queues_before: Vec<Receiver<Job>>,
    pub metrics: Arc<Metrics>,
    /// The origin of the engine's monotonic clock.
    pub started: Instant,
}

type Out = Vec<MasterOut<ReplyTo>>;

impl MasterThread {
    pub fn run(mut self) {
        let mut out: Out = Vec::new();
        let mut quiet_since: Option<Instant> = None;
        loop {
            self.sample_queues();
            let now = self.now_ms();
            let applied = self.applied_height.load(Ordering::SeqCst);
            let timeout = self
                .engine
                .next_poll_ms(now, unix_ms(), applied)
                .map_or(IDLE_WAKE, |t| Duration::from_millis(t.saturating_sub(now)))
                .min(IDLE_WAKE);
            if !self.wait(timeout, &mut out) {
                return;
            }
            // Stop once no request has been queued for a moment after the shutdown began: a
            // job a validation worker holds (not in any queue) reaches the master well within
            // it, so the batch in progress is whole. Connections take no new requests by then.
            let drained = self.shutdown.load(Ordering::SeqCst) && self.upstream_empty();
            if !drained {
                quiet_since = None;
            }
            let stopping =
                drained && quiet_since.get_or_insert_with(Instant::now).elapsed() >= SHUTDOWN_QUIET;
            let poll = self.poll(stopping);
            let mut reader = StorageReader(&self.storage, &self.metrics);
            if let Err(e) = self.engine.expire(&poll, &mut reader) {
                fatal("expiring reserves", &e);
            }
            self.engine.poll(&poll, &mut out);
            let open = self.engine.open_len() as i64;
            self.metrics.batches.open_requests.set(open);
            if !self.execute(&mut out) {
                return;
            }
            if stopping {
                // The raft thread commits what was proposed, then stops the storage thread.
                let _ = self.raft.send(RaftEvent::Drain);
                return;
            }
        }
    }

    /// Waits for a leadership event, a request (unless the open batch is full), a wake-up or
    /// the timeout. False once a channel is closed.
    fn wait(&mut self, timeout: Duration, out: &mut Out) -> bool {
        let full = self.engine.is_full();
        let never = crossbeam_channel::never();
        let requests = if full { &never } else { &self.rx };
        select! {
            recv(self.events) -> e => match e {
                Ok(e) => self.event(e, out),
                Err(_) => return false,
            },
            recv(requests) -> job => match job {
                Ok(job) => self.take(job, out),
                Err(_) => return false,
            },
            recv(self.wake) -> _ => {},
            default(timeout) => {},
        }
        true
    }

    fn event(&mut self, event: MasterEvent, out: &mut Out) {
        match event {
            MasterEvent::Lead { term, epoch, meta } => {
                if !self.threshold {
                    self.applied_height.store(meta.height, Ordering::SeqCst);
                }
                self.engine.lead(term, epoch, meta, out);
            }
            MasterEvent::Follow => self.engine.follow(out),
            MasterEvent::Rotate { new_key, reply } => {
                let poll = self.poll(false);
                let mut reader = StorageReader(&self.storage, &self.metrics);
                if let Err(e) = self.engine.rotate(new_key, reply, &poll, &mut reader, out) {
                    fatal("opening a batch for a key rotation", &e);
                }
            }
        }
    }

    /// Judges `first` and what else is queued, up to [`TAKE_MAX`] requests or until the open
    /// batch is full: the loop's own work (sampling the queues, the select, the engine's poll
    /// and expiry) is then once per group instead of once per request. The group shares one
    /// [`Poll`], stale by at most the group's time (under a millisecond).
    fn take(&mut self, first: Job, out: &mut Out) {
        let poll = self.poll(false);
        let mut started = Instant::now();
        let (mut next, mut taken) = (Some(first), 0);
        while let Some(job) = next.take() {
            self.judge(job, &poll, out);
            let now = Instant::now();
            self.metrics
                .master
                .seconds
                .observe((now - started).as_secs_f64());
            started = now;
            taken += 1;
            if taken < TAKE_MAX && !self.engine.is_full() {
                next = self.rx.try_recv().ok();
            }
        }
        let hits = self.engine.take_cache_hits();
        self.metrics.batches.account_cache_hits_total.inc_by(hits);
    }

    fn judge(&mut self, job: Job, poll: &Poll, out: &mut Out) {
        let mut reader = StorageReader(&self.storage, &self.metrics);
        let result = match job.submission {
            Submission::Request(request) => self.engine.submit(
                request,
                job.snapshot_height,
                job.reply,
                poll,
                &mut reader,
                out,
            ),
            Submission::Envelope { envelope, hash, .. } => self.engine.submit_envelope(
                envelope,
                hash,
                job.snapshot_height,
                job.reply,
                poll,
                &mut reader,
                out,
            ),
        };
        if let Err(e) = result {
            fatal("sequencing", &e);
        }
    }

    /// Carries out the engine's commands. False once the raft thread is gone.
    fn execute(&mut self, out: &mut Out) -> bool {
        for command in out.drain(..) {
            match command {
                MasterOut::Propose {
                    body,
                    waiters,
                    sealed,
                    epoch,
                    close,
                    open_ms,
                } => {
                    self.metrics.batch_closed(close);
                    let requests = body.leaf_count();
                    self.metrics.batches.requests.observe(requests as f64);
                    tracing::debug!(
                        height = body.header.height,
                        requests,
                        reason = close.name(),
                        open_ms,
                        "batch sealed"
                    );
                    let propose = RaftEvent::Propose {
                        body,
                        waiters,
                        sealed,
                        epoch,
                    };
                    if self.raft.send(propose).is_err() {
                        return false;
                    }
                }
                MasterOut::Replay {
                    height,
                    index,
                    request_hash,
                    reply,
                } => {
                    let _ = self.storage.send(StorageCmd::Replay {
                        height,
                        index,
                        request_hash,
                        reply,
                    });
                }
                MasterOut::Refuse(reply, r) => reply.refuse(r, &self.view),
                MasterOut::Reject(reply, r) => reply.reject(r),
                MasterOut::Fail(reply, index, r) => reply.fail(index, r),
            }
        }
        true
    }

    fn poll(&self, stopping: bool) -> Poll {
        Poll {
            now_ms: self.now_ms(),
            unix_ms: unix_ms(),
            applied_height: self.applied_height.load(Ordering::SeqCst),
            upstream_empty: self.upstream_empty(),
            stopping,
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn upstream_empty(&self) -> bool {
        self.rx.is_empty() && self.queues_before.iter().all(|q| q.is_empty())
    }

    /// The master samples the depths of its own queue and those before it (stateless,
    /// snapshot): it wakes at least every `IDLE_WAKE`, even while the workers are blocked.
    fn sample_queues(&self) {
        let m = &self.metrics;
        m.master.queue_depth.set(self.rx.len() as i64);
        for (q, stage) in self.queues_before.iter().zip([&m.stateless, &m.snapshot]) {
            stage.queue_depth.set(q.len() as i64);
        }
    }
}
