//! Envelopes from the client's side: operations from JSON lines, signing, and the envelope
//! confirmation file (`tally envelope --out`, checked by `tally verify`).
//!
//! One operation per line: `{"op": "transfer", "to": "<hex key>", "amount": 5, "id": 7}`;
//! `"deposit"` the same (signed by a deposit key), `"withdraw"` without `"to"`. `id` is a
//! number or a decimal string (u128 ids do not fit every JSON reader's numbers); blank lines
//! and lines starting with `#` are skipped.

use std::path::Path;

use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tally_core::crypto::{envelope_hash, header_hash, sign_envelope};
use tally_core::key_chain::KeySchedule;
use tally_core::verify::verify_envelope_confirmation;
use tally_wire::{
    Envelope, EnvelopeConfirmation, Hash, KeyLink, Op, Operation, PublicKey, SignedHeader,
    ENVELOPE_OPS_MAX,
};

use crate::key_chain::{file_header_key, file_keys, hex_links};
use crate::{parse_hash, parse_public_key, public_key, to_hex, Error, Result};

/// The `format` of an envelope confirmation file.
pub const ENVELOPE_CONFIRMATION_FORMAT: &str = "tally-envelope-confirmation-v1";

/// Parses operations, one JSON object per line; errors name the line.
pub fn parse_operations(text: &str) -> Result<Vec<Operation>> {
    let mut ops = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let invalid = |reason: String| Error::Invalid {
            what: "operation",
            reason: format!("line {}: {reason}", n + 1),
        };
        let value: Value = serde_json::from_str(line).map_err(|e| invalid(e.to_string()))?;
        ops.push(parse_operation(&value).map_err(invalid)?);
        if ops.len() > ENVELOPE_OPS_MAX as usize {
            return Err(invalid(format!("more than {ENVELOPE_OPS_MAX} operations")));
        }
    }
    if ops.is_empty() {
        return Err(Error::Invalid {
            what: "operations file",
            reason: "holds no operation".into(),
        });
    }
    Ok(ops)
}

/// One JSON operation: `op` is deposit, transfer, withdraw, reserve, post, void or renew;
/// `id` always; `to` and `amount` as the kind needs; `timeout_ms` for reserve and renew;
/// `reserve_id` for post, void and renew; `party` (reserve: who else may act on it) and
/// `owner` (post, void, renew: whose reserve, if not the signer's) as hex public keys.
fn parse_operation(v: &Value) -> std::result::Result<Operation, String> {
    let op = match v.get("op").and_then(Value::as_str) {
        Some("deposit") => Op::Deposit,
        Some("transfer") => Op::Transfer,
        Some("withdraw") => Op::Withdraw,
        Some("reserve") => Op::Reserve,
        Some("post") => Op::Post,
        Some("void") => Op::Void,
        Some("renew") => Op::Renew,
        other => {
            return Err(format!(
                "\"op\" must be deposit, transfer, withdraw, reserve, post, void or renew, not {other:?}"
            ))
        }
    };
    let id = integer(v, "id")?
        .ok_or("\"id\" must be a non-negative integer (a number or a decimal string)")?;
    let amount = v
        .get("amount")
        .map(|a| {
            a.as_u64()
                .ok_or("\"amount\" must be a non-negative integer")
        })
        .transpose()?;
    let key = |name: &str| -> std::result::Result<Option<[u8; 32]>, String> {
        v.get(name)
            .map(|k| {
                let hex = k
                    .as_str()
                    .ok_or(format!("\"{name}\" must be a hex public key"))?;
                parse_public_key(hex).map_err(|e| e.to_string())
            })
            .transpose()
    };
    let mut o = Operation::single(op, id, [0; 32], amount.unwrap_or(0));
    match op {
        Op::Withdraw if v.get("to").is_some() => return Err("a withdrawal has no \"to\"".into()),
        Op::Withdraw => {}
        Op::Deposit | Op::Transfer | Op::Reserve => {
            o.to = key("to")?.ok_or(format!("a {} needs \"to\"", op.name()))?;
        }
        _ => {
            o.reserve_id =
                integer(v, "reserve_id")?.ok_or(format!("a {} needs \"reserve_id\"", op.name()))?;
            o.party = key("owner")?.unwrap_or([0; 32]);
        }
    }
    if op == Op::Reserve {
        o.party = key("party")?.unwrap_or([0; 32]);
    }
    if matches!(op, Op::Reserve | Op::Renew) {
        o.timeout_ms = v
            .get("timeout_ms")
            .and_then(Value::as_u64)
            .ok_or(format!("a {} needs \"timeout_ms\"", op.name()))?;
    }
    if !matches!(op, Op::Post | Op::Void | Op::Renew) && o.amount == 0 {
        return Err("\"amount\" must be a positive integer".into());
    }
    Ok(o)
}

