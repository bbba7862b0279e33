//! The storage ports core needs. `tally-storage` implements them on LevelDB; tests use
//! [`MemStore`]. Core never knows how or where bytes are kept.

use std::collections::HashMap;

use tally_wire::{Hash, Header, PublicKey, Signature, SignedHeader};

use crate::batch::{BatchWrite, UNSIGNED};
use crate::history::{HistoryPage, HistoryRow};
use crate::reserve::{Expiry, Reserve};
use crate::state::LedgerMeta;
use crate::Result;

/// Where an applied request's receipt lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestRecord {
    pub height: u64,
    pub index: u32,
    pub request_hash: Hash,
}

/// Reads of committed (applied) state.
pub trait LedgerRead {
    /// The committed balance of `key`, or None if the account does not exist.
    fn account(&mut self, key: &PublicKey) -> Result<Option<u64>>;
    /// Where the request `(signer, id)` was applied, if it was.
    fn request(&mut self, signer: &PublicKey, id: u128) -> Result<Option<RequestRecord>>;
    /// The committed state of reserve `(owner, id)`, if it was ever made.
    fn reserve(&mut self, owner: &PublicKey, id: u128) -> Result<Option<Reserve>>;
    /// The first `limit` open reserves in deadline order ([`Expiry`] order).
    fn expiries(&mut self, limit: usize) -> Result<Vec<Expiry>>;
    /// The time (unix ms) of the applied header at `height` (0 for height 0).
    fn header_time(&mut self, height: u64) -> Result<u64>;
}

/// Durable state of the ledger: one atomic, synced write of the state per batch (a store may
/// write derived rows, such as bodies and the request index, behind it: see
/// `compactable_meta`).
pub trait LedgerStore: LedgerRead {
    fn meta(&mut self) -> Result<LedgerMeta>;
    /// Writes everything a batch changes in one atomic, synced write. On error the node stops.
    fn apply(&mut self, write: &BatchWrite) -> Result<()>;
    /// The signed header at `height`; None past the applied height, and for a header applied
    /// but not signed yet (a threshold operator's, `crate::signing`).
    fn header(&mut self, height: u64) -> Result<Option<SignedHeader>>;
    /// The header applied at `height`, signed or not.
    fn applied_header(&mut self, height: u64) -> Result<Option<Header>>;
    /// The highest height whose header is signed: the applied height, except on a threshold
    /// operator's replica, whose headers are applied unsigned and signed after.
    fn signed_through(&mut self) -> Result<u64>;
    /// Stores the signature of the applied header at `height`, which must be
    /// `signed_through() + 1`, and appends the signed header to the header log: one synced
    /// write. Returns the signed header.
    fn sign_header(&mut self, height: u64, signature: Signature) -> Result<SignedHeader>;
    /// The highest height whose checkpoint signature (a threshold operator's) is stored; a
    /// store with a whole key signs checkpoints when asked: its applied height.
    fn checkpointed_through(&mut self) -> Result<u64>;
    /// Stores the threshold's signature of the checkpoint of the header log of `size`, which
    /// must be `checkpointed_through() + 1` and at most `signed_through()`: one synced write.
    fn sign_checkpoint(&mut self, size: u64, signature: Signature) -> Result<()>;
    /// The stored signature of the checkpoint of `size` (None: not signed by a threshold).
    fn checkpoint_signature(&mut self, size: u64) -> Result<Option<Signature>>;
    /// Node `(level, index)` of the header log (PROTOCOL.md §4.12; see
    /// [`crate::tlog::completed_at`]): the root of the applied headers at heights
    /// `index·2^level + 1 ..= (index+1)·2^level`. `Missing` past the applied height.
    fn header_log_node(&mut self, level: u8, index: u64) -> Result<Hash>;
    /// The encoded batch body applied at `height`.
    fn body(&mut self, height: u64) -> Result<Option<Vec<u8>>>;
    /// The sum of every account's balance in the applied state plus what open reserves hold
    /// (`GetSupply`); equal to the meta's deposits minus withdrawals in a ledger that conserves
    /// money.
    fn balance_total(&mut self) -> Result<u128>;
    /// What `key`'s open reserves hold (pending debits) and what open reserves hold for it
    /// (pending credits), in the applied state.
    fn pending(&mut self, key: &PublicKey) -> Result<(u64, u64)>;
    /// Housekeeping the store would otherwise do inside the next `apply` (LevelDB's memtable
    /// flush and compactions), called when the caller is idle. Changes no state.
    fn maintain(&mut self) -> Result<()> {
        Ok(())
    }
    /// The summary of the last batch all of whose rows are durable. The caller must keep what
    /// it would need to rebuild later batches' rows after a crash (the raft log's entries) at
    /// least back to this summary's raft index. A store that writes everything in `apply`
    /// returns `meta()`.
    fn compactable_meta(&mut self) -> Result<LedgerMeta> {
        self.meta()
    }
    /// Applied batches some of whose rows are not durable yet (see `compactable_meta`).
    fn archive_lag(&self) -> usize {
        0
    }
    /// How request lookups were answered so far: (from memory without a read, read and found,
    /// read and absent). For metrics; a store without such a split reports zeros.
    fn request_lookup_counts(&self) -> (u64, u64, u64) {
        (0, 0, 0)
    }
    /// The node stops cleanly: nothing more will be applied. A store may save what makes its
    /// next open faster. Changes no state.
    fn shutdown(&mut self) -> Result<()> {
        Ok(())
    }
    /// The oldest height whose history (`history`, `history_at`, `receipt`) the store holds:
    /// 1 when it holds all, more after an install from a snapshot that lacked older history.
    /// A store that keeps no history answers `u64::MAX` (every history read is refused).
    fn history_held_from(&mut self) -> Result<u64> {
        Ok(u64::MAX)
    }
    /// Up to `limit` history rows of `account` from `(height, leaf index)` on, ascending, as
    /// of the applied height.
    fn history(
        &mut self,
        _account: &PublicKey,
        _from: (u64, u32),
        _limit: usize,
    ) -> Result<HistoryPage> {
        Ok(HistoryPage::default())
    }
    /// The newest history row of `account` at or below `height` (its balance and counters
    /// as of `height`).
    fn history_at(&mut self, _account: &PublicKey, _height: u64) -> Result<Option<HistoryRow>> {
        Ok(None)
    }
    /// Where the receipt whose Merkle leaf hash is `leaf` was applied: (height, leaf index).
    fn receipt(&mut self, _leaf: &Hash) -> Result<Option<(u64, u32)>> {
        Ok(None)
    }
}

