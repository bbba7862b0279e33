//! `RaftLogDb` against raft-rs's storage semantics (the intent of `MemStorage`'s unit tests),
//! persistence across reopen, damaged files, and the rewrite of an earlier tally's LevelDB log
//! (with its corrupt values) at open.
//!
//! Unlike `MemStorage`, whose first stored entry may sit anywhere, a `RaftLogDb` log always
//! starts right after its snapshot point, whose term it keeps. The ported tests therefore build
//! "entries 3, 4, 5" as a snapshot point at (2, 2) followed by those entries.

use std::panic::{self, AssertUnwindSafe};
use std::path::Path;

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState};
use raft::{Error as RaftError, GetEntriesContext, Storage, StorageError};
use tally_core::replica::RaftLogStore;
use tally_storage::layout::{self, SnapshotPoint, Table};
use tally_storage::{LevelDbRaftLog, RaftLogDb};
use tempfile::TempDir;

use crate::raft_model::{entry, hard_state, snapshot, VOTERS};

/// A log's entries as (index, term).
type Log<'a> = &'a [(u64, u64)];

const COMPACTED: RaftError = RaftError::Store(StorageError::Compacted);
const UNAVAILABLE: RaftError = RaftError::Store(StorageError::Unavailable);

fn ctx() -> GetEntriesContext {
    GetEntriesContext::empty(false)
}

fn entries(list: &[(u64, u64)]) -> Vec<Entry> {
    list.iter().map(|&(i, t)| entry(i, t)).collect()
}

/// A log whose snapshot point is `snap` (if not at 0), followed by `list`, with commit `commit`.
fn log_with(snap: (u64, u64), list: &[(u64, u64)], commit: u64) -> (TempDir, RaftLogDb) {
    let dir = tempfile::tempdir().unwrap();
    let mut log = RaftLogDb::open(dir.path(), &VOTERS).unwrap();
    if snap.0 > 0 {
        log.apply_snapshot(&snapshot(snap.0, snap.1, b"")).unwrap();
    }
    let term = list.last().map_or(snap.1, |e| e.1);
    log.persist(&entries(list), Some(&hard_state(term, 1, commit)))
        .unwrap();
    (dir, log)
}

/// An earlier tally's LevelDB raft log in a new directory, as its writes left it: the snapshot
/// point `snap` with `descriptor` (none at 0), the entries `list`, `hard` at the last index, and
/// the conf state (`VOTERS` unless `conf` gives one, with its address book).
fn old_log_dir(
    snap: (u64, u64),
    descriptor: &[u8],
    list: &[(u64, u64)],
    hard: HardState,
    conf: Option<(&ConfState, &[u8])>,
) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut db = rusty_leveldb::DB::open(dir.path(), rusty_leveldb::Options::default()).unwrap();
    let mut batch = rusty_leveldb::WriteBatch::default();
    let voters = ConfState {
        voters: VOTERS.to_vec(),
        ..Default::default()
    };
    let (conf_state, book) = conf.map_or((&voters, None), |(c, b)| (c, Some(b)));
    batch.put(
        &layout::raft_conf_state_key(),
        &conf_state.write_to_bytes().unwrap(),
    );
    if let Some(book) = book {
        batch.put(&layout::raft_address_book_key(), book);
    }
    if snap.0 > 0 {
        let point = SnapshotPoint {
            index: snap.0,
            term: snap.1,
            descriptor: descriptor.to_vec(),
        };
        batch.put(&layout::raft_snapshot_key(), &point.encode());
    }
    for e in entries(list) {
        batch.put(
            &layout::raft_entry_key(e.index),
            &e.write_to_bytes().unwrap(),
        );
    }
    let last = list.last().map_or(snap.0, |e| e.0);
    batch.put(
        &layout::raft_hard_state_at_key(last),
        &hard.write_to_bytes().unwrap(),
    );
    db.write(batch, true).unwrap();
    db.close().unwrap();
    dir
}

/// `log_with` in an earlier tally's LevelDB log, opened as such.
fn old_log_with(snap: (u64, u64), list: &[(u64, u64)], commit: u64) -> (TempDir, LevelDbRaftLog) {
    let term = list.last().map_or(snap.1, |e| e.1);
    let dir = old_log_dir(snap, b"", list, hard_state(term, 1, commit), None);
    let log = LevelDbRaftLog::open(dir.path(), &VOTERS).unwrap();
    (dir, log)
}

