//! [`RaftLogDb`]: raft's log, hard state, configuration and snapshot point in files of their
//! own, behind raft-rs's [`Storage`] and core's [`RaftLogStore`] (the server keeps them in
//! `<data_dir>/raft`; the byte layout is in `raft_files.rs`).
//!
//! - **Segments** (`<number>.seg`): one record per write, appended and synced (`fdatasync`)
//!   before the write returns. A record holds the entries of one `persist` (which replace the
//!   log from their first index on) and the hard state after it. A segment that reaches
//!   [`SEGMENT_BYTES`] is closed and the next one starts with a record of the hard state alone.
//! - **`meta`**: the snapshot point (index, term, the server's descriptor of the ledger), the
//!   conf state and address book, a hard state, and the first segment that counts. It is
//!   replaced whole (write, sync, rename, sync the directory) by a compaction, a snapshot
//!   install and a membership change.
//!
//! Every write is one record or one meta replacement, so a crash leaves the state before or
//! after it. Every record and meta carries a sequence number one above the last; the hard state
//! is the one with the highest number. Compaction writes meta with the new snapshot point and
//! the segment of the first entry kept, then deletes the segments before it: whole files, no
//! copy (the LevelDB log this replaces copied every entry after the compaction point into a new
//! database every 32 MiB, a stall of up to a second on the raft thread).
//!
//! Opening reads meta, removes segments below its first one, and reads every record of the
//! others in order, checking each CRC: entries at or below the snapshot index are skipped, an
//! entry at or below the last index replaces the log from there (as `persist` did), an entry
//! past `last + 1` is corruption. A record cut short or failing its CRC at the end of the newest
//! segment is a write the crash interrupted (never acknowledged): the segment is cut there. In
//! an older segment, which was synced whole before the next one began, it is corruption. Entry
//! positions and terms are kept in memory (32 bytes per entry, a `Locator`); entries are read back from the
//! files only when they fall out of the in-memory tail, each checked against its own CRC.
//!
//! A raft log written by an earlier tally in LevelDB (`CURRENT` in the directory) is rewritten
//! into this form at open (`raft_log_leveldb.rs` reads it), by the crash-safe directory swap of
//! ledger installs.
//!
//! Invariants: `snapshot index <= commit <= last index`, the entries are exactly
//! `snapshot index + 1 ..= last index`, and their terms never decrease, starting at or after the
//! snapshot's. Opening checks them.

use std::cmp;
use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::util::limit_size;
use raft::{GetEntriesContext, RaftState, Storage, StorageError, NO_LIMIT};
use tally_core::replica::{initial_conf_state, RaftLogStore};
use tally_core::{Error, Result};

use crate::env::SyncStats;
use crate::layout::{corrupt, SnapshotPoint, Table};
use crate::raft_files::{
    self, create_segment, encode_record, list_segments, open_segment, read_meta, read_records,
    remove_segments, segment_path, write_meta, Locator, Meta, SegmentEnd,
};
use crate::raft_log_leveldb::LevelDbRaftLog;
use crate::StoreOptions;

/// A segment at least this long is closed after its write, and the next write goes to a new
/// one. Compaction frees whole segments, so the log holds up to this much beyond what it must.
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// Descriptors the log holds open at once, at most: the active segment, a segment being read
/// and the directory while it is synced.
pub const RAFT_LOG_FILES_OPEN_MAX: usize = 3;
/// Entries per record when a LevelDB log is rewritten (bounds the memory of the migration).
const MIGRATE_ENTRIES_PER_RECORD: u64 = 256;

