//! Account history and the receipt index in the archive database, written behind the
//! confirmation path by the archive thread in the same write as each batch's body and request
//! records (see `archive.rs`), and read on that thread too.
//!
//! Layout (`history` v2, `receipt` v1, see [`crate::layout`]):
//! - `history`: account ‖ row number u64 BE → [`encode_row`]: every entry of the account in one
//!   batch (row numbers 1, 2, ... in apply order, one per batch that touched the account), with
//!   the account's counters before them. The row itself is a record of the body log and the
//!   value its [`crate::bodies::Locator`] (24 bytes); rows written before that hold the row
//!   (always longer). Row 0 is the account's head ([`encode_head`]): how many rows it has, its
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

/// height u64 LE ‖ counters before (as in the head) ‖ entry count u32 LE ‖ per entry: leaf
/// index u32 LE ‖ op u8 ‖ direction u8 ‖ counterparty (32) ‖ amount u64 LE ‖ balance u64 LE ‖
/// request hash (32) ‖ receipt hash (32). The entries are of one account at one height, in
/// apply order.
pub fn encode_row(height: u64, before: &Counters, entries: &[AccountEntry]) -> Vec<u8> {
    assert!(
        !entries.is_empty(),
        "a history row holds at least one entry"
    );
    let mut out = Vec::with_capacity(ROW_PREFIX_BYTES + entries.len() * ENTRY_BYTES);
    out.extend_from_slice(&height.to_le_bytes());
    let mut counters = [0u8; 40];
    encode_counters(before, &mut counters);
    out.extend_from_slice(&counters);
    let count = u32::try_from(entries.len()).expect("a batch's entries fit u32");
    out.extend_from_slice(&count.to_le_bytes());
    for e in entries {
        assert_eq!(e.height, height, "a row's entries are of its height");
        out.extend_from_slice(&e.index.to_le_bytes());
        out.push(e.op as u8);
        out.push(e.direction as u8);
        out.extend_from_slice(&e.counterparty);
        out.extend_from_slice(&e.amount.to_le_bytes());
        out.extend_from_slice(&e.balance.to_le_bytes());
        out.extend_from_slice(&e.request_hash);
        out.extend_from_slice(&e.receipt_hash);
    }
    out
}

/// Decodes a row of `account`'s history into its entries, each with the counters after it.
pub fn decode_row(account: &PublicKey, value: &[u8]) -> Result<Vec<HistoryRow>> {
    let bad = |why: &str| corrupt(Table::History, why);
    if value.len() < ROW_PREFIX_BYTES || (value.len() - ROW_PREFIX_BYTES) % ENTRY_BYTES != 0 {
        return Err(bad("a history row of the wrong length"));
    }
    let height = u64::from_le_bytes(value[0..8].try_into().expect("8"));
    let mut counters = decode_counters(&value[8..48]);
    let count = u32::from_le_bytes(value[48..52].try_into().expect("4")) as usize;
    if count == 0 || count != (value.len() - ROW_PREFIX_BYTES) / ENTRY_BYTES {
        return Err(bad("a history row whose entry count is not its length"));
    }
    let mut rows = Vec::with_capacity(count);
    for v in value[ROW_PREFIX_BYTES..].chunks_exact(ENTRY_BYTES) {
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
    Ok(rows)
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
#[derive(Default)]
pub(crate) struct HistoryWriter {
    /// Accounts whose head changed since the last [`HistoryWriter::finish`].
    touched: HashMap<PublicKey, Head>,
    /// Heads already written (bounded by [`HEADS_CACHED_MAX`]).
    written: HashMap<PublicKey, Head>,
    /// The history start, to be put with the first rows (a new archive writes it then, so that
    /// an empty ledger dumps as no rows at all).
    held_from_unwritten: Option<u64>,
}

impl HistoryWriter {
    /// Puts the rows of `body` (through `out`), reading heads it does not know through `get`.
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
            let key = layout::history_key(&account, rows + 1);
            out.put_row(&key, &encode_row(height, &before, &entries))?;
            let counters = entries.iter().fold(before, |c, e| c.after(e));
            let head = Head {
                rows: rows + 1,
                counters,
                height,
            };
            self.touched.insert(account, head);
        }
        for (leaf, index) in leaves.iter().zip(0u32..) {
            out.put(&layout::receipt_key(leaf), &encode_receipt(height, index));
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

    /// Puts the head of every account touched since the last call (and the history start, the
    /// first time).
    pub(crate) fn finish(&mut self, out: &mut dyn Rows) {
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
    }

    /// Forgets what it remembers (after a write that failed, or rows written by someone else).
    pub(crate) fn forget(&mut self) {
        self.touched.clear();
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

/// The first row number in `1..=rows` whose height is not `before` the target, or `rows + 1`:
/// rows ascend by height, so `before` holds on a prefix.
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
    let first = first_not_before(account, head.rows, get, |h| h < from.0)?;
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
    let newest = row_at(account, after - 1, get)?.pop();
    Ok(Some(
        newest.expect("a decoded row holds at least one entry"),
    ))
}

/// Where the receipt with leaf hash `leaf` was applied.
pub(crate) fn receipt(leaf: &tally_wire::Hash, get: &mut Get<'_>) -> Result<Option<(u64, u32)>> {
    get(&layout::receipt_key(leaf))?
        .map(|v| decode_receipt(&v))
        .transpose()
}