/// The log holding 3, 4, 5 (terms 3, 4, 5) after a snapshot point at (2, 2), commit 2.
fn log_345() -> (TempDir, RaftLogDb) {
    log_with((2, 2), &[(3, 3), (4, 4), (5, 5)], 2)
}

/// Checks that `log` holds exactly `want` after its snapshot point `snap`, before and after a
/// reopen; returns the reopened log.
fn check_log(dir: &Path, log: RaftLogDb, snap: (u64, u64), want: &[(u64, u64)]) -> RaftLogDb {
    let mut log = log;
    for reopened in [false, true] {
        if reopened {
            drop(log);
            log = RaftLogDb::open(dir, &VOTERS).unwrap();
        }
        let at = if reopened { "after reopen" } else { "" };
        assert_eq!(log.first_index(), Ok(snap.0 + 1), "{at}");
        assert_eq!(log.last_index(), Ok(snap.0 + want.len() as u64), "{at}");
        assert_eq!(log.term(snap.0), Ok(snap.1), "{at}");
        assert_eq!(log.entry_count(), want.len() as u64);
        let last = log.last_index().unwrap();
        let got = log.entries(snap.0 + 1, last + 1, None, ctx()).unwrap();
        assert_eq!(got, entries(want), "{at}");
        for &(i, t) in want {
            assert_eq!(log.term(i), Ok(t), "term({i}) {at}");
        }
        assert_eq!(log.term(last + 1), Err(UNAVAILABLE), "{at}");
        if snap.0 > 0 {
            assert_eq!(log.term(snap.0 - 1), Err(COMPACTED), "{at}");
        }
    }
    log
}

fn panics(f: impl FnOnce()) -> bool {
    panic::catch_unwind(AssertUnwindSafe(f)).is_err()
}

#[test]
fn term() {
    let (_dir, log) = log_345();
    let cases = [
        (1, Err(COMPACTED)),
        (2, Ok(2)),
        (3, Ok(3)),
        (4, Ok(4)),
        (5, Ok(5)),
        (6, Err(UNAVAILABLE)),
    ];
    for (idx, want) in cases {
        assert_eq!(log.term(idx), want, "term({idx})");
    }
}

#[test]
fn entries_respect_bounds_and_max_size() {
    let list = [(3, 3), (4, 4), (5, 5), (6, 6)];
    let (_dir, log) = log_with((2, 2), &list, 2);
    let size = |i: usize| u64::from(entry(list[i].0, list[i].1).compute_size());
    let cases = [
        (2, 6, u64::MAX, Err(COMPACTED)),
        (3, 4, u64::MAX, Ok(vec![(3, 3)])),
        (4, 5, u64::MAX, Ok(vec![(4, 4)])),
        (4, 6, u64::MAX, Ok(vec![(4, 4), (5, 5)])),
        (4, 7, u64::MAX, Ok(vec![(4, 4), (5, 5), (6, 6)])),
        (4, 4, u64::MAX, Ok(vec![])),
        // Even with a zero budget, the first entry is returned.
        (4, 7, 0, Ok(vec![(4, 4)])),
        (4, 7, size(1) + size(2), Ok(vec![(4, 4), (5, 5)])),
        (
            4,
            7,
            size(1) + size(2) + size(3) / 2,
            Ok(vec![(4, 4), (5, 5)]),
        ),
        (
            4,
            7,
            size(1) + size(2) + size(3) - 1,
            Ok(vec![(4, 4), (5, 5)]),
        ),
        (
            4,
            7,
            size(1) + size(2) + size(3),
            Ok(vec![(4, 4), (5, 5), (6, 6)]),
        ),
    ];
    for (low, high, max, want) in cases {
        let got = log.entries(low, high, max, ctx());
        assert_eq!(
            got,
            want.map(|w| entries(&w)),
            "entries({low}, {high}, {max})"
        );
    }
    assert!(
        panics(|| drop(log.entries(4, 8, None, ctx()))),
        "high > last + 1"
    );
}

