//! The request pipeline on plain threads: stateless validation pool → snapshot validation pool →
//! master (sequencing) → storage (commit and apply) → confirmer.
//!
//! Every queue is a bounded crossbeam channel. What happens at each limit:
//! - the stateless queue is fed by connection tasks with `try_send`: when full the client gets
//!   `busy` with a retry hint, and nothing else waits;
//! - the queues between pipeline threads use blocking `send`, so a slow stage holds back the one
//!   before it, until the stateless queue fills and clients get `busy`;
//! - read commands from connections (`balance`, `headers`, `status`) reach the storage thread
//!   with `try_send` and get `busy` when its queue is full;
//! - the master seals at most `batch_in_flight_max` batches ahead of the applied height; beyond
//!   that the open batch keeps filling to `batch_requests_max` and then the master stops taking
//!   requests.
//! Replies go to a connection's outgoing queue with `try_send`; that never fails for lack of room,
//! because every reply carries one of the connection's in-flight permits and the queue has room
//! for all of them.
//!
//! The storage thread is the one owner of the LevelDB handle. It serves reads and applies
//! committed batches in the order it receives them; an IO error or a divergence there stops the
//! process, since going on could let this replica's state differ from the others'.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{bounded, select, Receiver, Sender, TrySendError};
use tally_core::batch::{prepare_apply, BatchBody};
use tally_core::crypto::OperatorKey;
use tally_core::ports::{LedgerRead, LedgerStore, RequestRecord};
use tally_core::sequencer::{Sequencer, Submitted};
use tally_core::validate::StatelessRules;
use tally_core::{Rejection, Result as CoreResult};
use tally_wire::{
    BalanceReply, ErrorCode, ErrorReply, Message, Op, PublicKey, ReadMode, Request, StatusReply,
    HEADERS_PER_REPLY_MAX,
};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use crate::metrics::{BatchClose, Metrics};

/// An encoded frame on its way to a connection, holding the in-flight permit it answers.
pub struct Outgoing {
    pub bytes: Vec<u8>,
    pub _permit: OwnedSemaphorePermit,
}

/// Where the answer to one request goes.
pub struct ReplyTo {
    pub tx: mpsc::Sender<Outgoing>,
    pub correlation_id: u64,
    pub permit: OwnedSemaphorePermit,
    /// When the request's frame was read: the start of `tally_confirmation_seconds`.
    pub received: Instant,
    /// Every answer is counted here, so the counters match what clients were sent.
    pub metrics: Arc<Metrics>,
}

impl ReplyTo {
    pub fn send(self, message: &Message) {
        let bytes = message.encode_frame(self.correlation_id);
        // Counted before the client can see the answer, so a scrape after it never lags.
        match message {
            Message::Confirmed(c) if c.replayed => self.metrics.requests_replayed_total.inc(),
            Message::Confirmed(_) => {
                self.metrics.requests_confirmed_total.inc();
                let seconds = self.received.elapsed().as_secs_f64();
                self.metrics.confirmation_seconds.observe(seconds);
            }
            Message::Error(e) => self.metrics.rejected(e.code),
            _ => {}
        }
        // Fails only when the connection is gone; there is nobody left to tell.
        let _ = self.tx.try_send(Outgoing {
            bytes,
            _permit: self.permit,
        });
    }

    pub fn error(self, code: ErrorCode, message: impl Into<String>) {
        self.send(&Message::Error(ErrorReply::new(code, message)));
    }

    pub fn busy(self, what: &str, retry_after_ms: u32) {
        let mut reply = ErrorReply::new(ErrorCode::Busy, format!("{what} is full; retry later"));
        reply.retry_after_ms = retry_after_ms;
        self.send(&Message::Error(reply));
    }

    fn reject(self, r: Rejection) {
        self.error(r.code, r.message);
    }
}

/// A request travelling through the pipeline.
pub struct Job {
    pub request: Request,
    pub reply: ReplyTo,
    /// The applied height the snapshot stage checked the request against.
    pub snapshot_height: u64,
}

