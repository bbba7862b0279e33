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
//! process, since going on could let this replica's state differ from the others'. Every error
//! of the apply path goes through [`on_error`] or [`fatal`], which follow
//! [`tally_core::Error::disposition`].

mod confirm;
mod history;
mod master;
mod reads;
mod storage;
mod timed;
mod validate;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use tally_core::engine::apply::{Applier, ApplierConfig};
use tally_core::engine::master::{Master, MasterConfig};
use tally_core::key_chain::SigningKeys;
use tally_core::ports::LedgerStore;
use tally_core::sequencer::SequencerConfig;
use tally_core::state::LedgerMeta;
use tally_core::validate::StatelessRules;
use tally_core::Result as CoreResult;
use tally_storage::archiver::ArchiveProgress;
use tally_wire::{ErrorCode, SignedHeader};

use crate::channels::{Applied, Job, MasterEvent, RaftEvent, StorageCmd};
use crate::metrics::Metrics;
use crate::view::ClusterView;

/// Replays that wait for their batch to be applied are bounded; beyond this they are refused
/// as retryable (`busy`).
const PARKED_REPLAYS_MAX: usize = 65_536;

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
    pub admin: Arc<crate::admin::AdminGate>,
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
    /// Who may send membership commands (`[cluster] admin_keys`).
    pub admin: Arc<crate::admin::AdminGate>,
    /// The newest checkpoint the witnesses cosigned (`GetCheckpoint`).
    pub witnessed: Arc<crate::view::Witnessed>,
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
        mut store: S,
        operator: SigningKeys,
        installer: Box<dyn SnapshotTransfer<S>>,
    ) -> Pipeline {
        let q = Queues::new(&cfg);
        let storage_tx = wiring.storage_tx.clone();
        let shutdown = Arc::new(AtomicBool::new(false));
        let meta = wiring.applied.meta.lock().expect("meta lock").clone();
        let (signed, checkpointed) = signed_heights(&mut store);
        let threshold = operator.is_threshold();
        // A threshold operator's batch is in flight until signed (the master's bound).
        let in_flight_from = if threshold { checkpointed } else { meta.height };
        let applied_height = Arc::new(AtomicU64::new(in_flight_from));
        spawn_validation(&cfg, &q, &storage_tx);
        let master = master::MasterThread {
            engine: master_engine(&cfg),
            rx: q.master_rx,
            storage: storage_tx.clone(),
            raft: wiring.raft_tx.clone(),
            events: wiring.master_events,
            view: wiring.view.clone(),
            wake: q.wake_rx,
            applied_height: applied_height.clone(),
            shutdown: shutdown.clone(),
            queues_before: vec![q.stateless_rx, q.snapshot_rx],
            metrics: cfg.metrics.clone(),
            started: Instant::now(),
            threshold,
        };
        spawn("master".into(), move || master.run());
        let storage = storage::StorageThread {
            engine: applier(&cfg, operator, meta).with_signed_through(signed, checkpointed),
            sign_events: Default::default(),
            archive: cfg.archive.clone(),
            store: Some(store),
            node_id: cfg.node_id,
            applied_height: applied_height.clone(),
            applied: wiring.applied,
            raft: wiring.raft_tx.clone(),
            wake: q.wake_tx,
            confirm: q.confirm_tx,
            installer,
            view: wiring.view.clone(),
            lookups_seen: (0, 0, 0),
            metrics: cfg.metrics.clone(),
            key_links: None,
        };
        let storage_thread = spawn("storage".into(), move || storage.run(wiring.storage_rx));
        let confirm_thread = spawn_confirmer(&cfg, q.confirm_rx, &shutdown);
        Pipeline {
            handle: PipelineHandle {
                stateless_tx: q.stateless_tx,
                storage_tx,
                raft_tx: wiring.raft_tx,
                view: wiring.view,
                shutdown,
                metrics: cfg.metrics,
                applied_height,
                archive: cfg.archive,
                read_only: cfg.read_only,
                admin: cfg.admin,
                witnessed: Arc::default(),
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

/// The bounded queues between the pipeline's own threads (see the module doc for what happens
/// when each is full).
struct Queues {
    stateless_tx: Sender<Job>,
    stateless_rx: Receiver<Job>,
    snapshot_tx: Sender<Job>,
    snapshot_rx: Receiver<Job>,
    master_tx: Sender<Job>,
    master_rx: Receiver<Job>,
    /// Applied batches to the confirmer: room for every batch that may be in flight, plus one.
    confirm_tx: Sender<confirm::ConfirmJob>,
    confirm_rx: Receiver<confirm::ConfirmJob>,
    /// The storage thread wakes the master when it publishes a new applied index; one pending
    /// wake-up is enough.
    wake_tx: Sender<()>,
    wake_rx: Receiver<()>,
}

impl Queues {
    /// The queues, sized from the config.
    fn new(cfg: &PipelineConfig) -> Queues {
        let depth = cfg.queue_depth_max;
        let (stateless_tx, stateless_rx) = bounded::<Job>(depth);
        let (snapshot_tx, snapshot_rx) = bounded::<Job>(depth);
        let (master_tx, master_rx) = bounded::<Job>(depth);
        let (confirm_tx, confirm_rx) = bounded(cfg.batch_in_flight_max as usize + 1);
        let (wake_tx, wake_rx) = bounded::<()>(1);
        Queues {
            stateless_tx,
            stateless_rx,
            snapshot_tx,
            snapshot_rx,
            master_tx,
            master_rx,
            confirm_tx,
            confirm_rx,
            wake_tx,
            wake_rx,
        }
    }
}

/// The master's engine: sequencing and batch sealing with the config's rules and bounds.
fn master_engine<R>(cfg: &PipelineConfig) -> Master<R> {
    Master::new(MasterConfig {
        sequencer: cfg.sequencer.clone(),
        window_ms: cfg.batch_window.as_millis() as u64,
        close_idle: cfg.batch_close_idle,
        in_flight_max: cfg.batch_in_flight_max,
    })
}

/// The heights through which the store holds header and checkpoint signatures.
fn signed_heights<S: LedgerStore>(store: &mut S) -> (u64, u64) {
    let read =
        |s: &mut S| Ok::<_, tally_core::Error>((s.signed_through()?, s.checkpointed_through()?));
    read(store).unwrap_or_else(|e| crate::fail::fatal("reading the signed heights", &e))
}

/// The storage thread's engine, starting from the applied summary `meta`.
fn applier<R>(cfg: &PipelineConfig, operator: SigningKeys, meta: LedgerMeta) -> Applier<R> {
    let applier = ApplierConfig {
        parked_max: PARKED_REPLAYS_MAX,
        accounts_cached_max: cfg.sequencer.accounts_cached_max,
    };
    Applier::new(applier, operator, meta)
}

/// Starts the confirmer thread, which hands confirmations to their connections; with
/// `archive.confirm_after_archive` it first waits until the archive holds the batch.
fn spawn_confirmer(
    cfg: &PipelineConfig,
    rx: Receiver<confirm::ConfirmJob>,
    shutdown: &Arc<AtomicBool>,
) -> JoinHandle<()> {
    let wait_for = cfg
        .archive
        .clone()
        .filter(|gate| gate.confirm_after_archive)
        .map(|gate| (gate, shutdown.clone()));
    let confirm_metrics = cfg.metrics.clone();
    spawn("confirm".into(), move || {
        confirm::confirmer(rx, &confirm_metrics, wait_for)
    })
}

/// Starts the stateless and snapshot worker pools.
fn spawn_validation(cfg: &PipelineConfig, q: &Queues, storage_tx: &Sender<StorageCmd>) {
    let rules = Arc::new(cfg.rules.clone());
    let backlog = Arc::new(validate::Backlog::default());
    for i in 0..cfg.stateless_workers {
        let (rx, tx, rules) = (q.stateless_rx.clone(), q.snapshot_tx.clone(), rules.clone());
        let (metrics, backlog) = (cfg.metrics.clone(), backlog.clone());
        spawn(format!("stateless-{i}"), move || {
            validate::stateless_worker(i, rx, tx, &backlog, &rules, &metrics)
        });
    }
    for i in 0..cfg.snapshot_workers {
        let (rx, tx, storage) = (
            q.snapshot_rx.clone(),
            q.master_tx.clone(),
            storage_tx.clone(),
        );
        let metrics = cfg.metrics.clone();
        spawn(format!("snapshot-{i}"), move || {
            validate::snapshot_worker(rx, tx, storage, &metrics)
        });
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
/// Sends `cmd` to the storage thread, waiting 10 ms at a time while its queue is full: for the
/// tasks behind the confirmations by design (the archive writer, the witnesses), which wait
/// rather than shed, and never block a tokio worker.
pub async fn send_waiting(tx: &Sender<StorageCmd>, mut cmd: StorageCmd) -> Result<(), String> {
    loop {
        match tx.try_send(cmd) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Full(back)) => {
                cmd = back;
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            Err(TrySendError::Disconnected(_)) => return Err("the ledger stopped".into()),
        }
    }
}

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
