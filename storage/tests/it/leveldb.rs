//! The fix tally carries in rusty-leveldb (storage/vendor/README.md): a point read looks past
//! a newer table that does not hold the key, even when that table's next key is a deletion.

use std::rc::Rc;

use rusty_leveldb::{FilterPolicy, Options, DB};

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
