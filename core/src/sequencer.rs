//! The master's state machine: authoritative checks and the speculative apply, in order.
//!
//! The sequencer sees every accepted request in the order it will be committed. It keeps the
//! *speculative* state: the applied (durable) state plus the effects of every batch it has sealed
//! but not yet seen applied, plus the open batch. Accounts touched by an unapplied batch are
//! pinned in its map; others are a bounded cache of applied balances, loaded on demand through
//! [`LedgerRead`], so the ledger need not fit in memory.
//!
//! Idempotency: the key of a request is `(signer, id)`. The sequencer remembers the keys of every
//! unapplied batch and of the last `recent_heights_kept` applied ones. A request reaches it with
//! the height of the snapshot it was checked against; if the keys of some batch after that
//! snapshot are no longer remembered, it asks the store instead.
//!
//! Caveat: the cache evicts in map order, not least-recently-used order.

use std::collections::{HashMap, HashSet, VecDeque};

use std::sync::Arc;

use tally_wire::{Envelope, ErrorCode, Hash, Header, Op, Operation, PublicKey, Receipt, Request};

use crate::batch::{
    BatchBody, BatchEntry, BatchItem, EnvelopeEntry, ExpireEntry, RotateEntry, BATCH_REQUESTS_LIMIT,
};
use crate::crypto::{header_hash, key_id, request_hash};
use crate::merkle::{leaf_hash, Tree};
use crate::ports::{LedgerRead, RequestRecord};
use crate::reserve::{expire_hash, Expiry, Held, Reserve, EXPIRIES_PER_BATCH_MAX};
use crate::rules::{judge, judge_expiry, Balances, Effect};
use crate::state::{LedgerMeta, Rotation};
use crate::{Rejection, Result};

#[derive(Debug, Clone)]
pub struct SequencerConfig {
    pub chain_id: Hash,
    pub operator_key_id: [u8; 8],
    pub batch_requests_max: u32,
    /// Accounts kept besides the pinned ones.
    pub accounts_cached_max: usize,
    /// How many applied batches' request keys stay in memory.
    pub recent_heights_kept: u64,
}

/// What became of a submitted request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    /// Added to the open batch; `index` is its first leaf.
    Accepted {
        height: u64,
        index: u32,
    },
    /// The same request is in a batch that is not applied yet: its confirmation is still coming.
    InFlight {
        height: u64,
        index: u32,
    },
    /// The same request was applied already: answer with the original confirmation.
    Applied(RequestRecord),
    Rejected(Rejection),
    /// An atomic envelope none of whose operations applied: the first that failed, and why.
    Failed {
        index: u32,
        rejection: Rejection,
    },
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    balance: u64,
    /// Height of the last batch that changed this account; pinned while that is not applied.
    modified_height: u64,
}

#[derive(Debug, Clone, Copy)]
struct ReserveSlot {
    state: Reserve,
    /// As for [`Slot`].
    modified_height: u64,
}

#[derive(Debug, Clone, Copy)]
struct KeySlot {
    height: u64,
    index: u32,
    request_hash: Hash,
}

pub struct Sequencer {
    cfg: SequencerConfig,
    /// The state after the open batch (height is that of the last sealed batch).
    meta: LedgerMeta,
    applied_height: u64,
    accounts: HashMap<PublicKey, Slot>,
    keys: HashMap<(PublicKey, u128), KeySlot>,
    keys_by_height: VecDeque<(u64, Vec<(PublicKey, u128)>)>,
    open: Vec<BatchItem>,
    /// Receipts (Merkle leaves) in the open batch.
    open_leaves: u32,
    /// Accounts the open batch changed: balance before the batch (None: did not exist), balance
    /// now. Written into `meta`'s state map once per account when the batch is sealed, so that
    /// the batch's changes share their hashing.
    open_changes: HashMap<PublicKey, (Option<u64>, u64)>,
    /// Account lookups served from the map since the last [`Sequencer::take_cache_hits`].
    cache_hits: u64,
    /// Reserves as [`Sequencer::accounts`] holds accounts.
    reserves: HashMap<(PublicKey, u128), ReserveSlot>,
    /// Reserves the open batch changed: state before the batch, state now.
    open_reserve_changes: HashMap<(PublicKey, u128), (Option<Reserve>, Reserve)>,
    /// The time of the last sealed batch (None until read from the store).
    last_time: Option<u64>,
    /// The open batch's time, fixed when its first item arrives: never before `last_time`.
    open_time: u64,
    /// No open reserve's deadline is before this (0: unknown, look).
    expiry_hint: u64,
    /// The key the open batch names as the next operator key, if an admin asked for one.
    rotation: Option<PublicKey>,
}

