//! Two-phase transfers through the sequencer and every replica's replay: reserve, post (whole
//! and partial), void, renew, expiry by the batch's time, and the stable codes of each misuse.

use std::sync::Arc;

use tally_core::batch::{prepare_apply, BatchBody, BatchItem};
use tally_core::crypto::{envelope_hash, sign_envelope};
use tally_core::ports::{LedgerRead, LedgerStore};
use tally_core::reserve::{Held, Reserve};
use tally_core::sequencer::Submitted;
use tally_core::Error;
use tally_wire::{Envelope, ErrorCode, Op, Operation};

use crate::common::*;

const A: u8 = 1;
const B: u8 = 2;
const P: u8 = 3;
const STRANGER: u8 = 4;

fn reserve(id: u128, to: u8, amount: u64, timeout_ms: u64, party: Option<u8>) -> Operation {
    Operation {
        op: Op::Reserve,
        id,
        to: pk(to),
        amount,
        timeout_ms,
        reserve_id: 0,
        party: party.map_or([0; 32], pk),
    }
}

/// A post (`amount` 0: all), void or renewal of `owner`'s reserve `reserve_id`.
fn act(kind: Op, id: u128, reserve_id: u128, owner: Option<u8>, amount: u64) -> Operation {
    Operation {
        op: kind,
        id,
        to: [0; 32],
        amount: if kind == Op::Post { amount } else { 0 },
        timeout_ms: if kind == Op::Renew { amount } else { 0 },
        reserve_id,
        party: owner.map_or([0; 32], pk),
    }
}

fn submit(node: &mut Node, signer: u8, ops: Vec<Operation>) -> Submitted {
    let mut e = Envelope {
        chain_id: CHAIN,
        signer: pk(signer),
        atomic: false,
        ops,
        signature: [0; 64],
    };
    sign_envelope(&key(signer), &mut e);
    let hash = envelope_hash(&e);
    node.seq
        .submit_envelope(Arc::new(e), hash, 0, node.time_ms, &mut node.store)
        .expect("mem store does not fail")
}

/// The code of the only operation of a one-operation envelope, applied (None: it applied).
fn outcome(node: &mut Node, signer: u8, op: Operation) -> Option<ErrorCode> {
    assert!(matches!(
        submit(node, signer, vec![op]),
        Submitted::Accepted { .. }
    ));
    let (body, _) = node.seal_and_apply_all().pop().expect("a batch");
    let receipt = body.receipts().last().expect("a receipt").clone();
    assert_conserved(node);
    receipt.failed
}

fn assert_conserved(node: &mut Node) {
    let meta = node.store.meta().unwrap();
    assert_eq!(node.store.balance_total().unwrap(), meta.expected_total());
}

/// A funded with 100, applied.
fn funded() -> Node {
    let mut node = Node::new();
    assert!(matches!(
        node.submit(deposit(1, A, 100)),
        Submitted::Accepted { .. }
    ));
    node.seal_and_apply_all();
    node
}

fn state(node: &mut Node, owner: u8, id: u128) -> Option<Reserve> {
    node.store.reserve(&pk(owner), id).unwrap()
}

#[test]
fn a_partial_post_pays_the_receiver_and_returns_the_rest() {
    let mut node = funded();
    assert_eq!(outcome(&mut node, A, reserve(10, B, 60, 5_000, None)), None);
    assert_eq!(
        node.balance(A),
        Some(40),
        "held leaves the available balance"
    );
    let held = state(&mut node, A, 10).and_then(|r| r.open().copied());
    assert_eq!(held.map(|h| (h.to, h.amount)), Some((pk(B), 60)));
    assert_eq!(outcome(&mut node, A, act(Op::Post, 11, 10, None, 25)), None);
    assert_eq!((node.balance(A), node.balance(B)), (Some(75), Some(25)));
    assert_eq!(state(&mut node, A, 10), Some(Reserve::Posted));
    // Once posted, nothing more: not a second post, not a void.
    let again = outcome(&mut node, A, act(Op::Post, 12, 10, None, 0));
    assert_eq!(again, Some(ErrorCode::ReserveClosed));
    let void = outcome(&mut node, A, act(Op::Void, 13, 10, None, 0));
    assert_eq!(void, Some(ErrorCode::ReserveClosed));
    assert_eq!((node.balance(A), node.balance(B)), (Some(75), Some(25)));
}

