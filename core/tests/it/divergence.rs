//! A replica that would end up with other state than the header claims must stop: every change to
//! a committed body, or to the state it is applied against, makes `prepare_apply` fail with
//! `Error::Diverged`, and leaves the store as it was.

use tally_core::batch::{prepare_apply, BatchBody};
use tally_core::merkle::Tree;
use tally_core::ports::{LedgerStore, MemStore};
use tally_core::Error;
use tally_wire::Op;

use crate::common::{clone_store, deposit, pk, transfer, withdraw, Node};

const A: u8 = 1;
const B: u8 = 2;
const C: u8 = 3;

/// A node with batch 1 applied and batch 2 (a transfer of `amount`, a withdrawal, a deposit to a
/// new account and a second transfer) sealed but not applied.
fn setup(amount: u64) -> (Node, BatchBody) {
    let mut node = Node::new();
    node.submit(deposit(1, A, 100));
    node.submit(deposit(2, B, 50));
    node.seal_and_apply_all();
    for r in [
        transfer(1, A, B, amount),
        withdraw(1, B, 20),
        deposit(3, C, 5),
        transfer(2, B, C, 1),
    ] {
        node.submit(r);
    }
    node.seal();
    let body = node.pending.pop_front().expect("sealed");
    assert_eq!(body.items.len(), 4);
    (node, body)
}

/// Applies `body` after `tamper_body`, against the node's store after `tamper_store`, and expects
/// a divergence.
fn check(
    name: &str,
    tamper_body: impl FnOnce(&mut BatchBody),
    tamper_store: impl FnOnce(&mut MemStore),
) {
    let (node, mut body) = setup(30);
    tamper_body(&mut body);
    let mut store = clone_store(&node.store);
    tamper_store(&mut store);
    let meta = store.meta().expect("mem store");
    let (accounts, requests) = (store.accounts.clone(), store.requests.clone());
    match prepare_apply(&body, body.encode(), &meta, &mut store, &node.operator) {
        Err(Error::Diverged(_)) => {}
        Err(e) => panic!("{name}: expected a divergence, got {e}"),
        Ok(w) => panic!("{name}: the tampered batch applied, to {:?}", w.meta),
    }
    assert_eq!(
        (store.accounts, store.requests),
        (accounts, requests),
        "{name}: the store changed"
    );
}

fn body(name: &str, tamper: impl FnOnce(&mut BatchBody)) {
    check(name, tamper, |_| {});
}

fn store(name: &str, tamper: impl FnOnce(&mut MemStore)) {
    check(name, |_| {}, tamper);
}

#[test]
fn the_untampered_batch_applies() {
    let (mut node, body) = setup(30);
    let meta = node.store.meta().expect("mem store");
    let write = prepare_apply(&body, body.encode(), &meta, &mut node.store, &node.operator)
        .expect("applies");
    assert_eq!(write.meta.state_digest(), body.header.state_digest);
    assert_eq!(write.accounts, vec![(pk(A), 70), (pk(B), 59), (pk(C), 6)]);
}

type Tamper = fn(&mut BatchBody);

/// Applies `tamper` twice: as it is (the Merkle root no longer matches), and with the root
/// recomputed over the tampered receipts, as a faulty leader would have sealed it (then the replay
/// itself must notice).
fn body_and_rehashed(cases: &[(&str, Tamper)]) {
    for (name, tamper) in cases {
        body(name, tamper);
        body(&format!("{name}, root recomputed"), |b| {
            tamper(b);
            b.header.merkle_root = Tree::new(&b.leaf_hashes()).root();
        });
    }
}

