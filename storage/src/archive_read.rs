//! Reading an archive back, verified: the shared part of `tally audit` (everything, from the
//! archive alone) and `tally-server restore` (the batches up to a height, into a ledger).
//!
//! Trust starts at the operator's public key, which the reader brings (the profile, the
//! config): the checkpoint must carry its signature; the entry bundles must hash to the
//! checkpoint's root (so the signed headers, the log's leaves, are exactly the ones the
//! checkpoint commits to); each header must carry the operator's signature and link to the one
//! before; each batch object must hold exactly its leaf's header and a body whose receipts give
//! the header's Merkle root and replay to its state digest.

use std::collections::{BTreeMap, HashMap, HashSet};

use ed25519_dalek::VerifyingKey;
use futures::stream::{self, Stream, StreamExt};
use tally_core::archive::{
    batch_key, decode_batch, decode_signature_bundle, key_link_key, signature_bundle_key,
    verify_batch, ArchivedBatch, Marker, CHECKPOINT_KEY, MARKER_KEY,
};
use tally_core::batch::{replay_batch, BatchItem};
use tally_core::crypto::{key_id, sha256, verify_envelope, KeyCache};
use tally_core::header_log::open_note_under;
use tally_core::key_chain::KeySchedule;
use tally_core::ports::{LedgerRead, RequestRecord};
use tally_core::reserve::{Expiry, Reserve};
use tally_core::state::LedgerMeta;
use tally_core::tlog::{
    all_tiles, decode_entry_bundle, entries_path, leaf_hash, open_note, origin_for, root_of,
    Checkpoint, TreeEdge, TILE_WIDTH,
};
use tally_wire::{
    Hash, KeyLink, PublicKey, Signature, SignedHeader, KEY_LINKS_MAX, SIGNED_HEADER_BYTES,
};

use crate::bucket::{Bucket, BucketError};
use crate::snapshots;
use tally_core::snapshot::{manifest_key, Delta, Manifest};

/// Batch objects read at once.
const READS_IN_FLIGHT: usize = 16;
/// Batches whose signatures the audit checks at once (on the blocking pool).
const SIGNATURE_CHECKS_IN_FLIGHT: usize = 4;
/// Signer keys a batch's signature check keeps decoded.
const KEY_CACHE_MAX: usize = 65_536;

/// A problem with one object of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectError {
    /// The object's key (relative to the archive's prefix).
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for ObjectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Why reading stopped: the store failed (retry), or the archive is wrong (an object named).
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Store(#[from] BucketError),
    #[error("{0}")]
    Bad(ObjectError),
}

fn bad(key: impl Into<String>, message: impl Into<String>) -> ReadError {
    ReadError::Bad(ObjectError {
        key: key.into(),
        message: message.into(),
    })
}

/// An archive whose marker and checkpoint verified, and its signed headers (the log's
/// leaves), which hash to the checkpoint's root.
pub struct VerifiedLog {
    pub chain_id: Hash,
    /// The genesis operator key (the marker's).
    pub operator: PublicKey,
    /// The key chain from it (the `keychain/` objects): which key signs which height.
    pub keys: KeySchedule,
    pub checkpoint: Checkpoint,
    /// The checkpoint as stored: its signed note (a restored threshold operator's replica
    /// keeps the threshold's signature from it).
    pub checkpoint_note: Vec<u8>,
    /// `headers[i]` is the signed header at height `i + 1`.
    pub headers: Vec<SignedHeader>,
    pub leaf_hashes: Vec<Hash>,
}

/// Reads and checks the marker against the expected ledger: it must name `operator`, and
/// `chain_id` when one is given. Returns the chain id.
pub async fn read_marker(
    bucket: &Bucket,
    chain_id: Option<&Hash>,
    operator: &PublicKey,
) -> Result<Hash, ReadError> {
    let Some((bytes, _)) = bucket.get(MARKER_KEY).await? else {
        return Err(bad(MARKER_KEY, "missing: this is not a tally archive"));
    };
    let marker = Marker::decode(&bytes).map_err(|e| bad(MARKER_KEY, e.to_string()))?;
    if &marker.operator != operator {
        return Err(bad(
            MARKER_KEY,
            format!(
                "names operator key {}, not the expected {}",
                hex::encode(marker.operator),
                hex::encode(operator)
            ),
        ));
    }
    if let Some(c) = chain_id.filter(|c| **c != marker.chain_id) {
        return Err(bad(
            MARKER_KEY,
            format!(
                "belongs to chain {}, not {}",
                hex::encode(marker.chain_id),
                hex::encode(c)
            ),
        ));
    }
    Ok(marker.chain_id)
}

