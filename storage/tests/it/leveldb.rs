//! The changes tally carries in rusty-leveldb (storage/vendor/README.md): a point read looks
//! past a newer table that does not hold the key, even when that table's next key is a
//! deletion; the memtable's skip list searches ascending inserts from the last one; a memtable
//! flush writes only the versions a reader can see.

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};

use rusty_leveldb::env::{FileLock, Logger, RandomAccess};
use rusty_leveldb::{
    DefaultCmp, FilterPolicy, LdbIterator, Options, Result as LdbResult, SkipMap, Status,
    StatusCode, WriteBatch, DB,
};

/// A filter that lets every key through: what a bloom filter's false positive does for one key.
struct EveryKey;

impl FilterPolicy for EveryKey {
    fn name(&self) -> &'static str {
        "tally.test.EveryKey"
    }
    fn create_filter(&self, _keys: &[u8], _key_offsets: &[usize]) -> Vec<u8> {
        vec![0] // rusty-leveldb asserts that a filter is not empty
    }
    fn key_may_match(&self, _key: &[u8], _filter: &[u8]) -> bool {
        true
    }
}

fn options() -> Options {
    Options {
        // As tally's databases: opening writes the log into a table (`state_leveldb_options`).
        reuse_logs: false,
        reuse_manifest: false,
        filter_policy: Rc::new(Box::new(EveryKey)),
        ..Options::default()
    }
}

/// Writes `rows` (a `None` value deletes) and reopens the database, which turns its log into
/// a new table.
fn table(dir: &std::path::Path, rows: &[(&[u8], Option<&[u8]>)]) {
    let mut db = DB::open(dir, options()).expect("open");
    for (k, v) in rows {
        match v {
            Some(v) => db.put(k, v).expect("put"),
            None => db.delete(k).expect("delete"),
        }
    }
    db.flush().expect("flush");
    drop(db);
    drop(DB::open(dir, options()).expect("reopen"));
}

/// rusty-leveldb 4.0.2 answered `None` here: the newer table's entry after "b" deletes "c".
#[test]
fn a_point_read_looks_past_a_newer_tables_deletion_of_another_key() {
    let dir = tempfile::tempdir().unwrap();
    table(dir.path(), &[(b"b", Some(b"old table"))]);
    // The newer table spans "a".."c" without "b".
    table(dir.path(), &[(b"a", Some(b"x")), (b"c", None)]);
    let mut db = DB::open(dir.path(), options()).expect("open");
    assert_eq!(db.get(b"b").as_deref(), Some(&b"old table"[..]));
    assert_eq!(db.get(b"c"), None, "a deleted key stays deleted");
    assert_eq!(db.get(b"a").as_deref(), Some(&b"x"[..]));
}

/// Keys in the orders a memtable sees: ascending runs (tally's sorted write groups) that start
/// below, inside and above what the map holds, descending runs, and random keys.
fn key_orders(rng: &mut StdRng, rounds: usize) -> Vec<Vec<u8>> {
    let mut keys = Vec::new();
    for _ in 0..rounds {
        let len = rng.gen_range(1..200);
        let mut run: Vec<Vec<u8>> = (0..len)
            .map(|_| {
                let n = rng.gen_range(1..6);
                (0..n).map(|_| rng.gen_range(0..8u8)).collect()
            })
            .collect();
        match rng.gen_range(0..3) {
            0 => run.sort(),
            1 => run.sort_by(|a, b| b.cmp(a)),
            _ => {}
        }
        keys.extend(run);
    }
    keys
}

/// The skip list with the finger (tally patch in `skipmap.rs`) holds and orders exactly the keys
/// put in, whatever their order.
#[test]
fn the_skip_list_orders_keys_inserted_in_any_order() {
    let seed = crate::support::seed();
    let mut rng = StdRng::seed_from_u64(seed);
    for _ in 0..20 {
        let mut map = SkipMap::new(Rc::new(Box::new(DefaultCmp)));
        let mut model = BTreeSet::new();
        for key in key_orders(&mut rng, 30) {
            if model.insert(key.clone()) {
                map.insert(key, b"v".to_vec());
            }
        }
        let mut it = map.iter();
        let mut held = Vec::new();
        while it.advance() {
            held.push(it.current().expect("a current entry").0.to_vec());
        }
        let expected: Vec<Vec<u8>> = model.iter().cloned().collect();
        assert_eq!(held, expected, "seed {seed}");
        assert_eq!(map.len(), model.len(), "seed {seed}");
        for key in &model {
            assert!(map.contains(key), "seed {seed}: {key:?} is missing");
        }
    }
}