#[test]
fn first_and_last_index() {
    let dir = tempfile::tempdir().unwrap();
    let log = RaftLogDb::open(dir.path(), &VOTERS).unwrap();
    assert_eq!((log.first_index(), log.last_index()), (Ok(1), Ok(0)));
    assert_eq!(log.term(0), Ok(0));
    assert_eq!(log.term(1), Err(UNAVAILABLE));
    let state = log.initial_state().unwrap();
    assert_eq!(state.hard_state, HardState::default());
    assert_eq!(state.conf_state.voters, VOTERS);
    assert!(state.initialized());

    let (_dir, mut log) = log_with((2, 2), &[(3, 3), (4, 4), (5, 5)], 5);
    assert_eq!((log.first_index(), log.last_index()), (Ok(3), Ok(5)));
    log.persist(&entries(&[(6, 5)]), None).unwrap();
    assert_eq!(log.last_index(), Ok(6));
    log.compact(3).unwrap();
    assert_eq!((log.first_index(), log.last_index()), (Ok(4), Ok(6)));
    log.set_commit(6).unwrap();
    log.compact(6).unwrap();
    assert_eq!((log.first_index(), log.last_index()), (Ok(7), Ok(6)));
    assert_eq!(log.term(6), Ok(5));
}

#[test]
fn compact() {
    // (index, first index after, the log's entries after)
    let cases: [(u64, u64, Log); 4] = [
        (2, 3, &[(3, 3), (4, 4), (5, 5)]),
        (3, 4, &[(4, 4), (5, 5)]),
        (4, 5, &[(5, 5)]),
        (5, 6, &[]),
    ];
    for (index, first, want) in cases {
        let (dir, mut log) = log_with((2, 2), &[(3, 3), (4, 4), (5, 5)], 5);
        log.compact(index).unwrap();
        let snap = (first - 1, first - 1);
        check_log(dir.path(), log, snap, want);
    }
    // Below the snapshot point, or past the commit index: programmer errors, and nothing changes.
    let (dir, mut log) = log_with((2, 2), &[(3, 3), (4, 4), (5, 5)], 4);
    assert!(panics(|| log.compact(1).unwrap()));
    assert!(panics(|| log.compact(5).unwrap()));
    let mut log = check_log(dir.path(), log, (2, 2), &[(3, 3), (4, 4), (5, 5)]);
    // A commit raised by set_commit allows compacting further, and becomes durable with it.
    log.set_commit(5).unwrap();
    log.compact(5).unwrap();
    let log = check_log(dir.path(), log, (5, 5), &[]);
    assert_eq!(log.hard_state().commit, 5);
}

#[test]
fn snapshot_is_the_snapshot_point_with_its_descriptor() {
    let unavailable = Err(RaftError::Store(
        StorageError::SnapshotTemporarilyUnavailable,
    ));
    let (dir, mut log) = log_with((0, 0), &[(1, 1), (2, 1), (3, 2), (4, 2), (5, 3)], 5);
    // Never compacted: there is nothing to send (raft-rs refuses an empty snapshot).
    assert_eq!(log.snapshot(0, 2), unavailable);
    log.set_snapshot_descriptor(b"ledger@3".to_vec());
    log.compact(3).unwrap();
    let mut want = snapshot(3, 2, b"ledger@3");
    let conf: &ConfState = want.get_metadata().get_conf_state();
    assert_eq!(conf.voters, VOTERS);
    for request in [0, 1, 3] {
        assert_eq!(
            log.snapshot(request, 2),
            Ok(want.clone()),
            "request {request}"
        );
    }
    assert_eq!(log.snapshot(4, 2), unavailable);
    // Without a new descriptor, compacting keeps the current one.
    log.compact(4).unwrap();
    want.mut_metadata().index = 4;
    assert_eq!(log.snapshot(4, 2), Ok(want.clone()));
    // A descriptor waits for a compact that moves the point.
    log.set_snapshot_descriptor(b"ledger@5".to_vec());
    log.compact(4).unwrap();
    assert_eq!(log.snapshot(0, 2), Ok(want));
    log.compact(5).unwrap();
    let want = snapshot(5, 3, b"ledger@5");
    assert_eq!(log.snapshot(0, 2), Ok(want.clone()));
    drop(log);
    let log = RaftLogDb::open(dir.path(), &VOTERS).unwrap();
    assert_eq!(log.snapshot(0, 2), Ok(want));
    assert_eq!(
        log.snapshot_point(),
        &SnapshotPoint {
            index: 5,
            term: 3,
            descriptor: b"ledger@5".to_vec()
        }
    );
}