/// Commands to the storage thread, the one owner of the ledger database.
pub enum StorageCmd {
    /// Apply a sealed batch (single node: sealing is committing) and confirm its requests.
    Apply {
        body: BatchBody,
        replies: Vec<(u32, ReplyTo, bool)>,
    },
    /// Snapshot-stage lookups: request records and balances of the accounts named.
    Lookup {
        keys: Vec<(PublicKey, u128)>,
        accounts: Vec<PublicKey>,
        reply: Sender<CoreResult<LookupResult>>,
    },
    LoadAccount {
        key: PublicKey,
        reply: Sender<CoreResult<Option<u64>>>,
    },
    LoadRequest {
        signer: PublicKey,
        id: u128,
        reply: Sender<CoreResult<Option<RequestRecord>>>,
    },
    /// Send the original confirmation of an applied request.
    Replay {
        height: u64,
        index: u32,
        reply: ReplyTo,
    },
    Balance {
        account: PublicKey,
        reply: ReplyTo,
    },
    Headers {
        from_height: u64,
        limit: u16,
        reply: ReplyTo,
    },
    Status {
        reply: ReplyTo,
    },
    /// Stop after everything queued before it.
    Stop,
}

pub struct LookupResult {
    pub height: u64,
    pub records: Vec<Option<RequestRecord>>,
    pub balances: Vec<Option<u64>>,
}

/// Sizes and rules the pipeline is built with.
pub struct PipelineConfig {
    pub node_id: u64,
    pub rules: StatelessRules,
    pub stateless_workers: usize,
    pub snapshot_workers: usize,
    pub queue_depth_max: usize,
    pub batch_window: Duration,
    pub batch_in_flight_max: u64,
    pub metrics: Arc<Metrics>,
}

/// Handles the network side holds on the pipeline.
#[derive(Clone)]
pub struct PipelineHandle {
    pub stateless_tx: Sender<Job>,
    pub storage_tx: Sender<StorageCmd>,
    pub shutdown: Arc<AtomicBool>,
    pub metrics: Arc<Metrics>,
}

pub struct Pipeline {
    pub handle: PipelineHandle,
    storage_thread: JoinHandle<()>,
    confirm_thread: JoinHandle<()>,
}

impl Pipeline {
    pub fn start<S: LedgerStore + Send + 'static>(
        cfg: PipelineConfig,
        store: S,
        sequencer: Sequencer,
        operator: OperatorKey,
    ) -> Pipeline {
        let depth = cfg.queue_depth_max;
        let (stateless_tx, stateless_rx) = bounded::<Job>(depth);
        let (snapshot_tx, snapshot_rx) = bounded::<Job>(depth);
        let (master_tx, master_rx) = bounded::<Job>(depth);
        let (storage_tx, storage_rx) = bounded::<StorageCmd>(depth);
        let (confirm_tx, confirm_rx) = bounded::<ConfirmJob>(cfg.batch_in_flight_max as usize + 1);
        let (wake_tx, wake_rx) = bounded::<()>(1);
        let shutdown = Arc::new(AtomicBool::new(false));
        let applied = Arc::new(AtomicU64::new(sequencer.applied_height()));
        let rules = Arc::new(cfg.rules);
        let metrics = cfg.metrics;

        for i in 0..cfg.stateless_workers {
            let (rx, tx, rules) = (stateless_rx.clone(), snapshot_tx.clone(), rules.clone());
            let metrics = metrics.clone();
            spawn(format!("stateless-{i}"), move || {
                stateless_worker(rx, tx, &rules, &metrics)
            });
        }
        for i in 0..cfg.snapshot_workers {
            let (rx, tx, storage) = (snapshot_rx.clone(), master_tx.clone(), storage_tx.clone());
            let metrics = metrics.clone();
            spawn(format!("snapshot-{i}"), move || {
                snapshot_worker(rx, tx, storage, &metrics)
            });
        }
        let master = Master {
            rx: master_rx,
            storage: storage_tx.clone(),
            wake: wake_rx,
            applied: applied.clone(),
            shutdown: shutdown.clone(),
            sequencer,
            window: cfg.batch_window,
            in_flight_max: cfg.batch_in_flight_max,
            queues_before: vec![stateless_rx, snapshot_rx],
            metrics: metrics.clone(),
        };
        spawn("master".into(), move || master.run());
        let storage = StorageThread {
            store,
            operator,
            node_id: cfg.node_id,
            applied,
            wake: wake_tx,
            confirm: confirm_tx,
            metrics: metrics.clone(),
        };
        let storage_thread = spawn("storage".into(), move || storage.run(storage_rx));
        let confirm_metrics = metrics.clone();
        let confirm_thread = spawn("confirm".into(), move || {
            confirmer(confirm_rx, &confirm_metrics)
        });
        Pipeline {
            handle: PipelineHandle {
                stateless_tx,
                storage_tx,
                shutdown,
                metrics,
            },
            storage_thread,
            confirm_thread,
        }
    }

    /// Stops taking requests, lets the master seal and the storage thread apply what is in
    /// progress, and waits until the last confirmation is handed to its connection.
    pub fn shutdown(self) {
        self.handle.shutdown.store(true, Ordering::SeqCst);
        let _ = self.storage_thread.join();
        let _ = self.confirm_thread.join();
    }
}