/// Through the database: writes of keys in every order, a key written again within a write and
/// across writes, deletions; the memtable answers reads and iterates as the model does.
#[test]
fn the_memtable_answers_as_a_map_whatever_the_order_of_writes() {
    let seed = crate::support::seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let options = Options {
        write_buffer_size: 64 << 20, // everything stays in the memtable
        ..rusty_leveldb::in_memory()
    };
    let mut db = DB::open("memtable", options).expect("open");
    let mut model = BTreeMap::new();
    for round in 0..40u32 {
        let mut batch = WriteBatch::default();
        for key in key_orders(&mut rng, 3) {
            if rng.gen_range(0..10) == 0 {
                batch.delete(&key);
                model.remove(&key);
            } else {
                let value = round.to_le_bytes().to_vec();
                batch.put(&key, &value);
                model.insert(key, value);
            }
        }
        db.write(batch, false).expect("write");
    }
    for (key, value) in &model {
        assert_eq!(
            db.get(key).as_deref(),
            Some(&value[..]),
            "seed {seed}: {key:?}"
        );
    }
    for key in key_orders(&mut rng, 5) {
        assert_eq!(
            db.get(&key).map(|v| v.to_vec()),
            model.get(&key).cloned(),
            "seed {seed}"
        );
    }
    let mut it = db.new_iter().expect("iterator");
    let mut held = Vec::new();
    while it.advance() {
        let (k, v) = it.current().expect("a current entry");
        held.push((k.to_vec(), v.to_vec()));
    }
    let expected: Vec<(Vec<u8>, Vec<u8>)> = model.into_iter().collect();
    assert_eq!(held, expected, "seed {seed}");
}

/// A batch written with `write_ref` and `reset` (tally patch in `write_batch.rs`) writes only
/// the rows put after the reset, with sequence numbers after the previous write's: a later put
/// of a key wins, and a reopened database reads the same from its log.
#[test]
fn a_reused_batch_writes_only_the_rows_put_since_its_reset() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = DB::open(dir.path(), options()).expect("open");
    let mut batch = WriteBatch::default();
    batch.put(b"a", b"1");
    batch.put(b"b", b"1");
    db.write_ref(&mut batch, true).expect("write");
    batch.reset(1 << 10);
    assert_eq!(batch.count(), 0);
    batch.put(b"b", b"2");
    batch.delete(b"a");
    db.write_ref(&mut batch, true).expect("write");
    batch.reset(0);
    db.write_ref(&mut batch, true).expect("an empty write");
    let check = |db: &mut DB| {
        assert_eq!(db.get(b"a"), None);
        assert_eq!(db.get(b"b").as_deref(), Some(&b"2"[..]));
    };
    check(&mut db);
    drop(db);
    check(&mut DB::open(dir.path(), options()).expect("reopen"));
}

/// Bytes of the table files in `dir`.
fn table_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ldb"))
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum()
}

/// A memtable flush (tally patch `build_memtable_table`) writes only the versions a reader can
/// still see: the newest of each key, and any a live snapshot reads. Random rewrites and
/// deletions of a few keys through many flushes and merges read as the model does, now, at
/// every snapshot taken on the way, and after a reopen.
#[test]
fn a_flush_drops_only_the_versions_no_reader_can_see() {
    let seed = crate::support::seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let options = || Options {
        write_buffer_size: 64 << 10,
        ..options()
    };
    let mut db = DB::open(dir.path(), options()).expect("open");
    let mut model = BTreeMap::new();
    let mut snapshots = Vec::new();
    let keys: Vec<Vec<u8>> = (0..20u8).map(|k| vec![b'k', k]).collect();
    for round in 0..3_000u32 {
        let key = &keys[rng.gen_range(0..keys.len())];
        if rng.gen_range(0..8) == 0 {
            db.delete(key).expect("delete");
            model.remove(key);
        } else {
            let value = [round.to_le_bytes().as_slice(), &[7; 200]].concat();
            db.put(key, &value).expect("put");
            model.insert(key.clone(), value);
        }
        if round % 700 == 500 {
            snapshots.push((db.get_snapshot(), model.clone()));
        }
        if round == 400 {
            // ~400 versions of 20 keys (~90 KiB) have made one flush; no merge yet.
            assert!(
                table_bytes(dir.path()) < 16 << 10,
                "seed {seed}: the flushed table holds hidden versions: {} bytes",
                table_bytes(dir.path())
            );
        }
    }
    let check = |db: &mut DB, model: &BTreeMap<Vec<u8>, Vec<u8>>, what: &str| {
        for key in &keys {
            let got = db.get(key).map(|v| v.to_vec());
            assert_eq!(got.as_ref(), model.get(key), "seed {seed}, {what}: {key:?}");
        }
    };
    for (i, (snapshot, then)) in snapshots.iter().enumerate() {
        for key in &keys {
            let got = db.get_at(snapshot, key).expect("read").map(|v| v.to_vec());
            assert_eq!(
                got.as_ref(),
                then.get(key),
                "seed {seed}, snapshot {i}: {key:?}"
            );
        }
    }
    check(&mut db, &model, "now");
    drop(snapshots);
    drop(db);
    check(
        &mut DB::open(dir.path(), options()).expect("reopen"),
        &model,
        "reopened",
    );
}

/// A disk env that fails the creation of table file number `fail_at` (counting from 1), as a
/// full disk fails a merge's output, and notes how many tables were created when one was first
/// deleted (a merge creates its output before it deletes its inputs).
struct FailingTables {
    inner: rusty_leveldb::PosixDiskEnv,
    created: Rc<std::cell::Cell<usize>>,
    created_at_first_delete: Rc<std::cell::Cell<Option<usize>>>,
    fail_at: usize,
}