#[test]
fn persist_appends_and_replaces_conflicting_suffixes() {
    let base = [(3, 3), (4, 4), (5, 5)];
    // (entries to persist, the log after; None: a programmer error that must panic)
    let cases: [(Log, Option<Log>); 8] = [
        (&[(3, 3), (4, 4), (5, 5)], Some(&[(3, 3), (4, 4), (5, 5)])),
        (&[(3, 3), (4, 6), (5, 6)], Some(&[(3, 3), (4, 6), (5, 6)])),
        (
            &[(3, 3), (4, 4), (5, 5), (6, 5)],
            Some(&[(3, 3), (4, 4), (5, 5), (6, 5)]),
        ),
        // Overwriting compacted entries.
        (&[(2, 3), (3, 3), (4, 5)], None),
        // Truncating the log to the new last entry.
        (&[(4, 5)], Some(&[(3, 3), (4, 5)])),
        // Appending right after the last entry.
        (&[(6, 6)], Some(&[(3, 3), (4, 4), (5, 5), (6, 6)])),
        // A gap after the last entry.
        (&[(7, 7)], None),
        // Entries that are not contiguous.
        (&[(4, 4), (6, 6)], None),
    ];
    for (i, (new, want)) in cases.into_iter().enumerate() {
        let (dir, mut log) = log_345();
        let result = panic::catch_unwind(AssertUnwindSafe(|| {
            log.persist(&entries(new), None).unwrap();
        }));
        match want {
            Some(want) => {
                result.unwrap_or_else(|_| panic!("case {i}: {new:?} panicked"));
                check_log(dir.path(), log, (2, 2), want);
            }
            None => {
                assert!(result.is_err(), "case {i}: {new:?} must panic");
                // The assertion came before the write: the log is unchanged.
                check_log(dir.path(), log, (2, 2), &base);
            }
        }
    }
    // A committed entry is never replaced.
    let (_dir, mut log) = log_with((2, 2), &base, 4);
    assert!(panics(|| log.persist(&entries(&[(4, 6)]), None).unwrap()));
    log.persist(&entries(&[(5, 6)]), None).unwrap();
}

#[test]
fn apply_snapshot_replaces_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = RaftLogDb::open(dir.path(), &VOTERS).unwrap();
    log.apply_snapshot(&snapshot(4, 4, b"s4")).unwrap();
    let log = check_log(dir.path(), log, (4, 4), &[]);
    assert_eq!(log.hard_state(), &hard_state(4, 0, 4));
    // An older snapshot than the log's start: raft never asks for it.
    let mut log = log;
    assert!(panics(|| log.apply_snapshot(&snapshot(3, 3, b"")).unwrap()));
    assert!(panics(|| log.apply_snapshot(&snapshot(4, 4, b"")).unwrap()));

    // The entries are dropped, even those after the snapshot's index; the hard state's term and
    // commit move up to the snapshot's but never back; a pending descriptor is forgotten.
    let (dir, mut log) = log_with((2, 2), &[(3, 3), (4, 4), (5, 5), (6, 7)], 3);
    log.set_snapshot_descriptor(b"stale".to_vec());
    log.apply_snapshot(&snapshot(5, 6, b"s5")).unwrap();
    let mut log = check_log(dir.path(), log, (5, 6), &[]);
    assert_eq!(log.hard_state(), &hard_state(7, 1, 5));
    assert_eq!(log.snapshot_point().descriptor, b"s5");
    log.persist(&entries(&[(6, 7), (7, 7)]), None).unwrap();
    log.compact(5).unwrap();
    log.set_commit(6).unwrap();
    log.compact(6).unwrap();
    assert_eq!(log.snapshot_point().descriptor, b"s5");
    assert_eq!(log.term(6), Ok(7));
}

#[test]
fn everything_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let reopen = |log: RaftLogDb| {
        drop(log);
        RaftLogDb::open(dir.path(), &VOTERS).unwrap()
    };
    let mut log = RaftLogDb::open(dir.path(), &VOTERS).unwrap();
    let list: Vec<(u64, u64)> = (1..=10).map(|i| (i, 1 + i / 4)).collect();
    log.persist(&entries(&list), Some(&hard_state(3, 2, 3)))
        .unwrap();
    // A commit from set_commit is durable with the next persist, even one without a hard state.
    log.set_commit(7).unwrap();
    log.persist(&entries(&[(11, 3)]), None).unwrap();
    let mut log = reopen(log);
    assert_eq!(log.hard_state(), &hard_state(3, 2, 7));
    assert_eq!(log.initial_state().unwrap().hard_state, hard_state(3, 2, 7));
    assert_eq!(log.initial_state().unwrap().conf_state.voters, VOTERS);
    let all: Vec<(u64, u64)> = list.iter().copied().chain([(11, 3)]).collect();
    assert_eq!(log.entries(1, 12, None, ctx()).unwrap(), entries(&all));

    // ... and lost without one (the server restarts raft from the durable commit).
    log.set_commit(9).unwrap();
    let mut log = reopen(log);
    assert_eq!(log.hard_state().commit, 7);

    log.set_snapshot_descriptor(b"ledger@5".to_vec());
    log.compact(5).unwrap();
    let mut log = check_log(dir.path(), log, (5, 2), &all[5..]);
    assert_eq!(log.snapshot_point().descriptor, b"ledger@5");
    assert_eq!(log.hard_state(), &hard_state(3, 2, 7));

    let mut snap = snapshot(20, 4, b"snap@20");
    snap.mut_metadata().mut_conf_state().voters = vec![3, 1, 2];
    log.apply_snapshot(&snap).unwrap();
    let log = check_log(dir.path(), log, (20, 4), &[]);
    assert_eq!(log.snapshot_point().descriptor, b"snap@20");
    assert_eq!(log.conf_state().voters, [3, 1, 2]);
    assert_eq!(log.hard_state(), &hard_state(4, 2, 20));
    assert_eq!(log.snapshot(0, 1).unwrap(), snap);
    log.close().unwrap();
}