/// History sees what moved available balances: the reserve debits its owner, the partial post
/// credits the receiver what it captured and the owner the rest, an expiry the owner.
#[test]
fn history_entries_of_two_phase_operations() {
    use tally_core::history::{account_entries, Direction};
    let mut node = funded();
    let entries = |node: &mut Node, signer, op| {
        assert!(matches!(
            submit(node, signer, vec![op]),
            Submitted::Accepted { .. }
        ));
        let (body, _) = node.seal_and_apply_all().pop().unwrap();
        account_entries(&body)
            .into_iter()
            .map(|e| (e.op, e.account, e.direction, e.amount, e.balance))
            .collect::<Vec<_>>()
    };
    let reserved = entries(&mut node, A, reserve(10, B, 60, 1_000, None));
    assert_eq!(
        reserved,
        vec![(Op::Reserve, pk(A), Direction::Debit, 60, 40)]
    );
    let posted = entries(&mut node, A, act(Op::Post, 11, 10, None, 25));
    assert_eq!(
        posted,
        vec![
            (Op::Post, pk(B), Direction::Credit, 25, 25),
            (Op::Post, pk(A), Direction::Credit, 35, 75),
        ]
    );
    let short = entries(&mut node, A, reserve(12, B, 5, 100, None));
    assert_eq!(short.len(), 1);
    let expired: Vec<_> = idle_until(&mut node, 200)
        .iter()
        .flat_map(account_entries)
        .map(|e| (e.op, e.account, e.direction, e.amount))
        .collect();
    assert_eq!(expired, vec![(Op::Expire, pk(A), Direction::Credit, 5)]);
}

#[test]
fn misuse_gets_its_stable_code() {
    let mut node = funded();
    assert_eq!(
        outcome(&mut node, A, reserve(10, B, 60, 5_000, Some(P))),
        None
    );
    let cases = [
        (
            A,
            act(Op::Post, 20, 10, None, 61),
            ErrorCode::PostExceedsReserve,
        ),
        (
            A,
            act(Op::Post, 21, 99, None, 0),
            ErrorCode::ReserveNotFound,
        ),
        (
            STRANGER,
            act(Op::Void, 22, 10, Some(A), 0),
            ErrorCode::NotAReserveParty,
        ),
        (
            B,
            act(Op::Post, 23, 10, Some(A), 0),
            ErrorCode::NotAReserveParty,
        ),
        (
            A,
            reserve(24, B, 41, 5_000, None),
            ErrorCode::InsufficientFunds,
        ),
    ];
    for (signer, op, code) in cases {
        assert_eq!(outcome(&mut node, signer, op), Some(code), "{op:?}");
    }
    // The party the reserve names may post it.
    assert_eq!(
        outcome(&mut node, P, act(Op::Post, 30, 10, Some(A), 0)),
        None
    );
    assert_eq!((node.balance(A), node.balance(B)), (Some(40), Some(60)));
}

#[test]
fn a_void_returns_everything() {
    let mut node = funded();
    assert_eq!(outcome(&mut node, A, reserve(10, B, 60, 5_000, None)), None);
    assert_eq!(outcome(&mut node, A, act(Op::Void, 11, 10, None, 0)), None);
    assert_eq!((node.balance(A), node.balance(B)), (Some(100), None));
    assert_eq!(state(&mut node, A, 10), Some(Reserve::Voided));
}

/// Advances the node's clock past `ms` and seals whatever the sequencer opens for it.
fn idle_until(node: &mut Node, ms: u64) -> Vec<BatchBody> {
    node.time_ms += ms;
    let now = node.time_ms;
    node.seq.open_batch(now, 0, &mut node.store).unwrap();
    node.seal_and_apply_all()
        .into_iter()
        .map(|(b, _)| b)
        .collect()
}