/// An in-memory [`LedgerStore`] for unit tests and simulation. Not durable.
#[derive(Default)]
pub struct MemStore {
    pub meta: Option<LedgerMeta>,
    pub accounts: HashMap<PublicKey, u64>,
    pub requests: HashMap<(PublicKey, u128), RequestRecord>,
    pub headers: HashMap<u64, SignedHeader>,
    pub bodies: HashMap<u64, Vec<u8>>,
    pub reserves: HashMap<(PublicKey, u128), Reserve>,
    /// Threshold checkpoint signatures, by size, and the last (None: no header was signed
    /// by a threshold).
    pub checkpoints: std::collections::BTreeMap<u64, Signature>,
    pub checkpointed: Option<u64>,
}

impl LedgerRead for MemStore {
    fn account(&mut self, key: &PublicKey) -> Result<Option<u64>> {
        Ok(self.accounts.get(key).copied())
    }
    fn request(&mut self, signer: &PublicKey, id: u128) -> Result<Option<RequestRecord>> {
        Ok(self.requests.get(&(*signer, id)).copied())
    }
    fn reserve(&mut self, owner: &PublicKey, id: u128) -> Result<Option<Reserve>> {
        Ok(self.reserves.get(&(*owner, id)).copied())
    }
    fn expiries(&mut self, limit: usize) -> Result<Vec<Expiry>> {
        Ok(crate::reserve::earliest(&self.reserves, limit))
    }
    fn header_time(&mut self, height: u64) -> Result<u64> {
        Ok(self
            .headers
            .get(&height)
            .map_or(0, |h| h.header.time_unix_ms))
    }
}

