//! State snapshots in the archive (format: `tally_core::snapshot`): written by the archive
//! writer every `archive.snapshot_every_batches` batches, read back by the audit and by
//! `tally-server restore`, which check them against the state they replay.
//!
//! The writer gathers the effects of the batches it archives ([`Delta`]) and, at a snapshot
//! height, uploads them as a differential snapshot on top of the one before; every
//! [`FULL_EVERY`]-th snapshot is full instead (the previous full one and the differential ones
//! since, read back from the archive and merged), unless the state is larger than
//! [`FULL_ROWS_MAX`] rows, in which case the chain of differential snapshots just goes on.

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use futures::stream::{self, StreamExt, TryStreamExt};
use tally_core::crypto::sha256;
use tally_core::snapshot::{
    chunk_key, decode_chunk, manifest_key, parse_manifest_key, Delta, Manifest, MANIFEST_PREFIX,
};
use tally_wire::{Hash, PublicKey};

use crate::archive_read::{ObjectError, ReadError};
use crate::bucket::{Bucket, PutNew};

/// Every this many snapshots, a full one.
pub const FULL_EVERY: u32 = 8;
/// A full snapshot is built in memory; beyond this many rows it is not built.
pub const FULL_ROWS_MAX: usize = 4_000_000;
/// Chunks read or written at once (each a file or an HTTP connection: `server/src/limits.rs` counts them).
pub const CHUNKS_IN_FLIGHT: usize = 8;

fn bad(key: impl Into<String>, message: impl Into<String>) -> ReadError {
    ReadError::Bad(ObjectError {
        key: key.into(),
        message: message.into(),
    })
}

/// Whose snapshots to read: manifests are signed by an operator key of the ledger's chain
/// (the writer's at the time, PROTOCOL.md §4.14) under the ledger's origin, or, in a
/// threshold operator's archive, unsigned (`Manifest::open_stored`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub chain_id: Hash,
    pub operators: Vec<PublicKey>,
    /// Whether an unsigned manifest is read: only by a reader that checks every row it uses
    /// against the signed headers before trusting it (a restore, the audit), or by a writer
    /// that signs nothing itself.
    pub unsigned: bool,
}

/// The manifests at or below `height`, in height order, each signed by `owner`.
pub async fn manifests(
    bucket: &Bucket,
    height: u64,
    owner: &Owner,
) -> Result<Vec<Manifest>, ReadError> {
    let keys = bucket.list(MANIFEST_PREFIX, None).await?;
    let mut heights: Vec<u64> = keys
        .iter()
        .filter_map(|k| parse_manifest_key(k))
        .filter(|h| *h <= height)
        .collect();
    heights.sort_unstable();
    let mut out = Vec::with_capacity(heights.len());
    for h in heights {
        out.push(read_manifest(bucket, h, owner).await?);
    }
    Ok(out)
}

pub async fn read_manifest(
    bucket: &Bucket,
    height: u64,
    owner: &Owner,
) -> Result<Manifest, ReadError> {
    let key = manifest_key(height);
    let Some((bytes, _)) = bucket.get(&key).await? else {
        return Err(bad(key, "missing"));
    };
    let m = Manifest::open_stored(&bytes, &owner.chain_id, &owner.operators, owner.unsigned)
        .map_err(|e| bad(&key, e.to_string()))?;
    if m.height != height {
        return Err(bad(key, format!("names height {}", m.height)));
    }
    Ok(m)
}

/// The rows of a snapshot, each chunk checked against its hash and size.
pub async fn read_rows(bucket: &Bucket, m: &Manifest) -> Result<Delta, ReadError> {
    let chunks: Vec<Bytes> = stream::iter(m.chunks.clone())
        .map(|(hash, size)| async move {
            let key = chunk_key(&hash);
            let Some((bytes, _)) = bucket.get(&key).await? else {
                return Err(bad(key, "missing although a manifest names it"));
            };
            if sha256(&[&bytes]) != hash || bytes.len() as u64 != size {
                return Err(bad(key, "does not hash to its name"));
            }
            Ok(bytes)
        })
        .buffered(CHUNKS_IN_FLIGHT)
        .try_collect()
        .await?;
    let mut rows = Vec::new();
    for bytes in &chunks {
        rows.extend(decode_chunk(bytes).map_err(|e| bad(manifest_key(m.height), e.to_string()))?);
    }
    let mut delta = Delta::from_rows(rows);
    let counts = (
        delta.accounts.len() as u64,
        delta.requests.len() as u64,
        delta.reserves.len() as u64,
    );
    if counts != (m.accounts, m.requests, m.reserves) {
        return Err(bad(
            manifest_key(m.height),
            "its chunks do not hold the rows it counts",
        ));
    }
    delta.deposited = m.total_deposited;
    delta.withdrawn = m.total_withdrawn;
    Ok(delta)
}

/// Where the writer stands: the newest snapshot at or below the log's size, and the effects of
/// the batches archived after it.
#[derive(Debug)]
pub struct Cursor {
    /// The ledger's chain id, the operator key that signs each manifest it writes (None: a
    /// threshold operator's replica, which writes them unsigned), and the keys a manifest it
    /// reads may be signed by.
    chain_id: Hash,
    key: Option<SigningKey>,
    readers: Vec<PublicKey>,
    pub last: Option<Manifest>,
    /// Differential snapshots since the newest full one.
    pub diffs_since_full: u32,
    pub delta: Delta,
}

