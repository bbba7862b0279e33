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

/// Decompressed public keys of recent signers: decompressing a key costs a field exponentiation,
/// a sizeable part of one verification, and busy accounts sign again and again. Bounded: when
/// full it is cleared and refilled (cheap, and no eviction order to maintain).
pub struct KeyCache {
    keys: std::collections::HashMap<PublicKey, VerifyingKey>,
    cap: usize,
}

impl KeyCache {
    pub fn new(cap: usize) -> KeyCache {
        assert!(cap >= 1);
        KeyCache {
            // Grows as signers appear: preallocating the bound cost ~30 MB per worker.
            keys: std::collections::HashMap::new(),
            cap,
        }
    }

    /// Exactly [`verify_request`]'s answer (strict verification), with the key decompressed once.
    pub fn verify_request(&mut self, request: &Request) -> bool {
        let key = match self.keys.get(&request.signer) {
            Some(k) => *k,
            None => {
                let Ok(k) = VerifyingKey::from_bytes(&request.signer) else {
                    return false;
                };
                if self.keys.len() >= self.cap {
                    self.keys.clear();
                }
                self.keys.insert(request.signer, k);
                k
            }
        };
        let sig = ed25519_dalek::Signature::from_bytes(&request.signature);
        key.verify_strict(&request.signed_bytes(), &sig).is_ok()
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use tally_wire::Op;

    fn request(key: &SigningKey, id: u128) -> Request {
        let mut r = Request {
            chain_id: [1; 32],
            op: Op::Transfer,
            id,
            signer: key.verifying_key().to_bytes(),
            to: [2; 32],
            amount: 5,
            signature: [0; 64],
        };
        sign_request(key, &mut r);
        r
    }

    #[test]
    fn key_cache_answers_exactly_like_strict_verification() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let mut cache = KeyCache::new(2);
        let good = request(&key, 1);
        let mut bad = request(&key, 2);
        bad.signature[10] ^= 1;
        let mut wrong_key = request(&key, 3);
        wrong_key.signer = SigningKey::from_bytes(&[8; 32]).verifying_key().to_bytes();
        let mut small_order = good.clone();
        small_order.signer = {
            let mut k = [0u8; 32];
            k[0] = 1; // the identity point: small order, refused by strict verification
            k
        };
        let mut not_a_point = good.clone();
        not_a_point.signer = [0xff; 32];
        // Twice each: the second answer comes from the cache, and the cache overflows (cap 2).
        for _ in 0..2 {
            for r in [&good, &bad, &wrong_key, &small_order, &not_a_point] {
                assert_eq!(
                    cache.verify_request(r),
                    verify_request(r),
                    "request {}",
                    r.id
                );
            }
        }
        assert!(verify_request(&good));
        assert!(
            !verify_request(&bad) && !verify_request(&wrong_key) && !verify_request(&small_order)
        );
    }
}