impl LedgerStore for MemStore {
    fn meta(&mut self) -> Result<LedgerMeta> {
        Ok(self.meta.clone().unwrap_or_else(LedgerMeta::genesis))
    }
    fn apply(&mut self, write: &BatchWrite) -> Result<()> {
        let height = write.meta.height;
        for (key, balance) in &write.accounts {
            self.accounts.insert(*key, *balance);
        }
        for c in &write.reserves {
            self.reserves.insert((c.owner, c.id), c.after);
        }
        for r in &write.requests {
            self.requests.insert(
                (r.signer, r.id),
                RequestRecord {
                    height,
                    index: r.index,
                    request_hash: r.request_hash,
                },
            );
        }
        self.headers.insert(height, write.signed_header.clone());
        self.bodies.insert(height, write.body.clone());
        self.meta = Some(write.meta.clone());
        Ok(())
    }
    fn header(&mut self, height: u64) -> Result<Option<SignedHeader>> {
        let signed = self
            .headers
            .get(&height)
            .filter(|s| s.signature != UNSIGNED);
        Ok(signed.cloned())
    }
    fn applied_header(&mut self, height: u64) -> Result<Option<Header>> {
        Ok(self.headers.get(&height).map(|s| s.header.clone()))
    }
    fn signed_through(&mut self) -> Result<u64> {
        let mut h = self.meta()?.height;
        while self
            .headers
            .get(&h)
            .is_some_and(|s| s.signature == UNSIGNED)
        {
            h -= 1;
        }
        Ok(h)
    }
    fn checkpointed_through(&mut self) -> Result<u64> {
        match self.checkpointed {
            Some(h) => Ok(h),
            None => self.signed_through(),
        }
    }
    fn sign_checkpoint(&mut self, size: u64, signature: Signature) -> Result<()> {
        let through = self.checkpointed.expect("a header is signed first");
        assert_eq!(size, through + 1, "checkpoints are signed in order");
        assert!(
            size <= self.signed_through()?,
            "a checkpoint after its header"
        );
        self.checkpoints.insert(size, signature);
        self.checkpointed = Some(size);
        Ok(())
    }
    fn checkpoint_signature(&mut self, size: u64) -> Result<Option<Signature>> {
        Ok(self.checkpoints.get(&size).copied())
    }
    fn sign_header(&mut self, height: u64, signature: Signature) -> Result<SignedHeader> {
        assert_eq!(
            height,
            self.signed_through()? + 1,
            "headers are signed in order"
        );
        self.checkpointed.get_or_insert(0);
        let stored = self.headers.get_mut(&height).expect("an applied header");
        stored.signature = signature;
        Ok(stored.clone())
    }
    fn body(&mut self, height: u64) -> Result<Option<Vec<u8>>> {
        Ok(self.bodies.get(&height).cloned())
    }
    /// Hashed from the headers on each call: O(2^level), for tests.
    fn header_log_node(&mut self, level: u8, index: u64) -> Result<Hash> {
        let first = index << level;
        let leaves = (first + 1..=first + (1 << level))
            .map(
                |h| match self.headers.get(&h).filter(|s| s.signature != UNSIGNED) {
                    Some(s) => Ok(crate::tlog::leaf_hash(&s.encode())),
                    None => Err(crate::Error::missing(format_args!("header {h}"))),
                },
            )
            .collect::<Result<Vec<Hash>>>()?;
        Ok(crate::tlog::root_of(&leaves))
    }
    fn pending(&mut self, key: &PublicKey) -> Result<(u64, u64)> {
        let (mut debits, mut credits) = (0, 0);
        for ((owner, _), r) in &self.reserves {
            if let Some(h) = r.open() {
                debits += if owner == key { h.amount } else { 0 };
                credits += if &h.to == key { h.amount } else { 0 };
            }
        }
        Ok((debits, credits))
    }
    fn balance_total(&mut self) -> Result<u128> {
        let held: u128 = self.reserves.values().map(|r| r.held() as u128).sum();
        Ok(self.accounts.values().map(|b| *b as u128).sum::<u128>() + held)
    }
}