/// An integer field given as a JSON number or a decimal string.
fn integer(v: &Value, name: &str) -> std::result::Result<Option<u128>, String> {
    let parsed = match v.get(name) {
        None => return Ok(None),
        Some(Value::Number(n)) => n.as_u64().map(u128::from),
        Some(Value::String(s)) => s.parse().ok(),
        _ => None,
    };
    parsed.map(Some).ok_or(format!(
        "\"{name}\" must be a non-negative integer (a number or a decimal string)"
    ))
}

/// Builds and signs an envelope.
pub fn build_envelope(
    key: &SigningKey,
    chain_id: Hash,
    atomic: bool,
    ops: Vec<Operation>,
) -> Envelope {
    let mut envelope = Envelope {
        chain_id,
        signer: public_key(key),
        atomic,
        ops,
        signature: [0; 64],
    };
    sign_envelope(key, &mut envelope);
    envelope
}

/// An envelope confirmation file: the envelope and its confirmation (hex, what `tally verify`
/// checks), with every operation's outcome spelled out for readers. `operator_public_key` is
/// the key that signed the header: the genesis key until the ledger rotates (PROTOCOL.md
/// §4.14), then the key for the header's height, which `key_chain` leads to.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvelopeFile {
    pub format: String,
    pub operator_public_key: String,
    pub envelope_hex: String,
    pub confirmation_hex: String,
    pub envelope_hash: String,
    pub signer: String,
    pub atomic: bool,
    pub height: u64,
    pub header_hash: String,
    pub first_leaf: u32,
    pub operations: Vec<OperationOutcome>,
    /// The operator key chain up to the header's key (PROTOCOL.md §4.14, §11), hex of each
    /// link; absent while the ledger has not rotated before the header.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub key_chain: Vec<String>,
    /// Present in the CLI's output, absent from files it writes; informational, never checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replayed: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperationOutcome {
    pub index: u16,
    pub op: String,
    pub id: String,
    pub to: String,
    pub amount: u64,
    /// The error code of an operation that did not apply (independent envelopes), else null.
    pub failed: Option<String>,
    pub signer_balance: u64,
    pub to_balance: u64,
    /// Two-phase kinds only (absent when zero): see PROTOCOL.md §4.7.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub timeout_ms: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reserve_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub party: String,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl OperationOutcome {
    /// Operation `op` as its receipt `r` says it went.
    pub fn new(op: &Operation, r: &tally_wire::Receipt) -> OperationOutcome {
        OperationOutcome {
            index: r.op_index,
            op: op.op.name().into(),
            id: op.id.to_string(),
            to: to_hex(&op.to),
            amount: op.amount,
            failed: r.failed.map(|code| code.name().into()),
            signer_balance: r.signer_balance,
            to_balance: r.to_balance,
            timeout_ms: op.timeout_ms,
            reserve_id: if op.reserve_id == 0 {
                String::new()
            } else {
                op.reserve_id.to_string()
            },
            party: if op.party == [0; 32] {
                String::new()
            } else {
                to_hex(&op.party)
            },
        }
    }
}

impl EnvelopeFile {
    pub fn new(e: &Envelope, c: &EnvelopeConfirmation, operator: &PublicKey) -> EnvelopeFile {
        let operations = e
            .ops
            .iter()
            .zip(&c.receipts)
            .map(|(op, r)| OperationOutcome::new(op, r))
            .collect();
        let unreplayed = EnvelopeConfirmation {
            replayed: false,
            ..c.clone()
        };
        EnvelopeFile {
            format: ENVELOPE_CONFIRMATION_FORMAT.into(),
            operator_public_key: to_hex(operator),
            envelope_hex: to_hex(&e.encode()),
            confirmation_hex: to_hex(&unreplayed.encode()),
            envelope_hash: to_hex(&c.envelope_hash),
            signer: to_hex(&e.signer),
            atomic: e.atomic,
            height: c.header.header.height,
            header_hash: to_hex(&header_hash(&c.header.header)),
            first_leaf: c.proof.first,
            operations,
            key_chain: Vec::new(),
            replayed: None,
        }
    }

