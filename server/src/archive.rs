//! The node's side of the archive: the writer's batch source (the storage thread), its start,
//! the read-only rule for replicas restored below the archive's tip, and its metrics.
//!
//! The writer itself (`tally_storage::archiver`) runs as one task on the node's tokio runtime;
//! it reads applied batches through the storage thread's queue like any other reader, so the
//! ledger keeps its single owner.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use ed25519_dalek::SigningKey;
use tally_config::Config;
use tally_core::archive::CHECKPOINT_KEY;
use tally_storage::archive_read::{open_checkpoint_in, read_key_chain};
use tally_storage::archiver::{ArchiveProgress, Archiver, BatchSource};
use tally_storage::bucket::{Bucket, BucketSettings};
use tally_wire::SignedHeader;

use crate::channels::StorageCmd;
use crate::metrics::Metrics;
use crate::pipeline::ArchiveGate;
use crate::view::ClusterView;

/// Bytes of batch bodies the writer takes from the storage thread per read.
const READ_BYTES_MAX: usize = 16 << 20;
/// The longest the writer waits for a new applied batch before it looks again.
const WAKE_MAX: Duration = Duration::from_millis(100);
/// How long the start-up check waits for the archive's checkpoint.
const STARTUP_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The file `tally-server restore --height H` leaves in the data directory when `H` is below
/// the archive's tip: the replica then serves reads only, forever (a forensic copy).
pub const READ_ONLY_MARKER: &str = "RESTORED-READ-ONLY";

pub fn read_only_marker(data_dir: &Path) -> PathBuf {
    data_dir.join(READ_ONLY_MARKER)
}

/// Applied batches handed from the storage thread to the writer.
pub type Feed = Receiver<(SignedHeader, Bytes)>;

/// Batches the storage thread hands to the writer at most before it drops them (the writer
/// then reads them back from the ledger); up to ~75 MB at the largest batches.
const FEED_BATCHES_MAX: usize = 32;

/// The writer's view of this replica.
pub struct LedgerSource {
    pub storage: Sender<StorageCmd>,
    pub view: Arc<ClusterView>,
    pub applied_height: Arc<AtomicU64>,
    pub stopping: Arc<AtomicBool>,
    pub read_only: bool,
    /// Batches as they were applied (set by [`NodeArchive::start`]).
    pub feed: Option<Feed>,
    /// What the feed handed over and the writer has not taken yet, in height order.
    pub fed: Mutex<VecDeque<(SignedHeader, Bytes)>>,
    /// Notified by the storage thread after each applied batch (set by [`NodeArchive::start`]).
    pub applied: Option<Arc<tokio::sync::Notify>>,
}

impl LedgerSource {
    /// The fed batches `from..=to` (up to `READ_BYTES_MAX`), if the feed holds `from`: the
    /// common case, a writer keeping up. Older ones are dropped on the way.
    fn take_fed(&self, from: u64, to: u64) -> Option<Vec<(SignedHeader, Bytes)>> {
        let mut fed = self.fed.lock().expect("feed lock");
        if let Some(feed) = &self.feed {
            fed.extend(feed.try_iter());
        }
        while fed.front().is_some_and(|(h, _)| h.header.height < from) {
            fed.pop_front();
        }
        // The feed drops batches when full: take only a run without gaps.
        let mut out: Vec<(SignedHeader, Bytes)> = Vec::new();
        let mut bytes = 0;
        while let Some((h, body)) = fed.front() {
            let expected = from + out.len() as u64;
            if h.header.height != expected || expected > to || bytes >= READ_BYTES_MAX {
                break;
            }
            bytes += body.len();
            out.push(fed.pop_front().expect("front"));
        }
        (!out.is_empty()).then_some(out)
    }
}

impl BatchSource for LedgerSource {
    fn applied_height(&self) -> u64 {
        self.applied_height.load(Ordering::SeqCst)
    }

    fn may_write(&self) -> bool {
        let may = !self.read_only && self.view.writable.load(Ordering::SeqCst);
        if !may {
            // A replica that does not write keeps nothing of the feed.
            if let Some(feed) = &self.feed {
                while feed.try_recv().is_ok() {}
            }
            self.fed.lock().expect("feed lock").clear();
        }
        may
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    async fn wait_applied(&self, height: u64) {
        let Some(applied) = &self.applied else {
            return tokio::time::sleep(WAKE_MAX).await;
        };
        let notified = applied.notified();
        if self.applied_height.load(Ordering::SeqCst) > height {
            return;
        }
        // Bounded: a missed notification (one stored permit) only costs this long.
        let _ = tokio::time::timeout(WAKE_MAX, notified).await;
    }

    async fn checkpoint_signatures(
        &self,
        from: u64,
        to: u64,
    ) -> Result<Vec<Option<tally_wire::Signature>>, String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let cmd = StorageCmd::CheckpointSignatures {
            from,
            to,
            reply: tx,
        };
        crate::pipeline::send_waiting(&self.storage, cmd).await?;
        rx.await
            .map_err(|_| "the ledger stopped".to_string())?
            .map_err(|e| e.to_string())
    }

