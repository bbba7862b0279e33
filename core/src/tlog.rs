//! The archive's transparency log: C2SP tlog-tiles, tlog-checkpoint and signed-note.
//!
//! tally archives its ledger to object storage as a transparency log that standard tooling
//! (Go's `golang.org/x/mod/sumdb/tlog` and `sumdb/note`, Tessera, witnesses) can read. Leaf `i`
//! is the 256 canonical bytes of the signed header at height `i + 1`, so the tree size is the
//! ledger height. Everything here is pure: it turns leaves into `(path, bytes)` pairs, and a
//! caller-supplied `fetch` into a resumed log; the server does the IO.
//!
//! - Hashing and proofs are RFC 6962 / RFC 9162 (SHA-256, `0x00` leaf and `0x01` node prefixes),
//!   the same hashing as [`crate::merkle`], whose helpers this module re-exports.
//! - Tiles follow c2sp.org/tlog-tiles: `tile/<L>/<N>[.p/<W>]` holds up to 256 hashes of level
//!   `L`, `tile/entries/<N>[.p/<W>]` up to 256 leaves, each behind a big-endian `u16` length.
//! - [`TileLog`] keeps the right edge of the tree (the partial tile of every level) plus what was
//!   appended since it was created, resumed or trimmed, so that appending never reads old tiles.
//! - [`Checkpoint`] is the c2sp.org/tlog-checkpoint body; [`sign_note`] and [`open_note`] are
//!   c2sp.org/signed-note with Ed25519 (signature type `0x01`).
//!
//! Caveats: Go's `sumdb/tlog` names tiles in the older sumdb layout (`tile/8/<L>/...`, with the
//! height as a path element); its hashing and proofs read these tiles unchanged, only its path
//! helper differs. [`open_note`] checks Ed25519 signatures strictly (`verify_strict`, as
//! [`crate::crypto`] does), which Go's verifier does not: a signature made with a small-order
//! key that Go accepts is refused here. [`TileLog`] keeps every leaf appended since its base in
//! memory until [`TileLog::trim`].

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use tally_wire::Hash;

use crate::crypto::sha256;
use crate::merkle::empty_root;

/// RFC 6962 leaf hash, SHA-256(0x00 || leaf): the hash a level-0 tile holds for each entry.
/// Re-exported from [`crate::merkle`] so that batch trees and the archive log cannot disagree.
pub use crate::merkle::leaf_hash;
/// RFC 6962 interior node hash, SHA-256(0x01 || left || right). Re-exported from
/// [`crate::merkle`] for the same reason as [`leaf_hash`].
pub use crate::merkle::node_hash;

/// Tree levels one tile spans: a tile is a subtree of height 8 (tlog-tiles fixes it).
pub const TILE_HEIGHT: u8 = 8;
/// Hashes in a full tile and entries in a full bundle: 2^[`TILE_HEIGHT`].
pub const TILE_WIDTH: u64 = 1 << TILE_HEIGHT;
/// The longest entry a bundle can carry: its length prefix is a big-endian `u16`.
pub const ENTRY_BYTES_MAX: usize = u16::MAX as usize;
/// Signature lines [`open_note`] reads at most before it calls a note malformed. The spec asks
/// verifiers to accept at least 16; Go's `sumdb/note` stops at 100, so do we.
pub const NOTE_SIGNATURES_MAX: usize = 100;
/// The signed-note signature type byte of Ed25519.
const NOTE_TYPE_ED25519: u8 = 0x01;
/// Tile levels a `u64`-sized log can have: level 8 would need 256^8 = 2^64 leaves.
const LEVELS: usize = 8;
const HASH_BYTES: usize = 32;

