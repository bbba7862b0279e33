//! Stateless validation: everything that can be judged from the request bytes alone.

use std::collections::HashSet;

use curve25519_dalek::edwards::CompressedEdwardsY;
use tally_wire::{Envelope, ErrorCode, Hash, Op, PublicKey, Request};

use crate::crypto::{verify_envelope, verify_request, KeyCache};
use crate::Rejection;

/// What stateless validation needs to know: fixed for the life of a node.
#[derive(Debug, Clone)]
pub struct StatelessRules {
    pub chain_id: Hash,
    pub deposit_keys: HashSet<PublicKey>,
}

impl StatelessRules {
    /// Checks the chain id, who may sign what, that the credited account is a key that can sign,
    /// and the Ed25519 signature (strict), in this order: the first failure is the answer
    /// (PROTOCOL.md §5.2). The layout (domain tag, reserved bytes, amount, op, the all-zero and
    /// self-transfer rules on `to`) was already checked by the wire decoder.
    pub fn check(&self, request: &Request) -> Result<(), Rejection> {
        self.check_signed(request, verify_request)
    }

    /// [`StatelessRules::check`] with decompressed keys kept in `cache` (same answers).
    pub fn check_cached(&self, request: &Request, cache: &mut KeyCache) -> Result<(), Rejection> {
        self.check_signed(request, |r| cache.verify_request(r))
    }

    /// Everything [`StatelessRules::check`] checks except the signature, which the caller checks
    /// (in a batch: [`KeyCache::verify_requests`]) and refuses with [`bad_signature`].
    /// `accounts` remembers recipients already found to be account keys: the check is a point
    /// decompression and a compression, two field exponentiations, as much as the batch
    /// equation spends on the signature itself.
    pub fn check_unsigned(
        &self,
        request: &Request,
        accounts: &mut AccountKeys,
    ) -> Result<(), Rejection> {
        self.check_unsigned_with(request, |to| accounts.check(to))
    }

    fn check_unsigned_with(
        &self,
        request: &Request,
        usable: impl FnOnce(&PublicKey) -> bool,
    ) -> Result<(), Rejection> {
        if request.chain_id != self.chain_id {
            return Err(wrong_chain());
        }
        let deposit_key = self.deposit_keys.contains(&request.signer);
        check_shape(request.op, deposit_key, &request.to, usable)
    }

    /// [`StatelessRules::check`] for an envelope: the chain id, who may sign each operation,
    /// that each credited account is a key that can sign, then the one strict signature. A
    /// failure names the operation (`Some(index)`) when one operation is at fault.
    /// `accounts` remembers recipients already found to be account keys (a point
    /// decompression each, which would otherwise dominate an envelope's cost).
    pub fn check_envelope(
        &self,
        envelope: &Envelope,
        accounts: &mut AccountKeys,
    ) -> Result<(), (Option<u32>, Rejection)> {
        if envelope.chain_id != self.chain_id {
            return Err((None, wrong_chain()));
        }
        let deposit_key = self.deposit_keys.contains(&envelope.signer);
        for (i, op) in envelope.ops.iter().enumerate() {
            let shape = check_shape(op.op, deposit_key, &op.to, |to| accounts.check(to));
            shape.map_err(|r| (Some(i as u32), r))?;
        }
        if !verify_envelope(envelope) {
            return Err((None, bad_signature()));
        }
        Ok(())
    }

    fn check_signed(
        &self,
        request: &Request,
        verify: impl FnOnce(&Request) -> bool,
    ) -> Result<(), Rejection> {
        self.check_unsigned_with(request, is_account_key)?;
        if !verify(request) {
            return Err(bad_signature());
        }
        Ok(())
    }
}

/// Keys known to be account keys ([`is_account_key`]), at most `cap`; when full it is cleared
/// and refilled (no eviction order to keep). Only keys that pass are kept.
pub struct AccountKeys {
    known: HashSet<PublicKey>,
    cap: usize,
}

impl AccountKeys {
    pub fn new(cap: usize) -> AccountKeys {
        AccountKeys {
            known: HashSet::new(),
            cap: cap.max(1),
        }
    }

    /// [`is_account_key`], remembered.
    pub fn check(&mut self, key: &PublicKey) -> bool {
        if self.known.contains(key) {
            return true;
        }
        if !is_account_key(key) {
            return false;
        }
        if self.known.len() >= self.cap {
            self.known.clear();
        }
        self.known.insert(*key);
        true
    }
}

fn wrong_chain() -> Rejection {
    Rejection::new(
        ErrorCode::WrongChain,
        "the request is signed for another ledger (chain id)",
    )
}

/// Who may sign an operation of this kind, and whether its recipient can own an account
/// (`usable`, [`is_account_key`] or a cached answer of it).
fn check_shape(
    op: Op,
    deposit_key: bool,
    to: &PublicKey,
    usable: impl FnOnce(&PublicKey) -> bool,
) -> Result<(), Rejection> {
    if op == Op::Deposit && !deposit_key {
        return Err(Rejection::new(
            ErrorCode::UnknownDepositKey,
            "deposits must be signed by an operator deposit key",
        ));
    }
    let credits_to = matches!(op, Op::Deposit | Op::Transfer | Op::Reserve);
    if credits_to && !usable(to) {
        return Err(Rejection::new(
            ErrorCode::MalformedRequest,
            "the recipient (to) is not a usable Ed25519 public key: funds sent there could \
             never be spent",
        ));
    }
    Ok(())
}

/// The rejection of a signature strict Ed25519 verification refuses.
pub fn bad_signature() -> Rejection {
    Rejection::new(
        ErrorCode::BadSignature,
        "the signature does not verify (strict Ed25519)",
    )
}

/// Whether `key` can own an account: the canonical encoding of a curve point that is not of
/// small order, i.e. a key whose holder can make signatures strict verification accepts (§6).
/// Funds credited to any other 32 bytes could never move again. Pure arithmetic on the bytes,
/// so every replica decides alike.
pub fn is_account_key(key: &PublicKey) -> bool {
    let Some(point) = CompressedEdwardsY(*key).decompress() else {
        return false;
    };
    // `decompress` also takes non-canonical encodings (y ≥ p, or x = 0 with the sign bit set);
    // an account is its key's bytes, and a signer's key bytes are always the canonical ones.
    point.compress().to_bytes() == *key && !point.is_small_order()
}
