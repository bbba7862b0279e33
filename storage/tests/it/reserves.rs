//! Reserves (two-phase transfers) through the real `LedgerDb`: reserve, partial post, void,
//! renew and a leader-made expiry, each applied the way a replica applies it; the derived rows
//! (expiry index, pending amounts) and the sum of balances after each, and after a reopen;
//! a dump installed elsewhere; snapshots with reserve rows audited from the archive.

use std::path::Path;
use std::sync::Arc;

use ed25519_dalek::SigningKey;
use tally_core::batch::BatchBody;
use tally_core::batch::BatchWrite;
use tally_core::ports::{LedgerRead, LedgerStore};
use tally_core::reserve::{Expiry, Held, Reserve};
use tally_core::snapshot::Delta;
use tally_storage::layout::{self, Table};
use tally_storage::{LedgerDb, LedgerImport, StoreOptions};
use tally_wire::{Envelope, Hash, Op, Operation, PublicKey};

use tally_core::snapshot::Manifest;
use tally_storage::snapshots;
use tally_wire::SignedHeader;

use crate::archive::{archive, audit_of, operator_key, owner, runtime, stores, MemSource};
use crate::support::{account_keys, envelope, operator, rows_with_prefix, Chain, CHAIN_ID};
use crate::transfer::{install, install_error, records, small, stream};

/// The three accounts of the scenario and the depositor (the support chain's).
pub struct Keys {
    pub a: SigningKey,
    pub b: SigningKey,
    pub c: SigningKey,
    pub depositor: SigningKey,
}

pub fn keys() -> Keys {
    let mut all = account_keys().into_iter();
    Keys {
        a: all.next().unwrap(),
        b: all.next().unwrap(),
        c: all.next().unwrap(),
        depositor: SigningKey::from_bytes(&[200; 32]),
    }
}

fn pk(key: &SigningKey) -> PublicKey {
    key.verifying_key().to_bytes()
}

/// One operation; the fields a kind does not use are zero.
fn op(
    kind: Op,
    id: u128,
    to: PublicKey,
    amount: u64,
    timeout_ms: u64,
    reserve_id: u128,
) -> Operation {
    Operation {
        op: kind,
        id,
        to,
        amount,
        timeout_ms,
        reserve_id,
        party: [0; 32],
    }
}

/// What the ledger must hold after a step: balances of a, b, c; each reserve of a's by id;
/// the expiry index; pending (debits, credits) of a, b, c.
pub struct Expected {
    pub time_ms: u64,
    pub balances: [u64; 3],
    pub reserves: Vec<(u128, Reserve)>,
    pub expiries: Vec<(u64, u128)>,
    pub pending: [(u64, u64); 3],
}

/// Everything `expected` says, read through the ports and `pending`.
pub fn check(db: &mut LedgerDb, k: &Keys, expected: &Expected) {
    let meta = db.meta().unwrap();
    assert_eq!(db.header_time(meta.height).unwrap(), expected.time_ms);
    assert_eq!(
        db.balance_total().unwrap(),
        meta.expected_total(),
        "conservation"
    );
    assert_eq!(meta.expected_total(), 1010);
    let owners = [pk(&k.a), pk(&k.b), pk(&k.c)];
    for (i, key) in owners.iter().enumerate() {
        assert_eq!(
            db.account(key).unwrap().unwrap_or(0),
            expected.balances[i],
            "balance {i}"
        );
        assert_eq!(db.pending(key).unwrap(), expected.pending[i], "pending {i}");
    }
    for (id, state) in &expected.reserves {
        assert_eq!(
            db.reserve(&owners[0], *id).unwrap(),
            Some(*state),
            "reserve {id}"
        );
    }
    assert_eq!(db.reserve(&owners[1], 1).unwrap(), None);
    let want: Vec<Expiry> = expected
        .expiries
        .iter()
        .map(|&(at_ms, id)| Expiry {
            at_ms,
            owner: owners[0],
            id,
        })
        .collect();
    assert_eq!(db.expiries(100).unwrap(), want);
    assert_eq!(
        db.expiries(1).unwrap(),
        want.iter().take(1).copied().collect::<Vec<_>>()
    );
}

