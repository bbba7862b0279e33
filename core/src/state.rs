//! The ledger's summary state and its digest.
//!
//! The state digest in every header commits to the whole state: the root of the state map (an
//! authenticated map of every account and reserve, [`crate::state_map`]) with the counts and
//! totals and the height. The map is what makes a balance provable against a signed header;
//! the totals are what conservation is checked against.

use tally_wire::{Hash, PublicKey};

use crate::crypto::sha256;
use crate::state_map::StateMap;
use crate::{Error, Result};

pub const STATE_DOMAIN: &[u8; 16] = b"tally/state/v2\0\0";
pub const META_BYTES: usize = 8 + 32 + 32 + 8 + 16 + 16 + 8;
/// [`LedgerMeta::operator`] encoded: the key, the rotation's height u64 LE, its number u32 LE.
/// Stored apart from the summary's [`META_BYTES`], which predate rotations.
pub const OPERATOR_BYTES: usize = 32 + 8 + 4;

/// Summary of the ledger after `height` batches: all that the next batch needs besides accounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerMeta {
    pub height: u64,
    /// Hash of the header at `height` (all zero at height 0).
    pub last_header_hash: Hash,
    /// Every account and reserve. Decoded from bytes it knows only its root until the store
    /// that owns it loads the entries.
    pub map: StateMap,
    pub account_count: u64,
    pub total_deposited: u128,
    pub total_withdrawn: u128,
    /// The Raft log index of the entry that carried batch `height` (0 without replication).
    /// Not part of the state digest: it says where the state came from, not what it is.
    pub raft_index: u64,
    /// The ledger's last operator key rotation (None: the genesis key signs). Not part of the
    /// state digest either: the rotation's receipt in its batch is what proves it (PROTOCOL.md
    /// §4.14).
    pub operator: Option<Rotation>,
}

/// An operator key rotation as the state keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// The key that signs every header after `height`.
    pub key: PublicKey,
    /// The height of the batch that named it (the last header the key before signed).
    pub height: u64,
    /// 1 for the ledger's first rotation, then 2, ... (at most `tally_wire::KEY_LINKS_MAX`).
    pub number: u32,
}

impl LedgerMeta {
    pub fn genesis() -> LedgerMeta {
        LedgerMeta {
            height: 0,
            last_header_hash: [0; 32],
            map: StateMap::empty(),
            account_count: 0,
            total_deposited: 0,
            total_withdrawn: 0,
            raft_index: 0,
            operator: None,
        }
    }

    /// The height of the last rotation (0: none).
    pub fn rotated_at(&self) -> u64 {
        self.operator.map_or(0, |r| r.height)
    }

    /// The number of rotations the ledger applied.
    pub fn rotations(&self) -> u32 {
        self.operator.map_or(0, |r| r.number)
    }

    /// The id of the key that signs the next header: the last rotation's, or `genesis`.
    pub fn signing_key_id(&self, genesis: &[u8; 8]) -> [u8; 8] {
        self.operator
            .map_or(*genesis, |r| crate::crypto::key_id(&r.key))
    }

    /// SHA-256(STATE_DOMAIN ‖ map root ‖ account_count ‖ total_deposited ‖ total_withdrawn ‖
    /// height), integers little-endian. The map must be flushed.
    pub fn state_digest(&self) -> Hash {
        state_digest(
            &self.map.root(),
            self.account_count,
            self.total_deposited,
            self.total_withdrawn,
            self.height,
        )
    }

    /// Records that `key` went from `old` (None: did not exist) to `new`; the map takes it at
    /// its next flush.
    pub fn account_changed(&mut self, key: &PublicKey, old: Option<u64>, new: u64) {
        self.account_counted(old);
        self.map.set_account(key, new);
    }

    /// Counts an account that went from `old` (None: did not exist) to some balance, without
    /// writing it into the map (whose owner has the map after the change already).
    pub fn account_counted(&mut self, old: Option<u64>) {
        if old.is_none() {
            self.account_count += 1;
        }
    }

    /// Records that reserve `(owner, id)` is now `new`; `account_count` counts accounts only.
    pub fn reserve_changed(&mut self, owner: &PublicKey, id: u128, new: &crate::reserve::Reserve) {
        self.map.set_reserve(owner, id, &new.encode());
    }