/// The durable raft log of one replica. See the module docs.
pub struct RaftLogDb {
    dir: PathBuf,
    opts: StoreOptions,
    /// The sequence number of the last write (record or meta).
    seq: u64,
    /// Segments numbered below this are garbage (meta's first segment).
    first_segment: u64,
    /// The newest segment, open for appending.
    active: Active,
    /// Where each entry `snapshot index + 1 ..= last index` lies.
    locators: VecDeque<Locator>,
    /// As last written, except for a commit index raised by `set_commit` since.
    hard_state: HardState,
    conf_state: ConfState,
    /// The address book kept with the conf state (opaque here), if one was ever written.
    address_book: Option<Vec<u8>>,
    snapshot: SnapshotPoint,
    /// Set by `set_snapshot_descriptor`; stored by the next `compact` that moves the snapshot
    /// point.
    next_descriptor: Option<Vec<u8>>,
    last_index: u64,
    /// The term of every entry in the log, so that `term()` never reads the disk.
    terms: TermRuns,
    /// The newest entries as persisted, so that raft's reads of what it just wrote (committed
    /// entries to apply, entries to send to followers) do not read and decode them back.
    tail: EntryTail,
    /// A record's bytes, kept from write to write.
    scratch: Vec<u8>,
    sync_stats: Arc<SyncStats>,
    /// Set when a write failed: what is on disk is no longer known. Every later call fails.
    failed: Option<String>,
}

/// The segment writes go to.
struct Active {
    number: u64,
    file: File,
    /// Its length: where the next record starts.
    len: u64,
}

/// What opening read back.
struct Replayed {
    seq: u64,
    hard_state: HardState,
    locators: VecDeque<Locator>,
    /// The newest segment and its length up to its last whole record.
    newest: Option<(u64, u64)>,
}

impl RaftLogDb {
    /// Opens (creating if missing) the raft log in `dir`. A new log starts from the conf state
    /// listing `voters` (every replica of a new cluster starts from the same one), with first
    /// index 1 and last index 0; an existing log keeps the configuration it holds.
    pub fn open(dir: &Path, voters: &[u64]) -> Result<RaftLogDb> {
        RaftLogDb::open_with_options(dir, voters, StoreOptions::default())
    }

    /// [`RaftLogDb::open`] with tuning (`raft_tail_bytes`; tests keep a small tail).
    pub fn open_with_options(dir: &Path, voters: &[u64], opts: StoreOptions) -> Result<RaftLogDb> {
        assert!(!voters.is_empty(), "a cluster has at least one voter");
        // Finish (or roll back) a rewrite of a LevelDB log that a crash interrupted.
        crate::transfer::recover_install(dir)?;
        if dir.join("CURRENT").exists() {
            migrate_leveldb(dir, voters, &opts)?;
        }
        std::fs::create_dir_all(dir).map_err(|e| raft_files::fs_error("creating", dir, e))?;
        let sync_stats = Arc::new(SyncStats::default());
        let meta = match read_meta(dir)? {
            Some(meta) => meta,
            None => new_log(dir, voters, &sync_stats)?,
        };
        if meta.conf_state.voters.is_empty() {
            return Err(corrupt(Table::RaftState, "the conf state has no voters"));
        }
        let stale: Vec<u64> = list_segments(dir)?
            .into_iter()
            .filter(|&n| n < meta.first_segment)
            .collect();
        remove_segments(dir, &stale, &sync_stats)?;
        let replayed = replay(dir, &meta)?;
        let active = match replayed.newest {
            Some((number, len)) => Active {
                number,
                file: open_segment(dir, number, len, &sync_stats)?,
                len,
            },
            None => Active {
                number: meta.first_segment,
                file: create_segment(dir, meta.first_segment, &sync_stats)?,
                len: 0,
            },
        };
        let first = meta.snapshot.index + 1;
        let terms = TermRuns::from_terms(first, replayed.locators.iter().map(|l| l.term));
        let this = RaftLogDb {
            dir: dir.to_owned(),
            seq: replayed.seq,
            first_segment: meta.first_segment,
            active,
            last_index: meta.snapshot.index + replayed.locators.len() as u64,
            locators: replayed.locators,
            hard_state: replayed.hard_state,
            conf_state: meta.conf_state,
            address_book: meta.address_book,
            snapshot: meta.snapshot,
            next_descriptor: None,
            terms,
            tail: EntryTail::new(opts.raft_tail_bytes),
            opts,
            scratch: Vec::new(),
            sync_stats,
            failed: None,
        };
        this.check_invariants()?;
        Ok(this)
    }

