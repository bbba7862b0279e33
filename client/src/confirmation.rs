//! The confirmation file: a confirmation as JSON, checkable offline.
//!
//! # Format `tally-confirmation-v1`
//!
//! ```json
//! {
//!   "format": "tally-confirmation-v1",
//!   "confirmation_hex": "<hex of the Confirmation's wire bytes>",
//!   "operator_public_key": "<64 hex>",
//!   "request": {"op": "transfer", "id": "<decimal u128, as a string>", "signer": "<64 hex>",
//!               "to": "<64 hex>", "amount": 123},
//!   "receipt": {"height": 1, "index": 0, "signer_balance": 10, "to_balance": 5,
//!               "request_hash": "<64 hex>"},
//!   "header": {"height": 1, "term": 0, "time_unix_ms": 0, "request_count": 1,
//!              "prev_hash": "<64 hex>", "merkle_root": "<64 hex>", "state_digest": "<64 hex>",
//!              "header_hash": "<64 hex>", "signature": "<128 hex>"},
//!   "proof": {"leaf_index": 0, "tree_size": 1, "path": ["<64 hex>", ...]}
//! }
//! ```
//!
//! - `confirmation_hex` is authoritative: the lowercase hex of `Confirmation::encode()` (the
//!   `Confirmed` reply's payload, PROTOCOL.md): flags (1 byte), request (208), receipt (80),
//!   signed header (256), proof (9 + 32 × path length). The flags byte is always 0 in a file:
//!   "replayed" says how the answer was delivered, not what was applied, so it is cleared and
//!   one applied request always has one file.
//! - The other fields repeat what those bytes say, for humans and scripts. Hex is lowercase;
//!   `op` is `deposit`, `transfer` or `withdraw`; `to` is all zero for a withdrawal;
//!   `signer_balance` is 0 for a deposit and `to_balance` 0 for a withdrawal; `header_hash` is
//!   SHA-256 of the header's 192 bytes; `id` is a string because JSON numbers lose precision
//!   beyond 2^53.
//! - `operator_public_key` is the key the writer expected to have signed the header: the
//!   ledger's genesis key until it rotates (PROTOCOL.md §4.14), then the key for the header's
//!   height. A verifier should use a key it already trusts (its profile's genesis key) rather
//!   than the file's own.
//! - `key_chain` (only when the ledger's key has rotated before the header): hex of each
//!   `KeyLink` from the genesis key to the key that signed the header, oldest first. A verifier
//!   follows it from the genesis key it trusts ([`crate::key_chain::file_keys`]).
//! - The CLI's `--json` output of a submit is this object plus `"replayed": bool` (true when the
//!   server answered a resubmission with the original confirmation). A file may carry it; it is
//!   informational and not checked.
//!
//! A file verifies when the bytes decode, the confirmation checks out
//! ([`tally_core::verify::verify_confirmation`]) under the operator key, and every readable field
//! equals what the bytes say. No other fields are allowed.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tally_core::crypto::header_hash;
use tally_core::key_chain::KeySchedule;
use tally_core::verify::verify_confirmation;
use tally_wire::{Confirmation, KeyLink, PublicKey};

use crate::key_chain::{file_header_key, file_keys, hex_links};
use crate::keys::{parse_public_key, to_hex};
use crate::{Error, Result};

/// The value of the `format` field.
pub const CONFIRMATION_FORMAT: &str = "tally-confirmation-v1";