/// The derived rows as stored, read with a plain LevelDB (the ledger closed): expiry keys and
/// pending rows must be exactly those `expected` implies.
pub fn check_derived_rows(dir: &Path, k: &Keys, expected: &Expected) {
    let mut raw = rusty_leveldb::DB::open(dir, rusty_leveldb::Options::default()).unwrap();
    let expiry_keys: Vec<Vec<u8>> = rows_with_prefix(&mut raw, &Table::Expiry.tag())
        .into_iter()
        .map(|(key, value)| {
            assert!(value.is_empty());
            key
        })
        .collect();
    let want: Vec<Vec<u8>> = expected
        .expiries
        .iter()
        .map(|&(at, id)| layout::expiry_key(at, &pk(&k.a), id).to_vec())
        .collect();
    assert_eq!(expiry_keys, want);
    let mut pending = rows_with_prefix(&mut raw, &Table::Pending.tag());
    let mut want: Vec<(Vec<u8>, Vec<u8>)> = [&k.a, &k.b, &k.c]
        .iter()
        .zip(expected.pending)
        .filter(|(_, p)| *p != (0, 0))
        .map(|(key, (d, c))| {
            let row = layout::encode_pending(d, c).to_vec();
            (layout::pending_key(&pk(key)).to_vec(), row)
        })
        .collect();
    pending.sort();
    want.sort();
    assert_eq!(pending, want);
}

fn held(to: &SigningKey, amount: u64, expires_at_ms: u64) -> Reserve {
    Reserve::Open(Held {
        to: pk(to),
        party: [0; 32],
        amount,
        expires_at_ms,
    })
}

type Step = (u64, Vec<(Arc<Envelope>, Hash)>, Expected);

/// The scenario: funding, three reserves, a partial post, a void and a new reserve, then an
/// expiry (leader-made, first in its batch) with a renewal; each with what it leaves.
pub fn scenario(k: &Keys) -> Vec<Step> {
    let (a, b, c) = (pk(&k.a), pk(&k.b), pk(&k.c));
    let fund = envelope(
        &k.depositor,
        true,
        vec![
            op(Op::Deposit, 1, a, 1000, 0, 0),
            op(Op::Deposit, 2, b, 10, 0, 0),
        ],
    );
    let reserve = envelope(
        &k.a,
        true,
        vec![
            op(Op::Reserve, 1, b, 100, 500, 0),
            op(Op::Reserve, 2, c, 50, 10_000, 0),
            op(Op::Reserve, 3, b, 30, 1000, 0),
        ],
    );
    let settle = envelope(
        &k.a,
        true,
        vec![
            op(Op::Post, 10, [0; 32], 60, 0, 1),
            op(Op::Void, 11, [0; 32], 0, 0, 2),
            op(Op::Reserve, 4, c, 20, 100_000, 0),
        ],
    );
    let renew = envelope(&k.a, true, vec![op(Op::Renew, 12, [0; 32], 0, 200_000, 4)]);
    let (r1, r2, r3) = (
        held(&k.b, 100, 2500),
        held(&k.c, 50, 12_000),
        held(&k.b, 30, 3000),
    );
    vec![
        (
            1000,
            vec![fund],
            Expected {
                time_ms: 1000,
                balances: [1000, 10, 0],
                reserves: vec![],
                expiries: vec![],
                pending: [(0, 0); 3],
            },
        ),
        (
            2000,
            vec![reserve],
            Expected {
                time_ms: 2000,
                balances: [820, 10, 0],
                reserves: vec![(1, r1), (2, r2), (3, r3)],
                expiries: vec![(2500, 1), (3000, 3), (12_000, 2)],
                pending: [(180, 0), (0, 130), (0, 50)],
            },
        ),
        (
            2100,
            vec![settle],
            Expected {
                time_ms: 2100,
                balances: [890, 70, 0],
                reserves: vec![
                    (1, Reserve::Posted),
                    (2, Reserve::Voided),
                    (3, r3),
                    (4, held(&k.c, 20, 102_100)),
                ],
                expiries: vec![(3000, 3), (102_100, 4)],
                pending: [(50, 0), (0, 30), (0, 20)],
            },
        ),
        (
            5000,
            vec![renew],
            Expected {
                time_ms: 5000,
                balances: [920, 70, 0],
                reserves: vec![
                    (1, Reserve::Posted),
                    (3, Reserve::Expired),
                    (4, held(&k.c, 20, 205_000)),
                ],
                expiries: vec![(205_000, 4)],
                pending: [(20, 0), (0, 0), (0, 20)],
            },
        ),
    ]
}

