//! Dumping a ledger, installing the dump in a new directory, and swapping directories.

use std::fs;
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rusty_leveldb::{LdbIterator, Options, DB};
use sha2::{Digest, Sha256};
use tally_core::ports::LedgerStore;
use tally_core::state::LedgerMeta;
use tally_core::{Error, Result};
use tally_storage::layout::{self, Table};
use tally_storage::transfer::{old_ledger_dir, COMPLETE_MARKER};
use tally_storage::{
    install_ledger_dir, recover_install, staged_ledger_dir, LedgerDb, LedgerInstaller, StoreOptions,
};
use tally_wire::PublicKey;

use crate::support::{check_chain, operator, seed, Chain, Model};

/// Decoded dump records: key, value.
type Records = Vec<(Vec<u8>, Vec<u8>)>;

/// A small memtable, so that the dumped database spans the memtable and several tables.
pub(crate) fn small() -> StoreOptions {
    StoreOptions {
        write_buffer_bytes: 16 << 10,
        state_write_buffer_bytes: 16 << 10,
        ..StoreOptions::default()
    }
}

/// A ledger of `batches` random batches in `dir`, closed, and the model of what it holds.
fn build(dir: &Path, batches: usize, seed: u64) -> Model {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut model = Model::default();
    let mut db = LedgerDb::open(dir, small()).unwrap();
    let mut chain = Chain::new(db.meta().unwrap(), seed);
    for _ in 0..batches {
        model.record(chain.step(&mut db, rng.gen_range(1..=40)));
    }
    db.close().unwrap();
    model
}

fn dump(dir: &Path, chunk_bytes_max: usize) -> (Vec<Vec<u8>>, LedgerMeta) {
    let mut db = LedgerDb::open(dir, small()).unwrap();
    let mut chunks = Vec::new();
    let meta = db
        .dump(chunk_bytes_max, |c| {
            chunks.push(c);
            Ok(())
        })
        .unwrap();
    assert_eq!(meta, db.meta().unwrap());
    (chunks, meta)
}

pub(crate) fn install(dir: &Path, chunks: &[Vec<u8>], operator: &PublicKey) -> Result<LedgerMeta> {
    let mut installer = LedgerInstaller::create(dir, small())?;
    for c in chunks {
        installer.push(c)?;
    }
    installer.finish(operator)
}

/// Every key and value, read with a plain LevelDB iterator.
fn pairs(dir: &Path) -> Records {
    let mut db = DB::open(dir, Options::default()).unwrap();
    let mut iter = db.new_iter().unwrap();
    let mut out = Vec::new();
    while let Some(pair) = iter.next() {
        out.push(pair);
    }
    out
}

#[test]
fn a_dump_installs_as_the_same_ledger() {
    let seed = seed();
    let tmp = tempfile::tempdir().unwrap();
    let (from, to) = (tmp.path().join("from"), tmp.path().join("to"));
    let mut model = build(&from, 40, seed);

    let (chunks, meta) = dump(&from, 1000);
    let (last, full) = chunks.split_last().unwrap();
    assert!(full.iter().all(|c| c.len() == 1000));
    assert!(!last.is_empty() && last.len() <= 1000);
    let longest = model.writes.iter().map(|w| w.body.len()).max().unwrap();
    assert!(
        longest > 2000,
        "bodies should span chunks ({longest} bytes)"
    );

    let installed = install(&to, &chunks, &operator().public()).unwrap();
    assert_eq!(installed, meta);
    assert!(
        to.join(COMPLETE_MARKER).is_file(),
        "finish marks the directory"
    );

    // The installed bodies are in its body log, its `body` rows name them.
    let body_rows: Vec<_> = pairs(&tally_storage::archive_dir(&to))
        .into_iter()
        .filter(|(k, _)| k[..4] == Table::Body.tag())
        .collect();
    assert_eq!(body_rows.len(), 40);
    for (_, v) in &body_rows {
        let at = tally_storage::bodies::Locator::decode(Table::Body, v).unwrap();
        assert!(at.is_some(), "an installed body row holds a locator");
    }

    let (old, new) = (pairs(&from), pairs(&to));
    assert!(old.iter().all(|(k, _)| k[..4] != Table::RaftState.tag()));
    assert_eq!(old.len(), new.len());
    for (o, n) in old.iter().zip(&new) {
        assert_eq!(o, n);
    }

    let mut db = LedgerDb::open(&to, small()).unwrap();
    model.check(&mut db);
    assert_eq!(check_chain(&mut db), meta);
    // The installed ledger carries on like the one it came from.
    let mut chain = Chain::new(db.meta().unwrap(), seed ^ 1);
    for _ in 0..5 {
        model.record(chain.step(&mut db, 20));
    }
    model.check(&mut db);
    // A dump of an open database, whose newest batches are still in the memtable.
    let mut chunks_open = Vec::new();
    let meta_open = db
        .dump(1000, |c| {
            chunks_open.push(c);
            Ok(())
        })
        .unwrap();
    assert_eq!(meta_open.height, meta.height + 5);
    drop(db);
    let third = tmp.path().join("third");
    assert_eq!(
        install(&third, &chunks_open, &operator().public()).unwrap(),
        meta_open
    );
    assert_eq!(pairs(&third), pairs(&to));

    // Dumps of the same state are byte for byte the same, whatever the chunk size.
    let (again, _) = dump(&from, 1 << 20);
    assert_eq!(again.concat(), chunks.concat());
}

