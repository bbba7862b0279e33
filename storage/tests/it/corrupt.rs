//! Values that do not decode are `Error::Corrupt` naming their table, never a panic.

use std::path::Path;

use tally_core::ports::{LedgerRead, LedgerStore};
use tally_core::state::LedgerMeta;
use tally_core::{Error, Result};
use tally_storage::layout::{self, Table};
use tally_storage::{LedgerDb, StoreOptions};

use crate::support::Chain;

/// Builds a two-batch database, overwrites `key` with `value`, then runs `read` (which may
/// reopen the database) and checks that it fails with a storage error naming `table`.
fn check(key: &[u8], value: &[u8], table: Table, read: impl FnOnce(LedgerDb, &Path) -> Result<()>) {
    let dir = tempfile::tempdir().unwrap();
    let mut db = LedgerDb::open(dir.path(), StoreOptions::default()).unwrap();
    let mut chain = Chain::new(db.meta().unwrap(), 1);
    chain.step(&mut db, 4);
    chain.step(&mut db, 4);
    db.raw_put(key, value).unwrap();
    match read(db, dir.path()) {
        Err(Error::Corrupt { what: msg }) => {
            assert!(
                msg.contains(&table.to_string()),
                "error should name table {table}: {msg}"
            )
        }
        Err(e) => panic!("expected a storage error naming {table}, got {e}"),
        Ok(()) => panic!("corrupt {table} value read without error"),
    }
}

fn reopen(db: LedgerDb, dir: &Path) -> Result<()> {
    drop(db);
    LedgerDb::open(dir, StoreOptions::default()).map(drop)
}

#[test]
fn corrupt_values_are_storage_errors() {
    let alice = crate::support::account_keys()[0].verifying_key().to_bytes();
    let account = layout::account_key(&alice);
    let read_account = |mut db: LedgerDb, _: &Path| db.account(&alice).map(drop);
    check(&account, &[1, 2, 3, 4, 5], Table::Account, read_account);
    check(&account, &[0; 9], Table::Account, read_account);
    check(&account, &[], Table::Account, read_account);

    let request = layout::request_key(&alice, 42);
    let read_request = |mut db: LedgerDb, _: &Path| db.request(&alice, 42).map(drop);
    check(&request, &[0; 43], Table::Request, read_request);
    check(&request, &[0; 45], Table::Request, read_request);

    let read_header = |mut db: LedgerDb, _: &Path| db.header(1).map(drop);
    let list_headers = |mut db: LedgerDb, _: &Path| db.headers(0, 10).map(drop);
    // A header row is the signed header (256 bytes) and the body digest (32).
    check(
        &layout::header_key(1),
        &[0; 287],
        Table::Header,
        read_header,
    );
    check(
        &layout::header_key(1),
        &[0; 288],
        Table::Header,
        read_header,
    );
    check(
        &layout::header_key(1),
        &[0; 289],
        Table::Header,
        list_headers,
    );
    // A well-formed header stored under the wrong height (with some body digest).
    let header_1 = {
        let dir = tempfile::tempdir().unwrap();
        let mut db = LedgerDb::open(dir.path(), StoreOptions::default()).unwrap();
        let mut row = Chain::new(db.meta().unwrap(), 1)
            .step(&mut db, 4)
            .signed_header
            .encode()
            .to_vec();
        row.extend_from_slice(&[0xab; 32]);
        row
    };
    check(
        &layout::header_key(2),
        &header_1,
        Table::Header,
        |mut db, _| db.header(2).map(drop),
    );
    // A header beyond the summary's height (the summary and headers are written together).
    check(&layout::header_key(3), &header_1, Table::Header, reopen);

    // The header at height 1 naming a body the archive does not hold.
    let read_body = |mut db: LedgerDb, _: &Path| db.body(1).map(drop);
    check(&layout::header_key(1), &header_1, Table::Body, read_body);

    check(&layout::meta_key(), &[0; 100], Table::Meta, reopen);
    let mut ahead = LedgerMeta::genesis();
    ahead.height = 9;
    check(&layout::meta_key(), &ahead.encode(), Table::Header, reopen);
    let mut forked = LedgerMeta::genesis();
    forked.height = 2;
    forked.last_header_hash = [1; 32];
    check(&layout::meta_key(), &forked.encode(), Table::Meta, reopen);
}
