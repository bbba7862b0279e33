//! The archive writer: keeps the archive (PROTOCOL.md, "The archive") up with the applied
//! ledger while this replica leads.
//!
//! One round: read the marker and the checkpoint (the archive's size `N` and its version),
//! rebuild the log's right edge from the tiles at `N` and check it against the checkpoint's
//! root; then, while this replica may write, take the applied batches after `N` from the
//! ledger ([`BatchSource`]), and for each group write (1) the batch objects, create-only,
//! (2) the tiles and entry bundles they complete, create-only, and (3) the new checkpoint,
//! replacing only the version read. A reader therefore never sees a checkpoint that points at
//! missing data. Any store error ends the round; the next round, after a backoff, starts again
//! from what the archive holds, so nothing is written twice differently and nothing is skipped.
//!
//! Fencing: every object but the checkpoint is create-only, and its bytes are determined by
//! the committed ledger, so a deposed leader racing the new one writes identical bytes (an
//! idempotent retry) or loses the checkpoint's conditional write. A checkpoint written by
//! another writer is accepted only if the archive's header at its size is this ledger's own;
//! anything else (another ledger's marker, different bytes under a batch or tile key, a
//! checkpoint for a chain this replica does not have) *fences* the writer: it stops for good,
//! logs why and raises [`ArchiveProgress::fenced`], and never overwrites.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use futures::stream::{self, StreamExt};
use tally_core::archive::{
    batch_key, encode_batch, encode_signature_bundle, key_link_key, signature_bundle_key, Marker,
    CHECKPOINT_KEY, MARKER_KEY,
};
use tally_core::batch::BatchBody;
use tally_core::crypto::header_hash;
use tally_core::key_chain::{link_of, KeySchedule};
use tally_core::tlog::{
    entries_path, open_note, origin_for, sign_note, tile_path, Checkpoint, TileLog, TlogError,
    TILE_WIDTH,
};
use tally_wire::{Hash, PublicKey, Signature, SignedHeader, SIGNED_HEADER_BYTES};

use crate::archive_read::{open_checkpoint_in, read_key_chain, ReadError};
use crate::bucket::{Bucket, BucketError, PutNew, Version};
use crate::snapshots::Cursor;

/// Rows of snapshot delta the writer holds in memory at most (about 115 bytes each in its
/// maps, ~30 MB); reaching it writes a snapshot early. At saturation (about 55k requests a
/// second, one request row each) that is a differential snapshot every few seconds.
const DELTA_ROWS_MAX: usize = 262_144;
/// Batches taken from the ledger and written per checkpoint, at most.
const GROUP_BATCHES_MAX: u64 = 256;
/// Objects written at once (each a file or an HTTP connection: `server/src/limits.rs` counts them).
pub const UPLOADS_IN_FLIGHT: usize = 8;
/// Backoff after a failed round: doubles from the first to the last (short: while the lag
/// bound refuses writes, the store is probed at least once a second).
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How often a replica that does not write reads the checkpoint (for status and the lag).
const FOLLOWER_POLL: Duration = Duration::from_secs(2);
/// How often the writer looks for new applied batches when it has none, unless its source
/// wakes it sooner ([`BatchSource::wait_applied`]).
const IDLE_POLL: Duration = Duration::from_millis(20);

/// Where the writer takes committed batches from: the replica's ledger.
pub trait BatchSource: Send + Sync {
    /// Height of the last applied batch.
    fn applied_height(&self) -> u64;
    /// Whether this replica may write the archive now (it leads).
    fn may_write(&self) -> bool;
    /// Whether the node is stopping.
    fn stopping(&self) -> bool;
    /// Waits a moment for a batch above `height` to be applied (by default, polls).
    fn wait_applied(&self, height: u64) -> impl Future<Output = ()> + Send {
        let _ = height;
        tokio::time::sleep(IDLE_POLL)
    }
    /// A threshold operator's signatures of the checkpoints of the header log of sizes
    /// `from..=to` (PROTOCOL.md §4.15), which the writer, holding no key, publishes; None where
    /// none is held; fewer (at least one) if many. A writer holding the key signs itself and
    /// never asks.
    fn checkpoint_signatures(
        &self,
        from: u64,
        to: u64,
    ) -> impl Future<Output = Result<Vec<Option<Signature>>, String>> + Send {
        assert!(from <= to);
        std::future::ready(Ok(vec![None; (to - from + 1) as usize]))
    }
    /// The applied batches `from..=to` (signed header, encoded body), in height order; fewer
    /// (at least one) if they are large.
    fn read(
        &self,
        from: u64,
        to: u64,
    ) -> impl Future<Output = Result<Vec<(SignedHeader, Bytes)>, String>> + Send;
}

