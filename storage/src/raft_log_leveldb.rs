//! [`LevelDbRaftLog`]: the raft log as tallies before 2026-12-05 kept it, in a LevelDB database
//! of its own, now only read: [`crate::RaftLogDb::open`] opens such a log with it once and
//! rewrites it into segments. It answers raft-rs's [`Storage`] reads; what wrote it (appends,
//! compaction by database swap, snapshots) is in the git history before the segment log.
//!
//! The database is separate from the ledger's (the server keeps it in `<data_dir>/raft`), so that
//! the log can be appended and compacted without touching the ledger's tables. Every write is
//! one synced `WriteBatch` through [`SyncEnv`]: a crash leaves the state before or after it.
//!
//! What is stored (see [`layout`] for the keys):
//! - `raft_entry`: every entry from `first_index` to `last_index`, as `Entry` protobuf.
//!   Next to them, every write puts the hard state at the log's new last index
//!   ([`layout::raft_hard_state_at_key`]): the table's highest key is the newest hard state and
//!   names the last index, so opening needs no scan, and a run of appends writes only keys above
//!   every stored one, which LevelDB never merges (see the layout docs).
//! - `raft_state`: the conf state (protobuf) and the snapshot point (index, term and the server's
//!   descriptor of the ledger at that index). They change only at compactions and snapshots;
//!   opening and compaction push them out of the memtable into tables of their own
//!   (`settle_state_rows`), so that no table spans from the entries to them.
//!
//! Invariants: `snapshot index <= commit <= last index`, the entries are exactly
//! `snapshot index + 1 ..= last index`, and their terms never decrease, starting at or after the
//! snapshot's. Opening checks the first two, reads the first and last entries and the snapshot
//! index's and `last + 1`'s (which must be absent), and checks the terms it reads while it looks
//! for the points where the term changes (a bisection, a few reads per term); other entries are
//! checked when they are read.

use std::cell::RefCell;
use std::cmp;
use std::fmt;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::util::limit_size;
use raft::{GetEntriesContext, RaftState, Storage, StorageError, NO_LIMIT};
use rusty_leveldb::{LdbIterator, Options, WriteBatch, DB};
use tally_core::replica::initial_conf_state;
use tally_core::{Error, Result};

use crate::env::{SyncEnv, SyncStats};
use crate::layout::{self, corrupt, SnapshotPoint, Table};
use crate::ledger::io_error;
use crate::raft_log::{Bounds, TermRuns};
use crate::StoreOptions;

/// The durable raft log of one replica. See the module docs.
///
/// Not `Send`: rusty-leveldb's `DB` is built on `Rc`. It lives on the raft thread, inside the
/// `RawNode`. The database sits in a `RefCell` because [`Storage`]'s methods take `&self` while
/// rusty-leveldb's reads take `&mut self`; no method holds the borrow across a call out.
pub struct LevelDbRaftLog {
    db: RefCell<DB>,
    hard_state: HardState,
    conf_state: ConfState,
    /// The address book kept with the conf state (opaque here), if one was ever written.
    address_book: Option<Vec<u8>>,
    snapshot: SnapshotPoint,
    last_index: u64,
    /// The term of every entry in the log, so that `term()` never reads the disk.
    terms: TermRuns,
    sync_stats: Arc<SyncStats>,
    /// Set when a write failed: rusty-leveldb puts a batch into its memtable before writing the
    /// log, so reads could see entries that are not durable. Every later call fails.
    failed: Option<String>,
}

impl LevelDbRaftLog {
    /// Opens (creating if missing) the raft log in `dir`. A new log starts from the conf state
    /// listing `voters` (static membership: every replica starts from the same one), with first
    /// index 1 and last index 0. An existing log must have been created with the same voters.
    pub fn open(dir: &Path, voters: &[u64]) -> Result<LevelDbRaftLog> {
        LevelDbRaftLog::open_with_options(dir, voters, StoreOptions::default())
    }

