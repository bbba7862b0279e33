//! The balance proof file (`tally prove --out`, `tally verify`; PROTOCOL.md §11.3): an
//! account's balance, or its absence, proven against a signed header through the state map,
//! with everything an outsider needs to check it against the operator's key alone.

use serde::{Deserialize, Serialize};
use tally_core::key_chain::KeySchedule;
use tally_core::state_map::account_path;
use tally_core::verify::verify_balance_proof;
use tally_wire::{BalanceProofReply, KeyLink, PublicKey, SignedHeader, BALANCE_PROOF_DEPTH_MAX};

use crate::consistency::proof_hash;
use crate::key_chain::{file_header_key, file_keys, hex_links};
use crate::keys::parse_public_key;
use crate::{Error, Result};

/// `format` of a balance proof file.
pub const BALANCE_PROOF_FORMAT: &str = "tally-balance-proof-v1";

/// A balance proof as JSON. `format`, `account`, `balance`, `exists` and `height` are the
/// contract (issue 20); the rest make the file verifiable offline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalanceProofFile {
    pub format: String,
    /// Hex public key of the account.
    pub account: String,
    /// 0 when the account does not exist.
    pub balance: u64,
    pub exists: bool,
    /// The height of the header the proof is against.
    pub height: u64,
    /// The account's path in the state map, SHA-256("tally/map/acct\0\0" ‖ account), hex:
    /// redundant, so that a changed digit of `account` fails even where the proof of absence
    /// would hold for the other key too.
    pub path: String,
    /// The key that signed the header: the genesis key until the ledger rotates, then the key
    /// for `height` (PROTOCOL.md §4.14).
    pub operator_public_key: String,
    /// The 256-byte signed header, hex.
    pub header_hex: String,
    /// The state digest's inputs besides the height (PROTOCOL.md §4.13).
    pub map_root: String,
    pub account_count: u64,
    pub total_deposited: u128,
    pub total_withdrawn: u128,
    /// Hex hashes from the account's position up to the map root (bottom first).
    pub siblings: Vec<String>,
    /// For an absent account: the entry standing where its path leads, if any.
    pub neighbor: Option<Neighbor>,
    /// The operator key chain up to the header's key (PROTOCOL.md §4.14, §11), hex of each
    /// link; absent while the ledger has not rotated before the header.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub key_chain: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Neighbor {
    pub path: String,
    pub value_hash: String,
}

impl BalanceProofFile {
    /// The file of a verified reply.
    pub fn new(reply: &BalanceProofReply, operator: &PublicKey) -> BalanceProofFile {
        BalanceProofFile {
            format: BALANCE_PROOF_FORMAT.into(),
            account: hex::encode(reply.account),
            balance: reply.balance.unwrap_or(0),
            exists: reply.balance.is_some(),
            height: reply.header.header.height,
            path: hex::encode(account_path(&reply.account)),
            operator_public_key: hex::encode(operator),
            header_hex: hex::encode(reply.header.encode()),
            map_root: hex::encode(reply.map_root),
            account_count: reply.account_count,
            total_deposited: reply.total_deposited,
            total_withdrawn: reply.total_withdrawn,
            siblings: reply.siblings.iter().map(hex::encode).collect(),
            neighbor: reply.neighbor.map(|(path, value_hash)| Neighbor {
                path: hex::encode(path),
                value_hash: hex::encode(value_hash),
            }),
            key_chain: Vec::new(),
        }
    }

    /// The same, carrying `links` (from the genesis key to the key that signed the header).
    pub fn with_key_chain(self, links: &[KeyLink]) -> BalanceProofFile {
        BalanceProofFile {
            key_chain: hex_links(links),
            ..self
        }
    }

    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).expect("JSON") + "\n"
    }

    /// The reply the file holds, without checking it.
    fn reply(&self) -> Result<BalanceProofReply> {
        let bytes = hex::decode(&self.header_hex)
            .map_err(|e| Error::Verify(format!("header_hex is not hex: {e}")))?;
        let header = SignedHeader::decode(&bytes)
            .map_err(|e| Error::Verify(format!("header_hex does not decode: {e}")))?;
        if self.siblings.len() > BALANCE_PROOF_DEPTH_MAX {
            return Err(Error::Verify("siblings: more than 256 hashes".into()));
        }
        let siblings = self
            .siblings
            .iter()
            .map(|s| proof_hash("siblings", s))
            .collect::<Result<_>>()?;
        let neighbor = match &self.neighbor {
            None => None,
            Some(n) => Some((
                proof_hash("neighbor.path", &n.path)?,
                proof_hash("neighbor.value_hash", &n.value_hash)?,
            )),
        };
        Ok(BalanceProofReply {
            header,
            map_root: proof_hash("map_root", &self.map_root)?,
            account_count: self.account_count,
            total_deposited: self.total_deposited,
            total_withdrawn: self.total_withdrawn,
            account: parse_public_key(&self.account)
                .map_err(|e| Error::Verify(format!("account: {e}")))?,
            balance: self.exists.then_some(self.balance),
            siblings,
            neighbor,
        })
    }
}