/// Parses a signed checkpoint note, checking the operator's signature.
pub fn open_checkpoint(
    text: &[u8],
    chain_id: &Hash,
    operator: &PublicKey,
) -> Result<Checkpoint, String> {
    let origin = origin_for(chain_id);
    let key = ed25519_dalek::VerifyingKey::from_bytes(operator)
        .map_err(|_| "the operator key is not a valid Ed25519 key".to_string())?;
    let text = std::str::from_utf8(text).map_err(|_| "not UTF-8".to_string())?;
    let body = open_note(text, &origin, &key).map_err(|e| e.to_string())?;
    let checkpoint = Checkpoint::parse_body(&body).map_err(|e| e.to_string())?;
    if checkpoint.origin != origin {
        return Err(format!("origin {:?} is not {origin:?}", checkpoint.origin));
    }
    Ok(checkpoint)
}

/// The archive's key chain (`keychain/1`, `keychain/2`, ... until one is missing), followed
/// from `genesis` (PROTOCOL.md §4.14).
pub async fn read_key_chain(
    bucket: &Bucket,
    genesis: &PublicKey,
) -> Result<KeySchedule, ReadError> {
    let mut keys = KeySchedule::genesis(*genesis);
    for number in 1..=KEY_LINKS_MAX as u32 {
        let key = key_link_key(number);
        let Some((bytes, _)) = bucket.get(&key).await? else {
            break;
        };
        let link = KeyLink::decode(&bytes).map_err(|e| bad(&key, e.to_string()))?;
        keys.extend(&link).map_err(|e| bad(&key, e.to_string()))?;
    }
    Ok(keys)
}

/// [`open_checkpoint`] under a key chain: signed by a key at or after its size's.
pub fn open_checkpoint_in(
    text: &[u8],
    chain_id: &Hash,
    keys: &KeySchedule,
) -> Result<Checkpoint, String> {
    let origin = origin_for(chain_id);
    let text = std::str::from_utf8(text).map_err(|_| "not UTF-8".to_string())?;
    let body = open_note_under(text, &origin, &keys.keys()).map_err(|e| e.to_string())?;
    let checkpoint = Checkpoint::parse_body(&body).map_err(|e| e.to_string())?;
    if checkpoint.origin != origin {
        return Err(format!("origin {:?} is not {origin:?}", checkpoint.origin));
    }
    open_note_under(text, &origin, &keys.checkpoint_keys(checkpoint.size)).map_err(|_| {
        format!(
            "signed by a key rotated out before height {}",
            checkpoint.size + 1
        )
    })?;
    Ok(checkpoint)
}

/// Reads the marker, the checkpoint and every entry bundle, and checks that the headers hash
/// to the checkpoint's root and form the operator's signed hash chain.
pub async fn read_log(
    bucket: &Bucket,
    chain_id: Option<&Hash>,
    operator: &PublicKey,
) -> Result<VerifiedLog, ReadError> {
    let chain_id = read_marker(bucket, chain_id, operator).await?;
    let keys = read_key_chain(bucket, operator).await?;
    let Some((bytes, _)) = bucket.get(CHECKPOINT_KEY).await? else {
        return Err(bad(CHECKPOINT_KEY, "missing: nothing was archived yet"));
    };
    let checkpoint =
        open_checkpoint_in(&bytes, &chain_id, &keys).map_err(|e| bad(CHECKPOINT_KEY, e))?;
    let headers = read_headers(bucket, checkpoint.size).await?;
    let leaf_hashes: Vec<Hash> = headers.iter().map(|h| leaf_hash(&h.encode())).collect();
    if root_of(&leaf_hashes) != checkpoint.root {
        return Err(bad(
            CHECKPOINT_KEY,
            "the entry bundles' headers do not hash to the checkpoint's root",
        ));
    }
    check_chain(&headers, &keys)?;
    Ok(VerifiedLog {
        chain_id,
        operator: *operator,
        keys,
        checkpoint,
        checkpoint_note: bytes.to_vec(),
        headers,
        leaf_hashes,
    })
}

