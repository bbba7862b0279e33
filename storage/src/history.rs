//! Account history and the receipt index in the archive database, written behind the
//! confirmation path by the archive thread in the same write as each batch's body and request
//! records (see `archive.rs`), and read on that thread too.
//!
//! Layout (`history` v2, `receipt` v1, see [`crate::layout`]):
//! - `history`: account ‖ row number u64 BE → a row (`encode_sub_row`): every entry of the
//!   account in one or more batches, as one sub-row per batch with the account's counters
//!   before it (row numbers 1, 2, ... in apply order; the archive thread puts one row per
//!   account and write group, see [`HistoryWriter`]). The row itself is a record of the body
//!   log and the value its [`crate::bodies::Locator`] (24 bytes); rows written before that hold
//!   the row (always longer). Row 0 is the account's head ([`encode_head`]): how many rows it has, its
//!   counters after the newest, and that row's height.
//! - `history` `b"held_from"` → u64 LE: the oldest height whose history the database holds (1
//!   for a ledger that applied or imported every batch; the archive point + 1 for a ledger
//!   written before history existed, or before `history` v2).
//! - `receipt`: receipt leaf hash → height u64 LE ‖ leaf index u32 LE.
//!
//! Why one row per account and batch rather than one per entry (v1): the archive's cost is the
//! rows that stay (every compaction rewrites them), not the bytes or the rows overwritten in
//! place like the heads. With envelopes of 8,189 transfers among 10,000 accounts v1 wrote
//! 16,378 entry rows per batch, v2 about 8,000 (and one for all of a hot account's entries).
//! For the same reason a row spans a write group, not a batch: when the archive is behind (at
//! saturation, and always with envelopes) a group holds many batches, and the locator rows it
//! writes go down by that factor. Readers never see row boundaries (they ask by height and
//! leaf index), so a row may hold any run of an account's batches.
//!
//! Why the rows live in the body log: account keys are random, so every level-0 merge of the
//! archive database rewrote all the rows below it; the rows were ~70% of its bytes. A row is
//! written once and never changes; in the body log it is never moved again, and the database
//! holds a locator at its key. Dumps carry the row itself.
//!
//! Why numbered rows rather than (height) in the key: finding an account's newest row or the
//! first at a height would take an iterator, and an iterator takes a LevelDB snapshot, after
//! which rusty-leveldb 4.0.2 keeps every overwritten row (see `ledger::reopen_fresh`). With
//! numbers every read is a point read: the head gives the count, a binary search over rows
//! 1..=count finds a height in log₂(count) reads.
//!
//! Consistency: reads run on the archive thread, behind every write queued before them, so they
//! see every batch the ledger had applied when the read was asked (the storage thread applies
//! and asks).

use std::collections::HashMap;

use tally_core::batch::BatchBody;
use tally_core::history::{
    account_entries_with, AccountEntry, Counters, Direction, HistoryPage, HistoryRow,
};
use tally_core::Result;
use tally_wire::{Op, PublicKey};

use crate::layout::{self, corrupt, fixed, Table};

/// The bytes of one entry in a stored row.
pub const ENTRY_BYTES: usize = 4 + 1 + 1 + 32 + 8 + 8 + 32 + 32;
/// The bytes of a row before its entries: height, counters before, entry count.
pub const ROW_PREFIX_BYTES: usize = 8 + 16 + 16 + 8 + 4;
/// The bytes of an account's head row.
pub const HEAD_BYTES: usize = 8 + 16 + 16 + 8 + 8;
/// The bytes of a receipt index value.
pub const RECEIPT_VALUE_BYTES: usize = 8 + 4;
/// Heads the archive thread keeps in memory between writes, at most (then it forgets them all
/// and reads them again).
const HEADS_CACHED_MAX: usize = 65_536;
/// The bytes of the rows a [`HistoryWriter`] gathers before it puts them all, at most (plus
/// one batch's).
const PENDING_BYTES_MAX: usize = 32 << 20;
/// The bytes of one gathered row before it is put, at most (plus one batch's entries of the
/// account): a read of any entry reads its whole row.
const ROW_BYTES_MAX: usize = 256 << 10;

