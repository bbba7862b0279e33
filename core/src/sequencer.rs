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

use std::collections::{HashMap, VecDeque};

use tally_wire::{ErrorCode, Hash, Header, Op, PublicKey, Receipt, Request};

use crate::batch::{BatchBody, BatchEntry, BATCH_REQUESTS_LIMIT};
use crate::crypto::{header_hash, request_hash};
use crate::merkle::{leaf_hash, Tree};
use crate::ports::{LedgerRead, RequestRecord};
use crate::state::LedgerMeta;
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
    /// Added to the open batch at this position.
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
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    balance: u64,
    /// Height of the last batch that changed this account; pinned while that is not applied.
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
    open: Vec<BatchEntry>,
    /// Accounts the open batch changed: balance before the batch (None: did not exist), balance
    /// now. Folded into `meta`'s account sum when the batch is sealed: the sum is additive, so
    /// one term out and one in per account and batch give the digest that one per request
    /// would, at a fraction of the hashing.
    open_changes: HashMap<PublicKey, (Option<u64>, u64)>,
    /// Account lookups served from the map since the last [`Sequencer::take_cache_hits`].
    cache_hits: u64,
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
            open_changes: HashMap::new(),
            cache_hits: 0,
        }
    }

    /// How many account lookups the cache answered since the last call (misses are the calls
    /// to [`LedgerRead::account`], which the caller can count itself).
    pub fn take_cache_hits(&mut self) -> u64 {
        std::mem::take(&mut self.cache_hits)
    }

    pub fn open_len(&self) -> usize {
        self.open.len()
    }

    pub fn is_full(&self) -> bool {
        self.open.len() >= self.cfg.batch_requests_max as usize
    }

    /// Height of the last sealed batch.
    pub fn sealed_height(&self) -> u64 {
        self.meta.height
    }

    pub fn applied_height(&self) -> u64 {
        self.applied_height
    }

    /// The speculative state after the open batch, except that the open batch's account changes
    /// join `account_sum` and `account_count` when it is sealed.
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
        store: &mut impl LedgerRead,
    ) -> Result<Submitted> {
        assert!(!self.is_full(), "submit to a full batch: seal it first");
        let key = (request.signer, request.id);
        let rh = request_hash(&request);
        if let Some(k) = self.keys.get(&key) {
            return Ok(self.same_key(k.height, k.index, k.request_hash, rh));
        }
        let remembered_from = self
            .keys_by_height
            .front()
            .map_or(self.meta.height + 1, |(h, _)| *h);
        if snapshot_height + 1 < remembered_from {
            if let Some(record) = store.request(&request.signer, request.id)? {
                return Ok(self.same_key(record.height, record.index, record.request_hash, rh));
            }
        }
        let height = self.meta.height + 1;
        let (signer_balance, to_balance) = match self.effect(&request, height, store)? {
            Ok(balances) => balances,
            Err(rejected) => return Ok(rejected),
        };
        let index = self.open.len() as u32;
        let receipt = Receipt {
            request_hash: rh,
            height,
            index,
            op: request.op,
            signer_balance,
            to_balance,
        };
        self.keys.insert(
            key,
            KeySlot {
                height,
                index,
                request_hash: rh,
            },
        );
        self.open.push(BatchEntry { request, receipt });
        Ok(Submitted::Accepted { height, index })
    }

    /// What `r` does to the speculative state (applied to it when it succeeds): the signer's and
    /// the recipient's balances after it, or why it is refused.
    fn effect(
        &mut self,
        r: &Request,
        height: u64,
        store: &mut impl LedgerRead,
    ) -> Result<std::result::Result<(u64, u64), Submitted>> {
        let amount = r.amount;
        match r.op {
            Op::Deposit => {
                let to = self.balance(&r.to, store)?;
                let Some(new_to) = to.unwrap_or(0).checked_add(amount) else {
                    return Ok(Err(reject(
                        ErrorCode::AmountOverflow,
                        "the deposit would overflow the recipient's balance",
                    )));
                };
                self.set(r.to, to, new_to, height);
                self.meta.total_deposited += amount as u128;
                Ok(Ok((0, new_to)))
            }
            Op::Transfer => {
                // The wire decoder refuses these; a caller that skipped it must not mint money.
                if r.to == r.signer {
                    return Ok(Err(reject(
                        ErrorCode::MalformedRequest,
                        "a transfer to oneself moves nothing",
                    )));
                }
                let Some(from) = self.balance(&r.signer, store)? else {
                    return Ok(Err(reject(
                        ErrorCode::UnknownAccount,
                        "the sending account does not exist",
                    )));
                };
                if from < amount {
                    return Ok(Err(reject(
                        ErrorCode::InsufficientFunds,
                        format!("balance {from} is less than {amount}"),
                    )));
                }
                let to = self.balance(&r.to, store)?;
                let Some(new_to) = to.unwrap_or(0).checked_add(amount) else {
                    return Ok(Err(reject(
                        ErrorCode::AmountOverflow,
                        "the transfer would overflow the recipient's balance",
                    )));
                };
                self.set(r.signer, Some(from), from - amount, height);
                self.set(r.to, to, new_to, height);
                Ok(Ok((from - amount, new_to)))
            }
            Op::Withdraw => {
                let Some(from) = self.balance(&r.signer, store)? else {
                    return Ok(Err(reject(
                        ErrorCode::UnknownAccount,
                        "the account does not exist",
                    )));
                };
                if from < amount {
                    return Ok(Err(reject(
                        ErrorCode::InsufficientFunds,
                        format!("balance {from} is less than {amount}"),
                    )));
                }
                self.set(r.signer, Some(from), from - amount, height);
                self.meta.total_withdrawn += amount as u128;
                Ok(Ok((from - amount, 0)))
            }
        }
    }

    fn same_key(&self, height: u64, index: u32, stored: Hash, submitted: Hash) -> Submitted {
        if stored != submitted {
            return reject(
                ErrorCode::IdConflict,
                "this id was already used by this signer for a different request",
            );
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

    /// Closes the open batch (if it has any request) into a body with its header.
    pub fn seal(&mut self, term: u64, time_unix_ms: u64) -> Option<BatchBody> {
        if self.open.is_empty() {
            return None;
        }
        let entries = std::mem::take(&mut self.open);
        for (key, (before, after)) in self.open_changes.drain() {
            self.meta.account_changed(&key, before, after);
        }
        self.meta.height += 1;
        let leaves: Vec<Hash> = entries
            .iter()
            .map(|e| leaf_hash(&e.receipt.encode()))
            .collect();
        let header = Header {
            chain_id: self.cfg.chain_id,
            height: self.meta.height,
            term,
            time_unix_ms,
            request_count: entries.len() as u32,
            prev_hash: self.meta.last_header_hash,
            merkle_root: Tree::new(&leaves).root(),
            state_digest: self.meta.state_digest(),
            operator_key_id: self.cfg.operator_key_id,
        };
        self.meta.last_header_hash = header_hash(&header);
        let keys = entries
            .iter()
            .map(|e| (e.request.signer, e.request.id))
            .collect();
        self.keys_by_height.push_back((self.meta.height, keys));
        Some(BatchBody { header, entries })
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
    }
}

fn reject(code: ErrorCode, message: impl Into<String>) -> Submitted {
    Submitted::Rejected(Rejection::new(code, message))
}