/// The archive's rows reach the dump in groups of at most 4,096; a ledger with more request
/// records than that (2 groups and more) still dumps as itself, merged in key order.
#[test]
fn a_dump_merges_an_archive_of_several_groups() {
    let seed = seed();
    let tmp = tempfile::tempdir().unwrap();
    let (from, to) = (tmp.path().join("from"), tmp.path().join("to"));
    let mut model = Model::default();
    let mut db = LedgerDb::open(&from, small()).unwrap();
    let mut chain = Chain::new(db.meta().unwrap(), seed);
    for _ in 0..140 {
        model.record(chain.step(&mut db, 64));
    }
    db.close().unwrap();
    assert!(model.requests.len() > 2 * 4096, "{}", model.requests.len());
    let (chunks, meta) = dump(&from, 1 << 16);
    assert_eq!(install(&to, &chunks, &operator().public()).unwrap(), meta);
    let mut db = LedgerDb::open(&to, small()).unwrap();
    model.check(&mut db);
}

#[test]
fn a_new_ledger_dumps_as_an_empty_stream_that_does_not_install() {
    let tmp = tempfile::tempdir().unwrap();
    let mut db = LedgerDb::open(&tmp.path().join("new"), small()).unwrap();
    let mut chunks = Vec::new();
    let meta = db
        .dump(usize::MAX, |c| {
            chunks.push(c);
            Ok(())
        })
        .unwrap();
    assert_eq!(meta, LedgerMeta::genesis());
    assert_eq!(chunks.len(), 1);
    assert_eq!(records(&chunks[0]), [], "not even the open marker");
    let m = install_error(&tmp.path().join("to"), &chunks[0], &operator().public());
    assert!(m.contains("no summary"), "{m}");
}

#[test]
fn an_error_from_the_consumer_stops_the_dump() {
    let tmp = tempfile::tempdir().unwrap();
    build(tmp.path(), 5, 4);
    let mut db = LedgerDb::open(tmp.path(), small()).unwrap();
    let mut calls = 0;
    let e = db
        .dump(100, |_| {
            calls += 1;
            match calls {
                3 => Err(Error::stopped("the peer")),
                _ => Ok(()),
            }
        })
        .unwrap_err();
    assert_eq!(calls, 3);
    assert!(e.to_string().contains("the peer has stopped"), "{e}");
    // The database is unharmed.
    check_chain(&mut db);
}

#[test]
fn installing_needs_an_empty_directory() {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("stray"), b"x").unwrap();
    match LedgerInstaller::create(tmp.path(), small()) {
        Err(Error::Config(m)) => assert!(m.contains("not empty"), "{m}"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("installed over a file"),
    }
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    LedgerInstaller::create(&empty, small()).unwrap();
}