/// The signed headers 1..=size from the entry bundles.
async fn read_headers(bucket: &Bucket, size: u64) -> Result<Vec<SignedHeader>, ReadError> {
    let bundles = size.div_ceil(TILE_WIDTH);
    let paths: Vec<String> = (0..bundles)
        .map(|n| entries_path(n, (size - n * TILE_WIDTH).min(TILE_WIDTH)))
        .collect();
    let mut reads = stream::iter(paths)
        .map(|path| async move {
            let got = bucket.get(&path).await;
            (path, got)
        })
        .buffered(READS_IN_FLIGHT);
    let mut headers = Vec::with_capacity(size as usize);
    while let Some((path, got)) = reads.next().await {
        let Some((bytes, _)) = got? else {
            return Err(bad(path, "missing although the checkpoint covers it"));
        };
        let entries = decode_entry_bundle(&bytes).map_err(|e| bad(&path, e.to_string()))?;
        for entry in entries {
            let signed = (entry.len() == SIGNED_HEADER_BYTES)
                .then(|| SignedHeader::decode(&entry).ok())
                .flatten()
                .ok_or_else(|| bad(&path, "an entry is not a signed header"))?;
            headers.push(signed);
        }
    }
    if headers.len() as u64 != size {
        return Err(bad(
            entries_path(bundles.saturating_sub(1), TILE_WIDTH),
            format!("the bundles hold {} headers, not {size}", headers.len()),
        ));
    }
    Ok(headers)
}

/// Heights, hash links and operator signatures (each under the key for its height) of the
/// whole header chain.
fn check_chain(headers: &[SignedHeader], keys: &KeySchedule) -> Result<(), ReadError> {
    let mut prev = [0u8; 32];
    for (i, signed) in headers.iter().enumerate() {
        let height = i as u64 + 1;
        let h = &signed.header;
        let key = batch_key(height);
        if h.height != height || h.prev_hash != prev {
            return Err(bad(key, "the header does not extend the chain before it"));
        }
        keys.verify_header(signed)
            .map_err(|e| bad(&key, format!("header: {e}")))?;
        prev = tally_core::crypto::header_hash(h);
    }
    Ok(())
}

/// The batch objects `from..=to`, in order, each checked against the log: it must hold exactly
/// the log's header at its height, and pass [`verify_batch`].
pub fn read_batches<'a>(
    bucket: &'a Bucket,
    log: &'a VerifiedLog,
    from: u64,
    to: u64,
) -> impl Stream<Item = Result<(u64, ArchivedBatch), ReadError>> + 'a {
    assert!(from >= 1 && to <= log.checkpoint.size);
    stream::iter(from..=to)
        .map(move |height| async move {
            let key = batch_key(height);
            let Some((bytes, _)) = bucket.get(&key).await? else {
                return Err(bad(key, "missing although the checkpoint covers it"));
            };
            let batch = decode_batch(&bytes).map_err(|e| bad(&key, e.to_string()))?;
            let leaf = &log.headers[height as usize - 1];
            if &batch.signed != leaf {
                return Err(bad(
                    key,
                    "its header is not the log's header at this height",
                ));
            }
            let prev = leaf.header.prev_hash;
            verify_batch(&batch, height, &prev, &log.keys.key_for(height))
                .map_err(|e| bad(&key, e.to_string()))?;
            Ok((height, batch))
        })
        .buffered(READS_IN_FLIGHT)
}