    /// The descriptor the next [`RaftLogStore::compact`] stores with the snapshot point: opaque
    /// bytes describing the ledger state at the index being compacted to. Without one, a compact
    /// keeps the current descriptor.
    pub fn set_snapshot_descriptor(&mut self, bytes: Vec<u8>) {
        self.next_descriptor = Some(bytes);
    }

    /// The hard state, with the commit index from the latest `set_commit` (which may not be
    /// durable yet).
    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    /// The address book written with the conf state by the last membership change, if any
    /// (the configured peers are the book until then).
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

    /// How many entries the log holds (`last_index - snapshot_index`).
    pub fn entry_count(&self) -> u64 {
        self.last_index - self.snapshot.index
    }

    /// The segments on disk (the active one included): what compaction has not freed yet.
    pub fn segment_count(&self) -> u64 {
        self.active.number - self.first_segment + 1
    }

    /// The fsync counters of this log's files.
    pub fn sync_stats(&self) -> Arc<SyncStats> {
        Arc::clone(&self.sync_stats)
    }

    /// Closes the log (every write is already synced).
    pub fn close(self) -> Result<()> {
        self.check_usable()
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

    /// Runs a write; a failure is sticky (see `failed`).
    fn guarded<T>(&mut self, write: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        self.check_usable()?;
        write(self).inspect_err(|e| self.failed = Some(e.to_string()))
    }

    /// Appends `self.scratch` (one record) to the active segment and syncs it; returns the
    /// offset it starts at.
    fn append_scratch(&mut self) -> Result<u64> {
        let active = &mut self.active;
        active
            .file
            .write_all(&self.scratch)
            .and_then(|()| active.file.sync_data())
            .map_err(|e| {
                let path = segment_path(&self.dir, active.number);
                raft_files::fs_error("appending to", &path, e)
            })?;
        self.sync_stats.count_file_sync();
        let at = active.len;
        // Reads of recent entries are answered from memory (`raft_tail_bytes`), older ones
        // are rare: the record's pages are not kept.
        crate::env::drop_cached(&active.file, at, Some(self.scratch.len() as u64));
        active.len += self.scratch.len() as u64;
        Ok(at)
    }

    /// Starts the next segment once the active one is full; it begins with the hard state.
    fn roll_if_full(&mut self) -> Result<()> {
        if self.active.len < SEGMENT_BYTES {
            return Ok(());
        }
        let number = self.active.number + 1;
        let file = create_segment(&self.dir, number, &self.sync_stats)?;
        self.active = Active {
            number,
            file,
            len: 0,
        };
        self.seq += 1;
        encode_record(self.seq, &[], &self.hard_state, &mut self.scratch);
        self.append_scratch().map(drop)
    }

    /// Replaces meta with the current state, `first_segment` and `snapshot`.
    fn write_meta(&mut self, first_segment: u64, snapshot: &SnapshotPoint) -> Result<()> {
        self.seq += 1;
        let meta = Meta {
            seq: self.seq,
            first_segment,
            snapshot: snapshot.clone(),
            conf_state: self.conf_state.clone(),
            address_book: self.address_book.clone(),
            hard_state: self.hard_state.clone(),
        };
        write_meta(&self.dir, &meta, &self.sync_stats)
    }

    /// Removes the segments numbered `from..to` and makes `to` the first that counts (meta
    /// already says so).
    fn free_segments(&mut self, to: u64) -> Result<()> {
        let stale: Vec<u64> = (self.first_segment..to).collect();
        remove_segments(&self.dir, &stale, &self.sync_stats)?;
        self.first_segment = to;
        Ok(())
    }

    fn check_invariants(&self) -> Result<()> {
        let (snapshot, last) = (self.snapshot.index, self.last_index);
        let commit = self.hard_state.commit;
        if commit < snapshot || commit > last {
            return Err(corrupt(
                Table::RaftState,
                format_args!("commit {commit} is outside the log {snapshot}..={last}"),
            ));
        }
        let mut term = self.snapshot.term;
        for (index, l) in (snapshot + 1..).zip(&self.locators) {
            if l.term < term {
                return Err(corrupt(
                    Table::RaftEntry,
                    format_args!("entry {index} has term {} after term {term}", l.term),
                ));
            }
            term = l.term;
        }
        Ok(())
    }

    /// Entries `low..high` (all in the log, `low < high`), stopping once their encoded size
    /// passes `max_size` (at least one is returned).
    fn read_entries(&self, low: u64, high: u64, max_size: u64) -> Result<Vec<Entry>> {
        self.check_usable()?;
        let mut out = Vec::with_capacity(cmp::min(high - low, 1024) as usize);
        let mut open: Option<(u64, File)> = None;
        let mut bytes = 0u64;
        for index in low..high {
            let locator = self.locators[(index - self.first()) as usize];
            let file = match open.take() {
                Some((n, f)) if n == locator.segment => (n, f),
                _ => {
                    let path = segment_path(&self.dir, locator.segment);
                    let f =
                        File::open(&path).map_err(|e| raft_files::fs_error("opening", &path, e))?;
                    (locator.segment, f)
                }
            };
            out.push(raft_files::read_entry(&file.1, index, &locator)?);
            open = Some(file);
            // `limit_size` below decides exactly; this only stops reading once it would cut.
            bytes = bytes.saturating_add(u64::from(locator.len));
            if bytes > max_size {
                break;
            }
        }
        limit_size(&mut out, Some(max_size));
        Ok(out)
    }
}

/// Writes the meta of a new log in `dir` (which must hold no segment).
fn new_log(dir: &Path, voters: &[u64], stats: &SyncStats) -> Result<Meta> {
    if !list_segments(dir)?.is_empty() {
        return Err(corrupt(
            Table::RaftState,
            format_args!("{} holds raft log segments but no meta", dir.display()),
        ));
    }
    let meta = Meta {
        seq: 1,
        first_segment: 1,
        conf_state: initial_conf_state(voters),
        ..Meta::default()
    };
    write_meta(dir, &meta, stats)?;
    Ok(meta)
}

/// Reads every record of the segments in `dir` (all at or above meta's first) in order.
fn replay(dir: &Path, meta: &Meta) -> Result<Replayed> {
    let segments = list_segments(dir)?;
    let mut out = Replayed {
        seq: meta.seq,
        hard_state: meta.hard_state.clone(),
        locators: VecDeque::new(),
        newest: None,
    };
    let mut hard_state_seq = meta.seq;
    let mut record_seq = 0;
    let snapshot = meta.snapshot.index;
    for (i, &n) in segments.iter().enumerate() {
        let path = segment_path(dir, n);
        let bytes = std::fs::read(&path).map_err(|e| raft_files::fs_error("reading", &path, e))?;
        let end = read_records(n, &bytes, |record| {
            if record.seq <= record_seq {
                return Err(corrupt(
                    Table::RaftEntry,
                    format_args!(
                        "segment {n}: record {} after record {record_seq}",
                        record.seq
                    ),
                ));
            }
            record_seq = record.seq;
            replace_from(&mut out.locators, snapshot, &record.entries)?;
            if record.seq > hard_state_seq {
                hard_state_seq = record.seq;
                out.hard_state = record.hard_state;
            }
            Ok(())
        })?;
        let len = match end {
            SegmentEnd::Clean => bytes.len() as u64,
            SegmentEnd::Torn(at) if i + 1 == segments.len() => at,
            SegmentEnd::Torn(at) => {
                return Err(corrupt(
                    Table::RaftEntry,
                    format_args!(
                        "segment {n} has a bad record at byte {at}, and newer ones follow"
                    ),
                ))
            }
        };
        out.newest = Some((n, len));
    }
    out.seq = cmp::max(out.seq, record_seq);
    Ok(out)
}

/// One record's entries replace the log (`locators`, entries after `snapshot`) from their first
/// index on; those at or below the snapshot index are gone already.
fn replace_from(
    locators: &mut VecDeque<Locator>,
    snapshot: u64,
    entries: &[(u64, Locator)],
) -> Result<()> {
    let Some(&(start, _)) = entries.first() else {
        return Ok(());
    };
    let last = snapshot + locators.len() as u64;
    if start > last + 1 {
        return Err(corrupt(
            Table::RaftEntry,
            format_args!("entries from {start} leave a gap after the log's last index {last}"),
        ));
    }
    locators.truncate((start.max(snapshot + 1) - snapshot - 1) as usize);
    for (i, &(index, locator)) in entries.iter().enumerate() {
        if index != start + i as u64 {
            return Err(corrupt(
                Table::RaftEntry,
                format_args!("a record's entries from {start} are not contiguous at {index}"),
            ));
        }
        if index > snapshot {
            locators.push_back(locator);
        }
    }
    Ok(())
}

/// Rewrites the LevelDB raft log in `dir` (an earlier tally's) into segments: built in
/// `<dir>.staged`, then swapped in for `dir` (`install_ledger_dir`; `recover_install` finishes a
/// swap a crash interrupted, and a staged directory without its complete marker is discarded).
fn migrate_leveldb(dir: &Path, voters: &[u64], opts: &StoreOptions) -> Result<()> {
    let old = LevelDbRaftLog::open_with_options(dir, voters, opts.clone())?;
    let staged = crate::transfer::staged_ledger_dir(dir);
    if staged.exists() {
        std::fs::remove_dir_all(&staged)
            .map_err(|e| raft_files::fs_error("removing", &staged, e))?;
    }
    std::fs::create_dir_all(&staged).map_err(|e| raft_files::fs_error("creating", &staged, e))?;
    let stats = SyncStats::default();
    let meta = Meta {
        seq: 1,
        first_segment: 1,
        snapshot: old.snapshot_point().clone(),
        conf_state: old.conf_state().clone(),
        address_book: old.address_book().map(<[u8]>::to_vec),
        hard_state: old.hard_state().clone(),
    };
    write_meta(&staged, &meta, &stats)?;
    let mut file = create_segment(&staged, 1, &stats)?;
    let last = old
        .last_index()
        .map_err(|e| Error::io("reading the LevelDB raft log", e))?;
    let (mut low, mut seq, mut buf) = (meta.snapshot.index + 1, meta.seq, Vec::new());
    while low <= last {
        let high = cmp::min(last + 1, low + MIGRATE_ENTRIES_PER_RECORD);
        let entries = old
            .entries(low, high, NO_LIMIT, GetEntriesContext::empty(false))
            .map_err(|e| Error::io("reading the LevelDB raft log", e))?;
        seq += 1;
        encode_record(seq, &entries, &meta.hard_state, &mut buf);
        file.write_all(&buf)
            .map_err(|e| raft_files::fs_error("writing", &staged, e))?;
        low = high;
    }
    file.sync_data()
        .map_err(|e| raft_files::fs_error("syncing", &staged, e))?;
    drop(file);
    crate::transfer::write_complete_marker(&staged)?;
    old.close()?;
    crate::transfer::install_ledger_dir(dir, &staged)
}

impl Storage for RaftLogDb {
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
        if let Some(entries) = self.tail.get(low, high, max_size) {
            return Ok(entries);
        }
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

impl RaftLogStore for RaftLogDb {
    fn set_snapshot_descriptor(&mut self, bytes: Vec<u8>) {
        RaftLogDb::set_snapshot_descriptor(self, bytes)
    }

