//! Ledger rules as the sequencer enforces them, written as scripts of submissions, seals and
//! applies with the outcome each submission must have and the balances the store must end with.

use tally_core::crypto::request_hash;
use tally_core::ports::{LedgerStore, RequestRecord};
use tally_core::sequencer::Submitted;
use tally_wire::{ErrorCode, Request};

use crate::common::{deposit, total_balance, transfer, withdraw, Node};

// Steps are few and short-lived: boxing the request would only add noise to the scripts.
#[allow(clippy::large_enum_variant)]
enum Step {
    Submit(Request, Expect),
    /// Seal the open batch (it must not be empty).
    Seal,
    /// Apply the oldest sealed batch.
    Apply,
}

#[derive(Debug)]
enum Expect {
    /// Added to the open batch (at the next index of the next height).
    Accepted,
    InFlight(u64, u32),
    Applied(u64, u32),
    Rejected(ErrorCode),
}

use Expect::*;
use Step::*;

fn ok(r: Request) -> Step {
    Submit(r, Accepted)
}

fn rejected(r: Request, code: ErrorCode) -> Step {
    Submit(r, Rejected(code))
}

/// Runs `steps` on a fresh node, then seals and applies whatever is left and compares the store's
/// balances with `balances` (None: the account must not exist).
fn check(name: &str, steps: Vec<Step>, balances: &[(u8, Option<u64>)]) {
    let mut node = Node::new();
    for (i, step) in steps.into_iter().enumerate() {
        let what = format!("{name}, step {i}");
        match step {
            Submit(request, expect) => {
                let (meta_before, open_before) = (node.seq.meta().clone(), node.seq.open_len());
                let rh = request_hash(&request);
                let got = node.submit(request);
                match (&expect, &got) {
                    (Accepted, Submitted::Accepted { height, index }) => {
                        assert_eq!(*height, node.seq.sealed_height() + 1, "{what}: height");
                        assert_eq!(*index as usize, open_before, "{what}: index");
                        assert_eq!(node.seq.open_len(), open_before + 1, "{what}");
                    }
                    (InFlight(h, i), Submitted::InFlight { height, index }) => {
                        assert_eq!((*h, *i), (*height, *index), "{what}")
                    }
                    (Applied(h, i), Submitted::Applied(record)) => {
                        assert_eq!(
                            *record,
                            RequestRecord {
                                height: *h,
                                index: *i,
                                request_hash: rh
                            },
                            "{what}"
                        )
                    }
                    (Rejected(code), Submitted::Rejected(r)) => {
                        assert_eq!(*code, r.code, "{what}: {}", r.message)
                    }
                    _ => panic!("{what}: expected {expect:?}, got {got:?}"),
                }
                if !matches!(got, Submitted::Accepted { .. }) {
                    assert_eq!(
                        *node.seq.meta(),
                        meta_before,
                        "{what}: a request not accepted changed the state"
                    );
                    assert_eq!(
                        node.seq.open_len(),
                        open_before,
                        "{what}: a request not accepted joined the batch"
                    );
                }
            }
            Seal => assert!(node.seal().is_some(), "{what}: nothing to seal"),
            Apply => assert!(node.apply_next().is_some(), "{what}: nothing to apply"),
        }
    }
    node.seal_and_apply_all();
    for (account, expected) in balances {
        assert_eq!(
            node.balance(*account),
            *expected,
            "{name}: balance of account {account}"
        );
    }
    let meta = node.store.meta().expect("mem store");
    assert_eq!(
        total_balance(&node.store),
        meta.expected_total(),
        "{name}: conservation"
    );
    assert_eq!(
        *node.seq.meta(),
        meta,
        "{name}: the sequencer's state is the applied state"
    );
}

const A: u8 = 1;
const B: u8 = 2;
const C: u8 = 3;

#[test]
fn deposit_creates_an_account() {
    check(
        "deposit",
        vec![ok(deposit(1, A, 100))],
        &[(A, Some(100)), (B, None)],
    );
    check(
        "two deposits",
        vec![ok(deposit(1, A, 100)), ok(deposit(2, A, 5))],
        &[(A, Some(105))],
    );
}

#[test]
fn transfer_moves_funds() {
    check(
        "transfer",
        vec![
            ok(deposit(1, A, 100)),
            ok(transfer(1, A, B, 30)),
            Seal,
            Apply,
            ok(transfer(2, B, A, 5)),
        ],
        &[(A, Some(75)), (B, Some(25))],
    );
    check(
        "transfer everything",
        vec![
            ok(deposit(1, A, 100)),
            Seal,
            Apply,
            ok(transfer(1, A, B, 100)),
        ],
        &[(A, Some(0)), (B, Some(100))],
    );
}

#[test]
fn unknown_account() {
    check(
        "unknown",
        vec![
            rejected(transfer(1, A, B, 1), ErrorCode::UnknownAccount),
            rejected(withdraw(2, A, 1), ErrorCode::UnknownAccount),
            // The recipient of a transfer need not exist; the sender must.
            ok(deposit(1, B, 5)),
            rejected(transfer(3, A, B, 1), ErrorCode::UnknownAccount),
        ],
        &[(A, None), (B, Some(5))],
    );
}

#[test]
fn insufficient_funds() {
    check(
        "insufficient",
        vec![
            ok(deposit(1, A, 10)),
            rejected(transfer(1, A, B, 11), ErrorCode::InsufficientFunds),
            rejected(withdraw(2, A, 11), ErrorCode::InsufficientFunds),
            Seal,
            Apply,
            rejected(transfer(3, A, B, u64::MAX), ErrorCode::InsufficientFunds),
            ok(transfer(4, A, B, 10)),
            rejected(transfer(5, A, B, 1), ErrorCode::InsufficientFunds),
        ],
        // An emptied account still exists.
        &[(A, Some(0)), (B, Some(10))],
    );
}