    /// [`LevelDbRaftLog::open`] with LevelDB tuning (tests use a small memtable).
    pub fn open_with_options(
        dir: &Path,
        voters: &[u64],
        opts: StoreOptions,
    ) -> Result<LevelDbRaftLog> {
        assert!(!voters.is_empty(), "a cluster has at least one voter");
        assert!(
            opts.write_buffer_bytes > 0 && opts.block_cache_bytes > 0,
            "{opts:?}"
        );
        // Finish (or roll back) a compaction that a crash interrupted (see `compact`).
        crate::transfer::recover_install(dir)?;
        let env = SyncEnv::new();
        let sync_stats = env.stats();
        let mut db = DB::open(dir, leveldb_options(&opts, env))
            .map_err(|e| io_error(format_args!("opening raft log {}", dir.display()), e))?;
        advance_sequence(&mut db).map_err(|e| io_error("writing the raft log open marker", e))?;
        migrate_raft_state_v1(&mut db)?;
        migrate_state_rows(&mut db, &sync_stats)?;
        let stored = read_stored_state(&mut db, voters, &sync_stats)?;
        settle_state_rows(&mut db)?;
        let mut this = LevelDbRaftLog {
            db: RefCell::new(db),
            hard_state: stored.hard_state,
            conf_state: stored.conf_state,
            address_book: stored.address_book,
            snapshot: stored.snapshot,
            last_index: stored.last_index,
            terms: TermRuns::default(),
            sync_stats,
            failed: None,
        };
        this.check_and_load_terms()?;
        Ok(this)
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    /// The address book written with the conf state by the last membership change or snapshot
    /// install; None if there was none (the configured peers are the book).
    pub fn address_book(&self) -> Option<&[u8]> {
        self.address_book.as_deref()
    }

    /// Everything up to this index has been compacted away (0 for a log never compacted).
    pub fn snapshot_index(&self) -> u64 {
        self.snapshot.index
    }

    /// The snapshot point: index, term and the descriptor stored with it.
    pub fn snapshot_point(&self) -> &SnapshotPoint {
        &self.snapshot
    }

    /// Releases the database lock, reporting a failure to flush (every write is already synced).
    pub fn close(self) -> Result<()> {
        self.db
            .into_inner()
            .close()
            .map_err(|e| io_error("closing the raft log", e))
    }

    /// Writes one raw key and value, synced. For tests that need a corrupt database.
    #[doc(hidden)]
    pub fn raw_put(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.put(key, value);
        self.write(batch, "raw put")
    }

    fn first(&self) -> u64 {
        self.snapshot.index + 1
    }

    fn bounds(&self) -> Bounds<'_> {
        Bounds {
            snapshot: &self.snapshot,
            last_index: self.last_index,
            terms: &self.terms,
            conf_state: &self.conf_state,
        }
    }

    fn check_usable(&self) -> Result<()> {
        match &self.failed {
            None => Ok(()),
            Some(e) => Err(Error::io(
                "an earlier write to the raft log failed, it must be reopened",
                e,
            )),
        }
    }

    fn write(&mut self, batch: WriteBatch, what: impl fmt::Display) -> Result<()> {
        self.check_usable()?;
        if let Err(e) = self.db.get_mut().write(batch, true) {
            let e = io_error(format_args!("raft log: {what}"), e);
            self.failed = Some(e.to_string());
            return Err(e);
        }
        Ok(())
    }

    fn read_entry(&self, index: u64) -> Result<Option<Entry>> {
        self.check_usable()?;
        let key = layout::raft_entry_key(index);
        let value = get(&mut self.db.borrow_mut(), &key, &self.sync_stats)?;
        value.map(|v| decode_entry(index, &v)).transpose()
    }

    fn must_read_entry(&self, index: u64) -> Result<Entry> {
        self.read_entry(index)?.ok_or_else(|| self.missing(index))
    }

    fn missing(&self, index: u64) -> Error {
        corrupt(
            Table::RaftEntry,
            format_args!(
                "entry {index} is missing from the log {}..={}",
                self.first(),
                self.last_index
            ),
        )
    }

    /// Entries `low..high` (all in the log, `low < high`), stopping once their encoded size
    /// passes `max_size` (at least one is returned).
    fn read_entries(&self, low: u64, high: u64, max_size: u64) -> Result<Vec<Entry>> {
        self.check_usable()?;
        let mut iter = self
            .db
            .borrow_mut()
            .new_iter()
            .map_err(|e| io_error("iterating the raft log", e))?;
        iter.seek(&layout::raft_entry_key(low));
        let mut out = Vec::with_capacity(cmp::min(high - low, 1024) as usize);
        let mut bytes = 0u64;
        for index in low..high {
            // The hard state rows between the entries are not entries.
            let (key, value) = loop {
                let Some((key, value)) = iter.current() else {
                    return Err(self.missing(index));
                };
                if layout::raft_hard_state_at_index(&key).is_none() {
                    break (key, value);
                }
                iter.advance();
            };
            if layout::raft_entry_key_index(&key) != Some(index) {
                return Err(self.missing(index));
            }
            out.push(decode_entry(index, &value)?);
            // `limit_size` below decides exactly; this only stops reading once it would cut.
            bytes = bytes.saturating_add(value.len() as u64);
            if bytes > max_size {
                break;
            }
            iter.advance();
        }
        limit_size(&mut out, Some(max_size));
        Ok(out)
    }

