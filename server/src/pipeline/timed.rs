//! A ledger store that times its durable writes, so that the storage thread can split a
//! batch's apply into preparing (replay, signing) and writing (`tally_durable_write_seconds`)
//! while the engine does both in one call.

use std::time::Instant;

use tally_core::batch::BatchWrite;
use tally_core::ports::{LedgerRead, LedgerStore, RequestRecord};
use tally_core::reserve::{Expiry, Reserve};
use tally_core::state::LedgerMeta;
use tally_core::Result;
use tally_wire::{Hash, PublicKey, SignedHeader};

pub(super) struct TimedStore<'a, S> {
    inner: &'a mut S,
    /// Seconds spent in `apply` since this wrapper was made.
    pub write_seconds: f64,
}

impl<'a, S> TimedStore<'a, S> {
    pub fn new(inner: &'a mut S) -> TimedStore<'a, S> {
        TimedStore {
            inner,
            write_seconds: 0.0,
        }
    }
}

impl<S: LedgerStore> LedgerRead for TimedStore<'_, S> {
    fn account(&mut self, key: &PublicKey) -> Result<Option<u64>> {
        self.inner.account(key)
    }
    fn request(&mut self, signer: &PublicKey, id: u128) -> Result<Option<RequestRecord>> {
        self.inner.request(signer, id)
    }
    fn reserve(&mut self, owner: &PublicKey, id: u128) -> Result<Option<Reserve>> {
        self.inner.reserve(owner, id)
    }
    fn expiries(&mut self, limit: usize) -> Result<Vec<Expiry>> {
        self.inner.expiries(limit)
    }
    fn header_time(&mut self, height: u64) -> Result<u64> {
        self.inner.header_time(height)
    }
}

impl<S: LedgerStore> LedgerStore for TimedStore<'_, S> {
    fn pending(&mut self, key: &PublicKey) -> Result<(u64, u64)> {
        self.inner.pending(key)
    }
    fn meta(&mut self) -> Result<LedgerMeta> {
        self.inner.meta()
    }
    fn apply(&mut self, write: &BatchWrite) -> Result<()> {
        let started = Instant::now();
        let result = self.inner.apply(write);
        self.write_seconds += started.elapsed().as_secs_f64();
        result
    }
    fn header(&mut self, height: u64) -> Result<Option<SignedHeader>> {
        self.inner.header(height)
    }
    fn applied_header(&mut self, height: u64) -> Result<Option<tally_wire::Header>> {
        self.inner.applied_header(height)
    }
    fn signed_through(&mut self) -> Result<u64> {
        self.inner.signed_through()
    }
    fn checkpointed_through(&mut self) -> Result<u64> {
        self.inner.checkpointed_through()
    }
    fn checkpoint_signature(&mut self, size: u64) -> Result<Option<tally_wire::Signature>> {
        self.inner.checkpoint_signature(size)
    }
    fn sign_checkpoint(&mut self, size: u64, signature: tally_wire::Signature) -> Result<()> {
        let started = Instant::now();
        let result = self.inner.sign_checkpoint(size, signature);
        self.write_seconds += started.elapsed().as_secs_f64();
        result
    }
    fn sign_header(
        &mut self,
        height: u64,
        signature: tally_wire::Signature,
    ) -> Result<SignedHeader> {
        let started = Instant::now();
        let result = self.inner.sign_header(height, signature);
        self.write_seconds += started.elapsed().as_secs_f64();
        result
    }
    fn body(&mut self, height: u64) -> Result<Option<Vec<u8>>> {
        self.inner.body(height)
    }
    fn header_log_node(&mut self, level: u8, index: u64) -> Result<Hash> {
        self.inner.header_log_node(level, index)
    }
    fn balance_total(&mut self) -> Result<u128> {
        self.inner.balance_total()
    }
}