/// The records of a dump, decoded by hand from the format in the module docs.
pub(crate) fn records(stream: &[u8]) -> Records {
    assert_eq!(&stream[..5], b"TLYD\x01");
    let mut at = 5;
    let mut out = Vec::new();
    let field = |at: &mut usize, n: usize| {
        let f = stream[*at..*at + n].to_vec();
        *at += n;
        f
    };
    loop {
        let len = u32::from_le_bytes(field(&mut at, 4).try_into().unwrap());
        if len == u32::MAX {
            let expected = Sha256::digest(&stream[..at - 4]).to_vec();
            assert_eq!(field(&mut at, 32), expected, "checksum");
            assert_eq!(at, stream.len());
            return out;
        }
        let key = field(&mut at, len as usize);
        let len = u32::from_le_bytes(field(&mut at, 4).try_into().unwrap());
        out.push((key, field(&mut at, len as usize)));
    }
}

/// A well-formed stream of `records`, with the right checksum.
pub(crate) fn stream(records: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut s = b"TLYD\x01".to_vec();
    for (k, v) in records {
        s.extend_from_slice(&(k.len() as u32).to_le_bytes());
        s.extend_from_slice(k);
        s.extend_from_slice(&(v.len() as u32).to_le_bytes());
        s.extend_from_slice(v);
    }
    let checksum = Sha256::digest(&s);
    s.extend_from_slice(&u32::MAX.to_le_bytes());
    s.extend_from_slice(&checksum);
    s
}

pub(crate) fn install_error(dir: &Path, stream: &[u8], operator: &PublicKey) -> String {
    let chunks: Vec<Vec<u8>> = stream.chunks(997).map(|c| c.to_vec()).collect();
    match install(dir, &chunks, operator) {
        Err(e @ (Error::Corrupt { .. } | Error::Missing { .. })) => e.to_string(),
        Err(e) => panic!("not a storage error: {e}"),
        Ok(meta) => panic!("installed at height {}", meta.height),
    }
}

/// A small ledger's dump, decoded into its records.
fn source() -> (Vec<u8>, Records) {
    let tmp = tempfile::tempdir().unwrap();
    build(tmp.path(), 12, 17);
    let whole = dump(tmp.path(), 4096).0.concat();
    let recs = records(&whole);
    assert_eq!(stream(&recs), whole, "the hand-made encoder matches dump");
    (whole, recs)
}

fn position(recs: &[(Vec<u8>, Vec<u8>)], table: Table) -> usize {
    recs.iter()
        .position(|(k, _)| k.starts_with(&table.tag()))
        .unwrap()
}

#[test]
fn damaged_streams_are_refused() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let (whole, _) = source();
    let operator = operator().public();
    let tmp = tempfile::tempdir().unwrap();
    for i in 0..40 {
        let mut damaged = whole.clone();
        let at = match i {
            0 => 0,
            1 => 4,
            2 => whole.len() - 1,
            3 => whole.len() - 33,
            _ => rng.gen_range(0..whole.len()),
        };
        damaged[at] ^= 1 << rng.gen_range(0..8);
        let m = install_error(&tmp.path().join(i.to_string()), &damaged, &operator);
        println!("byte {at}: {m}");
    }
    let mut damaged = whole.clone();
    *damaged.last_mut().unwrap() ^= 1;
    let m = install_error(&tmp.path().join("sum"), &damaged, &operator);
    assert!(m.contains("checksum mismatch"), "{m}");
}

#[test]
fn truncated_streams_are_refused() {
    let (whole, _) = source();
    let operator = operator().public();
    let tmp = tempfile::tempdir().unwrap();
    for (i, len) in [
        0,
        3,
        5,
        9,
        whole.len() / 2,
        whole.len() - 36,
        whole.len() - 1,
    ]
    .into_iter()
    .enumerate()
    {
        let m = install_error(&tmp.path().join(i.to_string()), &whole[..len], &operator);
        assert!(m.contains("without its end record"), "length {len}: {m}");
    }
}

#[test]
fn an_oversize_length_is_refused_before_it_is_buffered() {
    let tmp = tempfile::tempdir().unwrap();
    let mut installer = LedgerInstaller::create(tmp.path(), small()).unwrap();
    let mut s = b"TLYD\x01\x24\0\0\0".to_vec();
    s.extend_from_slice(&layout::account_key(&[1; 32]));
    s.extend_from_slice(&u32::MAX.wrapping_sub(1).to_le_bytes());
    let e = installer.push(&s).unwrap_err().to_string();
    assert!(e.contains("over the limit"), "{e}");
    let e = installer.push(b"").unwrap_err().to_string();
    assert!(e.contains("an earlier chunk"), "{e}");
}

