//! The archive's objects: their keys, their bytes, and the checks a reader makes on them.
//!
//! The archive (PROTOCOL.md, "The archive") is written by the leader into object storage and
//! read by `tally-server restore` and `tally audit`. This module is the one definition of its
//! object names and encodings; IO lives in `tally-storage` (`bucket.rs`).
//!
//! - `tally-archive`: the marker, written once: which ledger (chain id) and operator key the
//!   bucket belongs to, so that no server archives into another ledger's bucket.
//! - `batch/<height, 20 digits>`: one committed batch, create-only: the signed header (256
//!   bytes) followed by the encoded body ([`BatchBody::encode`]).
//! - `tile/...`: the C2SP tlog-tiles log whose leaf `i` is the signed header at height `i + 1`
//!   ([`crate::tlog`]).
//! - `checkpoint`: the C2SP signed note over the log's size and root, written last.
//! - `keychain/<number, 20 digits>`: the link of the ledger's operator key rotation `number`
//!   (PROTOCOL.md §4.14), create-only, written before the checkpoint that covers its height.
//! - `checkpoint-signatures/<N>[.p/<W>]`: a threshold operator's signatures of the checkpoints
//!   of sizes `256 N + 1 ..`, 64 bytes each ([`signature_bundle_key`]); no replica of such an
//!   operator can sign a checkpoint again on its own, so a restore takes them from here.

use tally_wire::{Hash, PublicKey, Signature, SignedHeader, SIGNED_HEADER_BYTES};

/// Bytes of one Ed25519 signature.
const SIGNATURE_BYTES: usize = 64;

use crate::batch::BatchBody;
use crate::crypto::{header_hash, verify_header};
use crate::merkle::Tree;
use crate::{Error, Result};

/// Key of the marker object.
pub const MARKER_KEY: &str = "tally-archive";
/// Key of the checkpoint (C2SP signed note).
pub const CHECKPOINT_KEY: &str = "checkpoint";
/// Prefix of the batch objects.
pub const BATCH_PREFIX: &str = "batch/";
/// Prefix of the key chain's links.
pub const KEY_LINK_PREFIX: &str = "keychain/";
/// First line of the marker; the number is the layout version.
const MARKER_MAGIC: &str = "tally-archive 1";

/// Key of the batch object at `height`, zero-padded to 20 digits (keys sort in height order,
/// though readers derive keys from the checkpoint's size and never rely on a listing).
pub fn batch_key(height: u64) -> String {
    assert!(height >= 1, "heights start at 1");
    format!("{BATCH_PREFIX}{height:020}")
}

/// Key of the link of rotation `number` (from 1), zero-padded to 20 digits. Readers fetch
/// `keychain/1`, `keychain/2`, ... until one is missing: the chain needs no listing.
pub fn key_link_key(number: u32) -> String {
    assert!(number >= 1, "rotations count from 1");
    format!("{KEY_LINK_PREFIX}{number:020}")
}

/// Prefix of a threshold operator's checkpoint signature bundles.
pub const SIGNATURE_BUNDLE_PREFIX: &str = "checkpoint-signatures/";

/// Key of signature bundle `index` holding `width` signatures (1..=256): those of the
/// checkpoints of sizes `256 index + 1 ..= 256 index + width`, named as tlog-tiles names an
/// entry bundle (`<N>`, and `.p/<W>` while partial).
pub fn signature_bundle_key(index: u64, width: u64) -> String {
    format!(
        "{SIGNATURE_BUNDLE_PREFIX}{}",
        crate::tlog::index_path(index, width)
    )
}

/// A signature bundle's bytes: the signatures back to back.
pub fn encode_signature_bundle(signatures: &[Signature]) -> Vec<u8> {
    assert!((1..=crate::tlog::TILE_WIDTH as usize).contains(&signatures.len()));
    signatures.concat()
}

/// The `width` signatures of a signature bundle object.
pub fn decode_signature_bundle(bytes: &[u8], width: u64) -> Result<Vec<Signature>> {
    if bytes.len() as u64 != width * SIGNATURE_BYTES as u64 {
        return Err(Error::Verify(format!(
            "a bundle of {width} checkpoint signatures is {} bytes, not {}",
            bytes.len(),
            width * SIGNATURE_BYTES as u64
        )));
    }
    Ok(bytes
        .chunks_exact(SIGNATURE_BYTES)
        .map(|c| c.try_into().expect("64 bytes"))
        .collect())
}

/// The height a batch key names, if it is one.
pub fn parse_batch_key(key: &str) -> Option<u64> {
    let digits = key.strip_prefix(BATCH_PREFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|h| *h >= 1)
}

/// The batch object's bytes: signed header ‖ encoded body.
pub fn encode_batch(signed: &SignedHeader, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SIGNED_HEADER_BYTES + body.len());
    out.extend_from_slice(&signed.encode());
    out.extend_from_slice(body);
    out
}