    /// Checks the invariants of the module docs against the disk and fills `terms`. Terms never
    /// decrease along a raft log, so the runs are found by bisection: a few reads per term.
    fn check_and_load_terms(&mut self) -> Result<()> {
        let (first, last) = (self.first(), self.last_index);
        let commit = self.hard_state.commit;
        if last < self.snapshot.index || commit < self.snapshot.index || commit > last {
            return Err(corrupt(
                Table::RaftState,
                format_args!(
                    "snapshot index {}, commit {commit} and last index {last} are out of order",
                    self.snapshot.index
                ),
            ));
        }
        for outside in [self.snapshot.index, last + 1] {
            if outside > 0 && self.read_entry(outside)?.is_some() {
                return Err(corrupt(
                    Table::RaftEntry,
                    format_args!("entry {outside} is outside the log {first}..={last}"),
                ));
            }
        }
        if last < first {
            return Ok(());
        }
        let lo = self.must_read_entry(first)?.term;
        let hi = self.must_read_entry(last)?.term;
        let mut runs = vec![(first, lo)];
        self.find_runs(first, lo, last, hi, &mut runs)?;
        if lo < self.snapshot.term {
            return Err(corrupt(
                Table::RaftEntry,
                format_args!(
                    "entry {first} has term {lo}, before the snapshot's {}",
                    self.snapshot.term
                ),
            ));
        }
        self.terms = TermRuns { runs };
        Ok(())
    }

    /// Appends to `runs` the run starts in `(lo, hi]`, given the terms at both ends.
    fn find_runs(
        &self,
        lo: u64,
        lo_term: u64,
        hi: u64,
        hi_term: u64,
        runs: &mut Vec<(u64, u64)>,
    ) -> Result<()> {
        if lo_term == hi_term {
            return Ok(());
        }
        if lo_term > hi_term {
            return Err(corrupt(
                Table::RaftEntry,
                format_args!("entry {lo} has term {lo_term}, after entry {hi}'s {hi_term}"),
            ));
        }
        if hi == lo + 1 {
            runs.push((hi, hi_term));
            return Ok(());
        }
        let mid = lo + (hi - lo) / 2;
        let mid_term = self.must_read_entry(mid)?.term;
        self.find_runs(lo, lo_term, mid, mid_term, runs)?;
        self.find_runs(mid, mid_term, hi, hi_term, runs)
    }
}

impl Storage for LevelDbRaftLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        self.check_usable().map_err(raft_error)?;
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let max_size = max_size.into().unwrap_or(NO_LIMIT);
        if self.bounds().check_range(low, high)? {
            return Ok(Vec::new());
        }
        self.check_usable().map_err(raft_error)?;
        self.read_entries(low, high, max_size).map_err(raft_error)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.check_usable().map_err(raft_error)?;
        self.bounds().term(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index)
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        self.check_usable().map_err(raft_error)?;
        self.bounds().snapshot(request_index)
    }
}

/// Moves the rows of `raft_state` v1 (a log written by an earlier tally) to v2: same keys after
/// the tag, same values, one synced write.
fn migrate_raft_state_v1(db: &mut DB) -> Result<()> {
    let mut rows = Vec::new();
    crate::ledger::scan_prefix(db, &layout::RAFT_STATE_V1_TAG, |key, value| {
        rows.push((key.to_vec(), value.to_vec()));
        Ok(())
    })?;
    if rows.is_empty() {
        return Ok(());
    }
    let mut batch = WriteBatch::default();
    for (key, value) in &rows {
        let mut moved = key.to_vec();
        moved[..layout::TAG_BYTES].copy_from_slice(&Table::RaftState.tag());
        batch.put(&moved, value);
        batch.delete(key);
    }
    db.write(batch, true)
        .map_err(|e| io_error("moving raft_state v1 rows to v2", e))
}