#[test]
fn writes_are_synced() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = RaftLogDb::open(dir.path(), &VOTERS).unwrap();
    let stats = log.sync_stats();
    let mut syncs = stats.file_syncs();
    let mut check = |log: &mut RaftLogDb, what: &str, f: &dyn Fn(&mut RaftLogDb)| {
        f(log);
        assert!(stats.file_syncs() > syncs, "{what} must fsync");
        syncs = stats.file_syncs();
    };
    check(&mut log, "persist", &|l| {
        l.persist(&entries(&[(1, 1), (2, 1)]), None).unwrap()
    });
    check(&mut log, "persist of a hard state", &|l| {
        l.persist(&[], Some(&hard_state(1, 1, 2))).unwrap()
    });
    check(&mut log, "compact", &|l| l.compact(1).unwrap());
    check(&mut log, "apply_snapshot", &|l| {
        l.apply_snapshot(&snapshot(9, 2, b"")).unwrap()
    });
    let before = stats.file_syncs();
    log.set_commit(9).unwrap();
    assert_eq!(stats.file_syncs(), before, "set_commit stays in memory");
}

/// The configured voters make a new log's configuration; from then on it follows the
/// membership changes written to it, whatever the config says.
#[test]
fn configured_voters_only_make_a_new_log() {
    let dir = tempfile::tempdir().unwrap();
    drop(RaftLogDb::open(dir.path(), &[1, 2, 3]).unwrap());
    let mut log = RaftLogDb::open(dir.path(), &[1, 2, 4]).unwrap();
    assert_eq!(log.conf_state().voters, vec![1, 2, 3]);
    assert_eq!(log.address_book(), None);
    let conf = raft::eraftpb::ConfState {
        voters: vec![1, 2, 3],
        learners: vec![4],
        ..Default::default()
    };
    log.set_conf_state(&conf, b"book").unwrap();
    drop(log);
    let log = RaftLogDb::open(dir.path(), &[1]).unwrap();
    assert_eq!(log.conf_state(), &conf);
    assert_eq!(log.address_book(), Some(&b"book"[..]));
}

/// Builds an earlier tally's LevelDB log with a snapshot point at 2 and entries 3..=8,
/// overwrites `key` with `value`, then runs `read` and checks that it fails with an error naming
/// `table`.
fn check_corrupt(
    key: &[u8],
    value: &[u8],
    table: Table,
    read: impl FnOnce(LevelDbRaftLog, &Path) -> Result<(), String>,
) {
    let list: Vec<(u64, u64)> = (3..=8).map(|i| (i, i / 2)).collect();
    let (dir, mut log) = old_log_with((2, 1), &list, 4);
    log.raw_put(key, value).unwrap();
    match read(log, dir.path()) {
        Err(msg) => assert!(
            msg.contains(&table.to_string()),
            "error should name table {table}: {msg}"
        ),
        Ok(()) => panic!("corrupt {table} value read without error"),
    }
}

/// Opens the log as it is now kept, which rewrites the LevelDB one.
fn reopen(log: LevelDbRaftLog, dir: &Path) -> Result<(), String> {
    drop(log);
    RaftLogDb::open(dir, &VOTERS)
        .map(drop)
        .map_err(|e| e.to_string())
}

fn read_all(log: LevelDbRaftLog, _: &Path) -> Result<(), String> {
    log.entries(3, 9, None, ctx())
        .map(drop)
        .map_err(|e| e.to_string())
}