    fn set_conf_state(&mut self, conf: &ConfState, address_book: &[u8]) -> Result<()> {
        // A failed write fails the log for good, so memory may change first.
        self.guarded(|log| {
            log.conf_state = conf.clone();
            log.address_book = Some(address_book.to_vec());
            let snapshot = log.snapshot.clone();
            log.write_meta(log.first_segment, &snapshot)
        })
    }

    /// Entries replace the stored ones from their first index on. Without a hard state, the one
    /// in memory is written, which carries the commit index of any `set_commit` since.
    fn persist(&mut self, entries: &[Entry], hard_state: Option<&HardState>) -> Result<()> {
        self.check_usable()?;
        let mut last = self.last_index;
        if let Some(head) = entries.first() {
            let start = head.index;
            assert!(
                start >= self.first() && start <= self.last_index + 1,
                "entries from {start} do not continue the log {}..={}",
                self.first(),
                self.last_index
            );
            assert!(
                start > self.hard_state.commit,
                "entries from {start} would overwrite committed entries (commit {})",
                self.hard_state.commit
            );
            for (i, e) in entries.iter().enumerate() {
                assert_eq!(e.index, start + i as u64, "entries are contiguous");
            }
            last = start + entries.len() as u64 - 1;
        }
        let hard_state = hard_state.unwrap_or(&self.hard_state).clone();
        assert!(
            hard_state.commit >= self.hard_state.commit && hard_state.commit <= last,
            "commit {} must not go back from {} nor pass the last index {last}",
            hard_state.commit,
            self.hard_state.commit
        );
        self.guarded(|log| {
            log.seq += 1;
            let at = encode_record(log.seq, entries, &hard_state, &mut log.scratch);
            let base = log.append_scratch()?;
            if let Some(head) = entries.first() {
                log.locators.truncate((head.index - log.first()) as usize);
                for (e, (offset, len, crc)) in entries.iter().zip(at) {
                    log.locators.push_back(Locator {
                        segment: log.active.number,
                        offset: base + offset,
                        len,
                        crc,
                        term: e.term,
                    });
                }
                log.terms.append(entries);
                log.tail.append(entries);
            }
            log.last_index = last;
            log.hard_state = hard_state;
            log.roll_if_full()
        })
    }