impl Sequencer {
    /// Starts from the applied state `meta`.
    pub fn new(cfg: SequencerConfig, meta: LedgerMeta) -> Sequencer {
        assert!(cfg.batch_requests_max >= 1 && cfg.batch_requests_max <= BATCH_REQUESTS_LIMIT);
        Sequencer {
            applied_height: meta.height,
            meta,
            cfg,
            accounts: HashMap::new(),
            keys: HashMap::new(),
            keys_by_height: VecDeque::new(),
            open: Vec::new(),
            open_leaves: 0,
            open_changes: HashMap::new(),
            cache_hits: 0,
            reserves: HashMap::new(),
            open_reserve_changes: HashMap::new(),
            last_time: None,
            open_time: 0,
            expiry_hint: 0,
            rotation: None,
        }
    }

    /// Makes the open batch name `new_key` as the next operator key (PROTOCOL.md §4.14); the
    /// batch must be open ([`Sequencer::open_batch`]). Refused when the key signs already or
    /// the ledger has had as many rotations as a key chain holds. A second call before the
    /// seal replaces the first.
    pub fn rotate(&mut self, new_key: PublicKey) -> std::result::Result<(), Rejection> {
        if key_id(&new_key) == self.meta.signing_key_id(&self.cfg.operator_key_id) {
            return Err(Rejection::new(
                ErrorCode::RotationRefused,
                "this key signs the ledger's headers already",
            ));
        }
        if self.rotation.is_none() && !self.fits(1) {
            return Err(Rejection::new(
                ErrorCode::Busy,
                "the open batch is full: ask again",
            ));
        }
        if self.meta.rotations() as usize >= tally_wire::KEY_LINKS_MAX {
            return Err(Rejection::new(
                ErrorCode::RotationRefused,
                "the ledger has had as many key rotations as a key chain holds (64)",
            ));
        }
        self.rotation = Some(new_key);
        Ok(())
    }

    /// Before the open batch's first item: fixes the batch's time (`unix_ms`, never before the
    /// last batch's) and puts in the expiries then due, earliest deadline first, at most
    /// [`EXPIRIES_PER_BATCH_MAX`] and leaving room for `room` more leaves. Nothing once the
    /// batch has items.
    pub fn open_batch(
        &mut self,
        unix_ms: u64,
        room: u32,
        store: &mut impl LedgerRead,
    ) -> Result<()> {
        if !self.open.is_empty() {
            return Ok(());
        }
        let last = match self.last_time {
            Some(t) => t,
            None => *self.last_time.insert(store.header_time(self.meta.height)?),
        };
        self.open_time = unix_ms.max(last);
        let room =
            (self.cfg.batch_requests_max.saturating_sub(room) as usize).min(EXPIRIES_PER_BATCH_MAX);
        if self.expiry_hint <= self.open_time && room > 0 {
            self.expire_due(room, store)?;
        }
        Ok(())
    }

    /// The earliest deadline this sequencer knows of (u64::MAX: none; 0: unknown): the time
    /// at which an idle leader opens a batch for expiries.
    pub fn expiry_hint(&self) -> u64 {
        self.expiry_hint
    }