/// Verifies the text of a balance proof file under the genesis key `operator` (None: the key
/// the file names, which proves only that the file is self-consistent). Returns the reply and
/// the key that signed its header.
pub fn verify_balance_proof_json(
    text: &str,
    operator: Option<PublicKey>,
) -> Result<(BalanceProofReply, PublicKey)> {
    verify_balance_proof_json_under(text, operator.map(KeySchedule::genesis).as_ref())
}

/// The same under a trusted genesis key and the chain known beside it, following the file's
/// `key_chain` if it has one ([`file_keys`]).
pub fn verify_balance_proof_json_under(
    text: &str,
    trusted: Option<&KeySchedule>,
) -> Result<(BalanceProofReply, PublicKey)> {
    let fail = |what: String| Error::Verify(what);
    let file: BalanceProofFile = serde_json::from_str(text)
        .map_err(|e| fail(format!("not a tally balance proof file: {e}")))?;
    if file.format != BALANCE_PROOF_FORMAT {
        return Err(fail(format!(
            "format is {:?}, expected {BALANCE_PROOF_FORMAT:?}",
            file.format
        )));
    }
    let named = parse_public_key(&file.operator_public_key)
        .map_err(|e| fail(format!("operator_public_key: {e}")))?;
    let reply = file.reply()?;
    let keys = file_keys(trusted, &named, &file.key_chain)?;
    let operator = file_header_key(&keys, &reply.header)?;
    verify_balance_proof(&reply, &operator).map_err(|e| fail(e.to_string()))?;
    if named != operator {
        return Err(fail(format!(
            "the file names operator key {}, but it was checked against {}",
            file.operator_public_key,
            hex::encode(operator)
        )));
    }
    let expected = BalanceProofFile {
        key_chain: file.key_chain.clone(),
        ..BalanceProofFile::new(&reply, &operator)
    };
    if file != expected {
        return Err(fail(
            "the readable fields (height, balance) disagree with the signed header and the \
             proof (the file was edited)"
                .into(),
        ));
    }
    Ok((reply, operator))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use tally_core::crypto::OperatorKey;
    use tally_core::state::LedgerMeta;
    use tally_wire::Header;

    /// A ledger of three accounts (seeds 0x0a, 0x0b, 0x0c; balances 5, 7, 0) under the operator
    /// key whose seed is 32 bytes of 0x07, and the proofs of account 0x0a (present) and of
    /// 0x0d (absent).
    fn vectors() -> (OperatorKey, Vec<BalanceProofReply>) {
        let operator = OperatorKey::new(SigningKey::from_bytes(&[7; 32]));
        let pk = |b: u8| SigningKey::from_bytes(&[b; 32]).verifying_key().to_bytes();
        let mut meta = LedgerMeta::genesis();
        for (seed, balance) in [(0x0a, 5), (0x0b, 7), (0x0c, 0)] {
            meta.account_changed(&pk(seed), None, balance);
        }
        meta.map.flush();
        meta.height = 3;
        meta.total_deposited = 15;
        meta.total_withdrawn = 3;
        let header = operator.sign_header(Header {
            chain_id: [0x11; 32],
            height: 3,
            term: 1,
            time_unix_ms: 1_700_000_000_000,
            request_count: 1,
            prev_hash: [0x22; 32],
            merkle_root: [0x33; 32],
            state_digest: meta.state_digest(),
            operator_key_id: operator.key_id(),
        });
        let reply = |seed: u8, balance: Option<u64>| {
            let proof = meta.map.prove_account(&pk(seed)).expect("loaded");
            BalanceProofReply {
                header: header.clone(),
                map_root: meta.map.root(),
                account_count: meta.account_count,
                total_deposited: meta.total_deposited,
                total_withdrawn: meta.total_withdrawn,
                account: pk(seed),
                balance,
                siblings: proof.siblings,
                neighbor: proof.neighbor,
            }
        };
        (operator, vec![reply(0x0a, Some(5)), reply(0x0d, None)])
    }

    fn vector_paths() -> [std::path::PathBuf; 2] {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../wire/testdata");
        [
            dir.join("balance-proof-v1.json"),
            dir.join("balance-proof-absent-v1.json"),
        ]
    }

    /// The vectors in `wire/testdata/` (rewritten with `TALLY_WRITE_VECTORS=1`): the present
    /// account and the absent one.
    #[test]
    fn the_vectors_verify_and_any_changed_digit_fails() {
        let (operator, replies) = vectors();
        let files: Vec<_> = replies
            .iter()
            .map(|r| BalanceProofFile::new(r, &operator.public()))
            .collect();
        for (file, path) in files.iter().zip(vector_paths()) {
            let json = file.to_json_pretty();
            if std::env::var("TALLY_WRITE_VECTORS").is_ok() {
                std::fs::write(&path, &json).expect("write the vector");
            }
            assert_eq!(std::fs::read_to_string(&path).expect("vector"), json);
            let (reply, _) =
                verify_balance_proof_json(&json, Some(operator.public())).expect("verifies");
            assert_eq!(reply.balance.is_some(), file.exists);
            for edited in one_digit_edits(file) {
                let json = edited.to_json_pretty();
                assert!(
                    verify_balance_proof_json(&json, Some(operator.public())).is_err(),
                    "an edited file verified: {json}"
                );
            }
        }
        assert!(files[0].exists && !files[1].exists);
        // Another key fails; the absent account's proof does not show the present one absent.
        let other = SigningKey::from_bytes(&[8; 32]).verifying_key().to_bytes();
        assert!(verify_balance_proof_json(&files[0].to_json_pretty(), Some(other)).is_err());
        let mut claim = files[1].clone();
        claim.account = files[0].account.clone();
        assert!(verify_balance_proof_json(&claim.to_json_pretty(), None).is_err());
    }

    /// Copies of `file` with one hex digit changed in each hash, and each readable figure moved.
    fn one_digit_edits(file: &BalanceProofFile) -> Vec<BalanceProofFile> {
        let flip = |s: &str, at: usize| {
            let mut b = s.as_bytes().to_vec();
            b[at] = if b[at] == b'0' { b'1' } else { b'0' };
            String::from_utf8(b).expect("hex")
        };
        let mut out = Vec::new();
        for at in [0, 31, 63] {
            let mut f = file.clone();
            f.map_root = flip(&f.map_root, at);
            out.push(f);
            let mut f = file.clone();
            f.account = flip(&f.account, at);
            out.push(f);
            let mut f = file.clone();
            f.path = flip(&f.path, at);
            out.push(f);
            for i in 0..file.siblings.len() {
                let mut f = file.clone();
                f.siblings[i] = flip(&f.siblings[i], at);
                out.push(f);
            }
            if let Some(n) = &file.neighbor {
                let mut f = file.clone();
                f.neighbor = Some(Neighbor {
                    path: flip(&n.path, at),
                    value_hash: n.value_hash.clone(),
                });
                out.push(f);
                let mut f = file.clone();
                f.neighbor = Some(Neighbor {
                    path: n.path.clone(),
                    value_hash: flip(&n.value_hash, at),
                });
                out.push(f);
            }
        }
        for at in [0, 100, 300, 511] {
            let mut f = file.clone();
            f.header_hex = flip(&f.header_hex, at);
            out.push(f);
        }
        let mut f = file.clone();
        f.balance += 1;
        out.push(f);
        let mut f = file.clone();
        f.height += 1;
        out.push(f);
        let mut f = file.clone();
        f.exists = !f.exists;
        out.push(f);
        let mut f = file.clone();
        f.account_count += 1;
        out.push(f);
        let mut f = file.clone();
        f.total_deposited += 1;
        out.push(f);
        out
    }

    /// After two rotations: the file names the key for its height and carries the chain,
    /// which verifies from the genesis key and fails with any link changed, reordered or
    /// dropped.
    #[test]
    fn a_file_after_rotations_carries_its_key_chain() {
        let r = crate::key_chain::tests::rotated();
        let signer = r.keys[2].public();
        let text = BalanceProofFile::new(&r.proof, &signer)
            .with_key_chain(&r.links)
            .to_json_pretty();
        let (reply, key) = verify_balance_proof_json(&text, Some(r.genesis)).unwrap();
        assert_eq!((reply.balance, key), (Some(175), signer));
        crate::key_chain::tests::check_carried_chain(&text, &r, &|text, trusted| {
            verify_balance_proof_json_under(text, trusted).map(|_| ())
        });
    }

    /// `wire/testdata/verify_balance_proof.py`, written from PROTOCOL.md alone, accepts both
    /// vectors and refuses each with one digit of its first sibling changed.
    #[test]
    fn an_outsiders_verifier_agrees_with_the_vectors() {
        let (operator, _) = vectors();
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../wire/testdata/verify_balance_proof.py"
        );
        for path in vector_paths() {
            let text = std::fs::read_to_string(path).expect("vector");
            crate::consistency::tests::outsider_agrees(
                script,
                &text,
                &operator.public(),
                "siblings",
                5,
            );
        }
    }
}