/// A point read of the archive database, a history row resolved through the body log.
pub(crate) type Get<'a> = dyn FnMut(&[u8]) -> Result<Option<Vec<u8>>> + 'a;

/// Where the writer's rows go.
pub(crate) trait Rows {
    /// A history row: into the body log, its locator under `key` (the archive thread).
    fn put_row(&mut self, key: &[u8], row: &[u8]) -> Result<()>;
    /// Any other row (heads, receipts, the history start).
    fn put(&mut self, key: &[u8], value: &[u8]);
}

/// Rows kept as they are, history rows inline (an import's: the database it builds has no
/// body log of its own yet, and reads take either form).
impl Rows for Vec<(Vec<u8>, Vec<u8>)> {
    fn put_row(&mut self, key: &[u8], row: &[u8]) -> Result<()> {
        self.put(key, row);
        Ok(())
    }

    fn put(&mut self, key: &[u8], value: &[u8]) {
        self.push((key.to_vec(), value.to_vec()));
    }
}

/// An account's newest state in history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// How many rows the account has (its newest is row `rows`).
    pub rows: u64,
    /// Counters after the newest row.
    pub counters: Counters,
    /// The newest row's height.
    pub height: u64,
}

/// rows u64 LE ‖ total debited u128 LE ‖ total credited u128 LE ‖ operation count u64 LE ‖
/// height u64 LE
pub fn encode_head(head: &Head) -> [u8; HEAD_BYTES] {
    let mut out = [0u8; HEAD_BYTES];
    out[0..8].copy_from_slice(&head.rows.to_le_bytes());
    encode_counters(&head.counters, &mut out[8..48]);
    out[48..56].copy_from_slice(&head.height.to_le_bytes());
    out
}

pub fn decode_head(value: &[u8]) -> Result<Head> {
    let v: [u8; HEAD_BYTES] = fixed(Table::History, value)?;
    let head = Head {
        rows: u64::from_le_bytes(v[0..8].try_into().expect("8")),
        counters: decode_counters(&v[8..48]),
        height: u64::from_le_bytes(v[48..56].try_into().expect("8")),
    };
    if head.rows == 0 || head.counters.operation_count < head.rows {
        return Err(corrupt(
            Table::History,
            "a head with fewer entries than rows",
        ));
    }
    Ok(head)
}

fn encode_counters(c: &Counters, out: &mut [u8]) {
    out[0..16].copy_from_slice(&c.total_debited.to_le_bytes());
    out[16..32].copy_from_slice(&c.total_credited.to_le_bytes());
    out[32..40].copy_from_slice(&c.operation_count.to_le_bytes());
}

fn decode_counters(v: &[u8]) -> Counters {
    Counters {
        total_debited: u128::from_le_bytes(v[0..16].try_into().expect("16")),
        total_credited: u128::from_le_bytes(v[16..32].try_into().expect("16")),
        operation_count: u64::from_le_bytes(v[32..40].try_into().expect("8")),
    }
}