#[test]
fn tampered_receipts_diverge() {
    body_and_rehashed(&[
        ("transfer: sender balance", |b| {
            b.entry_mut(0).receipt.signer_balance += 1
        }),
        ("transfer: recipient balance", |b| {
            b.entry_mut(0).receipt.to_balance -= 1
        }),
        ("withdrawal: balance", |b| {
            b.entry_mut(1).receipt.signer_balance -= 1
        }),
        ("withdrawal: a recipient balance", |b| {
            b.entry_mut(1).receipt.to_balance = 1
        }),
        ("deposit: a depositor balance", |b| {
            b.entry_mut(2).receipt.signer_balance = 1
        }),
        ("deposit: recipient balance", |b| {
            b.entry_mut(2).receipt.to_balance += 1
        }),
        ("last transfer: recipient balance", |b| {
            b.entry_mut(3).receipt.to_balance = 5
        }),
        ("receipt height", |b| b.entry_mut(0).receipt.height += 1),
        ("receipt index", |b| b.entry_mut(1).receipt.index = 0),
        ("receipt operation", |b| {
            b.entry_mut(0).receipt.op = Op::Withdraw
        }),
        ("receipt request hash", |b| {
            b.entry_mut(2).receipt.request_hash[0] ^= 1
        }),
    ]);
}

#[test]
fn tampered_requests_diverge() {
    body_and_rehashed(&[
        ("request amount", |b| b.entry_mut(0).request.amount += 1),
        ("request recipient", |b| b.entry_mut(0).request.to = pk(C)),
        ("request id", |b| b.entry_mut(3).request.id += 1),
        ("entries swapped", |b| b.items.swap(0, 1)),
        ("an entry dropped", |b| {
            b.items.pop();
            b.header.request_count -= 1;
        }),
        ("an entry repeated", |b| {
            let e = b.items[1].clone();
            b.items.push(e);
            b.header.request_count += 1;
        }),
    ]);
}

#[test]
fn tampered_headers_diverge() {
    body("state digest", |b| b.header.state_digest[0] ^= 1);
    body("Merkle root", |b| b.header.merkle_root[31] ^= 1);
    body("previous hash", |b| b.header.prev_hash[5] ^= 1);
    body("height + 1", |b| b.header.height += 1);
    body("height - 1", |b| b.header.height -= 1);
    body("height 0", |b| b.header.height = 0);
    body("request count + 1", |b| b.header.request_count += 1);
    body("request count - 1", |b| b.header.request_count -= 1);
    body("request count 0", |b| b.header.request_count = 0);
}

#[test]
fn consistent_forgeries_diverge_on_what_they_did_not_forge() {
    // The same batch sequenced with another amount: receipts and root agree with each other.
    let (_, original) = setup(30);
    let (_, forged) = setup(31);
    assert_ne!(forged.header.state_digest, original.header.state_digest);
    let digest = original.header.state_digest;
    body("forged amount, original digest", |b| {
        *b = forged.clone();
        b.header.state_digest = digest;
    });
    let root = original.header.merkle_root;
    body("forged amount, original root", |b| {
        *b = forged.clone();
        b.header.merkle_root = root;
    });
    let (entries, count) = (forged.items.clone(), forged.header.request_count);
    body("forged entries, original header", |b| {
        b.items = entries;
        b.header.request_count = count;
    });
}

#[test]
fn a_store_with_other_state_diverges() {
    store("a different balance", |s| {
        *s.accounts.get_mut(&pk(A)).expect("A") -= 1
    });
    store("a higher balance", |s| {
        *s.accounts.get_mut(&pk(B)).expect("B") += 1
    });
    store("a missing account", |s| {
        s.accounts.remove(&pk(A));
    });
    store("an account that the batch creates already exists", |s| {
        s.accounts.insert(pk(C), 0);
    });
    store("another height", |s| {
        s.meta.as_mut().expect("meta").height += 1
    });
    store("another chain", |s| {
        s.meta.as_mut().expect("meta").last_header_hash[0] ^= 1
    });
    store("other totals", |s| {
        s.meta.as_mut().expect("meta").total_deposited += 1
    });
    store("another account count", |s| {
        s.meta.as_mut().expect("meta").account_count += 1
    });
    store("another state map", |s| {
        let meta = s.meta.as_mut().expect("meta");
        meta.map.set([3; 32], [4; 32]);
        meta.map.flush();
    });
}