/// Every request of a batch must be signed by its signer for this chain (and the header must
/// name the chain). Pure and `Send`: the audit runs it on the blocking pool, batches at once.
pub fn check_requests(batch: &ArchivedBatch, chain_id: &Hash) -> Result<(), String> {
    if &batch.signed.header.chain_id != chain_id {
        return Err("the header names another chain".into());
    }
    let mut keys = KeyCache::new(KEY_CACHE_MAX);
    for (i, item) in batch.body.items.iter().enumerate() {
        let (chain, signed) = match item {
            BatchItem::Request(e) => (&e.request.chain_id, keys.verify_request(&e.request)),
            BatchItem::Envelope(e) => (&e.envelope.chain_id, verify_envelope(&e.envelope)),
            // Leader-made: nobody signed them; the replay checks that the reserve was due and
            // that the rotation follows the last one.
            BatchItem::Expire(_) | BatchItem::Rotate(_) => continue,
        };
        if chain != chain_id {
            return Err(format!("item {i} is signed for another chain"));
        }
        if !signed {
            return Err(format!("item {i}: its signature does not verify"));
        }
    }
    Ok(())
}

/// Balances and request ids rebuilt by replaying the archive, for the audit.
pub struct ReplayState {
    pub meta: LedgerMeta,
    pub accounts: Accounts,
    /// SHA-256 of signer ‖ id, truncated: every request id applied, for the exactly-once check.
    seen: HashSet<[u8; 16]>,
    /// The sum of every balance and of what open reserves hold, moved by each batch's balance
    /// change: it must stay equal to deposits minus withdrawals (conservation, checked after
    /// every batch).
    balance_total: u128,
}

/// Balances by account, reserves (open and closed) and the last batch's time, as the replay
/// reads them.
#[derive(Default)]
pub struct Accounts {
    pub balances: HashMap<PublicKey, u64>,
    pub reserves: BTreeMap<(PublicKey, u128), Reserve>,
    /// Height and time (unix ms) of the last batch replayed.
    pub last_header: (u64, u64),
}

impl LedgerRead for Accounts {
    fn account(&mut self, key: &PublicKey) -> tally_core::Result<Option<u64>> {
        Ok(self.balances.get(key).copied())
    }
    fn request(&mut self, _: &PublicKey, _: u128) -> tally_core::Result<Option<RequestRecord>> {
        Ok(None)
    }
    fn reserve(&mut self, owner: &PublicKey, id: u128) -> tally_core::Result<Option<Reserve>> {
        Ok(self.reserves.get(&(*owner, id)).copied())
    }
    /// A scan: the replay never asks (only a leader choosing expiries does).
    fn expiries(&mut self, limit: usize) -> tally_core::Result<Vec<Expiry>> {
        Ok(tally_core::reserve::earliest(&self.reserves, limit))
    }
    fn header_time(&mut self, height: u64) -> tally_core::Result<u64> {
        match height {
            0 => Ok(0),
            h if h == self.last_header.0 => Ok(self.last_header.1),
            h => Err(tally_core::Error::missing(format_args!(
                "the time of batch {h}: the replay keeps the last one's only"
            ))),
        }
    }
}

impl Default for ReplayState {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplayState {
    pub fn new() -> ReplayState {
        ReplayState {
            meta: LedgerMeta::genesis(),
            accounts: Accounts::default(),
            seen: HashSet::new(),
            balance_total: 0,
        }
    }

    /// Replays one verified batch: every request must be signed by its signer for this
    /// chain, balances must follow, the state digest must be the header's, and no request id
    /// may have been applied before.
    pub fn apply(
        &mut self,
        batch: &ArchivedBatch,
        chain_id: &Hash,
        operator: &PublicKey,
    ) -> Result<(), String> {
        check_requests(batch, chain_id)?;
        self.apply_checked(batch, operator)
    }