    /// The log becomes empty and starts after the snapshot's index; its data becomes the
    /// descriptor, and a descriptor set with `set_snapshot_descriptor` is forgotten (it described
    /// an older ledger state). The segments before are garbage once meta names the next one.
    fn apply_snapshot(&mut self, snapshot: &Snapshot) -> Result<()> {
        let meta = snapshot.get_metadata();
        let index = meta.index;
        assert!(
            index > self.snapshot.index,
            "snapshot at {index} is out of date: the log is compacted to {}",
            self.snapshot.index
        );
        let point = SnapshotPoint {
            index,
            term: meta.term,
            descriptor: snapshot.data.to_vec(),
        };
        self.guarded(|log| {
            log.conf_state = meta.get_conf_state().clone();
            log.hard_state.commit = cmp::max(log.hard_state.commit, index);
            log.hard_state.term = cmp::max(log.hard_state.term, meta.term);
            let next = log.active.number + 1;
            log.write_meta(next, &point)?;
            log.snapshot = point;
            log.last_index = index;
            log.locators.clear();
            log.terms = TermRuns::default();
            log.tail = EntryTail::new(log.opts.raft_tail_bytes);
            log.next_descriptor = None;
            let file = create_segment(&log.dir, next, &log.sync_stats)?;
            log.active = Active {
                number: next,
                file,
                len: 0,
            };
            log.free_segments(next)
        })
    }