#[test]
fn amount_overflow_is_refused_not_wrapped() {
    check(
        "deposit overflow",
        vec![
            ok(deposit(1, A, u64::MAX)),
            rejected(deposit(2, A, 1), ErrorCode::AmountOverflow),
            Seal,
            Apply,
            // Now read from the store rather than from the open batch.
            rejected(deposit(3, A, 1), ErrorCode::AmountOverflow),
        ],
        &[(A, Some(u64::MAX))],
    );
    check(
        "transfer overflow",
        vec![
            ok(deposit(1, A, u64::MAX)),
            ok(deposit(2, B, 7)),
            rejected(transfer(1, B, A, 1), ErrorCode::AmountOverflow),
            ok(withdraw(1, A, 1)),
            ok(transfer(2, B, A, 1)),
            rejected(transfer(3, B, A, 1), ErrorCode::AmountOverflow),
        ],
        &[(A, Some(u64::MAX)), (B, Some(6))],
    );
}

#[test]
fn withdraw_debits() {
    check(
        "withdraw",
        vec![
            ok(deposit(1, A, 50)),
            ok(withdraw(1, A, 20)),
            Seal,
            Apply,
            ok(withdraw(2, A, 30)),
        ],
        &[(A, Some(0))],
    );
}

#[test]
fn idempotency() {
    check(
        "resubmission",
        vec![
            ok(deposit(1, A, 100)),
            ok(transfer(7, A, B, 10)),
            Submit(transfer(7, A, B, 10), InFlight(1, 1)),
            rejected(transfer(7, A, B, 11), ErrorCode::IdConflict),
            Seal,
            Submit(transfer(7, A, B, 10), InFlight(1, 1)),
            Submit(deposit(1, A, 100), InFlight(1, 0)),
            Apply,
            Submit(transfer(7, A, B, 10), Applied(1, 1)),
            Submit(deposit(1, A, 100), Applied(1, 0)),
            rejected(transfer(7, A, B, 11), ErrorCode::IdConflict),
            rejected(transfer(7, A, C, 10), ErrorCode::IdConflict),
            rejected(withdraw(7, A, 10), ErrorCode::IdConflict),
            rejected(deposit(1, B, 100), ErrorCode::IdConflict),
            // The key is (signer, id): another signer may use the same id.
            ok(transfer(7, B, A, 1)),
            ok(transfer(8, A, B, 10)),
        ],
        &[(A, Some(81)), (B, Some(19))],
    );
}

#[test]
fn idempotency_outlives_the_in_memory_window() {
    // With recent_heights_kept = 4, the keys of batch 1 are forgotten after batch 6 is applied;
    // a resubmission that no snapshot stage has looked at must then be found in the store.
    let mut steps = vec![
        ok(deposit(1, A, 100)),
        ok(transfer(1, A, B, 10)),
        Seal,
        Apply,
    ];
    for id in 2..8 {
        steps.extend([ok(transfer(id, A, B, 1)), Seal, Apply]);
    }
    steps.extend([
        Submit(transfer(1, A, B, 10), Applied(1, 1)),
        Submit(deposit(1, A, 100), Applied(1, 0)),
        Submit(transfer(2, A, B, 1), Applied(2, 0)),
        rejected(transfer(1, A, B, 9), ErrorCode::IdConflict),
    ]);
    check("forgotten keys", steps, &[(A, Some(84)), (B, Some(16))]);
}

#[test]
fn later_requests_see_earlier_effects() {
    check(
        "same batch",
        vec![
            ok(deposit(1, A, 10)),
            ok(transfer(1, A, B, 10)),
            ok(transfer(1, B, C, 10)),
            rejected(withdraw(2, A, 1), ErrorCode::InsufficientFunds),
            rejected(transfer(2, B, A, 1), ErrorCode::InsufficientFunds),
            ok(withdraw(1, C, 4)),
            rejected(transfer(2, C, A, 7), ErrorCode::InsufficientFunds),
            ok(transfer(2, C, A, 6)),
        ],
        &[(A, Some(6)), (B, Some(0)), (C, Some(0))],
    );
    check(
        "sealed but not applied",
        vec![
            ok(deposit(1, A, 10)),
            Seal,
            ok(transfer(1, A, B, 10)),
            Seal,
            rejected(transfer(2, A, B, 1), ErrorCode::InsufficientFunds),
            ok(transfer(1, B, C, 3)),
            Apply,
            rejected(transfer(3, A, B, 1), ErrorCode::InsufficientFunds),
            Apply,
            ok(transfer(2, B, A, 7)),
        ],
        &[(A, Some(7)), (B, Some(0)), (C, Some(3))],
    );
}

#[test]
fn sealing_an_empty_batch_makes_nothing() {
    let mut node = Node::new();
    assert_eq!(node.seal(), None);
    assert!(matches!(
        node.submit(transfer(1, A, B, 1)),
        Submitted::Rejected(_)
    ));
    assert_eq!(
        node.seal(),
        None,
        "a rejected request does not make a batch"
    );
    assert_eq!(node.seq.sealed_height(), 0);
}

#[test]
fn a_full_batch_says_so() {
    let mut node = Node::with_config(|c| c.batch_requests_max = 2);
    node.submit(deposit(1, A, 1));
    assert!(!node.seq.is_full());
    node.submit(deposit(2, A, 1));
    assert!(node.seq.is_full());
    node.seal();
    assert!(!node.seq.is_full());
}
