//! Account history and the receipt index: written behind by the archive thread, read back
//! exactly as a fold of the core derivation over the applied bodies says, across a reopen and
//! through a dump and install.

use std::collections::HashMap;
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tally_core::batch::BatchBody;
use tally_core::history::{account_entries, receipt_leaves, Counters, HistoryRow};
use tally_core::ports::LedgerStore;
use tally_storage::layout::Table;
use tally_storage::{LedgerDb, LedgerInstaller, StoreOptions};
use tally_wire::PublicKey;

use crate::support::{operator, seed, Chain};

/// Every account's rows and every receipt's place, folded from the applied bodies.
#[derive(Default)]
struct Expected {
    rows: HashMap<PublicKey, Vec<HistoryRow>>,
    receipts: Vec<([u8; 32], u64, u32)>,
    height: u64,
}

impl Expected {
    fn record(&mut self, encoded_body: &[u8]) {
        let body = BatchBody::decode(encoded_body).unwrap();
        for entry in account_entries(&body) {
            let rows = self.rows.entry(entry.account).or_default();
            let before = rows.last().map_or(Counters::default(), |r| r.counters);
            rows.push(HistoryRow {
                counters: before.after(&entry),
                entry,
            });
        }
        for (leaf, index) in receipt_leaves(&body) {
            self.receipts.push((leaf, body.header.height, index));
        }
        self.height = body.header.height;
    }

    fn check(&self, db: &mut LedgerDb, rng: &mut StdRng) {
        assert_eq!(db.history_held_from().unwrap(), 1);
        for (account, rows) in &self.rows {
            let all = db.history(account, (0, 0), usize::MAX).unwrap();
            assert_eq!(&all.rows, rows);
            assert_eq!(all.next, None);
            // Paging: pages of `limit` rows, each going on where the last said.
            let limit = rng.gen_range(1..=4);
            let (mut paged, mut from) = (Vec::new(), (1, 0));
            loop {
                let page = db.history(account, from, limit).unwrap();
                assert!(page.rows.len() <= limit);
                paged.extend(page.rows);
                match page.next {
                    Some(next) => from = next,
                    None => break,
                }
            }
            assert_eq!(&paged, rows);
            // From a height: the first row at or after it.
            let h = rng.gen_range(1..=self.height + 1);
            let want: Vec<_> = rows
                .iter()
                .filter(|r| r.entry.height >= h)
                .copied()
                .collect();
            assert_eq!(db.history(account, (h, 0), usize::MAX).unwrap().rows, want);
            // As of a height: the newest row at or below it.
            for h in [0, h, self.height] {
                let want = rows.iter().rev().find(|r| r.entry.height <= h).copied();
                assert_eq!(db.history_at(account, h).unwrap(), want, "as of {h}");
            }
        }
        let nobody = [0xee; 32];
        assert_eq!(db.history(&nobody, (0, 0), 10).unwrap().rows, vec![]);
        assert_eq!(db.history_at(&nobody, self.height).unwrap(), None);
        for (leaf, height, index) in &self.receipts {
            assert_eq!(db.receipt(leaf).unwrap(), Some((*height, *index)));
        }
        assert_eq!(db.receipt(&[0xee; 32]).unwrap(), None);
    }
}

fn small() -> StoreOptions {
    StoreOptions {
        write_buffer_bytes: 16 << 10,
        state_write_buffer_bytes: 16 << 10,
        ..StoreOptions::default()
    }
}

fn build(dir: &Path, batches: usize, seed: u64) -> Expected {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut expected = Expected::default();
    let mut db = LedgerDb::open(dir, small()).unwrap();
    let mut chain = Chain::new(db.meta().unwrap(), seed);
    for i in 0..batches {
        let write = chain.step(&mut db, rng.gen_range(1..=40));
        expected.record(&write.body);
        // Reads right after an apply answer at the applied height (the archive writes behind).
        if i % 7 == 0 {
            expected.check(&mut db, &mut rng);
        }
    }
    expected.check(&mut db, &mut rng);
    db.close().unwrap();
    expected
}

#[test]
fn history_is_the_fold_of_the_bodies_across_reopen_and_install() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed ^ 1);
    let tmp = tempfile::tempdir().unwrap();
    let (from, to) = (tmp.path().join("from"), tmp.path().join("to"));
    let expected = build(&from, 30, seed);
    assert!(expected.rows.values().any(|r| r.len() > 8), "busy accounts");
    // Request and receipt rows live in sorted runs, not in the archive database; a run file
    // no record names (a crash between writing it and the write naming it) is deleted at open.
    assert_eq!(table_rows(&from, Table::Receipt), 0);
    assert_eq!(table_rows(&from, Table::Request), 0);
    let runs = from.join("runs");
    let stray = runs.join(format!("{:016}.run", u64::MAX / 2));
    std::fs::write(&stray, b"left by a crash").unwrap();

    let mut db = LedgerDb::open(&from, small()).unwrap();
    assert!(!stray.exists(), "the stray run is deleted");
    assert!(std::fs::read_dir(&runs).unwrap().count() > 0);
    expected.check(&mut db, &mut rng);
    let mut chunks = Vec::new();
    db.dump(4096, |c| {
        chunks.push(c);
        Ok(())
    })
    .unwrap();
    db.close().unwrap();

    // The rows live in the body log, the database holds their locators.
    let (rows, located) = history_rows(&from);
    assert!(rows > 30, "{rows} rows");
    assert_eq!(located, rows, "every history row a locator");

    let mut installer = LedgerInstaller::create(&to, small()).unwrap();
    for c in &chunks {
        installer.push(c).unwrap();
    }
    installer.finish(&operator().public()).unwrap();
    // The dump carried the rows themselves.
    assert_eq!(history_rows(&to), (rows, 0));
    let mut db = LedgerDb::open(&to, small()).unwrap();
    expected.check(&mut db, &mut rng);
}

