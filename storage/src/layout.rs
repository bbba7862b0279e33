//! The key layout: every table, its tag, and how its keys and values are encoded.
//!
//! Every key starts with a 4-byte table tag, the first 4 bytes of
//! `SHA-256("tally/table/<name>/v<version>")`. A reader that finds a tag knows how to decode the
//! value; a schema change gets a new version, hence a new tag, and old and new rows can never be
//! confused. The tags are written out as constants (so that a key can be read in a hex dump) and a
//! test checks them against their derivation. See the crate docs for the table of layouts.

use std::fmt;

use tally_core::ports::RequestRecord;
use tally_core::reserve::Reserve;
use tally_core::Error;
use tally_wire::{Hash, PublicKey};

/// The tables of the ledger database and of the raft log database. The one place that lists
/// them: tags are distinct across both, so a key found in the wrong database is never misread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    /// Intent-addressed: pubkey → balance.
    Account,
    /// Intent-addressed: height (big-endian, so iteration is in height order) → signed header
    /// and the digest of the height's body (to find it in `body`).
    Header,
    /// Content-addressed: SHA-256(body) → encoded batch body.
    Body,
    /// Intent-addressed: (signer, id) → where the request was applied.
    Request,
    /// The single ledger summary row.
    Meta,
    /// Intent-addressed: (owner, id) → the reserve's state (`Reserve::encode`); closed ones
    /// stay as tombstones.
    Reserve,
    /// Derived from `reserve`: (expires_at_ms, owner, id) → nothing, present exactly while the
    /// reserve is open (deadline order, read at open into memory: see `LedgerDb::expiries`).
    Expiry,
    /// Derived from `reserve`: account → what its open reserves hold (pending debits, as owner)
    /// and what open reserves hold for it (pending credits, as `to`); absent when both are 0.
    Pending,
    /// Raft log (its own database): index (big-endian) → `raft::eraftpb::Entry` protobuf.
    RaftEntry,
    /// Raft log (its own database): hard state, conf state, snapshot point, last index.
    RaftState,
    /// Archive database: (account, per-account sequence number) → what one applied operation
    /// did to the account, with its running counters after it (see `history.rs`).
    History,
    /// Archive database: receipt leaf hash → where the receipt was applied.
    Receipt,
}

impl Table {
    pub const ALL: [Table; 12] = [
        Table::Account,
        Table::Header,
        Table::Body,
        Table::Request,
        Table::Meta,
        Table::Reserve,
        Table::Expiry,
        Table::Pending,
        Table::RaftEntry,
        Table::RaftState,
        Table::History,
        Table::Receipt,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Table::Account => "account",
            Table::Header => "header",
            Table::Body => "body",
            Table::Request => "request",
            Table::Meta => "meta",
            Table::Reserve => "reserve",
            Table::Expiry => "expiry",
            Table::Pending => "pending",
            Table::RaftEntry => "raft_entry",
            Table::RaftState => "raft_state",
            Table::History => "history",
            Table::Receipt => "receipt",
        }
    }

    pub const fn version(self) -> u32 {
        match self {
            Table::Account
            | Table::Body
            | Table::Request
            | Table::Meta
            | Table::Reserve
            | Table::Expiry
            | Table::Pending
            | Table::RaftEntry
            | Table::Receipt => 1,
            // v2: one row per account and batch holding its entries there (v1: one row per
            // entry, twice the rows that stay; see `history.rs`). An archive with v1 rows drops
            // them at open and holds history from its next batch (`archive.rs`).
            Table::History => 2,
            // v2: the rows of v1, under a tag that sorts after every `raft_entry` key. They are
            // rewritten by every raft write; under v1's tag (below `raft_entry`'s) each LevelDB
            // table then spanned the whole log, and every level-0 compaction rewrote all of
            // level 1 (measured: 120-170 MB in 0.5-1.2 s on the raft thread).
            Table::RaftState => 2,
            // v2: v1's signed header followed by the body digest (v1 kept that in a table of
            // its own, `body_by_height`), under a tag that sorts below `account`'s. Headers are
            // written once, in height order, and a level-0 table of the state database spans
            // from its lowest key to its highest: with headers above the accounts (v1), each
            // spanned every older header, and every level-0 merge rewrote all of them with the
            // accounts (60-100 ms per merge, growing with the chain, at half load). Below, older
            // headers lie outside the span of every new table and are left where they are.
            Table::Header => 2,
        }
    }

    /// Whether the table's rows live in the archive database (`<ledger>/archive`, written behind
    /// the confirmation path, see `archive.rs`) rather than the ledger's state database.
    pub const fn in_archive(self) -> bool {
        matches!(
            self,
            Table::Body | Table::Request | Table::History | Table::Receipt
        )
    }

    /// Whether the table's rows are derived from other state rows (`reserve`): a dump leaves
    /// them out and an install or import rebuilds them (see `transfer.rs`).
    pub const fn derived(self) -> bool {
        matches!(self, Table::Expiry | Table::Pending)
    }

    /// The table whose tag is `tag`, if any.
    pub fn from_tag(tag: &[u8]) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.tag() == tag)
    }

    /// The first 4 bytes of `SHA-256("tally/table/<name>/v<version>")`.
    pub const fn tag(self) -> [u8; 4] {
        match self {
            Table::Account => [0x92, 0xf4, 0x42, 0x78],
            Table::Header => [0x50, 0x14, 0x86, 0xd3],
            Table::Body => [0x75, 0x81, 0x25, 0xba],
            Table::Request => [0x94, 0x9b, 0x68, 0x03],
            Table::Meta => [0xd8, 0xa7, 0xaf, 0x8d],
            Table::Reserve => [0x6f, 0xc1, 0x78, 0x01],
            Table::Expiry => [0x4b, 0xb0, 0x64, 0xa3],
            Table::Pending => [0x19, 0x39, 0x3f, 0x70],
            Table::RaftEntry => [0x92, 0xb8, 0x4d, 0xfb],
            Table::RaftState => [0xbd, 0x94, 0x61, 0x2d],
            Table::History => [0x06, 0xa7, 0x7c, 0x34],
            Table::Receipt => [0x42, 0x39, 0x6e, 0x5c],
        }
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/v{}", self.name(), self.version())
    }
}

