//! Account history and the receipt index in the archive database, written behind the
//! confirmation path by the archive thread in the same write as each batch's body and request
//! records (see `archive.rs`), and read on that thread too.
//!
//! Layout (`history` v1, `receipt` v1, see [`crate::layout`]):
//! - `history`: account ‖ sequence u64 BE → [`HistoryRow`] ([`HISTORY_ROW_BYTES`]): the
//!   account's rows are numbered 1, 2, ... in apply order (height, then leaf index), and
//!   sequence 0 holds a copy of the newest, whose counters are the account's totals.
//! - `history` `b"held_from"` → u64 LE: the oldest height whose history the database holds (1
//!   for a ledger that applied or imported every batch; the archive point + 1 for a ledger
//!   written before history existed). Counters count from that height.
//! - `receipt`: receipt leaf hash → height u64 LE ‖ leaf index u32 LE.
//!
//! Why a sequence number rather than (height, leaf index) in the key: finding an account's
//! newest row or the first at a height would take an iterator, and an iterator takes a LevelDB
//! snapshot, after which rusty-leveldb 4.0.2 keeps every overwritten row (see
//! `ledger::reopen_fresh`). With sequence numbers every read is a point read: the head row
//! gives the count, a binary search over rows 1..=count finds a height in log₂(count) reads.
//!
//! Consistency: reads run on the archive thread, behind every write queued before them, so they
//! see every batch the ledger had applied when the read was asked (the storage thread applies
//! and asks).

use std::collections::HashMap;

use tally_core::batch::BatchBody;
use tally_core::history::{
    account_entries, receipt_leaves, AccountEntry, Counters, Direction, HistoryPage, HistoryRow,
};
use tally_core::Result;
use tally_wire::{Op, PublicKey};

use crate::layout::{self, corrupt, fixed, Table};

/// The bytes of a stored history row.
pub const HISTORY_ROW_BYTES: usize = 8 + 4 + 1 + 1 + 32 + 8 + 8 + 32 + 32 + 16 + 16 + 8;
/// The bytes of a receipt index value.
pub const RECEIPT_VALUE_BYTES: usize = 8 + 4;
/// Newest rows the archive thread keeps in memory between writes, at most (then it forgets
/// them all and reads them again).
const HEADS_CACHED_MAX: usize = 65_536;

/// A point read of the archive database.
pub(crate) type Get<'a> = dyn FnMut(&[u8]) -> Result<Option<Vec<u8>>> + 'a;

/// height u64 LE ‖ index u32 LE ‖ op u8 ‖ direction u8 ‖ counterparty (32) ‖ amount u64 LE ‖
/// balance u64 LE ‖ request hash (32) ‖ receipt hash (32) ‖ total debited u128 LE ‖ total
/// credited u128 LE ‖ operation count u64 LE (the row's sequence number)
pub fn encode_history_row(row: &HistoryRow) -> [u8; HISTORY_ROW_BYTES] {
    let (e, c) = (&row.entry, &row.counters);
    let mut out = Vec::with_capacity(HISTORY_ROW_BYTES);
    out.extend_from_slice(&e.height.to_le_bytes());
    out.extend_from_slice(&e.index.to_le_bytes());
    out.push(e.op as u8);
    out.push(e.direction as u8);
    out.extend_from_slice(&e.counterparty);
    out.extend_from_slice(&e.amount.to_le_bytes());
    out.extend_from_slice(&e.balance.to_le_bytes());
    out.extend_from_slice(&e.request_hash);
    out.extend_from_slice(&e.receipt_hash);
    out.extend_from_slice(&c.total_debited.to_le_bytes());
    out.extend_from_slice(&c.total_credited.to_le_bytes());
    out.extend_from_slice(&c.operation_count.to_le_bytes());
    out.try_into().expect("a history row has its fixed size")
}