    /// Expires up to `room` reserves due at the open batch's time, in [`Expiry`] order over the
    /// speculative state: the store's open reserves, except those an unapplied batch changed,
    /// whose state is this sequencer's.
    fn expire_due(&mut self, room: usize, store: &mut impl LedgerRead) -> Result<()> {
        let applied = self.applied_height;
        let pinned: HashSet<(PublicKey, u128)> = self
            .reserves
            .iter()
            .filter(|(_, r)| r.modified_height > applied)
            .map(|(k, _)| *k)
            .collect();
        let limit = room + pinned.len() + 1;
        let stored = store.expiries(limit)?;
        let more_stored = (stored.len() == limit).then(|| stored.last().expect("full").at_ms);
        let mut due: Vec<Expiry> = stored
            .into_iter()
            .filter(|e| !pinned.contains(&(e.owner, e.id)))
            .chain(pinned.iter().filter_map(|k| {
                let held = self.reserves[k].state.open().copied()?;
                Some(Expiry {
                    at_ms: held.expires_at_ms,
                    owner: k.0,
                    id: k.1,
                })
            }))
            .collect();
        due.sort_unstable();
        let taken = due
            .iter()
            .take(room)
            .take_while(|e| e.at_ms <= self.open_time)
            .count();
        for e in &due[..taken] {
            self.expire(e, store)?;
        }
        let next = due.get(taken).map_or(u64::MAX, |e| e.at_ms);
        self.expiry_hint = next.min(more_stored.unwrap_or(u64::MAX));
        Ok(())
    }

    fn expire(&mut self, e: &Expiry, store: &mut impl LedgerRead) -> Result<()> {
        let time = self.open_time;
        // Only an owner whose balance the release would overflow can refuse it; the reserve
        // then stays due and is tried again with the next batch.
        let Ok(effect) = judge_expiry(&e.owner, e.id, time, &mut self.reader(store))? else {
            return Ok(());
        };
        let held = effect
            .reserve
            .and_then(|c| c.before)
            .and_then(|r| r.open().copied())
            .expect("an expiry closes an open reserve");
        let receipt = Receipt {
            request_hash: expire_hash(&e.owner, e.id),
            height: self.meta.height + 1,
            index: self.open_leaves,
            op: tally_wire::Op::Expire,
            failed: None,
            op_index: 0,
            signer_balance: effect.signer_balance,
            to_balance: effect.to_balance,
        };
        self.apply(&effect, self.meta.height + 1);
        self.push(BatchItem::Expire(ExpireEntry {
            owner: e.owner,
            id: e.id,
            held,
            receipt,
        }));
        Ok(())
    }

    /// How many account lookups the cache answered since the last call (misses are the calls
    /// to [`LedgerRead::account`], which the caller can count itself).
    pub fn take_cache_hits(&mut self) -> u64 {
        std::mem::take(&mut self.cache_hits)
    }

    /// Operations (Merkle leaves) in the open batch.
    pub fn open_len(&self) -> usize {
        self.open_leaves as usize
    }

    /// Whether the open batch takes nothing more.
    pub fn is_full(&self) -> bool {
        !self.fits(1)
    }

    /// Whether `n` more operations fit in the open batch (`batch_requests_max` leaves, a
    /// pending rotation's included).
    pub fn fits(&self, n: u32) -> bool {
        self.open_leaves + self.rotation.is_some() as u32 + n <= self.cfg.batch_requests_max
    }

    /// The most operations one batch holds.
    pub fn batch_requests_max(&self) -> u32 {
        self.cfg.batch_requests_max
    }

    /// Height of the last sealed batch.
    pub fn sealed_height(&self) -> u64 {
        self.meta.height
    }

    pub fn applied_height(&self) -> u64 {
        self.applied_height
    }

    /// The speculative state after the open batch, except that the open batch's account changes
    /// join the state map and `account_count` when it is sealed.
    pub fn meta(&self) -> &LedgerMeta {
        &self.meta
    }