pub const TAG_BYTES: usize = 4;
pub const ACCOUNT_VALUE_BYTES: usize = 8;
pub const REQUEST_VALUE_BYTES: usize = 8 + 4 + 32;
/// The bytes of a `request` key: tag, signer, id.
pub const REQUEST_KEY_BYTES: usize = TAG_BYTES + 32 + 16;
/// The bytes of a `receipt` key: tag, leaf hash.
pub const RECEIPT_KEY_BYTES: usize = TAG_BYTES + 32;
/// A `pending` value: pending debits u64 LE ‖ pending credits u64 LE.
pub const PENDING_VALUE_BYTES: usize = 8 + 8;
/// The fixed part of a snapshot point value: index u64 LE || term u64 LE.
/// A `header` value: signed header (256) || body digest (32).
pub const HEADER_VALUE_BYTES: usize = tally_wire::SIGNED_HEADER_BYTES + 32;
pub const SNAPSHOT_POINT_FIXED_BYTES: usize = 8 + 8;

fn make_key<const N: usize>(table: Table, parts: &[&[u8]]) -> [u8; N] {
    let mut out = [0u8; N];
    out[..TAG_BYTES].copy_from_slice(&table.tag());
    let mut at = TAG_BYTES;
    for p in parts {
        out[at..at + p.len()].copy_from_slice(p);
        at += p.len();
    }
    assert_eq!(at, N, "key of table {table} has the wrong length");
    out
}

/// tag || pubkey (32)
pub fn account_key(key: &PublicKey) -> [u8; 36] {
    make_key(Table::Account, &[key])
}

/// tag || height u64 BE
pub fn header_key(height: u64) -> [u8; 12] {
    make_key(Table::Header, &[&height.to_be_bytes()])
}

/// tag || SHA-256(body) (32)
pub fn body_key(digest: &Hash) -> [u8; 36] {
    make_key(Table::Body, &[digest])
}

/// The tags of `header` v1 (signed header only) and `body_by_height` v1 (height u64 BE → body
/// digest), whose rows `LedgerDb::open` merges into `header` v2.
pub const HEADER_V1_TAG: [u8; 4] = [0xd9, 0x56, 0x04, 0xdf];
pub const BODY_BY_HEIGHT_V1_TAG: [u8; 4] = [0x78, 0xd7, 0xf6, 0x08];