/// A corrupt value in an earlier tally's log is an error naming its table, in the LevelDB log
/// and when it is rewritten at open (which reads every entry).
#[test]
fn corrupt_values_of_a_leveldb_log_are_storage_errors() {
    let garbage = [0xff, 0xff, 0xff];
    let entry_5_at_6 = entry(5, 2).write_to_bytes().unwrap();
    // An entry in the middle of the log is read when it is needed.
    for value in [&garbage[..], &entry_5_at_6] {
        check_corrupt(
            &layout::raft_entry_key(6),
            value,
            Table::RaftEntry,
            read_all,
        );
        check_corrupt(&layout::raft_entry_key(6), value, Table::RaftEntry, reopen);
    }
    // The first and last entries are read at open.
    check_corrupt(
        &layout::raft_entry_key(3),
        &garbage,
        Table::RaftEntry,
        reopen,
    );
    check_corrupt(
        &layout::raft_entry_key(8),
        &garbage,
        Table::RaftEntry,
        reopen,
    );
    // Terms that go down along the log, at its end or in the middle (found while bisecting).
    let bad_term = entry(8, 0).write_to_bytes().unwrap();
    check_corrupt(
        &layout::raft_entry_key(8),
        &bad_term,
        Table::RaftEntry,
        reopen,
    );
    let bad_term = entry(6, 5).write_to_bytes().unwrap();
    check_corrupt(
        &layout::raft_entry_key(6),
        &bad_term,
        Table::RaftEntry,
        reopen,
    );
    // Entries outside first..=last.
    let e9 = entry(9, 4).write_to_bytes().unwrap();
    check_corrupt(&layout::raft_entry_key(9), &e9, Table::RaftEntry, reopen);
    let e2 = entry(2, 1).write_to_bytes().unwrap();
    check_corrupt(&layout::raft_entry_key(2), &e2, Table::RaftEntry, reopen);

    // The newest hard state (a `raft_entry` row, at the last index): unreadable, or with a
    // commit index past the last entry or behind the snapshot point.
    let hard = layout::raft_hard_state_at_key(8);
    check_corrupt(&hard, &garbage, Table::RaftEntry, reopen);
    let past = hard_state(4, 1, 9).write_to_bytes().unwrap();
    check_corrupt(&hard, &past, Table::RaftState, reopen);
    let behind = hard_state(4, 1, 1).write_to_bytes().unwrap();
    check_corrupt(&hard, &behind, Table::RaftState, reopen);
    // A hard state above the last entry names a last index whose entry is missing.
    let ok = hard_state(4, 1, 4).write_to_bytes().unwrap();
    check_corrupt(
        &layout::raft_hard_state_at_key(12),
        &ok,
        Table::RaftEntry,
        reopen,
    );
    // A hard state row of the old layout beside the new ones.
    check_corrupt(
        &layout::raft_hard_state_key(),
        &ok,
        Table::RaftState,
        reopen,
    );
    check_corrupt(
        &layout::raft_conf_state_key(),
        &garbage,
        Table::RaftState,
        reopen,
    );
    let snap = layout::raft_snapshot_key();
    check_corrupt(&snap, &[0; 15], Table::RaftState, reopen);
}

#[test]
fn an_emptied_conf_state_is_refused() {
    let (dir, mut log) = old_log_with((2, 2), &[(3, 3), (4, 4), (5, 5)], 2);
    log.raw_put(&layout::raft_conf_state_key(), b"").unwrap();
    drop(log);
    // An empty protobuf is a valid, empty conf state, but a log in use always has voters.
    assert!(RaftLogDb::open(dir.path(), &VOTERS).is_err());
}

