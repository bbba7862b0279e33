//! The header log's consistency (PROTOCOL.md §4.12): proof that the log a client saw at one
//! height is a prefix of the log at a later one. Leaf `i` of the header log is the signed
//! header at height `i + 1` (256 bytes), the same log as the archive's (§15.4): tree size =
//! height. The operator signs the log's roots as C2SP checkpoints (signed notes, §15.5).

use crate::{Hash, Reader, SignedHeader, WireError, SIGNED_HEADER_BYTES};

/// Hashes in one proof, at most: a tree of up to 2^64 leaves is 64 levels deep, and an RFC 9162
/// consistency proof holds at most one hash per level plus the old root's.
pub const LOG_PROOF_HASHES_MAX: usize = 65;

/// Bytes of one checkpoint note, at most (a checkpoint with room for cosignatures).
pub const CHECKPOINT_NOTE_BYTES_MAX: usize = 4096;

/// Bytes of one `ConsistencyReply`, at most: two log points and a proof, every one at its cap.
pub const CONSISTENCY_REPLY_BYTES_MAX: usize = 2
    * (SIGNED_HEADER_BYTES + 2 + CHECKPOINT_NOTE_BYTES_MAX + 1 + 32 * LOG_PROOF_HASHES_MAX)
    + 1
    + 32 * LOG_PROOF_HASHES_MAX;

/// `GetConsistency`'s answer: both ends of the proof, each a signed header with the signed
/// checkpoint of the log at its height and the header's inclusion in it as the last leaf, and
/// the RFC 9162 consistency proof from the one log to the other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsistencyReply {
    pub from: LogPoint,
    pub to: LogPoint,
    /// RFC 9162 §2.1.4 consistency proof from `from`'s tree to `to`'s.
    pub proof: Vec<Hash>,
}

/// One height of the header log: its signed header, the operator's checkpoint of the log of
/// that size, and the inclusion proof of the header as the log's last leaf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogPoint {
    pub header: SignedHeader,
    /// C2SP signed note: `<origin>\n<size>\n<base64 root>\n\n— <origin> <signature>\n`.
    pub checkpoint: String,
    /// RFC 9162 §2.1.3 inclusion proof of leaf `height - 1` in the tree of `height` leaves.
    pub inclusion: Vec<Hash>,
}

impl ConsistencyReply {
    /// from ‖ to ‖ proof count u8 ‖ 32·n
    pub fn write(&self, out: &mut Vec<u8>) {
        self.from.write(out);
        self.to.write(out);
        write_hashes(out, &self.proof);
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write(&mut out);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<ConsistencyReply, WireError> {
        let mut r = Reader::new(bytes);
        let reply = ConsistencyReply::read(&mut r)?;
        r.finish()?;
        Ok(reply)
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<ConsistencyReply, WireError> {
        Ok(ConsistencyReply {
            from: LogPoint::read(r)?,
            to: LogPoint::read(r)?,
            proof: read_hashes(r, "consistency.proof")?,
        })
    }
}

impl LogPoint {
    /// signed header (256) ‖ note length u16 ‖ note (UTF-8) ‖ inclusion count u8 ‖ 32·n
    pub fn write(&self, out: &mut Vec<u8>) {
        assert!(self.checkpoint.len() <= CHECKPOINT_NOTE_BYTES_MAX);
        out.extend_from_slice(&self.header.encode());
        out.extend_from_slice(&(self.checkpoint.len() as u16).to_le_bytes());
        out.extend_from_slice(self.checkpoint.as_bytes());
        write_hashes(out, &self.inclusion);
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<LogPoint, WireError> {
        let header = SignedHeader::read(r)?;
        let len = r.u16("log_point.checkpoint_len")? as usize;
        if len > CHECKPOINT_NOTE_BYTES_MAX {
            return Err(WireError::Invalid {
                field: "log_point.checkpoint_len",
                reason: "longer than 4096 bytes",
            });
        }
        let bytes = r.take(len, "log_point.checkpoint")?;
        let checkpoint = String::from_utf8(bytes.to_vec()).map_err(|_| WireError::Invalid {
            field: "log_point.checkpoint",
            reason: "not UTF-8",
        })?;
        Ok(LogPoint {
            header,
            checkpoint,
            inclusion: read_hashes(r, "log_point.inclusion")?,
        })
    }
}

fn write_hashes(out: &mut Vec<u8>, hashes: &[Hash]) {
    assert!(hashes.len() <= LOG_PROOF_HASHES_MAX);
    out.push(hashes.len() as u8);
    for h in hashes {
        out.extend_from_slice(h);
    }
}

fn read_hashes(r: &mut Reader<'_>, field: &'static str) -> Result<Vec<Hash>, WireError> {
    let count = r.u8(field)? as usize;
    if count > LOG_PROOF_HASHES_MAX {
        return Err(WireError::Invalid {
            field,
            reason: "more than 65 hashes",
        });
    }
    r.ensure(count * 32, field)?;
    (0..count).map(|_| r.array(field)).collect()
}