/// tag || signer (32) || id u128 BE
pub fn request_key(signer: &PublicKey, id: u128) -> [u8; 52] {
    make_key(Table::Request, &[signer, &id.to_be_bytes()])
}

/// tag || owner (32) || id u128 BE
pub fn reserve_key(owner: &PublicKey, id: u128) -> [u8; 52] {
    make_key(Table::Reserve, &[owner, &id.to_be_bytes()])
}

/// tag || expires_at_ms u64 BE || owner (32) || id u128 BE: keys sort in deadline order
/// (`tally_core::reserve::Expiry`'s order).
pub fn expiry_key(at_ms: u64, owner: &PublicKey, id: u128) -> [u8; 60] {
    make_key(
        Table::Expiry,
        &[&at_ms.to_be_bytes(), owner, &id.to_be_bytes()],
    )
}

/// The expiry an [`expiry_key`] names, or None if `key` is not one.
pub fn expiry_key_decode(key: &[u8]) -> Option<tally_core::reserve::Expiry> {
    let rest: &[u8; 56] = key.strip_prefix(&Table::Expiry.tag())?.try_into().ok()?;
    Some(tally_core::reserve::Expiry {
        at_ms: u64::from_be_bytes(rest[..8].try_into().expect("8 bytes")),
        owner: rest[8..40].try_into().expect("32 bytes"),
        id: u128::from_be_bytes(rest[40..].try_into().expect("16 bytes")),
    })
}

/// tag || account (32)
pub fn pending_key(account: &PublicKey) -> [u8; 36] {
    make_key(Table::Pending, &[account])
}

/// tag || account (32) || row number u64 BE: the account's entries in its `number`-th batch
/// (from 1); number 0 holds its head (see `history.rs`).
pub fn history_key(account: &PublicKey, number: u64) -> [u8; 44] {
    make_key(Table::History, &[account, &number.to_be_bytes()])
}

/// The tag of `history` v1 (`SHA-256("tally/table/history/v1")`), whose rows an archive drops
/// when it opens (see `Table::version`).
pub const HISTORY_V1_TAG: [u8; 4] = [0x97, 0x5f, 0x3e, 0xc2];

/// tag || "held_from": in the archive database, the oldest height whose history it holds,
/// u64 LE (see `history.rs`).
pub fn history_held_from_key() -> [u8; 13] {
    make_key(Table::History, &[b"held_from"])
}

/// tag || receipt leaf hash (32)
pub fn receipt_key(leaf: &Hash) -> [u8; 36] {
    make_key(Table::Receipt, &[leaf])
}

/// tag || "ledger"
pub fn meta_key() -> [u8; 10] {
    make_key(Table::Meta, &[b"ledger"])
}

/// tag || "operator": the ledger's last operator key rotation (`LedgerMeta::encode_operator`),
/// absent until the first. Written in the same batch as the summary row.
pub fn operator_key() -> [u8; 12] {
    make_key(Table::Meta, &[b"operator"])
}

/// tag || "archive": in the archive database (see `archive.rs`), the height and raft index of
/// the last batch whose bodies and request records it holds, u64 LE each.
pub fn archive_point_key() -> [u8; 11] {
    make_key(Table::Meta, &[b"archive"])
}

/// tag || "runs" || the table's tag: which sorted runs of that table count, oldest first
/// (`storage/src/runs.rs`), written with the archive point.
pub fn runs_key(table: Table) -> [u8; 12] {
    make_key(Table::Meta, &[b"runs", &table.tag()])
}

/// tag || "open": never present. `LedgerDb::open` writes a deletion of it before any read, only to
/// advance LevelDB's sequence number (see `LedgerDb::open`).
pub fn open_marker_key() -> [u8; 8] {
    make_key(Table::Meta, &[b"open"])
}

/// tag || index u64 BE
pub fn raft_entry_key(index: u64) -> [u8; 12] {
    make_key(Table::RaftEntry, &[&index.to_be_bytes()])
}

/// The index in a raft entry key, or None if `key` is not one.
pub fn raft_entry_key_index(key: &[u8]) -> Option<u64> {
    let rest = key.strip_prefix(&Table::RaftEntry.tag())?;
    Some(u64::from_be_bytes(rest.try_into().ok()?))
}