/// Turns the log in `dir` (closed) into one written by an earlier tally: the newest hard state
/// and the last index in `raft_state` rows of their own (and every `raft_state` row under
/// `raft_state` v1's tag if `v1`).
fn make_old_layout(dir: &Path, v1: bool) {
    let mut db = rusty_leveldb::DB::open(dir, rusty_leveldb::Options::default()).unwrap();
    let scan =
        |db: &mut rusty_leveldb::DB, tag: [u8; 4]| crate::support::rows_with_prefix(db, &tag);
    let mut batch = rusty_leveldb::WriteBatch::default();
    let mut newest = None;
    for (key, value) in scan(&mut db, Table::RaftEntry.tag()) {
        if let Some(index) = layout::raft_hard_state_at_index(&key) {
            batch.delete(&key);
            newest = Some((index, value));
        }
    }
    let (last, hard) = newest.expect("a hard state row");
    batch.put(&layout::raft_hard_state_key(), &hard);
    batch.put(&layout::raft_last_index_key(), &last.to_le_bytes());
    db.write(batch, true).unwrap();
    if v1 {
        let rows = scan(&mut db, Table::RaftState.tag());
        assert!(
            rows.len() >= 4,
            "conf, hard, snap and last rows: {}",
            rows.len()
        );
        let mut batch = rusty_leveldb::WriteBatch::default();
        for (key, value) in &rows {
            let mut old = key.clone();
            old[..4].copy_from_slice(&layout::RAFT_STATE_V1_TAG);
            batch.put(&old, value);
            batch.delete(key);
        }
        db.write(batch, true).unwrap();
    }
    db.close().unwrap();
}

/// A LevelDB log written by an earlier tally keeps the hard state and the last index in
/// `raft_state` rows, possibly under `raft_state` v1's tag; opening reads them (moving them to
/// the hard state at the last index, and v1's rows to v2) and rewrites the log into segments,
/// which read and grow as before.
#[test]
fn logs_of_earlier_layouts_are_moved_to_the_current_one_at_open() {
    for v1 in [false, true] {
        let (dir, log) = old_log_with((2, 2), &[(3, 3), (4, 4), (5, 5)], 4);
        log.close().unwrap();
        make_old_layout(dir.path(), v1);
        let log = RaftLogDb::open(dir.path(), &VOTERS).unwrap();
        assert_eq!(log.hard_state(), &hard_state(5, 1, 4), "v1: {v1}");
        assert_eq!(log.snapshot_index(), 2);
        let mut log = check_log(dir.path(), log, (2, 2), &[(3, 3), (4, 4), (5, 5)]);
        log.persist(&entries(&[(6, 5)]), Some(&hard_state(5, 1, 6)))
            .unwrap();
        drop(log);
        let log = RaftLogDb::open(dir.path(), &VOTERS).unwrap();
        assert_eq!(log.hard_state(), &hard_state(5, 1, 6), "v1: {v1}");
        check_log(dir.path(), log, (2, 2), &[(3, 3), (4, 4), (5, 5), (6, 5)]);
    }
}

/// An earlier tally's LevelDB log (compacted, with a descriptor, a membership change and its
/// address book) opens as the same log, kept in segments from then on.
#[test]
fn a_leveldb_log_is_rewritten_into_segments_at_open() {
    let list: Vec<(u64, u64)> = (10..=40).map(|i| (i, 2 + i / 10)).collect();
    let conf = ConfState {
        voters: vec![1, 2, 3],
        learners: vec![4],
        ..Default::default()
    };
    let hard = hard_state(6, 1, 30);
    let dir = old_log_dir(
        (9, 2),
        b"ledger@9",
        &list,
        hard.clone(),
        Some((&conf, b"book")),
    );
    assert!(dir.path().join("CURRENT").exists());

    let log = RaftLogDb::open(dir.path(), &VOTERS).unwrap();
    assert!(
        !dir.path().join("CURRENT").exists(),
        "the LevelDB files are gone"
    );
    assert_eq!(log.hard_state(), &hard);
    assert_eq!(log.conf_state(), &conf);
    assert_eq!(log.address_book(), Some(&b"book"[..]));
    assert_eq!(log.snapshot_point().descriptor, b"ledger@9");
    let mut log = check_log(dir.path(), log, (9, 2), &list);
    log.persist(&entries(&[(41, 7)]), None).unwrap();
    let want: Vec<(u64, u64)> = list.iter().copied().chain([(41, 7)]).collect();
    check_log(dir.path(), log, (9, 2), &want);
}

fn segments(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    out.sort();
    out
}

/// A write that a crash cut short (the last record, partly on disk) is dropped at open: the log
/// is what it was before that write, and goes on from there.
#[test]
fn a_torn_last_write_is_dropped_and_the_log_goes_on() {
    let (dir, mut log) = log_with((2, 2), &[(3, 3), (4, 4)], 3);
    log.persist(&entries(&[(5, 4), (6, 4)]), Some(&hard_state(4, 1, 4)))
        .unwrap();
    drop(log);
    let seg = segments(dir.path()).pop().unwrap();
    let full = std::fs::metadata(&seg).unwrap().len();
    let last_record = entry(5, 4).compute_size() as u64 + entry(6, 4).compute_size() as u64;
    for cut in [1, 30, last_record] {
        let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
        f.set_len(full - cut).unwrap();
        drop(f);
        let log = RaftLogDb::open(dir.path(), &VOTERS).unwrap();
        assert_eq!(log.hard_state(), &hard_state(4, 1, 3), "cut {cut}");
        let mut log = check_log(dir.path(), log, (2, 2), &[(3, 3), (4, 4)]);
        log.persist(&entries(&[(5, 4), (6, 4)]), Some(&hard_state(4, 1, 4)))
            .unwrap();
        drop(log);
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), full, "cut {cut}");
    }
}