    /// Also writes the hard state (in meta), so that the durable commit index is never behind
    /// the snapshot point (raft-rs refuses to start from such a state). Frees the segments
    /// before the one holding entry `index + 1`: whole files, nothing is copied.
    fn compact(&mut self, index: u64) -> Result<()> {
        self.check_usable()?;
        assert!(
            index >= self.snapshot.index && index <= self.hard_state.commit,
            "compact({index}): the index must be between the snapshot point {} and the commit {}",
            self.snapshot.index,
            self.hard_state.commit
        );
        if index == self.snapshot.index {
            return Ok(());
        }
        let point = SnapshotPoint {
            index,
            term: self.terms.term(index),
            descriptor: match &self.next_descriptor {
                Some(d) => d.clone(),
                None => self.snapshot.descriptor.clone(),
            },
        };
        let dropped = (index - self.snapshot.index) as usize;
        let keep_from = self
            .locators
            .get(dropped)
            .map_or(self.active.number, |l| l.segment);
        self.guarded(|log| {
            log.write_meta(keep_from, &point)?;
            log.snapshot = point;
            log.next_descriptor = None;
            log.locators.drain(..dropped);
            log.terms.compact(index + 1, log.last_index);
            log.tail.compact(index + 1);
            log.free_segments(keep_from)
        })
    }

