//! Operator key rotation (PROTOCOL.md §4.14): the links by which a verifier follows the
//! operator key from the genesis key to the one that signs today's headers.
//!
//! A link is the last header an old key signed, the rotation receipt in that header's batch
//! (a Merkle leaf naming the new key) and the receipt's inclusion proof. Each link names the
//! height of the one before it, so a chain cannot skip one.

use crate::{
    InclusionProof, PublicKey, Reader, Receipt, SignedHeader, WireError, RECEIPT_BYTES,
    SIGNED_HEADER_BYTES,
};

/// Domain tag of a rotation's request hash: SHA-256(ROTATE_DOMAIN ‖ new key ‖ previous u64 LE ‖
/// number u32 LE).
pub const ROTATE_DOMAIN: [u8; 16] = *b"tally/rotate/v1\0";

/// Rotations one `KeyChain` reply carries, at most: a ledger refuses a rotation beyond it.
pub const KEY_LINKS_MAX: usize = 64;

/// Bytes of one link, at most (a proof of 32 hashes).
pub const KEY_LINK_BYTES_MAX: usize =
    SIGNED_HEADER_BYTES + 32 + 8 + 4 + RECEIPT_BYTES + 9 + 32 * 32;

/// Bytes of one `KeyChain` reply, at most.
pub const KEY_CHAIN_REPLY_BYTES_MAX: usize = 1 + KEY_LINKS_MAX * KEY_LINK_BYTES_MAX;

/// One rotation: `header` is the last the old key signed; its batch's rotation receipt names
/// `new_key`, which signs from `header.height + 1` on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLink {
    pub header: SignedHeader,
    pub new_key: PublicKey,
    /// The height of the rotation before this one (0: the old key is the genesis key).
    pub previous: u64,
    /// 1 for the ledger's first rotation, then 2, ...
    pub number: u32,
    pub receipt: Receipt,
    pub proof: InclusionProof,
}

impl KeyLink {
    /// header (256) ‖ new key (32) ‖ previous u64 LE ‖ number u32 LE ‖ receipt (80) ‖
    /// inclusion proof
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.header.encode());
        out.extend_from_slice(&self.new_key);
        out.extend_from_slice(&self.previous.to_le_bytes());
        out.extend_from_slice(&self.number.to_le_bytes());
        out.extend_from_slice(&self.receipt.encode());
        self.proof.write(out);
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(KEY_LINK_BYTES_MAX);
        self.write(&mut out);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<KeyLink, WireError> {
        let mut r = Reader::new(bytes);
        let link = KeyLink::read(&mut r)?;
        r.finish()?;
        Ok(link)
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<KeyLink, WireError> {
        Ok(KeyLink {
            header: SignedHeader::read(r)?,
            new_key: r.array("key_link.new_key")?,
            previous: r.u64("key_link.previous")?,
            number: r.u32("key_link.number")?,
            receipt: Receipt::read(r)?,
            proof: InclusionProof::read(r)?,
        })
    }
}

/// `GetKeyChain`'s answer: every rotation the ledger has applied, oldest first (none: the
/// genesis key still signs).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyChainReply {
    pub links: Vec<KeyLink>,
}

impl KeyChainReply {
    /// count u8 ‖ count × link
    pub fn write(&self, out: &mut Vec<u8>) {
        assert!(self.links.len() <= KEY_LINKS_MAX);
        out.push(self.links.len() as u8);
        for link in &self.links {
            link.write(out);
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write(&mut out);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<KeyChainReply, WireError> {
        let mut r = Reader::new(bytes);
        let reply = KeyChainReply::read(&mut r)?;
        r.finish()?;
        Ok(reply)
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<KeyChainReply, WireError> {
        let count = r.u8("key_chain.count")? as usize;
        if count > KEY_LINKS_MAX {
            return Err(WireError::Invalid {
                field: "key_chain.count",
                reason: "more than 64 links",
            });
        }
        let links = (0..count)
            .map(|_| KeyLink::read(r))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(KeyChainReply { links })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Header, Op};

    fn link(previous: u64) -> KeyLink {
        KeyLink {
            header: SignedHeader {
                header: Header {
                    chain_id: [1; 32],
                    height: 9,
                    term: 2,
                    time_unix_ms: 3,
                    request_count: 2,
                    prev_hash: [4; 32],
                    merkle_root: [5; 32],
                    state_digest: [6; 32],
                    operator_key_id: [7; 8],
                },
                signature: [8; 64],
            },
            new_key: [9; 32],
            previous,
            number: 1,
            receipt: Receipt {
                request_hash: [10; 32],
                height: 9,
                index: 1,
                op: Op::Rotate,
                failed: None,
                op_index: 0,
                signer_balance: 0,
                to_balance: 0,
            },
            proof: InclusionProof {
                leaf_index: 1,
                tree_size: 2,
                path: vec![[11; 32]],
            },
        }
    }

    #[test]
    fn a_chain_round_trips_and_its_bounds_hold() {
        let reply = KeyChainReply {
            links: vec![link(0), link(9)],
        };
        let bytes = reply.encode();
        assert_eq!(KeyChainReply::decode(&bytes).unwrap(), reply);
        assert!(bytes.len() <= KEY_CHAIN_REPLY_BYTES_MAX);
        assert!(KeyChainReply::decode(&bytes[..bytes.len() - 1]).is_err());
        let mut too_many = bytes.clone();
        too_many[0] = KEY_LINKS_MAX as u8 + 1;
        assert!(KeyChainReply::decode(&too_many).is_err());
        assert_eq!(KeyChainReply::decode(&[0]).unwrap().links.len(), 0);
    }
}
