//! Envelopes: many operations under one signature (PROTOCOL.md §2.4).
//!
//! An envelope is signed once by its signer and carries up to [`ENVELOPE_OPS_MAX`] operations of
//! [`OPERATION_BYTES`] each. Every operation keeps its own id, so `(signer, id)` stays the
//! exactly-once key whether an operation came alone (a [`Request`]) or in an envelope. The
//! envelope's hash (SHA-256 of its wire bytes) stands in every receipt of its operations, the way
//! a request's hash stands in its receipt.

use crate::{
    check_operation, Hash, Op, PublicKey, Reader, Receipt, Request, Signature, SignedHeader,
    WireError, RECEIPT_BYTES,
};

/// Domain tag that starts every signed envelope.
pub const ENVELOPE_DOMAIN: [u8; 16] = *b"tally/envelope/1";
/// Bytes of one operation inside an envelope.
pub const OPERATION_BYTES: usize = 120;
/// Bytes of an envelope before its operations.
pub const ENVELOPE_PREFIX_BYTES: usize = 88;
/// Most operations one envelope carries: 8,192 × 120 bytes plus the prefix and the signature
/// is 983,192 bytes, inside the default 1 MiB frame.
pub const ENVELOPE_OPS_MAX: u32 = 8192;
/// Flag bit: all operations apply or none does.
pub const ENVELOPE_FLAG_ATOMIC: u8 = 1;
/// A range proof holds at most two hashes per level of a tree of at most 2^32 leaves.
pub const RANGE_PROOF_HASHES_MAX: usize = 64;
/// The largest EnvelopeConfirmation: flags, hash, signed header, count, 8,192 receipts and a
/// range proof of 64 hashes (657,714 bytes).
pub const ENVELOPE_CONFIRMATION_BYTES_MAX: u32 = (1
    + 32
    + crate::SIGNED_HEADER_BYTES
    + 4
    + ENVELOPE_OPS_MAX as usize * RECEIPT_BYTES
    + 13
    + 32 * RANGE_PROOF_HASHES_MAX) as u32;

/// The longest timeout a reserve may have, from its batch's time: 365 days.
pub const RESERVE_TIMEOUT_MS_MAX: u64 = 365 * 24 * 3600 * 1000;

/// One operation as a signer asks for it, without the signer and the signature (which the
/// request or envelope that carries it supplies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Operation {
    pub op: Op,
    /// Client-chosen, unique per signer across requests and envelopes. A reserve is known by
    /// `(signer, id)` of the operation that made it.
    pub id: u128,
    /// The credited account (all zero for a withdrawal and the kinds after `reserve`).
    pub to: PublicKey,
    /// The amount (for `post`: 0 captures the whole reserve; 0 for `void` and `renew`).
    pub amount: u64,
    /// `reserve` and `renew`: how long after the batch's time the reserve expires.
    pub timeout_ms: u64,
    /// `post`, `void`, `renew`: the id of the reserve acted on.
    pub reserve_id: u128,
    /// `reserve`: the account that may post, void or renew besides the owner (zero: none).
    /// `post`, `void`, `renew`: the reserve's owner (zero: the signer).
    pub party: PublicKey,
}

impl Operation {
    /// A deposit, transfer or withdrawal: the two-phase fields zero.
    pub const fn single(op: Op, id: u128, to: PublicKey, amount: u64) -> Operation {
        Operation {
            op,
            id,
            to,
            amount,
            timeout_ms: 0,
            reserve_id: 0,
            party: [0; 32],
        }
    }

