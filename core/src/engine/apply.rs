//! The apply stage: committed entries, in log order, become durable state and confirmations.
//!
//! For each committed batch the decision depends only on the committed log and the applied
//! state, so every replica decides alike:
//! - at or below the applied height: already applied (a restart re-delivers the log from the
//!   last durable commit); its waiters get their original confirmations;
//! - not extending the applied chain (sealed on a state a leader change superseded): skipped;
//!   its waiters are refused and the master must resynchronize;
//! - else replayed against the ledger (`prepare_apply` checks receipts, Merkle root and state
//!   digest), signed, and written in one atomic synced write, and only then confirmed.
//!
//! Resubmissions of requests whose batch is not applied yet wait here ("parked", bounded) and
//! get their original confirmation once it is.
//!
//! A threshold operator's replica (`crate::signing`) holds no key: it writes each batch with
//! its header unsigned and says so ([`ApplyOut::Unsigned`]). Then two committed signature
//! entries per height ([`Committed::Signature`]): the header's, stored and appended to the
//! header log ([`ApplyOut::HeaderSigned`] gives the checkpoint of the log of that size, which
//! is signed next), and that checkpoint's, stored, after which the batch's waiters are
//! confirmed (a client checks the header log's consistency as soon as it is answered). Each
//! kind applies in height order, a checkpoint only after its header; a signature that is not
//! the next of its kind, or does not verify under the group key, is skipped by every replica
//! alike.

use std::collections::{BTreeMap, HashMap};

use tally_wire::{Hash, Header, PublicKey, Signature, SignedHeader};

use crate::batch::{prepare_apply_sealed, BatchBody, BatchWrite, Confirmed};
use crate::crypto::{key_id, verify_strict, OperatorKey};
use crate::key_chain::{key_for_height, SigningKeys};
use crate::ports::{LedgerRead, LedgerStore, RequestRecord};
use crate::signing::{Item, Kind};
use crate::state::LedgerMeta;
use crate::state_map::StateMap;
use crate::{Error, Rejection, Result};

use super::{answer_or_stop, Refusal, Waiter};

/// A committed raft entry, as the replication stage hands it over.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per raft entry, moved: boxing buys nothing
pub enum Committed<R> {
    Batch {
        body: BatchBody,
        /// The entry's bytes: the encoded body.
        encoded: Vec<u8>,
        /// Clients of this replica waiting for the batch (none on followers).
        waiters: Vec<Waiter<R>>,
        /// The state map after the batch, as this replica's sequencer computed it when it
        /// sealed the batch (leaders only; see `batch::prepare_apply_sealed`).
        sealed: Option<StateMap>,
        raft_index: u64,
    },
    /// The signature of a height's header or checkpoint (a threshold operator's signature
    /// entry).
    Signature {
        item: Item,
        signature: Signature,
        raft_index: u64,
    },
    /// An entry without a batch (raft's own empty and configuration entries, or bytes that are
    /// not a batch body, which every replica skips alike).
    Other { raft_index: u64 },
}

/// Commands of the apply stage.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per batch, moved: boxing buys nothing
pub enum ApplyOut<R> {
    /// The batch is durable: each waiter gets its confirmation. `leaves` are the body's
    /// receipt leaf hashes ([`BatchBody::leaf_hashes`]), computed once by the apply.
    Confirm {
        body: BatchBody,
        leaves: Vec<Hash>,
        signed: SignedHeader,
        waiters: Vec<Waiter<R>>,
    },
    /// A resubmission's original confirmation.
    Replayed(R, Confirmed),
    Refuse(R, Refusal),
    /// A deterministic error met answering a resubmission ([`answer_or_stop`]).
    Reject(R, Rejection),
    /// A batch was applied with this header unsigned: the signing stage signs it.
    Unsigned(Header),
    /// The header at `height` is signed; `checkpoint` is the text of the header log's
    /// checkpoint of that size, which the signing stage signs next.
    HeaderSigned {
        height: u64,
        checkpoint: Vec<u8>,
        /// The key that signs that checkpoint: the one of the header after it.
        key: PublicKey,
    },
    /// Checkpoints are signed through this height.
    CheckpointSigned(u64),
    /// A committed batch did not extend the chain: the master's speculative state is void.
    Resync,
}