    /// [`ReplayState::apply`] of a batch whose requests [`check_requests`] has passed.
    pub fn apply_checked(
        &mut self,
        batch: &ArchivedBatch,
        operator: &PublicKey,
    ) -> Result<(), String> {
        let replayed = replay_batch(
            &batch.body,
            &self.meta,
            &mut self.accounts,
            &key_id(operator),
        )
        .map_err(|e| e.to_string())?;
        for r in &replayed.requests {
            if !self.seen.insert(short_id(&r.signer, r.id)) {
                return Err(format!(
                    "request {} of signer {} was applied twice",
                    r.id,
                    hex::encode(r.signer)
                ));
            }
        }
        for (key, balance) in replayed.accounts {
            self.accounts.balances.insert(key, balance);
        }
        for c in replayed.reserves {
            self.accounts.reserves.insert((c.owner, c.id), c.after);
        }
        let h = &batch.body.header;
        self.accounts.last_header = (h.height, h.time_unix_ms);
        self.meta = replayed.meta;
        let total = self.balance_total as i128 + replayed.balance_change;
        let expected = self.meta.expected_total();
        if u128::try_from(total).ok() != Some(expected) {
            return Err(format!(
                "balances and open reserves sum to {total}, deposits minus withdrawals to \
                 {expected}"
            ));
        }
        self.balance_total = expected;
        Ok(())
    }
}

/// A threshold operator's checkpoint signatures of sizes `1..=to` (`to` at most the log's
/// size) from the archive's signature bundles (PROTOCOL.md §15.10), each checked under the
/// operator key against the checkpoint of its size, computed from the log's headers;
/// `signatures[i]` is size `i + 1`'s. None when the archive holds no bundle at all (a whole
/// key's archive: its writer signs checkpoints itself).
pub async fn read_signature_bundles(
    bucket: &Bucket,
    log: &VerifiedLog,
    to: u64,
) -> Result<Option<Vec<Signature>>, ReadError> {
    let size = log.checkpoint.size;
    assert!(to <= size, "signatures above the log's size {size}");
    let origin = origin_for(&log.chain_id);
    let mut edge = TreeEdge::new();
    let mut all = Vec::with_capacity(to as usize);
    for index in 0..to.div_ceil(TILE_WIDTH) {
        let width = (size - index * TILE_WIDTH).min(TILE_WIDTH);
        let object = signature_bundle_key(index, width);
        let Some((bytes, _)) = bucket.get(&object).await? else {
            if index == 0 {
                return Ok(None);
            }
            return Err(bad(object, "missing although the checkpoint covers it"));
        };
        let mut signatures =
            decode_signature_bundle(&bytes, width).map_err(|e| bad(&object, e.to_string()))?;
        signatures.truncate((to - index * TILE_WIDTH).min(width) as usize);
        for (size, signature) in (index * TILE_WIDTH + 1..).zip(&signatures) {
            edge.append(log.leaf_hashes[size as usize - 1]);
            let body = Checkpoint {
                origin: origin.clone(),
                size,
                root: edge.root(),
            }
            .body();
            // Signed by the group of the header after it (PROTOCOL.md §4.14).
            let key = VerifyingKey::from_bytes(&log.keys.key_for(size + 1))
                .map_err(|_| bad(MARKER_KEY, "an operator key is not an Ed25519 point"))?;
            let valid = key
                .verify_strict(
                    body.as_bytes(),
                    &ed25519_dalek::Signature::from_bytes(signature),
                )
                .is_ok();
            if !valid {
                let why = format!("the signature of the checkpoint of size {size} does not verify");
                return Err(bad(object, why));
            }
        }
        all.extend(signatures);
    }
    Ok(Some(all))
}

/// Every tile and entry bundle a correct archive of these headers holds, compared with the
/// stored ones; the first difference is returned.
pub async fn check_tiles(bucket: &Bucket, log: &VerifiedLog) -> Result<(), ReadError> {
    let leaves: Vec<Vec<u8>> = log.headers.iter().map(|h| h.encode().to_vec()).collect();
    let refs: Vec<&[u8]> = leaves.iter().map(|l| l.as_slice()).collect();
    let (tiles, root) = all_tiles(&refs);
    assert_eq!(root, log.checkpoint.root, "read_log checked the root");
    let mut reads = stream::iter(tiles)
        .map(|(path, want)| async move {
            let got = bucket.get(&path).await;
            (path, want, got)
        })
        .buffered(READS_IN_FLIGHT);
    while let Some((path, want, got)) = reads.next().await {
        match got? {
            Some((bytes, _)) if bytes.as_ref() == want.as_slice() => {}
            Some(_) => return Err(bad(path, "differs from the tile the log's leaves give")),
            None => return Err(bad(path, "missing although the checkpoint covers it")),
        }
    }
    Ok(())
}

/// SHA-256 of signer ‖ id, truncated: what the audit remembers of each applied request.
fn short_id(signer: &PublicKey, id: u128) -> [u8; 16] {
    let h = sha256(&[signer, &id.to_be_bytes()]);
    h[..16].try_into().expect("16")
}

/// The result of an audit: `ok` only if every check passed.
#[derive(Debug, Clone, Default)]
pub struct AuditReport {
    pub ok: bool,
    /// The highest height whose batch verified and replayed (0 if none).
    pub height: u64,
    /// Batches verified and replayed.
    pub batches: u64,
    /// The checkpoint's size (the archive's claimed height), when it could be read.
    pub checkpoint_size: Option<u64>,
    /// State snapshots checked against the replay.
    pub snapshots: u64,
    /// A threshold operator's checkpoint signatures checked (its signature bundles); None for
    /// an archive without them (a whole key's).
    pub checkpoint_signatures: Option<u64>,
    /// The ledger the archive's marker names, when it could be read.
    pub chain_id: Option<Hash>,
    /// Operator key rotations in the archive's key chain (its `keychain/` links).
    pub key_rotations: u64,
    pub accounts: u64,
    /// The state map's root after the batch at `height`, recomputed from the replay (the root
    /// the header's state digest commits to, PROTOCOL.md §4.13).
    pub state_map_root: Option<Hash>,
    pub errors: Vec<ObjectError>,
}

/// Audits an archive from its objects alone (see the module docs), replaying every batch.
/// `chain_id`: the ledger expected, if known. `earlier`: a checkpoint note saved before, which
/// the archive must extend (append-only). Store errors end the audit with `Err` (nothing can
/// be said); everything wrong with the archive itself is reported, first bad object first.
pub async fn audit(
    bucket: &Bucket,
    chain_id: Option<&Hash>,
    operator: &PublicKey,
    earlier: Option<&[u8]>,
) -> Result<AuditReport, BucketError> {
    let mut report = AuditReport::default();
    let outcome = audit_into(bucket, chain_id, operator, earlier, &mut report).await;
    match outcome {
        Ok(()) => {}
        Err(ReadError::Store(e)) => return Err(e),
        Err(ReadError::Bad(e)) => report.errors.push(e),
    }
    report.ok = report.errors.is_empty();
    Ok(report)
}

async fn audit_into(
    bucket: &Bucket,
    chain_id: Option<&Hash>,
    operator: &PublicKey,
    earlier: Option<&[u8]>,
    report: &mut AuditReport,
) -> Result<(), ReadError> {
    let log = read_log(bucket, chain_id, operator).await?;
    report.checkpoint_size = Some(log.checkpoint.size);
    report.chain_id = Some(log.chain_id);
    report.key_rotations = log.keys.rotations.len() as u64;
    if let Some(note) = earlier {
        check_extends(&log, note)?;
    }
    check_tiles(bucket, &log).await?;
    let signatures = read_signature_bundles(bucket, &log, log.checkpoint.size).await?;
    report.checkpoint_signatures = signatures.map(|s| s.len() as u64);
    let mut state = ReplayState::new();
    let size = log.checkpoint.size;
    if size == 0 {
        return Ok(());
    }
    let owner = snapshots::Owner {
        chain_id: log.chain_id,
        operators: log.keys.keys(),
        // The audit compares every snapshot's rows with the state it replays.
        unsigned: true,
    };
    let mut snaps = SnapshotCheck::new(snapshots::manifests(bucket, size, &owner).await?);
    // Signatures are most of the audit's work: checked on the blocking pool, a few batches at
    // once, ahead of the replay, which takes the batches in height order.
    let chain = log.chain_id;
    let checked = read_batches(bucket, &log, 1, size)
        .map(|item| async move {
            let (height, batch) = item?;
            let (batch, verdict) = tokio::task::spawn_blocking(move || {
                let verdict = check_requests(&batch, &chain);
                (batch, verdict)
            })
            .await
            .expect("a signature check does not panic");
            verdict.map_err(|e| bad(batch_key(height), e))?;
            Ok::<_, ReadError>((height, batch))
        })
        .buffered(SIGNATURE_CHECKS_IN_FLIGHT);
    let mut batches = std::pin::pin!(checked);
    while let Some(item) = batches.next().await {
        let (height, batch) = item?;
        state
            .apply_checked(&batch, &log.keys.key_for(height))
            .map_err(|e| bad(batch_key(height), e))?;
        snaps.since.add_batch(&batch.body);
        report.height = height;
        report.batches += 1;
        report.accounts = state.accounts.balances.len() as u64;
        report.state_map_root = Some(state.meta.map.root());
        if snaps.due(height) {
            snaps.check(bucket, &log, &state).await?;
            report.snapshots += 1;
        }
    }
    Ok(())
}

/// The audit's check of every snapshot against the state it replays.
struct SnapshotCheck {
    /// The manifests not checked yet, in height order.
    pending: std::collections::VecDeque<Manifest>,
    /// Effects of the batches since the last snapshot checked.
    since: Delta,
    last_height: u64,
}

impl SnapshotCheck {
    fn new(manifests: Vec<Manifest>) -> SnapshotCheck {
        SnapshotCheck {
            pending: manifests.into(),
            since: Delta::default(),
            last_height: 0,
        }
    }

