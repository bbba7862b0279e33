//! The request pipeline on plain threads: stateless validation pool → snapshot validation pool →
//! master (sequencing) → raft thread (commit, see `replication`) → storage (apply) → confirmer.
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
//!
//! Replies go to a connection's outgoing queue with `try_send`; that never fails for lack of room,
//! because every reply carries one of the connection's in-flight permits and the queue has room
//! for all of them.
//!
//! The storage thread is the one owner of the LevelDB handle. It serves reads and applies
//! committed batches in the order it receives them; an IO error or a divergence there stops the
//! process, since going on could let this replica's state differ from the others'.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{bounded, select, Receiver, Sender, TrySendError};
use tally_core::batch::{prepare_apply, BatchBody};
use tally_core::crypto::OperatorKey;
use tally_core::ports::{LedgerRead, LedgerStore, RequestRecord};
use tally_core::replica::ReplicaStatus;
use tally_core::sequencer::{Sequencer, SequencerConfig, Submitted};
use tally_core::state::LedgerMeta;
use tally_core::validate::StatelessRules;
use tally_core::{Rejection, Result as CoreResult};
use tally_storage::archiver::ArchiveProgress;
use tally_wire::{
    BalanceReply, ErrorCode, ErrorReply, Hash, Message, Op, PublicKey, ReadMode, Request,
    SignedHeader, StatusReply, HEADERS_PER_REPLY_MAX,
};
use tokio::sync::mpsc;

use crate::metrics::{BatchClose, Metrics};
use crate::replication::{Applied, ClusterView, MasterEvent, RaftEvent};

/// An encoded frame on its way to a connection, holding the in-flight permit and the reply
/// bytes reserved for it (`limits.rs`) until it was written.
pub struct Outgoing {
    pub bytes: Vec<u8>,
    pub _permit: crate::limits::ReplyPermit,
}

/// Where the answer to one request goes.
pub struct ReplyTo {
    pub tx: mpsc::Sender<Outgoing>,
    pub correlation_id: u64,
    pub permit: crate::limits::ReplyPermit,
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
            Message::Confirmed(c) if c.replayed => self.metrics.batches.replayed_total.inc(),
            Message::Confirmed(_) => {
                self.metrics.batches.confirmed_total.inc();
                let seconds = self.received.elapsed().as_secs_f64();
                self.metrics.batches.confirmation_seconds.observe(seconds);
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
    /// The signer's nonce hint, if the client sent one (`SubmitHinted`): lets the stateless
    /// stage check the signature in a batch. With it, the connection's switch for hints, which
    /// the stateless stage turns off when a hinted signature turns out bad.
    pub hint: Option<(tally_wire::NonceHint, Arc<AtomicBool>)>,
    pub reply: ReplyTo,
    /// The applied height the snapshot stage checked the request against.
    pub snapshot_height: u64,
}

/// Commands to the storage thread, the one owner of the ledger database. It applies committed
/// batches and serves reads, in the order the commands arrive.
pub enum StorageCmd {
    /// Apply a committed batch (raft log entry `raft_index`) and confirm its requests.
    Apply {
        body: BatchBody,
        replies: Vec<(u32, ReplyTo, bool)>,
        raft_index: u64,
    },
    /// A committed raft entry that carries no batch (raft's own empty entries).
    AppliedIndex { raft_index: u64 },
    /// Bring the ledger to (at least) the state a raft snapshot describes.
    InstallSnapshot {
        index: u64,
        descriptor: Vec<u8>,
        done: Sender<CoreResult<()>>,
    },
    /// Stream the whole ledger (one consistent view) to a peer installing a snapshot.
    Dump {
        chunk_bytes_max: usize,
        out: mpsc::Sender<Vec<u8>>,
        done: Sender<CoreResult<LedgerMeta>>,
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
    /// Send the original confirmation of a request applied (or about to be) at `height`.
    Replay {
        height: u64,
        index: u32,
        request_hash: Hash,
        reply: ReplyTo,
    },
    Balance {
        account: PublicKey,
        mode: ReadMode,
        reply: ReplyTo,
    },
    Headers {
        from_height: u64,
        limit: u16,
        reply: ReplyTo,
    },
    Status {
        raft: ReplicaStatus,
        /// Whether this replica's master is sequencing (it leads and has caught up).
        writable: bool,
        leader_client_address: String,
        reply: ReplyTo,
    },
    /// The applied batches `from..=to` for the archive writer: (signed header, encoded body),
    /// stopping early (after at least one) past `bytes_max`.
    ReadBatches {
        from: u64,
        to: u64,
        bytes_max: usize,
        reply: tokio::sync::oneshot::Sender<CoreResult<Vec<(SignedHeader, Vec<u8>)>>>,
    },
    /// Stop after everything queued before it.
    Stop,
}

impl StorageCmd {
    /// The connection a read command answers, if it is one.
    pub fn into_reply(self) -> Option<ReplyTo> {
        match self {
            StorageCmd::Replay { reply, .. }
            | StorageCmd::Balance { reply, .. }
            | StorageCmd::Headers { reply, .. }
            | StorageCmd::Status { reply, .. } => Some(reply),
            _ => None,
        }
    }
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
    pub sequencer: SequencerConfig,
    pub stateless_workers: usize,
    pub snapshot_workers: usize,
    pub queue_depth_max: usize,
    pub batch_window: Duration,
    pub batch_close_idle: bool,
    pub batch_in_flight_max: u64,
    pub metrics: Arc<Metrics>,
    /// The archive's bounds, when an archive is configured.
    pub archive: Option<Arc<ArchiveGate>>,
    /// Serve reads only: the ledger was restored below the archive's tip.
    pub read_only: bool,
}

/// What the pipeline needs of the archive writer: how far it is, and the two rules that hang
/// on it (`archive.max_lag_batches`, `archive.confirm_after_archive`).
pub struct ArchiveGate {
    pub progress: Arc<ArchiveProgress>,
    /// Applied batches handed to the archive writer as they are applied (bounded; dropped
    /// when full, and then read back from the ledger).
    pub feed: Sender<(SignedHeader, bytes::Bytes)>,
    /// Wakes the archive writer when a batch was applied.
    pub applied: Arc<tokio::sync::Notify>,
    pub max_lag_batches: u64,
    pub confirm_after_archive: bool,
}

impl ArchiveGate {
    /// Committed batches the archive does not hold yet (as far as this replica knows).
    pub fn lag(&self, applied_height: u64) -> u64 {
        applied_height.saturating_sub(self.progress.height.load(Ordering::SeqCst))
    }