/// Decodes a row of `account`'s history.
pub fn decode_history_row(account: &PublicKey, value: &[u8]) -> Result<HistoryRow> {
    let v: [u8; HISTORY_ROW_BYTES] = fixed(Table::History, value)?;
    let u64_at = |at: usize| u64::from_le_bytes(v[at..at + 8].try_into().expect("8"));
    let u128_at = |at: usize| u128::from_le_bytes(v[at..at + 16].try_into().expect("16"));
    let op = Op::from_u8(v[12]).ok_or_else(|| corrupt(Table::History, "unknown op kind"))?;
    let direction =
        Direction::from_u8(v[13]).ok_or_else(|| corrupt(Table::History, "unknown direction"))?;
    Ok(HistoryRow {
        entry: AccountEntry {
            account: *account,
            height: u64_at(0),
            index: u32::from_le_bytes(v[8..12].try_into().expect("4")),
            op,
            direction,
            counterparty: v[14..46].try_into().expect("32"),
            amount: u64_at(46),
            balance: u64_at(54),
            request_hash: v[62..94].try_into().expect("32"),
            receipt_hash: v[94..126].try_into().expect("32"),
        },
        counters: Counters {
            total_debited: u128_at(126),
            total_credited: u128_at(142),
            operation_count: u64_at(158),
        },
    })
}

/// height u64 LE ‖ leaf index u32 LE
pub fn encode_receipt(height: u64, index: u32) -> [u8; RECEIPT_VALUE_BYTES] {
    let mut out = [0; RECEIPT_VALUE_BYTES];
    out[..8].copy_from_slice(&height.to_le_bytes());
    out[8..].copy_from_slice(&index.to_le_bytes());
    out
}

pub fn decode_receipt(value: &[u8]) -> Result<(u64, u32)> {
    let v: [u8; RECEIPT_VALUE_BYTES] = fixed(Table::Receipt, value)?;
    Ok((
        u64::from_le_bytes(v[..8].try_into().expect("8")),
        u32::from_le_bytes(v[8..].try_into().expect("4")),
    ))
}

pub fn decode_held_from(value: &[u8]) -> Result<u64> {
    Ok(u64::from_le_bytes(fixed(Table::History, value)?))
}

/// Derives the history and receipt rows of batches in apply order. The running counters of an
/// account come from its newest row: one written earlier in the same group, one remembered from
/// an earlier group, or the stored head.
#[derive(Default)]
pub(crate) struct HistoryWriter {
    /// Accounts whose newest row changed since the last [`HistoryWriter::finish`].
    touched: HashMap<PublicKey, HistoryRow>,
    /// Newest rows already written (bounded by [`HEADS_CACHED_MAX`]).
    written: HashMap<PublicKey, HistoryRow>,
    /// The history start, to be put with the first rows (a new archive writes it then, so that
    /// an empty ledger dumps as no rows at all).
    held_from_unwritten: Option<u64>,
}

impl HistoryWriter {
    /// Puts the rows of `body` (through `put`), reading heads it does not know through `get`.
    pub(crate) fn batch(
        &mut self,
        body: &BatchBody,
        get: &mut Get<'_>,
        put: &mut dyn FnMut(&[u8], &[u8]),
    ) -> Result<()> {
        let height = body.header.height;
        for entry in account_entries(body) {
            let before = self.newest(&entry.account, get)?;
            let counters = before.map_or(Counters::default(), |r| r.counters);
            let row = HistoryRow {
                counters: counters.after(&entry),
                entry,
            };
            let key = layout::history_key(&entry.account, row.counters.operation_count);
            put(&key, &encode_history_row(&row));
            self.touched.insert(entry.account, row);
        }
        for (leaf, index) in receipt_leaves(body) {
            put(&layout::receipt_key(&leaf), &encode_receipt(height, index));
        }
        Ok(())
    }

    /// A writer that puts the history start `held_from` with the first rows.
    pub(crate) fn starting_at(held_from: u64) -> HistoryWriter {
        HistoryWriter {
            held_from_unwritten: Some(held_from),
            ..HistoryWriter::default()
        }
    }

    /// Puts the head row of every account touched since the last call (and the history start,
    /// the first time).
    pub(crate) fn finish(&mut self, put: &mut dyn FnMut(&[u8], &[u8])) {
        if let Some(held_from) = self.held_from_unwritten.take() {
            put(&layout::history_held_from_key(), &held_from.to_le_bytes());
        }
        if self.written.len() + self.touched.len() > HEADS_CACHED_MAX {
            self.written.clear();
        }
        for (account, row) in self.touched.drain() {
            put(&layout::history_key(&account, 0), &encode_history_row(&row));
            self.written.insert(account, row);
        }
    }

