//! Hashing, keys and signatures: the one place that knows which primitives tally uses.

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};
use tally_wire::{Hash, Header, PublicKey, Request, Signature, SignedHeader};

use crate::{Error, Result};

pub fn sha256(parts: &[&[u8]]) -> Hash {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// The key id written into headers: the first 8 bytes of SHA-256 of the public key.
pub fn key_id(public: &PublicKey) -> [u8; 8] {
    let digest = sha256(&[public]);
    digest[..8].try_into().expect("8 bytes")
}

/// SHA-256 of a request's 208 wire bytes: how receipts and stored records name a request.
pub fn request_hash(request: &Request) -> Hash {
    sha256(&[&request.encode()])
}

/// SHA-256 of a header's 192 canonical bytes: what the next header chains to.
pub fn header_hash(header: &Header) -> Hash {
    sha256(&[&header.encode()])
}

/// Strict Ed25519 verification (`verify_strict`): rejects small-order keys and signature points
/// and non-canonical scalars, so that one signature has one meaning everywhere.
pub fn verify_strict(public: &PublicKey, message: &[u8], signature: &Signature) -> bool {
    let Ok(key) = VerifyingKey::from_bytes(public) else {
        return false;
    };
    let sig = ed25519_dalek::Signature::from_bytes(signature);
    key.verify_strict(message, &sig).is_ok()
}

/// Verifies a request's signature over its 144 signed bytes.
pub fn verify_request(request: &Request) -> bool {
    verify_strict(&request.signer, &request.signed_bytes(), &request.signature)
}

/// Signs a request in place (clients, benches and tests).
pub fn sign_request(key: &SigningKey, request: &mut Request) {
    assert_eq!(
        request.signer,
        key.verifying_key().to_bytes(),
        "signer must be the key's public key"
    );
    request.signature = key.sign(&request.signed_bytes()).to_bytes();
}

/// The operator's signing key. Ed25519 signing is deterministic, so every replica holding this
/// key produces the same signature for the same header and none has to be replicated.
pub struct OperatorKey {
    key: SigningKey,
    public: PublicKey,
    key_id: [u8; 8],
}

impl OperatorKey {
    pub fn new(key: SigningKey) -> OperatorKey {
        let public = key.verifying_key().to_bytes();
        OperatorKey {
            key,
            public,
            key_id: key_id(&public),
        }
    }

    pub fn public(&self) -> PublicKey {
        self.public
    }

    pub fn key_id(&self) -> [u8; 8] {
        self.key_id
    }

    pub fn sign_header(&self, header: Header) -> SignedHeader {
        assert_eq!(
            header.operator_key_id, self.key_id,
            "header names another operator key"
        );
        let signature = self.key.sign(&header.encode()).to_bytes();
        SignedHeader { header, signature }
    }
}

/// Checks a signed header's signature under the operator's public key, and that the header names
/// that key.
pub fn verify_header(operator: &PublicKey, signed: &SignedHeader) -> Result<()> {
    if signed.header.operator_key_id != key_id(operator) {
        return Err(Error::Verify(
            "header names a different operator key".into(),
        ));
    }
    if !verify_strict(operator, &signed.header.encode(), &signed.signature) {
        return Err(Error::Verify(
            "operator signature over the header does not verify".into(),
        ));
    }
    Ok(())
}
