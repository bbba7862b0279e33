//! Stateless validation: chain id, who may deposit, strict signatures.

use std::collections::HashSet;

use tally_core::crypto::{sign_request, verify_request};
use tally_core::validate::{is_account_key, AccountKeys, StatelessRules};
use tally_wire::{ErrorCode, Op, Request};

use crate::common::{deposit, key, pk, signed, transfer, withdraw, CHAIN, DEPOSIT};
use crate::signing::{identity_key_signature, with_s_plus_l, IDENTITY_KEY};

fn check(name: &str, request: Request, expected: Result<(), ErrorCode>) {
    let rules = StatelessRules {
        chain_id: CHAIN,
        deposit_keys: HashSet::from([pk(DEPOSIT)]),
    };
    assert_eq!(
        rules.check(&request).map_err(|r| r.code),
        expected,
        "{name}"
    );
    // The workers' path: the rules with remembered recipients (cold, then warm), then the
    // signature on its own; the same answer.
    let mut accounts = AccountKeys::new(4);
    for round in ["cold", "warm"] {
        let answer = rules
            .check_unsigned(&request, &mut accounts)
            .and_then(|()| match verify_request(&request) {
                true => Ok(()),
                false => Err(tally_core::validate::bad_signature()),
            });
        assert_eq!(
            answer.map_err(|r| r.code),
            expected,
            "{name} ({round} cache)"
        );
    }
}

/// 32 bytes that are no curve point: y = 2 has no x on edwards25519.
const NOT_A_POINT: [u8; 32] = {
    let mut k = [0; 32];
    k[0] = 2;
    k
};

/// The identity (y = 1) written non-canonically as y = p + 1 = 2^255 - 18.
const NON_CANONICAL: [u8; 32] = {
    let mut k = [0xff; 32];
    k[0] = 0xee;
    k[31] = 0x7f;
    k
};

/// The point of order 2 (y = -1 = p - 1): canonical, on the curve, of small order.
const ORDER_TWO: [u8; 32] = {
    let mut k = [0xff; 32];
    k[0] = 0xec;
    k[31] = 0x7f;
    k
};

fn changed(mut r: Request, change: impl FnOnce(&mut Request)) -> Request {
    change(&mut r);
    r
}

#[test]
fn stateless_rules() {
    use ErrorCode::*;
    check("a transfer", transfer(1, 1, 2, 10), Ok(()));
    check("a withdrawal", withdraw(1, 1, 10), Ok(()));
    check("a deposit by the deposit key", deposit(1, 1, 10), Ok(()));
    check(
        "a transfer by the deposit key",
        signed(&key(DEPOSIT), Op::Transfer, 1, pk(1), 5),
        Ok(()),
    );

    let mut foreign = transfer(1, 1, 2, 10);
    foreign.chain_id = [8; 32];
    sign_request(&key(1), &mut foreign);
    check(
        "another chain, signed for it",
        foreign.clone(),
        Err(WrongChain),
    );
    check(
        "another chain, bad signature too",
        changed(foreign, |r| r.signature[0] ^= 1),
        Err(WrongChain),
    );

    check(
        "a deposit by an account key",
        signed(&key(1), Op::Deposit, 1, pk(2), 10),
        Err(UnknownDepositKey),
    );
    check(
        "a deposit by an unknown key",
        signed(&key(201), Op::Deposit, 1, pk(2), 10),
        Err(UnknownDepositKey),
    );
    check(
        "a deposit key's deposit with the signer swapped",
        changed(deposit(1, 2, 10), |r| r.signer = pk(1)),
        Err(UnknownDepositKey),
    );
    check(
        "a deposit with a bad signature",
        changed(deposit(1, 2, 10), |r| r.signature[40] ^= 1),
        Err(BadSignature),
    );

    check(
        "a flipped signature bit",
        changed(transfer(1, 1, 2, 10), |r| r.signature[63] ^= 0x01),
        Err(BadSignature),
    );
    check(
        "an all-zero signature",
        changed(transfer(1, 1, 2, 10), |r| r.signature = [0; 64]),
        Err(BadSignature),
    );
    check(
        "a changed amount",
        changed(transfer(1, 1, 2, 10), |r| r.amount = 11),
        Err(BadSignature),
    );
    check(
        "a changed recipient",
        changed(transfer(1, 1, 2, 10), |r| r.to = pk(3)),
        Err(BadSignature),
    );
    check(
        "a changed id",
        changed(transfer(1, 1, 2, 10), |r| r.id = 2),
        Err(BadSignature),
    );
    check(
        "a changed operation",
        changed(signed(&key(DEPOSIT), Op::Transfer, 1, pk(1), 5), |r| {
            r.op = Op::Deposit
        }),
        Err(BadSignature),
    );
    check(
        "another account's signature",
        changed(transfer(1, 2, 3, 10), |r| r.signer = pk(1)),
        Err(BadSignature),
    );
    check(
        "a non-canonical S",
        changed(transfer(1, 1, 2, 10), |r| {
            r.signature = with_s_plus_l(&r.signature)
        }),
        Err(BadSignature),
    );
    check(
        "a small-order signer",
        changed(transfer(1, 1, 2, 10), |r| {
            r.signer = IDENTITY_KEY;
            r.signature = identity_key_signature();
        }),
        Err(BadSignature),
    );
}

#[test]
fn credited_accounts_must_be_keys_that_can_sign() {
    use ErrorCode::*;
    let to = |bytes: [u8; 32]| signed(&key(1), Op::Transfer, 1, bytes, 5);
    check("a transfer to a real key", to(pk(2)), Ok(()));
    for (name, bytes) in [
        ("no curve point", NOT_A_POINT),
        ("a non-canonical encoding", NON_CANONICAL),
        ("the point of order 2", ORDER_TWO),
        ("the identity (small order)", IDENTITY_KEY),
    ] {
        check(name, to(bytes), Err(MalformedRequest));
        check(
            &format!("a deposit to {name}"),
            signed(&key(DEPOSIT), Op::Deposit, 1, bytes, 5),
            Err(MalformedRequest),
        );
        assert!(!is_account_key(&bytes), "{name}");
    }
    for seed in 0..=255 {
        assert!(is_account_key(&pk(seed)), "pk({seed})");
    }

    // Precedence (PROTOCOL.md §5.2): chain, then deposit key, then recipient, then signature.
    let mut foreign = to(NOT_A_POINT);
    foreign.chain_id = [8; 32];
    sign_request(&key(1), &mut foreign);
    check(
        "another chain and a bad recipient",
        foreign,
        Err(WrongChain),
    );
    check(
        "an unknown deposit key and a bad recipient",
        signed(&key(1), Op::Deposit, 1, NOT_A_POINT, 5),
        Err(UnknownDepositKey),
    );
    check(
        "a bad recipient and a bad signature",
        changed(to(NOT_A_POINT), |r| r.signature[0] ^= 1),
        Err(MalformedRequest),
    );
}