/// What one committed entry did.
#[derive(Debug)]
pub enum Applied {
    /// Not a batch, or a batch already applied.
    Skipped,
    /// A batch that does not extend the applied chain.
    Superseded,
    /// Written; the write, for the runtime's archive feed and metrics.
    Written(Box<BatchWrite>),
    /// A header's or a checkpoint's signature was written (a threshold operator's replica).
    Signed(Item),
}

#[derive(Debug, Clone, Copy)]
pub struct ApplierConfig {
    /// Resubmissions that may wait for their batch; beyond, they are refused `busy`.
    pub parked_max: usize,
    /// Committed balances kept in memory.
    pub accounts_cached_max: usize,
}

struct Parked<R> {
    index: u32,
    request_hash: Hash,
    reply: R,
}

pub struct Applier<R> {
    cfg: ApplierConfig,
    keys: SigningKeys,
    /// The ledger summary after the last applied batch.
    meta: LedgerMeta,
    /// The highest raft index applied (batches and other entries alike).
    applied_index: u64,
    parked: BTreeMap<u64, Vec<Parked<R>>>,
    parked_count: usize,
    accounts: AccountCache,
    /// The highest height whose header is signed: `meta.height` unless headers are signed
    /// by a threshold (then the batches above it wait for their signature entries).
    signed_through: u64,
    /// The highest height whose checkpoint is signed by the threshold (`signed_through` with
    /// a whole key, which signs checkpoints when asked): confirmations wait for it.
    checkpointed_through: u64,
    /// Batches applied unsigned whose waiters wait for the signature, by height.
    held: BTreeMap<u64, (BatchBody, Vec<Waiter<R>>)>,
}

impl<R> Applier<R> {
    /// Starts from the ledger's own summary.
    pub fn new(cfg: ApplierConfig, keys: SigningKeys, meta: LedgerMeta) -> Applier<R> {
        Applier {
            applied_index: meta.raft_index,
            signed_through: meta.height,
            checkpointed_through: meta.height,
            held: BTreeMap::new(),
            meta,
            keys,
            parked: BTreeMap::new(),
            parked_count: 0,
            accounts: AccountCache::new(cfg.accounts_cached_max),
            cfg,
        }
    }

    pub fn meta(&self) -> &LedgerMeta {
        &self.meta
    }

    /// Starts from the store's signed height (a threshold operator's replica may have headers
    /// applied but not signed when it stopped).
    pub fn with_signed_through(mut self, headers: u64, checkpoints: u64) -> Self {
        assert!(
            headers <= self.meta.height,
            "signed {headers} above applied"
        );
        assert!(
            checkpoints <= headers,
            "checkpoint {checkpoints} before its header"
        );
        self.signed_through = headers;
        self.checkpointed_through = checkpoints;
        self
    }

    /// Signatures applied through these heights: (headers, checkpoints).
    pub fn signed_through(&self) -> (u64, u64) {
        (self.signed_through, self.checkpointed_through)
    }

    /// The public key that signs the next header (held or not).
    pub fn operator_public(&self) -> PublicKey {
        self.keys.public_for_meta(&self.meta)
    }

    /// The key that signs the checkpoint of the header log of `size` (at most this replica's
    /// height): the key of the header after it (PROTOCOL.md §4.14).
    pub fn checkpoint_key<S: LedgerStore>(&self, store: &mut S, size: u64) -> Result<PublicKey> {
        self.threshold_key(store, size + 1)
    }

    /// Whether headers are signed by a threshold of replicas, not here (`crate::signing`).
    pub fn is_threshold(&self) -> bool {
        self.keys.is_threshold()
    }

