//! The header log (PROTOCOL.md §4.12): leaf `i` is the signed header at height `i + 1`, the
//! archive's log. Building a `ConsistencyReply` from a store's nodes, and checking one.
//!
//! A proof that does not verify is no evidence against the operator (its hashes are not
//! signed: anyone could have changed them). Evidence is two things the operator signed that
//! cannot both hold: two different headers of one height, or two different checkpoints of one
//! size ([`split_view`]).

use ed25519_dalek::VerifyingKey;
use tally_wire::{ConsistencyReply, Hash, LogPoint, PublicKey, SignedHeader};

use crate::crypto::OperatorKey;
use crate::key_chain::KeySchedule;
use crate::tlog::{
    consistency_proof_by, inclusion_proof_by, leaf_hash, open_note, origin_for, root_by,
    verify_consistency, verify_inclusion, Checkpoint,
};
use crate::{Error, Result};

/// The log point of `header`: the operator's checkpoint of the log of its height (signed by
/// `sign`) and the header's inclusion in it, from the store's `node`s.
pub fn log_point<E>(
    header: SignedHeader,
    sign: &mut impl FnMut(&Checkpoint) -> Result<String, E>,
    node: &mut impl FnMut(u8, u64) -> Result<Hash, E>,
) -> Result<LogPoint, E> {
    let size = header.header.height;
    assert!(size >= 1, "height 0 has no header");
    let checkpoint = Checkpoint {
        origin: origin_for(&header.header.chain_id),
        size,
        root: root_by(size, node)?,
    };
    Ok(LogPoint {
        checkpoint: sign(&checkpoint)?,
        inclusion: inclusion_proof_by(size - 1, size, node)?,
        header,
    })
}

/// The reply to `GetConsistency` between two applied headers, the checkpoints signed with
/// `signer` (a whole key signs when asked).
pub fn consistency_reply<E>(
    from: SignedHeader,
    to: SignedHeader,
    signer: &OperatorKey,
    node: &mut impl FnMut(u8, u64) -> Result<Hash, E>,
) -> Result<ConsistencyReply, E> {
    consistency_reply_with(from, to, &mut |c| Ok(signer.sign_checkpoint(c)), node)
}

/// [`consistency_reply`] with checkpoints as `sign` gives them (a threshold operator's replica
/// reads the signatures the threshold made ahead).
pub fn consistency_reply_with<E>(
    from: SignedHeader,
    to: SignedHeader,
    sign: &mut impl FnMut(&Checkpoint) -> Result<String, E>,
    node: &mut impl FnMut(u8, u64) -> Result<Hash, E>,
) -> Result<ConsistencyReply, E> {
    let (m, n) = (from.header.height, to.header.height);
    assert!(1 <= m && m <= n, "consistency from {m} to {n}");
    Ok(ConsistencyReply {
        proof: consistency_proof_by(m, n, node)?,
        from: log_point(from, sign, node)?,
        to: log_point(to, sign, node)?,
    })
}

/// Checks a consistency reply under the operator key for `chain_id` (PROTOCOL.md §4.12):
/// returns the roots of both checkpoints.
pub fn verify_consistency_reply(
    reply: &ConsistencyReply,
    operator: &PublicKey,
    chain_id: &Hash,
) -> Result<(Checkpoint, Checkpoint)> {
    verify_consistency_reply_under(reply, &KeySchedule::genesis(*operator), chain_id)
}

/// [`verify_consistency_reply`] for a ledger whose key rotated: each header under the key for
/// its height, each checkpoint under a key at or after its size's (PROTOCOL.md §4.14).
pub fn verify_consistency_reply_under(
    reply: &ConsistencyReply,
    keys: &KeySchedule,
    chain_id: &Hash,
) -> Result<(Checkpoint, Checkpoint)> {
    let from = verified_point(&reply.from, keys, chain_id)?;
    let to = verified_point(&reply.to, keys, chain_id)?;
    if from.size > to.size {
        return Err(Error::Verify(format!(
            "the proof runs backwards, from {} to {}",
            from.size, to.size
        )));
    }
    for (point, cp) in [(&reply.from, &from), (&reply.to, &to)] {
        let leaf = leaf_hash(&point.header.encode());
        verify_inclusion(cp.size - 1, cp.size, &leaf, &cp.root, &point.inclusion).map_err(|e| {
            Error::Verify(format!(
                "the header at {} is not its checkpoint's last leaf: {e}",
                cp.size
            ))
        })?;
    }
    verify_consistency(from.size, to.size, &from.root, &to.root, &reply.proof).map_err(|e| {
        Error::Verify(format!(
            "the checkpoints of sizes {} and {} are not one log: {e}",
            from.size, to.size
        ))
    })?;
    Ok((from, to))
}

/// Opens a signed note under the first of `keys` that signed it.
pub fn open_note_under(note: &str, origin: &str, keys: &[PublicKey]) -> Result<String> {
    let mut last = Error::Verify("no operator key to check the note under".into());
    for public in keys {
        let key = VerifyingKey::from_bytes(public)
            .map_err(|_| Error::Verify("the operator key is not an Ed25519 point".into()))?;
        match open_note(note, origin, &key) {
            Ok(body) => return Ok(body),
            Err(e) => last = Error::Verify(e.to_string()),
        }
    }
    Err(last)
}

/// Whether two headers, each verified under the operator key, prove a split view: the same
/// chain and height, different bytes. (Two checkpoints of one size with different roots are
/// the same proof for the log: see [`checkpoints_split`].)
pub fn split_view(a: &SignedHeader, b: &SignedHeader) -> bool {
    a.header.chain_id == b.header.chain_id
        && a.header.height == b.header.height
        && a.encode() != b.encode()
}

/// Whether two verified checkpoints of one log prove a split view: one size, two roots.
pub fn checkpoints_split(a: &Checkpoint, b: &Checkpoint) -> bool {
    a.origin == b.origin && a.size == b.size && a.root != b.root
}

/// The checkpoint of one log point, after checking the header's and the note's signatures.
fn verified_point(point: &LogPoint, keys: &KeySchedule, chain_id: &Hash) -> Result<Checkpoint> {
    let invalid = Error::Verify;
    let h = &point.header.header;
    if h.chain_id != *chain_id {
        return Err(invalid(format!(
            "the header at {} is of another chain",
            h.height
        )));
    }
    keys.verify_header(&point.header)
        .map_err(|e| invalid(e.to_string()))?;
    let origin = origin_for(chain_id);
    let body = open_note_under(&point.checkpoint, &origin, &keys.checkpoint_keys(h.height))
        .map_err(|e| invalid(format!("the checkpoint at {}: {e}", h.height)))?;
    let checkpoint = Checkpoint::parse_body(&body)
        .map_err(|e| invalid(format!("the checkpoint at {}: {e}", h.height)))?;
    if checkpoint.origin != origin {
        return Err(invalid(format!(
            "checkpoint origin {:?}",
            checkpoint.origin
        )));
    }
    if checkpoint.size != h.height {
        return Err(invalid(format!(
            "the checkpoint's size {} is not its header's height {}",
            checkpoint.size, h.height
        )));
    }
    Ok(checkpoint)
}