    /// kind u8 ‖ reserved 7 ‖ id u128 ‖ to 32 ‖ amount u64 ‖ timeout_ms u64 ‖ reserve_id u128 ‖
    /// party 32 (PROTOCOL.md §4.7).
    pub fn write(&self, out: &mut Vec<u8>) {
        out.push(self.op as u8);
        out.extend_from_slice(&[0; 7]);
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&self.to);
        out.extend_from_slice(&self.amount.to_le_bytes());
        out.extend_from_slice(&self.timeout_ms.to_le_bytes());
        out.extend_from_slice(&self.reserve_id.to_le_bytes());
        out.extend_from_slice(&self.party);
    }

    fn read(r: &mut Reader<'_>, signer: &PublicKey) -> Result<Operation, WireError> {
        let op = Op::from_u8(r.u8("operation.kind")?)
            .filter(|op| op.is_signed())
            .ok_or(WireError::Invalid {
                field: "operation.kind",
                reason: "unknown operation (kinds 1 to 7)",
            })?;
        zeros(r.take(7, "operation.reserved")?, "operation.reserved")?;
        let o = Operation {
            op,
            id: u128::from_le_bytes(r.array("operation.id")?),
            to: r.array("operation.to")?,
            amount: r.u64("operation.amount")?,
            timeout_ms: r.u64("operation.timeout_ms")?,
            reserve_id: u128::from_le_bytes(r.array("operation.reserve_id")?),
            party: r.array("operation.party")?,
        };
        if op.is_single() {
            if o.timeout_ms != 0 || o.reserve_id != 0 || o.party != [0; 32] {
                return Err(invalid("operation.two_phase", "must be zero"));
            }
            check_operation(op, signer, &o.to, o.amount)?;
        } else {
            check_two_phase(&o, signer)?;
        }
        Ok(o)
    }
}

/// The layout rules of the two-phase kinds (PROTOCOL.md §4.7).
fn check_two_phase(o: &Operation, signer: &PublicKey) -> Result<(), WireError> {
    let timeout_ok = (1..=RESERVE_TIMEOUT_MS_MAX).contains(&o.timeout_ms);
    match o.op {
        Op::Reserve if o.amount == 0 => {
            Err(invalid("operation.amount", "must be greater than zero"))
        }
        Op::Reserve if o.to == [0; 32] => Err(invalid(
            "operation.to",
            "the all-zero key belongs to nobody: funds sent there would be lost",
        )),
        Op::Reserve if &o.to == signer => Err(invalid(
            "operation.to",
            "a reserve for oneself moves nothing",
        )),
        Op::Reserve if o.reserve_id != 0 => Err(invalid("operation.reserve_id", "must be zero")),
        Op::Reserve | Op::Renew if !timeout_ok => {
            Err(invalid("operation.timeout_ms", "must be 1 ms to 365 days"))
        }
        Op::Post | Op::Void | Op::Renew if o.to != [0; 32] => {
            Err(invalid("operation.to", "must be zero"))
        }
        Op::Void | Op::Renew if o.amount != 0 => Err(invalid("operation.amount", "must be zero")),
        Op::Post | Op::Void if o.timeout_ms != 0 => {
            Err(invalid("operation.timeout_ms", "must be zero"))
        }
        _ => Ok(()),
    }
}

impl Request {
    /// The operation this request asks for.
    pub fn operation(&self) -> Operation {
        Operation::single(self.op, self.id, self.to, self.amount)
    }
}

fn zeros(bytes: &[u8], field: &'static str) -> Result<(), WireError> {
    if bytes.iter().any(|b| *b != 0) {
        return Err(WireError::Invalid {
            field,
            reason: "must be zero",
        });
    }
    Ok(())
}

/// A signed envelope of operations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub chain_id: Hash,
    pub signer: PublicKey,
    /// All operations apply or none does; otherwise each has its own result.
    pub atomic: bool,
    pub ops: Vec<Operation>,
    pub signature: Signature,
}

impl Envelope {
    /// The bytes the signer signs: everything before the signature.
    pub fn signed_bytes(&self) -> Vec<u8> {
        assert!(!self.ops.is_empty() && self.ops.len() <= ENVELOPE_OPS_MAX as usize);
        let mut out = Vec::with_capacity(self.wire_len());
        out.extend_from_slice(&ENVELOPE_DOMAIN);
        out.extend_from_slice(&self.chain_id);
        out.extend_from_slice(&self.signer);
        out.push(if self.atomic { ENVELOPE_FLAG_ATOMIC } else { 0 });
        out.extend_from_slice(&[0; 3]);
        out.extend_from_slice(&(self.ops.len() as u32).to_le_bytes());
        for op in &self.ops {
            op.write(&mut out);
        }
        debug_assert_eq!(out.len(), self.wire_len() - 64);
        out
    }