/// How many rows of `table` the archive database of the ledger in `dir` holds.
fn table_rows(dir: &Path, table: Table) -> usize {
    let archive = tally_storage::archive_dir(dir);
    let mut raw = rusty_leveldb::DB::open(&archive, rusty_leveldb::Options::default()).unwrap();
    let n = crate::support::rows_with_prefix(&mut raw, &table.tag()).len();
    raw.close().unwrap();
    n
}

/// How many history rows (not heads) the archive database of the ledger in `dir` holds, and how
/// many of them hold a body log locator.
fn history_rows(dir: &Path) -> (usize, usize) {
    let archive = tally_storage::archive_dir(dir);
    let mut raw = rusty_leveldb::DB::open(&archive, rusty_leveldb::Options::default()).unwrap();
    let rows: Vec<_> = crate::support::rows_with_prefix(&mut raw, &Table::History.tag())
        .into_iter()
        .filter(|(k, _)| k.len() == 44 && k[36..] != [0; 8])
        .collect();
    raw.close().unwrap();
    let located = rows
        .iter()
        .filter(|(_, v)| {
            tally_storage::bodies::Locator::decode(Table::History, v)
                .unwrap()
                .is_some()
        })
        .count();
    (rows.len(), located)
}

/// An archive written before history existed (no history start, no rows) holds history from
/// the height after its point at its next open, and counts from zero from there.
#[test]
fn an_archive_without_history_holds_it_from_its_next_batch() {
    let seed = seed();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ledger");
    let expected = build(&dir, 5, seed);
    // Remove every history and receipt row and the history start, as an older tally left it.
    {
        let archive = tally_storage::archive_dir(&dir);
        let mut raw = rusty_leveldb::DB::open(&archive, rusty_leveldb::Options::default()).unwrap();
        let mut batch = rusty_leveldb::WriteBatch::default();
        for table in [Table::History, Table::Receipt] {
            for (key, _) in crate::support::rows_with_prefix(&mut raw, &table.tag()) {
                batch.delete(&key);
            }
        }
        raw.write(batch, true).unwrap();
        raw.close().unwrap();
    }
    let mut db = LedgerDb::open(&dir, small()).unwrap();
    assert_eq!(db.history_held_from().unwrap(), expected.height + 1);
    let account = *expected.rows.keys().next().unwrap();
    assert_eq!(db.history(&account, (0, 0), 100).unwrap().rows, vec![]);
    // The next batch's rows count from zero.
    let mut chain = Chain::new(db.meta().unwrap(), seed ^ 7);
    let write = chain.step(&mut db, 10);
    let mut after = Expected::default();
    after.record(&write.body);
    for (account, rows) in &after.rows {
        assert_eq!(&db.history(account, (0, 0), 100).unwrap().rows, rows);
    }
    db.close().unwrap();
    let mut db = LedgerDb::open(&dir, small()).unwrap();
    assert_eq!(db.history_held_from().unwrap(), expected.height + 1, "kept");
}

/// A ledger imported from archived batches (`tally-server restore`) holds the whole history,
/// derived as it imports.
#[test]
fn an_imported_ledger_holds_the_history_of_every_batch() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed ^ 3);
    let tmp = tempfile::tempdir().unwrap();
    let mut db = LedgerDb::open(&tmp.path().join("from"), small()).unwrap();
    let mut chain = Chain::new(db.meta().unwrap(), seed);
    let (mut expected, mut model) = (Expected::default(), crate::support::Model::default());
    for _ in 0..12 {
        let write = chain.step(&mut db, rng.gen_range(1..=40));
        expected.record(&write.body);
        model.record(write);
    }
    db.close().unwrap();

    let mut import = tally_storage::LedgerImport::create(&tmp.path().join("to"), small()).unwrap();
    for w in &model.writes {
        let body = BatchBody::decode(&w.body).unwrap();
        import.batch(&w.signed_header, &body, &w.body).unwrap();
    }
    for (key, balance) in &model.balances {
        import.account(key, *balance).unwrap();
    }
    let meta = &model.writes.last().unwrap().meta;
    let mut db = import
        .finish(meta.total_deposited, meta.total_withdrawn, meta.raft_index)
        .unwrap();
    expected.check(&mut db, &mut rng);
}