fn flip_byte(path: &Path, at: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at as usize] ^= 0x40;
    std::fs::write(path, bytes).unwrap();
}

/// A damaged byte anywhere but in the last record, or in meta, makes open fail naming the
/// table; a damaged entry read back after open fails its own checksum.
#[test]
fn damaged_files_are_storage_errors() {
    let list: Vec<(u64, u64)> = (3..=8).map(|i| (i, i / 2)).collect();
    let (dir, mut log) = log_with((2, 1), &list, 4);
    log.persist(&[], Some(&hard_state(4, 1, 5))).unwrap();
    drop(log);
    let seg = segments(dir.path()).pop().unwrap();
    for at in [3, 40, 500] {
        flip_byte(&seg, at);
        let err = RaftLogDb::open(dir.path(), &VOTERS).err().unwrap();
        assert!(err.to_string().contains("raft_entry"), "byte {at}: {err}");
        flip_byte(&seg, at);
    }
    let meta = dir.path().join("meta");
    flip_byte(&meta, 30);
    let err = RaftLogDb::open(dir.path(), &VOTERS).err().unwrap();
    assert!(err.to_string().contains("raft_state"), "{err}");
    flip_byte(&meta, 30);

    // Entries read from the files (the tail holds one) check their own CRC.
    let opts = tally_storage::StoreOptions {
        raft_tail_bytes: 1,
        ..Default::default()
    };
    let log = RaftLogDb::open_with_options(dir.path(), &VOTERS, opts).unwrap();
    let data = entry_data_of(5);
    let bytes = std::fs::read(&seg).unwrap();
    let at = bytes.windows(data.len()).position(|w| w == data).unwrap();
    flip_byte(&seg, at as u64 + 20);
    let err = log.entries(3, 9, None, ctx()).err().unwrap();
    assert!(err.to_string().contains("raft_entry"), "{err}");
}

fn entry_data_of(index: u64) -> Vec<u8> {
    crate::raft_model::entry_data(index, index / 2)
}

/// Terms that go down along the log are corruption, found at open.
#[test]
fn terms_going_down_are_refused_at_open() {
    let (dir, log) = log_with((2, 2), &[(3, 3), (4, 2)], 2);
    drop(log);
    let err = RaftLogDb::open(dir.path(), &VOTERS).err().unwrap();
    assert!(err.to_string().contains("raft_entry"), "{err}");
}

/// Segments roll over at `SEGMENT_BYTES`; compaction frees the whole ones before the entry it
/// keeps first, and the log reads the same after a reopen.
#[test]
fn compaction_frees_whole_segments() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = RaftLogDb::open(dir.path(), &VOTERS).unwrap();
    let big = (tally_storage::SEGMENT_BYTES / 4) as usize;
    let mut list = Vec::new();
    for i in 1..=10u64 {
        let mut e = entry(i, 1);
        e.data = vec![i as u8; big].into();
        log.persist(&[e], Some(&hard_state(1, 1, i))).unwrap();
        list.push((i, 1));
    }
    assert_eq!(log.segment_count(), 3);
    assert_eq!(segments(dir.path()).len(), 3);
    log.compact(5).unwrap();
    // Entry 6 is in the second segment (entries 5..=8).
    assert_eq!(log.segment_count(), 2);
    assert_eq!(segments(dir.path()).len(), 2);
    drop(log);
    let log = RaftLogDb::open(dir.path(), &VOTERS).unwrap();
    assert_eq!(log.first_index(), Ok(6));
    let got = log.entries(6, 11, None, ctx()).unwrap();
    assert_eq!(
        got.iter().map(|e| e.index).collect::<Vec<_>>(),
        [6, 7, 8, 9, 10]
    );
    assert!(got
        .iter()
        .all(|e| e.data.len() == big && e.data[0] == e.index as u8));
    assert_eq!(log.segment_count(), 2);
}