/// Appends a sub-row to the row `out`. A row is one or more sub-rows in ascending height, each:
/// height u64 LE ‖ counters before (as in the head) ‖ entry count u32 LE ‖ per entry: leaf
/// index u32 LE ‖ op u8 ‖ direction u8 ‖ counterparty (32) ‖ amount u64 LE ‖ balance u64 LE ‖
/// request hash (32) ‖ receipt hash (32). A sub-row's entries are of one account at one
/// height, in apply order. (Rows written before 2026-12-05 are one sub-row each.)
fn encode_sub_row(out: &mut Vec<u8>, height: u64, before: &Counters, entries: &[AccountEntry]) {
    assert!(
        !entries.is_empty(),
        "a history row holds at least one entry"
    );
    out.reserve(ROW_PREFIX_BYTES + entries.len() * ENTRY_BYTES);
    out.extend_from_slice(&height.to_le_bytes());
    let mut counters = [0u8; 40];
    encode_counters(before, &mut counters);
    out.extend_from_slice(&counters);
    let count = u32::try_from(entries.len()).expect("a batch's entries fit u32");
    out.extend_from_slice(&count.to_le_bytes());
    for e in entries {
        assert_eq!(e.height, height, "a sub-row's entries are of its height");
        out.extend_from_slice(&e.index.to_le_bytes());
        out.push(e.op as u8);
        out.push(e.direction as u8);
        out.extend_from_slice(&e.counterparty);
        out.extend_from_slice(&e.amount.to_le_bytes());
        out.extend_from_slice(&e.balance.to_le_bytes());
        out.extend_from_slice(&e.request_hash);
        out.extend_from_slice(&e.receipt_hash);
    }
}

/// Decodes a row of `account`'s history into its entries, each with the counters after it.
/// Sub-rows must ascend by height and each go on from the counters the one before ended at.
pub fn decode_row(account: &PublicKey, value: &[u8]) -> Result<Vec<HistoryRow>> {
    let bad = |why: &str| corrupt(Table::History, why);
    let mut rows: Vec<HistoryRow> = Vec::new();
    let mut rest = value;
    while !rest.is_empty() {
        let (sub, after) = decode_sub_row(account, rest)?;
        if let (Some(last), Some(first)) = (rows.last(), sub.first()) {
            if first.entry.height <= last.entry.height
                || last.counters.after(&first.entry) != first.counters
            {
                return Err(bad("a history row whose sub-rows do not follow each other"));
            }
        }
        rows.extend(sub);
        rest = after;
    }
    if rows.is_empty() {
        return Err(bad("an empty history row"));
    }
    Ok(rows)
}

