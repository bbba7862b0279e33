//! The consistency proof file (`tally consistency --out`, `tally verify`; PROTOCOL.md §11.1):
//! the RFC 9162 proof between two sizes of the header log, with everything an outsider needs to
//! check it against the operator's key alone: both signed headers, both signed checkpoints and
//! the inclusion of each header as its checkpoint's last leaf.

use serde::{Deserialize, Serialize};
use tally_core::header_log::verify_consistency_reply_under;
use tally_core::key_chain::KeySchedule;
use tally_core::tlog::Checkpoint;
use tally_wire::{ConsistencyReply, Hash, KeyLink, LogPoint, PublicKey, SignedHeader};

use crate::key_chain::{file_header_key, file_keys, hex_links};
use crate::keys::parse_public_key;
use crate::{Error, Result};

/// `format` of a consistency proof file.
pub const CONSISTENCY_FORMAT: &str = "tally-consistency-proof-v1";

/// A consistency proof as JSON. The first six keys are the contract (issue 20); the rest make
/// the file verifiable offline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsistencyFile {
    pub format: String,
    pub from_size: u64,
    pub to_size: u64,
    /// Hex SHA-256 roots of the header log at both sizes.
    pub from_root: String,
    pub to_root: String,
    /// Hex hashes, RFC 9162 §2.1.4 order.
    pub proof: Vec<String>,
    /// The key that signed the header at `to_size`: the genesis key until the ledger rotates
    /// (PROTOCOL.md §4.14).
    pub operator_public_key: String,
    /// The log's origin, `tally.ledger/<chain id hex>`.
    pub origin: String,
    /// The operator's signed checkpoints (C2SP signed notes) of both sizes.
    pub from_checkpoint: String,
    pub to_checkpoint: String,
    /// The 256-byte signed headers at both heights, hex.
    pub from_header_hex: String,
    pub to_header_hex: String,
    /// Inclusion proofs (hex hashes, bottom up) of each header as its log's last leaf.
    pub from_inclusion: Vec<String>,
    pub to_inclusion: Vec<String>,
    /// The operator key chain (PROTOCOL.md §4.14, §11), hex of each link, reaching every key
    /// that signed a header or a checkpoint of the file; absent while the ledger has not
    /// rotated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub key_chain: Vec<String>,
}

fn hexes(hashes: &[Hash]) -> Vec<String> {
    hashes.iter().map(hex::encode).collect()
}

impl ConsistencyFile {
    /// The file of a verified reply, whose checkpoints' roots are `roots`, naming `operator`
    /// (the key that signed the header at `to_size`).
    pub fn new(
        reply: &ConsistencyReply,
        roots: (&Checkpoint, &Checkpoint),
        operator: &PublicKey,
    ) -> ConsistencyFile {
        ConsistencyFile {
            format: CONSISTENCY_FORMAT.into(),
            from_size: roots.0.size,
            to_size: roots.1.size,
            from_root: hex::encode(roots.0.root),
            to_root: hex::encode(roots.1.root),
            proof: hexes(&reply.proof),
            operator_public_key: hex::encode(operator),
            origin: roots.0.origin.clone(),
            from_checkpoint: reply.from.checkpoint.clone(),
            to_checkpoint: reply.to.checkpoint.clone(),
            from_header_hex: hex::encode(reply.from.header.encode()),
            to_header_hex: hex::encode(reply.to.header.encode()),
            from_inclusion: hexes(&reply.from.inclusion),
            to_inclusion: hexes(&reply.to.inclusion),
            key_chain: Vec::new(),
        }
    }

    /// The same, carrying `links` (from the genesis key to every key the file needs).
    pub fn with_key_chain(self, links: &[KeyLink]) -> ConsistencyFile {
        ConsistencyFile {
            key_chain: hex_links(links),
            ..self
        }
    }

    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).expect("JSON") + "\n"
    }
}

/// Verifies the text of a consistency file under the genesis key `operator` (None: the key
/// the file names, which proves only that the file is self-consistent). Returns the reply, the
/// key that signed the header at `to_size`, and both checkpoints.
pub fn verify_consistency_json(
    text: &str,
    operator: Option<PublicKey>,
) -> Result<(ConsistencyReply, PublicKey, Checkpoint, Checkpoint)> {
    verify_consistency_json_under(text, operator.map(KeySchedule::genesis).as_ref())
}