    pub fn wire_len(&self) -> usize {
        ENVELOPE_PREFIX_BYTES + self.ops.len() * OPERATION_BYTES + 64
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.signed_bytes();
        out.extend_from_slice(&self.signature);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Envelope, WireError> {
        let mut r = Reader::new(bytes);
        let envelope = Envelope::read(&mut r)?;
        r.finish()?;
        Ok(envelope)
    }

    /// Checks the layout: domain, flags, count, each operation's shape, and that no id repeats
    /// within the envelope. The signature and the chain id are checked in core.
    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Envelope, WireError> {
        let domain: [u8; 16] = r.array("envelope.domain")?;
        if domain != ENVELOPE_DOMAIN {
            return Err(WireError::Invalid {
                field: "envelope.domain",
                reason: "not \"tally/envelope/1\"",
            });
        }
        let chain_id = r.array("envelope.chain_id")?;
        let signer: PublicKey = r.array("envelope.signer")?;
        let atomic = match r.u8("envelope.flags")? {
            0 => false,
            ENVELOPE_FLAG_ATOMIC => true,
            _ => return Err(invalid("envelope.flags", "unknown flag bits")),
        };
        zeros(r.take(3, "envelope.reserved")?, "envelope.reserved")?;
        let count = r.u32("envelope.count")?;
        if count == 0 || count > ENVELOPE_OPS_MAX {
            return Err(invalid("envelope.count", "must be 1 to 8192 operations"));
        }
        // The count is bounded and the bytes are there before anything is allocated for them.
        r.ensure(count as usize * OPERATION_BYTES + 64, "envelope.operations")?;
        let mut ops = Vec::with_capacity(count as usize);
        for _ in 0..count {
            ops.push(Operation::read(r, &signer)?);
        }
        let signature = r.array("envelope.signature")?;
        let mut ids: Vec<u128> = ops.iter().map(|o| o.id).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return Err(invalid(
                "operation.id",
                "an id appears twice in the envelope",
            ));
        }
        Ok(Envelope {
            chain_id,
            signer,
            atomic,
            ops,
            signature,
        })
    }
}

fn invalid(field: &'static str, reason: &'static str) -> WireError {
    WireError::Invalid { field, reason }
}

/// An RFC 6962 proof that leaves `first .. first + count` of a tree of `tree_size` leaves are
/// the given ones: the hashes of the largest subtrees that hold none of them, in the order a
/// left-to-right walk of the tree meets them (PROTOCOL.md §4.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeProof {
    pub first: u32,
    pub count: u32,
    pub tree_size: u32,
    pub hashes: Vec<Hash>,
}

impl RangeProof {
    pub fn write(&self, out: &mut Vec<u8>) {
        assert!(self.hashes.len() <= RANGE_PROOF_HASHES_MAX);
        out.extend_from_slice(&self.first.to_le_bytes());
        out.extend_from_slice(&self.count.to_le_bytes());
        out.extend_from_slice(&self.tree_size.to_le_bytes());
        out.push(self.hashes.len() as u8);
        for h in &self.hashes {
            out.extend_from_slice(h);
        }
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<RangeProof, WireError> {
        let first = r.u32("range_proof.first")?;
        let count = r.u32("range_proof.count")?;
        let tree_size = r.u32("range_proof.tree_size")?;
        let n = r.u8("range_proof.hash_count")? as usize;
        if n > RANGE_PROOF_HASHES_MAX {
            return Err(invalid("range_proof.hash_count", "more than 64 hashes"));
        }
        let mut hashes = Vec::with_capacity(n);
        for _ in 0..n {
            hashes.push(r.array("range_proof.hashes")?);
        }
        Ok(RangeProof {
            first,
            count,
            tree_size,
            hashes,
        })
    }
}

/// The answer to an envelope that was applied: one receipt per operation, in the envelope's
/// order, and one proof that they are consecutive leaves under the signed header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeConfirmation {
    /// True when this answers a resubmission: nothing was applied again.
    pub replayed: bool,
    /// SHA-256 of the envelope's wire bytes (the client holds the envelope itself).
    pub envelope_hash: Hash,
    pub header: SignedHeader,
    pub receipts: Vec<Receipt>,
    pub proof: RangeProof,
}