/// Decodes the sub-row at the start of `value`; returns its entries and what follows it.
fn decode_sub_row<'v>(account: &PublicKey, value: &'v [u8]) -> Result<(Vec<HistoryRow>, &'v [u8])> {
    let bad = |why: &str| corrupt(Table::History, why);
    if value.len() < ROW_PREFIX_BYTES {
        return Err(bad("a history row of the wrong length"));
    }
    let height = u64::from_le_bytes(value[0..8].try_into().expect("8"));
    let mut counters = decode_counters(&value[8..48]);
    let count = u32::from_le_bytes(value[48..52].try_into().expect("4")) as usize;
    let end = count
        .checked_mul(ENTRY_BYTES)
        .and_then(|n| n.checked_add(ROW_PREFIX_BYTES))
        .filter(|&end| count > 0 && end <= value.len())
        .ok_or_else(|| bad("a history row whose entry count is not its length"))?;
    let mut rows = Vec::with_capacity(count);
    for v in value[ROW_PREFIX_BYTES..end].chunks_exact(ENTRY_BYTES) {
        let u64_at = |at: usize| u64::from_le_bytes(v[at..at + 8].try_into().expect("8"));
        let entry = AccountEntry {
            account: *account,
            height,
            index: u32::from_le_bytes(v[0..4].try_into().expect("4")),
            op: Op::from_u8(v[4]).ok_or_else(|| bad("unknown op kind"))?,
            direction: Direction::from_u8(v[5]).ok_or_else(|| bad("unknown direction"))?,
            counterparty: v[6..38].try_into().expect("32"),
            amount: u64_at(38),
            balance: u64_at(46),
            request_hash: v[54..86].try_into().expect("32"),
            receipt_hash: v[86..118].try_into().expect("32"),
        };
        counters = counters.after(&entry);
        rows.push(HistoryRow { entry, counters });
    }
    Ok((rows, &value[end..]))
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

/// Derives the history and receipt rows of batches in apply order. The counters of an account
/// come from its head: one changed earlier in the same group, one remembered from an earlier
/// group, or the stored one.
///
/// An account's row covers every batch of a group that touched it, not one batch: its entries
/// are gathered across the group (`pending`) and put at [`HistoryWriter::finish`], or sooner
/// when the gathered rows pass [`PENDING_BYTES_MAX`] or one row [`ROW_BYTES_MAX`]. Row
/// boundaries therefore depend on how batches were grouped, which no reader sees: reads answer
/// by (height, index), and every row is its sub-rows in height order.
#[derive(Default)]
pub(crate) struct HistoryWriter {
    /// Accounts whose head changed since the last [`HistoryWriter::finish`].
    touched: HashMap<PublicKey, Head>,
    /// Rows being gathered, each numbered by its account's head in `touched` (`rows`).
    pending: HashMap<PublicKey, Vec<u8>>,
    /// The bytes of `pending`'s rows.
    pending_bytes: usize,
    /// Heads already written (bounded by [`HEADS_CACHED_MAX`]).
    written: HashMap<PublicKey, Head>,
    /// The history start, to be put with the first rows (a new archive writes it then, so that
    /// an empty ledger dumps as no rows at all).
    held_from_unwritten: Option<u64>,
}

impl HistoryWriter {
    /// Gathers the rows of `body` (put through `out` when a bound is reached, else at
    /// [`HistoryWriter::finish`]), reading heads it does not know through `get`.
    /// `leaves`: the body's receipt leaf hashes (`BatchBody::leaf_hashes`).
    pub(crate) fn batch(
        &mut self,
        body: &BatchBody,
        leaves: &[tally_wire::Hash],
        get: &mut Get<'_>,
        out: &mut dyn Rows,
    ) -> Result<()> {
        let height = body.header.height;
        for (account, entries) in by_account(account_entries_with(body, leaves)) {
            let head = self.newest(&account, get)?;
            let (rows, before) = head.map_or((0, Counters::default()), |h| (h.rows, h.counters));
            let rows = if self.pending.contains_key(&account) {
                rows
            } else {
                rows + 1
            };
            let row = self.pending.entry(account).or_default();
            let was = row.len();
            encode_sub_row(row, height, &before, &entries);
            self.pending_bytes += row.len() - was;
            let full = row.len() >= ROW_BYTES_MAX;
            let counters = entries.iter().fold(before, |c, e| c.after(e));
            let head = Head {
                rows,
                counters,
                height,
            };
            self.touched.insert(account, head);
            if full {
                self.put_row(&account, out)?;
            }
        }
        if self.pending_bytes >= PENDING_BYTES_MAX {
            self.put_rows(out)?;
        }
        for (leaf, index) in leaves.iter().zip(0u32..) {
            out.put(&layout::receipt_key(leaf), &encode_receipt(height, index));
        }
        Ok(())
    }

    /// Puts `account`'s gathered row, numbered as its head says.
    fn put_row(&mut self, account: &PublicKey, out: &mut dyn Rows) -> Result<()> {
        let row = self.pending.remove(account).expect("a gathered row");
        let head = self
            .touched
            .get(account)
            .expect("a gathered row's account is touched");
        self.pending_bytes -= row.len();
        out.put_row(&layout::history_key(account, head.rows), &row)
    }

    /// Puts every gathered row.
    fn put_rows(&mut self, out: &mut dyn Rows) -> Result<()> {
        for (account, row) in self.pending.drain() {
            let head = self
                .touched
                .get(&account)
                .expect("a gathered row's account is touched");
            out.put_row(&layout::history_key(&account, head.rows), &row)?;
        }
        self.pending_bytes = 0;
        Ok(())
    }

    /// A writer that puts the history start `held_from` with the first rows.
    pub(crate) fn starting_at(held_from: u64) -> HistoryWriter {
        HistoryWriter {
            held_from_unwritten: Some(held_from),
            ..HistoryWriter::default()
        }
    }

    /// Puts every gathered row and the head of every account touched since the last call (and
    /// the history start, the first time).
    pub(crate) fn finish(&mut self, out: &mut dyn Rows) -> Result<()> {
        self.put_rows(out)?;
        if let Some(held_from) = self.held_from_unwritten.take() {
            out.put(&layout::history_held_from_key(), &held_from.to_le_bytes());
        }
        if self.written.len() + self.touched.len() > HEADS_CACHED_MAX {
            self.written.clear();
        }
        for (account, head) in self.touched.drain() {
            out.put(&layout::history_key(&account, 0), &encode_head(&head));
            self.written.insert(account, head);
        }
        Ok(())
    }

    /// Forgets what it remembers and what it gathered (after a write that failed, or rows
    /// written by someone else).
    pub(crate) fn forget(&mut self) {
        self.touched.clear();
        self.pending.clear();
        self.pending_bytes = 0;
        self.written.clear();
    }

    pub(crate) fn touched(&self) -> usize {
        self.touched.len()
    }

    fn newest(&self, account: &PublicKey, get: &mut Get<'_>) -> Result<Option<Head>> {
        if let Some(head) = self.touched.get(account).or(self.written.get(account)) {
            return Ok(Some(*head));
        }
        head(account, get)
    }
}

/// `entries` grouped by account, each group in apply order, the groups in order of first entry.
fn by_account(entries: Vec<AccountEntry>) -> Vec<(PublicKey, Vec<AccountEntry>)> {
    let mut at: HashMap<PublicKey, usize> = HashMap::new();
    let mut groups: Vec<(PublicKey, Vec<AccountEntry>)> = Vec::new();
    for e in entries {
        let i = *at.entry(e.account).or_insert_with(|| {
            groups.push((e.account, Vec::new()));
            groups.len() - 1
        });
        groups[i].1.push(e);
    }
    groups
}

/// The head of `account`, if it has any history.
pub(crate) fn head(account: &PublicKey, get: &mut Get<'_>) -> Result<Option<Head>> {
    get(&layout::history_key(account, 0))?
        .map(|v| decode_head(&v))
        .transpose()
}

/// Row `number` of `account` (which must exist: 1..=rows of its head), as entries with the
/// counters after each.
fn row_at(account: &PublicKey, number: u64, get: &mut Get<'_>) -> Result<Vec<HistoryRow>> {
    let missing = || {
        corrupt(
            Table::History,
            format_args!("row {number} of an account is missing below its head's count"),
        )
    };
    let value = get(&layout::history_key(account, number))?.ok_or_else(missing)?;
    decode_row(account, &value)
}

/// The first row number in `1..=rows` whose first height is not `before` the target, or
/// `rows + 1`: rows ascend by height, so `before` holds on a prefix.
fn first_not_before(
    account: &PublicKey,
    rows: u64,
    get: &mut Get<'_>,
    before: impl Fn(u64) -> bool,
) -> Result<u64> {
    let (mut low, mut high) = (1, rows + 1);
    while low < high {
        let mid = low + (high - low) / 2;
        let height = row_at(account, mid, get)?[0].entry.height;
        if before(height) {
            low = mid + 1;
        } else {
            high = mid;
        }
    }
    Ok(low)
}

/// Up to `limit` entries of `account` from `(height, index)` on, and where the next page starts.
pub(crate) fn page(
    account: &PublicKey,
    from: (u64, u32),
    limit: usize,
    get: &mut Get<'_>,
) -> Result<HistoryPage> {
    let Some(head) = head(account, get)? else {
        return Ok(HistoryPage::default());
    };
    // The row before the first that starts at or after `from`'s height may run past it.
    let first = first_not_before(account, head.rows, get, |h| h < from.0)?.max(2) - 1;
    let mut out = Vec::new();
    for number in first..=head.rows {
        for row in row_at(account, number, get)? {
            let at = (row.entry.height, row.entry.index);
            if at < from {
                continue;
            }
            if out.len() == limit {
                return Ok(HistoryPage {
                    rows: out,
                    next: Some(at),
                });
            }
            out.push(row);
        }
    }
    Ok(HistoryPage {
        rows: out,
        next: None,
    })
}

/// The newest entry of `account` at or below `height`, with the counters after it.
pub(crate) fn at_height(
    account: &PublicKey,
    height: u64,
    get: &mut Get<'_>,
) -> Result<Option<HistoryRow>> {
    let Some(head) = head(account, get)? else {
        return Ok(None);
    };
    let after = if head.height <= height {
        head.rows + 1
    } else {
        first_not_before(account, head.rows, get, |h| h <= height)?
    };
    if after == 1 {
        return Ok(None);
    }
    // The row starts at or below `height` and may run past it.
    let newest = row_at(account, after - 1, get)?
        .into_iter()
        .rev()
        .find(|r| r.entry.height <= height);
    Ok(Some(newest.expect(
        "a row found by its first height holds an entry at or below it",
    )))
}

/// Where the receipt with leaf hash `leaf` was applied.
pub(crate) fn receipt(leaf: &tally_wire::Hash, get: &mut Get<'_>) -> Result<Option<(u64, u32)>> {
    get(&layout::receipt_key(leaf))?
        .map(|v| decode_receipt(&v))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(height: u64, index: u32, amount: u64) -> AccountEntry {
        AccountEntry {
            account: [1; 32],
            height,
            index,
            op: Op::Transfer,
            direction: Direction::Credit,
            counterparty: [2; 32],
            amount,
            balance: amount,
            request_hash: [3; 32],
            receipt_hash: [4; 32],
        }
    }

    fn sub_row(out: &mut Vec<u8>, before: Counters, entries: &[AccountEntry]) -> Counters {
        encode_sub_row(out, entries[0].height, &before, entries);
        entries.iter().fold(before, |c, e| c.after(e))
    }

    #[test]
    fn a_row_of_sub_rows_decodes_as_their_entries_in_order() {
        let (a, b) = ([entry(3, 0, 5), entry(3, 7, 6)], [entry(9, 2, 7)]);
        let mut row = Vec::new();
        let after_a = sub_row(&mut row, Counters::default(), &a);
        let after_b = sub_row(&mut row, after_a, &b);
        let rows = decode_row(&[1; 32], &row).unwrap();
        let entries: Vec<_> = rows.iter().map(|r| r.entry).collect();
        assert_eq!(entries, [a[0], a[1], b[0]]);
        assert_eq!(rows[1].counters, after_a);
        assert_eq!(rows[2].counters, after_b);
        assert_eq!(after_b.operation_count, 3);
    }

    #[test]
    fn sub_rows_that_do_not_follow_each_other_are_refused() {
        let (a, b) = ([entry(3, 0, 5)], [entry(9, 2, 7)]);
        let decodes = |row: &[u8]| decode_row(&[1; 32], row).is_ok();
        // Heights going down.
        let mut row = Vec::new();
        let after_b = sub_row(&mut row, Counters::default(), &b);
        sub_row(&mut row, after_b, &a);
        assert!(!decodes(&row));
        // Counters that do not go on from the sub-row before.
        let mut row = Vec::new();
        sub_row(&mut row, Counters::default(), &a);
        sub_row(&mut row, Counters::default(), &b);
        assert!(!decodes(&row));
        // A sub-row cut short, and an empty row.
        let mut row = Vec::new();
        let after_a = sub_row(&mut row, Counters::default(), &a);
        sub_row(&mut row, after_a, &b);
        assert!(decodes(&row));
        assert!(!decodes(&row[..row.len() - 1]));
        assert!(!decodes(&row[..ROW_PREFIX_BYTES + ENTRY_BYTES + 3]));
        assert!(!decodes(&[]));
    }
}