/// What the writer has achieved, shared with the rest of the node (metrics, status, the lag
/// bound, confirmations waiting for the archive).
#[derive(Default)]
pub struct ArchiveProgress {
    /// The archive's height (checkpoint size) as last read or written.
    pub height: AtomicU64,
    /// Whether `height` was read from the archive at least once.
    pub known: AtomicBool,
    /// The archive's height when it was first read: a replica whose ledger is below it must
    /// not sequence (it would sign headers the archive already has) until it has caught up.
    pub floor: AtomicU64,
    /// The writer stopped for good (see the module docs); the reason is logged.
    pub fenced: AtomicBool,
    /// Failed rounds (store errors).
    pub errors: AtomicU64,
    /// Bytes written (batch objects, tiles, checkpoints).
    pub bytes: AtomicU64,
    /// Batch objects written.
    pub batches: AtomicU64,
    /// State snapshots written.
    pub snapshots: AtomicU64,
    changed: Mutex<()>,
    wake: Condvar,
}

impl ArchiveProgress {
    /// Records the archive's height as read or written.
    pub fn advance(&self, height: u64) {
        if !self.known.load(Ordering::SeqCst) {
            self.floor.store(height, Ordering::SeqCst);
        }
        self.height.fetch_max(height, Ordering::SeqCst);
        self.known.store(true, Ordering::SeqCst);
        let _guard = self.changed.lock().expect("progress lock");
        self.wake.notify_all();
    }

    /// Blocks until the archive holds `height`, or `timeout` passes; returns whether it does.
    pub fn wait_for(&self, height: u64, timeout: Duration) -> bool {
        let guard = self.changed.lock().expect("progress lock");
        let (_guard, _) = self
            .wake
            .wait_timeout_while(guard, timeout, |_| {
                self.height.load(Ordering::SeqCst) < height
            })
            .expect("progress lock");
        self.height.load(Ordering::SeqCst) >= height
    }
}