    /// Judges `request` (already stateless-validated) against the speculative state and, if it
    /// is good, adds it to the open batch. `snapshot_height` is the applied height the snapshot
    /// stage checked it against (0 if it was not checked).
    pub fn submit(
        &mut self,
        request: Request,
        snapshot_height: u64,
        unix_ms: u64,
        store: &mut impl LedgerRead,
    ) -> Result<Submitted> {
        let rh = request_hash(&request);
        self.submit_hashed(request, rh, snapshot_height, unix_ms, store)
    }

    /// [`Sequencer::submit`] with the request's [`request_hash`] `rh`, which the caller (the
    /// master) has already computed.
    pub fn submit_hashed(
        &mut self,
        request: Request,
        rh: Hash,
        snapshot_height: u64,
        unix_ms: u64,
        store: &mut impl LedgerRead,
    ) -> Result<Submitted> {
        assert!(!self.is_full(), "submit to a full batch: seal it first");
        debug_assert_eq!(rh, request_hash(&request), "the caller's request hash");
        self.open_batch(unix_ms, 1, store)?;
        if let Some(known) = self.known(&request.signer, request.id, snapshot_height, store)? {
            return Ok(self.same_key(known, rh));
        }
        let op = request.operation();
        let time = self.open_time;
        let effect = match judge(&request.signer, &op, time, &mut self.reader(store))? {
            Ok(effect) => effect,
            Err(rejection) => return Ok(Submitted::Rejected(rejection)),
        };
        let (height, index) = (self.meta.height + 1, self.open_leaves);
        let receipt = self.receipt(rh, &op, 0, Ok(&effect));
        self.apply(&effect, height);
        self.remember(request.signer, op.id, index, rh);
        self.push(BatchItem::Request(BatchEntry { request, receipt }));
        Ok(Submitted::Accepted { height, index })
    }

    /// Judges an envelope (stateless-validated, `hash` its SHA-256) like [`Sequencer::submit`]
    /// a request: all its operations join the open batch, each with its receipt (an
    /// independent envelope's failed operations with theirs), or, for an atomic envelope one of
    /// whose operations fails, none does. A resubmission is known by its first operation's key.
    pub fn submit_envelope(
        &mut self,
        envelope: Arc<Envelope>,
        hash: Hash,
        snapshot_height: u64,
        unix_ms: u64,
        store: &mut impl LedgerRead,
    ) -> Result<Submitted> {
        let n = envelope.ops.len() as u32;
        assert!(self.fits(n), "an envelope that does not fit: seal first");
        self.open_batch(unix_ms, n, store)?;
        let signer = envelope.signer;
        for (i, op) in envelope.ops.iter().enumerate() {
            let Some(known) = self.known(&signer, op.id, snapshot_height, store)? else {
                continue;
            };
            if i == 0 && known.request_hash == hash {
                return Ok(self.same_key(known, hash));
            }
            return Ok(Submitted::Failed {
                index: i as u32,
                rejection: id_conflict(),
            });
        }
        let results = if envelope.atomic {
            match self.judge_all(&signer, &envelope.ops, store)? {
                Ok(effects) => effects.into_iter().map(Ok).collect(),
                Err((index, rejection)) => return Ok(Submitted::Failed { index, rejection }),
            }
        } else {
            self.judge_each(&signer, &envelope.ops, store)?
        };
        let (height, first) = (self.meta.height + 1, self.open_leaves);
        let held = results
            .iter()
            .zip(envelope.ops.iter())
            .filter(|(_, op)| matches!(op.op, Op::Post | Op::Void | Op::Renew))
            .filter_map(|(r, _)| r.as_ref().ok())
            .map(held_before)
            .collect();
        let mut receipts = Vec::with_capacity(envelope.ops.len());
        for (i, (op, result)) in envelope.ops.iter().zip(&results).enumerate() {
            receipts.push(self.receipt(hash, op, i as u16, result.as_ref()));
            self.remember(signer, op.id, first + i as u32, hash);
        }
        if envelope.atomic {
            for effect in results.iter().flatten() {
                self.apply(effect, height);
            }
        }
        self.push(BatchItem::Envelope(EnvelopeEntry {
            envelope,
            hash,
            receipts,
            held,
        }));
        Ok(Submitted::Accepted {
            height,
            index: first,
        })
    }

