//! Account history derived from batch bodies: who each applied operation touched, in leaf
//! order, with balances after; failed operations of an independent envelope leave no entry.

use std::sync::Arc;

use tally_core::crypto::{envelope_hash, sign_envelope, OperatorKey};
use tally_core::engine::apply::Found;
use tally_core::history::{
    account_entries, confirmation_at, receipt_leaves, AccountEntry, Counters, Direction,
};
use tally_core::merkle::leaf_hash;
use tally_core::sequencer::Submitted;
use tally_core::verify::{verify_confirmation, verify_operation_confirmation};
use tally_wire::{Envelope, Op, Operation, PublicKey};

use crate::common::{deposit, key, pk, transfer, withdraw, Node, CHAIN, DEPOSIT};

const A: u8 = 1;
const B: u8 = 2;

/// (account, op, direction, counterparty, amount, balance after) of each entry.
type Seen = (PublicKey, Op, Direction, PublicKey, u64, u64);

fn seen(entries: &[AccountEntry]) -> Vec<Seen> {
    entries
        .iter()
        .map(|e| {
            (
                e.account,
                e.op,
                e.direction,
                e.counterparty,
                e.amount,
                e.balance,
            )
        })
        .collect()
}

fn accepted(s: Submitted) {
    assert!(matches!(s, Submitted::Accepted { .. }), "{s:?}");
}

#[test]
fn requests_touch_the_accounts_their_kind_names() {
    let mut node = Node::new();
    accepted(node.submit(deposit(1, A, 100)));
    accepted(node.submit(transfer(2, A, B, 30)));
    accepted(node.submit(withdraw(3, B, 10)));
    let applied = node.seal_and_apply_all();
    assert_eq!(applied.len(), 1);
    let body = &applied[0].0;
    let entries = account_entries(body);
    assert_eq!(
        seen(&entries),
        vec![
            (pk(A), Op::Deposit, Direction::Credit, pk(DEPOSIT), 100, 100),
            (pk(A), Op::Transfer, Direction::Debit, pk(B), 30, 70),
            (pk(B), Op::Transfer, Direction::Credit, pk(A), 30, 30),
            (pk(B), Op::Withdraw, Direction::Debit, [0; 32], 10, 20),
        ]
    );
    let indexes: Vec<u32> = entries.iter().map(|e| e.index).collect();
    assert_eq!(indexes, vec![0, 1, 1, 2]);
    assert!(entries.iter().all(|e| e.height == 1));
    // Running counters over A's entries.
    let a = entries.iter().filter(|e| e.account == pk(A));
    let counters = a.fold(Counters::default(), |c, e| c.after(e));
    assert_eq!(
        counters,
        Counters {
            total_debited: 30,
            total_credited: 100,
            operation_count: 2
        }
    );
}

fn envelope(signer: u8, ops: Vec<Operation>) -> (Arc<Envelope>, [u8; 32]) {
    let mut e = Envelope {
        chain_id: CHAIN,
        signer: pk(signer),
        atomic: false,
        ops,
        signature: [0; 64],
    };
    sign_envelope(&key(signer), &mut e);
    let hash = envelope_hash(&e);
    (Arc::new(e), hash)
}

#[test]
fn failed_operations_of_an_envelope_leave_no_entry_and_receipts_find_their_confirmation() {
    let mut node = Node::new();
    accepted(node.submit(deposit(1, A, 100)));
    node.seal_and_apply_all();
    let op = |id, amount| Operation::single(Op::Transfer, id, pk(B), amount);
    // The second transfer asks more than A holds after the first: it fails alone.
    let (e, hash) = envelope(A, vec![op(10, 60), op(11, 60), op(12, 40)]);
    let s = node
        .seq
        .submit_envelope(e, hash, 0, node.time_ms, &mut node.store)
        .unwrap();
    accepted(s);
    let applied = node.seal_and_apply_all();
    let (body, write) = &applied[0];
    let entries = account_entries(body);
    assert_eq!(
        seen(&entries),
        vec![
            (pk(A), Op::Transfer, Direction::Debit, pk(B), 60, 40),
            (pk(B), Op::Transfer, Direction::Credit, pk(A), 60, 60),
            (pk(A), Op::Transfer, Direction::Debit, pk(B), 40, 0),
            (pk(B), Op::Transfer, Direction::Credit, pk(A), 40, 100),
        ]
    );
    assert!(entries
        .iter()
        .all(|e| e.request_hash == hash && e.height == 2));
    assert_eq!(
        entries.iter().map(|e| e.index).collect::<Vec<_>>(),
        vec![0, 0, 2, 2]
    );

    // Every receipt (failed ones too) is in the receipt index and finds its confirmation.
    let operator = OperatorKey::new(key(crate::common::OPERATOR));
    let leaves = receipt_leaves(body);
    assert_eq!(leaves.len(), 3);
    for (leaf, index) in leaves {
        let Some(Found::Operation(c)) = confirmation_at(body, write.signed_header.clone(), index)
        else {
            panic!("leaf {index} of an envelope is an operation");
        };
        assert_eq!(leaf_hash(&c.receipt.encode()), leaf);
        assert_eq!(c.receipt.index, index);
        verify_operation_confirmation(&c, &operator.public()).unwrap();
    }
    assert!(confirmation_at(body, write.signed_header.clone(), 3).is_none());
}

#[test]
fn a_request_leaf_gives_a_request_confirmation() {
    let mut node = Node::new();
    accepted(node.submit(deposit(1, A, 5)));
    accepted(node.submit(deposit(2, B, 6)));
    let applied = node.seal_and_apply_all();
    let (body, write) = &applied[0];
    let Some(Found::Request(c)) = confirmation_at(body, write.signed_header.clone(), 1) else {
        panic!("leaf 1 is a request");
    };
    assert_eq!(c.request.id, 2);
    verify_confirmation(&c, &OperatorKey::new(key(crate::common::OPERATOR)).public()).unwrap();
}