    fn set_commit(&mut self, commit: u64) -> Result<()> {
        self.check_usable()?;
        assert!(
            commit >= self.hard_state.commit && commit <= self.last_index,
            "commit {commit} must not go back from {} nor pass the last index {}",
            self.hard_state.commit,
            self.last_index
        );
        self.hard_state.commit = commit;
        Ok(())
    }
}

/// The answers of raft-rs's [`Storage`] reads that follow from the log's bounds alone, the one
/// place for them (the LevelDB log of earlier tallies answers the same way).
pub(crate) struct Bounds<'a> {
    pub snapshot: &'a SnapshotPoint,
    pub last_index: u64,
    pub terms: &'a TermRuns,
    pub conf_state: &'a ConfState,
}

impl Bounds<'_> {
    /// Whether `low..high` is empty; an error if `low` is compacted away. `high` past the last
    /// index + 1 is a caller's bug.
    pub(crate) fn check_range(&self, low: u64, high: u64) -> raft::Result<bool> {
        if low <= self.snapshot.index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        assert!(
            high <= self.last_index + 1,
            "index out of bound (last: {}, high: {high})",
            self.last_index + 1
        );
        assert!(low <= high, "entries({low}, {high})");
        Ok(low == high)
    }

    pub(crate) fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.snapshot.index {
            return Ok(self.snapshot.term);
        }
        if idx < self.snapshot.index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last_index {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.terms.term(idx))
    }

    /// The snapshot point, with the descriptor as data. A log never compacted has no snapshot to
    /// give (raft-rs would refuse an empty one), and neither has one whose point is behind
    /// `request_index`: both are "temporarily unavailable", and raft asks again later.
    pub(crate) fn snapshot(&self, request_index: u64) -> raft::Result<Snapshot> {
        if self.snapshot.index == 0 || self.snapshot.index < request_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let mut snapshot = Snapshot::default();
        snapshot.data = self.snapshot.descriptor.clone().into();
        let meta = snapshot.mut_metadata();
        meta.index = self.snapshot.index;
        meta.term = self.snapshot.term;
        meta.set_conf_state(self.conf_state.clone());
        Ok(snapshot)
    }
}

/// raft-rs treats any error but its own kinds as fatal, which is what a storage error is.
fn raft_error(e: Error) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

/// A copy of the log's newest entries (a contiguous run ending at the last index), bounded by
/// `StoreOptions::raft_tail_bytes` (but it keeps the newest entry whatever its size). Entries
/// share their data with the caller's (`Bytes`), so holding and handing them out copies no
/// payload.
#[derive(Debug)]
pub(crate) struct EntryTail {
    entries: VecDeque<Entry>,
    bytes: u64,
    bytes_max: u64,
}

impl EntryTail {
    pub(crate) fn new(bytes_max: usize) -> EntryTail {
        EntryTail {
            entries: VecDeque::new(),
            bytes: 0,
            bytes_max: bytes_max as u64,
        }
    }

    /// `entries` (contiguous, as just persisted) replace the tail from their first index on.
    pub(crate) fn append(&mut self, entries: &[Entry]) {
        let start = entries[0].index;
        match self.entries.front().map(|e| e.index) {
            Some(first) if first < start => {
                let keep = (start - first) as usize;
                for dropped in self.entries.drain(keep.min(self.entries.len())..) {
                    self.bytes -= entry_bytes(&dropped);
                }
                // A gap (entries after the tail's end) cannot happen: persist appends at most
                // one past the last index. Start over rather than hold a hole.
                if self.entries.back().is_some_and(|e| e.index + 1 != start) {
                    self.clear();
                }
            }
            _ => self.clear(),
        }
        for e in entries {
            self.bytes += entry_bytes(e);
            self.entries.push_back(e.clone());
        }
        while self.bytes > self.bytes_max && self.entries.len() > 1 {
            let e = self.entries.pop_front().expect("more than one");
            self.bytes -= entry_bytes(&e);
        }
    }

    /// Forgets the entries before `first`.
    pub(crate) fn compact(&mut self, first: u64) {
        while self.entries.front().is_some_and(|e| e.index < first) {
            let e = self.entries.pop_front().expect("front exists");
            self.bytes -= entry_bytes(&e);
        }
    }