    /// Forgets what it remembers (after a write that failed, or rows written by someone else).
    pub(crate) fn forget(&mut self) {
        self.touched.clear();
        self.written.clear();
    }

    pub(crate) fn touched(&self) -> usize {
        self.touched.len()
    }

    fn newest(&self, account: &PublicKey, get: &mut Get<'_>) -> Result<Option<HistoryRow>> {
        if let Some(row) = self.touched.get(account).or(self.written.get(account)) {
            return Ok(Some(*row));
        }
        head(account, get)
    }
}

/// The newest row of `account`, if it has any.
pub(crate) fn head(account: &PublicKey, get: &mut Get<'_>) -> Result<Option<HistoryRow>> {
    row(account, 0, get)
}

fn row(account: &PublicKey, sequence: u64, get: &mut Get<'_>) -> Result<Option<HistoryRow>> {
    get(&layout::history_key(account, sequence))?
        .map(|v| decode_history_row(account, &v))
        .transpose()
}

/// Row `sequence` of `account`, which must exist (1..=count of its head).
fn row_at(account: &PublicKey, sequence: u64, get: &mut Get<'_>) -> Result<HistoryRow> {
    let found = row(account, sequence, get)?.ok_or_else(|| {
        corrupt(
            Table::History,
            format_args!("row {sequence} of an account is missing below its head's count"),
        )
    })?;
    if found.counters.operation_count != sequence {
        return Err(corrupt(
            Table::History,
            format_args!(
                "row {sequence} says it is row {}",
                found.counters.operation_count
            ),
        ));
    }
    Ok(found)
}

/// The first sequence number in `1..=count` whose row is not `before` the target, or
/// `count + 1`: rows ascend by (height, index), so `before` holds on a prefix.
fn first_not_before(
    account: &PublicKey,
    count: u64,
    get: &mut Get<'_>,
    before: impl Fn(&HistoryRow) -> bool,
) -> Result<u64> {
    let (mut low, mut high) = (1, count + 1);
    while low < high {
        let mid = low + (high - low) / 2;
        if before(&row_at(account, mid, get)?) {
            low = mid + 1;
        } else {
            high = mid;
        }
    }
    Ok(low)
}

/// Up to `limit` rows of `account` from `(height, index)` on, and where the next page starts.
pub(crate) fn page(
    account: &PublicKey,
    from: (u64, u32),
    limit: usize,
    get: &mut Get<'_>,
) -> Result<HistoryPage> {
    let Some(newest) = head(account, get)? else {
        return Ok(HistoryPage::default());
    };
    let count = newest.counters.operation_count;
    let first = first_not_before(account, count, get, |r| {
        (r.entry.height, r.entry.index) < from
    })?;
    let end = first.saturating_add(limit as u64).min(count + 1);
    let mut rows = Vec::with_capacity((end - first) as usize);
    for sequence in first..end {
        rows.push(row_at(account, sequence, get)?);
    }
    let next = if end <= count {
        let r = row_at(account, end, get)?;
        Some((r.entry.height, r.entry.index))
    } else {
        None
    };
    Ok(HistoryPage { rows, next })
}

/// The newest row of `account` at or below `height`.
pub(crate) fn at_height(
    account: &PublicKey,
    height: u64,
    get: &mut Get<'_>,
) -> Result<Option<HistoryRow>> {
    let Some(newest) = head(account, get)? else {
        return Ok(None);
    };
    if newest.entry.height <= height {
        return Ok(Some(newest));
    }
    let count = newest.counters.operation_count;
    let after = first_not_before(account, count, get, |r| r.entry.height <= height)?;
    if after == 1 {
        return Ok(None);
    }
    row_at(account, after - 1, get).map(Some)
}

/// Where the receipt with leaf hash `leaf` was applied.
pub(crate) fn receipt(leaf: &tally_wire::Hash, get: &mut Get<'_>) -> Result<Option<(u64, u32)>> {
    get(&layout::receipt_key(leaf))?
        .map(|v| decode_receipt(&v))
        .transpose()
}
