//! A balance proof (PROTOCOL.md §4.13): an account's entry in the state map, or its absence,
//! proven against a signed header. The header's state digest commits to the map root and the
//! summary fields carried here; the siblings lead from the account's position to that root.

use crate::message::read_bool;
use crate::{Hash, PublicKey, Reader, SignedHeader, WireError, SIGNED_HEADER_BYTES};

/// Siblings in one proof, at most: one per bit of a 256-bit path.
pub const BALANCE_PROOF_DEPTH_MAX: usize = 256;

/// Bytes of one `BalanceProofReply`, at most.
pub const BALANCE_PROOF_REPLY_BYTES_MAX: usize =
    SIGNED_HEADER_BYTES + 32 + 8 + 16 + 16 + 32 + 1 + 8 + 2 + 32 * BALANCE_PROOF_DEPTH_MAX + 1 + 64;

/// `GetBalanceProof`'s answer, at the replica's applied height (the header's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalanceProofReply {
    /// The header at the height the proof is for.
    pub header: SignedHeader,
    /// The state digest's inputs besides the height (PROTOCOL.md §4.13).
    pub map_root: Hash,
    pub account_count: u64,
    pub total_deposited: u128,
    pub total_withdrawn: u128,
    pub account: PublicKey,
    /// The account's balance; None if the ledger has no such account.
    pub balance: Option<u64>,
    /// From the account's position up to the map root (bottom first).
    pub siblings: Vec<Hash>,
    /// For an absent account: the entry (path, value hash) where its path leads, if any.
    pub neighbor: Option<(Hash, Hash)>,
}

impl BalanceProofReply {
    /// header (256) ‖ map root ‖ account_count u64 ‖ total_deposited u128 ‖ total_withdrawn
    /// u128 ‖ account ‖ exists u8 ‖ balance u64 ‖ sibling count u16 ‖ 32·n ‖ neighbor flag u8 ‖
    /// [neighbor path ‖ neighbor value hash]
    pub fn write(&self, out: &mut Vec<u8>) {
        assert!(self.siblings.len() <= BALANCE_PROOF_DEPTH_MAX);
        out.extend_from_slice(&self.header.encode());
        out.extend_from_slice(&self.map_root);
        out.extend_from_slice(&self.account_count.to_le_bytes());
        out.extend_from_slice(&self.total_deposited.to_le_bytes());
        out.extend_from_slice(&self.total_withdrawn.to_le_bytes());
        out.extend_from_slice(&self.account);
        out.push(self.balance.is_some() as u8);
        out.extend_from_slice(&self.balance.unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&(self.siblings.len() as u16).to_le_bytes());
        for s in &self.siblings {
            out.extend_from_slice(s);
        }
        match &self.neighbor {
            None => out.push(0),
            Some((path, value_hash)) => {
                out.push(1);
                out.extend_from_slice(path);
                out.extend_from_slice(value_hash);
            }
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write(&mut out);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<BalanceProofReply, WireError> {
        let mut r = Reader::new(bytes);
        let reply = BalanceProofReply::read(&mut r)?;
        r.finish()?;
        Ok(reply)
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<BalanceProofReply, WireError> {
        let header = SignedHeader::read(r)?;
        let map_root = r.array("balance_proof.map_root")?;
        let account_count = r.u64("balance_proof.account_count")?;
        let total_deposited = r.u128("balance_proof.total_deposited")?;
        let total_withdrawn = r.u128("balance_proof.total_withdrawn")?;
        let account = r.array("balance_proof.account")?;
        let exists = read_bool(r, "balance_proof.exists")?;
        let balance = r.u64("balance_proof.balance")?;
        if !exists && balance != 0 {
            return Err(WireError::Invalid {
                field: "balance_proof.balance",
                reason: "must be 0 for an absent account",
            });
        }
        let count = r.u16("balance_proof.sibling_count")? as usize;
        if count > BALANCE_PROOF_DEPTH_MAX {
            return Err(WireError::Invalid {
                field: "balance_proof.sibling_count",
                reason: "more than 256 siblings",
            });
        }
        r.ensure(count * 32, "balance_proof.siblings")?;
        let siblings = (0..count)
            .map(|_| r.array("balance_proof.siblings"))
            .collect::<Result<_, _>>()?;
        let neighbor = if read_bool(r, "balance_proof.neighbor")? {
            Some((
                r.array("balance_proof.neighbor_path")?,
                r.array("balance_proof.neighbor_value_hash")?,
            ))
        } else {
            None
        };
        Ok(BalanceProofReply {
            header,
            map_root,
            account_count,
            total_deposited,
            total_withdrawn,
            account,
            balance: exists.then_some(balance),
            siblings,
            neighbor,
        })
    }
}