/// What went wrong reading the archive's log or its signed notes, phrased as what the caller must
/// do about it.
#[derive(Debug, thiserror::Error)]
pub enum TlogError {
    /// The store has no object at `path`: the archive is incomplete or not at the size asked for.
    /// `fetch` callbacks return it for a missing object.
    #[error("{path} is missing from the archive")]
    Missing { path: String },
    /// Reading `path` failed for another reason (network, permissions): retry, or stop.
    /// `fetch` callbacks return it; tlog never does IO itself.
    #[error("reading {path} failed: {message}")]
    Read { path: String, message: String },
    /// `path` was read but its bytes are not what the log needs: the archive is corrupt; do not
    /// build on it.
    #[error("{path} is corrupt: {reason}")]
    Corrupt { path: String, reason: String },
    /// An entry bundle does not parse: the archive is corrupt.
    #[error("malformed entry bundle at byte {offset}: {reason}")]
    BundleMalformed { offset: usize, reason: &'static str },
    /// The tiles read back hash to another root than the checkpoint's: the archive is corrupt or
    /// the checkpoint belongs to another log; do not append to it.
    #[error("the tiles of a log of {size} leaves hash to {found}, not to the expected {expected}")]
    RootMismatch {
        size: u64,
        expected: String,
        found: String,
    },
    /// An inclusion or consistency proof does not check out: the log is not what it claims.
    #[error("{kind} proof rejected: {reason}")]
    ProofInvalid {
        kind: &'static str,
        reason: &'static str,
    },
    /// A checkpoint body breaks c2sp.org/tlog-checkpoint: refuse it.
    #[error("malformed checkpoint: {reason}")]
    CheckpointMalformed { reason: &'static str },
    /// A note breaks c2sp.org/signed-note: refuse it.
    #[error("malformed note: {reason}")]
    NoteMalformed { reason: &'static str },
    /// A signature by the trusted key does not verify: refuse the whole note (the spec's SHOULD).
    #[error("the note's signature by {key} does not verify")]
    NoteBadSignature { key: String },
    /// No signature in the note is by the trusted key: refuse the note (the spec's MUST).
    #[error("the note carries no signature by {key}")]
    NoteUnsigned { key: String },
}

// ---------------------------------------------------------------------------------------------
// Paths and entry bundles.

/// Path of a hash tile: `tile/<L>/<N>` for a full tile (`width` 256) or `tile/<L>/<N>.p/<W>`
/// for a partial one, with `N` in zero-padded groups of three digits, all but the last prefixed
/// by `x` (index 1234067 is `x001/x234/067`), exactly as tlog-tiles names them so that any
/// reader finds them.
pub fn tile_path(level: u8, index: u64, width: u64) -> String {
    assert!(level <= 63, "tile level {level} above tlog-tiles' 63");
    format!("tile/{level}/{}", index_path(index, width))
}

/// Path of an entry bundle: `tile/entries/<N>[.p/<W>]`, `N` and `W` as in [`tile_path`].
pub fn entries_path(index: u64, width: u64) -> String {
    format!("tile/entries/{}", index_path(index, width))
}

pub(crate) fn index_path(index: u64, width: u64) -> String {
    assert!(
        (1..=TILE_WIDTH).contains(&width),
        "tile width {width} outside 1..=256 (empty tiles are never written)"
    );
    let mut path = format!("{:03}", index % 1000);
    let mut rest = index / 1000;
    while rest > 0 {
        path = format!("x{:03}/{path}", rest % 1000);
        rest /= 1000;
    }
    if width < TILE_WIDTH {
        path = format!("{path}.p/{width}");
    }
    path
}

/// Encodes an entry bundle: each entry as its length in two big-endian bytes, then its bytes,
/// the tlog-tiles format that readers split back into leaves.
pub fn encode_entry_bundle(entries: &[&[u8]]) -> Vec<u8> {
    assert!(
        entries.len() as u64 <= TILE_WIDTH,
        "a bundle holds at most 256 entries, not {}",
        entries.len()
    );
    let mut out = Vec::with_capacity(entries.iter().map(|e| 2 + e.len()).sum());
    for entry in entries {
        let len = u16::try_from(entry.len()).expect("entry longer than ENTRY_BYTES_MAX");
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(entry);
    }
    out
}

/// Decodes an entry bundle read from the archive. Refuses a truncated length or entry, and more
/// than 256 entries (no bundle holds more, so more means corruption).
pub fn decode_entry_bundle(bytes: &[u8]) -> Result<Vec<Vec<u8>>, TlogError> {
    let mut entries = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        if entries.len() as u64 == TILE_WIDTH {
            return Err(TlogError::BundleMalformed {
                offset: at,
                reason: "more than 256 entries",
            });
        }
        let Some(prefix) = bytes.get(at..at + 2) else {
            return Err(TlogError::BundleMalformed {
                offset: at,
                reason: "truncated length prefix",
            });
        };
        let len = u16::from_be_bytes([prefix[0], prefix[1]]) as usize;
        let Some(entry) = bytes.get(at + 2..at + 2 + len) else {
            return Err(TlogError::BundleMalformed {
                offset: at,
                reason: "entry shorter than its length prefix",
            });
        };
        entries.push(entry.to_vec());
        at += 2 + len;
    }
    Ok(entries)
}

fn tile_bytes(hashes: &[Hash]) -> Vec<u8> {
    hashes.concat()
}

// ---------------------------------------------------------------------------------------------
// The tiled log.

/// Hashes at `level` in a log of `size` leaves: one per full subtree of 256^level leaves.
fn level_count(size: u64, level: usize) -> u64 {
    if level >= LEVELS {
        0
    } else {
        size >> (usize::from(TILE_HEIGHT) * level)
    }
}

/// The first hash index of the tile that holds hash `count` (or would, were it appended).
fn tile_floor(count: u64) -> u64 {
    count / TILE_WIDTH * TILE_WIDTH
}

/// The tiles at `level` that growing a log from `old_size` to `new_size` leaves created or
/// changed, as (tile index, width now), in index order.
fn changed_tiles(old_size: u64, new_size: u64, level: usize) -> impl Iterator<Item = (u64, u64)> {
    let (old, new) = (level_count(old_size, level), level_count(new_size, level));
    let tiles = if new == old {
        0..0
    } else {
        old / TILE_WIDTH..(new - 1) / TILE_WIDTH + 1
    };
    tiles.map(move |index| (index, (new - index * TILE_WIDTH).min(TILE_WIDTH)))
}

/// The root of a perfect subtree over a power-of-two number of hashes.
fn perfect_root(hashes: &[Hash]) -> Hash {
    assert!(hashes.len().is_power_of_two(), "{} hashes", hashes.len());
    let mut layer = hashes.to_vec();
    while layer.len() > 1 {
        layer = layer
            .chunks_exact(2)
            .map(|pair| node_hash(&pair[0], &pair[1]))
            .collect();
    }
    layer[0]
}

/// The right edge of a tiled log, enough to append leaves and compute the root without reading
/// old tiles, plus everything appended since its base so that [`TileLog::tiles_since`] can hand
/// out the tiles those appends completed.
///
/// `levels[l]` holds the level-`l` hashes from the start of the tile that held hash number
/// `base_size >> 8l` up to the current size; `entries` holds the leaves over the same range as
/// `levels[0]`. [`TileLog::trim`] moves the base up to the current size, which leaves only the
/// partial tile of each level (at most 255 hashes per level and 255 leaves).
#[derive(Clone, Debug)]
pub struct TileLog {
    size: u64,
    /// The size at creation, resume or the last trim: how far back `tiles_since` can look.
    base_size: u64,
    levels: [Vec<Hash>; LEVELS],
    entries: Vec<Vec<u8>>,
}

impl TileLog {
    /// A log of no leaves: the start of a new archive.
    pub fn empty() -> TileLog {
        TileLog {
            size: 0,
            base_size: 0,
            levels: Default::default(),
            entries: Vec::new(),
        }
    }

    /// The number of leaves: the ledger height the log has reached.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Rebuilds the right edge of a log of `size` leaves from the tiles stored for it, so that
    /// an archiver can go on appending after a restart. Calls `fetch(path)` for exactly the
    /// partial hash tile of every level that has one and the partial entry bundle (a full
    /// rightmost tile is not needed: its hash is in the level above), checks each tile's length,
    /// that the bundle's entries hash to the level-0 tile, and that the root equals
    /// `expected_root` (the signed checkpoint's).
    pub fn resume(
        size: u64,
        expected_root: &Hash,
        fetch: &mut dyn FnMut(&str) -> Result<Vec<u8>, TlogError>,
    ) -> Result<TileLog, TlogError> {
        let mut log = TileLog {
            size,
            base_size: size,
            ..TileLog::empty()
        };
        for level in 0..LEVELS {
            let count = level_count(size, level);
            let width = count % TILE_WIDTH;
            if width > 0 {
                let path = tile_path(level as u8, count / TILE_WIDTH, width);
                log.levels[level] = parse_tile(&path, &fetch(&path)?, width)?;
            }
        }
        let width = size % TILE_WIDTH;
        if width > 0 {
            let path = entries_path(size / TILE_WIDTH, width);
            log.entries = parse_bundle(&path, &fetch(&path)?, &log.levels[0])?;
        }
        let found = log.root();
        if found != *expected_root {
            return Err(TlogError::RootMismatch {
                size,
                expected: hex::encode(expected_root),
                found: hex::encode(found),
            });
        }
        log.assert_shape();
        Ok(log)
    }

    /// Appends one leaf: the bundle keeps its bytes, the level-0 tile its [`leaf_hash`], and every
    /// tile this completes hashes into one hash of the level above.
    pub fn append(&mut self, leaf: &[u8]) {
        assert!(
            leaf.len() <= ENTRY_BYTES_MAX,
            "leaf of {} bytes does not fit an entry bundle",
            leaf.len()
        );
        assert!(self.size < u64::MAX, "log full");
        self.entries.push(leaf.to_vec());
        self.levels[0].push(leaf_hash(leaf));
        self.size += 1;
        let mut level = 0;
        while level + 1 < LEVELS && level_count(self.size, level) % TILE_WIDTH == 0 {
            let below = &self.levels[level];
            let full = perfect_root(&below[below.len() - TILE_WIDTH as usize..]);
            self.levels[level + 1].push(full);
            level += 1;
        }
        self.assert_shape();
    }

    /// RFC 6962 root of the whole log (SHA-256 of the empty string for size 0): what the
    /// checkpoint signs. Computed from the partial tiles alone: the size's base-256 digits are
    /// their widths, and its binary decomposition picks the perfect subtrees inside them.
    pub fn root(&self) -> Hash {
        let mut subtrees = Vec::new();
        for level in (0..LEVELS).rev() {
            let tile = self.partial_tile(level);
            let mut at = 0;
            for bit in (0..TILE_HEIGHT).rev() {
                let width = 1usize << bit;
                if tile.len() & width != 0 {
                    subtrees.push(perfect_root(&tile[at..at + width]));
                    at += width;
                }
            }
            assert_eq!(at, tile.len());
        }
        // RFC 6962 splits off the largest perfect subtree on the left, then recurses right: fold
        // the subtrees from the right.
        let Some((last, rest)) = subtrees.split_last() else {
            return empty_root();
        };
        rest.iter()
            .rev()
            .fold(*last, |right, left| node_hash(left, &right))
    }

    /// Every tile and entry bundle that the appends since `old_size` created or changed, as
    /// (path, bytes): full tiles once they complete, and the current partial tile of every level
    /// that changed (a level-`L` tile exists once 256^L leaves do), so that the archive holds
    /// every tile a reader of a checkpoint at the current size needs. Entry bundles come first,
    /// then hash tiles level by level upwards, each in index order (a stable order for tests and
    /// auditors; what makes a reader safe is that the checkpoint is written after all of them).
    pub fn tiles_since(&self, old_size: u64) -> Vec<(String, Vec<u8>)> {
        assert!(
            self.base_size <= old_size && old_size <= self.size,
            "tiles since {old_size} asked of a log holding {}..={}",
            self.base_size,
            self.size
        );
        let start = tile_floor(level_count(self.base_size, 0));
        let mut out = Vec::new();
        for (index, width) in changed_tiles(old_size, self.size, 0) {
            let from = (index * TILE_WIDTH - start) as usize;
            let entries: Vec<&[u8]> = self.entries[from..from + width as usize]
                .iter()
                .map(Vec::as_slice)
                .collect();
            out.push((entries_path(index, width), encode_entry_bundle(&entries)));
        }
        for level in 0..LEVELS {
            let start = tile_floor(level_count(self.base_size, level));
            for (index, width) in changed_tiles(old_size, self.size, level) {
                let from = (index * TILE_WIDTH - start) as usize;
                let hashes = &self.levels[level][from..from + width as usize];
                out.push((tile_path(level as u8, index, width), tile_bytes(hashes)));
            }
        }
        out
    }

    /// Forgets the tiles kept for [`TileLog::tiles_since`] below the current size, once the
    /// caller has written them: memory stays bounded by the right edge. Afterwards
    /// `tiles_since` accepts only sizes from the current one on.
    pub fn trim(&mut self) {
        for level in 0..LEVELS {
            let keep = (level_count(self.size, level) % TILE_WIDTH) as usize;
            let hashes = &mut self.levels[level];
            hashes.drain(..hashes.len() - keep);
        }
        let keep = self.levels[0].len();
        self.entries.drain(..self.entries.len() - keep);
        self.base_size = self.size;
        self.assert_shape();
    }

    /// The hashes of the rightmost, partial tile at `level` (empty if that tile is full or the
    /// level does not exist).
    fn partial_tile(&self, level: usize) -> &[Hash] {
        let width = (level_count(self.size, level) % TILE_WIDTH) as usize;
        let hashes = &self.levels[level];
        &hashes[hashes.len() - width..]
    }

    fn assert_shape(&self) {
        assert!(self.base_size <= self.size);
        for level in 0..LEVELS {
            let start = tile_floor(level_count(self.base_size, level));
            let held = level_count(self.size, level) - start;
            assert_eq!(
                self.levels[level].len() as u64,
                held,
                "level {level} out of shape"
            );
        }
        assert_eq!(self.entries.len(), self.levels[0].len());
    }
}

/// A hash tile read back: exactly `width` hashes.
fn parse_tile(path: &str, bytes: &[u8], width: u64) -> Result<Vec<Hash>, TlogError> {
    if bytes.len() as u64 != width * HASH_BYTES as u64 {
        return Err(TlogError::Corrupt {
            path: path.to_owned(),
            reason: format!("{} bytes, not {} hashes", bytes.len(), width),
        });
    }
    Ok(bytes
        .chunks_exact(HASH_BYTES)
        .map(|h| h.try_into().expect("32-byte chunk"))
        .collect())
}

/// An entry bundle read back: one entry per hash of its level-0 tile, each hashing to it.
fn parse_bundle(path: &str, bytes: &[u8], hashes: &[Hash]) -> Result<Vec<Vec<u8>>, TlogError> {
    let corrupt = |reason: String| TlogError::Corrupt {
        path: path.to_owned(),
        reason,
    };
    let entries = decode_entry_bundle(bytes).map_err(|e| corrupt(e.to_string()))?;
    if entries.len() != hashes.len() {
        let reason = format!("{} entries, not {}", entries.len(), hashes.len());
        return Err(corrupt(reason));
    }
    let wrong = entries
        .iter()
        .zip(hashes)
        .position(|(e, h)| leaf_hash(e) != *h);
    if let Some(i) = wrong {
        return Err(corrupt(format!(
            "entry {i} does not match its level-0 tile"
        )));
    }
    Ok(entries)
}

/// Rebuilds all tiles of a log from every leaf, for an auditor: every full and final partial
/// tile and bundle that a correct archive of exactly these leaves holds, in the order of
/// [`TileLog::tiles_since`], and the root. Built level by level from [`root_of`], sharing no
/// code with [`TileLog`]'s incremental path, so that each checks the other.
pub fn all_tiles(leaves: &[&[u8]]) -> (Vec<(String, Vec<u8>)>, Hash) {
    let mut out = Vec::new();
    for (index, chunk) in leaves.chunks(TILE_WIDTH as usize).enumerate() {
        let path = entries_path(index as u64, chunk.len() as u64);
        out.push((path, encode_entry_bundle(chunk)));
    }
    let mut hashes: Vec<Hash> = leaves.iter().map(|leaf| leaf_hash(leaf)).collect();
    let root = root_of(&hashes);
    let mut level = 0u8;
    while !hashes.is_empty() {
        for (index, chunk) in hashes.chunks(TILE_WIDTH as usize).enumerate() {
            let path = tile_path(level, index as u64, chunk.len() as u64);
            out.push((path, tile_bytes(chunk)));
        }
        hashes = hashes
            .chunks_exact(TILE_WIDTH as usize)
            .map(root_of)
            .collect();
        level += 1;
    }
    (out, root)
}

// ---------------------------------------------------------------------------------------------
// Roots and proofs over leaf hashes in memory (RFC 9162 section 2.1).

/// The largest power of two smaller than `n` (n >= 2): where RFC 6962 splits a tree.
fn split_point(n: usize) -> usize {
    assert!(n >= 2);
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// RFC 6962 root (MTH) of the given leaf hashes, by the RFC's own recursion: the simple
/// reference for tests and the auditor.
pub fn root_of(leaf_hashes: &[Hash]) -> Hash {
    match leaf_hashes.len() {
        0 => empty_root(),
        1 => leaf_hashes[0],
        n => {
            let k = split_point(n);
            node_hash(&root_of(&leaf_hashes[..k]), &root_of(&leaf_hashes[k..]))
        }
    }
}

/// RFC 9162 consistency proof (section 2.1.4.1) from the first `old_size` leaves to all of
/// `leaf_hashes`: what a witness or auditor needs to accept a newer checkpoint. Empty when
/// `old_size` is 0 or the whole log.
pub fn consistency_proof(leaf_hashes: &[Hash], old_size: u64) -> Vec<Hash> {
    assert!(
        old_size <= leaf_hashes.len() as u64,
        "old size {old_size} beyond a log of {}",
        leaf_hashes.len()
    );
    let mut proof = Vec::new();
    if old_size > 0 {
        subproof(leaf_hashes, old_size as usize, true, &mut proof);
    }
    proof
}

/// SUBPROOF(m, D[n], b) of RFC 9162 section 2.1.4.1.
fn subproof(hashes: &[Hash], m: usize, whole: bool, proof: &mut Vec<Hash>) {
    let n = hashes.len();
    if m == n {
        if !whole {
            proof.push(root_of(hashes));
        }
        return;
    }
    let k = split_point(n);
    if m <= k {
        subproof(&hashes[..k], m, whole, proof);
        proof.push(root_of(&hashes[k..]));
    } else {
        subproof(&hashes[k..], m - k, false, proof);
        proof.push(root_of(&hashes[..k]));
    }
}

/// Verifies a consistency proof (RFC 9162 section 2.1.4.2): the tree of `new_size` leaves with
/// `new_root` extends the one of `old_size` leaves with `old_root`. The empty tree is
/// consistent with every tree (empty proof); equal sizes need equal roots and an empty proof.
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), TlogError> {
    let fail = |reason| {
        Err(TlogError::ProofInvalid {
            kind: "consistency",
            reason,
        })
    };
    if old_size > new_size {
        return fail("the old tree is larger than the new one");
    }
    if old_size == 0 || old_size == new_size {
        if !proof.is_empty() {
            return fail("a proof from the empty or an equal tree must be empty");
        }
        if old_size == 0 && *old_root != empty_root() {
            return fail("the old root is not the empty tree's");
        }
        if old_size == new_size && old_root != new_root {
            return fail("equal sizes with different roots");
        }
        return Ok(());
    }
    let Some((&first, rest)) = proof.split_first() else {
        return fail("empty proof between different sizes");
    };
    // A power-of-two old tree is a node of the new one: its root starts the path.
    let (seed, rest) = if old_size.is_power_of_two() {
        (*old_root, proof)
    } else {
        (first, rest)
    };
    let (fr, sr) = match consistency_roots(old_size, new_size, seed, rest) {
        Ok(roots) => roots,
        Err(reason) => return fail(reason),
    };
    if fr != *old_root || sr != *new_root {
        return fail("the proof does not lead to both roots");
    }
    Ok(())
}

/// The walk of RFC 9162 section 2.1.4.2, steps 3 to 6: the old and new roots a consistency
/// path leads to, starting from `seed` (its first hash, or the old root).
fn consistency_roots(
    old_size: u64,
    new_size: u64,
    seed: Hash,
    path: &[Hash],
) -> Result<(Hash, Hash), &'static str> {
    assert!(0 < old_size && old_size < new_size);
    let (mut fn_, mut sn) = (old_size - 1, new_size - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let (mut fr, mut sr) = (seed, seed);
    for c in path {
        if sn == 0 {
            return Err("proof longer than the tree is deep");
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err("proof shorter than the tree is deep");
    }
    Ok((fr, sr))
}

/// RFC 9162 inclusion proof (audit path, section 2.1.3.1) of leaf `index` in the tree of all
/// `leaf_hashes`, bottom up: what shows that one signed header is in the archived log.
pub fn inclusion_proof(leaf_hashes: &[Hash], index: u64) -> Vec<Hash> {
    assert!(
        index < leaf_hashes.len() as u64,
        "leaf {index} outside a log of {}",
        leaf_hashes.len()
    );
    let mut proof = Vec::new();
    audit_path(leaf_hashes, index as usize, &mut proof);
    proof
}

/// PATH(m, D[n]) of RFC 9162 section 2.1.3.1.
fn audit_path(hashes: &[Hash], m: usize, proof: &mut Vec<Hash>) {
    if hashes.len() <= 1 {
        return;
    }
    let k = split_point(hashes.len());
    if m < k {
        audit_path(&hashes[..k], m, proof);
        proof.push(root_of(&hashes[k..]));
    } else {
        audit_path(&hashes[k..], m - k, proof);
        proof.push(root_of(&hashes[..k]));
    }
}

/// Verifies an inclusion proof (RFC 9162 section 2.1.3.2): `leaf` (a leaf hash) is leaf `index`
/// of the tree of `size` leaves whose root is `root`. [`crate::merkle::verify_inclusion`] does
/// the same for batch trees, whose sizes fit `u32`; archive heights need `u64`.
pub fn verify_inclusion(
    index: u64,
    size: u64,
    leaf: &Hash,
    root: &Hash,
    proof: &[Hash],
) -> Result<(), TlogError> {
    let fail = |reason| {
        Err(TlogError::ProofInvalid {
            kind: "inclusion",
            reason,
        })
    };
    if index >= size {
        return fail("leaf index outside the tree");
    }
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if sn == 0 {
            return fail("proof longer than the tree is deep");
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return fail("proof shorter than the tree is deep");
    }
    if r != *root {
        return fail("the proof does not lead to the root");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Roots and proofs over stored nodes: a log too long to hold in memory.
//
// A node `(level, index)` is the root of the perfect subtree over leaves
// `[index·2^level, (index+1)·2^level)`; level 0 is a leaf hash. Appending leaf `n` (0-based)
// completes the nodes `(l, n >> l)` for `l` in `0..=trailing_ones(n)`: a store that keeps those
// hashes with the leaf's height (`n + 1`) can answer every root and proof below with
// O(log n) reads (see `completed_at`).

/// The height (1-based leaf count) at which node `(level, index)` is completed.
pub fn completed_at(level: u8, index: u64) -> u64 {
    (index + 1) << level
}

/// How many nodes appending the leaf that makes the tree `size` leaves completes:
/// `trailing_zeros(size) + 1` (the leaf and each perfect subtree it closes).
pub fn nodes_completed(size: u64) -> usize {
    assert!(size > 0);
    size.trailing_zeros() as usize + 1
}

/// The largest power of two smaller than `n` (n >= 2), for `u64` sizes.
fn split_u64(n: u64) -> u64 {
    assert!(n >= 2);
    1 << (63 - (n - 1).leading_zeros())
}

/// MTH of the `len` leaves from `start`, where `start` is a multiple of the power of two at
/// or above `len` (true of every range RFC 6962's recursion visits): its perfect subtrees read
/// with `node`.
fn range_root<E>(
    start: u64,
    len: u64,
    node: &mut impl FnMut(u8, u64) -> Result<Hash, E>,
) -> Result<Hash, E> {
    assert!(len >= 1);
    if len.is_power_of_two() {
        let level = len.trailing_zeros();
        assert_eq!(start % len, 0, "unaligned subtree at {start}");
        return node(level as u8, start >> level);
    }
    let k = split_u64(len);
    let left = range_root(start, k, node)?;
    let right = range_root(start + k, len - k, node)?;
    Ok(node_hash(&left, &right))
}

/// RFC 6962 root of the first `size` leaves, from stored nodes.
pub fn root_by<E>(size: u64, node: &mut impl FnMut(u8, u64) -> Result<Hash, E>) -> Result<Hash, E> {
    if size == 0 {
        return Ok(empty_root());
    }
    range_root(0, size, node)
}

/// [`consistency_proof`] from `old_size` to `new_size` leaves, from stored nodes.
pub fn consistency_proof_by<E>(
    old_size: u64,
    new_size: u64,
    node: &mut impl FnMut(u8, u64) -> Result<Hash, E>,
) -> Result<Vec<Hash>, E> {
    assert!(
        old_size <= new_size,
        "old size {old_size} beyond {new_size}"
    );
    let mut proof = Vec::new();
    if old_size > 0 {
        subproof_by(0, new_size, old_size, true, node, &mut proof)?;
    }
    Ok(proof)
}

/// SUBPROOF(m, D[start:start+n], whole) of RFC 9162 section 2.1.4.1.
fn subproof_by<E>(
    start: u64,
    n: u64,
    m: u64,
    whole: bool,
    node: &mut impl FnMut(u8, u64) -> Result<Hash, E>,
    proof: &mut Vec<Hash>,
) -> Result<(), E> {
    if m == n {
        if !whole {
            proof.push(range_root(start, n, node)?);
        }
        return Ok(());
    }
    let k = split_u64(n);
    if m <= k {
        subproof_by(start, k, m, whole, node, proof)?;
        proof.push(range_root(start + k, n - k, node)?);
    } else {
        subproof_by(start + k, n - k, m - k, false, node, proof)?;
        proof.push(range_root(start, k, node)?);
    }
    Ok(())
}

/// [`inclusion_proof`] of leaf `index` in the tree of `size` leaves, from stored nodes.
pub fn inclusion_proof_by<E>(
    index: u64,
    size: u64,
    node: &mut impl FnMut(u8, u64) -> Result<Hash, E>,
) -> Result<Vec<Hash>, E> {
    assert!(index < size, "leaf {index} outside a log of {size}");
    let mut proof = Vec::new();
    let (mut start, mut n, mut m) = (0, size, index);
    let mut path = Vec::new();
    // PATH(m, D[n]) walked top down; the hashes are emitted bottom up.
    while n > 1 {
        let k = split_u64(n);
        if m < k {
            path.push((start + k, n - k));
            n = k;
        } else {
            path.push((start, k));
            start += k;
            n -= k;
            m -= k;
        }
    }
    for (s, len) in path.into_iter().rev() {
        proof.push(range_root(s, len, node)?);
    }
    Ok(proof)
}

/// The right edge of an RFC 6962 tree (one perfect subtree per set bit of its size, largest
/// first): enough to append leaves and compute the root without reading anything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TreeEdge {
    size: u64,
    edge: Vec<Hash>,
}

impl TreeEdge {
    pub fn new() -> TreeEdge {
        TreeEdge::default()
    }

    /// The edge of a stored tree of `size` leaves, read with `node`.
    pub fn load<E>(
        size: u64,
        node: &mut impl FnMut(u8, u64) -> Result<Hash, E>,
    ) -> Result<TreeEdge, E> {
        let mut edge = Vec::new();
        let mut start = 0u64;
        for level in (0..64u8).rev() {
            if size >> level & 1 == 1 {
                edge.push(node(level, start >> level)?);
                start += 1 << level;
            }
        }
        Ok(TreeEdge { size, edge })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends a leaf hash; returns the nodes it completes, level 0 first (node `l` is
    /// `(l, old_size >> l)`), [`nodes_completed`] of them.
    pub fn append(&mut self, leaf: Hash) -> Vec<Hash> {
        let mut completed = vec![leaf];
        let mut cur = leaf;
        let mut n = self.size;
        while n & 1 == 1 {
            let left = self.edge.pop().expect("a set bit has its subtree");
            cur = node_hash(&left, &cur);
            completed.push(cur);
            n >>= 1;
        }
        self.edge.push(cur);
        self.size += 1;
        debug_assert_eq!(completed.len(), nodes_completed(self.size));
        debug_assert_eq!(self.edge.len(), self.size.count_ones() as usize);
        completed
    }

    /// The root: the edge's subtrees folded from the smallest.
    pub fn root(&self) -> Hash {
        let mut hashes = self.edge.iter().rev();
        let Some(first) = hashes.next() else {
            return empty_root();
        };
        hashes.fold(*first, |acc, left| node_hash(left, &acc))
    }
}

// ---------------------------------------------------------------------------------------------
// Checkpoints and signed notes.

/// A c2sp.org/tlog-checkpoint body: the tree head the operator signs and the archive publishes
/// at `checkpoint`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// Which log this is: [`origin_for`] the chain.
    pub origin: String,
    /// Leaves in the tree: the ledger height.
    pub size: u64,
    /// RFC 6962 root of the tree.
    pub root: Hash,
}

impl Checkpoint {
    /// The note text: `<origin>\n<size>\n<base64 root>\n`, with no extension lines (the spec
    /// recommends none: monitors cannot audit them).
    pub fn body(&self) -> String {
        assert!(
            !self.origin.is_empty() && !self.origin.chars().any(char::is_control),
            "origin {:?} must be non-empty with no control characters",
            self.origin
        );
        format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            BASE64.encode(self.root)
        )
    }

    /// Parses a checkpoint body (the text of a note already opened with [`open_note`]). Accepts
    /// extension lines, as the spec requires, and drops them; see
    /// [`Checkpoint::parse_body_with_extensions`] to keep them.
    pub fn parse_body(text: &str) -> Result<Checkpoint, TlogError> {
        Ok(Self::parse_body_with_extensions(text)?.0)
    }

    /// Parses a checkpoint body and returns its extension lines too (opaque, each non-empty).
    /// Strict about the rest: non-empty origin, decimal size without leading zeros, canonical
    /// base64 of 32 bytes, final newline, so that a body has one reading.
    pub fn parse_body_with_extensions(text: &str) -> Result<(Checkpoint, Vec<String>), TlogError> {
        let fail = |reason| Err(TlogError::CheckpointMalformed { reason });
        let Some(body) = text.strip_suffix('\n') else {
            return fail("does not end in a newline");
        };
        let mut lines = body.split('\n');
        let (Some(origin), Some(size), Some(root)) = (lines.next(), lines.next(), lines.next())
        else {
            return fail("fewer than three lines");
        };
        if origin.is_empty() || origin.chars().any(char::is_control) {
            return fail("empty origin or control characters in it");
        }
        let digits_ok = !size.is_empty() && size.bytes().all(|b| b.is_ascii_digit());
        if !digits_ok || (size.len() > 1 && size.starts_with('0')) {
            return fail("tree size is not a decimal without leading zeros");
        }
        let Ok(size) = size.parse::<u64>() else {
            return fail("tree size does not fit 64 bits");
        };
        let Some(root) = BASE64
            .decode(root)
            .ok()
            .and_then(|r| Hash::try_from(r).ok())
        else {
            return fail("root hash is not base64 of 32 bytes");
        };
        let extensions: Vec<String> = lines.map(str::to_owned).collect();
        if extensions.iter().any(|line| line.is_empty()) {
            return fail("empty extension line");
        }
        let origin = origin.to_owned();
        Ok((Checkpoint { origin, size, root }, extensions))
    }
}

/// The checkpoint origin (and note key name) of a tally ledger: `tally.ledger/` followed by the
/// chain id in lowercase hex. One log per chain: a checkpoint of one chain can never pass for
/// another's, and the name has neither spaces nor `+`, as key names need.
pub fn origin_for(chain_id: &Hash) -> String {
    format!("tally.ledger/{}", hex::encode(chain_id))
}

/// Key names must be non-empty, without Unicode spaces or `+` (signed-note): the name ends at
/// the first space of a signature line, and `+` separates the parts of a verifier key.
pub(crate) fn valid_key_name(name: &str) -> bool {
    !name.is_empty() && !name.chars().any(|c| c.is_whitespace() || c == '+')
}

/// Signed notes carry no ASCII control characters but newline.
pub(crate) fn valid_note_chars(text: &str) -> bool {
    !text.chars().any(|c| c < ' ' && c != '\n')
}

/// Key ID of an Ed25519 note key: the first 4 bytes of SHA-256(name || "\n" || 0x01 || public
/// key), as signed-note recommends and Go's `sumdb/note` computes, so that verifiers find the
/// key a signature line claims.
pub fn note_key_id(name: &str, key: &VerifyingKey) -> [u8; 4] {
    let digest = sha256(&[name.as_bytes(), b"\n", &[NOTE_TYPE_ED25519], key.as_bytes()]);
    digest[..4].try_into().expect("4 bytes")
}

/// The verifier key string `<name>+<hex key id>+<base64(0x01 || key)>`: what the operator
/// publishes so that witnesses and auditors (Go's `note.NewVerifier`) can check checkpoints.
pub fn note_verifier_key(name: &str, key: &VerifyingKey) -> String {
    assert!(valid_key_name(name), "invalid note key name {name:?}");
    let mut material = vec![NOTE_TYPE_ED25519];
    material.extend_from_slice(key.as_bytes());
    format!(
        "{name}+{}+{}",
        hex::encode(note_key_id(name, key)),
        BASE64.encode(material)
    )
}

/// Signs `text` as a signed note: the text (ending in a newline), a blank line, and one
/// signature line `— <name> <base64(key id || Ed25519 signature)>` (em dash U+2014). Ed25519 is
/// deterministic, so the same text and key give the same note byte for byte.
pub fn sign_note(text: &str, name: &str, key: &SigningKey) -> String {
    assert!(valid_key_name(name), "invalid note key name {name:?}");
    assert!(
        text.ends_with('\n') && valid_note_chars(text),
        "note text must end in a newline and hold no control characters but newlines"
    );
    let signature = key.sign(text.as_bytes()).to_bytes();
    note_with_signature(text, name, &key.verifying_key().to_bytes(), &signature)
}

/// The signed note of `text` by (`name`, `key`) with `signature` (over `text`'s bytes) made
/// elsewhere: by a threshold of replicas, none of which holds the key.
pub fn note_with_signature(
    text: &str,
    name: &str,
    key: &tally_wire::PublicKey,
    signature: &tally_wire::Signature,
) -> String {
    let key = VerifyingKey::from_bytes(key).expect("the operator key is a valid point");
    let mut blob = note_key_id(name, &key).to_vec();
    blob.extend_from_slice(signature);
    format!("{text}\n\u{2014} {name} {}\n", BASE64.encode(blob))
}

/// Verifies that `note` carries a valid signature by (`name`, `key`) and returns its text.
/// Signatures by other keys (another name or key ID, e.g. witness cosignatures) are ignored, as
/// the spec requires; a failing signature by this key rejects the whole note; a note with none
/// by this key is refused.
pub fn open_note(note: &str, name: &str, key: &VerifyingKey) -> Result<String, TlogError> {
    let malformed = |reason| Err(TlogError::NoteMalformed { reason });
    if !valid_note_chars(note) {
        return malformed("control characters");
    }
    // The text ends at the last blank line; the signature block follows.
    let Some(split) = note.rfind("\n\n") else {
        return malformed("no blank line before the signatures");
    };
    let (text, block) = (&note[..split + 1], &note[split + 2..]);
    let Some(block) = block.strip_suffix('\n').filter(|b| !b.is_empty()) else {
        return malformed("no signature lines, or no final newline");
    };
    let key_id = note_key_id(name, key);
    let key_name = format!("{name}+{}", hex::encode(key_id));
    let mut verified = false;
    for (count, line) in block.split('\n').enumerate() {
        if count == NOTE_SIGNATURES_MAX {
            return malformed("too many signatures");
        }
        let (signer, id, signature) = parse_signature_line(line)?;
        if signer != name || id != key_id {
            continue;
        }
        let good = ed25519_dalek::Signature::from_slice(&signature)
            .is_ok_and(|s| key.verify_strict(text.as_bytes(), &s).is_ok());
        if !good {
            return Err(TlogError::NoteBadSignature { key: key_name });
        }
        verified = true;
    }
    if !verified {
        return Err(TlogError::NoteUnsigned { key: key_name });
    }
    Ok(text.to_owned())
}

/// One signature line: `— <name> <base64(key id || signature)>`, split into its parts.
pub(crate) fn parse_signature_line(line: &str) -> Result<(&str, [u8; 4], Vec<u8>), TlogError> {
    let malformed = |reason| TlogError::NoteMalformed { reason };
    let rest = line
        .strip_prefix("\u{2014} ")
        .ok_or(malformed("a line after the blank line is not a signature"))?;
    let (name, encoded) = rest
        .split_once(' ')
        .ok_or(malformed("signature line without a space"))?;
    if !valid_key_name(name) {
        return Err(malformed("invalid key name in a signature line"));
    }
    let mut blob = BASE64
        .decode(encoded)
        .map_err(|_| malformed("signature is not base64"))?;
    if blob.len() < 5 {
        return Err(malformed("signature shorter than a key id and one byte"));
    }
    let signature = blob.split_off(4);
    let id = blob.try_into().expect("4 bytes");
    Ok((name, id, signature))
}
