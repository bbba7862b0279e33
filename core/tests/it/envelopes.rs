//! Envelopes: many operations under one signature, atomic or independent, exactly once per
//! operation, replayed by every replica and provable together.

use std::sync::Arc;

use tally_core::batch::{BatchBody, BatchItem, Confirmed};
use tally_core::crypto::{envelope_hash, sign_envelope};
use tally_core::merkle::{verify_range, ProofTree};
use tally_core::ports::LedgerStore;
use tally_core::sequencer::Submitted;
use tally_core::verify::verify_envelope_confirmation;
use tally_wire::{Envelope, ErrorCode, Op, Operation};

use crate::common::{deposit, key, pk, transfer, Node, CHAIN};

const A: u8 = 1;
const B: u8 = 2;
const C: u8 = 3;

fn op(kind: Op, id: u128, to: u8, amount: u64) -> Operation {
    Operation {
        op: kind,
        id,
        to: if kind == Op::Withdraw {
            [0; 32]
        } else {
            pk(to)
        },
        amount,
        timeout_ms: 0,
        reserve_id: 0,
        party: [0; 32],
    }
}

fn envelope(signer: u8, atomic: bool, ops: Vec<Operation>) -> (Arc<Envelope>, [u8; 32]) {
    let mut e = Envelope {
        chain_id: CHAIN,
        signer: pk(signer),
        atomic,
        ops,
        signature: [0; 64],
    };
    sign_envelope(&key(signer), &mut e);
    let hash = envelope_hash(&e);
    (Arc::new(e), hash)
}

fn submit(node: &mut Node, e: &(Arc<Envelope>, [u8; 32])) -> Submitted {
    node.seq
        .submit_envelope(e.0.clone(), e.1, 0, node.time_ms, &mut node.store)
        .expect("mem store does not fail")
}

/// A funded with 100 and applied.
fn funded() -> Node {
    let mut node = Node::new();
    assert!(matches!(
        node.submit(deposit(1, A, 100)),
        Submitted::Accepted { .. }
    ));
    node.seal_and_apply_all();
    node
}

#[test]
fn an_atomic_envelope_with_one_bad_operation_applies_nothing() {
    let mut node = funded();
    let before = (node.seq.meta().clone(), node.seq.open_len());
    // 30 + 50 fit, the third would need 30 more than is left.
    let e = envelope(
        A,
        true,
        vec![
            op(Op::Transfer, 1, B, 30),
            op(Op::Withdraw, 2, 0, 50),
            op(Op::Transfer, 3, C, 30),
        ],
    );
    match submit(&mut node, &e) {
        Submitted::Failed { index, rejection } => {
            assert_eq!((index, rejection.code), (2, ErrorCode::InsufficientFunds))
        }
        other => panic!("expected a failure at index 2, got {other:?}"),
    }
    assert_eq!((node.seq.meta().clone(), node.seq.open_len()), before);
    // Nothing was sequenced: a request after it sees A's whole balance, and the ids are free.
    assert!(matches!(
        node.submit(transfer(3, A, C, 100)),
        Submitted::Accepted { .. }
    ));
    node.seal_and_apply_all();
    assert_eq!((node.balance(A), node.balance(C)), (Some(0), Some(100)));
}

#[test]
fn an_independent_envelope_applies_what_it_can_and_replays_on_every_replica() {
    let mut node = funded();
    let e = envelope(
        A,
        false,
        vec![
            op(Op::Transfer, 1, B, 30),
            op(Op::Transfer, 2, C, 90),
            op(Op::Withdraw, 3, 0, 70),
        ],
    );
    assert_eq!(
        submit(&mut node, &e),
        Submitted::Accepted {
            height: 2,
            index: 0
        }
    );
    let applied = node.seal_and_apply_all();
    let (body, write) = &applied[0];
    let BatchItem::Envelope(entry) = &body.items[0] else {
        panic!("an envelope item")
    };
    let failed: Vec<_> = entry.receipts.iter().map(|r| r.failed).collect();
    assert_eq!(failed, vec![None, Some(ErrorCode::InsufficientFunds), None]);
    assert_eq!(
        (node.balance(A), node.balance(B), node.balance(C)),
        (Some(0), Some(30), None)
    );
    assert_eq!(
        node.store.meta().unwrap().expected_total(),
        30,
        "70 withdrawn"
    );
    // The stored body is the second layout and decodes back (apply_next checked the round trip).
    assert!(write.body.starts_with(b"tally/body/v2"));
    // Every operation's id is used, the failed one's too.
    let again = envelope(A, false, vec![op(Op::Transfer, 2, C, 1)]);
    match submit(&mut node, &again) {
        Submitted::Failed {
            index: 0,
            rejection,
        } => assert_eq!(rejection.code, ErrorCode::IdConflict),
        other => panic!("expected id_conflict, got {other:?}"),
    }
}