/// Moves the state rows of a log written before hard states were keyed by index (a `hard` and a
/// `last` row in `raft_state`, rewritten by every write) to the hard state at the last index, in
/// one synced write.
fn migrate_state_rows(db: &mut DB, stats: &SyncStats) -> Result<()> {
    let hard = get(db, &layout::raft_hard_state_key(), stats)?;
    let last = get(db, &layout::raft_last_index_key(), stats)?;
    if hard.is_none() && last.is_none() {
        return Ok(());
    }
    let highest = highest_entry_row(db)?;
    if highest.is_some_and(|(key, _)| layout::raft_hard_state_at_index(&key).is_some()) {
        return Err(corrupt(
            Table::RaftState,
            "it holds hard state rows of both the old layout and the new one",
        ));
    }
    let last = match last {
        Some(v) => layout::decode_raft_last_index(&v)?,
        None => match get(db, &layout::raft_snapshot_key(), stats)? {
            Some(v) => SnapshotPoint::decode(&v)?.index,
            None => 0,
        },
    };
    let hard = hard.unwrap_or_else(|| encode_proto(&HardState::default()));
    let mut batch = WriteBatch::default();
    batch.put(&layout::raft_hard_state_at_key(last), &hard);
    batch.delete(&layout::raft_hard_state_key());
    batch.delete(&layout::raft_last_index_key());
    db.write(batch, true)
        .map_err(|e| io_error("moving the hard state to its index", e))
}

/// The rows a raft log opens from, read (and for a new log, its conf state created) by
/// [`read_stored_state`].
struct StoredState {
    hard_state: HardState,
    conf_state: ConfState,
    address_book: Option<Vec<u8>>,
    snapshot: SnapshotPoint,
    /// The newest hard state's index, or the snapshot point's when there is none.
    last_index: u64,
}

/// Reads the conf state, address book, snapshot point and newest hard state of the log in
/// `db`. A new log (none of them stored) gets the conf state listing `voters`, written.
fn read_stored_state(db: &mut DB, voters: &[u64], sync_stats: &SyncStats) -> Result<StoredState> {
    let conf = get(db, &layout::raft_conf_state_key(), sync_stats)?;
    let snap = get(db, &layout::raft_snapshot_key(), sync_stats)?;
    let newest = newest_hard_state(db)?;
    let new_log = newest.is_none() && snap.is_none();
    let conf_state = load_conf_state(db, conf, new_log, voters)?;
    let address_book = get(db, &layout::raft_address_book_key(), sync_stats)?;
    let snapshot = match snap {
        Some(v) => SnapshotPoint::decode(&v)?,
        None => SnapshotPoint::default(),
    };
    let (hard_state, last_index) = match newest {
        Some((index, v)) => (decode_hard_state(index, &v)?, index),
        None => (HardState::default(), snapshot.index),
    };
    Ok(StoredState {
        hard_state,
        conf_state,
        address_book,
        snapshot,
        last_index,
    })
}

/// Decodes the stored conf state `stored`; for a new log, which has none, writes and returns
/// the one listing `voters`. A log in use without one, or with one naming no voter, is corrupt.
fn load_conf_state(
    db: &mut DB,
    stored: Option<Vec<u8>>,
    new_log: bool,
    voters: &[u64],
) -> Result<ConfState> {
    let conf_state = match stored {
        Some(v) => decode_proto::<ConfState>(Table::RaftState, "conf state", &v)?,
        None if new_log => {
            let cs = initial_conf_state(voters);
            let mut batch = WriteBatch::default();
            batch.put(&layout::raft_conf_state_key(), &encode_proto(&cs));
            db.write(batch, true)
                .map_err(|e| io_error("creating the raft log", e))?;
            cs
        }
        None => {
            return Err(corrupt(
                Table::RaftState,
                "the conf state is missing from a log in use",
            ))
        }
    };
    // The configured voters only make a new log: from then on the configuration follows
    // the committed membership changes. It always has a voter.
    if conf_state.voters.is_empty() {
        return Err(corrupt(Table::RaftState, "the conf state has no voters"));
    }
    Ok(conf_state)
}

/// The newest hard state and the last index: the highest key of the `raft_entry` table, which
/// must be a hard state row (see [`layout::raft_hard_state_at_key`]). None for a log that has
/// none (a new one, or one whose state rows are missing, which the caller's checks catch).
fn newest_hard_state(db: &mut DB) -> Result<Option<(u64, Vec<u8>)>> {
    let Some((key, value)) = highest_entry_row(db)? else {
        return Ok(None);
    };
    match layout::raft_hard_state_at_index(&key) {
        Some(index) => Ok(Some((index, value))),
        None => Err(corrupt(
            Table::RaftEntry,
            format_args!(
                "its highest row is not a hard state (key {:02x?}): the newest hard state is \
                 missing",
                &key[..]
            ),
        )),
    }
}