/// tag || index u64 BE || "h": the hard state (`HardState` protobuf) written by the write that
/// left the log's last index at `index`. Every write of the raft log puts one at its last index,
/// next to the entries it writes, and deletes those above it (left by the suffix it replaces): the
/// highest key of the `raft_entry` table is the newest hard state, and its index is the last
/// index. Older ones stay until compaction removes them with their entries.
///
/// They sit in the entries' key range, not in `raft_state`, so that the keys of a run of appends
/// are all new and above every stored key: LevelDB writes such a memtable straight into a level
/// below 0 and never merges it. (A fixed hard-state key, rewritten by every write, made every
/// table overlap every other, and each level-0 compaction merged ~16 MB on the raft thread.)
pub fn raft_hard_state_at_key(index: u64) -> [u8; 13] {
    make_key(Table::RaftEntry, &[&index.to_be_bytes(), b"h"])
}

/// The index in a [`raft_hard_state_at_key`], or None if `key` is not one.
pub fn raft_hard_state_at_index(key: &[u8]) -> Option<u64> {
    let rest = key
        .strip_prefix(&Table::RaftEntry.tag())?
        .strip_suffix(b"h")?;
    Some(u64::from_be_bytes(rest.try_into().ok()?))
}

/// A key above every key of `table` and below every key of a table with a higher tag.
pub fn table_end(table: Table) -> [u8; TAG_BYTES] {
    let tag = u32::from_be_bytes(table.tag());
    tag.checked_add(1)
        .expect("no table has the tag ff ff ff ff")
        .to_be_bytes()
}

/// The tag of `raft_state` v1, whose rows `RaftLogDb::open` moves to v2.
pub const RAFT_STATE_V1_TAG: [u8; 4] = [0x43, 0xc7, 0xc0, 0xc0];

/// tag || "hard": the `HardState` protobuf, in logs written before [`raft_hard_state_at_key`]
/// (`RaftLogDb::open` moves it there).
pub fn raft_hard_state_key() -> [u8; 8] {
    make_key(Table::RaftState, &[b"hard"])
}

/// tag || "conf": the `ConfState` protobuf.
pub fn raft_conf_state_key() -> [u8; 8] {
    make_key(Table::RaftState, &[b"conf"])
}

/// tag || "book": the address book kept with the conf state (`tally_core::engine::members`).
pub fn raft_address_book_key() -> [u8; 8] {
    make_key(Table::RaftState, &[b"book"])
}

/// tag || "snap": the snapshot point (see [`SnapshotPoint::encode`]).
pub fn raft_snapshot_key() -> [u8; 8] {
    make_key(Table::RaftState, &[b"snap"])
}

/// tag || "last": the index of the last entry, u64 LE, in logs written before
/// [`raft_hard_state_at_key`] (whose key now holds it; `RaftLogDb::open` moves it there).
pub fn raft_last_index_key() -> [u8; 8] {
    make_key(Table::RaftState, &[b"last"])
}

/// tag || "open": never present, like [`open_marker_key`] in the ledger database.
pub fn raft_open_marker_key() -> [u8; 8] {
    make_key(Table::RaftState, &[b"open"])
}

/// tag || height u64 BE || "t": the header log's nodes completed at `height` (derived from the
/// headers, see `header_log.rs`). Under `header`'s tag, right after the height's header row: the
/// rows are written once in height order, and like the headers (see `Table::version`) the old
/// ones lie below every new LevelDB table's span.
pub fn header_log_key(height: u64) -> [u8; 13] {
    make_key(Table::Header, &[&height.to_be_bytes(), b"t"])
}

/// tag || height (u64 BE) || "c": the threshold's signature (64 bytes) of the checkpoint of the
/// header log of that size (a threshold operator's ledger only; `LedgerStore::sign_checkpoint`).
/// Sorts right after the header row of its height.
pub fn checkpoint_signature_key(height: u64) -> [u8; 13] {
    make_key(Table::Header, &[&height.to_be_bytes(), b"c"])
}

/// The height of a checkpoint signature row ([`checkpoint_signature_key`]), or None.
pub fn checkpoint_signature_height(key: &[u8]) -> Option<u64> {
    let rest = key.strip_prefix(&Table::Header.tag())?;
    match rest {
        [h @ .., b'c'] if h.len() == 8 => Some(u64::from_be_bytes(h.try_into().ok()?)),
        _ => None,
    }
}