impl Cursor {
    /// After a key rotation: the key to sign with, and the keys to read under.
    pub fn set_keys(&mut self, key: Option<SigningKey>, readers: Vec<PublicKey>) {
        (self.key, self.readers) = (key, readers);
    }

    /// Height of the newest snapshot (0: none).
    pub fn height(&self) -> u64 {
        self.last.as_ref().map_or(0, |m| m.height)
    }

    /// Reads the snapshot chain at or below `size` (the delta is left empty: the caller adds
    /// the batches after [`Cursor::height`]).
    pub async fn load(
        bucket: &Bucket,
        size: u64,
        chain_id: Hash,
        (key, readers): (Option<SigningKey>, Vec<PublicKey>),
    ) -> Result<Cursor, ReadError> {
        let owner = Owner {
            chain_id,
            operators: readers.clone(),
            unsigned: key.is_none(),
        };
        let all = manifests(bucket, size, &owner).await?;
        let diffs_since_full = all.iter().rev().take_while(|m| !m.is_full()).count() as u32;
        Ok(Cursor {
            chain_id,
            key,
            readers,
            last: all.into_iter().next_back(),
            diffs_since_full,
            delta: Delta::default(),
        })
    }

    /// Writes the snapshot at `height` (the log's size) from the delta; returns bytes written.
    pub async fn write(
        &mut self,
        bucket: &Bucket,
        height: u64,
        header_hash: Hash,
        state_digest: Hash,
    ) -> Result<u64, ReadError> {
        assert!(height > self.height(), "snapshots go up");
        let delta = std::mem::take(&mut self.delta);
        let (totals_d, totals_w) = match &self.last {
            Some(m) => (m.total_deposited, m.total_withdrawn),
            None => (0, 0),
        };
        let (rows, base) = self.rows_to_write(bucket, delta).await?;
        let chunks = rows.chunks();
        let mut written = 0u64;
        let mut refs = Vec::with_capacity(chunks.len());
        for c in &chunks {
            refs.push((sha256(&[c]), c.len() as u64));
        }
        let uploads = chunks
            .into_iter()
            .zip(&refs)
            .map(|(c, (h, _))| (chunk_key(h), c));
        written += put_all(bucket, uploads.collect()).await?;
        let manifest = Manifest {
            height,
            base,
            header_hash,
            state_digest,
            total_deposited: totals_d + rows.deposited,
            total_withdrawn: totals_w + rows.withdrawn,
            accounts: rows.accounts.len() as u64,
            requests: rows.requests.len() as u64,
            reserves: rows.reserves.len() as u64,
            chunks: refs,
            operator: rows
                .operator
                .or(self.last.as_ref().and_then(|m| m.operator)),
        };
        let bytes = manifest.stored(&self.chain_id, self.key.as_ref());
        written += bytes.len() as u64;
        put_all(bucket, vec![(manifest_key(height), bytes)]).await?;
        self.diffs_since_full = if manifest.is_full() {
            0
        } else {
            self.diffs_since_full + 1
        };
        self.last = Some(manifest);
        Ok(written)
    }

    /// The rows of the next snapshot and its base: the delta on its own (differential), or
    /// merged with the full snapshot and every differential one since (full; the first
    /// snapshot is full by itself). A full snapshot's totals stay deltas against 0.
    async fn rows_to_write(
        &self,
        bucket: &Bucket,
        delta: Delta,
    ) -> Result<(Delta, u64), ReadError> {
        let Some(last) = &self.last else {
            return Ok((delta, 0));
        };
        if self.diffs_since_full + 1 < FULL_EVERY {
            return Ok((delta, last.height));
        }
        let owner = Owner {
            chain_id: self.chain_id,
            operators: self.readers.clone(),
            unsigned: self.key.is_none(),
        };
        let chain = manifests(bucket, last.height, &owner).await?;
        let from = chain.iter().rposition(|m| m.is_full()).unwrap_or(0);
        let rows: u64 = chain[from..]
            .iter()
            .map(|m| m.accounts + m.requests + m.reserves)
            .sum();
        if rows as usize + delta.rows() > FULL_ROWS_MAX {
            return Ok((delta, last.height));
        }
        let mut full = Delta::default();
        for m in &chain[from..] {
            let mut part = read_rows(bucket, m).await?;
            (part.deposited, part.withdrawn) = (0, 0);
            full.merge(part);
        }
        let (d, w) = (delta.deposited, delta.withdrawn);
        full.merge(delta);
        // Totals: the new manifest adds these to the last one's; a full one has base 0.
        (full.deposited, full.withdrawn) = (d, w);
        Ok((full, 0))
    }
}

/// Create-only writes; different bytes under a content-derived key is damage.
async fn put_all(bucket: &Bucket, objects: Vec<(String, Vec<u8>)>) -> Result<u64, ReadError> {
    let bytes: u64 = objects.iter().map(|(_, b)| b.len() as u64).sum();
    let mut puts = stream::iter(objects)
        .map(|(key, body)| async move {
            let outcome = bucket.put_new(&key, Bytes::from(body)).await;
            (key, outcome)
        })
        .buffer_unordered(CHUNKS_IN_FLIGHT);
    while let Some((key, outcome)) = puts.next().await {
        if outcome? == PutNew::Different {
            return Err(bad(key, "already holds other bytes"));
        }
    }
    Ok(bytes)
}
