//! Stateless validation: everything that can be judged from the request bytes alone.

use std::collections::HashSet;

use tally_wire::{ErrorCode, Hash, Op, PublicKey, Request};

use crate::crypto::{verify_request, KeyCache};
use crate::Rejection;

/// What stateless validation needs to know: fixed for the life of a node.
#[derive(Debug, Clone)]
pub struct StatelessRules {
    pub chain_id: Hash,
    pub deposit_keys: HashSet<PublicKey>,
}

impl StatelessRules {
    /// Checks the chain id, who may sign what, and the Ed25519 signature (strict). The layout
    /// (domain tag, reserved bytes, amount, op) was already checked by the wire decoder.
    pub fn check(&self, request: &Request) -> Result<(), Rejection> {
        self.check_signed(request, verify_request)
    }

    /// [`StatelessRules::check`] with decompressed keys kept in `cache` (same answers).
    pub fn check_cached(&self, request: &Request, cache: &mut KeyCache) -> Result<(), Rejection> {
        self.check_signed(request, |r| cache.verify_request(r))
    }

    /// Everything [`StatelessRules::check`] checks except the signature, which the caller checks
    /// (in a batch: [`KeyCache::verify_requests`]) and refuses with [`bad_signature`].
    pub fn check_unsigned(&self, request: &Request) -> Result<(), Rejection> {
        if request.chain_id != self.chain_id {
            return Err(Rejection::new(
                ErrorCode::WrongChain,
                "the request is signed for another ledger (chain id)",
            ));
        }
        if request.op == Op::Deposit && !self.deposit_keys.contains(&request.signer) {
            return Err(Rejection::new(
                ErrorCode::UnknownDepositKey,
                "deposits must be signed by an operator deposit key",
            ));
        }
        Ok(())
    }

    fn check_signed(
        &self,
        request: &Request,
        verify: impl FnOnce(&Request) -> bool,
    ) -> Result<(), Rejection> {
        self.check_unsigned(request)?;
        if !verify(request) {
            return Err(bad_signature());
        }
        Ok(())
    }
}

/// The rejection of a signature strict Ed25519 verification refuses.
pub fn bad_signature() -> Rejection {
    Rejection::new(
        ErrorCode::BadSignature,
        "the signature does not verify (strict Ed25519)",
    )
}