/// tag || "checkpointed": the highest height whose checkpoint signature is stored (u64 LE).
/// Present only on a threshold operator's ledger (from its first signed header on): its absence
/// means checkpoints are signed when asked, by a whole key.
pub fn checkpointed_key() -> [u8; 16] {
    make_key(Table::Meta, &[b"checkpointed"])
}

/// Whether `key` is a header log row ([`header_log_key`]).
pub fn is_header_log_key(key: &[u8]) -> bool {
    key.len() == 13 && key.starts_with(&Table::Header.tag()) && key[12] == b't'
}

/// The height in a header key, or None if `key` is not one.
pub fn header_key_height(key: &[u8]) -> Option<u64> {
    let rest = key.strip_prefix(&Table::Header.tag())?;
    Some(u64::from_be_bytes(rest.try_into().ok()?))
}

/// A stored value that does not decode: the database is corrupt, the node must stop.
pub fn corrupt(table: Table, what: impl fmt::Display) -> Error {
    Error::corrupt(format_args!("table {table}: {what}"))
}

/// Checks that `value` has exactly `N` bytes.
pub fn fixed<const N: usize>(table: Table, value: &[u8]) -> Result<[u8; N], Error> {
    value.try_into().map_err(|_| {
        corrupt(
            table,
            format_args!("value has {} bytes, expected {N}", value.len()),
        )
    })
}

/// balance u64 LE
pub fn encode_account(balance: u64) -> [u8; ACCOUNT_VALUE_BYTES] {
    balance.to_le_bytes()
}

pub fn decode_account(value: &[u8]) -> Result<u64, Error> {
    Ok(u64::from_le_bytes(fixed(Table::Account, value)?))
}

pub fn decode_reserve(value: &[u8]) -> Result<Reserve, Error> {
    Reserve::decode(value).map_err(|e| corrupt(Table::Reserve, e))
}

/// pending debits u64 LE || pending credits u64 LE
pub fn encode_pending(debits: u64, credits: u64) -> [u8; PENDING_VALUE_BYTES] {
    let mut out = [0u8; PENDING_VALUE_BYTES];
    out[..8].copy_from_slice(&debits.to_le_bytes());
    out[8..].copy_from_slice(&credits.to_le_bytes());
    out
}

/// (pending debits, pending credits); a stored row is never (0, 0).
pub fn decode_pending(value: &[u8]) -> Result<(u64, u64), Error> {
    let v: [u8; PENDING_VALUE_BYTES] = fixed(Table::Pending, value)?;
    let pending = (
        u64::from_le_bytes(v[..8].try_into().expect("8 bytes")),
        u64::from_le_bytes(v[8..].try_into().expect("8 bytes")),
    );
    if pending == (0, 0) {
        return Err(corrupt(Table::Pending, "a row of zeros is never stored"));
    }
    Ok(pending)
}

/// height u64 LE || index u32 LE || request_hash (32)
pub fn encode_request(r: &RequestRecord) -> [u8; REQUEST_VALUE_BYTES] {
    let mut out = [0u8; REQUEST_VALUE_BYTES];
    out[0..8].copy_from_slice(&r.height.to_le_bytes());
    out[8..12].copy_from_slice(&r.index.to_le_bytes());
    out[12..44].copy_from_slice(&r.request_hash);
    out
}

pub fn decode_request(value: &[u8]) -> Result<RequestRecord, Error> {
    let v: [u8; REQUEST_VALUE_BYTES] = fixed(Table::Request, value)?;
    Ok(RequestRecord {
        height: u64::from_le_bytes(v[0..8].try_into().expect("8 bytes")),
        index: u32::from_le_bytes(v[8..12].try_into().expect("4 bytes")),
        request_hash: v[12..44].try_into().expect("32 bytes"),
    })
}

/// Where the raft log starts: the entries up to `index` are compacted away, the ledger state at
/// `index` is described by `descriptor` (opaque bytes chosen by the server).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotPoint {
    pub index: u64,
    pub term: u64,
    pub descriptor: Vec<u8>,
}