#[test]
fn a_resubmitted_envelope_gets_its_original_place() {
    let mut node = funded();
    assert!(matches!(
        node.submit(transfer(9, A, B, 1)),
        Submitted::Accepted { .. }
    ));
    let e = envelope(
        A,
        true,
        vec![op(Op::Transfer, 1, B, 2), op(Op::Transfer, 2, C, 3)],
    );
    assert_eq!(
        submit(&mut node, &e),
        Submitted::Accepted {
            height: 2,
            index: 1
        }
    );
    assert_eq!(
        submit(&mut node, &e),
        Submitted::InFlight {
            height: 2,
            index: 1
        }
    );
    node.seal_and_apply_all();
    match submit(&mut node, &e) {
        Submitted::Applied(record) => {
            assert_eq!(
                (record.height, record.index, record.request_hash),
                (2, 1, e.1)
            )
        }
        other => panic!("expected the applied record, got {other:?}"),
    }
    // Another envelope reusing one of its ids is refused at that operation.
    let other = envelope(
        A,
        true,
        vec![op(Op::Transfer, 7, B, 1), op(Op::Transfer, 2, C, 1)],
    );
    match submit(&mut node, &other) {
        Submitted::Failed {
            index: 1,
            rejection,
        } => assert_eq!(rejection.code, ErrorCode::IdConflict),
        got => panic!("expected id_conflict at 1, got {got:?}"),
    }
    assert_eq!(node.balance(A), Some(94));
}

#[test]
fn envelope_confirmations_verify_and_tampering_does_not() {
    let mut node = funded();
    assert!(matches!(
        node.submit(transfer(9, A, B, 1)),
        Submitted::Accepted { .. }
    ));
    let ops = (0..37)
        .map(|i| op(Op::Transfer, 100 + i, B + (i % 2) as u8, 1))
        .collect();
    let e = envelope(A, false, ops);
    submit(&mut node, &e);
    assert!(matches!(
        node.submit(transfer(10, A, C, 1)),
        Submitted::Accepted { .. }
    ));
    let (body, write) = node.seal_and_apply_all().remove(0);
    let operator = node.operator.public();
    let confirmations = body.confirmations(&write.signed_header);
    let Confirmed::Envelope(c) = &confirmations[1] else {
        panic!("item 1 is the envelope")
    };
    verify_envelope_confirmation(&e.0, c, &operator).expect("verifies");
    let mut bad = (**c).clone();
    bad.receipts[5].to_balance += 1;
    assert!(verify_envelope_confirmation(&e.0, &bad, &operator).is_err());
    let mut bad = (**c).clone();
    bad.proof.first += 1;
    assert!(verify_envelope_confirmation(&e.0, &bad, &operator).is_err());
    let mut forged = (*e.0).clone();
    forged.ops[3].amount += 1;
    assert!(verify_envelope_confirmation(&forged, c, &operator).is_err());
    let decoded = BatchBody::decode(&write.body).expect("decodes");
    assert_eq!(decoded, body);
}

#[test]
fn range_proofs_verify_every_range_of_every_small_tree() {
    for n in 1..=33u32 {
        let leaves: Vec<[u8; 32]> = (0..n).map(|i| [i as u8 + 1; 32]).collect();
        let tree = ProofTree::new(leaves.clone());
        for first in 0..n {
            for count in 1..=n - first {
                let proof = tree.range_proof(first, count);
                let range = &leaves[first as usize..(first + count) as usize];
                assert!(
                    verify_range(range, &proof, &tree.root()),
                    "n={n} {first}+{count}"
                );
                assert!(proof.hashes.len() <= 64);
                let mut wrong = range.to_vec();
                wrong[0][0] ^= 1;
                assert!(
                    !verify_range(&wrong, &proof, &tree.root()),
                    "n={n} {first}+{count}"
                );
                let mut extra = proof.clone();
                extra.hashes.push([0; 32]);
                assert!(
                    !verify_range(range, &extra, &tree.root()),
                    "n={n} {first}+{count}"
                );
                if first + count < n {
                    let mut shifted = proof.clone();
                    shifted.first += 1;
                    assert!(
                        !verify_range(range, &shifted, &tree.root()),
                        "n={n} {first}+{count}"
                    );
                }
            }
        }
    }
}

#[test]
fn a_forged_failure_or_success_diverges() {
    let mut node = funded();
    let e = envelope(
        A,
        false,
        vec![op(Op::Transfer, 1, B, 30), op(Op::Transfer, 2, C, 90)],
    );
    submit(&mut node, &e);
    node.seal();
    let body = node.pending.pop_front().expect("sealed");
    let meta = node.store.meta().unwrap();
    for tamper in 0..3 {
        let mut b = body.clone();
        let BatchItem::Envelope(entry) = &mut b.items[0] else {
            panic!("an envelope")
        };
        match tamper {
            0 => entry.receipts[0].failed = Some(ErrorCode::InsufficientFunds),
            1 => entry.receipts[1].failed = None,
            _ => entry.receipts[1].failed = Some(ErrorCode::UnknownAccount),
        }
        b.header.merkle_root = tally_core::merkle::Tree::new(&b.leaf_hashes()).root();
        let r = tally_core::batch::prepare_apply(
            &b,
            b.encode(),
            &meta,
            &mut crate::common::clone_store(&node.store),
            &node.operator,
        );
        assert!(
            matches!(r, Err(tally_core::Error::Diverged(_))),
            "tamper {tamper}: {r:?}"
        );
    }
}