/// The same under a trusted genesis key and the chain known beside it, following the file's
/// `key_chain` if it has one ([`file_keys`]): each header under the key for its height, each
/// checkpoint under a key at or after its size's.
pub fn verify_consistency_json_under(
    text: &str,
    trusted: Option<&KeySchedule>,
) -> Result<(ConsistencyReply, PublicKey, Checkpoint, Checkpoint)> {
    let fail = |what: String| Error::Verify(what);
    let file: ConsistencyFile = serde_json::from_str(text)
        .map_err(|e| fail(format!("not a tally consistency file: {e}")))?;
    if file.format != CONSISTENCY_FORMAT {
        return Err(fail(format!(
            "format is {:?}, expected {CONSISTENCY_FORMAT:?}",
            file.format
        )));
    }
    let named = parse_public_key(&file.operator_public_key)
        .map_err(|e| fail(format!("operator_public_key: {e}")))?;
    let reply = ConsistencyReply {
        from: point(
            &file.from_header_hex,
            &file.from_checkpoint,
            &file.from_inclusion,
        )?,
        to: point(&file.to_header_hex, &file.to_checkpoint, &file.to_inclusion)?,
        proof: hashes("proof", &file.proof)?,
    };
    let keys = file_keys(trusted, &named, &file.key_chain)?;
    file_header_key(&keys, &reply.from.header)?;
    let operator = file_header_key(&keys, &reply.to.header)?;
    let chain_id = reply.from.header.header.chain_id;
    let (a, b) = verify_consistency_reply_under(&reply, &keys, &chain_id)
        .map_err(|e| fail(e.to_string()))?;
    if named != operator {
        return Err(fail(format!(
            "the file names operator key {}, but the header at {} was checked against {}",
            file.operator_public_key,
            b.size,
            hex::encode(operator)
        )));
    }
    let expected = ConsistencyFile {
        key_chain: file.key_chain.clone(),
        ..ConsistencyFile::new(&reply, (&a, &b), &operator)
    };
    if file != expected {
        return Err(fail(
            "the readable fields (sizes, roots, origin) disagree with the signed checkpoints \
             and headers (the file was edited)"
                .into(),
        ));
    }
    Ok((reply, operator, a, b))
}

fn point(header_hex: &str, checkpoint: &str, inclusion: &[String]) -> Result<LogPoint> {
    let bytes =
        hex::decode(header_hex).map_err(|e| Error::Verify(format!("a header is not hex: {e}")))?;
    let header = SignedHeader::decode(&bytes)
        .map_err(|e| Error::Verify(format!("a header does not decode: {e}")))?;
    Ok(LogPoint {
        header,
        checkpoint: checkpoint.to_owned(),
        inclusion: hashes("inclusion", inclusion)?,
    })
}

fn hashes(what: &str, list: &[String]) -> Result<Vec<Hash>> {
    if list.len() > tally_wire::LOG_PROOF_HASHES_MAX {
        return Err(Error::Verify(format!("{what}: more than 65 hashes")));
    }
    list.iter().map(|h| proof_hash(what, h)).collect()
}