impl SnapshotPoint {
    /// index u64 LE || term u64 LE || descriptor
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(SNAPSHOT_POINT_FIXED_BYTES + self.descriptor.len());
        out.extend_from_slice(&self.index.to_le_bytes());
        out.extend_from_slice(&self.term.to_le_bytes());
        out.extend_from_slice(&self.descriptor);
        out
    }

    pub fn decode(value: &[u8]) -> Result<SnapshotPoint, Error> {
        if value.len() < SNAPSHOT_POINT_FIXED_BYTES {
            return Err(corrupt(
                Table::RaftState,
                format_args!(
                    "snapshot point has {} bytes, expected at least {SNAPSHOT_POINT_FIXED_BYTES}",
                    value.len()
                ),
            ));
        }
        Ok(SnapshotPoint {
            index: u64::from_le_bytes(value[0..8].try_into().expect("8 bytes")),
            term: u64::from_le_bytes(value[8..16].try_into().expect("8 bytes")),
            descriptor: value[SNAPSHOT_POINT_FIXED_BYTES..].to_vec(),
        })
    }
}

/// index u64 LE
pub fn decode_raft_last_index(value: &[u8]) -> Result<u64, Error> {
    Ok(u64::from_le_bytes(fixed(Table::RaftState, value)?))
}