fn spawn<F: FnOnce() + Send + 'static>(name: String, f: F) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name)
        .spawn(f)
        .expect("spawning a pipeline thread")
}

/// Stops the node: state on disk may be ahead of or behind what we hold in memory, and going on
/// could let this replica diverge. Restarting recovers from disk.
fn fatal(what: &str, e: &dyn std::fmt::Display) -> ! {
    tracing::error!("fatal: {what}: {e}; stopping the node");
    eprintln!("tally-server: fatal: {what}: {e}; stopping the node");
    std::process::exit(70)
}

fn stateless_worker(rx: Receiver<Job>, tx: Sender<Job>, rules: &StatelessRules, metrics: &Metrics) {
    while let Ok(job) = rx.recv() {
        let started = Instant::now();
        let checked = rules.check(&job.request);
        metrics
            .stateless
            .seconds
            .observe(started.elapsed().as_secs_f64());
        match checked {
            Ok(()) => {
                if tx.send(job).is_err() {
                    return;
                }
            }
            Err(r) => job.reply.reject(r),
        }
    }
}

/// Most jobs one snapshot lookup carries: amortizes the round trip to the storage thread.
const SNAPSHOT_CHUNK_MAX: usize = 256;

fn snapshot_worker(
    rx: Receiver<Job>,
    tx: Sender<Job>,
    storage: Sender<StorageCmd>,
    metrics: &Metrics,
) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < SNAPSHOT_CHUNK_MAX {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let keys = jobs
            .iter()
            .map(|j| (j.request.signer, j.request.id))
            .collect();
        let accounts = jobs.iter().map(|j| j.request.signer).collect();
        let (reply_tx, reply_rx) = bounded(1);
        let started = Instant::now();
        if storage
            .send(StorageCmd::Lookup {
                keys,
                accounts,
                reply: reply_tx,
            })
            .is_err()
        {
            return;
        }
        let result = match reply_rx.recv() {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => fatal("snapshot lookup", &e),
            Err(_) => return,
        };
        metrics
            .snapshot
            .seconds
            .observe(started.elapsed().as_secs_f64());
        for ((mut job, record), balance) in
            jobs.into_iter().zip(result.records).zip(result.balances)
        {
            if let Some(record) = record {
                if record.request_hash == tally_core::crypto::request_hash(&job.request) {
                    let (height, index) = (record.height, record.index);
                    let _ = storage.send(StorageCmd::Replay {
                        height,
                        index,
                        reply: job.reply,
                    });
                } else {
                    job.reply.error(
                        ErrorCode::IdConflict,
                        "this id was already used by this signer for a different request",
                    );
                }
                continue;
            }
            if job.request.op != Op::Deposit {
                match balance {
                    None => {
                        job.reply.error(
                            ErrorCode::UnknownAccount,
                            "the account does not exist (as of the latest applied batch)",
                        );
                        continue;
                    }
                    Some(b) if b < job.request.amount => {
                        job.reply.error(
                            ErrorCode::InsufficientFunds,
                            format!(
                                "balance {b} is less than {} (as of the latest applied batch)",
                                job.request.amount
                            ),
                        );
                        continue;
                    }
                    Some(_) => {}
                }
            }
            job.snapshot_height = result.height;
            if tx.send(job).is_err() {
                return;
            }
        }
    }
}

/// The master's view of committed state: synchronous reads through the storage thread. Used
/// only on a cache miss of the sequencer, which is what `tally_account_cache_misses_total` counts.
struct StorageReader<'a>(&'a Sender<StorageCmd>, &'a Metrics);