impl EnvelopeConfirmation {
    pub fn write(&self, out: &mut Vec<u8>) {
        assert!(!self.receipts.is_empty() && self.receipts.len() <= ENVELOPE_OPS_MAX as usize);
        out.push(self.replayed as u8);
        out.extend_from_slice(&self.envelope_hash);
        out.extend_from_slice(&self.header.encode());
        out.extend_from_slice(&(self.receipts.len() as u32).to_le_bytes());
        for receipt in &self.receipts {
            out.extend_from_slice(&receipt.encode());
        }
        self.proof.write(out);
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write(&mut out);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<EnvelopeConfirmation, WireError> {
        let mut r = Reader::new(bytes);
        let c = EnvelopeConfirmation::read(&mut r)?;
        r.finish()?;
        Ok(c)
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<EnvelopeConfirmation, WireError> {
        let replayed = crate::message::read_bool(r, "envelope_confirmation.flags")?;
        let envelope_hash = r.array("envelope_confirmation.envelope_hash")?;
        let header = SignedHeader::read(r)?;
        let count = r.u32("envelope_confirmation.count")?;
        if count == 0 || count > ENVELOPE_OPS_MAX {
            return Err(invalid("envelope_confirmation.count", "must be 1 to 8192"));
        }
        r.ensure(
            count as usize * RECEIPT_BYTES,
            "envelope_confirmation.receipts",
        )?;
        let mut receipts = Vec::with_capacity(count as usize);
        for _ in 0..count {
            receipts.push(Receipt::read(r)?);
        }
        Ok(EnvelopeConfirmation {
            replayed,
            envelope_hash,
            header,
            receipts,
            proof: RangeProof::read(r)?,
        })
    }
}

/// The proof of one operation of an envelope, found by its `(signer, id)` (`GetConfirmation`):
/// the whole envelope (its signature covers every operation), the operation's receipt, the
/// signed header of its batch and the receipt's inclusion proof.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperationConfirmation {
    pub envelope: Envelope,
    pub receipt: Receipt,
    pub header: SignedHeader,
    pub proof: crate::InclusionProof,
}

/// The largest OperationConfirmation: a full envelope, a receipt, a header and a proof of 32
/// hashes (984,565 bytes), inside the default 1 MiB frame.
pub const OPERATION_CONFIRMATION_BYTES_MAX: u32 = (4
    + ENVELOPE_PREFIX_BYTES
    + ENVELOPE_OPS_MAX as usize * OPERATION_BYTES
    + 64
    + RECEIPT_BYTES
    + crate::SIGNED_HEADER_BYTES
    + 9
    + 32 * crate::PROOF_HASHES_MAX) as u32;

impl OperationConfirmation {
    /// envelope length u32 ‖ envelope ‖ receipt ‖ signed header ‖ inclusion proof
    pub fn write(&self, out: &mut Vec<u8>) {
        let envelope = self.envelope.encode();
        out.extend_from_slice(&(envelope.len() as u32).to_le_bytes());
        out.extend_from_slice(&envelope);
        out.extend_from_slice(&self.receipt.encode());
        out.extend_from_slice(&self.header.encode());
        self.proof.write(out);
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write(&mut out);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<OperationConfirmation, WireError> {
        let mut r = Reader::new(bytes);
        let c = OperationConfirmation::read(&mut r)?;
        r.finish()?;
        Ok(c)
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<OperationConfirmation, WireError> {
        let len = r.u32("operation_confirmation.envelope_len")? as usize;
        let envelope = Envelope::decode(r.take(len, "operation_confirmation.envelope")?)?;
        Ok(OperationConfirmation {
            envelope,
            receipt: Receipt::read(r)?,
            header: SignedHeader::read(r)?,
            proof: crate::InclusionProof::read(r)?,
        })
    }
}

/// An atomic envelope that applied nothing because one operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeFailed {
    pub code: crate::ErrorCode,
    /// Position in the envelope of the first operation that failed.
    pub failed_index: u32,
    pub message: String,
}

impl EnvelopeFailed {
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.code as u16).to_le_bytes());
        out.extend_from_slice(&self.failed_index.to_le_bytes());
        crate::put_string(out, &self.message);
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<EnvelopeFailed, WireError> {
        let raw = r.u16("envelope_failed.code")?;
        let code = crate::ErrorCode::from_u16(raw)
            .ok_or(invalid("envelope_failed.code", "unknown error code"))?;
        Ok(EnvelopeFailed {
            code,
            failed_index: r.u32("envelope_failed.failed_index")?,
            message: r.string("envelope_failed.message")?,
        })
    }
}