    /// The same, carrying `links` (from the genesis key to the key that signed the header).
    pub fn with_key_chain(self, links: &[KeyLink]) -> EnvelopeFile {
        EnvelopeFile {
            key_chain: hex_links(links),
            ..self
        }
    }

    pub fn to_json_pretty(&self) -> String {
        let mut text = serde_json::to_string_pretty(self).expect("plain structs serialize");
        text.push('\n');
        text
    }
}

/// Writes an envelope confirmation file atomically (write, sync, rename).
pub fn write_envelope_file(path: &Path, file: &EnvelopeFile) -> Result<()> {
    crate::confirmation::write_atomically(path, &file.to_json_pretty())
}

/// Verifies an envelope confirmation file's text: the envelope and confirmation it carries (the
/// readable fields must be theirs), against the genesis key `operator` or, when None, the key
/// the file names.
pub fn verify_envelope_json(
    text: &str,
    operator: Option<PublicKey>,
) -> Result<(Envelope, EnvelopeConfirmation)> {
    verify_envelope_json_under(text, operator.map(KeySchedule::genesis).as_ref())
}

/// The same under a trusted genesis key and the chain known beside it, following the file's
/// `key_chain` if it has one ([`file_keys`]).
pub fn verify_envelope_json_under(
    text: &str,
    trusted: Option<&KeySchedule>,
) -> Result<(Envelope, EnvelopeConfirmation)> {
    let bad = |why: String| Error::Verify(why);
    let file: EnvelopeFile = serde_json::from_str(text)
        .map_err(|e| bad(format!("not an envelope confirmation file: {e}")))?;
    if file.format != ENVELOPE_CONFIRMATION_FORMAT {
        return Err(bad(format!("unknown format {:?}", file.format)));
    }
    let named = parse_hash(&file.operator_public_key, "operator_public_key")?;
    let bytes = |text: &str| hex::decode(text).map_err(|e| bad(format!("hex: {e}")));
    let envelope =
        Envelope::decode(&bytes(&file.envelope_hex)?).map_err(|e| bad(format!("envelope: {e}")))?;
    let c = EnvelopeConfirmation::decode(&bytes(&file.confirmation_hex)?)
        .map_err(|e| bad(format!("confirmation: {e}")))?;
    let keys = file_keys(trusted, &named, &file.key_chain)?;
    let operator = file_header_key(&keys, &c.header)?;
    verify_envelope_confirmation(&envelope, &c, &operator).map_err(|e| bad(e.to_string()))?;
    let mut expected = EnvelopeFile::new(&envelope, &c, &operator);
    expected.replayed = file.replayed;
    expected.key_chain = file.key_chain.clone();
    if serde_json::to_value(&expected).ok() != serde_json::to_value(&file).ok() {
        return Err(bad(
            "the readable fields differ from the envelope and confirmation they describe, or \
             operator_public_key is not the key that signed the header"
                .into(),
        ));
    }
    if envelope_hash(&envelope) != c.envelope_hash {
        return Err(bad("the confirmation is for another envelope".into()));
    }
    Ok((envelope, c))
}

/// The `format` of a reserve expiry's confirmation file (`tally lookup --receipt --out`).
pub const EXPIRY_CONFIRMATION_FORMAT: &str = "tally-expiry-confirmation-v1";

/// The proof that a reserve expired (`tally lookup --receipt` of an expiry's receipt), checked
/// by `tally verify`. `owner_balance` is the owner's balance after the expiry (the receipt's
/// `signer_balance`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpiryFile {
    pub format: String,
    pub operator_public_key: String,
    pub confirmation_hex: String,
    pub owner: String,
    pub reserve_id: String,
    pub height: u64,
    pub index: u32,
    pub header_hash: String,
    pub receipt_hash: String,
    pub owner_balance: u64,
    /// The operator key chain up to the header's key (PROTOCOL.md §4.14, §11); absent while
    /// the ledger has not rotated before the header.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub key_chain: Vec<String>,
}