    fn due(&self, height: u64) -> bool {
        self.pending.front().is_some_and(|m| m.height == height)
    }

    /// The next snapshot must name the log's header and digest, carry the replayed totals, and
    /// hold exactly the replayed rows: all of them (full) or those changed since the last
    /// snapshot, which must be its base (differential).
    async fn check(
        &mut self,
        bucket: &Bucket,
        log: &VerifiedLog,
        state: &ReplayState,
    ) -> Result<(), ReadError> {
        let m = self.pending.pop_front().expect("due");
        let key = manifest_key(m.height);
        let header = &log.headers[m.height as usize - 1].header;
        if m.header_hash != tally_core::crypto::header_hash(header)
            || m.state_digest != header.state_digest
        {
            return Err(bad(key, "does not name the log's header at its height"));
        }
        let totals = (state.meta.total_deposited, state.meta.total_withdrawn);
        if (m.total_deposited, m.total_withdrawn) != totals {
            return Err(bad(key, "its totals differ from the replayed ones"));
        }
        let rows = snapshots::read_rows(bucket, &m).await?;
        let since = std::mem::take(&mut self.since);
        let ok = if m.is_full() {
            let balances = &state.accounts.balances;
            rows.accounts == balances.iter().map(|(k, v)| (*k, *v)).collect()
                && rows.reserves == state.accounts.reserves
                && rows.requests.len() == state.seen.len()
                && rows
                    .requests
                    .keys()
                    .all(|(s, id)| state.seen.contains(&short_id(s, *id)))
        } else {
            m.base == self.last_height
                && rows.accounts == since.accounts
                && rows.reserves == since.reserves
                && rows.requests == since.requests
        };
        if !ok {
            return Err(bad(key, "its rows differ from the replayed state"));
        }
        self.last_height = m.height;
        Ok(())
    }
}

/// The archive's log must extend the log of an earlier checkpoint: same leaves up to its size.
fn check_extends(log: &VerifiedLog, note: &[u8]) -> Result<(), ReadError> {
    const KEY: &str = "--from-checkpoint";
    let old = open_checkpoint_in(note, &log.chain_id, &log.keys)
        .map_err(|e| bad(KEY, format!("the saved checkpoint does not verify: {e}")))?;
    if old.size > log.checkpoint.size {
        return Err(bad(
            CHECKPOINT_KEY,
            format!(
                "the archive's log ({} batches) is shorter than the saved checkpoint's ({}): \
                 history was removed",
                log.checkpoint.size, old.size
            ),
        ));
    }
    if root_of(&log.leaf_hashes[..old.size as usize]) != old.root {
        return Err(bad(
            CHECKPOINT_KEY,
            format!(
                "the archive's first {} headers do not hash to the saved checkpoint's root: the \
                 archive is not an append-only extension of it",
                old.size
            ),
        ));
    }
    Ok(())
}