    /// Why this replica must not take writes now, if it must not: it has not read the archive
    /// yet, or its ledger is below the height the archive had when it was first read (it would
    /// sign headers the archive already has: a fork). A replica behind for an ordinary reason
    /// catches up through raft first and never meets this; one whose data was lost does.
    pub fn refuses_writes(&self, applied_height: u64) -> Option<String> {
        if !self.progress.known.load(Ordering::SeqCst) {
            return Some("the archive has not been read yet; retry later".into());
        }
        let floor = self.progress.floor.load(Ordering::SeqCst);
        (applied_height < floor).then(|| {
            format!(
                "this replica's ledger (height {applied_height}) is behind the archive \
                 (height {floor}): it takes writes once it has caught up"
            )
        })
    }
}

/// The channels between the pipeline and the raft thread.
pub struct RaftWiring {
    pub raft_tx: Sender<RaftEvent>,
    pub master_events: Receiver<MasterEvent>,
    pub applied: Arc<Applied>,
    pub view: Arc<ClusterView>,
    pub storage_tx: Sender<StorageCmd>,
    pub storage_rx: Receiver<StorageCmd>,
}

/// Handles the network side holds on the pipeline.
#[derive(Clone)]
pub struct PipelineHandle {
    pub stateless_tx: Sender<Job>,
    pub storage_tx: Sender<StorageCmd>,
    pub raft_tx: Sender<RaftEvent>,
    pub view: Arc<ClusterView>,
    pub shutdown: Arc<AtomicBool>,
    pub metrics: Arc<Metrics>,
    pub applied_height: Arc<AtomicU64>,
    pub archive: Option<Arc<ArchiveGate>>,
    pub read_only: bool,
}

pub struct Pipeline {
    pub handle: PipelineHandle,
    storage_thread: JoinHandle<()>,
    confirm_thread: JoinHandle<()>,
}

impl Pipeline {
    pub fn start<S: LedgerStore + Send + 'static>(
        cfg: PipelineConfig,
        wiring: RaftWiring,
        store: S,
        operator: OperatorKey,
        installer: Box<dyn SnapshotTransfer<S>>,
    ) -> Pipeline {
        let depth = cfg.queue_depth_max;
        let (stateless_tx, stateless_rx) = bounded::<Job>(depth);
        let (snapshot_tx, snapshot_rx) = bounded::<Job>(depth);
        let (master_tx, master_rx) = bounded::<Job>(depth);
        let storage_tx = wiring.storage_tx.clone();
        let (confirm_tx, confirm_rx) = bounded::<ConfirmJob>(cfg.batch_in_flight_max as usize + 1);
        let (wake_tx, wake_rx) = bounded::<()>(1);
        let shutdown = Arc::new(AtomicBool::new(false));
        let applied_height = Arc::new(AtomicU64::new(
            wiring.applied.meta.lock().expect("meta lock").height,
        ));
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
        let accounts_cached_max = cfg.sequencer.accounts_cached_max;
        let master = Master {
            rx: master_rx,
            storage: storage_tx.clone(),
            raft: wiring.raft_tx.clone(),
            events: wiring.master_events,
            view: wiring.view.clone(),
            wake: wake_rx,
            applied_height: applied_height.clone(),
            shutdown: shutdown.clone(),
            sequencer_cfg: cfg.sequencer,
            leading: None,
            window: cfg.batch_window,
            close_idle: cfg.batch_close_idle,
            in_flight_max: cfg.batch_in_flight_max,
            queues_before: vec![stateless_rx, snapshot_rx],
            metrics: metrics.clone(),
        };
        spawn("master".into(), move || master.run());
        let storage = StorageThread {
            archive: cfg.archive.clone(),
            store: Some(store),
            operator,
            node_id: cfg.node_id,
            applied_height: applied_height.clone(),
            applied: wiring.applied,
            raft: wiring.raft_tx.clone(),
            wake: wake_tx,
            confirm: confirm_tx,
            installer,
            accounts: AccountCache::new(accounts_cached_max),
            lookups_seen: (0, 0, 0),
            metrics: metrics.clone(),
        };
        let storage_rx = wiring.storage_rx;
        let storage_thread = spawn("storage".into(), move || storage.run(storage_rx));
        let confirm_metrics = metrics.clone();
        let wait_for = cfg
            .archive
            .clone()
            .filter(|gate| gate.confirm_after_archive)
            .map(|gate| (gate, shutdown.clone()));
        let confirm_thread = spawn("confirm".into(), move || {
            confirmer(confirm_rx, &confirm_metrics, wait_for)
        });
        Pipeline {
            handle: PipelineHandle {
                stateless_tx,
                storage_tx,
                raft_tx: wiring.raft_tx,
                view: wiring.view,
                shutdown,
                metrics,
                applied_height,
                archive: cfg.archive,
                read_only: cfg.read_only,
            },
            storage_thread,
            confirm_thread,
        }
    }