impl ExpiryFile {
    pub fn new(c: &tally_wire::ExpiryConfirmation, operator: &PublicKey) -> ExpiryFile {
        let r = &c.receipt;
        ExpiryFile {
            format: EXPIRY_CONFIRMATION_FORMAT.into(),
            operator_public_key: to_hex(operator),
            confirmation_hex: to_hex(&c.encode()),
            owner: to_hex(&c.owner),
            reserve_id: c.id.to_string(),
            height: r.height,
            index: r.index,
            header_hash: to_hex(&header_hash(&c.header.header)),
            receipt_hash: to_hex(&tally_core::merkle::leaf_hash(&r.encode())),
            owner_balance: r.signer_balance,
            key_chain: Vec::new(),
        }
    }

    /// The same, carrying `links` (from the genesis key to the key that signed the header).
    pub fn with_key_chain(self, links: &[KeyLink]) -> ExpiryFile {
        ExpiryFile {
            key_chain: hex_links(links),
            ..self
        }
    }

    pub fn to_json_pretty(&self) -> String {
        let mut text = serde_json::to_string_pretty(self).expect("plain structs serialize");
        text.push('\n');
        text
    }
}

/// Verifies an expiry confirmation file's text under the genesis key `operator` (see
/// [`verify_proof_file`]).
pub fn verify_expiry_json(
    text: &str,
    operator: Option<PublicKey>,
) -> Result<tally_wire::ExpiryConfirmation> {
    verify_expiry_json_under(text, operator.map(KeySchedule::genesis).as_ref())
}

/// The same under a trusted genesis key and the chain known beside it.
pub fn verify_expiry_json_under(
    text: &str,
    trusted: Option<&KeySchedule>,
) -> Result<tally_wire::ExpiryConfirmation> {
    verify_proof_file::<ExpiryFile>(text, trusted)
}

/// The `format` of one envelope operation's confirmation file (`tally lookup --out`).
pub const OPERATION_CONFIRMATION_FORMAT: &str = "tally-operation-confirmation-v1";

/// One operation of an envelope with its proof (`tally lookup`), checked by `tally verify`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperationFile {
    pub format: String,
    pub operator_public_key: String,
    pub confirmation_hex: String,
    pub envelope_hash: String,
    pub signer: String,
    pub height: u64,
    pub index: u32,
    pub header_hash: String,
    pub operation: OperationOutcome,
    /// The operator key chain up to the header's key (PROTOCOL.md §4.14, §11); absent while
    /// the ledger has not rotated before the header.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub key_chain: Vec<String>,
}

impl OperationFile {
    pub fn new(c: &tally_wire::OperationConfirmation, operator: &PublicKey) -> OperationFile {
        let (e, r) = (&c.envelope, &c.receipt);
        let op = &e.ops[r.op_index as usize];
        OperationFile {
            format: OPERATION_CONFIRMATION_FORMAT.into(),
            operator_public_key: to_hex(operator),
            confirmation_hex: to_hex(&c.encode()),
            envelope_hash: to_hex(&r.request_hash),
            signer: to_hex(&e.signer),
            height: r.height,
            index: r.index,
            header_hash: to_hex(&header_hash(&c.header.header)),
            operation: OperationOutcome::new(op, r),
            key_chain: Vec::new(),
        }
    }

    /// The same, carrying `links` (from the genesis key to the key that signed the header).
    pub fn with_key_chain(self, links: &[KeyLink]) -> OperationFile {
        OperationFile {
            key_chain: hex_links(links),
            ..self
        }
    }

    pub fn to_json_pretty(&self) -> String {
        let mut text = serde_json::to_string_pretty(self).expect("plain structs serialize");
        text.push('\n');
        text
    }
}

/// Verifies an operation confirmation file's text under the genesis key `operator` (see
/// [`verify_proof_file`]).
pub fn verify_operation_json(
    text: &str,
    operator: Option<PublicKey>,
) -> Result<tally_wire::OperationConfirmation> {
    verify_operation_json_under(text, operator.map(KeySchedule::genesis).as_ref())
}