/// The highest key of the `raft_entry` table and its value.
///
/// Found by bisection on the index of the key, 64 seeks: rusty-leveldb 4.0.2's reverse iteration
/// (`prev` after a `seek`) found nothing below a key it had just positioned on.
fn highest_entry_row(db: &mut DB) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
    let tag = Table::RaftEntry.tag();
    let mut iter = db
        .new_iter()
        .map_err(|e| io_error("iterating the raft log", e))?;
    let mut any_from = |index: u64| {
        iter.seek(&layout::raft_entry_key(index));
        iter.current().is_some_and(|(key, _)| key.starts_with(&tag))
    };
    if !any_from(0) {
        return Ok(None);
    }
    // Invariant: a row at or above `lo`'s keys, none at or above `hi`'s.
    let (mut lo, mut hi) = (0u64, u64::MAX);
    if any_from(u64::MAX) {
        lo = u64::MAX;
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if any_from(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    // At most the entry and the hard state at `lo` remain.
    iter.seek(&layout::raft_entry_key(lo));
    let mut highest = None;
    while let Some((key, value)) = iter.current() {
        if !key.starts_with(&tag) {
            break;
        }
        highest = Some((key, value));
        iter.advance();
    }
    let (key, value) = highest.expect("a row at or above the bisection's low end");
    Ok(Some((key.to_vec(), value.to_vec())))
}

/// Writes the memtable out to a table: rows written at open (the open marker, migrations) or to
/// a compacted log's new database (its state rows) must not share a table with the appends that
/// follow, or that table would span from the entries to the state rows and overlap every later
/// one (see the module docs).
///
/// rusty-leveldb has no flush of its own: `compact_range` writes the memtable out first, and it
/// is given a range above every key, where no table lies to merge. (Over the `raft_state` range
/// instead, its manual compaction made a reopened log read an older snapshot point: found by the
/// randomized model test.)
fn settle_state_rows(db: &mut DB) -> Result<()> {
    const ABOVE_EVERY_KEY: [u8; 8] = [0xff; 8];
    db.compact_range(&ABOVE_EVERY_KEY, &ABOVE_EVERY_KEY)
        .map_err(|e| io_error("writing the raft log's memtable out", e))
}

fn decode_hard_state(index: u64, value: &[u8]) -> Result<HardState> {
    decode_proto(
        Table::RaftEntry,
        format_args!("hard state at {index}"),
        value,
    )
}

/// Like `LedgerDb`'s options: no log or manifest reuse (see `ledger.rs` for why).
fn leveldb_options(opts: &StoreOptions, env: SyncEnv) -> Options {
    Options {
        env: Rc::new(Box::new(env)),
        create_if_missing: true,
        max_open_files: opts.table_files_open_max + 10,
        write_buffer_size: opts.write_buffer_bytes,
        block_cache_capacity_bytes: opts.block_cache_bytes,
        reuse_logs: false,
        reuse_manifest: false,
        ..Options::default()
    }
}

/// The rusty-leveldb `Table::get` workaround of `LedgerDb` (see `advance_sequence` in
/// `ledger.rs`): a hard state row has a version per write that leaves the last index where it
/// was, exactly the rows the bug hides after a restart. Writing before the first read avoids it.
fn advance_sequence(db: &mut DB) -> rusty_leveldb::Result<()> {
    let mut batch = WriteBatch::default();
    batch.delete(&layout::raft_open_marker_key());
    db.write(batch, false)
}

/// A read that reports errors (`env::get_checked`): rusty-leveldb's `get` and `get_at` both
/// read a table they cannot read, or one that fails its checksum, as "absent".
fn get(db: &mut DB, key: &[u8], stats: &SyncStats) -> Result<Option<Vec<u8>>> {
    crate::env::get_checked(db, key, stats)
        .map_err(|e| Error::corrupt(format!("reading the raft log: {e}")))
}

fn decode_entry(index: u64, value: &[u8]) -> Result<Entry> {
    let entry: Entry = decode_proto(Table::RaftEntry, format_args!("entry {index}"), value)?;
    if entry.index != index {
        return Err(corrupt(
            Table::RaftEntry,
            format_args!("key index {index} holds entry {}", entry.index),
        ));
    }
    Ok(entry)
}

fn decode_proto<M: protobuf::Message>(
    table: Table,
    what: impl fmt::Display,
    value: &[u8],
) -> Result<M> {
    M::parse_from_bytes(value).map_err(|e| corrupt(table, format_args!("{what}: {e}")))
}

fn encode_proto<M: protobuf::Message>(m: &M) -> Vec<u8> {
    m.write_to_bytes()
        .expect("raft's protobuf messages have no required fields")
}

/// raft-rs treats any error but its own kinds as fatal, which is what a storage error is.
fn raft_error(e: Error) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}