    /// Stops taking requests, lets the master seal the batch in progress, the raft thread commit
    /// what was proposed and the storage thread apply it, and waits until the last confirmation
    /// is handed to its connection.
    pub fn shutdown(self) {
        self.handle.shutdown.store(true, Ordering::SeqCst);
        let _ = self.storage_thread.join();
        let _ = self.confirm_thread.join();
    }
}

/// Ledger snapshots between replicas. Runs on the storage thread, which owns the store.
pub trait SnapshotTransfer<S>: Send {
    /// Brings the ledger to (at least) the state a raft snapshot describes, fetched from a peer.
    /// May close and reopen the store; it must be `Some` again when this returns.
    fn install(&mut self, store: &mut Option<S>, index: u64, descriptor: &[u8]) -> CoreResult<()>;
    /// Streams the ledger in chunks of at most `chunk_bytes_max` bytes.
    fn dump(
        &mut self,
        store: &mut S,
        chunk_bytes_max: usize,
        out: &mut dyn FnMut(Vec<u8>) -> CoreResult<()>,
    ) -> CoreResult<LedgerMeta>;
}

fn spawn<F: FnOnce() + Send + 'static>(name: String, f: F) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name)
        .spawn(f)
        .expect("spawning a pipeline thread")
}

/// Stops the node: state on disk may be ahead of or behind what we hold in memory, and going on
/// could let this replica diverge. Restarting recovers from disk.
pub fn fatal(what: &str, e: &dyn std::fmt::Display) -> ! {
    tracing::error!("fatal: {what}: {e}; stopping the node");
    eprintln!("tally-server: fatal: {what}: {e}; stopping the node");
    std::process::exit(70)
}

/// Waits for one job, then takes whatever else is queued, up to `max` in all, without waiting
/// for more. None once the queue is closed.
fn recv_chunk(rx: &Receiver<Job>, max: usize) -> Option<Vec<Job>> {
    let mut jobs = vec![rx.recv().ok()?];
    while jobs.len() < max {
        match rx.try_recv() {
            Ok(job) => jobs.push(job),
            Err(_) => break,
        }
    }
    Some(jobs)
}

/// Decompressed signer keys each stateless worker keeps.
const KEY_CACHE_MAX: usize = 65_536;

/// Most jobs one stateless worker takes from its queue at once: their hinted signatures are
/// checked in one batch equation (`KeyCache::verify_requests`). A worker takes what is queued
/// and does not wait for more, so a lone request is not held back. Under load the chunks fill
/// (`tally_signature_batch_size`), and bigger equations cost less per signature (here ~17.8 us
/// at 128, ~15.5 us at 512, one core). Measured with `tally-bench --start-server --duration
/// 20s`: 512 gave 55-58k/s, 1,024 63.3-63.6k/s, 2,048 63.4-64.9k/s; 1,024 holds a worker
/// ~15 ms, half what 2,048 would, for about the same rate.
const STATELESS_CHUNK_MAX: usize = 1024;