    /// The key that signs this replica's next header, and the header log's checkpoints it
    /// serves (PROTOCOL.md §4.14). Fails when a rotation named a key this replica lacks.
    pub fn operator(&self) -> Result<&OperatorKey> {
        self.keys.for_meta(&self.meta)
    }

    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    /// Applies one committed entry. Every error here (a failed read or write, or a batch that
    /// does not replay to its header: `Diverged`) stops the replica, deterministic or not, and
    /// answers no one: skipping a committed batch is a decision no replica may take alone.
    pub fn committed<S: LedgerStore>(
        &mut self,
        store: &mut S,
        entry: Committed<R>,
        out: &mut Vec<ApplyOut<R>>,
    ) -> Result<Applied> {
        let (body, encoded, waiters, sealed, raft_index) = match entry {
            Committed::Other { raft_index } => {
                self.advance_index(raft_index);
                return Ok(Applied::Skipped);
            }
            Committed::Signature {
                item,
                signature,
                raft_index,
            } => {
                self.advance_index(raft_index);
                return match item.kind {
                    Kind::Header => self.header_signature(store, item.height, signature, out),
                    Kind::Checkpoint => self.checkpoint_signature(store, item, signature, out),
                };
            }
            Committed::Batch {
                body,
                encoded,
                waiters,
                sealed,
                raft_index,
            } => (body, encoded, waiters, sealed, raft_index),
        };
        let h = &body.header;
        if h.height <= self.meta.height {
            let starts = body.item_starts();
            for w in waiters {
                let item = body
                    .item_at(&starts, w.index)
                    .expect("a waiter's item starts at its index");
                self.replay(store, h.height, w.index, item.hash(), w.reply, out)?;
            }
            self.advance_index(raft_index);
            return Ok(Applied::Skipped);
        }
        let extends = h.height == self.meta.height + 1 && h.prev_hash == self.meta.last_header_hash;
        if !extends {
            out.extend(
                waiters
                    .into_iter()
                    .map(|w| ApplyOut::Refuse(w.reply, Refusal::Superseded)),
            );
            out.push(ApplyOut::Resync);
            self.advance_index(raft_index);
            return Ok(Applied::Superseded);
        }
        let write = self.write(store, &body, encoded, sealed, raft_index)?;
        self.confirm_written(store, &write, body, waiters, out)?;
        Ok(Applied::Written(Box::new(write)))
    }

    /// A written batch's waiters: confirmed now with a whole key, or held until the threshold
    /// signed its header and checkpoint.
    fn confirm_written<S: LedgerStore>(
        &mut self,
        store: &mut S,
        write: &BatchWrite,
        body: BatchBody,
        waiters: Vec<Waiter<R>>,
        out: &mut Vec<ApplyOut<R>>,
    ) -> Result<()> {
        if self.keys.is_threshold() {
            out.push(ApplyOut::Unsigned(write.signed_header.header.clone()));
            if !waiters.is_empty() {
                self.held.insert(write.meta.height, (body, waiters));
            }
            return Ok(());
        }
        self.signed_through = write.meta.height;
        self.checkpointed_through = write.meta.height;
        out.push(ApplyOut::Confirm {
            body,
            leaves: write.leaf_hashes.clone(),
            signed: write.signed_header.clone(),
            waiters,
        });
        self.unpark(store, out)
    }

    /// A committed header signature: written if it is the next height's and verifies under
    /// that height's operator key, else skipped (every replica decides alike).
    fn header_signature<S: LedgerStore>(
        &mut self,
        store: &mut S,
        height: u64,
        signature: Signature,
        out: &mut Vec<ApplyOut<R>>,
    ) -> Result<Applied> {
        if height != self.signed_through + 1 || height > self.meta.height {
            return Ok(Applied::Skipped);
        }
        let header = applied_header(store, height)?;
        let key = self.threshold_key(store, height)?;
        if key_id(&key) != header.operator_key_id
            || !verify_strict(&key, &header.encode(), &signature)
        {
            return Ok(Applied::Skipped);
        }
        store.sign_header(height, signature)?;
        self.signed_through = height;
        let checkpoint = checkpoint_text(store, &header.chain_id, height)?;
        let key = self.threshold_key(store, height + 1)?;
        out.push(ApplyOut::HeaderSigned {
            height,
            checkpoint,
            key,
        });
        Ok(Applied::Signed(Item {
            height,
            kind: Kind::Header,
        }))
    }

