//! The canonical, fixed-size layouts that are hashed or signed: requests, receipts and headers.
//! A byte-for-byte description of each is in PROTOCOL.md; the offsets below are that document.

use crate::{ErrorCode, Hash, PublicKey, Reader, Signature, WireError};

/// Domain tag that starts every signed request.
pub const REQUEST_DOMAIN: [u8; 16] = *b"tally/request/v1";
/// Domain tag that starts every receipt (a Merkle leaf).
pub const RECEIPT_DOMAIN: [u8; 16] = *b"tally/receipt/v1";
/// Domain tag that starts every header (what the operator signs).
pub const HEADER_DOMAIN: [u8; 16] = *b"tally/header/v1\0";
/// The version byte of the header layout.
pub const HEADER_VERSION: u8 = 2;

/// Bytes of a request covered by the signature.
pub const REQUEST_SIGNED_BYTES: usize = 144;
/// Bytes of a whole request on the wire: the signed part plus the signature.
pub const REQUEST_BYTES: usize = REQUEST_SIGNED_BYTES + 64;
pub const RECEIPT_BYTES: usize = 80;
pub const HEADER_BYTES: usize = 192;
pub const SIGNED_HEADER_BYTES: usize = HEADER_BYTES + 64;
/// A Merkle audit path for a tree of at most 2^32 leaves has at most 32 hashes.
pub const PROOF_HASHES_MAX: usize = 32;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Op {
    /// Credit `to` with `amount`; `signer` must be an operator deposit key.
    Deposit = 1,
    /// Move `amount` from `signer` to `to`.
    Transfer = 2,
    /// Debit `signer` by `amount`; `to` is all zero.
    Withdraw = 3,
    /// Hold `amount` of the signer's balance for `to` until `timeout_ms` after the batch's time
    /// (two-phase transfer, first phase). Envelopes only.
    Reserve = 4,
    /// Capture all of a reserve (`amount` 0) or part of it; the rest returns to its owner.
    Post = 5,
    /// Release a reserve to its owner.
    Void = 6,
    /// Move a reserve's expiry to `timeout_ms` after the batch's time (a lease renewed).
    Renew = 7,
    /// A reserve's timeout passed: its amount returns to its owner. Never submitted: the leader
    /// adds it to a batch (PROTOCOL.md §4.10).
    Expire = 8,
    /// The batch names a new operator key, which signs every header after it. Never submitted:
    /// the leader adds it, last in its batch, on an admin's `RotateKey` (PROTOCOL.md §4.14).
    Rotate = 9,
}

impl Op {
    pub fn from_u8(v: u8) -> Option<Op> {
        match v {
            1 => Some(Op::Deposit),
            2 => Some(Op::Transfer),
            3 => Some(Op::Withdraw),
            4 => Some(Op::Reserve),
            5 => Some(Op::Post),
            6 => Some(Op::Void),
            7 => Some(Op::Renew),
            8 => Some(Op::Expire),
            9 => Some(Op::Rotate),
            _ => None,
        }
    }

    /// Whether a single request (not only an envelope) may carry this kind.
    pub fn is_single(self) -> bool {
        matches!(self, Op::Deposit | Op::Transfer | Op::Withdraw)
    }

    /// Whether this kind acts on a reserve (two-phase transfers).
    pub fn is_two_phase(self) -> bool {
        matches!(
            self,
            Op::Reserve | Op::Post | Op::Void | Op::Renew | Op::Expire
        )
    }

    /// Whether a client may sign this kind (in a request or an envelope): every kind but the
    /// leader-made expiries and key rotations.
    pub fn is_signed(self) -> bool {
        !matches!(self, Op::Expire | Op::Rotate)
    }

    pub fn name(self) -> &'static str {
        match self {
            Op::Deposit => "deposit",
            Op::Transfer => "transfer",
            Op::Withdraw => "withdraw",
            Op::Reserve => "reserve",
            Op::Post => "post",
            Op::Void => "void",
            Op::Renew => "renew",
            Op::Expire => "expire",
            Op::Rotate => "rotate",
        }
    }
}

/// A signed request, as the client built it. Decoding checks the layout (domain tag, op, reserved
/// bytes, non-zero amount, the shape of `to`); the signature and chain id are checked in core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub chain_id: Hash,
    pub op: Op,
    /// Client-chosen, unique per signer: the idempotency key is `(signer, id)`.
    pub id: u128,
    pub signer: PublicKey,
    pub to: PublicKey,
    pub amount: u64,
    pub signature: Signature,
}