impl LedgerRead for StorageReader<'_> {
    fn account(&mut self, key: &PublicKey) -> CoreResult<Option<u64>> {
        self.1.account_cache_misses_total.inc();
        let (tx, rx) = bounded(1);
        self.0
            .send(StorageCmd::LoadAccount {
                key: *key,
                reply: tx,
            })
            .map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())?
    }
    fn request(&mut self, signer: &PublicKey, id: u128) -> CoreResult<Option<RequestRecord>> {
        let (tx, rx) = bounded(1);
        self.0
            .send(StorageCmd::LoadRequest {
                signer: *signer,
                id,
                reply: tx,
            })
            .map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())?
    }
}

fn gone() -> tally_core::Error {
    tally_core::Error::Storage("the storage thread has stopped".into())
}

struct Master {
    rx: Receiver<Job>,
    storage: Sender<StorageCmd>,
    wake: Receiver<()>,
    applied: Arc<AtomicU64>,
    shutdown: Arc<AtomicBool>,
    sequencer: Sequencer,
    window: Duration,
    in_flight_max: u64,
    /// The queues upstream of the master, watched at shutdown so the batch in progress is whole.
    queues_before: Vec<Receiver<Job>>,
    metrics: Arc<Metrics>,
}

impl Master {
    fn run(mut self) {
        let mut replies: Vec<(u32, ReplyTo, bool)> = Vec::new();
        let mut opened_at: Option<Instant> = None;
        let idle = Duration::from_millis(50);
        loop {
            self.sequencer.applied(self.applied.load(Ordering::SeqCst));
            // The master samples the depths of its own queue and those before it (stateless,
            // snapshot): it wakes at least every `idle`, even while the workers are blocked.
            let m = &self.metrics;
            m.master.queue_depth.set(self.rx.len() as i64);
            for (q, stage) in self.queues_before.iter().zip([&m.stateless, &m.snapshot]) {
                stage.queue_depth.set(q.len() as i64);
            }
            let timeout = opened_at.map_or(idle, |t| {
                (t + self.window).saturating_duration_since(Instant::now())
            });
            if self.sequencer.is_full() {
                select! {
                    recv(self.wake) -> _ => {},
                    default(timeout) => {},
                }
            } else {
                select! {
                    recv(self.rx) -> job => match job {
                        Ok(job) => {
                            let started = Instant::now();
                            self.take(job, &mut replies, &mut opened_at);
                            let seconds = started.elapsed().as_secs_f64();
                            self.metrics.master.seconds.observe(seconds);
                        }
                        Err(_) => return,
                    },
                    recv(self.wake) -> _ => {},
                    default(timeout) => {},
                }
            }
            let stopping = self.shutdown.load(Ordering::SeqCst)
                && self.rx.is_empty()
                && self.queues_before.iter().all(|q| q.is_empty());
            let due = self.sequencer.is_full()
                || opened_at.is_some_and(|t| t.elapsed() >= self.window)
                || stopping;
            let in_flight = self.sequencer.sealed_height() - self.applied.load(Ordering::SeqCst);
            if due && (in_flight < self.in_flight_max || stopping) {
                let reason = if self.sequencer.is_full() {
                    BatchClose::Full
                } else if opened_at.is_some_and(|t| t.elapsed() >= self.window) {
                    BatchClose::Window
                } else {
                    BatchClose::Shutdown
                };
                if let Some(body) = self.sequencer.seal(0, unix_ms()) {
                    self.metrics.batch_closed(reason);
                    self.metrics
                        .batch_requests
                        .observe(body.entries.len() as f64);
                    tracing::debug!(
                        height = body.header.height,
                        requests = body.entries.len(),
                        reason = reason.name(),
                        open_ms = opened_at.map_or(0, |t| t.elapsed().as_millis() as u64),
                        "batch sealed"
                    );
                    let replies = std::mem::take(&mut replies);
                    if self
                        .storage
                        .send(StorageCmd::Apply { body, replies })
                        .is_err()
                    {
                        return;
                    }
                }
                opened_at = None;
            }
            if stopping {
                let _ = self.storage.send(StorageCmd::Stop);
                return;
            }
        }
    }