    pub(crate) fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// Entries `low..high` with raft's size limit (at least one), if the tail holds them all.
    pub(crate) fn get(&self, low: u64, high: u64, max_size: u64) -> Option<Vec<Entry>> {
        let first = self.entries.front()?.index;
        let last = self.entries.back()?.index;
        if low < first || high > last + 1 {
            return None;
        }
        let mut out = Vec::with_capacity((high - low).min(1024) as usize);
        let mut bytes = 0u64;
        for e in self
            .entries
            .range((low - first) as usize..(high - first) as usize)
        {
            out.push(e.clone());
            // `limit_size` below decides exactly; this only stops copying once it would cut
            // (by the same measure: the encoded size).
            bytes = bytes.saturating_add(u64::from(protobuf::Message::compute_size(e)));
            if bytes > max_size {
                break;
            }
        }
        limit_size(&mut out, Some(max_size));
        Some(out)
    }
}

fn entry_bytes(e: &Entry) -> u64 {
    (e.data.len() + e.context.len()) as u64 + 32
}

/// The terms of the entries `first_index..=last_index`, as runs `(first index, term)`: terms only
/// change at elections, so a few runs cover the whole log.
#[derive(Debug, Default)]
pub(crate) struct TermRuns {
    pub(crate) runs: Vec<(u64, u64)>,
}

impl TermRuns {
    /// The runs of a log whose entries from `first` on have the terms `terms`, in order.
    pub(crate) fn from_terms(first: u64, terms: impl Iterator<Item = u64>) -> TermRuns {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (index, term) in (first..).zip(terms) {
            if runs.last().map(|&(_, t)| t) != Some(term) {
                runs.push((index, term));
            }
        }
        TermRuns { runs }
    }

    /// `index` must be in the log.
    pub(crate) fn term(&self, index: u64) -> u64 {
        let i = self.runs.partition_point(|&(start, _)| start <= index);
        assert!(i > 0, "term of {index}, before the log");
        self.runs[i - 1].1
    }

    /// `entries` (contiguous, starting inside the log or right after it) replace the log's tail.
    pub(crate) fn append(&mut self, entries: &[Entry]) {
        let start = entries[0].index;
        let keep = self.runs.partition_point(|&(s, _)| s < start);
        self.runs.truncate(keep);
        for e in entries {
            if self.runs.last().map(|&(_, t)| t) != Some(e.term) {
                self.runs.push((e.index, e.term));
            }
        }
    }

    /// The log now starts at `first` and ends at `last`.
    pub(crate) fn compact(&mut self, first: u64, last: u64) {
        if first > last {
            self.runs.clear();
            return;
        }
        let i = self.runs.partition_point(|&(start, _)| start <= first);
        assert!(i > 0, "compacting to {first}, before the log");
        self.runs.drain(..i - 1);
        self.runs[0].0 = first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            ..Entry::default()
        }
    }

    #[test]
    fn term_runs_follow_appends_and_compactions() {
        let mut t = TermRuns::default();
        t.append(&[entry(1, 1), entry(2, 1), entry(3, 2), entry(4, 2)]);
        assert_eq!(t.runs, [(1, 1), (3, 2)]);
        t.append(&[entry(3, 3)]);
        assert_eq!(t.runs, [(1, 1), (3, 3)]);
        t.append(&[entry(2, 1), entry(3, 1), entry(4, 4)]);
        assert_eq!(t.runs, [(1, 1), (4, 4)]);
        assert_eq!((1..=4).map(|i| t.term(i)).collect::<Vec<_>>(), [1, 1, 1, 4]);
        t.compact(3, 4);
        assert_eq!(t.runs, [(3, 1), (4, 4)]);
        t.compact(4, 4);
        assert_eq!(t.runs, [(4, 4)]);
        t.compact(5, 4);
        assert!(t.runs.is_empty());
        t.append(&[entry(5, 4)]);
        assert_eq!(t.runs, [(5, 4)]);
        let loaded = TermRuns::from_terms(3, [1, 1, 4, 4, 5].into_iter());
        assert_eq!(loaded.runs, [(3, 1), (5, 4), (7, 5)]);
    }
}