    /// A committed checkpoint signature: written if it is the next height's, its header is
    /// signed and it verifies over this replica's checkpoint of that size; then the batch is
    /// confirmed.
    fn checkpoint_signature<S: LedgerStore>(
        &mut self,
        store: &mut S,
        item: Item,
        signature: Signature,
        out: &mut Vec<ApplyOut<R>>,
    ) -> Result<Applied> {
        let height = item.height;
        if height != self.checkpointed_through + 1 || height > self.signed_through {
            return Ok(Applied::Skipped);
        }
        let chain_id = applied_header(store, height)?.chain_id;
        let text = checkpoint_text(store, &chain_id, height)?;
        if !verify_strict(&self.threshold_key(store, height + 1)?, &text, &signature) {
            return Ok(Applied::Skipped);
        }
        store.sign_checkpoint(height, signature)?;
        self.checkpointed_through = height;
        if let Some((body, waiters)) = self.held.remove(&height) {
            let signed = store
                .header(height)?
                .ok_or_else(|| Error::missing(format_args!("the signed header {height}")))?;
            out.push(ApplyOut::Confirm {
                leaves: body.leaf_hashes(),
                body,
                signed,
                waiters,
            });
        }
        out.push(ApplyOut::CheckpointSigned(height));
        self.unpark(store, out)?;
        Ok(Applied::Signed(item))
    }

    /// The key that signs the header at `height` (the group a threshold signature of it must
    /// verify under; PROTOCOL.md §4.14). The checkpoint of size `h` is the key of `h + 1`'s.
    fn threshold_key<S: LedgerStore>(&self, store: &mut S, height: u64) -> Result<PublicKey> {
        key_for_height(store, &self.meta, self.keys.genesis(), height)
    }

    fn write<S: LedgerStore>(
        &mut self,
        store: &mut S,
        body: &BatchBody,
        encoded: Vec<u8>,
        sealed: Option<StateMap>,
        raft_index: u64,
    ) -> Result<BatchWrite> {
        let mut reader = CachedRead {
            store,
            accounts: &mut self.accounts,
        };
        let key = self.keys.header_key(&self.meta)?;
        let mut write = prepare_apply_sealed(body, encoded, &self.meta, &mut reader, key, sealed)?;
        write.meta.raft_index = raft_index;
        store.apply(&write)?;
        for (key, balance) in &write.accounts {
            self.accounts.insert(*key, Some(*balance));
        }
        assert_eq!(
            write.meta.height,
            self.meta.height + 1,
            "apply extends by one"
        );
        self.meta = write.meta.clone();
        if cfg!(debug_assertions) {
            // Conservation, from the store's own sum of balances (a failed read is not this
            // check's to report: the next read that needs it will).
            if let Ok(total) = store.balance_total() {
                assert_eq!(
                    total,
                    self.meta.expected_total(),
                    "batch {}: balances no longer sum to deposits minus withdrawals",
                    self.meta.height
                );
            }
        }
        self.advance_index(raft_index);
        Ok(write)
    }

    fn advance_index(&mut self, raft_index: u64) {
        self.applied_index = self.applied_index.max(raft_index);
    }

    /// Resubmissions whose batch is now applied get their confirmation.
    fn unpark<S: LedgerStore>(&mut self, store: &mut S, out: &mut Vec<ApplyOut<R>>) -> Result<()> {
        let later = self.parked.split_off(&(self.checkpointed_through + 1));
        for (height, waiting) in std::mem::replace(&mut self.parked, later) {
            for p in waiting {
                self.parked_count -= 1;
                self.answer(store, height, p.index, p.request_hash, p.reply, out)?;
            }
        }
        Ok(())
    }

    /// A resubmission of the request at (`height`, `index`) whose hash is `request_hash`: its
    /// original confirmation now if that batch is applied, else once it is.
    pub fn replay<S: LedgerStore>(
        &mut self,
        store: &mut S,
        height: u64,
        index: u32,
        request_hash: Hash,
        reply: R,
        out: &mut Vec<ApplyOut<R>>,
    ) -> Result<()> {
        if height <= self.checkpointed_through {
            return self.answer(store, height, index, request_hash, reply, out);
        }
        if self.parked_count >= self.cfg.parked_max {
            out.push(ApplyOut::Refuse(reply, Refusal::Busy));
            return Ok(());
        }
        self.parked_count += 1;
        self.parked.entry(height).or_default().push(Parked {
            index,
            request_hash,
            reply,
        });
        Ok(())
    }

