//! A transparency log witness (C2SP tlog-witness, tlog-cosignature), pure: parsing an
//! `add-checkpoint` request, deciding on it against the last checkpoint cosigned for its log,
//! and Ed25519 cosignatures (signature type `0x04`). The server crate runs the HTTP side and
//! persists the state (`tally witness`).
//!
//! A witness cosigns a checkpoint only if it is signed by the log's key and consistent with
//! the last one it cosigned for that log (RFC 9162 consistency proof): two checkpoints of one
//! log that are not one history never both get its cosignature.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use tally_wire::Hash;

use crate::crypto::sha256;
use crate::tlog::{
    open_note, parse_signature_line, valid_key_name, verify_consistency, Checkpoint, TlogError,
};

/// The signed-note signature type of an Ed25519 cosignature (tlog-cosignature).
pub const COSIGNATURE_TYPE_ED25519: u8 = 0x04;
/// Bytes of an `add-checkpoint` request body, at most.
pub const ADD_CHECKPOINT_BYTES_MAX: usize = 16 * 1024;
/// Consistency proof lines in a request, at most (the spec's bound).
pub const PROOF_LINES_MAX: usize = 63;

/// Why a witness refuses a request; each maps to the HTTP status the spec names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// 400: the body does not parse, or the old size is above the checkpoint's.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// 403: no signature by the log's key verifies.
    #[error("the checkpoint is not signed by the log's key: {0}")]
    Forbidden(String),
    /// 404: the witness does not know the log.
    #[error("unknown log {0:?}")]
    UnknownLog(String),
    /// 409: the old size is not the size last cosigned (`size`), or the same size with another
    /// root (`size` None: the body says so).
    #[error("conflict: the witness last cosigned size {size}")]
    Conflict { size: u64, same_size_fork: bool },
    /// 422: the consistency proof does not verify.
    #[error("the consistency proof does not verify: {0}")]
    Unprocessable(String),
}

impl Refusal {
    /// The HTTP status code tlog-witness assigns.
    pub fn status(&self) -> u16 {
        match self {
            Refusal::BadRequest(_) => 400,
            Refusal::Forbidden(_) => 403,
            Refusal::UnknownLog(_) => 404,
            Refusal::Conflict { .. } => 409,
            Refusal::Unprocessable(_) => 422,
        }
    }
}

/// The last checkpoint a witness cosigned for one log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cosigned {
    pub size: u64,
    pub root: Hash,
}

/// A parsed `add-checkpoint` body: `old <size>\n`, proof lines, a blank line, the note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddCheckpoint {
    pub old_size: u64,
    pub proof: Vec<Hash>,
    pub note: String,
}

impl AddCheckpoint {
    pub fn encode(&self) -> String {
        let mut out = format!("old {}\n", self.old_size);
        for h in &self.proof {
            out.push_str(&BASE64.encode(h));
            out.push('\n');
        }
        out.push('\n');
        out.push_str(&self.note);
        out
    }

    pub fn parse(body: &str) -> Result<AddCheckpoint, Refusal> {
        let bad = |what: &str| Refusal::BadRequest(what.to_string());
        if body.len() > ADD_CHECKPOINT_BYTES_MAX {
            return Err(bad("body longer than 16 KiB"));
        }
        let (head, note) = body
            .split_once("\n\n")
            .ok_or_else(|| bad("no blank line before the checkpoint"))?;
        let mut lines = head.split('\n');
        let old = lines.next().and_then(|l| l.strip_prefix("old "));
        let old_size = old
            .filter(|s| *s == "0" || (!s.starts_with('0') && s.bytes().all(|b| b.is_ascii_digit())))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("the first line is not `old <size>`"))?;
        let mut proof = Vec::new();
        for line in lines {
            if proof.len() == PROOF_LINES_MAX {
                return Err(bad("more than 63 proof lines"));
            }
            let hash = BASE64
                .decode(line)
                .ok()
                .and_then(|b| Hash::try_from(b).ok())
                .ok_or_else(|| bad("a proof line is not a base64 hash"))?;
            proof.push(hash);
        }
        Ok(AddCheckpoint {
            old_size,
            proof,
            note: note.to_string(),
        })
    }
}