    async fn read(&self, from: u64, to: u64) -> Result<Vec<(SignedHeader, Bytes)>, String> {
        if let Some(fed) = self.take_fed(from, to) {
            return Ok(fed);
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let cmd = StorageCmd::ReadBatches {
            from,
            to,
            bytes_max: READ_BYTES_MAX,
            reply: tx,
        };
        // The storage queue is shared with the pipeline; when it is full the writer waits (it
        // is behind the confirmations by design).
        crate::pipeline::send_waiting(&self.storage, cmd).await?;
        let batches = rx
            .await
            .map_err(|_| "the ledger stopped".to_string())?
            .map_err(|e| e.to_string())?;
        if batches.is_empty() {
            return Err(format!("the ledger has no batch at height {from}"));
        }
        Ok(batches
            .into_iter()
            .map(|(h, body)| (h, Bytes::from(body)))
            .collect())
    }
}

/// The node's archive between start-up and the start of its writer.
pub struct NodeArchive {
    bucket: Option<Bucket>,
    progress: Arc<ArchiveProgress>,
    feed: Option<Feed>,
    /// What the pipeline checks (`None`: no archive).
    pub gate: Option<Arc<ArchiveGate>>,
    pub read_only: bool,
}

impl NodeArchive {
    /// Opens the configured archive and reads its height, before anything serves: a replica
    /// whose ledger is below it takes no writes until it has caught up.
    pub fn open(
        config: &Config,
        runtime: &tokio::runtime::Runtime,
        keys: &ArchiveKeys,
        ledger_height: u64,
    ) -> Result<NodeArchive> {
        let bucket = open_bucket(config)?;
        let progress = Arc::new(ArchiveProgress::default());
        let archived = match &bucket {
            Some(b) => startup_height(runtime, b, &config.chain_id_bytes(), &keys.genesis)?,
            None => None,
        };
        if let Some(h) = archived {
            progress.advance(h);
            if h > ledger_height {
                tracing::warn!(
                    archive_height = h,
                    ledger_height,
                    "the archive holds batches this replica has not applied: it takes no \
                     writes until it has caught up (a replica whose data was lost is restored \
                     with tally-server restore)"
                );
            }
        }
        let (gate, feed) = match &bucket {
            Some(_) => {
                let (g, f) = gate(config, progress.clone());
                (Some(g), Some(f))
            }
            None => (None, None),
        };
        Ok(NodeArchive {
            gate,
            feed,
            bucket,
            progress,
            read_only: read_only(config),
        })
    }