/// A decoded batch object.
#[derive(Debug, Clone)]
pub struct ArchivedBatch {
    pub signed: SignedHeader,
    pub body: BatchBody,
}

/// Decodes a batch object; the body's header must be the signed header's.
pub fn decode_batch(bytes: &[u8]) -> Result<ArchivedBatch> {
    if bytes.len() < SIGNED_HEADER_BYTES {
        return Err(Error::Verify(format!(
            "batch object of {} bytes is shorter than a signed header",
            bytes.len()
        )));
    }
    let signed = SignedHeader::decode(&bytes[..SIGNED_HEADER_BYTES])?;
    let body = BatchBody::decode(&bytes[SIGNED_HEADER_BYTES..])?;
    if body.header != signed.header {
        return Err(Error::Verify(
            "the body's header differs from the signed header".into(),
        ));
    }
    Ok(ArchivedBatch { signed, body })
}

/// Checks one archived batch on its own and against its predecessor: height, the hash link,
/// the operator's signature, the request count and the Merkle root over the receipts. Returns
/// the header's hash (the next batch's `prev_hash`). The replay of balances is
/// [`crate::batch::replay_batch`].
pub fn verify_batch(
    batch: &ArchivedBatch,
    height: u64,
    prev_hash: &Hash,
    operator: &PublicKey,
) -> Result<Hash> {
    let h = &batch.signed.header;
    let fail = |what: &str| Err(Error::Verify(format!("batch {height}: {what}")));
    if h.height != height {
        return fail(&format!("header says height {}", h.height));
    }
    if &h.prev_hash != prev_hash {
        return fail("previous-header hash does not match the chain");
    }
    if let Err(e) = verify_header(operator, &batch.signed) {
        return fail(&e.to_string());
    }
    if h.request_count as usize != batch.body.leaf_count() {
        return fail("request count does not match the receipts");
    }
    if Tree::new(&batch.body.leaf_hashes()).root() != h.merkle_root {
        return fail("Merkle root does not match the receipts");
    }
    Ok(header_hash(h))
}

/// The marker object: the ledger a bucket belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    pub chain_id: Hash,
    pub operator: PublicKey,
}

impl Marker {
    /// `tally-archive 1\nchain_id <hex>\noperator_key <hex>\n`
    pub fn encode(&self) -> Vec<u8> {
        format!(
            "{MARKER_MAGIC}\nchain_id {}\noperator_key {}\n",
            hex::encode(self.chain_id),
            hex::encode(self.operator)
        )
        .into_bytes()
    }

    pub fn decode(bytes: &[u8]) -> Result<Marker> {
        let bad = |why: &str| Error::Verify(format!("archive marker: {why}"));
        let text = std::str::from_utf8(bytes).map_err(|_| bad("not UTF-8"))?;
        let mut lines = text.split('\n');
        if lines.next() != Some(MARKER_MAGIC) {
            return Err(bad("not a tally archive marker of layout 1"));
        }
        let mut field = |name: &str| -> Result<[u8; 32]> {
            let line = lines.next().ok_or_else(|| bad("truncated"))?;
            let value = line
                .strip_prefix(name)
                .and_then(|v| v.strip_prefix(' '))
                .ok_or_else(|| bad(&format!("expected {name}")))?;
            let mut out = [0u8; 32];
            hex::decode_to_slice(value, &mut out).map_err(|_| bad(&format!("bad {name}")))?;
            Ok(out)
        };
        let marker = Marker {
            chain_id: field("chain_id")?,
            operator: field("operator_key")?,
        };
        if lines.next() != Some("") || lines.next().is_some() {
            return Err(bad("trailing data"));
        }
        Ok(marker)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_keys_sort_in_height_order() {
        assert_eq!(batch_key(1), "batch/00000000000000000001");
        assert_eq!(batch_key(u64::MAX), "batch/18446744073709551615");
        assert!(batch_key(9) < batch_key(10));
        for h in [1, 9, 10, 123_456_789, u64::MAX] {
            assert_eq!(parse_batch_key(&batch_key(h)), Some(h));
        }
        for bad in [
            "batch/1",
            "batch/0000000000000000000x",
            "tile/0/000",
            "batch/00000000000000000000",
        ] {
            assert_eq!(parse_batch_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn marker_round_trips_and_rejects_damage() {
        let m = Marker {
            chain_id: [7; 32],
            operator: [9; 32],
        };
        let bytes = m.encode();
        assert_eq!(Marker::decode(&bytes).unwrap(), m);
        let text = String::from_utf8(bytes).unwrap();
        for bad in [
            text.replace("tally-archive 1", "tally-archive 2"),
            text.replace("chain_id", "chain"),
            text[..text.len() - 1].to_string(),
            format!("{text}x"),
            text.replace("07", "zz"),
        ] {
            assert!(Marker::decode(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
