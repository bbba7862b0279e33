//! The ledger's summary state and its digest.
//!
//! The state digest in every header must be the same on every replica and cheap to update, while
//! the state itself need not fit in memory. It is built from an additive multiset hash: the sum,
//! modulo 2^256, of SHA-256("tally/account/v1" || key || balance) over all accounts, updated per
//! changed account by subtracting the old term and adding the new one. Such a sum detects
//! accidental divergence; it is not meant to resist an adversary who picks balances (see
//! Wagner's generalized birthday attack), which is why the header chain, not the digest, carries
//! the security argument.

use tally_wire::{Hash, PublicKey};

use crate::crypto::sha256;
use crate::{Error, Result};

pub const ACCOUNT_TERM_DOMAIN: &[u8; 16] = b"tally/account/v1";
pub const STATE_DOMAIN: &[u8; 16] = b"tally/state/v1\0\0";
pub const META_BYTES: usize = 8 + 32 + 32 + 8 + 16 + 16 + 8;

/// Summary of the ledger after `height` batches: all that the next batch needs besides accounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerMeta {
    pub height: u64,
    /// Hash of the header at `height` (all zero at height 0).
    pub last_header_hash: Hash,
    /// Sum of the account terms, a 256-bit little-endian integer.
    pub account_sum: [u8; 32],
    pub account_count: u64,
    pub total_deposited: u128,
    pub total_withdrawn: u128,
    /// The Raft log index of the entry that carried batch `height` (0 without replication).
    /// Not part of the state digest: it says where the state came from, not what it is.
    pub raft_index: u64,
}

impl LedgerMeta {
    pub fn genesis() -> LedgerMeta {
        LedgerMeta {
            height: 0,
            last_header_hash: [0; 32],
            account_sum: [0; 32],
            account_count: 0,
            total_deposited: 0,
            total_withdrawn: 0,
            raft_index: 0,
        }
    }

    /// SHA-256(STATE_DOMAIN || account_sum || account_count || total_deposited || total_withdrawn
    /// || height), integers little-endian.
    pub fn state_digest(&self) -> Hash {
        sha256(&[
            STATE_DOMAIN,
            &self.account_sum,
            &self.account_count.to_le_bytes(),
            &self.total_deposited.to_le_bytes(),
            &self.total_withdrawn.to_le_bytes(),
            &self.height.to_le_bytes(),
        ])
    }

    /// Records that `key` went from `old` (None: did not exist) to `new`.
    pub fn account_changed(&mut self, key: &PublicKey, old: Option<u64>, new: u64) {
        match old {
            None => self.account_count += 1,
            Some(old) => self.account_sum = sub256(&self.account_sum, &account_term(key, old)),
        }
        self.account_sum = add256(&self.account_sum, &account_term(key, new));
    }

    /// Records that reserve `(owner, id)` went from `old` (None: did not exist) to `new`. Its
    /// term joins the accounts' in `account_sum`; `account_count` counts accounts only.
    pub fn reserve_changed(
        &mut self,
        owner: &PublicKey,
        id: u128,
        old: Option<&crate::reserve::Reserve>,
        new: &crate::reserve::Reserve,
    ) {
        use crate::reserve::reserve_term;
        if let Some(old) = old {
            self.account_sum = sub256(&self.account_sum, &reserve_term(owner, id, old));
        }
        self.account_sum = add256(&self.account_sum, &reserve_term(owner, id, new));
    }

    /// Total balance the ledger must hold: deposits minus withdrawals (conservation).
    pub fn expected_total(&self) -> u128 {
        self.total_deposited - self.total_withdrawn
    }