    fn answer<S: LedgerStore>(
        &mut self,
        store: &mut S,
        height: u64,
        index: u32,
        rh: Hash,
        reply: R,
        out: &mut Vec<ApplyOut<R>>,
    ) -> Result<()> {
        out.push(match confirmation(store, height, index) {
            Ok(Some(c)) if c.submitted_hash() == rh => ApplyOut::Replayed(reply, c),
            // The batch this request was sequenced in was superseded: it was never applied.
            Ok(_) => ApplyOut::Refuse(reply, Refusal::Superseded),
            Err(e) => {
                let (reply, r) = answer_or_stop(e, reply)?;
                ApplyOut::Reject(reply, r)
            }
        });
        Ok(())
    }

    /// A committed balance, through the cache.
    pub fn account<S: LedgerStore>(
        &mut self,
        store: &mut S,
        key: &PublicKey,
    ) -> Result<Option<u64>> {
        CachedRead {
            store,
            accounts: &mut self.accounts,
        }
        .account(key)
    }

    /// The ledger was replaced (a snapshot install): start over from its summary. Parked
    /// resubmissions stay: their batches are still to come, or are in the installed ledger.
    pub fn installed<S: LedgerStore>(
        &mut self,
        store: &mut S,
        raft_index: u64,
        out: &mut Vec<ApplyOut<R>>,
    ) -> Result<()> {
        self.meta = store.meta()?;
        self.signed_through = store.signed_through()?;
        self.checkpointed_through = store.checkpointed_through()?;
        if self.is_threshold() {
            // The signing stage forgets what the installed ledger has signed. (It never signs
            // an installed header it did not apply itself.)
            out.push(ApplyOut::CheckpointSigned(self.checkpointed_through));
        }
        self.accounts.clear();
        for (height, (body, waiters)) in std::mem::take(&mut self.held) {
            let starts = body.item_starts();
            for w in waiters {
                let item = body.item_at(&starts, w.index).expect("a waiter's item");
                self.replay(store, height, w.index, item.hash(), w.reply, out)?;
            }
        }
        self.advance_index(raft_index.max(self.meta.raft_index));
        self.unpark(store, out)
    }
}

/// The header applied at `height` (signed or not), which must exist.
fn applied_header<S: LedgerStore>(store: &mut S, height: u64) -> Result<Header> {
    store
        .applied_header(height)?
        .ok_or_else(|| Error::missing(format_args!("the applied header {height}")))
}

/// The text of the checkpoint of the header log of `size` signed headers (C2SP
/// tlog-checkpoint): what the threshold signs for that height after its header.
pub fn checkpoint_text<S: LedgerStore>(
    store: &mut S,
    chain_id: &Hash,
    size: u64,
) -> Result<Vec<u8>> {
    let root = crate::tlog::root_by(size, &mut |l, i| store.header_log_node(l, i))?;
    let checkpoint = crate::tlog::Checkpoint {
        origin: crate::tlog::origin_for(chain_id),
        size,
        root,
    };
    Ok(checkpoint.body().into_bytes())
}

/// The original confirmation of the request at (`height`, `index`), rebuilt from the stored
/// batch; None if there is no such request.
pub fn confirmation<S: LedgerStore>(
    store: &mut S,
    height: u64,
    index: u32,
) -> Result<Option<Confirmed>> {
    let (Some(bytes), Some(signed)) = (store.body(height)?, store.header(height)?) else {
        return Ok(None);
    };
    let body = BatchBody::decode(&bytes)
        .map_err(|e| Error::corrupt(format_args!("the stored body of batch {height}: {e}")))?;
    let starts = body.item_starts();
    let Some(mut c) = body.confirmed(&body.proof_tree(), &starts, &signed, index) else {
        return Ok(None);
    };
    c.set_replayed();
    Ok(Some(c))
}

