//! Stateless validation: chain id, who may deposit, strict signatures.

use std::collections::HashSet;

use tally_core::crypto::sign_request;
use tally_core::validate::StatelessRules;
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
}

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
        changed(withdraw(1, 1, 10), |r| r.op = Op::Transfer),
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