/// A confirmation file, field by field (see the module documentation for the format).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfirmationFile {
    pub format: String,
    pub confirmation_hex: String,
    pub operator_public_key: String,
    pub request: RequestFields,
    pub receipt: ReceiptFields,
    pub header: HeaderFields,
    pub proof: ProofFields,
    /// The operator key chain up to the header's key (PROTOCOL.md §4.14, §11), hex of each
    /// link; absent while the ledger has not rotated before the header.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub key_chain: Vec<String>,
    /// Present in the CLI's output, absent from files it writes; informational, never checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replayed: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestFields {
    pub op: String,
    pub id: String,
    pub signer: String,
    pub to: String,
    pub amount: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiptFields {
    pub height: u64,
    pub index: u32,
    pub signer_balance: u64,
    pub to_balance: u64,
    pub request_hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderFields {
    pub height: u64,
    pub term: u64,
    pub time_unix_ms: u64,
    pub request_count: u32,
    pub prev_hash: String,
    pub merkle_root: String,
    pub state_digest: String,
    pub header_hash: String,
    pub signature: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProofFields {
    pub leaf_index: u32,
    pub tree_size: u32,
    pub path: Vec<String>,
}

impl ConfirmationFile {
    /// The file for `c`, naming `operator` as the key that signed it. `replayed` is left out.
    pub fn new(c: &Confirmation, operator: &PublicKey) -> ConfirmationFile {
        let (r, rc, h) = (&c.request, &c.receipt, &c.header.header);
        ConfirmationFile {
            format: CONFIRMATION_FORMAT.to_string(),
            confirmation_hex: to_hex(
                &Confirmation {
                    replayed: false,
                    ..c.clone()
                }
                .encode(),
            ),
            operator_public_key: to_hex(operator),
            request: RequestFields {
                op: r.op.name().to_string(),
                id: r.id.to_string(),
                signer: to_hex(&r.signer),
                to: to_hex(&r.to),
                amount: r.amount,
            },
            receipt: ReceiptFields {
                height: rc.height,
                index: rc.index,
                signer_balance: rc.signer_balance,
                to_balance: rc.to_balance,
                request_hash: to_hex(&rc.request_hash),
            },
            header: HeaderFields {
                height: h.height,
                term: h.term,
                time_unix_ms: h.time_unix_ms,
                request_count: h.request_count,
                prev_hash: to_hex(&h.prev_hash),
                merkle_root: to_hex(&h.merkle_root),
                state_digest: to_hex(&h.state_digest),
                header_hash: to_hex(&header_hash(h)),
                signature: to_hex(&c.header.signature),
            },
            proof: ProofFields {
                leaf_index: c.proof.leaf_index,
                tree_size: c.proof.tree_size,
                path: c.proof.path.iter().map(|p| to_hex(p)).collect(),
            },
            key_chain: Vec::new(),
            replayed: None,
        }
    }

    /// The same, carrying `links` (from the genesis key to the key that signed the header).
    pub fn with_key_chain(self, links: &[KeyLink]) -> ConfirmationFile {
        ConfirmationFile {
            key_chain: hex_links(links),
            ..self
        }
    }

    /// The same, with `"replayed"` set from the confirmation (the CLI's output).
    pub fn with_replayed(c: &Confirmation, operator: &PublicKey) -> ConfirmationFile {
        ConfirmationFile {
            replayed: Some(c.replayed),
            ..ConfirmationFile::new(c, operator)
        }
    }

    /// Pretty JSON with fields in the documented order, ending in a newline.
    pub fn to_json_pretty(&self) -> String {
        let mut text = serde_json::to_string_pretty(self).expect("plain structs serialize");
        text.push('\n');
        text
    }
}

/// The confirmation file's content as a JSON value. (A `serde_json::Value` orders object keys
/// alphabetically; print [`ConfirmationFile`] itself to keep the documented order.)
pub fn confirmation_to_json(c: &Confirmation, operator: &PublicKey) -> serde_json::Value {
    serde_json::to_value(ConfirmationFile::new(c, operator)).expect("plain structs serialize")
}

/// Writes a confirmation file, replacing any file at `path` atomically (write, sync, rename).
pub fn write_confirmation_file(
    path: impl AsRef<Path>,
    c: &Confirmation,
    operator: &PublicKey,
) -> Result<()> {
    let text = ConfirmationFile::new(c, operator).to_json_pretty();
    write_atomically(path.as_ref(), &text)
}

/// Replaces the file at `path` with `text` atomically: a synced temporary file, renamed.
pub fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    // One temporary name per process: two processes writing one file never share it.
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| Error::io(path, e))
}

/// The header of a confirmation file's text, unverified (to choose the key to verify it
/// under), or None if the text is not a confirmation file that decodes.
pub fn peek_header(text: &str) -> Option<tally_wire::SignedHeader> {
    let file: ConfirmationFile = serde_json::from_str(text).ok()?;
    let bytes = hex::decode(&file.confirmation_hex).ok()?;
    Confirmation::decode(&bytes).ok().map(|c| c.header)
}