/// Runs the scenario on a new ledger in `dir`, checking after every batch, then `random`
/// batches of random requests; returns the writes and what the scenario left, with the ledger
/// closed.
pub fn run_scenario(dir: &Path, opts: StoreOptions, random: usize) -> (Vec<BatchWrite>, Expected) {
    let k = keys();
    let mut db = LedgerDb::open(dir, opts).unwrap();
    let mut chain = Chain::new(db.meta().unwrap(), 1);
    let mut writes = Vec::new();
    let mut last = None;
    for (time, envelopes, expected) in scenario(&k) {
        let w = chain.step_envelopes(&mut db, time, &envelopes);
        assert_eq!(w.balance_change, if time == 1000 { 1010 } else { 0 });
        check(&mut db, &k, &expected);
        writes.push(w);
        last = Some(expected);
    }
    for i in 0..random {
        let w = chain.step(&mut db, 1 + i % 7);
        assert_eq!(db.balance_total().unwrap(), w.meta.expected_total());
        writes.push(w);
    }
    db.close().unwrap();
    (writes, last.unwrap())
}

#[test]
fn reserve_post_void_renew_and_expiry_through_apply_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (writes, last) = run_scenario(dir.path(), StoreOptions::default(), 0);
    // The expiry is leader-made and first in the last batch.
    let body = tally_core::batch::BatchBody::decode(&writes[3].body).unwrap();
    assert!(matches!(
        body.items[0],
        tally_core::batch::BatchItem::Expire(_)
    ));
    assert_eq!(writes[3].reserves.len(), 2);
    let k = keys();
    check_derived_rows(dir.path(), &k, &last);
    let mut db = LedgerDb::open(dir.path(), StoreOptions::default()).unwrap();
    assert_eq!(db.meta().unwrap(), writes[3].meta);
    check(&mut db, &k, &last);
    for (w, t) in writes.iter().zip([1000, 2000, 2100, 5000]) {
        assert_eq!(db.header_time(w.meta.height).unwrap(), t);
    }
    assert_eq!(db.header_time(0).unwrap(), 0);
    assert!(db.header_time(9).is_err(), "no header beyond the tip");
}

/// A dump of the scenario's ledger: the reserve rows travel, the derived rows do not.
fn scenario_dump(dir: &Path) -> (Vec<Vec<u8>>, Expected) {
    let (_, last) = run_scenario(dir, small(), 0);
    let mut db = LedgerDb::open(dir, small()).unwrap();
    let mut chunks = Vec::new();
    db.dump(4096, |c| {
        chunks.push(c);
        Ok(())
    })
    .unwrap();
    db.close().unwrap();
    (chunks, last)
}

#[test]
fn a_dump_with_reserves_installs_as_the_same_ledger() {
    let tmp = tempfile::tempdir().unwrap();
    let from = tmp.path().join("from");
    let (chunks, last) = scenario_dump(&from);
    let recs = records(&chunks.concat());
    let in_table = |t: Table| recs.iter().filter(|(k, _)| k.starts_with(&t.tag())).count();
    assert_eq!(
        in_table(Table::Reserve),
        4,
        "open and closed reserves travel"
    );
    assert_eq!(in_table(Table::Expiry) + in_table(Table::Pending), 0);
    let to = tmp.path().join("to");
    let meta = install(&to, &chunks, &operator().public()).unwrap();
    let k = keys();
    check_derived_rows(&to, &k, &last);
    let mut db = LedgerDb::open(&to, small()).unwrap();
    assert_eq!(db.meta().unwrap(), meta);
    check(&mut db, &k, &last);
    let mut source = LedgerDb::open(&from, small()).unwrap();
    assert_eq!(source.meta().unwrap().state_digest(), meta.state_digest());
}