    /// Starts the writer and its metrics (or says that there is no archive).
    pub fn start(
        self,
        runtime: &tokio::runtime::Handle,
        config: &Config,
        mut source: LedgerSource,
        keys: ArchiveKeys,
        metrics: Arc<Metrics>,
    ) {
        let (Some(bucket), Some(gate)) = (self.bucket, self.gate) else {
            tracing::warn!(
                "no archive configured ([archive] url): the ledger lives only on the replicas' \
                 disks"
            );
            return;
        };
        println!("tally-server: archiving to {}", bucket.url());
        source.feed = self.feed;
        source.applied = Some(gate.applied.clone());
        let applied = source.applied_height.clone();
        spawn_writer(runtime, config, bucket, source, keys, self.progress);
        runtime.spawn(publish_metrics(gate, applied, metrics));
    }
}

/// The archive of `config`, opened, or `None` when none is configured.
pub fn open_bucket(config: &Config) -> Result<Option<Bucket>> {
    let Some(settings) = BucketSettings::from_config(&config.archive) else {
        return Ok(None);
    };
    Ok(Some(
        Bucket::open(&settings).context("opening the archive")?,
    ))
}

/// Reads the archive's height (checkpoint size) at start: `Some(0)` if there is no checkpoint
/// yet, `None` if the store did not answer in time (not an error here: the writer retries, and
/// writes wait until it has read the archive once; see [`ArchiveGate::refuses_writes`]).
pub fn startup_height(
    runtime: &tokio::runtime::Runtime,
    bucket: &Bucket,
    chain_id: &[u8; 32],
    genesis: &tally_wire::PublicKey,
) -> Result<Option<u64>> {
    let read = runtime.block_on(async {
        tokio::time::timeout(STARTUP_READ_TIMEOUT, async {
            let keys = read_key_chain(bucket, genesis).await;
            Ok::<_, tally_storage::bucket::BucketError>((keys, bucket.get(CHECKPOINT_KEY).await?))
        })
        .await
    });
    let (keys, found) = match read {
        Ok(Ok(found)) => found,
        Ok(Err(e)) => {
            tracing::warn!("the archive could not be read at start: {e}");
            return Ok(None);
        }
        Err(_) => {
            tracing::warn!("the archive did not answer within {STARTUP_READ_TIMEOUT:?} at start");
            return Ok(None);
        }
    };
    let Some((bytes, _)) = found else {
        return Ok(Some(0));
    };
    let keys = keys.map_err(|e| anyhow::anyhow!("the archive's key chain does not verify: {e}"))?;
    let checkpoint = open_checkpoint_in(&bytes, chain_id, &keys)
        .map_err(|e| anyhow::anyhow!("the archive's checkpoint does not verify: {e}"))?;
    Ok(Some(checkpoint.size))
}

/// The operator keys the archive writer uses: the genesis key the marker names and the key
/// chain starts from, and the private keys this replica holds (the configured one, and the
/// next one ahead of a rotation).
#[derive(Clone)]
pub struct ArchiveKeys {
    pub genesis: tally_wire::PublicKey,
    pub held: Vec<SigningKey>,
}

/// The gate the pipeline checks, over the writer's progress.
pub fn gate(config: &Config, progress: Arc<ArchiveProgress>) -> (Arc<ArchiveGate>, Feed) {
    let (feed, rx) = crossbeam_channel::bounded(FEED_BATCHES_MAX);
    let gate = Arc::new(ArchiveGate {
        progress,
        feed,
        applied: Arc::new(tokio::sync::Notify::new()),
        max_lag_batches: config.archive.max_lag_batches,
        confirm_after_archive: config.archive.confirm_after_archive,
    });
    (gate, rx)
}

/// When a replica of several may start an election: not while its ledger is below the
/// archive's height at the first read, and, before that read, not with an empty ledger.
///
/// Why: a replica whose data was lost (wiped, never restored) could be elected by replicas as
/// empty as itself. It would then refuse every write (`ArchiveGate::refuses_writes`) while
/// leading, and send the replicas that hold the history (restored from the archive) entries
/// that contradict it: the cluster would serve nothing until an operator stepped in. Without
/// the right to campaign it still votes, so a replica that holds the history is elected, sends
/// it a snapshot, and once installed it campaigns again. Without an archive, always.
pub fn campaign_rule(
    gate: Option<Arc<ArchiveGate>>,
    applied_height: Arc<std::sync::atomic::AtomicU64>,
) -> Box<dyn Fn() -> bool + Send> {
    use std::sync::atomic::Ordering;
    let Some(gate) = gate else {
        return Box::new(|| true);
    };
    Box::new(move || {
        let applied = applied_height.load(Ordering::SeqCst);
        if !gate.progress.known.load(Ordering::SeqCst) {
            return applied > 0;
        }
        applied >= gate.progress.floor.load(Ordering::SeqCst)
    })
}

/// Starts the writer on the runtime.
pub fn spawn_writer(
    runtime: &tokio::runtime::Handle,
    config: &Config,
    bucket: Bucket,
    source: LedgerSource,
    keys: ArchiveKeys,
    progress: Arc<ArchiveProgress>,
) {
    let archiver = Archiver {
        bucket,
        source,
        progress,
        chain_id: config.chain_id_bytes(),
        genesis: keys.genesis,
        // A threshold operator's replica holds no key: its checkpoints carry the threshold's
        // signature (`BatchSource::checkpoint_signatures`), its snapshot manifests none.
        snapshot_every_batches: config.archive.snapshot_every_batches,
        keys: keys.held,
    };
    runtime.spawn(archiver.run());
}

/// Whether this replica must serve reads only, for good: `restore --height` left the marker
/// (a forensic copy below the archive's tip). A replica whose ledger is merely behind the
/// archive refuses writes only until it has caught up ([`ArchiveGate::refuses_writes`]).
pub fn read_only(config: &Config) -> bool {
    let marker = read_only_marker(&config.node.data_dir);
    if marker.exists() {
        tracing::warn!(
            "{} exists: this replica was restored below the archive's tip and serves reads \
             only (a forensic copy); move its ledger and raft directories away and restore \
             again to serve writes",
            marker.display()
        );
    }
    marker.exists()
}

/// Copies the writer's progress into the metrics once a second.
pub async fn publish_metrics(
    gate: Arc<ArchiveGate>,
    applied_height: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
) {
    let mut seen = (0u64, 0u64, 0u64, 0u64);
    loop {
        let p = &gate.progress;
        let m = &metrics.archive;
        m.height.set(p.height.load(Ordering::SeqCst) as i64);
        m.lag_batches
            .set(gate.lag(applied_height.load(Ordering::SeqCst)) as i64);
        m.fenced.set(p.fenced.load(Ordering::SeqCst) as i64);
        let now = (
            p.errors.load(Ordering::Relaxed),
            p.bytes.load(Ordering::Relaxed),
            p.batches.load(Ordering::Relaxed),
            p.snapshots.load(Ordering::Relaxed),
        );
        m.upload_errors.inc_by(now.0 - seen.0);
        m.uploaded_bytes.inc_by(now.1 - seen.1);
        m.uploaded_batches.inc_by(now.2 - seen.2);
        m.snapshots.inc_by(now.3 - seen.3);
        seen = now;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