/// Streams with a correct checksum whose content does not check out.
#[test]
fn inconsistent_ledgers_are_refused() {
    let (_, recs) = source();
    let operator = operator().public();
    let tmp = tempfile::tempdir().unwrap();
    let mut case = 0;
    let mut check = |mutate: &dyn Fn(&mut Records), expected: &str| {
        let mut r = recs.clone();
        mutate(&mut r);
        case += 1;
        let m = install_error(&tmp.path().join(case.to_string()), &stream(&r), &operator);
        assert!(m.contains(expected), "{m:?} should contain {expected:?}");
    };
    // Two balances swapped: same count, same total, only the sum of terms can tell.
    check(
        &|r| {
            let a = position(r, Table::Account);
            let (x, y) = (r[a].1.clone(), r[a + 1].1.clone());
            assert_ne!(x, y, "pick accounts with different balances");
            r[a].1 = y;
            r[a + 1].1 = x;
        },
        "map_root",
    );
    check(
        &|r| {
            let a = position(r, Table::Account);
            r.remove(a);
        },
        "account_count",
    );
    check(
        &|r| {
            let a = position(r, Table::Account);
            r[a].1.push(0);
        },
        "account/v1",
    );
    check(
        &|r| {
            r.retain(|(k, _)| k != &layout::meta_key());
        },
        "no summary",
    );
    check(
        &|r| {
            let h = r
                .iter()
                .rposition(|(k, _)| k.starts_with(&Table::Header.tag()));
            r.remove(h.unwrap());
        },
        "headers for a summary at height 12",
    );
    check(
        &|r| {
            let h = position(r, Table::Header);
            r.remove(h + 3);
        },
        "height 5 where 4 was due",
    );
    check(
        &|r| {
            let b = position(r, Table::Body);
            r.remove(b);
        },
        "bodies",
    );
    check(
        &|r| {
            let b = position(r, Table::Body);
            let last = r[b].1.len() - 1;
            r[b].1[last] ^= 1;
        },
        "does not hash to its key",
    );
    check(
        &|r| {
            let q = position(r, Table::Request);
            r.remove(q);
        },
        "request records",
    );
    check(
        &|r| {
            let a = position(r, Table::Account);
            r.swap(a, a + 1);
        },
        "keys must strictly increase",
    );
    check(
        &|r| {
            let a = position(r, Table::Account);
            let dup = r[a].clone();
            r.insert(a, dup);
        },
        "keys must strictly increase",
    );
    check(
        &|r| {
            r.insert(0, (layout::raft_snapshot_key().to_vec(), vec![0; 16]));
        },
        "raft log",
    );
    check(
        &|r| {
            r.push((vec![0xff; 8], vec![]));
        },
        "unknown table tag",
    );
    // A header whose signature is bad but whose hash chain holds, for the summary to match.
    check(
        &|r| {
            let h = r
                .iter()
                .rposition(|(k, _)| k.starts_with(&Table::Header.tag()));
            // The signature's last byte: a header row is the signed header, then the digest.
            r[h.unwrap()].1[tally_wire::SIGNED_HEADER_BYTES - 1] ^= 1;
        },
        "does not verify under the operator key",
    );
    // The tip's body digest names no body (caught when the installed ledger is reopened).
    check(
        &|r| {
            let h = r
                .iter()
                .rposition(|(k, _)| k.starts_with(&Table::Header.tag()));
            let last = r[h.unwrap()].1.len() - 1;
            r[h.unwrap()].1[last] ^= 1;
        },
        "no body for the digest stored at height 12",
    );
}

#[test]
fn the_wrong_operator_key_is_refused() {
    let (whole, _) = source();
    let tmp = tempfile::tempdir().unwrap();
    let m = install_error(tmp.path(), &whole, &[9; 32]);
    assert!(m.contains("header 12 does not verify"), "{m}");
}