impl Request {
    /// The bytes the signer signs: offsets 0..144 of the layout.
    pub fn signed_bytes(&self) -> [u8; REQUEST_SIGNED_BYTES] {
        let mut out = [0u8; REQUEST_SIGNED_BYTES];
        out[0..16].copy_from_slice(&REQUEST_DOMAIN);
        out[16..48].copy_from_slice(&self.chain_id);
        out[48] = self.op as u8;
        // 49..56 reserved, zero.
        out[56..72].copy_from_slice(&self.id.to_le_bytes());
        out[72..104].copy_from_slice(&self.signer);
        out[104..136].copy_from_slice(&self.to);
        out[136..144].copy_from_slice(&self.amount.to_le_bytes());
        out
    }

    pub fn encode(&self) -> [u8; REQUEST_BYTES] {
        let mut out = [0u8; REQUEST_BYTES];
        out[..REQUEST_SIGNED_BYTES].copy_from_slice(&self.signed_bytes());
        out[REQUEST_SIGNED_BYTES..].copy_from_slice(&self.signature);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Request, WireError> {
        let mut r = Reader::new(bytes);
        let request = Request::read(&mut r)?;
        r.finish()?;
        Ok(request)
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Request, WireError> {
        let domain: [u8; 16] = r.array("request.domain")?;
        if domain != REQUEST_DOMAIN {
            return Err(WireError::Invalid {
                field: "request.domain",
                reason: "not \"tally/request/v1\"",
            });
        }
        let chain_id = r.array("request.chain_id")?;
        let op = Op::from_u8(r.u8("request.op")?)
            .filter(|op| op.is_single())
            .ok_or(WireError::Invalid {
                field: "request.op",
                reason: "not a deposit, transfer or withdrawal (other kinds travel in envelopes)",
            })?;
        let reserved: [u8; 7] = r.array("request.reserved")?;
        if reserved != [0; 7] {
            return Err(WireError::Invalid {
                field: "request.reserved",
                reason: "must be zero",
            });
        }
        let id = u128::from_le_bytes(r.array("request.id")?);
        let signer = r.array("request.signer")?;
        let to: PublicKey = r.array("request.to")?;
        let amount = r.u64("request.amount")?;
        let signature = r.array("request.signature")?;
        check_operation(op, &signer, &to, amount)?;
        Ok(Request {
            chain_id,
            op,
            id,
            signer,
            to,
            amount,
            signature,
        })
    }
}

/// The layout rules of one operation, alone or in an envelope: a non-zero amount, and the shape
/// of `to` for its kind.
pub(crate) fn check_operation(
    op: Op,
    signer: &PublicKey,
    to: &PublicKey,
    amount: u64,
) -> Result<(), WireError> {
    let invalid = |field, reason| Err(WireError::Invalid { field, reason });
    if amount == 0 {
        return invalid("request.amount", "must be greater than zero");
    }
    match op {
        Op::Withdraw if to != &[0; 32] => invalid("request.to", "must be zero for a withdrawal"),
        Op::Deposit | Op::Transfer if to == &[0; 32] => invalid(
            "request.to",
            "the all-zero key belongs to nobody: funds sent there would be lost",
        ),
        Op::Transfer if to == signer => {
            invalid("request.to", "a transfer to oneself moves nothing")
        }
        _ => Ok(()),
    }
}

/// What applying one request did: a Merkle leaf of its batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// SHA-256 of the request's 208 wire bytes.
    pub request_hash: Hash,
    pub height: u64,
    /// Position of the request in its batch (and of this leaf in the Merkle tree).
    pub index: u32,
    pub op: Op,
    /// Why the operation did nothing (an operation of an independent envelope that failed;
    /// its balances are then 0), or None when it applied.
    pub failed: Option<ErrorCode>,
    /// The operation's position in its envelope (0 for a request).
    pub op_index: u16,
    /// The signer's balance after the request (0 for a deposit: deposit keys hold no balance).
    pub signer_balance: u64,
    /// The recipient's balance after the request (0 for a withdrawal).
    pub to_balance: u64,
}

impl Receipt {
    pub fn encode(&self) -> [u8; RECEIPT_BYTES] {
        let mut out = [0u8; RECEIPT_BYTES];
        out[0..16].copy_from_slice(&RECEIPT_DOMAIN);
        out[16..48].copy_from_slice(&self.request_hash);
        out[48..56].copy_from_slice(&self.height.to_le_bytes());
        out[56..60].copy_from_slice(&self.index.to_le_bytes());
        out[60] = self.op as u8;
        out[61] = self.failed.map_or(0, |code| {
            u8::try_from(code as u16).expect("receipt codes fit one byte")
        });
        out[62..64].copy_from_slice(&self.op_index.to_le_bytes());
        out[64..72].copy_from_slice(&self.signer_balance.to_le_bytes());
        out[72..80].copy_from_slice(&self.to_balance.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Receipt, WireError> {
        let mut r = Reader::new(bytes);
        let receipt = Receipt::read(&mut r)?;
        r.finish()?;
        Ok(receipt)
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Receipt, WireError> {
        let domain: [u8; 16] = r.array("receipt.domain")?;
        if domain != RECEIPT_DOMAIN {
            return Err(WireError::Invalid {
                field: "receipt.domain",
                reason: "not \"tally/receipt/v1\"",
            });
        }
        let request_hash = r.array("receipt.request_hash")?;
        let height = r.u64("receipt.height")?;
        let index = r.u32("receipt.index")?;
        let op = Op::from_u8(r.u8("receipt.op")?).ok_or(WireError::Invalid {
            field: "receipt.op",
            reason: "unknown operation",
        })?;
        let failed = match r.u8("receipt.failed")? {
            0 => None,
            code => Some(ErrorCode::from_u16(code as u16).ok_or(WireError::Invalid {
                field: "receipt.failed",
                reason: "unknown error code",
            })?),
        };
        let op_index = r.u16("receipt.op_index")?;
        Ok(Receipt {
            request_hash,
            height,
            index,
            op,
            failed,
            op_index,
            signer_balance: r.u64("receipt.signer_balance")?,
            to_balance: r.u64("receipt.to_balance")?,
        })
    }
}

/// A batch header: what the operator signs, hash-chained to the previous one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub chain_id: Hash,
    /// 1 for the first batch; heights have no gaps.
    pub height: u64,
    /// The Raft term of the leader that sequenced the batch (0 on a node without replication).
    pub term: u64,
    /// The leader's wall clock when it closed the batch, Unix milliseconds. Informational.
    pub time_unix_ms: u64,
    pub request_count: u32,
    /// SHA-256 of the previous header's 192 bytes; all zero at height 1.
    pub prev_hash: Hash,
    /// RFC 6962 Merkle tree hash over the batch's receipts.
    pub merkle_root: Hash,
    /// Digest of the ledger state after this batch (see PROTOCOL.md, "State digest").
    pub state_digest: Hash,
    /// First 8 bytes of SHA-256 of the operator's public key.
    pub operator_key_id: [u8; 8],
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        out[0..16].copy_from_slice(&HEADER_DOMAIN);
        out[16] = HEADER_VERSION;
        // 17..24 reserved, zero.
        out[24..56].copy_from_slice(&self.chain_id);
        out[56..64].copy_from_slice(&self.height.to_le_bytes());
        out[64..72].copy_from_slice(&self.term.to_le_bytes());
        out[72..80].copy_from_slice(&self.time_unix_ms.to_le_bytes());
        out[80..84].copy_from_slice(&self.request_count.to_le_bytes());
        // 84..88 reserved, zero.
        out[88..120].copy_from_slice(&self.prev_hash);
        out[120..152].copy_from_slice(&self.merkle_root);
        out[152..184].copy_from_slice(&self.state_digest);
        out[184..192].copy_from_slice(&self.operator_key_id);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Header, WireError> {
        let mut r = Reader::new(bytes);
        let header = Header::read(&mut r)?;
        r.finish()?;
        Ok(header)
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Header, WireError> {
        let domain: [u8; 16] = r.array("header.domain")?;
        if domain != HEADER_DOMAIN {
            return Err(WireError::Invalid {
                field: "header.domain",
                reason: "not \"tally/header/v1\\0\"",
            });
        }
        if r.u8("header.version")? != HEADER_VERSION {
            return Err(WireError::Invalid {
                field: "header.version",
                reason: "unsupported header version",
            });
        }
        let reserved: [u8; 7] = r.array("header.reserved")?;
        let chain_id = r.array("header.chain_id")?;
        let height = r.u64("header.height")?;
        let term = r.u64("header.term")?;
        let time_unix_ms = r.u64("header.time_unix_ms")?;
        let request_count = r.u32("header.request_count")?;
        let reserved2 = r.u32("header.reserved")?;
        if reserved != [0; 7] || reserved2 != 0 {
            return Err(WireError::Invalid {
                field: "header.reserved",
                reason: "must be zero",
            });
        }
        Ok(Header {
            chain_id,
            height,
            term,
            time_unix_ms,
            request_count,
            prev_hash: r.array("header.prev_hash")?,
            merkle_root: r.array("header.merkle_root")?,
            state_digest: r.array("header.state_digest")?,
            operator_key_id: r.array("header.operator_key_id")?,
        })
    }
}

/// A header with the operator's Ed25519 signature over its 192 bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedHeader {
    pub header: Header,
    pub signature: Signature,
}

impl SignedHeader {
    pub fn encode(&self) -> [u8; SIGNED_HEADER_BYTES] {
        let mut out = [0u8; SIGNED_HEADER_BYTES];
        out[..HEADER_BYTES].copy_from_slice(&self.header.encode());
        out[HEADER_BYTES..].copy_from_slice(&self.signature);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<SignedHeader, WireError> {
        let mut r = Reader::new(bytes);
        let sh = SignedHeader::read(&mut r)?;
        r.finish()?;
        Ok(sh)
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<SignedHeader, WireError> {
        Ok(SignedHeader {
            header: Header::read(r)?,
            signature: r.array("header.signature")?,
        })
    }
}

/// An RFC 6962 inclusion proof (audit path) of one leaf in a tree of `tree_size` leaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InclusionProof {
    pub leaf_index: u32,
    pub tree_size: u32,
    /// Sibling hashes from the leaf's level upward, as RFC 6962 / RFC 9162 define the audit path.
    pub path: Vec<Hash>,
}

impl InclusionProof {
    pub fn write(&self, out: &mut Vec<u8>) {
        assert!(self.path.len() <= PROOF_HASHES_MAX);
        out.extend_from_slice(&self.leaf_index.to_le_bytes());
        out.extend_from_slice(&self.tree_size.to_le_bytes());
        out.push(self.path.len() as u8);
        for h in &self.path {
            out.extend_from_slice(h);
        }
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<InclusionProof, WireError> {
        let leaf_index = r.u32("proof.leaf_index")?;
        let tree_size = r.u32("proof.tree_size")?;
        let count = r.u8("proof.path_len")? as usize;
        if count > PROOF_HASHES_MAX {
            return Err(WireError::Invalid {
                field: "proof.path_len",
                reason: "more than 32 hashes",
            });
        }
        let mut path = Vec::with_capacity(count);
        for _ in 0..count {
            path.push(r.array("proof.path")?);
        }
        Ok(InclusionProof {
            leaf_index,
            tree_size,
            path,
        })
    }
}

/// Everything a client needs to prove, offline, that its request was applied: the request, its
/// receipt, the signed header of its batch and the receipt's inclusion proof under that header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confirmation {
    /// True when this answers a resubmission of an already-applied request: nothing was applied
    /// again, and this is the original confirmation.
    pub replayed: bool,
    pub request: Request,
    pub receipt: Receipt,
    pub header: SignedHeader,
    pub proof: InclusionProof,
}

impl Confirmation {
    pub fn write(&self, out: &mut Vec<u8>) {
        out.push(self.replayed as u8);
        out.extend_from_slice(&self.request.encode());
        out.extend_from_slice(&self.receipt.encode());
        out.extend_from_slice(&self.header.encode());
        self.proof.write(out);
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            1 + REQUEST_BYTES
                + RECEIPT_BYTES
                + SIGNED_HEADER_BYTES
                + 9
                + 32 * self.proof.path.len(),
        );
        self.write(&mut out);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Confirmation, WireError> {
        let mut r = Reader::new(bytes);
        let c = Confirmation::read(&mut r)?;
        r.finish()?;
        Ok(c)
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Confirmation, WireError> {
        let replayed = match r.u8("confirmation.flags")? {
            0 => false,
            1 => true,
            _ => {
                return Err(WireError::Invalid {
                    field: "confirmation.flags",
                    reason: "unknown flag bits",
                })
            }
        };
        Ok(Confirmation {
            replayed,
            request: Request::read(r)?,
            receipt: Receipt::read(r)?,
            header: SignedHeader::read(r)?,
            proof: InclusionProof::read(r)?,
        })
    }
}