    /// Judges every operation of an atomic envelope against the state as the ones before it
    /// leave it, without changing the speculative state: their effects, or the first failure.
    fn judge_all(
        &mut self,
        signer: &PublicKey,
        ops: &[Operation],
        store: &mut impl LedgerRead,
    ) -> Result<std::result::Result<Vec<Effect>, (u32, Rejection)>> {
        let time = self.open_time;
        let mut overlay = Overlay {
            reader: self.reader(store),
            pending: HashMap::new(),
            reserves: HashMap::new(),
        };
        let mut effects = Vec::with_capacity(ops.len());
        for (i, op) in ops.iter().enumerate() {
            match judge(signer, op, time, &mut overlay)? {
                Ok(effect) => {
                    for &(key, _, after) in &effect.changes {
                        overlay.pending.insert(key, after);
                    }
                    if let Some(c) = effect.reserve {
                        overlay.reserves.insert((c.owner, c.id), c.after);
                    }
                    effects.push(effect);
                }
                Err(rejection) => return Ok(Err((i as u32, rejection))),
            }
        }
        Ok(Ok(effects))
    }

    /// Judges and applies each operation of an independent envelope in turn.
    fn judge_each(
        &mut self,
        signer: &PublicKey,
        ops: &[Operation],
        store: &mut impl LedgerRead,
    ) -> Result<Vec<std::result::Result<Effect, Rejection>>> {
        let height = self.meta.height + 1;
        let mut results = Vec::with_capacity(ops.len());
        for op in ops {
            let time = self.open_time;
            let result = judge(signer, op, time, &mut self.reader(store))?;
            if let Ok(effect) = &result {
                self.apply(effect, height);
            }
            results.push(result);
        }
        Ok(results)
    }

    /// Where `(signer, id)` was sequenced, if this sequencer or the store knows it.
    fn known(
        &mut self,
        signer: &PublicKey,
        id: u128,
        snapshot_height: u64,
        store: &mut impl LedgerRead,
    ) -> Result<Option<RequestRecord>> {
        if let Some(k) = self.keys.get(&(*signer, id)) {
            return Ok(Some(RequestRecord {
                height: k.height,
                index: k.index,
                request_hash: k.request_hash,
            }));
        }
        let remembered_from = self
            .keys_by_height
            .front()
            .map_or(self.meta.height + 1, |(h, _)| *h);
        if snapshot_height + 1 < remembered_from {
            return store.request(signer, id);
        }
        Ok(None)
    }

    fn reader<'a, S: LedgerRead>(&'a mut self, store: &'a mut S) -> Reader<'a, S> {
        Reader { seq: self, store }
    }

    /// The receipt of operation `op_index` of what hashes to `hash`: leaf `op_index` after the
    /// open batch's last (an envelope's receipts are consecutive leaves).
    fn receipt(
        &self,
        hash: Hash,
        op: &Operation,
        op_index: u16,
        result: std::result::Result<&Effect, &Rejection>,
    ) -> Receipt {
        let (failed, signer_balance, to_balance) = match result {
            Ok(e) => (None, e.signer_balance, e.to_balance),
            Err(r) => (Some(r.code), 0, 0),
        };
        Receipt {
            request_hash: hash,
            height: self.meta.height + 1,
            index: self.open_leaves + op_index as u32,
            op: op.op,
            failed,
            op_index,
            signer_balance,
            to_balance,
        }
    }

    fn apply(&mut self, effect: &Effect, height: u64) {
        for &(key, before, after) in &effect.changes {
            self.set(key, before, after, height);
        }
        if let Some(c) = effect.reserve {
            self.open_reserve_changes
                .entry((c.owner, c.id))
                .and_modify(|(_, now)| *now = c.after)
                .or_insert((c.before, c.after));
            self.reserves.insert(
                (c.owner, c.id),
                ReserveSlot {
                    state: c.after,
                    modified_height: height,
                },
            );
            if let Reserve::Open(h) = c.after {
                self.expiry_hint = self.expiry_hint.min(h.expires_at_ms);
            }
        }
        self.meta.total_deposited += effect.deposited as u128;
        self.meta.total_withdrawn += effect.withdrawn as u128;
    }

