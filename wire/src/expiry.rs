//! The proof that a reserve expired: the receipt of an expiry the leader put in a batch (PROTOCOL.md
//! §4.10), found by its receipt hash (`GetConfirmationByReceipt`). An expiry has no signed
//! request; its receipt names SHA-256("tally/expire/v1\0" ‖ owner ‖ id u128 LE) where a request's
//! receipt names the request's hash, so the owner and id are what a verifier hashes.

use crate::{InclusionProof, PublicKey, Reader, Receipt, SignedHeader, WireError};

/// An expiry's receipt with its proof.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiryConfirmation {
    /// The reserve's owner (whose funds went back to it).
    pub owner: PublicKey,
    /// The reserve's id (the id of the operation that made it).
    pub id: u128,
    pub receipt: Receipt,
    pub header: SignedHeader,
    pub proof: InclusionProof,
}

impl ExpiryConfirmation {
    /// owner (32) ‖ id u128 LE ‖ receipt ‖ signed header ‖ inclusion proof
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.owner);
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&self.receipt.encode());
        out.extend_from_slice(&self.header.encode());
        self.proof.write(out);
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write(&mut out);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<ExpiryConfirmation, WireError> {
        let mut r = Reader::new(bytes);
        let c = ExpiryConfirmation::read(&mut r)?;
        r.finish()?;
        Ok(c)
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<ExpiryConfirmation, WireError> {
        Ok(ExpiryConfirmation {
            owner: r.array("expiry_confirmation.owner")?,
            id: u128::from_le_bytes(r.array("expiry_confirmation.id")?),
            receipt: Receipt::read(r)?,
            header: SignedHeader::read(r)?,
            proof: InclusionProof::read(r)?,
        })
    }
}