/// The height of the ledger in `dir`.
fn height(dir: &Path) -> u64 {
    LedgerDb::open(dir, small()).unwrap().meta().unwrap().height
}

/// `<live>` holding a ledger at height 3, and a staged install of one at height 7, complete or
/// interrupted halfway.
fn swap_setup(root: &Path, complete: bool) -> (std::path::PathBuf, std::path::PathBuf) {
    let live = root.join("ledger");
    build(&live, 3, 1);
    let source = root.join("source");
    build(&source, 7, 2);
    let chunks = dump(&source, 512).0;
    let staged = staged_ledger_dir(&live);
    if complete {
        install(&staged, &chunks, &operator().public()).unwrap();
    } else {
        let mut installer = LedgerInstaller::create(&staged, small()).unwrap();
        for c in &chunks[..chunks.len() / 2] {
            installer.push(c).unwrap();
        }
    }
    (live, staged)
}

fn assert_clean(live: &Path, expected_height: u64) {
    assert_eq!(height(live), expected_height);
    assert!(!staged_ledger_dir(live).exists());
    assert!(!old_ledger_dir(live).exists());
    assert!(!live.join(COMPLETE_MARKER).exists());
}

#[test]
fn install_swaps_the_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let (live, staged) = swap_setup(tmp.path(), true);
    install_ledger_dir(&live, &staged).unwrap();
    assert_clean(&live, 7);
    // Into a place where no ledger was yet.
    let fresh = tmp.path().join("fresh");
    let chunks = dump(&live, 4096).0;
    install(&staged_ledger_dir(&fresh), &chunks, &operator().public()).unwrap();
    install_ledger_dir(&fresh, &staged_ledger_dir(&fresh)).unwrap();
    assert_clean(&fresh, 7);
}

#[test]
fn install_refuses_an_incomplete_staged_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let (live, staged) = swap_setup(tmp.path(), false);
    let e = install_ledger_dir(&live, &staged).unwrap_err().to_string();
    assert!(e.contains("not a complete ledger install"), "{e}");
    assert_eq!(height(&live), 3);
}

/// Each crash point of `install_ledger_dir`, the state it leaves and what recovery makes of it.
#[test]
fn recovery_finishes_or_undoes_an_interrupted_swap() {
    struct Case {
        name: &'static str,
        staged_complete: bool,
        /// How far the swap got: 0 nothing, 1 live renamed away, 2 staged renamed into place.
        renames: usize,
        height: u64,
    }
    let cases = [
        Case {
            name: "crash before the swap",
            staged_complete: true,
            renames: 0,
            height: 3,
        },
        Case {
            name: "crash while installing",
            staged_complete: false,
            renames: 0,
            height: 3,
        },
        Case {
            name: "crash between the renames, staged complete",
            staged_complete: true,
            renames: 1,
            height: 7,
        },
        Case {
            name: "crash between the renames, staged incomplete",
            staged_complete: false,
            renames: 1,
            height: 3,
        },
        Case {
            name: "crash before removing the old directory",
            staged_complete: true,
            renames: 2,
            height: 7,
        },
    ];
    for case in cases {
        let tmp = tempfile::tempdir().unwrap();
        let (live, staged) = swap_setup(tmp.path(), case.staged_complete);
        let old = old_ledger_dir(&live);
        if case.renames >= 1 {
            fs::rename(&live, &old).unwrap();
        }
        if case.renames >= 2 {
            fs::rename(&staged, &live).unwrap();
        }
        recover_install(&live).unwrap();
        assert_eq!(height(&live), case.height, "{}", case.name);
        assert_clean(&live, case.height);
        recover_install(&live).unwrap();
        assert_clean(&live, case.height);
    }
}

#[test]
fn recovery_of_a_new_node() {
    let tmp = tempfile::tempdir().unwrap();
    let live = tmp.path().join("ledger");
    recover_install(&live).unwrap();
    assert!(!live.exists());
    // A complete install that crashed before its only rename still wins.
    build(&tmp.path().join("source"), 4, 3);
    let chunks = dump(&tmp.path().join("source"), 4096).0;
    install(&staged_ledger_dir(&live), &chunks, &operator().public()).unwrap();
    recover_install(&live).unwrap();
    assert_clean(&live, 4);
}
