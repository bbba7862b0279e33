//! Header signing: deterministic, bound to the operator's key, and verified strictly (no
//! malleable signatures, no small-order keys).

use ed25519_dalek::{Signature as DalekSignature, Signer, Verifier, VerifyingKey};
use tally_core::crypto::{key_id, verify_header, verify_strict, OperatorKey};
use tally_core::Error;
use tally_wire::{Header, PublicKey, Signature, SignedHeader};

use crate::common::{key, operator, CHAIN, OPERATOR};

/// The order of the Ed25519 base point, little-endian.
pub const GROUP_ORDER_L: [u8; 32] = [
    0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde, 0x14,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];

/// The encoding of the identity point (0, 1): a public key of order 1.
pub const IDENTITY_KEY: PublicKey = {
    let mut k = [0; 32];
    k[0] = 1;
    k
};

/// The same signature with S + L in place of S: the same scalar modulo L, but not canonical.
pub fn with_s_plus_l(signature: &Signature) -> Signature {
    let mut out = *signature;
    let mut carry = 0u16;
    for i in 0..32 {
        let sum = signature[32 + i] as u16 + GROUP_ORDER_L[i] as u16 + carry;
        out[32 + i] = sum as u8;
        carry = sum >> 8;
    }
    assert_eq!(carry, 0);
    // S < L < 2^253, so S + L < 2^254: only the canonical-scalar check can refuse it, not a
    // check of the three high bits.
    assert_eq!(out[63] & 0xe0, 0);
    out
}

/// A signature that the identity key "makes" over every message: with A the identity, the
/// equation [s]B = R + [k]A holds for any k once R = [s]B.
pub fn identity_key_signature() -> Signature {
    let k = key(9);
    let mut sig = [0u8; 64];
    sig[..32].copy_from_slice(&k.verifying_key().to_bytes());
    sig[32..].copy_from_slice(&k.to_scalar().to_bytes());
    sig
}

fn header(operator: &OperatorKey) -> Header {
    Header {
        chain_id: CHAIN,
        height: 3,
        term: 2,
        time_unix_ms: 1_700_000_000_123,
        request_count: 5,
        prev_hash: [1; 32],
        merkle_root: [2; 32],
        state_digest: [3; 32],
        operator_key_id: operator.key_id(),
    }
}

fn assert_refused(result: tally_core::Result<()>, what: &str) {
    match result {
        Err(Error::Verify(_)) => {}
        other => panic!("{what}: expected a verification failure, got {other:?}"),
    }
}

#[test]
fn signing_is_deterministic_and_verifies() {
    let op = operator();
    let a = op.sign_header(header(&op));
    let b = op.sign_header(header(&op));
    // Another replica holding the same key.
    let c = operator().sign_header(header(&op));
    assert_eq!(a, b);
    assert_eq!(a, c);
    verify_header(&op.public(), &a).expect("verifies");
    assert_eq!(SignedHeader::decode(&a.encode()).expect("decodes"), a);
    assert_eq!(op.key_id(), key_id(&op.public()));
}

#[test]
fn any_change_to_a_signed_header_is_refused() {
    let op = operator();
    let signed = op.sign_header(header(&op));
    let check = |name: &str, change: fn(&mut Header)| {
        let mut bad = signed.clone();
        change(&mut bad.header);
        assert_ne!(
            bad.header, signed.header,
            "{name}: the change changes nothing"
        );
        assert_refused(verify_header(&op.public(), &bad), name);
    };
    check("chain id", |h| h.chain_id[0] ^= 1);
    check("height", |h| h.height += 1);
    check("term", |h| h.term += 1);
    check("time", |h| h.time_unix_ms -= 1);
    check("request count", |h| h.request_count += 1);
    check("previous hash", |h| h.prev_hash[31] ^= 1);
    check("Merkle root", |h| h.merkle_root[0] ^= 1);
    check("state digest", |h| h.state_digest[9] ^= 1);
    check("operator key id", |h| h.operator_key_id[0] ^= 1);
    for byte in 0..64 {
        let mut bad = signed.clone();
        bad.signature[byte] ^= 0x20;
        assert_refused(
            verify_header(&op.public(), &bad),
            &format!("signature byte {byte}"),
        );
    }
}