    fn reserve(
        &mut self,
        owner: &PublicKey,
        id: u128,
        store: &mut impl LedgerRead,
    ) -> Result<Option<Reserve>> {
        if let Some(slot) = self.reserves.get(&(*owner, id)) {
            return Ok(Some(slot.state));
        }
        let state = store.reserve(owner, id)?;
        if let Some(state) = state {
            let slot = ReserveSlot {
                state,
                modified_height: 0,
            };
            self.reserves.insert((*owner, id), slot);
        }
        Ok(state)
    }

    fn remember(&mut self, signer: PublicKey, id: u128, index: u32, request_hash: Hash) {
        let slot = KeySlot {
            height: self.meta.height + 1,
            index,
            request_hash,
        };
        let fresh = self.keys.insert((signer, id), slot).is_none();
        assert!(fresh, "a key is sequenced once");
    }

    fn push(&mut self, item: BatchItem) {
        self.open_leaves += item.receipts().len() as u32;
        self.open.push(item);
    }

    fn same_key(&self, known: RequestRecord, submitted: Hash) -> Submitted {
        let RequestRecord {
            height,
            index,
            request_hash: stored,
        } = known;
        if stored != submitted {
            return Submitted::Rejected(id_conflict());
        }
        if height <= self.applied_height {
            Submitted::Applied(RequestRecord {
                height,
                index,
                request_hash: stored,
            })
        } else {
            Submitted::InFlight { height, index }
        }
    }

    fn balance(&mut self, key: &PublicKey, store: &mut impl LedgerRead) -> Result<Option<u64>> {
        if let Some(slot) = self.accounts.get(key) {
            self.cache_hits += 1;
            return Ok(Some(slot.balance));
        }
        // Not pinned, so no unapplied batch changed it: the applied value is the current one.
        let balance = store.account(key)?;
        if let Some(balance) = balance {
            self.accounts.insert(
                *key,
                Slot {
                    balance,
                    modified_height: 0,
                },
            );
        }
        Ok(balance)
    }

    fn set(&mut self, key: PublicKey, old: Option<u64>, new: u64, height: u64) {
        self.open_changes
            .entry(key)
            .and_modify(|(_, now)| *now = new)
            .or_insert((old, new));
        self.accounts.insert(
            key,
            Slot {
                balance: new,
                modified_height: height,
            },
        );
    }

    /// Closes the open batch (if it has any item) into a body with its header; its time is
    /// the one fixed when it opened.
    pub fn seal(&mut self, term: u64) -> Option<BatchBody> {
        if self.open.is_empty() && self.rotation.is_none() {
            return None;
        }
        let mut items = std::mem::take(&mut self.open);
        let mut leaf_count = std::mem::take(&mut self.open_leaves);
        let operator_key_id = self.meta.signing_key_id(&self.cfg.operator_key_id);
        if let Some(new_key) = self.rotation.take() {
            let (previous, number) = (self.meta.rotated_at(), self.meta.rotations() + 1);
            let at = (self.meta.height + 1, leaf_count);
            items.push(BatchItem::Rotate(RotateEntry::new(
                new_key, previous, number, at,
            )));
            leaf_count += 1;
            self.meta.operator = Some(Rotation {
                key: new_key,
                height: at.0,
                number,
            });
        }
        for (key, (before, after)) in self.open_changes.drain() {
            self.meta.account_changed(&key, before, after);
        }
        for ((owner, id), (_, after)) in self.open_reserve_changes.drain() {
            self.meta.reserve_changed(&owner, id, &after);
        }
        self.meta.map.flush();
        let time_unix_ms = self.open_time;
        self.last_time = Some(time_unix_ms);
        self.meta.height += 1;
        let leaves: Vec<Hash> = items
            .iter()
            .flat_map(|i| i.receipts())
            .map(|r| leaf_hash(&r.encode()))
            .collect();
        assert_eq!(leaves.len(), leaf_count as usize);
        let header = Header {
            chain_id: self.cfg.chain_id,
            height: self.meta.height,
            term,
            time_unix_ms,
            request_count: leaf_count,
            prev_hash: self.meta.last_header_hash,
            merkle_root: Tree::new(&leaves).root(),
            state_digest: self.meta.state_digest(),
            operator_key_id,
        };
        self.meta.last_header_hash = header_hash(&header);
        let keys = items
            .iter()
            .flat_map(|i| {
                let signer = *i.signer();
                i.operations().map(move |(op, _)| (signer, op.id))
            })
            .collect();
        self.keys_by_height.push_back((self.meta.height, keys));
        Some(BatchBody { header, items })
    }