    pub fn encode(&self) -> [u8; META_BYTES] {
        let mut out = [0u8; META_BYTES];
        out[0..8].copy_from_slice(&self.height.to_le_bytes());
        out[8..40].copy_from_slice(&self.last_header_hash);
        out[40..72].copy_from_slice(&self.account_sum);
        out[72..80].copy_from_slice(&self.account_count.to_le_bytes());
        out[80..96].copy_from_slice(&self.total_deposited.to_le_bytes());
        out[96..112].copy_from_slice(&self.total_withdrawn.to_le_bytes());
        out[112..120].copy_from_slice(&self.raft_index.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<LedgerMeta> {
        if bytes.len() != META_BYTES {
            return Err(Error::corrupt(format_args!(
                "ledger meta has {} bytes, expected {META_BYTES}",
                bytes.len()
            )));
        }
        Ok(LedgerMeta {
            height: u64::from_le_bytes(bytes[0..8].try_into().expect("8")),
            last_header_hash: bytes[8..40].try_into().expect("32"),
            account_sum: bytes[40..72].try_into().expect("32"),
            account_count: u64::from_le_bytes(bytes[72..80].try_into().expect("8")),
            total_deposited: u128::from_le_bytes(bytes[80..96].try_into().expect("16")),
            total_withdrawn: u128::from_le_bytes(bytes[96..112].try_into().expect("16")),
            raft_index: u64::from_le_bytes(bytes[112..120].try_into().expect("8")),
        })
    }
}

pub fn account_term(key: &PublicKey, balance: u64) -> [u8; 32] {
    sha256(&[ACCOUNT_TERM_DOMAIN, key, &balance.to_le_bytes()])
}

fn add256(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    let mut out = [0u8; 32];
    let mut carry = 0u16;
    for i in 0..32 {
        let s = a[i] as u16 + b[i] as u16 + carry;
        out[i] = s as u8;
        carry = s >> 8;
    }
    out
}

fn sub256(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    let mut out = [0u8; 32];
    let mut borrow = 0i16;
    for i in 0..32 {
        let mut d = a[i] as i16 - b[i] as i16 - borrow;
        borrow = if d < 0 { 1 } else { 0 };
        if d < 0 {
            d += 256;
        }
        out[i] = d as u8;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_order_independent_and_reversible() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let mut x = LedgerMeta::genesis();
        x.account_changed(&a, None, 10);
        x.account_changed(&b, None, 5);
        x.account_changed(&a, Some(10), 7);
        let mut y = LedgerMeta::genesis();
        y.account_changed(&b, None, 5);
        y.account_changed(&a, None, 7);
        assert_eq!(x.account_sum, y.account_sum);
        assert_eq!(x.state_digest(), y.state_digest());
        y.account_changed(&a, Some(7), 8);
        assert_ne!(x.state_digest(), y.state_digest());
        assert_eq!(LedgerMeta::decode(&x.encode()).unwrap(), x);
    }

    /// What the sequencer and the replay rely on: folding each account's net change of a batch
    /// (balance before, balance after) gives the same summary as folding every change.
    #[test]
    fn net_changes_per_account_give_the_summary_of_every_change() {
        let seed: u64 = std::env::var("TALLY_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x5eed_0f_d1ff);
        let mut x = seed | 1;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut every = LedgerMeta::genesis();
        let mut balances: std::collections::HashMap<u8, u64> = Default::default();
        for batch in 0..50 {
            let mut net = every.clone();
            let mut open: std::collections::HashMap<u8, (Option<u64>, u64)> = Default::default();
            for _ in 0..(next() % 40) {
                let account = (next() % 12) as u8;
                let old = balances.get(&account).copied();
                // Sometimes back to the balance before (a change that nets out).
                let new = if next() % 5 == 0 {
                    old.unwrap_or(0)
                } else {
                    next() % 1000
                };
                every.account_changed(&[account; 32], old, new);
                balances.insert(account, new);
                open.entry(account)
                    .and_modify(|e| e.1 = new)
                    .or_insert((old, new));
            }
            for (account, (before, after)) in open {
                net.account_changed(&[account; 32], before, after);
            }
            assert_eq!(net, every, "batch {batch} (TALLY_TEST_SEED={seed})");
        }
    }

    #[test]
    fn add_and_sub_are_inverse_with_carries() {
        let a = [0xff; 32];
        let b = account_term(&[9; 32], 3);
        assert_eq!(sub256(&add256(&a, &b), &b), a);
        assert_eq!(add256(&sub256(&[0; 32], &b), &b), [0; 32]);
    }
}
