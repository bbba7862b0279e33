//! Offline verification of a confirmation: everything a client needs is the confirmation itself
//! and the operator's public key.

use tally_wire::{
    BalanceProofReply, Confirmation, Envelope, EnvelopeConfirmation, ExpiryConfirmation, Op,
    OperationConfirmation, PublicKey,
};

use crate::crypto::{envelope_hash, request_hash, verify_envelope, verify_header, verify_request};
use crate::merkle::{leaf_hash, verify_inclusion, verify_range};
use crate::state::state_digest;
use crate::state_map::{account_path, account_value_hash, MapProof};
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

/// Checks the proof of one operation of an envelope: the envelope's signature, that the
/// receipt names the envelope and an operation of it (of the kind it repeats) at the header's
/// height, the inclusion proof of the receipt under the header's Merkle root, and the
/// operator's signature over the header.
pub fn verify_operation_confirmation(
    c: &OperationConfirmation,
    operator: &PublicKey,
) -> Result<()> {
    let fail = |what: &str| Err(Error::Verify(what.to_string()));
    let (e, r, h) = (&c.envelope, &c.receipt, &c.header.header);
    if e.chain_id != h.chain_id {
        return fail("the envelope and the header belong to different chains");
    }
    if !verify_envelope(e) {
        return fail("the envelope's signature does not verify");
    }
    if r.request_hash != envelope_hash(e) {
        return fail("the receipt is for a different envelope");
    }
    let Some(op) = e.ops.get(r.op_index as usize) else {
        return fail("the receipt names an operation the envelope does not have");
    };
    if r.op != op.op || r.height != h.height || (e.atomic && r.failed.is_some()) {
        return fail("the receipt does not describe the envelope's operation at this height");
    }
    if r.index != c.proof.leaf_index || c.proof.tree_size != h.request_count {
        return fail("the proof's position does not match the receipt and header");
    }
    if !verify_inclusion(&leaf_hash(&r.encode()), &c.proof, &h.merkle_root) {
        return fail("the inclusion proof does not lead to the header's Merkle root");
    }
    verify_header(operator, &c.header)
}

/// Checks the proof that a reserve expired: that the receipt names the expiry of `(owner, id)`
/// (op `expire`, operation 0) at the header's height, the inclusion proof of the receipt under
/// the header's Merkle root, and the operator's signature over the header.
pub fn verify_expiry_confirmation(c: &ExpiryConfirmation, operator: &PublicKey) -> Result<()> {
    let fail = |what: &str| Err(Error::Verify(what.to_string()));
    let (r, h) = (&c.receipt, &c.header.header);
    if r.request_hash != crate::reserve::expire_hash(&c.owner, c.id) {
        return fail("the receipt is not the expiry of this reserve");
    }
    if r.op != Op::Expire || r.op_index != 0 || r.failed.is_some() || r.height != h.height {
        return fail("the receipt does not describe an expiry at this height");
    }
    if r.index != c.proof.leaf_index || c.proof.tree_size != h.request_count {
        return fail("the proof's position does not match the receipt and header");
    }
    if !verify_inclusion(&leaf_hash(&r.encode()), &c.proof, &h.merkle_root) {
        return fail("the inclusion proof does not lead to the header's Merkle root");
    }
    verify_header(operator, &c.header)
}

/// Checks an envelope's confirmation, in order: the envelope's signature, that the confirmation
/// names this envelope, that receipt `i` describes operation `i` at leaf `first + i` of the
/// header's batch, the range proof of the receipts against the header's Merkle root, and the
/// operator's signature over the header.
pub fn verify_envelope_confirmation(
    envelope: &Envelope,
    c: &EnvelopeConfirmation,
    operator: &PublicKey,
) -> Result<()> {
    let fail = |what: &str| Err(Error::Verify(what.to_string()));
    let h = &c.header.header;
    if envelope.chain_id != h.chain_id {
        return fail("the envelope and the header belong to different chains");
    }
    if !verify_envelope(envelope) {
        return fail("the envelope's signature does not verify");
    }
    let hash = envelope_hash(envelope);
    if c.envelope_hash != hash {
        return fail("the confirmation is for a different envelope");
    }
    let p = &c.proof;
    if c.receipts.len() != envelope.ops.len() || p.count as usize != envelope.ops.len() {
        return fail("the confirmation does not hold one receipt per operation");
    }
    if p.tree_size != h.request_count {
        return fail("the proof's tree size differs from the header's leaf count");
    }
    for (i, (op, r)) in envelope.ops.iter().zip(&c.receipts).enumerate() {
        let at = (
            hash,
            h.height,
            p.first.checked_add(i as u32),
            op.op,
            i as u16,
        );
        if (r.request_hash, r.height, Some(r.index), r.op, r.op_index) != at {
            return fail(&format!(
                "receipt {i} does not describe operation {i} of the envelope"
            ));
        }
        if envelope.atomic && r.failed.is_some() {
            return fail("an atomic envelope's operation is marked failed");
        }
    }
    let leaves: Vec<_> = c.receipts.iter().map(|r| leaf_hash(&r.encode())).collect();
    if !verify_range(&leaves, p, &h.merkle_root) {
        return fail("the range proof does not lead to the header's Merkle root");
    }
    verify_header(operator, &c.header)
}

/// Checks a balance proof (PROTOCOL.md §4.13), in order: the operator's signature over the
/// header, that the summary gives the header's state digest, and that the siblings lead from
/// the account's entry (or from what stands where its path leads) to the summary's map root.
pub fn verify_balance_proof(p: &BalanceProofReply, operator: &PublicKey) -> Result<()> {
    let fail = |what: &str| Err(Error::Verify(what.to_string()));
    verify_header(operator, &p.header)?;
    let h = &p.header.header;
    let digest = state_digest(
        &p.map_root,
        p.account_count,
        p.total_deposited,
        p.total_withdrawn,
        h.height,
    );
    if digest != h.state_digest {
        return fail("the summary does not give the header's state digest");
    }
    let proof = MapProof {
        siblings: p.siblings.clone(),
        neighbor: p.neighbor,
    };
    let value = p.balance.map(account_value_hash);
    if !proof.verify(&p.map_root, &account_path(&p.account), value.as_ref()) {
        return fail(if p.balance.is_some() {
            "the proof does not lead from the account's balance to the map root"
        } else {
            "the proof does not show the account absent under the map root"
        });
    }
    Ok(())
}
