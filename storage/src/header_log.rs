//! The header log's nodes in the state database (PROTOCOL.md §4.12): row `header_log_key(h)`
//! holds the nodes appending header `h` completes, level 0 (its leaf hash) first,
//! `tlog::nodes_completed(h)` hashes of 32 bytes. Node `(level, index)` is hash `level` of the
//! row at `tlog::completed_at(level, index)`: a root or proof reads O(log n) rows.
//!
//! The rows are derived from the headers: written with each header in `LedgerDb::apply`, left
//! out of dumps, and rebuilt at open from the header rows for every height that lacks them (a
//! ledger from before this table, an installed or imported one). They always cover a prefix
//! of the heights: writes are in height order and LevelDB loses only a suffix of its log.

use rusty_leveldb::{WriteBatch, DB};
use tally_core::tlog::{completed_at, leaf_hash, nodes_completed, TreeEdge};
use tally_core::{Error, Result};
use tally_wire::{Hash, SignedHeader};

use crate::layout::{self, corrupt, Table};
use crate::ledger::{decode_header, io_error};

/// Heights one write of [`catch_up`] covers, at most.
const CATCH_UP_GROUP: u64 = 4096;

/// Appends `header` to `edge` and puts the row of the nodes it completes into `rows`.
pub(crate) fn append(edge: &mut TreeEdge, header: &SignedHeader, rows: &mut WriteBatch) {
    let height = header.header.height;
    assert_eq!(
        height,
        edge.size() + 1,
        "the header log grows by one height"
    );
    let completed = edge.append(leaf_hash(&header.encode()));
    rows.put(&layout::header_log_key(height), &completed.concat());
}

/// Node `(level, index)`, read with `get` from a ledger whose log covers `height`.
pub(crate) fn node(
    level: u8,
    index: u64,
    height: u64,
    get: &mut impl FnMut(&[u8]) -> Result<Option<Vec<u8>>>,
) -> Result<Hash> {
    let at = completed_at(level, index);
    if level >= 64 || at > height {
        return Err(Error::missing(format_args!(
            "header log node ({level}, {index}) beyond height {height}"
        )));
    }
    let row = get(&layout::header_log_key(at))?
        .ok_or_else(|| Error::missing(format_args!("header log row {at}")))?;
    let start = level as usize * 32;
    if row.len() != nodes_completed(at) * 32 {
        return Err(corrupt(
            Table::Header,
            format_args!("header log row {at} holds {} bytes", row.len()),
        ));
    }
    Ok(row[start..start + 32].try_into().expect("32 bytes"))
}

/// The highest height at or below `height` whose header row is signed; the ones above it
/// wait for their signatures (a threshold operator's, `LedgerStore::sign_header`). Headers
/// are signed in height order, so the signed ones are a prefix.
pub(crate) fn signed_prefix(
    db: &mut DB,
    height: u64,
    get: &mut impl FnMut(&mut DB, &[u8]) -> Result<Option<Vec<u8>>>,
) -> Result<u64> {
    let mut h = height;
    while h > 0 {
        let value = get(db, &layout::header_key(h))?
            .ok_or_else(|| corrupt(Table::Header, format_args!("no header at {h}")))?;
        if decode_header(h, &value)?.signature != tally_core::batch::UNSIGNED {
            break;
        }
        h -= 1;
    }
    Ok(h)
}

/// Loads the log's edge at `height`, first writing the rows of every height that lacks them.
pub(crate) fn catch_up(
    db: &mut DB,
    height: u64,
    get: &mut impl FnMut(&mut DB, &[u8]) -> Result<Option<Vec<u8>>>,
) -> Result<TreeEdge> {
    let held = held_prefix(db, height, get)?;
    let mut edge = TreeEdge::load(held, &mut |level, index| {
        node(level, index, held, &mut |k| get(db, k))
    })?;
    while edge.size() < height {
        let mut rows = WriteBatch::default();
        let end = height.min(edge.size() + CATCH_UP_GROUP);
        for h in edge.size() + 1..=end {
            let value = get(db, &layout::header_key(h))?
                .ok_or_else(|| corrupt(Table::Header, format_args!("no header at {h}")))?;
            append(&mut edge, &decode_header(h, &value)?, &mut rows);
        }
        db.write(rows, end == height)
            .map_err(|e| io_error("writing header log rows", e))?;
    }
    Ok(edge)
}

/// The heights `1..=n` whose rows are present (a prefix: see the module docs), by bisection.
fn held_prefix(
    db: &mut DB,
    height: u64,
    get: &mut impl FnMut(&mut DB, &[u8]) -> Result<Option<Vec<u8>>>,
) -> Result<u64> {
    let (mut lo, mut hi) = (0, height);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if get(db, &layout::header_log_key(mid))?.is_some() {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    Ok(lo)
}