#[test]
fn a_reserve_expires_by_the_batch_time_and_only_then() {
    let mut node = funded();
    assert_eq!(outcome(&mut node, A, reserve(10, B, 60, 1_000, None)), None);
    let deadline = state(&mut node, A, 10)
        .unwrap()
        .open()
        .unwrap()
        .expires_at_ms;
    assert!(idle_until(&mut node, 500).is_empty(), "not due yet");
    let bodies = idle_until(&mut node, 600);
    assert_eq!(bodies.len(), 1, "an idle leader's batch of expiries");
    let body = &bodies[0];
    assert!(body.header.time_unix_ms >= deadline);
    assert!(matches!(&body.items[..], [BatchItem::Expire(e)] if e.id == 10 && e.owner == pk(A)));
    assert_eq!(body.receipts().next().unwrap().op, Op::Expire);
    assert_eq!(node.balance(A), Some(100));
    assert_eq!(state(&mut node, A, 10), Some(Reserve::Expired));
    assert_conserved(&mut node);
    let late = outcome(&mut node, A, act(Op::Post, 11, 10, None, 0));
    assert_eq!(late, Some(ErrorCode::ReserveExpired));
}

#[test]
fn a_post_after_the_deadline_fails_even_before_the_expiry_is_applied() {
    let mut node = funded();
    assert_eq!(outcome(&mut node, A, reserve(10, B, 60, 1_000, None)), None);
    node.time_ms += 1_000;
    // The batch this post opens expires the reserve first, then judges the post.
    let late = outcome(&mut node, A, act(Op::Post, 11, 10, None, 0));
    assert_eq!(late, Some(ErrorCode::ReserveExpired));
    assert_eq!((node.balance(A), node.balance(B)), (Some(100), None));
}

#[test]
fn a_renewal_moves_the_deadline_from_the_batch_time() {
    let mut node = funded();
    assert_eq!(outcome(&mut node, A, reserve(10, B, 60, 1_000, None)), None);
    node.time_ms += 800;
    assert_eq!(
        outcome(&mut node, A, act(Op::Renew, 11, 10, None, 1_000)),
        None
    );
    assert!(
        idle_until(&mut node, 500).is_empty(),
        "the old deadline passed, the new not"
    );
    assert_eq!(outcome(&mut node, A, act(Op::Post, 12, 10, None, 0)), None);
    assert_eq!((node.balance(A), node.balance(B)), (Some(40), Some(60)));
}

#[test]
fn a_batch_time_never_goes_back() {
    let mut node = funded();
    let before = node.store.header_time(1).unwrap();
    node.time_ms = before - 10_000;
    assert_eq!(outcome(&mut node, A, reserve(10, B, 1, 1_000, None)), None);
    assert_eq!(
        node.store.header_time(2).unwrap(),
        before,
        "max(previous, clock)"
    );
}

/// A replica refuses a batch whose expiry is not due, or whose reserve record is not the one
/// the operation found.
#[test]
fn forged_expiries_and_records_diverge() {
    let mut node = funded();
    assert_eq!(outcome(&mut node, A, reserve(10, B, 60, 1_000, None)), None);
    node.time_ms += 2_000;
    node.seq
        .open_batch(node.time_ms, 0, &mut node.store)
        .unwrap();
    node.seal();
    let body = node.pending.pop_front().unwrap();
    let mut early = body.clone();
    early.header.time_unix_ms -= 1_500;
    let mut moved = body.clone();
    let BatchItem::Expire(e) = &mut moved.items[0] else {
        panic!("an expiry first")
    };
    e.held = Held {
        amount: 59,
        ..e.held
    };
    for (what, forged) in [("not due", early), ("record", moved)] {
        let meta = node.store.meta().unwrap();
        let mut store = clone_store(&node.store);
        let got = prepare_apply(&forged, forged.encode(), &meta, &mut store, &node.operator);
        assert!(matches!(got, Err(Error::Diverged(_))), "{what}: {got:?}");
    }
    let meta = node.store.meta().unwrap();
    prepare_apply(&body, body.encode(), &meta, &mut node.store, &node.operator)
        .expect("the true body applies");
}