/// Why a round ended.
#[derive(Debug, thiserror::Error)]
enum RoundError {
    /// The store failed or was unreachable: back off and start again.
    #[error(transparent)]
    Store(#[from] BucketError),
    /// The ledger could not hand out batches (it is stopping, or a read failed).
    #[error("reading batches from the ledger: {0}")]
    Source(String),
    /// The archive belongs to another ledger or holds another history: never write again.
    #[error("{0}")]
    Fenced(String),
    /// The archive is damaged (a tile does not match its checkpoint): do not build on it.
    #[error("the archive is damaged: {0}")]
    Damaged(String),
}

/// The archive's state as one round of the writer knows it.
struct Head {
    log: TileLog,
    version: Option<Version>,
    /// Hash of the header at `log.size()` (all zero at 0): the next batch's `prev_hash`.
    tip_hash: Hash,
    /// The snapshot chain and what was archived after it (None: snapshots are off).
    snapshots: Option<Cursor>,
    /// The key chain as far as the archive holds it (its `keychain/` objects).
    keys: KeySchedule,
}

/// The writer. [`Archiver::run`] until the node stops.
pub struct Archiver<S> {
    pub bucket: Bucket,
    pub source: S,
    pub progress: std::sync::Arc<ArchiveProgress>,
    pub chain_id: Hash,
    /// The genesis operator key (the marker names it) and the keys this replica holds: the
    /// checkpoint and manifests are signed with the one the key chain leads to.
    pub genesis: PublicKey,
    pub keys: Vec<SigningKey>,
    /// Batches between snapshots (`archive.snapshot_every_batches`); 0: none.
    pub snapshot_every_batches: u64,
}

impl<S: BatchSource> Archiver<S> {
    /// Runs rounds until the node stops or the writer is fenced.
    pub async fn run(self) {
        let mut backoff = BACKOFF_FIRST;
        while !self.source.stopping() {
            if !self.source.may_write() {
                if let Err(e) = self.poll_checkpoint().await {
                    tracing::debug!("reading the archive's checkpoint: {e}");
                }
                tokio::time::sleep(FOLLOWER_POLL).await;
                continue;
            }
            match self.round().await {
                Ok(()) => backoff = BACKOFF_FIRST,
                Err(e @ RoundError::Fenced(_)) | Err(e @ RoundError::Damaged(_)) => {
                    self.progress.fenced.store(true, Ordering::SeqCst);
                    tracing::error!(
                        archive = self.bucket.url(),
                        "the archive writer stops and will not write again: {e}"
                    );
                    return;
                }
                Err(e) => {
                    self.progress.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        archive = self.bucket.url(),
                        retry_ms = backoff.as_millis() as u64,
                        "archive round failed: {e}"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    fn origin(&self) -> String {
        origin_for(&self.chain_id)
    }

    /// Reads the checkpoint only, to keep the progress current on a replica that does not write.
    async fn poll_checkpoint(&self) -> Result<(), RoundError> {
        let keys = read_key_chain(&self.bucket, &self.genesis)
            .await
            .map_err(damaged)?;
        let size = self
            .read_checkpoint(&keys)
            .await?
            .map_or(0, |(c, _)| c.size);
        self.progress.advance(size);
        Ok(())
    }

    /// One round: sync with the archive, then append while this replica may write.
    async fn round(&self) -> Result<(), RoundError> {
        self.ensure_marker().await?;
        let mut head = self.resume().await?;
        self.progress.advance(head.log.size());
        while self.source.may_write() && !self.source.stopping() {
            let applied = self.source.applied_height();
            let size = head.log.size();
            if applied <= size {
                self.source.wait_applied(size).await;
                continue;
            }
            let to = applied.min(size + GROUP_BATCHES_MAX);
            let batches = self
                .source
                .read(size + 1, to)
                .await
                .map_err(RoundError::Source)?;
            self.append(&mut head, batches).await?;
        }
        Ok(())
    }

    /// Writes the marker if the archive is new, or checks that it names this ledger.
    async fn ensure_marker(&self) -> Result<(), RoundError> {
        let marker = Marker {
            chain_id: self.chain_id,
            operator: self.genesis,
        };
        let mine = Bytes::from(marker.encode());
        match self.bucket.put_new(MARKER_KEY, mine).await? {
            PutNew::Created | PutNew::Same => Ok(()),
            PutNew::Different => {
                let found = match self.bucket.get(MARKER_KEY).await? {
                    Some((bytes, _)) => Marker::decode(&bytes)
                        .map(|m| {
                            format!(
                                "chain {} with operator key {}",
                                hex::encode(m.chain_id),
                                hex::encode(m.operator)
                            )
                        })
                        .unwrap_or_else(|e| e.to_string()),
                    None => "nothing".into(),
                };
                Err(RoundError::Fenced(format!(
                    "the archive belongs to another ledger ({found}), not to chain {} with this \
                     operator key",
                    hex::encode(self.chain_id)
                )))
            }
        }
    }

    /// The checkpoint, verified under the key chain `keys`, and its version.
    async fn read_checkpoint(
        &self,
        keys: &KeySchedule,
    ) -> Result<Option<(Checkpoint, Version)>, RoundError> {
        let Some((bytes, version)) = self.bucket.get(CHECKPOINT_KEY).await? else {
            return Ok(None);
        };
        let checkpoint = open_checkpoint_in(&bytes, &self.chain_id, keys)
            .map_err(|e| RoundError::Damaged(format!("{CHECKPOINT_KEY}: {e}")))?;
        Ok(Some((checkpoint, version)))
    }

    /// Rebuilds the archive's head from its checkpoint and tiles, and checks that the
    /// archive's history is this ledger's: the header at its size must be the one the ledger
    /// holds (by the hash chain, every header before it then is too).
    async fn resume(&self) -> Result<Head, RoundError> {
        let keys = read_key_chain(&self.bucket, &self.genesis)
            .await
            .map_err(damaged)?;
        let (log, version, tip_hash) = match self.read_checkpoint(&keys).await? {
            None => (TileLog::empty(), None, [0; 32]),
            Some((checkpoint, version)) => {
                let log = self.load_tiles(&checkpoint).await?;
                let tip = self.check_tip(checkpoint.size).await?;
                (log, Some(version), tip)
            }
        };
        let mut head = Head {
            log,
            version,
            tip_hash,
            snapshots: None,
            keys,
        };
        if self.snapshot_every_batches > 0 {
            let signer = self.manifest_signer(&head.keys)?;
            let readers = head.keys.keys();
            let cursor = Cursor::load(
                &self.bucket,
                head.log.size(),
                self.chain_id,
                (signer, readers),
            )
            .await
            .map_err(damaged)?;
            head.snapshots = Some(cursor);
            self.catch_up_snapshots(&mut head).await?;
        }
        Ok(head)
    }

    /// Gathers the effects of the archived batches after the newest snapshot (a new writer
    /// starts with none in memory), writing snapshots on the way where they are due.
    async fn catch_up_snapshots(&self, head: &mut Head) -> Result<(), RoundError> {
        let size = head.log.size();
        let mut next = head.snapshots.as_ref().map_or(size + 1, |c| c.height() + 1);
        while next <= size {
            let to = size.min(next + GROUP_BATCHES_MAX - 1);
            let batches = self
                .source
                .read(next, to)
                .await
                .map_err(RoundError::Source)?;
            self.snapshot_batches(head, &batches).await?;
            next += batches.len() as u64;
        }
        Ok(())
    }

    /// Adds one archived batch's effects to the snapshot delta.
    fn gather(&self, head: &mut Head, body: &[u8]) -> Result<(), RoundError> {
        if let Some(cursor) = head.snapshots.as_mut() {
            let body = BatchBody::decode(body).map_err(|e| RoundError::Source(e.to_string()))?;
            cursor.delta.add_batch(&body);
        }
        Ok(())
    }

    /// Writes the snapshot at `height` if one is due: `snapshot_every_batches` after the last,
    /// or sooner when the delta holds [`DELTA_ROWS_MAX`] rows (its memory bound).
    async fn snapshot_if_due(
        &self,
        head: &mut Head,
        height: u64,
        header_hash: Hash,
        state_digest: Hash,
    ) -> Result<(), RoundError> {
        let Some(cursor) = head.snapshots.as_mut() else {
            return Ok(());
        };
        let due = height >= cursor.height() + self.snapshot_every_batches
            || cursor.delta.rows() >= DELTA_ROWS_MAX;
        if !due {
            return Ok(());
        }
        let bytes = cursor
            .write(&self.bucket, height, header_hash, state_digest)
            .await
            .map_err(damaged)?;
        self.progress.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.progress.snapshots.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// The right edge of the log at the checkpoint, read from the archive and checked against
    /// the checkpoint's root.
    async fn load_tiles(&self, checkpoint: &Checkpoint) -> Result<TileLog, RoundError> {
        let mut fetched = HashMap::new();
        for path in right_edge_paths(checkpoint.size) {
            match self.bucket.get(&path).await? {
                Some((bytes, _)) => fetched.insert(path, bytes.to_vec()),
                None => None,
            };
        }
        let mut fetch = |path: &str| -> Result<Vec<u8>, TlogError> {
            fetched.get(path).cloned().ok_or(TlogError::Missing {
                path: path.to_string(),
            })
        };
        TileLog::resume(checkpoint.size, &checkpoint.root, &mut fetch)
            .map_err(|e| RoundError::Damaged(e.to_string()))
    }

    /// The hash of this ledger's header at `size`, after checking that the archive's batch
    /// object there holds exactly that header.
    async fn check_tip(&self, size: u64) -> Result<Hash, RoundError> {
        assert!(size > 0, "an archive with a checkpoint holds a batch");
        if self.source.applied_height() < size {
            return Err(RoundError::Source(format!(
                "the archive holds height {size}, beyond this replica's applied height {}: \
                 waiting to catch up",
                self.source.applied_height()
            )));
        }
        let mine = self
            .source
            .read(size, size)
            .await
            .map_err(RoundError::Source)?;
        let (signed, _) = mine.first().ok_or_else(|| {
            RoundError::Source(format!("the ledger has no batch at height {size}"))
        })?;
        let theirs = self.bucket.get(&batch_key(size)).await?;
        match theirs {
            Some((bytes, _))
                if bytes.len() >= SIGNED_HEADER_BYTES
                    && bytes[..SIGNED_HEADER_BYTES] == signed.encode() =>
            {
                Ok(header_hash(&signed.header))
            }
            Some(_) => Err(RoundError::Fenced(format!(
                "the archive's batch at height {size} is not this ledger's: another history \
                 (a fork) was archived here"
            ))),
            None => Err(RoundError::Damaged(format!(
                "{} is missing although the checkpoint covers it",
                batch_key(size)
            ))),
        }
    }

    /// The held key that signs for the archive now: the newest of the chain.
    fn signer(&self, keys: &KeySchedule) -> Result<&SigningKey, RoundError> {
        let current = keys.current();
        self.keys
            .iter()
            .find(|k| k.verifying_key().to_bytes() == current)
            .ok_or_else(|| {
                RoundError::Source(format!(
                    "this replica holds no private key for operator key {}, which the key \
                     chain leads to",
                    hex::encode(current)
                ))
            })
    }

    /// The key link of a batch that ends with a rotation the archive does not hold yet: its
    /// object, after the link is checked as the chain's next (PROTOCOL.md §4.14).
    fn rotation(
        &self,
        head: &mut Head,
        signed: &SignedHeader,
        body: &[u8],
    ) -> Result<Option<(String, Bytes)>, RoundError> {
        if !BatchBody::may_hold_rotation(body) {
            return Ok(None);
        }
        let decoded = BatchBody::decode(body).map_err(|e| RoundError::Source(e.to_string()))?;
        let Some(link) = link_of(&decoded, signed) else {
            return Ok(None);
        };
        // A round that failed after writing the link, before the checkpoint, left it behind.
        let held = link.number as usize <= head.keys.rotations.len();
        if !held {
            head.keys
                .extend(&link)
                .map_err(|e| RoundError::Source(format!("the ledger's key rotation: {e}")))?;
        }
        if let Some(cursor) = head.snapshots.as_mut() {
            let signer = self.manifest_signer(&head.keys)?;
            cursor.set_keys(signer, head.keys.keys());
        }
        Ok(Some((
            key_link_key(link.number),
            Bytes::from(link.encode()),
        )))
    }

    /// Writes one group of batches, their tiles, and the checkpoint over them.
    async fn append(
        &self,
        head: &mut Head,
        batches: Vec<(SignedHeader, Bytes)>,
    ) -> Result<(), RoundError> {
        let old_size = head.log.size();
        let mut objects = Vec::with_capacity(batches.len());
        for (signed, body) in &batches {
            let height = head.log.size() + 1;
            assert_eq!(
                signed.header.height, height,
                "the source hands out batches in order"
            );
            assert_eq!(
                signed.header.prev_hash, head.tip_hash,
                "the ledger is hash-chained"
            );
            head.tip_hash = header_hash(&signed.header);
            head.log.append(&signed.encode());
            objects.push((batch_key(height), Bytes::from(encode_batch(signed, body))));
            objects.extend(self.rotation(head, signed, body)?);
        }
        self.put_all(objects).await?;
        let tiles = head.log.tiles_since(old_size);
        let tiles = tiles
            .into_iter()
            .map(|(p, b)| (p, Bytes::from(b)))
            .collect();
        self.put_all(tiles).await?;
        let bundles = self.signature_bundles(old_size, head.log.size()).await?;
        self.put_all(bundles).await?;
        self.write_checkpoint(head).await?;
        head.log.trim();
        self.progress
            .batches
            .fetch_add(batches.len() as u64, Ordering::Relaxed);
        self.progress.advance(head.log.size());
        // Snapshots only cover heights the checkpoint already does.
        self.snapshot_batches(head, &batches).await
    }

    /// Gathers the effects of archived batches, writing each snapshot that falls due among
    /// them at its height.
    async fn snapshot_batches(
        &self,
        head: &mut Head,
        batches: &[(SignedHeader, Bytes)],
    ) -> Result<(), RoundError> {
        for (signed, body) in batches {
            self.gather(head, body)?;
            let h = &signed.header;
            self.snapshot_if_due(head, h.height, header_hash(h), h.state_digest)
                .await?;
        }
        Ok(())
    }

    /// Writes create-only objects, a few at a time; different bytes under a key fences.
    async fn put_all(&self, objects: Vec<(String, Bytes)>) -> Result<(), RoundError> {
        let bytes: u64 = objects.iter().map(|(_, b)| b.len() as u64).sum();
        let mut results = stream::iter(objects)
            .map(|(key, body)| async move {
                let outcome = self.bucket.put_new(&key, body).await;
                (key, outcome)
            })
            .buffer_unordered(UPLOADS_IN_FLIGHT);
        while let Some((key, outcome)) = results.next().await {
            if outcome? == PutNew::Different {
                return Err(RoundError::Fenced(format!(
                    "{key} already holds other bytes than this ledger's: another history (a \
                     fork) is being archived here"
                )));
            }
        }
        self.progress.bytes.fetch_add(bytes, Ordering::Relaxed);
        Ok(())
    }

    /// The key that signs snapshot manifests: the [`Archiver::signer`], or none on a threshold
    /// operator's replica, whose manifests are unsigned (`Manifest::stored`).
    fn manifest_signer(&self, keys: &KeySchedule) -> Result<Option<SigningKey>, RoundError> {
        match self.keys.is_empty() {
            true => Ok(None),
            false => self.signer(keys).map(|k| Some(k.clone())),
        }
    }

    /// The signed note of `checkpoint`: signed with the key the chain leads to, or, on a
    /// threshold operator's replica (no key held), with the threshold's signature the ledger
    /// stores, checked before it is published.
    async fn checkpoint_note(
        &self,
        checkpoint: &Checkpoint,
        head: &Head,
    ) -> Result<String, RoundError> {
        if !self.keys.is_empty() {
            let key = self.signer(&head.keys)?;
            return Ok(sign_note(&checkpoint.body(), &checkpoint.origin, key));
        }
        let size = checkpoint.size;
        let signature = self.threshold_signatures(size, size).await?[0];
        let (body, origin) = (checkpoint.body(), &checkpoint.origin);
        // Under the key that signed it: the group of the header after it.
        let key = head.keys.key_for(size + 1);
        let note = tally_core::tlog::note_with_signature(&body, origin, &key, &signature);
        open_checkpoint_in(note.as_bytes(), &self.chain_id, &head.keys)
            .map_err(|e| RoundError::Source(format!("the threshold's checkpoint {size}: {e}")))?;
        Ok(note)
    }

    /// A threshold operator's checkpoint signatures of the sizes after `old_size` up to `size`
    /// as the signature bundles they complete or extend (PROTOCOL.md §15.10), each with the
    /// signatures its bundle already held; none from a writer that holds a key.
    async fn signature_bundles(
        &self,
        old_size: u64,
        size: u64,
    ) -> Result<Vec<(String, Bytes)>, RoundError> {
        if !self.keys.is_empty() || size == old_size {
            return Ok(Vec::new());
        }
        let first = old_size / TILE_WIDTH;
        let signatures = self
            .threshold_signatures(first * TILE_WIDTH + 1, size)
            .await?;
        Ok(signatures
            .chunks(TILE_WIDTH as usize)
            .zip(first..)
            .map(|(bundle, index)| {
                let key = signature_bundle_key(index, bundle.len() as u64);
                (key, Bytes::from(encode_signature_bundle(bundle)))
            })
            .collect())
    }

    /// The threshold's signatures of the checkpoints of sizes `from..=to`, every one of which
    /// the ledger must hold (the source hands out only batches whose checkpoint is signed).
    async fn threshold_signatures(&self, from: u64, to: u64) -> Result<Vec<Signature>, RoundError> {
        let wanted = (to - from + 1) as usize;
        let mut out = Vec::with_capacity(wanted);
        while out.len() < wanted {
            let next = from + out.len() as u64;
            let got = self
                .source
                .checkpoint_signatures(next, to)
                .await
                .map_err(RoundError::Source)?;
            assert!(
                (1..=wanted - out.len()).contains(&got.len()),
                "the source answers 1..={} signatures from {next}",
                wanted - out.len()
            );
            for (size, signature) in (next..).zip(got) {
                out.push(signature.ok_or_else(|| {
                    RoundError::Source(format!("no signature of the checkpoint of size {size} yet"))
                })?);
            }
        }
        Ok(out)
    }

    /// Replaces the checkpoint, conditional on the version this round read or wrote. Losing
    /// that race ends the round; the next one reads what the other writer wrote and checks it.
    async fn write_checkpoint(&self, head: &mut Head) -> Result<(), RoundError> {
        let checkpoint = Checkpoint {
            origin: self.origin(),
            size: head.log.size(),
            root: head.log.root(),
        };
        let note = self.checkpoint_note(&checkpoint, head).await?;
        let len = note.len() as u64;
        let written = self
            .bucket
            .replace(CHECKPOINT_KEY, Bytes::from(note), head.version.as_ref())
            .await?;
        match written {
            Some(version) => {
                head.version = Some(version);
                self.progress.bytes.fetch_add(len, Ordering::Relaxed);
                Ok(())
            }
            None => Err(RoundError::Source(
                "another writer replaced the checkpoint first; re-reading the archive".into(),
            )),
        }
    }
}

fn damaged(e: ReadError) -> RoundError {
    match e {
        ReadError::Store(e) => RoundError::Store(e),
        ReadError::Bad(e) => RoundError::Damaged(e.to_string()),
    }
}

/// Parses and verifies a checkpoint note under the operator key, for this ledger's origin.
pub fn parse_checkpoint(
    bytes: &[u8],
    origin: &str,
    key: &SigningKey,
) -> Result<Checkpoint, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
    let body = open_note(text, origin, &key.verifying_key()).map_err(|e| e.to_string())?;
    let checkpoint = Checkpoint::parse_body(&body).map_err(|e| e.to_string())?;
    if checkpoint.origin != origin {
        return Err(format!(
            "origin {:?} is not this ledger's {origin:?}",
            checkpoint.origin
        ));
    }
    Ok(checkpoint)
}

/// The partial tiles and entry bundle at the right edge of a log of `size` leaves: what
/// [`TileLog::resume`] reads.
pub fn right_edge_paths(size: u64) -> Vec<String> {
    let mut paths = Vec::new();
    for level in 0..8u32 {
        let count = size >> (8 * level);
        if count == 0 {
            break;
        }
        let width = count % TILE_WIDTH;
        if width > 0 {
            paths.push(tile_path(level as u8, count / TILE_WIDTH, width));
        }
    }
    if size % TILE_WIDTH > 0 {
        paths.push(entries_path(size / TILE_WIDTH, size % TILE_WIDTH));
    }
    paths
}