/// Decides on `request` for the log `origin`, signed by one of the keys `logs` gives for it
/// (the log's operator key chain, PROTOCOL.md §4.14: any key of it may sign a checkpoint),
/// given what was last cosigned for it (None: never). On success: the checkpoint to cosign and
/// the new state, which the caller must persist, atomically with the check, before answering.
pub fn judge(
    request: &AddCheckpoint,
    logs: &dyn Fn(&str) -> Option<Vec<VerifyingKey>>,
    last: &dyn Fn(&str) -> Option<Cosigned>,
) -> Result<(Checkpoint, Cosigned), Refusal> {
    let origin = request.note.split('\n').next().unwrap_or_default();
    let keys = logs(origin).ok_or_else(|| Refusal::UnknownLog(origin.to_string()))?;
    let mut opened = Err(Refusal::Forbidden("the log has no key".into()));
    for key in &keys {
        opened = open_note(&request.note, origin, key).map_err(|e| match e {
            TlogError::NoteMalformed { .. } => Refusal::BadRequest(e.to_string()),
            other => Refusal::Forbidden(other.to_string()),
        });
        if !matches!(opened, Err(Refusal::Forbidden(_))) {
            break;
        }
    }
    let body = opened?;
    let checkpoint =
        Checkpoint::parse_body(&body).map_err(|e| Refusal::BadRequest(e.to_string()))?;
    if request.old_size > checkpoint.size {
        return Err(Refusal::BadRequest(
            "old size above the checkpoint's".into(),
        ));
    }
    let last = last(origin);
    let last_size = last.map_or(0, |c| c.size);
    if request.old_size != last_size {
        return Err(Refusal::Conflict {
            size: last_size,
            same_size_fork: false,
        });
    }
    let new = Cosigned {
        size: checkpoint.size,
        root: checkpoint.root,
    };
    match last {
        None if request.proof.is_empty() => {}
        None => {
            return Err(Refusal::Unprocessable(
                "a proof from size 0 must be empty".into(),
            ))
        }
        Some(old) if old.size == new.size && old.root != new.root => {
            return Err(Refusal::Conflict {
                size: old.size,
                same_size_fork: true,
            })
        }
        Some(old) => verify_consistency(old.size, new.size, &old.root, &new.root, &request.proof)
            .map_err(|e| Refusal::Unprocessable(e.to_string()))?,
    }
    Ok((checkpoint, new))
}

/// Key ID of an Ed25519 cosigner: SHA-256(name ‖ "\n" ‖ 0x04 ‖ public key)[:4].
pub fn cosigner_key_id(name: &str, key: &VerifyingKey) -> [u8; 4] {
    let digest = sha256(&[
        name.as_bytes(),
        b"\n",
        &[COSIGNATURE_TYPE_ED25519],
        key.as_bytes(),
    ]);
    digest[..4].try_into().expect("4 bytes")
}

/// The message a v1 cosignature signs: `cosignature/v1\ntime <t>\n` and the checkpoint body.
fn cosigned_message(body: &str, timestamp: u64) -> String {
    format!("cosignature/v1\ntime {timestamp}\n{body}")
}

/// A cosignature line `— <name> base64(key id ‖ timestamp u64 BE ‖ signature)\n` over the
/// checkpoint `body` at `timestamp` (Unix seconds).
pub fn cosign(body: &str, timestamp: u64, name: &str, key: &SigningKey) -> String {
    assert!(valid_key_name(name), "invalid cosigner name {name:?}");
    assert!(timestamp < 1 << 63);
    let mut blob = cosigner_key_id(name, &key.verifying_key()).to_vec();
    blob.extend_from_slice(&timestamp.to_be_bytes());
    let signature = key.sign(cosigned_message(body, timestamp).as_bytes());
    blob.extend_from_slice(&signature.to_bytes());
    format!("\u{2014} {name} {}\n", BASE64.encode(blob))
}

/// The timestamp of a valid cosignature by (`name`, `key`) among `note`'s signature lines, or
/// None when it carries none (lines of other keys are ignored; a bad one by this key fails).
pub fn cosigned_at(note: &str, name: &str, key: &VerifyingKey) -> Result<Option<u64>, TlogError> {
    let split = note.rfind("\n\n").ok_or(TlogError::NoteMalformed {
        reason: "no blank line before the signatures",
    })?;
    let (body, block) = (&note[..split + 1], &note[split + 2..]);
    let id = cosigner_key_id(name, key);
    for line in block.lines() {
        let (signer, line_id, blob) = parse_signature_line(line)?;
        if signer != name || line_id != id {
            continue;
        }
        let bad = || TlogError::NoteBadSignature {
            key: format!("cosigner {name}"),
        };
        if blob.len() != 8 + 64 {
            return Err(bad());
        }
        let timestamp = u64::from_be_bytes(blob[..8].try_into().expect("8 bytes"));
        let signature = ed25519_dalek::Signature::from_slice(&blob[8..]).map_err(|_| bad())?;
        key.verify_strict(cosigned_message(body, timestamp).as_bytes(), &signature)
            .map_err(|_| bad())?;
        return Ok(Some(timestamp));
    }
    Ok(None)
}