/// What a lookup of `(signer, id)` finds: the request's confirmation, or the proof of one
/// operation of an envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    Request(Box<tally_wire::Confirmation>),
    Operation(Box<tally_wire::OperationConfirmation>),
    /// A reserve's expiry (found only by its receipt: it has no signer or id of a request).
    Expiry(Box<tally_wire::ExpiryConfirmation>),
}

impl Found {
    /// The receipt found.
    pub fn receipt(&self) -> &tally_wire::Receipt {
        match self {
            Found::Request(c) => &c.receipt,
            Found::Operation(c) => &c.receipt,
            Found::Expiry(c) => &c.receipt,
        }
    }

    /// The signed header the receipt is proven under.
    pub fn header(&self) -> &tally_wire::SignedHeader {
        match self {
            Found::Request(c) => &c.header,
            Found::Operation(c) => &c.header,
            Found::Expiry(c) => &c.header,
        }
    }
}

/// The original confirmation of the operation `(signer, id)` from the applied state, or None
/// when no applied batch holds it (`GetConfirmation`).
pub fn find_confirmation<S: LedgerStore>(
    store: &mut S,
    signer: &PublicKey,
    id: u128,
) -> Result<Option<Found>> {
    let Some(record) = store.request(signer, id)? else {
        return Ok(None);
    };
    let height = record.height;
    let (Some(bytes), Some(signed)) = (store.body(height)?, store.header(height)?) else {
        return Ok(None);
    };
    let corrupt = |what: String| Error::corrupt(format_args!("batch {height}: {what}"));
    let body = BatchBody::decode(&bytes).map_err(|e| corrupt(e.to_string()))?;
    let starts = body.item_starts();
    let i = match starts.binary_search(&record.index) {
        Ok(i) => i,
        Err(0) => return Err(corrupt("no item holds the request index's leaf".into())),
        Err(i) => i - 1,
    };
    let item = &body.items[i];
    if item.hash() != record.request_hash || item.signer() != signer {
        return Err(corrupt("the request index names another item".into()));
    }
    let proof = body.proof_tree().proof(record.index);
    Ok(Some(match item {
        crate::batch::BatchItem::Request(e) => Found::Request(Box::new(tally_wire::Confirmation {
            replayed: true,
            request: e.request.clone(),
            receipt: e.receipt.clone(),
            header: signed,
            proof,
        })),
        crate::batch::BatchItem::Envelope(e) => {
            let receipt = e.receipts[(record.index - starts[i]) as usize].clone();
            Found::Operation(Box::new(tally_wire::OperationConfirmation {
                envelope: (*e.envelope).clone(),
                receipt,
                header: signed,
                proof,
            }))
        }
        crate::batch::BatchItem::Expire(_) | crate::batch::BatchItem::Rotate(_) => {
            return Err(corrupt("the request index names a leader-made item".into()))
        }
    }))
}

pub struct AccountCache {
    map: HashMap<PublicKey, Option<u64>>,
    cap: usize,
}

impl AccountCache {
    pub fn new(cap: usize) -> AccountCache {
        AccountCache {
            map: HashMap::new(),
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

/// Committed reads through the account cache.
struct CachedRead<'a, S> {
    store: &'a mut S,
    accounts: &'a mut AccountCache,
}

impl<S: LedgerStore> LedgerRead for CachedRead<'_, S> {
    fn account(&mut self, key: &PublicKey) -> Result<Option<u64>> {
        if let Some(b) = self.accounts.get(key) {
            return Ok(b);
        }
        let b = self.store.account(key)?;
        self.accounts.insert(*key, b);
        Ok(b)
    }
    fn request(&mut self, signer: &PublicKey, id: u128) -> Result<Option<RequestRecord>> {
        self.store.request(signer, id)
    }
    fn reserve(&mut self, owner: &PublicKey, id: u128) -> Result<Option<crate::reserve::Reserve>> {
        self.store.reserve(owner, id)
    }
    fn expiries(&mut self, limit: usize) -> Result<Vec<crate::reserve::Expiry>> {
        self.store.expiries(limit)
    }
    fn header_time(&mut self, height: u64) -> Result<u64> {
        self.store.header_time(height)
    }
}