    /// Records that every batch up to `height` is durably applied: their accounts are unpinned
    /// and old request keys forgotten.
    pub fn applied(&mut self, height: u64) {
        assert!(
            height <= self.meta.height,
            "applied {height} beyond sealed {}",
            self.meta.height
        );
        self.applied_height = self.applied_height.max(height);
        let keep_from = self
            .applied_height
            .saturating_sub(self.cfg.recent_heights_kept);
        while let Some((h, _)) = self.keys_by_height.front() {
            if *h > keep_from {
                break;
            }
            let (_, keys) = self.keys_by_height.pop_front().expect("front exists");
            for k in keys {
                self.keys.remove(&k);
            }
        }
        if self.accounts.len() > self.cfg.accounts_cached_max {
            // Evict down to 90% so that eviction scans are amortized over many batches.
            let target = self.cfg.accounts_cached_max - self.cfg.accounts_cached_max / 10;
            let mut excess = self.accounts.len() - target;
            let applied = self.applied_height;
            self.accounts.retain(|_, slot| {
                if excess > 0 && slot.modified_height <= applied {
                    excess -= 1;
                    false
                } else {
                    true
                }
            });
        }
        if self.reserves.len() > self.cfg.accounts_cached_max {
            let applied = self.applied_height;
            self.reserves
                .retain(|_, slot| slot.modified_height > applied);
        }
    }
}

fn id_conflict() -> Rejection {
    Rejection::new(
        ErrorCode::IdConflict,
        "this id was already used by this signer for a different request",
    )
}

/// The speculative state as [`judge`] reads it.
struct Reader<'a, S> {
    seq: &'a mut Sequencer,
    store: &'a mut S,
}

impl<S: LedgerRead> Balances for Reader<'_, S> {
    fn balance(&mut self, key: &PublicKey) -> Result<Option<u64>> {
        self.seq.balance(key, self.store)
    }
    fn reserve(&mut self, owner: &PublicKey, id: u128) -> Result<Option<Reserve>> {
        self.seq.reserve(owner, id, self.store)
    }
}

/// The speculative state plus an atomic envelope's effects so far, which are not applied
/// until every operation passed.
struct Overlay<'a, S> {
    reader: Reader<'a, S>,
    pending: HashMap<PublicKey, u64>,
    reserves: HashMap<(PublicKey, u128), Reserve>,
}

impl<S: LedgerRead> Balances for Overlay<'_, S> {
    fn balance(&mut self, key: &PublicKey) -> Result<Option<u64>> {
        match self.pending.get(key) {
            Some(&b) => Ok(Some(b)),
            None => self.reader.balance(key),
        }
    }
    fn reserve(&mut self, owner: &PublicKey, id: u128) -> Result<Option<Reserve>> {
        match self.reserves.get(&(*owner, id)) {
            Some(&r) => Ok(Some(r)),
            None => self.reader.reserve(owner, id),
        }
    }
}

/// The record a post, void or renewal found.
fn held_before(effect: &Effect) -> Held {
    effect
        .reserve
        .and_then(|c| c.before)
        .and_then(|r| r.open().copied())
        .expect("a post, void or renewal acts on an open reserve")
}