/// The stream of `recs` with the reserve row of `(a, id)` replaced by `value` (None: left out).
fn with_reserve_row(recs: &[(Vec<u8>, Vec<u8>)], id: u128, value: Option<Vec<u8>>) -> Vec<u8> {
    let key = layout::reserve_key(&pk(&keys().a), id).to_vec();
    let out: Vec<_> = recs
        .iter()
        .filter_map(|(k, v)| match k == &key {
            true => value.clone().map(|v| (k.clone(), v)),
            false => Some((k.clone(), v.clone())),
        })
        .collect();
    assert_ne!(out, recs, "the row is there");
    stream(&out)
}

#[test]
fn an_install_refuses_tampered_reserve_rows_and_derived_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let (chunks, _) = scenario_dump(&tmp.path().join("from"));
    let recs = records(&chunks.concat());
    let operator = operator().public();
    let more = held(&keys().c, 21, 205_000).encode();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (with_reserve_row(&recs, 4, Some(more)), "map_root"),
        (
            with_reserve_row(&recs, 1, Some(Reserve::Voided.encode())),
            "map_root",
        ),
        (with_reserve_row(&recs, 4, None), "map_root"),
        (with_reserve_row(&recs, 2, Some(vec![9])), "reserve/v1"),
        (
            {
                let mut r = recs.clone();
                let row = (
                    layout::pending_key(&[0; 32]).to_vec(),
                    layout::encode_pending(1, 0).to_vec(),
                );
                r.insert(0, row);
                stream(&r)
            },
            "derived table pending/v1",
        ),
    ];
    for (i, (bad, expected)) in cases.iter().enumerate() {
        let e = install_error(&tmp.path().join(format!("to{i}")), bad, &operator);
        assert!(
            e.contains(expected),
            "case {i}: {e:?} should contain {expected:?}"
        );
    }
}

/// The scenario and random batches after it, as the archive writer reads them.
fn scenario_batches(random: usize) -> Vec<(SignedHeader, Vec<u8>)> {
    let dir = tempfile::tempdir().unwrap();
    let (writes, _) = run_scenario(dir.path(), StoreOptions::default(), random);
    writes
        .into_iter()
        .map(|w| (w.signed_header, w.body))
        .collect()
}

#[test]
fn snapshots_with_reserves_round_trip_through_the_archive() {
    let rt = runtime();
    let batches = scenario_batches(24);
    let (bucket, _dir) = stores("reserves").swap_remove(0);
    archive(&rt, &bucket, &MemSource::new(batches), CHAIN_ID, 28);
    let report = audit_of(&rt, &bucket, None);
    assert!(report.ok, "{:?}", report.errors);
    assert_eq!(report.height, 28);
    let manifests = rt
        .block_on(snapshots::manifests(&bucket, 28, &owner()))
        .unwrap();
    assert!(report.snapshots >= 4 && report.snapshots == manifests.len() as u64);
    let first = &manifests[0];
    assert!(first.is_full());
    assert_eq!(first.reserves, 4);
    let rows = rt.block_on(snapshots::read_rows(&bucket, first)).unwrap();
    let k = keys();
    assert_eq!(
        rows.reserves.get(&(pk(&k.a), 4)),
        Some(&held(&k.c, 20, 205_000))
    );
    assert_eq!(rows.reserves.get(&(pk(&k.a), 3)), Some(&Reserve::Expired));
}