/// The rest of a row key of `table` after its tag, as a fixed-size array; a key of another
/// length is corruption.
pub(crate) fn key_rest<const N: usize>(table: Table, key: &[u8]) -> Result<[u8; N], Error> {
    key.get(TAG_BYTES..)
        .and_then(|rest| rest.try_into().ok())
        .ok_or_else(|| {
            corrupt(
                table,
                format_args!("key {} has {} bytes", hex::encode(key), key.len()),
            )
        })
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use sha2::{Digest, Sha256};

    use super::*;

    #[test]
    fn tags_are_derived_from_name_and_version() {
        for t in Table::ALL {
            let digest = Sha256::digest(format!("tally/table/{}/v{}", t.name(), t.version()));
            assert_eq!(
                t.tag(),
                digest[..4],
                "tag of {t} should be {:02x?}",
                &digest[..4]
            );
        }
    }

    #[test]
    fn raft_state_keys_are_distinct_and_in_their_table() {
        let keys = [
            raft_hard_state_key(),
            raft_conf_state_key(),
            raft_address_book_key(),
            raft_snapshot_key(),
            raft_last_index_key(),
            raft_open_marker_key(),
        ];
        let set: HashSet<[u8; 8]> = keys.iter().copied().collect();
        assert_eq!(set.len(), keys.len());
        for k in keys {
            assert!(k.starts_with(&Table::RaftState.tag()));
        }
    }

    #[test]
    fn tables_are_found_by_tag() {
        for t in Table::ALL {
            assert_eq!(Table::from_tag(&t.tag()), Some(t));
        }
        assert_eq!(Table::from_tag(&[0; 4]), None);
        assert_eq!(Table::from_tag(&Table::Meta.tag()[..3]), None);
    }

    #[test]
    fn tags_and_names_are_distinct() {
        let tags: HashSet<[u8; 4]> = Table::ALL.iter().map(|t| t.tag()).collect();
        let names: HashSet<&str> = Table::ALL.iter().map(|t| t.name()).collect();
        assert_eq!(tags.len(), Table::ALL.len());
        assert_eq!(names.len(), Table::ALL.len());
    }

    /// The append-only tables sort outside the ranges of the rows rewritten beside them, so
    /// that LevelDB's tables of new rows do not span the old ones (see `Table::version`).
    #[test]
    fn append_only_rows_sort_outside_the_rewritten_ones() {
        // State database: headers below every account and the summary.
        assert!(header_key(u64::MAX)[..] < account_key(&[0; 32])[..]);
        assert!(header_key(u64::MAX)[..] < meta_key()[..]);
        // Raft log: the conf state and snapshot point above every entry and hard state row.
        assert!(raft_hard_state_at_key(u64::MAX)[..] < raft_conf_state_key()[..]);
        assert!(raft_hard_state_at_key(u64::MAX)[..] < raft_snapshot_key()[..]);
        assert!(raft_hard_state_at_key(u64::MAX)[..] < raft_address_book_key()[..]);
        assert!(raft_hard_state_at_key(u64::MAX)[..] < table_end(Table::RaftEntry)[..]);
    }

    #[test]
    fn height_keys_sort_in_height_order() {
        let heights = [0u64, 1, 2, 255, 256, 65_535, 65_536, u64::MAX / 2, u64::MAX];
        for w in heights.windows(2) {
            assert!(header_key(w[0]) < header_key(w[1]));
            // A hard state row sorts right after its entry, before the next one.
            assert!(raft_entry_key(w[0])[..] < raft_hard_state_at_key(w[0])[..]);
            if w[0] < u64::MAX / 2 {
                assert!(raft_hard_state_at_key(w[0])[..] < raft_entry_key(w[0] + 1)[..]);
            }
        }
        for w in heights.windows(2) {
            // Deadline first, then owner and id: the order expiries are taken in.
            assert!(expiry_key(w[0], &[9; 32], u128::MAX) < expiry_key(w[1], &[0; 32], 0));
        }
        let e = expiry_key(7, &[3; 32], 1 << 100);
        let decoded = expiry_key_decode(&e).unwrap();
        assert_eq!(
            (decoded.at_ms, decoded.owner, decoded.id),
            (7, [3; 32], 1 << 100)
        );
        assert_eq!(expiry_key_decode(&e[..59]), None);
        assert_eq!(expiry_key_decode(&reserve_key(&[3; 32], 1)), None);
        for h in heights {
            assert_eq!(header_key_height(&header_key(h)), Some(h));
            assert_eq!(raft_entry_key_index(&raft_entry_key(h)), Some(h));
        }
        for w in heights.windows(2) {
            assert!(raft_entry_key(w[0]) < raft_entry_key(w[1]));
        }
        assert_eq!(raft_entry_key_index(&header_key(1)), None);
        assert_eq!(raft_entry_key_index(&raft_entry_key(1)[..11]), None);
        assert_eq!(header_key_height(&account_key(&[1; 32])), None);
        assert_eq!(
            raft_hard_state_at_index(&raft_hard_state_at_key(7)),
            Some(7)
        );
        assert_eq!(raft_hard_state_at_index(&raft_entry_key(7)), None);
        assert_eq!(raft_entry_key_index(&raft_hard_state_at_key(7)), None);
        assert_eq!(header_key_height(&header_key(1)[..11]), None);
    }

    #[test]
    fn values_round_trip_and_wrong_lengths_are_corruption() {
        let r = RequestRecord {
            height: 7,
            index: 3,
            request_hash: [9; 32],
        };
        assert_eq!(decode_request(&encode_request(&r)).unwrap(), r);
        assert_eq!(decode_account(&encode_account(u64::MAX)).unwrap(), u64::MAX);
        for bad in [&[][..], &[0; 7], &[0; 9]] {
            let e = decode_account(bad).unwrap_err().to_string();
            assert!(e.contains("account/v1"), "{e}");
        }
        for bad in [&[][..], &[0; 43], &[0; 45]] {
            let e = decode_request(bad).unwrap_err().to_string();
            assert!(e.contains("request/v1"), "{e}");
        }
        for descriptor in [vec![], vec![1, 2, 3]] {
            let point = SnapshotPoint {
                index: 7,
                term: u64::MAX,
                descriptor,
            };
            assert_eq!(SnapshotPoint::decode(&point.encode()).unwrap(), point);
        }
        for bad in [&[][..], &[0; 15]] {
            let e = SnapshotPoint::decode(bad).unwrap_err().to_string();
            assert!(e.contains("raft_state/v2"), "{e}");
        }
        assert_eq!(decode_raft_last_index(&9u64.to_le_bytes()).unwrap(), 9);
        assert_eq!(
            decode_pending(&encode_pending(3, u64::MAX)).unwrap(),
            (3, u64::MAX)
        );
        for bad in [&[][..], &[0; 15], &[0; 17], &[0; 16]] {
            let e = decode_pending(bad).unwrap_err().to_string();
            assert!(e.contains("pending/v1"), "{e}");
        }
        assert_eq!(
            decode_reserve(&Reserve::Posted.encode()).unwrap(),
            Reserve::Posted
        );
        let e = decode_reserve(&[9]).unwrap_err().to_string();
        assert!(e.contains("reserve/v1"), "{e}");
        for bad in [&[][..], &[0; 7], &[0; 9]] {
            let e = decode_raft_last_index(bad).unwrap_err().to_string();
            assert!(e.contains("raft_state/v2"), "{e}");
        }
    }
}
