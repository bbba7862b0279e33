//! Offline verification of a confirmation: everything a client needs is the confirmation itself
//! and the operator's public key.

use tally_wire::{Confirmation, PublicKey};

use crate::crypto::{request_hash, verify_header, verify_request};
use crate::merkle::{leaf_hash, verify_inclusion};
use crate::{Error, Result};

/// Checks, in order: the request's own signature, that the receipt names the request, that the
/// receipt sits at the proven leaf of the header's batch, the inclusion proof against the
/// header's Merkle root, and the operator's signature over the header.
pub fn verify_confirmation(c: &Confirmation, operator: &PublicKey) -> Result<()> {
    let fail = |what: &str| Err(Error::Verify(what.to_string()));
    let h = &c.header.header;
    if c.request.chain_id != h.chain_id {
        return fail("the request and the header belong to different chains");
    }
    if !verify_request(&c.request) {
        return fail("the request's signature does not verify");
    }
    if c.receipt.request_hash != request_hash(&c.request) {
        return fail("the receipt is for a different request");
    }
    if c.receipt.op != c.request.op {
        return fail("the receipt's operation differs from the request's");
    }
    if c.receipt.height != h.height {
        return fail("the receipt's height differs from the header's");
    }
    if c.receipt.index != c.proof.leaf_index || c.proof.tree_size != h.request_count {
        return fail("the proof's position does not match the receipt and header");
    }
    if !verify_inclusion(&leaf_hash(&c.receipt.encode()), &c.proof, &h.merkle_root) {
        return fail("the inclusion proof does not lead to the header's Merkle root");
    }
    verify_header(operator, &c.header)
}