impl rusty_leveldb::env::Env for FailingTables {
    fn open_sequential_file(&self, p: &Path) -> LdbResult<Box<dyn std::io::Read>> {
        self.inner.open_sequential_file(p)
    }
    fn open_random_access_file(&self, p: &Path) -> LdbResult<Box<dyn RandomAccess>> {
        self.inner.open_random_access_file(p)
    }
    fn open_writable_file(&self, p: &Path) -> LdbResult<Box<dyn std::io::Write>> {
        if p.extension().is_some_and(|e| e == "ldb") {
            self.created.set(self.created.get() + 1);
            if self.created.get() == self.fail_at {
                return Err(Status::new(StatusCode::IOError, "no space left (test)"));
            }
        }
        self.inner.open_writable_file(p)
    }
    fn open_appendable_file(&self, p: &Path) -> LdbResult<Box<dyn std::io::Write>> {
        self.inner.open_appendable_file(p)
    }
    fn exists(&self, p: &Path) -> LdbResult<bool> {
        self.inner.exists(p)
    }
    fn children(&self, p: &Path) -> LdbResult<Vec<PathBuf>> {
        self.inner.children(p)
    }
    fn size_of(&self, p: &Path) -> LdbResult<usize> {
        self.inner.size_of(p)
    }
    fn delete(&self, p: &Path) -> LdbResult<()> {
        if p.extension().is_some_and(|e| e == "ldb") && self.created_at_first_delete.get().is_none()
        {
            self.created_at_first_delete.set(Some(self.created.get()));
        }
        self.inner.delete(p)
    }
    fn mkdir(&self, p: &Path) -> LdbResult<()> {
        self.inner.mkdir(p)
    }
    fn rmdir(&self, p: &Path) -> LdbResult<()> {
        self.inner.rmdir(p)
    }
    fn rename(&self, a: &Path, b: &Path) -> LdbResult<()> {
        self.inner.rename(a, b)
    }
    fn lock(&self, p: &Path) -> LdbResult<FileLock> {
        self.inner.lock(p)
    }
    fn unlock(&self, l: FileLock) -> LdbResult<()> {
        self.inner.unlock(l)
    }
    fn new_logger(&self, p: &Path) -> LdbResult<Logger> {
        self.inner.new_logger(p)
    }
    fn micros(&self) -> u64 {
        self.inner.micros()
    }
    fn sleep_for(&self, micros: u32) {
        self.inner.sleep_for(micros)
    }
}

/// Writes 50 keys round and round through `env`'s database in `dir` until a write fails or a
/// table is deleted; returns the values of the writes that succeeded and the failure.
fn rewrite_until(dir: &Path, env: FailingTables) -> (BTreeMap<Vec<u8>, Vec<u8>>, Option<Status>) {
    let (deleted, options) = (
        Rc::clone(&env.created_at_first_delete),
        Options {
            env: Rc::new(Box::new(env)),
            write_buffer_size: 16 << 10,
            ..options()
        },
    );
    let mut db = DB::open(dir, options).expect("open");
    let mut model = BTreeMap::new();
    for round in 0..10_000u32 {
        let key = format!("k{:02}", round % 50).into_bytes();
        let value = [round.to_le_bytes().as_slice(), &[9; 200]].concat();
        if let Err(e) = db.put(&key, &value) {
            return (model, Some(e));
        }
        model.insert(key, value);
        if deleted.get().is_some() {
            break;
        }
    }
    (model, None)
}

fn failing_tables(fail_at: usize) -> FailingTables {
    FailingTables {
        inner: rusty_leveldb::PosixDiskEnv::new(),
        created: Rc::default(),
        created_at_first_delete: Rc::default(),
        fail_at,
    }
}

/// rusty-leveldb 4.0.2 swallowed a merge that failed (here: its output file could not be
/// created) and installed it anyway: an edit deleting its input tables with no output, every
/// key in them lost. The write that ran the merge must fail, and every key written before it
/// must read back, then and after a reopen.
#[test]
fn a_merge_that_fails_keeps_its_inputs() {
    // A first run finds which table the first merge creates (the merge deletes its inputs).
    let probe = tempfile::tempdir().unwrap();
    let env = failing_tables(0);
    let created = Rc::clone(&env.created_at_first_delete);
    let (_, failed) = rewrite_until(probe.path(), env);
    assert!(failed.is_none(), "{failed:?}");
    let merge_output = created.get().expect("a merge ran");
    assert!(
        merge_output >= 3,
        "flushes made tables before the merge: {merge_output}"
    );

    let dir = tempfile::tempdir().unwrap();
    let (model, failed) = rewrite_until(dir.path(), failing_tables(merge_output));
    let failed = failed.expect("the merge's failure reaches the write");
    assert!(failed.err.contains("no space left"), "{failed:?}");
    let options = Options {
        write_buffer_size: 16 << 10,
        ..options()
    };
    let mut db = DB::open(dir.path(), options).expect("reopen");
    for (key, value) in &model {
        assert_eq!(db.get(key).as_deref(), Some(&value[..]), "{key:?}");
    }
}