    /// The same summary with its map known only by its root: what to keep for a height that is
    /// no longer the newest, so that the tree's old nodes are not held alive with it.
    pub fn summary(&self) -> LedgerMeta {
        LedgerMeta {
            map: StateMap::unloaded(self.map.root()),
            ..self.clone()
        }
    }

    /// Total balance the ledger must hold: deposits minus withdrawals (conservation).
    pub fn expected_total(&self) -> u128 {
        self.total_deposited - self.total_withdrawn
    }

    pub fn encode(&self) -> [u8; META_BYTES] {
        let mut out = [0u8; META_BYTES];
        out[0..8].copy_from_slice(&self.height.to_le_bytes());
        out[8..40].copy_from_slice(&self.last_header_hash);
        out[40..72].copy_from_slice(&self.map.root());
        out[72..80].copy_from_slice(&self.account_count.to_le_bytes());
        out[80..96].copy_from_slice(&self.total_deposited.to_le_bytes());
        out[96..112].copy_from_slice(&self.total_withdrawn.to_le_bytes());
        out[112..120].copy_from_slice(&self.raft_index.to_le_bytes());
        out
    }

    /// [`LedgerMeta::operator`], when a rotation set it: key ‖ height u64 LE ‖ number u32 LE.
    pub fn encode_operator(&self) -> Option<[u8; OPERATOR_BYTES]> {
        let r = self.operator?;
        let mut out = [0u8; OPERATOR_BYTES];
        out[..32].copy_from_slice(&r.key);
        out[32..40].copy_from_slice(&r.height.to_le_bytes());
        out[40..].copy_from_slice(&r.number.to_le_bytes());
        Some(out)
    }

    /// Sets [`LedgerMeta::operator`] from [`LedgerMeta::encode_operator`]'s bytes.
    pub fn decode_operator(&mut self, bytes: &[u8]) -> Result<()> {
        let bytes: [u8; OPERATOR_BYTES] = bytes.try_into().map_err(|_| {
            Error::corrupt(format_args!(
                "the operator row has {} bytes, expected {OPERATOR_BYTES}",
                bytes.len()
            ))
        })?;
        let rotation = Rotation {
            key: bytes[..32].try_into().expect("32"),
            height: u64::from_le_bytes(bytes[32..40].try_into().expect("8")),
            number: u32::from_le_bytes(bytes[40..].try_into().expect("4")),
        };
        if rotation.height == 0 || rotation.height > self.height || rotation.number == 0 {
            return Err(Error::corrupt(format_args!(
                "the operator row names rotation {} at height {}, the ledger is at {}",
                rotation.number, rotation.height, self.height
            )));
        }
        self.operator = Some(rotation);
        Ok(())
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
            map: StateMap::unloaded(bytes[40..72].try_into().expect("32")),
            account_count: u64::from_le_bytes(bytes[72..80].try_into().expect("8")),
            total_deposited: u128::from_le_bytes(bytes[80..96].try_into().expect("16")),
            total_withdrawn: u128::from_le_bytes(bytes[96..112].try_into().expect("16")),
            raft_index: u64::from_le_bytes(bytes[112..120].try_into().expect("8")),
            operator: None,
        })
    }
}

/// SHA-256(STATE_DOMAIN ‖ map root ‖ account_count u64 ‖ total_deposited u128 ‖
/// total_withdrawn u128 ‖ height u64), integers little-endian (PROTOCOL.md §4.13).
pub fn state_digest(
    map_root: &Hash,
    account_count: u64,
    total_deposited: u128,
    total_withdrawn: u128,
    height: u64,
) -> Hash {
    sha256(&[
        STATE_DOMAIN,
        map_root,
        &account_count.to_le_bytes(),
        &total_deposited.to_le_bytes(),
        &total_withdrawn.to_le_bytes(),
        &height.to_le_bytes(),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_order_independent() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let mut x = LedgerMeta::genesis();
        x.account_changed(&a, None, 10);
        x.account_changed(&b, None, 5);
        x.account_changed(&a, Some(10), 7);
        x.map.flush();
        let mut y = LedgerMeta::genesis();
        y.account_changed(&b, None, 5);
        y.account_changed(&a, None, 7);
        y.map.flush();
        assert_eq!(x.state_digest(), y.state_digest());
        y.account_changed(&a, Some(7), 8);
        y.map.flush();
        assert_ne!(x.state_digest(), y.state_digest());
        assert_eq!(LedgerMeta::decode(&x.encode()).unwrap(), x);
    }
}