fn stateless_worker(rx: Receiver<Job>, tx: Sender<Job>, rules: &StatelessRules, metrics: &Metrics) {
    use rand::SeedableRng;
    let mut keys = tally_core::crypto::KeyCache::new(KEY_CACHE_MAX);
    // The batch weights must be unpredictable to signers: a CSPRNG seeded from the OS.
    let mut rng = rand::rngs::StdRng::from_entropy();
    while let Some(jobs) = recv_chunk(&rx, STATELESS_CHUNK_MAX) {
        let started = Instant::now();
        let taken = jobs.len();
        let mut signed = Vec::with_capacity(jobs.len());
        for job in jobs {
            match rules.check_unsigned(&job.request) {
                Ok(()) => signed.push(job),
                Err(r) => job.reply.reject(r),
            }
        }
        let items: Vec<_> = signed
            .iter()
            .map(|j| (&j.request, j.hint.as_ref().map(|(h, _)| h)))
            .collect();
        let (verified, stats) = keys.verify_requests(&items, &mut rng);
        metrics.signature_checks(&stats);
        // Time per request: the chunk's time shared among its requests.
        let each = started.elapsed().as_secs_f64() / taken as f64;
        for _ in 0..taken {
            metrics.stateless.seconds.observe(each);
        }
        for (job, ok) in signed.into_iter().zip(verified) {
            if !ok {
                if let Some((_, hints)) = &job.hint {
                    hints.store(false, Ordering::Relaxed);
                }
                job.reply.reject(tally_core::validate::bad_signature());
            } else if tx.send(job).is_err() {
                return;
            }
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
    while let Some(jobs) = recv_chunk(&rx, SNAPSHOT_CHUNK_MAX) {
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
                    let _ = storage.send(StorageCmd::Replay {
                        height: record.height,
                        index: record.index,
                        request_hash: record.request_hash,
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
        self.1.batches.account_cache_misses_total.inc();
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

/// How long the queues before the master must stay empty during a shutdown before it seals.
const SHUTDOWN_QUIET: Duration = Duration::from_millis(100);

/// The master's sequencing state while this replica leads.
struct Leading {
    sequencer: Sequencer,
    term: u64,
    epoch: u64,
}

struct Master {
    rx: Receiver<Job>,
    storage: Sender<StorageCmd>,
    raft: Sender<RaftEvent>,
    events: Receiver<MasterEvent>,
    view: Arc<ClusterView>,
    wake: Receiver<()>,
    applied_height: Arc<AtomicU64>,
    shutdown: Arc<AtomicBool>,
    sequencer_cfg: SequencerConfig,
    leading: Option<Leading>,
    window: Duration,
    close_idle: bool,
    in_flight_max: u64,
    /// The queues upstream of the master, watched at shutdown so the batch in progress is whole.
    queues_before: Vec<Receiver<Job>>,
    metrics: Arc<Metrics>,
}

/// How long an idle close waits for requests still in validation: this fraction of the window.
const IDLE_WAIT_WINDOW_FRACTION: u32 = 5;

impl Master {
    fn run(mut self) {
        let mut replies: Vec<(u32, ReplyTo, bool)> = Vec::new();
        let mut opened_at: Option<Instant> = None;
        let mut quiet_since: Option<Instant> = None;
        let idle = Duration::from_millis(50);
        loop {
            let applied = self.applied_height.load(Ordering::SeqCst);
            if let Some(l) = self.leading.as_mut() {
                l.sequencer
                    .applied(applied.min(l.sequencer.sealed_height()));
            }
            // The master samples the depths of its own queue and those before it (stateless,
            // snapshot): it wakes at least every `idle`, even while the workers are blocked.
            let m = &self.metrics;
            m.master.queue_depth.set(self.rx.len() as i64);
            for (q, stage) in self.queues_before.iter().zip([&m.stateless, &m.snapshot]) {
                stage.queue_depth.set(q.len() as i64);
            }
            // Wakes for the window's end, and for the end of an idle close's wait before it.
            let timeout = opened_at.map_or(idle, |t| {
                let idle_wait = t + self.window / IDLE_WAIT_WINDOW_FRACTION;
                let next = if idle_wait > Instant::now() {
                    idle_wait
                } else {
                    t + self.window
                };
                next.saturating_duration_since(Instant::now())
            });
            let full = self.leading.as_ref().is_some_and(|l| l.sequencer.is_full());
            if full {
                select! {
                    recv(self.events) -> e => match e {
                        Ok(e) => self.event(e, &mut replies, &mut opened_at),
                        Err(_) => return,
                    },
                    recv(self.wake) -> _ => {},
                    default(timeout) => {},
                }
            } else {
                select! {
                    recv(self.events) -> e => match e {
                        Ok(e) => self.event(e, &mut replies, &mut opened_at),
                        Err(_) => return,
                    },
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
            let open = self.leading.as_ref().map_or(0, |l| l.sequencer.open_len());
            self.metrics.batches.open_requests.set(open as i64);
            // Stop once no request has been queued for a moment after the shutdown began: a
            // job a validation worker holds (not in any queue) reaches the master well within
            // it, so the batch in progress is whole. Connections take no new requests by then.
            let drained = self.shutdown.load(Ordering::SeqCst)
                && self.rx.is_empty()
                && self.queues_before.iter().all(|q| q.is_empty());
            if !drained {
                quiet_since = None;
            }
            let stopping =
                drained && quiet_since.get_or_insert_with(Instant::now).elapsed() >= SHUTDOWN_QUIET;
            if let Some(l) = self.leading.as_mut() {
                let full = l.sequencer.is_full();
                let window_over = opened_at.is_some_and(|t| t.elapsed() >= self.window);
                let in_flight = l.sequencer.sealed_height().saturating_sub(applied);
                // Group commit: with no batch replicating or being applied, holding the batch
                // open only adds latency, unless requests are still on their way through
                // validation: then it waits for them, for at most a fifth of the window.
                // (Waiting for the queues to drain without that limit left batches open for the
                // whole window whenever requests kept coming during a slow write: p99 at half
                // load 164-174 ms. Not waiting at all made batches of ~5 requests when
                // validation was slow, with a million accounts: 11k/s against 58k/s.)
                let upstream_empty =
                    self.rx.is_empty() && self.queues_before.iter().all(|q| q.is_empty());
                let idle = self.close_idle
                    && in_flight == 0
                    && opened_at.is_some_and(|t| {
                        upstream_empty || t.elapsed() >= self.window / IDLE_WAIT_WINDOW_FRACTION
                    });
                let due = full || window_over || stopping || idle;
                if due && (in_flight < self.in_flight_max || stopping) {
                    let reason = if full {
                        BatchClose::Full
                    } else if window_over {
                        BatchClose::Window
                    } else if idle {
                        BatchClose::Idle
                    } else {
                        BatchClose::Shutdown
                    };
                    if let Some(body) = l.sequencer.seal(l.term, unix_ms()) {
                        self.metrics.batch_closed(reason);
                        self.metrics
                            .batches
                            .requests
                            .observe(body.entries.len() as f64);
                        tracing::debug!(
                            height = body.header.height,
                            requests = body.entries.len(),
                            reason = reason.name(),
                            open_ms = opened_at.map_or(0, |t| t.elapsed().as_millis() as u64),
                            "batch sealed"
                        );
                        let replies = std::mem::take(&mut replies);
                        let epoch = l.epoch;
                        if self
                            .raft
                            .send(RaftEvent::Propose {
                                body,
                                replies,
                                epoch,
                            })
                            .is_err()
                        {
                            return;
                        }
                    }
                    opened_at = None;
                }
            }
            if stopping {
                // The raft thread commits what was proposed, then stops the storage thread.
                let _ = self.raft.send(RaftEvent::Drain);
                return;
            }
        }
    }

    fn event(
        &mut self,
        event: MasterEvent,
        replies: &mut Vec<(u32, ReplyTo, bool)>,
        opened_at: &mut Option<Instant>,
    ) {
        // Whatever happens, the open batch of the old state is void.
        let refusal = self.view.not_writable();
        for (_, reply, _) in replies.drain(..) {
            reply.send(&Message::Error(refusal.clone()));
        }
        *opened_at = None;
        self.leading = match event {
            MasterEvent::Lead { term, epoch, meta } => {
                self.applied_height.store(meta.height, Ordering::SeqCst);
                Some(Leading {
                    sequencer: Sequencer::new(self.sequencer_cfg.clone(), meta),
                    term,
                    epoch,
                })
            }
            MasterEvent::Follow => None,
        };
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
            ..
        } = job;
        let Some(l) = self.leading.as_mut() else {
            reply.send(&Message::Error(self.view.not_writable()));
            return;
        };
        let request_hash = tally_core::crypto::request_hash(&request);
        let open_height = l.sequencer.sealed_height() + 1;
        match l.sequencer.submit(
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
                    request_hash,
                    reply,
                });
            }
            Ok(Submitted::Rejected(r)) => reply.reject(r),
            Err(e) => fatal("sequencing", &e),
        }
        let hits = l.sequencer.take_cache_hits();
        self.metrics.batches.account_cache_hits_total.inc_by(hits);
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

/// How long a confirmation waits for the archive once the node is stopping, before its
/// client is told to retry (with `archive.confirm_after_archive`).
const ARCHIVE_WAIT_AT_STOP: Duration = Duration::from_secs(5);

/// Builds the Merkle tree of each applied batch once and sends every confirmation; with
/// `archive.confirm_after_archive`, only once the archive holds the batch.
fn confirmer(
    rx: Receiver<ConfirmJob>,
    metrics: &Metrics,
    wait_for: Option<(Arc<ArchiveGate>, Arc<AtomicBool>)>,
) {
    while let Ok(job) = rx.recv() {
        metrics.confirm.queue_depth.set(rx.len() as i64);
        // A follower's batches have no clients waiting: no tree to build.
        if job.replies.is_empty() {
            continue;
        }
        let height = job.signed.header.height;
        if let Some((gate, shutdown)) = &wait_for {
            if !wait_for_archive(gate, shutdown, height) {
                for (_, reply, _) in job.replies {
                    reply.error(
                        ErrorCode::Unavailable,
                        "the batch is committed but not yet in the archive; retry with the same id",
                    );
                }
                continue;
            }
        }
        let started = Instant::now();
        let tree = job.body.proof_tree();
        // The header's root was checked against the receipts (by rs_merkle) before the batch
        // was applied; proofs from a tree with another root would not verify.
        assert_eq!(
            tree.root(),
            job.signed.header.merkle_root,
            "the proof tree of batch {} disagrees with its header's Merkle root",
            job.signed.header.height
        );
        for (index, reply, replayed) in job.replies {
            let mut c = job.body.confirmation(&tree, &job.signed, index);
            c.replayed = replayed;
            reply.send(&Message::Confirmed(Box::new(c)));
        }
        metrics
            .confirm
            .seconds
            .observe(started.elapsed().as_secs_f64());
    }
}

/// Waits until the archive holds `height`; gives up only when the node is stopping.
fn wait_for_archive(gate: &ArchiveGate, shutdown: &AtomicBool, height: u64) -> bool {
    let mut stopping_since: Option<Instant> = None;
    loop {
        if gate.progress.wait_for(height, Duration::from_millis(100)) {
            return true;
        }
        if shutdown.load(Ordering::SeqCst) {
            let since = *stopping_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= ARCHIVE_WAIT_AT_STOP {
                return false;
            }
        }
    }
}

/// Replays that wait for their batch to be applied are bounded; beyond this they are refused
/// as retryable.
const PARKED_REPLAYS_MAX: usize = 65_536;

struct StorageThread<S> {
    archive: Option<Arc<ArchiveGate>>,
    /// Always Some, except while a snapshot installer has it.
    store: Option<S>,
    operator: OperatorKey,
    node_id: u64,
    /// The applied height, for the master's in-flight bound.
    applied_height: Arc<AtomicU64>,
    /// The applied raft index and meta, for the raft thread.
    applied: Arc<Applied>,
    raft: Sender<RaftEvent>,
    wake: Sender<()>,
    confirm: Sender<ConfirmJob>,
    installer: Box<dyn SnapshotTransfer<S>>,
    /// Committed balances (None: no such account) this thread read or wrote recently. Valid
    /// because every write goes through this thread; cleared when a snapshot replaces the ledger.
    accounts: AccountCache,
    /// The store's request-lookup totals as last added to the metrics.
    lookups_seen: (u64, u64, u64),
    metrics: Arc<Metrics>,
}

/// A bounded map of committed balances; when full it is cleared and refills.
pub struct AccountCache {
    map: std::collections::HashMap<PublicKey, Option<u64>>,
    cap: usize,
}

impl AccountCache {
    pub fn new(cap: usize) -> AccountCache {
        AccountCache {
            map: std::collections::HashMap::new(),
            cap: cap.max(1),
        }
    }

    fn get(&self, key: &PublicKey) -> Option<Option<u64>> {
        self.map.get(key).copied()
    }

    fn insert(&mut self, key: PublicKey, balance: Option<u64>) {
        if self.map.len() >= self.cap && !self.map.contains_key(&key) {
            self.map.clear();
        }
        self.map.insert(key, balance);
    }

    fn clear(&mut self) {
        self.map.clear();
    }
}

/// Committed reads through the account cache (for `prepare_apply`).
struct CachedRead<'a, S> {
    store: &'a mut S,
    accounts: &'a mut AccountCache,
}

impl<S: LedgerStore> LedgerRead for CachedRead<'_, S> {
    fn account(&mut self, key: &PublicKey) -> CoreResult<Option<u64>> {
        if let Some(b) = self.accounts.get(key) {
            return Ok(b);
        }
        let b = self.store.account(key)?;
        self.accounts.insert(*key, b);
        Ok(b)
    }
    fn request(&mut self, signer: &PublicKey, id: u128) -> CoreResult<Option<RequestRecord>> {
        self.store.request(signer, id)
    }
}

/// A resubmission waiting for the batch that carries the original to be applied.
struct Parked {
    index: u32,
    request_hash: Hash,
    reply: ReplyTo,
}

impl<S: LedgerStore> StorageThread<S> {
    fn run(mut self, rx: Receiver<StorageCmd>) {
        let mut meta = self
            .db()
            .meta()
            .unwrap_or_else(|e| fatal("reading ledger meta", &e));
        let mut parked: BTreeMap<u64, Vec<Parked>> = BTreeMap::new();
        let mut parked_count = 0usize;
        while let Ok(cmd) = rx.recv() {
            self.metrics.storage.queue_depth.set(rx.len() as i64);
            match cmd {
                StorageCmd::Apply {
                    body,
                    replies,
                    raft_index,
                } => {
                    self.apply(&mut meta, body, replies, raft_index);
                    // Compactions the write made due run now if nothing waits, not inside
                    // the next batch's write.
                    if rx.is_empty() {
                        let started = Instant::now();
                        if let Err(e) = self.db().maintain() {
                            fatal("storage housekeeping", &e);
                        }
                        self.metrics
                            .ledger
                            .maintain_seconds
                            .observe(started.elapsed().as_secs_f64());
                        self.publish_compactable();
                    }
                    // Resubmissions of requests in batches now applied get their confirmation.
                    let later = parked.split_off(&(meta.height + 1));
                    for (height, waiting) in std::mem::replace(&mut parked, later) {
                        for p in waiting {
                            parked_count -= 1;
                            self.replay(height, p.index, p.request_hash, p.reply);
                        }
                    }
                }
                StorageCmd::AppliedIndex { raft_index } => {
                    self.publish_index(raft_index);
                }
                StorageCmd::InstallSnapshot {
                    index,
                    descriptor,
                    done,
                } => {
                    let result = self.installer.install(&mut self.store, index, &descriptor);
                    if self.store.is_none() {
                        fatal(
                            "installing a snapshot",
                            &"the ledger store was not reopened",
                        );
                    }
                    self.accounts.clear();
                    match result {
                        Ok(()) => {
                            meta = self
                                .db()
                                .meta()
                                .unwrap_or_else(|e| fatal("reading ledger meta", &e));
                            *self.applied.meta.lock().expect("meta lock") = meta.clone();
                            self.publish_compactable();
                            self.applied_height.store(meta.height, Ordering::SeqCst);
                            self.publish_index(index.max(meta.raft_index));
                            let _ = done.send(Ok(()));
                        }
                        Err(e) => {
                            let _ = done.send(Err(e));
                        }
                    }
                }
                StorageCmd::Dump {
                    chunk_bytes_max,
                    out,
                    done,
                } => {
                    // The dump holds this thread (and so the apply path) until the peer has
                    // taken every chunk: a known cost of serving a snapshot.
                    let store = self.store.as_mut().expect("store");
                    let result = self.installer.dump(store, chunk_bytes_max, &mut |chunk| {
                        out.blocking_send(chunk).map_err(|_| {
                            tally_core::Error::Storage(
                                "the peer stopped taking the snapshot".into(),
                            )
                        })
                    });
                    drop(out);
                    let _ = done.send(result);
                }
                StorageCmd::Lookup {
                    keys,
                    accounts,
                    reply,
                } => {
                    let result = (|| {
                        let mut records = Vec::with_capacity(keys.len());
                        for (signer, id) in &keys {
                            records.push(self.db().request(signer, *id)?);
                        }
                        let mut balances = Vec::with_capacity(accounts.len());
                        for a in &accounts {
                            balances.push(self.account(a)?);
                        }
                        Ok(LookupResult {
                            height: meta.height,
                            records,
                            balances,
                        })
                    })();
                    let _ = reply.send(result);
                    let now = self.db().request_lookup_counts();
                    self.metrics.request_lookups(&mut self.lookups_seen, now);
                }
                StorageCmd::LoadAccount { key, reply } => {
                    let _ = reply.send(self.account(&key));
                }
                StorageCmd::LoadRequest { signer, id, reply } => {
                    let _ = reply.send(self.db().request(&signer, id));
                }
                StorageCmd::Replay {
                    height,
                    index,
                    request_hash,
                    reply,
                } => {
                    if height <= meta.height {
                        self.replay(height, index, request_hash, reply);
                    } else if parked_count >= PARKED_REPLAYS_MAX {
                        reply.busy("the replay queue", 100);
                    } else {
                        parked_count += 1;
                        parked.entry(height).or_default().push(Parked {
                            index,
                            request_hash,
                            reply,
                        });
                    }
                }
                StorageCmd::Balance {
                    account,
                    mode,
                    reply,
                } => match self.account(&account) {
                    Ok(b) => reply.send(&Message::Balance(BalanceReply {
                        account,
                        exists: b.is_some(),
                        balance: b.unwrap_or(0),
                        height: meta.height,
                        mode,
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
                        match self.db().header(h) {
                            Ok(Some(sh)) => headers.push(sh),
                            Ok(None) => break,
                            Err(e) => fatal("reading a header", &e),
                        }
                    }
                    reply.send(&Message::Headers(headers));
                }
                StorageCmd::Status {
                    raft,
                    writable,
                    leader_client_address,
                    reply,
                } => {
                    let latest = if meta.height == 0 {
                        None
                    } else {
                        self.db()
                            .header(meta.height)
                            .unwrap_or_else(|e| fatal("reading a header", &e))
                    };
                    reply.send(&Message::Status(Box::new(StatusReply {
                        node_id: self.node_id,
                        role: raft.role.code(),
                        term: raft.term,
                        leader_id: raft.leader_id,
                        commit_index: raft.commit_index,
                        applied_index: self.applied.index.load(Ordering::SeqCst),
                        applied_height: meta.height,
                        writable,
                        leader_client_address,
                        latest_header: latest,
                        archive_height: self
                            .archive
                            .as_ref()
                            .map(|gate| gate.progress.height.load(Ordering::SeqCst)),
                    })));
                }
                StorageCmd::ReadBatches {
                    from,
                    to,
                    bytes_max,
                    reply,
                } => {
                    let to = to.min(meta.height);
                    let _ = reply.send(self.read_batches(from, to, bytes_max));
                }
                StorageCmd::Stop => break,
            }
        }
        // A clean stop: the store may save what speeds up the next open (the request filter,
        // unless it is off or the archive never caught up). Failing that only slows the next
        // open down, so it is logged, not fatal.
        let stopping = std::time::Instant::now();
        match self.db().shutdown() {
            Ok(()) => tracing::info!(
                ms = stopping.elapsed().as_millis() as u64,
                "ledger stopped cleanly"
            ),
            Err(e) => tracing::warn!("saving state for a fast restart failed: {e}"),
        }
    }

    fn account(&mut self, key: &PublicKey) -> CoreResult<Option<u64>> {
        CachedRead {
            store: self.store.as_mut().expect("store"),
            accounts: &mut self.accounts,
        }
        .account(key)
    }

    fn db(&mut self) -> &mut S {
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

    fn publish_index(&self, raft_index: u64) {
        self.applied.index.fetch_max(raft_index, Ordering::SeqCst);
        self.metrics
            .raft
            .applied_index
            .set(self.applied.index.load(Ordering::SeqCst) as i64);
        let _ = self.wake.try_send(());
    }

    /// Applies one committed batch, or skips it when it does not extend the applied chain.
    /// Either outcome depends only on the committed log, so every replica decides alike.
    fn apply(
        &mut self,
        meta: &mut LedgerMeta,
        body: BatchBody,
        replies: Vec<(u32, ReplyTo, bool)>,
        raft_index: u64,
    ) {
        let h = &body.header;
        if h.height <= meta.height {
            // Already applied (a restart replays the raft log from the last durable commit).
            for (index, reply, _) in replies {
                let rh = tally_core::crypto::request_hash(&body.entries[index as usize].request);
                self.replay(h.height, index, rh, reply);
            }
            self.publish_index(raft_index);
            return;
        }
        if h.height != meta.height + 1 || h.prev_hash != meta.last_header_hash {
            // Sealed on a state that was superseded (a leader change, a refused proposal).
            tracing::warn!(
                height = h.height,
                applied = meta.height,
                "skipping a committed batch that does not extend the chain"
            );
            for (_, reply, _) in replies {
                reply.error(
                    ErrorCode::Unavailable,
                    "the batch was superseded by a leader change; retry with the same id",
                );
            }
            let _ = self.raft.try_send(RaftEvent::Resync);
            self.publish_index(raft_index);
            return;
        }
        let started = Instant::now();
        let encoded = body.encode();
        let mut reader = CachedRead {
            store: self.store.as_mut().expect("store"),
            accounts: &mut self.accounts,
        };
        let mut write = prepare_apply(&body, encoded, meta, &mut reader, &self.operator)
            .unwrap_or_else(|e| fatal("applying a committed batch", &e));
        write.meta.raft_index = raft_index;
        let prepared = Instant::now();
        if let Err(e) = self.db().apply(&write) {
            fatal("writing a committed batch", &e);
        }
        for (key, balance) in &write.accounts {
            self.accounts.insert(*key, Some(*balance));
        }
        let written = Instant::now();
        *meta = write.meta.clone();
        *self.applied.meta.lock().expect("meta lock") = meta.clone();
        self.publish_compactable();
        let m = &self.metrics;
        m.ledger
            .apply_prepare_seconds
            .observe((prepared - started).as_secs_f64());
        m.ledger
            .durable_write_seconds
            .observe((written - prepared).as_secs_f64());
        m.storage.seconds.observe((written - started).as_secs_f64());
        m.ledger.batch_body_bytes.observe(write.body.len() as f64);
        if let Some(gate) = &self.archive {
            // The archive writer takes it from here instead of reading it back; when it is
            // behind (a full queue), it reads from the ledger later.
            let body = bytes::Bytes::from(std::mem::take(&mut write.body));
            let _ = gate.feed.try_send((write.signed_header.clone(), body));
            gate.applied.notify_one();
        }
        m.applied_height.set(meta.height as i64);
        tracing::debug!(
            height = meta.height,
            requests = body.entries.len(),
            body_bytes = write.body.len(),
            prepare_us = (prepared - started).as_micros() as u64,
            write_us = (written - prepared).as_micros() as u64,
            "batch applied"
        );
        self.applied_height.store(meta.height, Ordering::SeqCst);
        self.publish_index(raft_index);
        let signed = write.signed_header;
        let _ = self.confirm.send(ConfirmJob {
            body,
            signed,
            replies,
        });
        m.confirm.queue_depth.set(self.confirm.len() as i64);
    }

    /// Applied batches for the archive writer (see `StorageCmd::ReadBatches`).
    fn read_batches(
        &mut self,
        from: u64,
        to: u64,
        bytes_max: usize,
    ) -> CoreResult<Vec<(SignedHeader, Vec<u8>)>> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for height in from..=to {
            let (Some(signed), Some(body)) = (self.db().header(height)?, self.db().body(height)?)
            else {
                return Err(tally_core::Error::Storage(format!(
                    "batch {height} is applied but its header or body is missing"
                )));
            };
            assert_eq!(signed.header.height, height, "header table keyed by height");
            bytes += body.len();
            out.push((signed, body));
            if bytes >= bytes_max {
                break;
            }
        }
        Ok(out)
    }

    fn replay(&mut self, height: u64, index: u32, request_hash: Hash, reply: ReplyTo) {
        match self.confirmation(height, index) {
            Ok(Some(c)) if tally_core::crypto::request_hash(&c.request) == request_hash => {
                reply.send(&Message::Confirmed(Box::new(c)))
            }
            // The batch this request was sequenced in was superseded: it was never applied.
            Ok(_) => reply.error(
                ErrorCode::Unavailable,
                "the request's batch was superseded by a leader change; retry with the same id",
            ),
            Err(e) => fatal("reading a stored batch", &e),
        }
    }

    fn confirmation(
        &mut self,
        height: u64,
        index: u32,
    ) -> CoreResult<Option<tally_wire::Confirmation>> {
        let (Some(bytes), Some(signed)) = (self.db().body(height)?, self.db().header(height)?)
        else {
            return Ok(None);
        };
        let body = BatchBody::decode(&bytes)?;
        if index as usize >= body.entries.len() {
            return Ok(None);
        }
        let mut c = body.confirmation(&body.proof_tree(), &signed, index);
        c.replayed = true;
        Ok(Some(c))
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
        Err(TrySendError::Full(cmd)) | Err(TrySendError::Disconnected(cmd)) => {
            if let Some(reply) = cmd.into_reply() {
                handle.metrics.busy("storage");
                reply.busy("the storage queue", 20)
            }
        }
    }
}