    fn take(
        &mut self,
        job: Job,
        replies: &mut Vec<(u32, ReplyTo, bool)>,
        opened_at: &mut Option<Instant>,
    ) {
        let Job {
            request,
            reply,
            snapshot_height,
        } = job;
        let open_height = self.sequencer.sealed_height() + 1;
        match self.sequencer.submit(
            request,
            snapshot_height,
            &mut StorageReader(&self.storage, &self.metrics),
        ) {
            Ok(Submitted::Accepted { index, .. }) => {
                opened_at.get_or_insert_with(Instant::now);
                replies.push((index, reply, false));
            }
            Ok(Submitted::InFlight { height, index }) if height == open_height => {
                replies.push((index, reply, true))
            }
            // Sealed earlier: the storage thread gets this after that batch's Apply.
            Ok(Submitted::InFlight { height, index })
            | Ok(Submitted::Applied(RequestRecord { height, index, .. })) => {
                let _ = self.storage.send(StorageCmd::Replay {
                    height,
                    index,
                    reply,
                });
            }
            Ok(Submitted::Rejected(r)) => reply.reject(r),
            Err(e) => fatal("sequencing", &e),
        }
    }
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

struct ConfirmJob {
    body: BatchBody,
    signed: tally_wire::SignedHeader,
    replies: Vec<(u32, ReplyTo, bool)>,
}

/// Builds the Merkle tree of each applied batch once and sends every confirmation.
fn confirmer(rx: Receiver<ConfirmJob>, metrics: &Metrics) {
    while let Ok(job) = rx.recv() {
        metrics.confirm.queue_depth.set(rx.len() as i64);
        let started = Instant::now();
        let confirmations = job.body.confirmations(&job.signed);
        for (index, reply, replayed) in job.replies {
            let mut c = confirmations[index as usize].clone();
            c.replayed = replayed;
            reply.send(&Message::Confirmed(Box::new(c)));
        }
        metrics
            .confirm
            .seconds
            .observe(started.elapsed().as_secs_f64());
    }
}

struct StorageThread<S> {
    store: S,
    operator: OperatorKey,
    node_id: u64,
    applied: Arc<AtomicU64>,
    wake: Sender<()>,
    confirm: Sender<ConfirmJob>,
    metrics: Arc<Metrics>,
}

impl<S: LedgerStore> StorageThread<S> {
    fn run(mut self, rx: Receiver<StorageCmd>) {
        let mut meta = self
            .store
            .meta()
            .unwrap_or_else(|e| fatal("reading ledger meta", &e));
        while let Ok(cmd) = rx.recv() {
            self.metrics.storage.queue_depth.set(rx.len() as i64);
            match cmd {
                StorageCmd::Apply { body, replies } => {
                    let started = Instant::now();
                    let encoded = body.encode();
                    let write =
                        prepare_apply(&body, encoded, &meta, &mut self.store, &self.operator)
                            .unwrap_or_else(|e| fatal("applying a committed batch", &e));
                    let prepared = Instant::now();
                    if let Err(e) = self.store.apply(&write) {
                        fatal("writing a committed batch", &e);
                    }
                    let written = Instant::now();
                    meta = write.meta;
                    let m = &self.metrics;
                    m.apply_prepare_seconds
                        .observe((prepared - started).as_secs_f64());
                    m.durable_write_seconds
                        .observe((written - prepared).as_secs_f64());
                    m.storage.seconds.observe((written - started).as_secs_f64());
                    m.batch_body_bytes.observe(write.body.len() as f64);
                    m.applied_height.set(meta.height as i64);
                    // Single node: committing is applying. Replication will own these two.
                    m.raft.commit_index.set(meta.height as i64);
                    m.raft.applied_index.set(meta.height as i64);
                    tracing::debug!(
                        height = meta.height,
                        requests = body.entries.len(),
                        body_bytes = write.body.len(),
                        prepare_us = (prepared - started).as_micros() as u64,
                        write_us = (written - prepared).as_micros() as u64,
                        "batch applied"
                    );
                    self.applied.store(meta.height, Ordering::SeqCst);
                    let _ = self.wake.try_send(());
                    let signed = write.signed_header;
                    let _ = self.confirm.send(ConfirmJob {
                        body,
                        signed,
                        replies,
                    });
                    m.confirm.queue_depth.set(self.confirm.len() as i64);
                }
                StorageCmd::Lookup {
                    keys,
                    accounts,
                    reply,
                } => {
                    let result = (|| {
                        let mut records = Vec::with_capacity(keys.len());
                        for (signer, id) in &keys {
                            records.push(self.store.request(signer, *id)?);
                        }
                        let mut balances = Vec::with_capacity(accounts.len());
                        for a in &accounts {
                            balances.push(self.store.account(a)?);
                        }
                        Ok(LookupResult {
                            height: meta.height,
                            records,
                            balances,
                        })
                    })();
                    let _ = reply.send(result);
                }
                StorageCmd::LoadAccount { key, reply } => {
                    let _ = reply.send(self.store.account(&key));
                }
                StorageCmd::LoadRequest { signer, id, reply } => {
                    let _ = reply.send(self.store.request(&signer, id));
                }
                StorageCmd::Replay {
                    height,
                    index,
                    reply,
                } => match self.confirmation(height, index) {
                    Ok(Some(c)) => reply.send(&Message::Confirmed(Box::new(c))),
                    Ok(None) => reply.error(
                        ErrorCode::Internal,
                        format!("batch {height} entry {index} is not stored"),
                    ),
                    Err(e) => fatal("reading a stored batch", &e),
                },
                StorageCmd::Balance { account, reply } => match self.store.account(&account) {
                    Ok(b) => reply.send(&Message::Balance(BalanceReply {
                        account,
                        exists: b.is_some(),
                        balance: b.unwrap_or(0),
                        height: meta.height,
                        mode: ReadMode::Linearizable,
                    })),
                    Err(e) => fatal("reading an account", &e),
                },
                StorageCmd::Headers {
                    from_height,
                    limit,
                    reply,
                } => {
                    let limit = limit.clamp(1, HEADERS_PER_REPLY_MAX) as u64;
                    let from = from_height.max(1);
                    let mut headers = Vec::new();
                    for h in from..from.saturating_add(limit).min(meta.height + 1) {
                        match self.store.header(h) {
                            Ok(Some(sh)) => headers.push(sh),
                            Ok(None) => break,
                            Err(e) => fatal("reading a header", &e),
                        }
                    }
                    reply.send(&Message::Headers(headers));
                }
                StorageCmd::Status { reply } => {
                    let latest = if meta.height == 0 {
                        None
                    } else {
                        self.store
                            .header(meta.height)
                            .unwrap_or_else(|e| fatal("reading a header", &e))
                    };
                    reply.send(&Message::Status(Box::new(StatusReply {
                        node_id: self.node_id,
                        role: 4,
                        term: 0,
                        leader_id: self.node_id,
                        commit_index: meta.height,
                        applied_index: meta.height,
                        applied_height: meta.height,
                        writable: true,
                        leader_client_address: String::new(),
                        latest_header: latest,
                    })));
                }
                StorageCmd::Stop => return,
            }
        }
    }