#[test]
fn the_audit_refuses_a_snapshot_with_a_tampered_reserve_row() {
    let rt = runtime();
    let (bucket, _dir) = stores("reserves-tampered").swap_remove(0);
    archive(
        &rt,
        &bucket,
        &MemSource::new(scenario_batches(10)),
        CHAIN_ID,
        14,
    );
    let manifests = rt
        .block_on(snapshots::manifests(&bucket, 14, &owner()))
        .unwrap();
    let victim = manifests[0].clone();
    let mut rows = rt.block_on(snapshots::read_rows(&bucket, &victim)).unwrap();
    let k = keys();
    rows.reserves.insert((pk(&k.a), 4), held(&k.c, 21, 205_000));
    let mut refs = Vec::new();
    for c in rows.chunks() {
        let hash = tally_core::crypto::sha256(&[&c]);
        refs.push((hash, c.len() as u64));
        rt.block_on(bucket.put_new(&tally_core::snapshot::chunk_key(&hash), c.into()))
            .unwrap();
    }
    let forged = Manifest {
        chunks: refs,
        operator: None,
        ..victim.clone()
    }
    .sign(&CHAIN_ID, &operator_key());
    let key = tally_core::snapshot::manifest_key(victim.height);
    rt.block_on(bucket.delete(&key)).unwrap();
    rt.block_on(bucket.put_new(&key, forged.into())).unwrap();
    let report = audit_of(&rt, &bucket, None);
    assert!(!report.ok);
    assert_eq!(report.errors[0].key, key, "{:?}", report.errors);
    assert!(
        report.errors[0].message.contains("rows differ"),
        "{:?}",
        report.errors
    );
}

/// A ledger imported from the scenario's history and the state its bodies give (as a restore
/// does from a snapshot), leaving out reserve `(a, skip)` if given.
fn import(dir: &Path, writes: &[BatchWrite], skip: Option<u128>) -> tally_core::Result<LedgerDb> {
    let mut delta = Delta::default();
    let mut import = LedgerImport::create(dir, small())?;
    for w in writes {
        let body = BatchBody::decode(&w.body).unwrap();
        import.batch(&w.signed_header, &body, &w.body)?;
        delta.add_batch(&body);
    }
    for (key, balance) in &delta.accounts {
        import.account(key, *balance)?;
    }
    for ((owner, id), reserve) in &delta.reserves {
        if skip != Some(*id) {
            import.reserve(owner, *id, reserve)?;
        }
    }
    let raft_index = writes.last().expect("a batch").meta.raft_index;
    import.finish(delta.deposited, delta.withdrawn, raft_index)
}

#[test]
fn an_import_rebuilds_reserves_and_their_derived_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let (writes, last) = run_scenario(&tmp.path().join("from"), small(), 0);
    let k = keys();
    let to = tmp.path().join("to");
    let mut db = import(&to, &writes, None).unwrap();
    assert_eq!(db.meta().unwrap(), writes.last().unwrap().meta);
    check(&mut db, &k, &last);
    db.close().unwrap();
    check_derived_rows(&to, &k, &last);
    for skip in [3, 4] {
        let e = import(&tmp.path().join(format!("skip{skip}")), &writes, Some(skip));
        let e = e.err().expect("refused").to_string();
        assert!(e.contains("state digest"), "{e}");
    }
}

#[test]
fn damaged_reserve_and_pending_rows_are_corruption() {
    let dir = tempfile::tempdir().unwrap();
    run_scenario(dir.path(), StoreOptions::default(), 0);
    let a = pk(&keys().a);
    let mut db = LedgerDb::open(dir.path(), StoreOptions::default()).unwrap();
    let good = db.reserve(&a, 4).unwrap().expect("reserve 4").encode();
    db.raw_put(&layout::reserve_key(&a, 4), &[9]).unwrap();
    let e = db.reserve(&a, 4).unwrap_err().to_string();
    assert!(e.contains("reserve/v1"), "{e}");
    db.close().unwrap();
    // Caught at open too, where the state map is built from every reserve.
    let e = LedgerDb::open(dir.path(), StoreOptions::default()).err();
    let e = e.expect("a damaged reserve row").to_string();
    assert!(e.contains("reserve/v1"), "{e}");
    let mut raw = rusty_leveldb::DB::open(dir.path(), rusty_leveldb::Options::default()).unwrap();
    raw.put(&layout::reserve_key(&a, 4), &good).unwrap();
    // One more pending debit than any reserve holds: caught by the sums at open.
    raw.put(&layout::pending_key(&a), &layout::encode_pending(21, 0))
        .unwrap();
    raw.close().unwrap();
    match LedgerDb::open(dir.path(), StoreOptions::default()) {
        Err(e) => assert!(e.to_string().contains("pending debits add up to 21"), "{e}"),
        Ok(_) => panic!("opened a ledger whose pending amounts disagree"),
    }
}