/// Reads and verifies a confirmation file; returns the confirmation it proves.
///
/// The header must be signed by `operator`, or, when `operator` is None, by the key the file
/// names itself (which proves only that the file is consistent: pass a key you trust).
pub fn verify_confirmation_file(
    path: impl AsRef<Path>,
    operator: Option<PublicKey>,
) -> Result<Confirmation> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    verify_confirmation_json(&text, operator).map(|(c, _)| c)
}

/// Verifies the text of a confirmation file; returns the confirmation and the operator key it
/// was checked with. `operator` is the genesis key (see [`verify_confirmation_json_under`]).
pub fn verify_confirmation_json(
    text: &str,
    operator: Option<PublicKey>,
) -> Result<(Confirmation, PublicKey)> {
    verify_confirmation_json_under(text, operator.map(KeySchedule::genesis).as_ref())
}

/// Verifies the text of a confirmation file under the trusted genesis key and the chain known
/// beside it (`trusted`; None: the file's own key, which proves only that it is consistent):
/// the header under the key for its height, following the file's `key_chain` if it has one
/// ([`file_keys`]). Returns the confirmation and the key that signed its header.
pub fn verify_confirmation_json_under(
    text: &str,
    trusted: Option<&KeySchedule>,
) -> Result<(Confirmation, PublicKey)> {
    let fail = |what: String| Error::Verify(what);
    let file: ConfirmationFile = serde_json::from_str(text)
        .map_err(|e| fail(format!("not a tally confirmation file: {e}")))?;
    if file.format != CONFIRMATION_FORMAT {
        return Err(fail(format!(
            "format is {:?}, expected {CONFIRMATION_FORMAT:?}",
            file.format
        )));
    }
    let bytes = hex::decode(&file.confirmation_hex)
        .map_err(|e| fail(format!("confirmation_hex is not hex: {e}")))?;
    let c = Confirmation::decode(&bytes)
        .map_err(|e| fail(format!("confirmation_hex does not decode: {e}")))?;
    if c.replayed {
        return Err(fail(
            "confirmation_hex has its flags byte set; in a file it is always 0".into(),
        ));
    }
    let named = parse_public_key(&file.operator_public_key)
        .map_err(|e| fail(format!("operator_public_key: {e}")))?;
    let keys = file_keys(trusted, &named, &file.key_chain)?;
    let operator = file_header_key(&keys, &c.header)?;
    verify_confirmation(&c, &operator).map_err(|e| match e {
        tally_core::Error::Verify(what) => fail(what),
        other => fail(other.to_string()),
    })?;
    if named != operator {
        return Err(fail(format!(
            "the file names operator key {}, but the confirmation was checked against {}",
            file.operator_public_key,
            to_hex(&operator)
        )));
    }

    // The bytes are sound; now the readable fields must say the same thing.
    let expected = ConfirmationFile {
        replayed: file.replayed,
        key_chain: file.key_chain.clone(),
        ..ConfirmationFile::new(&c, &named)
    };
    if file != expected {
        let section = if file.request != expected.request {
            "request"
        } else if file.receipt != expected.receipt {
            "receipt"
        } else if file.header != expected.header {
            "header"
        } else if file.proof != expected.proof {
            "proof"
        } else {
            "confirmation_hex"
        };
        return Err(fail(format!(
            "the readable \"{section}\" fields disagree with confirmation_hex (the file was edited)"
        )));
    }
    Ok((c, operator))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::build_request;
    use crate::keys::{generate_key, public_key};
    use ed25519_dalek::SigningKey;
    use tally_core::batch::prepare_apply;
    use tally_core::crypto::{key_id, OperatorKey};
    use tally_core::ports::MemStore;
    use tally_core::sequencer::{Sequencer, SequencerConfig, Submitted};
    use tally_core::state::LedgerMeta;
    use tally_wire::Op;

    /// Real confirmations from a sequenced, applied and signed batch of three requests
    /// (deposit, transfer, withdraw), and the operator key that signed them.
    pub(crate) fn confirmations() -> (Vec<Confirmation>, SigningKey) {
        confirmations_with([
            generate_key(),
            generate_key(),
            generate_key(),
            generate_key(),
        ])
    }

    /// The confirmations of one batch (deposit, transfer, withdraw) signed with `keys`: the
    /// operator's, the deposit key, Alice's and Bob's.
    fn confirmations_with(keys: [SigningKey; 4]) -> (Vec<Confirmation>, SigningKey) {
        let chain_id = [42; 32];
        let [operator, deposit, alice, bob] = keys;
        let operator_key = OperatorKey::new(operator.clone());
        let mut sequencer = Sequencer::new(
            SequencerConfig {
                chain_id,
                operator_key_id: key_id(&public_key(&operator)),
                batch_requests_max: 100,
                accounts_cached_max: 100,
                recent_heights_kept: 10,
            },
            LedgerMeta::genesis(),
        );
        let mut store = MemStore::default();
        let requests = [
            build_request(&deposit, chain_id, Op::Deposit, 1, public_key(&alice), 100),
            build_request(&alice, chain_id, Op::Transfer, 2, public_key(&bob), 30),
            build_request(&alice, chain_id, Op::Withdraw, 3, [0; 32], 5),
        ];
        for r in requests {
            let outcome = sequencer
                .submit(r, 0, 1_700_000_000_000, &mut store)
                .unwrap();
            assert!(matches!(outcome, Submitted::Accepted { .. }), "{outcome:?}");
        }
        let body = sequencer.seal(1).unwrap();
        let write = prepare_apply(
            &body,
            body.encode(),
            &LedgerMeta::genesis(),
            &mut store,
            &operator_key,
        )
        .unwrap();
        let confirmations = body.confirmations(&write.signed_header).into_iter();
        let requests = confirmations.map(|c| match c {
            tally_core::batch::Confirmed::Request(c) => *c,
            tally_core::batch::Confirmed::Envelope(_)
            | tally_core::batch::Confirmed::Rotation(_) => {
                unreachable!("requests only")
            }
        });
        (requests.collect(), operator)
    }

    #[test]
    fn file_round_trip_verifies() {
        let (cs, operator) = confirmations();
        let op = public_key(&operator);
        let dir = tempfile::tempdir().unwrap();
        for (i, c) in cs.iter().enumerate() {
            let path = dir.path().join(format!("c{i}.json"));
            write_confirmation_file(&path, c, &op).unwrap();
            assert_eq!(&verify_confirmation_file(&path, Some(op)).unwrap(), c);
            assert_eq!(&verify_confirmation_file(&path, None).unwrap(), c);
        }
        // The value form and the CLI form (with "replayed") verify too.
        let value = confirmation_to_json(&cs[1], &op);
        assert_eq!(value["request"]["op"], "transfer");
        assert_eq!(value["request"]["id"], "2");
        assert_eq!(value["receipt"]["signer_balance"], 70);
        let (c, key) = verify_confirmation_json(&value.to_string(), None).unwrap();
        assert_eq!((&c, key), (&cs[1], op));
        let replayed = Confirmation {
            replayed: true,
            ..cs[1].clone()
        };
        let cli = ConfirmationFile::with_replayed(&replayed, &op);
        assert_eq!(cli.replayed, Some(true));
        assert_eq!(
            cli.confirmation_hex,
            ConfirmationFile::new(&cs[1], &op).confirmation_hex
        );
        let (c, _) = verify_confirmation_json(&cli.to_json_pretty(), Some(op)).unwrap();
        assert_eq!(c, cs[1]);
    }

    /// Every edit must fail, whether to the readable fields or to the bytes.
    #[test]
    fn edited_files_fail() {
        let (cs, operator) = confirmations();
        let op = public_key(&operator);
        let good = confirmation_to_json(&cs[1], &op);
        let check = |edit: &dyn Fn(&mut serde_json::Value), operator: Option<PublicKey>| {
            let mut v = good.clone();
            edit(&mut v);
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("c.json");
            std::fs::write(&path, v.to_string()).unwrap();
            let err = verify_confirmation_file(&path, operator).unwrap_err();
            assert!(matches!(err, Error::Verify(_)), "{err}");
        };
        let readable_edits: &[fn(&mut serde_json::Value)] = &[
            |v| v["receipt"]["to_balance"] = 1_000_000.into(),
            |v| v["request"]["amount"] = 31.into(),
            |v| v["request"]["id"] = "3".into(),
            |v| v["request"]["op"] = "deposit".into(),
            |v| v["header"]["height"] = 2.into(),
            |v| v["header"]["time_unix_ms"] = 1.into(),
            |v| v["proof"]["path"][0] = hex::encode([0u8; 32]).into(),
            |v| v["format"] = "tally-confirmation-v2".into(),
            |v| v["replayed"] = "yes".into(),
            |v| v["extra"] = 1.into(),
            |v| {
                v.as_object_mut().unwrap().remove("receipt");
            },
        ];
        for edit in readable_edits {
            check(edit, Some(op));
            check(edit, None);
        }

        // Flip each byte of the authoritative bytes in turn: every one must be caught, by
        // decoding, by a hash, by a signature or by the cleared flags byte.
        let bytes = cs[1].encode();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x01;
            check(
                &|v| v["confirmation_hex"] = hex::encode(&b).into(),
                Some(op),
            );
        }

        // A consistent file signed by a forged operator verifies against its own key, but not
        // against the operator key a profile holds.
        let forger = generate_key();
        let mut forged = cs[1].clone();
        forged.header = OperatorKey::new(forger.clone()).sign_header(tally_wire::Header {
            operator_key_id: key_id(&public_key(&forger)),
            ..forged.header.header.clone()
        });
        // The header changed its key id, so the proof still holds; only the key differs.
        let forged_json = confirmation_to_json(&forged, &public_key(&forger)).to_string();
        verify_confirmation_json(&forged_json, None).unwrap();
        let err = verify_confirmation_json(&forged_json, Some(op)).unwrap_err();
        assert!(matches!(err, Error::Verify(_)), "{err}");
        // And a genuine file whose operator field was swapped fails even against the real key.
        check(
            &|v| v["operator_public_key"] = hex::encode(public_key(&forger)).into(),
            Some(op),
        );
    }

    /// After two rotations: the file names the key for its height and carries the chain,
    /// which verifies from the genesis key and fails with any link changed, reordered or
    /// dropped.
    #[test]
    fn a_file_after_rotations_carries_its_key_chain() {
        let r = crate::key_chain::tests::rotated();
        let c = &r.confirmations[1];
        let signer = r.keys[2].public();
        let text = ConfirmationFile::new(c, &signer)
            .with_key_chain(&r.links)
            .to_json_pretty();
        let (_, key) = verify_confirmation_json(&text, Some(r.genesis)).unwrap();
        assert_eq!(key, signer);
        crate::key_chain::tests::check_carried_chain(&text, &r, &|text, trusted| {
            verify_confirmation_json_under(text, trusted).map(|_| ())
        });
        // Naming the genesis key instead of the header's fails.
        let named_genesis = ConfirmationFile::new(c, &r.genesis)
            .with_key_chain(&r.links)
            .to_json_pretty();
        assert!(verify_confirmation_json(&named_genesis, Some(r.genesis)).is_err());
    }

    /// `wire/testdata/confirmation-v1.json`: the transfer of a batch of a deposit, a transfer
    /// and a withdrawal, every key from a fixed seed (operator 0x07, deposit 0x08, Alice 0x09,
    /// Bob 0x0a, 32 bytes each). Rewritten with `TALLY_WRITE_VECTORS=1`.
    #[test]
    fn the_confirmation_vector_is_what_the_code_writes_and_an_outsider_verifies() {
        let keys = [7u8, 8, 9, 10].map(|b| SigningKey::from_bytes(&[b; 32]));
        let (confirmations, operator) = confirmations_with(keys);
        let operator = public_key(&operator);
        let text = ConfirmationFile::new(&confirmations[1], &operator).to_json_pretty();
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../wire/testdata/confirmation-v1.json"
        );
        if std::env::var("TALLY_WRITE_VECTORS").is_ok() {
            std::fs::write(path, &text).unwrap();
        }
        assert_eq!(
            std::fs::read_to_string(path).unwrap(),
            text,
            "the vector is stale"
        );
        verify_confirmation_json(&text, Some(operator)).unwrap();
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../wire/testdata/verify_confirmation.py"
        );
        crate::consistency::tests::outsider_agrees(
            script,
            &text,
            &operator,
            "confirmation_hex",
            2 * (209 + 70),
        );
    }
}