    fn confirmation(
        &mut self,
        height: u64,
        index: u32,
    ) -> CoreResult<Option<tally_wire::Confirmation>> {
        let (Some(bytes), Some(signed)) = (self.store.body(height)?, self.store.header(height)?)
        else {
            return Ok(None);
        };
        let body = BatchBody::decode(&bytes)?;
        if index as usize >= body.entries.len() {
            return Ok(None);
        }
        let tree = tally_core::merkle::Tree::new(&body.leaf_hashes());
        let e = &body.entries[index as usize];
        Ok(Some(tally_wire::Confirmation {
            replayed: true,
            request: e.request.clone(),
            receipt: e.receipt.clone(),
            header: signed,
            proof: tree.proof(index),
        }))
    }
}

/// Sends a job into the pipeline without waiting: a full queue answers `busy`.
pub fn submit(handle: &PipelineHandle, job: Job) {
    if handle.shutdown.load(Ordering::SeqCst) {
        job.reply
            .error(ErrorCode::ShuttingDown, "the server is shutting down");
        return;
    }
    match handle.stateless_tx.try_send(job) {
        Ok(()) => {}
        Err(TrySendError::Full(job)) => {
            handle.metrics.busy("stateless");
            job.reply.busy("the validation queue", 50)
        }
        Err(TrySendError::Disconnected(job)) => job
            .reply
            .error(ErrorCode::ShuttingDown, "the pipeline has stopped"),
    }
}

/// Sends a read command to the storage thread without waiting.
pub fn read(handle: &PipelineHandle, cmd: StorageCmd) {
    match handle.storage_tx.try_send(cmd) {
        Ok(()) => {}
        Err(TrySendError::Full(cmd)) | Err(TrySendError::Disconnected(cmd)) => match cmd {
            StorageCmd::Balance { reply, .. }
            | StorageCmd::Headers { reply, .. }
            | StorageCmd::Status { reply } => {
                handle.metrics.busy("storage");
                reply.busy("the storage queue", 20)
            }
            _ => unreachable!("read() is only for reads answered through a connection"),
        },
    }
}