#[test]
fn a_header_for_another_key_is_refused() {
    let (op, other) = (operator(), OperatorKey::new(key(251)));
    let signed = op.sign_header(header(&op));
    assert_refused(
        verify_header(&other.public(), &signed),
        "verified under another operator",
    );
    // Naming the other key does not help: the signature is still ours.
    let mut renamed = signed.clone();
    renamed.header.operator_key_id = other.key_id();
    assert_refused(
        verify_header(&other.public(), &renamed),
        "renamed to another operator",
    );
    // A good signature by our key over a header that names another key: refused for the name.
    let mut h = header(&other);
    h.operator_key_id = other.key_id();
    let forged = SignedHeader {
        signature: key(OPERATOR).sign(&h.encode()).to_bytes(),
        header: h,
    };
    assert!(verify_strict(
        &op.public(),
        &forged.header.encode(),
        &forged.signature
    ));
    match verify_header(&op.public(), &forged) {
        Err(Error::Verify(m)) => assert!(
            m.contains("different operator key"),
            "refused for another reason: {m}"
        ),
        other => panic!("a header naming another key verified: {other:?}"),
    }
    // The other operator's own signature over the same header fails under ours.
    let theirs = other.sign_header(header(&other));
    assert_refused(
        verify_header(&op.public(), &theirs),
        "another operator's header",
    );
}

#[test]
#[should_panic(expected = "header names another operator key")]
fn signing_a_header_that_names_another_key_is_a_programmer_error() {
    let (op, other) = (operator(), OperatorKey::new(key(251)));
    op.sign_header(header(&other));
}

#[test]
fn a_non_canonical_s_is_refused() {
    let op = operator();
    let signed = op.sign_header(header(&op));
    let bad = SignedHeader {
        signature: with_s_plus_l(&signed.signature),
        ..signed.clone()
    };
    assert_ne!(bad.signature, signed.signature);
    assert_refused(verify_header(&op.public(), &bad), "S + L");
    assert!(!verify_strict(
        &op.public(),
        &signed.header.encode(),
        &bad.signature
    ));
}

#[test]
fn a_small_order_key_is_refused() {
    let sig = identity_key_signature();
    let weak = VerifyingKey::from_bytes(&IDENTITY_KEY).expect("the identity is a curve point");
    assert!(weak.is_weak());
    // Lenient verification accepts this signature for any message at all; strict must not.
    for message in [&b"one message"[..], b"and any other"] {
        assert!(
            weak.verify(message, &DalekSignature::from_bytes(&sig))
                .is_ok(),
            "the forgery is lenient-valid"
        );
        assert!(
            !verify_strict(&IDENTITY_KEY, message, &sig),
            "strict verification took a small-order key"
        );
    }
    let mut h = header(&operator());
    h.operator_key_id = key_id(&IDENTITY_KEY);
    assert_refused(
        verify_header(
            &IDENTITY_KEY,
            &SignedHeader {
                header: h,
                signature: sig,
            },
        ),
        "identity operator key",
    );
}

#[test]
fn hashes_are_over_the_documented_bytes() {
    use sha2::{Digest, Sha256};
    use tally_core::crypto::{header_hash, request_hash};
    use tally_wire::{HEADER_BYTES, REQUEST_BYTES};
    let op = operator();
    let h = header(&op);
    let r = crate::common::transfer(1, 1, 2, 3);
    let sha = |bytes: &[u8]| -> [u8; 32] { Sha256::digest(bytes).into() };
    assert_eq!(h.encode().len(), HEADER_BYTES);
    assert_eq!(r.encode().len(), REQUEST_BYTES);
    assert_eq!(
        header_hash(&h),
        sha(&h.encode()),
        "header hash: SHA-256 of the 192 header bytes"
    );
    assert_eq!(
        request_hash(&r),
        sha(&r.encode()),
        "request hash: SHA-256 of the 208 request bytes"
    );
    assert_eq!(
        op.key_id()[..],
        sha(&op.public())[..8],
        "key id: the first 8 bytes of SHA-256(public key)"
    );
}