/// One hash of a proof file: 64 hex digits, else the file does not verify.
pub(crate) fn proof_hash(what: &str, text: &str) -> Result<Hash> {
    hex::decode(text)
        .ok()
        .and_then(|b| Hash::try_from(b).ok())
        .ok_or_else(|| Error::Verify(format!("{what}: {text:?} is not 64 hex digits")))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use tally_core::crypto::OperatorKey;
    use tally_core::header_log::consistency_reply;
    use tally_core::tlog::{completed_at, leaf_hash, TreeEdge};
    use tally_wire::Header;

    /// `wire/testdata/consistency-proof-v1.json`: from 5 to 13 headers of a chain signed by the
    /// key whose seed is 32 bytes of 0x07. Rewritten with `TALLY_WRITE_VECTORS=1`.
    const VECTOR: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../wire/testdata/consistency-proof-v1.json"
    );

    fn vector() -> (String, PublicKey) {
        let operator = OperatorKey::new(SigningKey::from_bytes(&[7; 32]));
        let headers: Vec<SignedHeader> = (1..=13u64)
            .map(|height| {
                operator.sign_header(Header {
                    chain_id: [0xc4; 32],
                    height,
                    term: 1,
                    time_unix_ms: 1_764_806_400_000 + 100 * height,
                    request_count: height as u32,
                    prev_hash: [height as u8; 32],
                    merkle_root: [0x11; 32],
                    state_digest: [0x22; 32],
                    operator_key_id: operator.key_id(),
                })
            })
            .collect();
        let mut edge = TreeEdge::new();
        let rows: Vec<Vec<Hash>> = headers
            .iter()
            .map(|h| edge.append(leaf_hash(&h.encode())))
            .collect();
        let mut node = |level: u8, index: u64| -> std::result::Result<Hash, ()> {
            Ok(rows[completed_at(level, index) as usize - 1][level as usize])
        };
        let reply = consistency_reply(
            headers[4].clone(),
            headers[12].clone(),
            &operator,
            &mut node,
        )
        .unwrap();
        let (a, b) = tally_core::header_log::verify_consistency_reply(
            &reply,
            &operator.public(),
            &[0xc4; 32],
        )
        .unwrap();
        let text = ConsistencyFile::new(&reply, (&a, &b), &operator.public()).to_json_pretty();
        (text, operator.public())
    }

    #[test]
    fn the_test_vector_is_what_the_code_writes_and_verifies() {
        let (text, operator) = vector();
        if std::env::var("TALLY_WRITE_VECTORS").is_ok() {
            std::fs::write(VECTOR, &text).unwrap();
        }
        let stored = std::fs::read_to_string(VECTOR).expect("the vector file");
        assert_eq!(
            stored, text,
            "wire/testdata/consistency-proof-v1.json is stale"
        );
        let (_, _, a, b) = verify_consistency_json(&stored, Some(operator)).unwrap();
        assert_eq!((a.size, b.size), (5, 13));
        let other = OperatorKey::new(SigningKey::from_bytes(&[8; 32])).public();
        assert!(verify_consistency_json(&stored, Some(other)).is_err());
        let root = &stored[stored.find("\"to_root\": \"").unwrap() + 12..][..64];
        let mut changed = root.to_string().into_bytes();
        changed[10] = if changed[10] == b'a' { b'b' } else { b'a' };
        let edited = stored.replacen(root, std::str::from_utf8(&changed).unwrap(), 1);
        assert!(verify_consistency_json(&edited, Some(operator)).is_err());
    }

    /// From size 1 (signed by the genesis key) to size 3 (two rotations later), the
    /// checkpoints signed by the newest key: the file carries the chain, which verifies from
    /// the genesis key and fails with any link changed, reordered or dropped.
    #[test]
    fn a_file_across_rotations_carries_its_key_chain() {
        let r = crate::key_chain::tests::rotated();
        let mut edge = TreeEdge::new();
        let rows: Vec<Vec<Hash>> = r
            .headers
            .iter()
            .map(|h| edge.append(leaf_hash(&h.encode())))
            .collect();
        let mut node = |level: u8, index: u64| -> std::result::Result<Hash, ()> {
            Ok(rows[completed_at(level, index) as usize - 1][level as usize])
        };
        let (from, to) = (r.headers[0].clone(), r.headers[2].clone());
        let reply = consistency_reply(from, to, &r.keys[2], &mut node).unwrap();
        let keys = KeySchedule::follow(r.genesis, &r.links).unwrap();
        let chain_id = r.headers[0].header.chain_id;
        let (a, b) = verify_consistency_reply_under(&reply, &keys, &chain_id).unwrap();
        let signer = r.keys[2].public();
        let text = ConsistencyFile::new(&reply, (&a, &b), &signer)
            .with_key_chain(&r.links)
            .to_json_pretty();
        let (_, key, _, _) = verify_consistency_json(&text, Some(r.genesis)).unwrap();
        assert_eq!(key, signer);
        crate::key_chain::tests::check_carried_chain(&text, &r, &|text, trusted| {
            verify_consistency_json_under(text, trusted).map(|_| ())
        });
    }

    /// An outsider's verifier (`wire/testdata/verify_consistency.py`, Python and
    /// `cryptography` only, written from PROTOCOL.md) accepts the vector and refuses it with one
    /// proof digit changed.
    #[test]
    fn an_outsiders_verifier_agrees_with_the_vector() {
        let (text, operator) = vector();
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../wire/testdata/verify_consistency.py"
        );
        outsider_agrees(script, &text, &operator, "proof", 13);
    }

    /// Runs the Python verifier `script` on `text` (must print `ok`) and on `text` with digit
    /// `at` of the first string under `key` changed (must fail). Skipped with a note without
    /// python3 and `cryptography`, unless `TALLY_REQUIRE_PYTHON=1` (`.ci/run` sets it).
    pub(crate) fn outsider_agrees(
        script: &str,
        text: &str,
        operator: &PublicKey,
        key: &str,
        at: usize,
    ) {
        let probe = std::process::Command::new("python3")
            .args(["-c", "import cryptography"])
            .output();
        if !probe.is_ok_and(|o| o.status.success()) {
            assert_ne!(
                std::env::var("TALLY_REQUIRE_PYTHON").as_deref(),
                Ok("1"),
                "python3 with the cryptography package is required"
            );
            eprintln!("skipped: no python3 with the cryptography package");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let run = |text: &str| {
            let path = dir.path().join("file.json");
            std::fs::write(&path, text).unwrap();
            std::process::Command::new("python3")
                .arg(script)
                .arg(&path)
                .arg(hex::encode(operator))
                .output()
                .unwrap()
        };
        let out = run(text);
        assert!(
            out.status.success() && out.stdout == b"ok\n",
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: serde_json::Value = serde_json::from_str(text).unwrap();
        let first = match &json[key] {
            serde_json::Value::Array(list) => list[0].as_str().unwrap().to_string(),
            other => other.as_str().unwrap().to_string(),
        };
        let mut changed = first.clone().into_bytes();
        changed[at] = if changed[at] == b'0' { b'1' } else { b'0' };
        let edited = text.replacen(first.as_str(), std::str::from_utf8(&changed).unwrap(), 1);
        assert!(
            !run(&edited).status.success(),
            "a changed digit verifies in Python"
        );
    }
}