/// The same under a trusted genesis key and the chain known beside it.
pub fn verify_operation_json_under(
    text: &str,
    trusted: Option<&KeySchedule>,
) -> Result<tally_wire::OperationConfirmation> {
    verify_proof_file::<OperationFile>(text, trusted)
}

/// A file that carries one encoded confirmation beside readable fields derived from it.
trait ProofFile: Serialize + serde::de::DeserializeOwned {
    type Confirmation;
    const FORMAT: &'static str;
    const KIND: &'static str;
    fn format(&self) -> &str;
    fn operator_public_key(&self) -> &str;
    fn confirmation_hex(&self) -> &str;
    fn key_chain(&self) -> &[String];
    fn header(c: &Self::Confirmation) -> &SignedHeader;
    fn decode(bytes: &[u8]) -> std::result::Result<Self::Confirmation, tally_wire::WireError>;
    fn verify(c: &Self::Confirmation, operator: &PublicKey) -> tally_core::Result<()>;
    fn new(c: &Self::Confirmation, operator: &PublicKey, key_chain: Vec<String>) -> Self;
}

/// Verifies a proof file's text under the trusted genesis key and chain (else the key the
/// file names): its format, its confirmation (the header under the key for its height,
/// following the file's `key_chain`), and that its readable fields are those of the bytes.
fn verify_proof_file<F: ProofFile>(
    text: &str,
    trusted: Option<&KeySchedule>,
) -> Result<F::Confirmation> {
    let bad = |why: String| Error::Verify(why);
    let file: F = serde_json::from_str(text)
        .map_err(|e| bad(format!("not an {} confirmation file: {e}", F::KIND)))?;
    if file.format() != F::FORMAT {
        return Err(bad(format!("unknown format {:?}", file.format())));
    }
    let named = parse_hash(file.operator_public_key(), "operator_public_key")?;
    let bytes = hex::decode(file.confirmation_hex()).map_err(|e| bad(format!("hex: {e}")))?;
    let c = F::decode(&bytes).map_err(|e| bad(format!("confirmation: {e}")))?;
    let keys = file_keys(trusted, &named, file.key_chain())?;
    let operator = file_header_key(&keys, F::header(&c))?;
    F::verify(&c, &operator).map_err(|e| bad(e.to_string()))?;
    let expected = F::new(&c, &operator, file.key_chain().to_vec());
    if serde_json::to_value(&expected).ok() != serde_json::to_value(&file).ok() {
        return Err(bad(
            "the readable fields differ from the confirmation they describe, or \
             operator_public_key is not the key that signed the header"
                .into(),
        ));
    }
    Ok(c)
}

macro_rules! proof_file {
    ($file:ty, $conf:ty, $format:expr, $kind:expr, $verify:path) => {
        impl ProofFile for $file {
            type Confirmation = $conf;
            const FORMAT: &'static str = $format;
            const KIND: &'static str = $kind;
            fn format(&self) -> &str {
                &self.format
            }
            fn operator_public_key(&self) -> &str {
                &self.operator_public_key
            }
            fn confirmation_hex(&self) -> &str {
                &self.confirmation_hex
            }
            fn key_chain(&self) -> &[String] {
                &self.key_chain
            }
            fn header(c: &$conf) -> &SignedHeader {
                &c.header
            }
            fn decode(bytes: &[u8]) -> std::result::Result<$conf, tally_wire::WireError> {
                <$conf>::decode(bytes)
            }
            fn verify(c: &$conf, operator: &PublicKey) -> tally_core::Result<()> {
                $verify(c, operator)
            }
            fn new(c: &$conf, operator: &PublicKey, key_chain: Vec<String>) -> Self {
                Self {
                    key_chain,
                    ..<$file>::new(c, operator)
                }
            }
        }
    };
}

proof_file!(
    OperationFile,
    tally_wire::OperationConfirmation,
    OPERATION_CONFIRMATION_FORMAT,
    "operation",
    tally_core::verify::verify_operation_confirmation
);
proof_file!(
    ExpiryFile,
    tally_wire::ExpiryConfirmation,
    EXPIRY_CONFIRMATION_FORMAT,
    "expiry",
    tally_core::verify::verify_expiry_confirmation
);
