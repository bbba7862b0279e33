//! Hashing, keys and signatures: the one place that knows which primitives tally uses.

use std::collections::hash_map::{Entry, HashMap};

use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint};
use curve25519_dalek::scalar::Scalar;
use curve25519_dalek::traits::{IsIdentity, VartimeMultiscalarMul};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use rand::{CryptoRng, RngCore};
use sha2::{Digest, Sha256, Sha512};
use tally_wire::{
    AdminRequest, Envelope, Hash, Header, NonceHint, PublicKey, Request, Signature, SignedHeader,
};

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

/// SHA-256(ROTATE_DOMAIN ‖ new key ‖ previous u64 LE ‖ number u32 LE): what a rotation's
/// receipt names where a request's names the request (PROTOCOL.md §4.14).
pub fn rotate_hash(new_key: &PublicKey, previous: u64, number: u32) -> Hash {
    sha256(&[
        &tally_wire::ROTATE_DOMAIN,
        new_key,
        &previous.to_le_bytes(),
        &number.to_le_bytes(),
    ])
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
///
/// The strict path uses ed25519-dalek's `VerifyingKey`; the batch path does its own group
/// arithmetic with curve25519-dalek 5 (ed25519-dalek 2 sits on curve25519-dalek 4, which has
/// no batched point compression), so a key used with hints is decoded once more, by version 5.
pub struct KeyCache {
    keys: HashMap<PublicKey, CachedKey>,
    cap: usize,
}

#[derive(Clone, Copy)]
struct CachedKey {
    key: VerifyingKey,
    /// The key as a point for the batch equation, once a hinted signature needed it: `Some(p)`
    /// if the key lies in the prime-order subgroup and is not the identity (only such keys take
    /// the batch path), `None` if not. Checked once per key (a full scalar multiplication,
    /// ~33 us), so that keys only ever seen on plain submits never pay for it.
    batch_point: Option<Option<EdwardsPoint>>,
}

/// Fewest hinted signatures worth a batch equation; below this each is checked on its own.
pub const BATCH_VERIFY_MIN: usize = 4;

/// How a call to [`KeyCache::verify_requests`] spent its work, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VerifyStats {
    /// Signatures accepted by a batch equation.
    pub batched: usize,
    /// Signatures checked one by one with strict verification (no hint, a hint that did not
    /// match, a key outside the prime-order subgroup, too few for a batch, or a failed batch).
    pub single: usize,
    /// Batch equations that failed (their signatures were then checked one by one).
    pub batches_failed: usize,
    /// Signatures in the batch equation tried, 0 if none was.
    pub batch_size: usize,
}

/// One hinted signature, prepared for the batch equation.
struct Prepared {
    /// The request's position in the call.
    index: usize,
    s: Scalar,
    k: Scalar,
    /// The signer's key, as sent and as a point.
    signer: PublicKey,
    a: EdwardsPoint,
    /// [8]H, which must encode to the signature's R bytes.
    r: EdwardsPoint,
}

impl KeyCache {
    pub fn new(cap: usize) -> KeyCache {
        assert!(cap >= 1);
        KeyCache {
            // Grows as signers appear: preallocating the bound cost ~30 MB per worker.
            keys: HashMap::new(),
            cap,
        }
    }

    fn get(&mut self, signer: &PublicKey) -> Option<CachedKey> {
        if let Some(k) = self.keys.get(signer) {
            return Some(*k);
        }
        let key = VerifyingKey::from_bytes(signer).ok()?;
        let cached = CachedKey {
            key,
            batch_point: None,
        };
        if self.keys.len() >= self.cap {
            self.keys.clear();
        }
        self.keys.insert(*signer, cached);
        Some(cached)
    }

    /// The key's point for the batch equation, if it may take the batch path (decided once).
    fn batch_point(&mut self, signer: &PublicKey, key: &mut CachedKey) -> Option<EdwardsPoint> {
        if key.batch_point.is_none() {
            let point = CompressedEdwardsY(*signer)
                .decompress()
                .filter(|p| !p.is_small_order() && p.is_torsion_free());
            key.batch_point = Some(point);
            if let Some(k) = self.keys.get_mut(signer) {
                k.batch_point = Some(point);
            }
        }
        key.batch_point.flatten()
    }

    /// Exactly [`verify_request`]'s answer (strict verification), with the key decompressed once.
    pub fn verify_request(&mut self, request: &Request) -> bool {
        let Some(k) = self.get(&request.signer) else {
            return false;
        };
        let sig = ed25519_dalek::Signature::from_bytes(&request.signature);
        k.key.verify_strict(&request.signed_bytes(), &sig).is_ok()
    }

    /// Strict verification of many requests at once: the answer for each is
    /// [`verify_request`]'s, except with probability at most 2^-128 per call.
    ///
    /// Requests that carry a [`NonceHint`] H are checked together in one batch equation when
    /// everything strict verification would refuse has been excluded one by one first:
    /// - the scalar s is canonical (s < l);
    /// - the key A is not of small order and lies in the prime-order subgroup (cached per key);
    /// - [8]H is not the identity and compresses to exactly the signature's R bytes, so R
    ///   decodes, is canonical and lies in the prime-order subgroup: it has no torsion
    ///   component for random weights to hide (ed25519-dalek's own batch equation would accept
    ///   an R with a small torsion component with probability 1/2 to 1/8). The [8]H of the
    ///   whole call are compressed together, with one field inversion between them.
    ///
    /// The equation is sum z_i ([s_i]B - [k_i]A_i - R_i) = 0 with independent random 128-bit
    /// z_i from `rng`. Every term lies in the group of prime order l > 2^252, so if any one
    /// signature's own equation fails the sum vanishes for at most one z_i in 2^128. A failed
    /// batch is checked again one by one, which finds the bad signatures.
    pub fn verify_requests<R: RngCore + CryptoRng>(
        &mut self,
        items: &[(&Request, Option<&NonceHint>)],
        rng: &mut R,
    ) -> (Vec<bool>, VerifyStats) {
        let mut ok = vec![false; items.len()];
        let mut stats = VerifyStats::default();
        let mut single = Vec::new();
        let mut candidates: Vec<Prepared> = Vec::new();
        for (i, (request, hint)) in items.iter().enumerate() {
            let Some(mut key) = self.get(&request.signer) else {
                continue; // not a point: strict verification refuses it too
            };
            let prepared = match hint {
                Some(hint) => self
                    .batch_point(&request.signer, &mut key)
                    .and_then(|a| prepare(i, a, request, hint)),
                None => None,
            };
            match prepared {
                Some(p) => candidates.push(p),
                None => single.push(i),
            }
        }
        // R = [8]H must be exactly the signature's R bytes.
        let rs: Vec<EdwardsPoint> = candidates.iter().map(|p| p.r).collect();
        let encoded = EdwardsPoint::compress_batch_alloc(&rs);
        let mut batch = Vec::with_capacity(candidates.len());
        for (p, r) in candidates.into_iter().zip(encoded) {
            if r.as_bytes()[..] == items[p.index].0.signature[..32] {
                batch.push(p);
            } else {
                single.push(p.index);
            }
        }
        if batch.len() < BATCH_VERIFY_MIN {
            single.extend(batch.drain(..).map(|p| p.index));
        } else {
            stats.batch_size = batch.len();
            if batch_equation_holds(&batch, rng) {
                stats.batched = batch.len();
                for p in &batch {
                    ok[p.index] = true;
                }
            } else {
                stats.batches_failed = 1;
                single.extend(batch.drain(..).map(|p| p.index));
            }
        }
        stats.single = single.len();
        for i in single {
            ok[i] = self.verify_request(items[i].0);
        }
        (ok, stats)
    }
}

/// SHA-512 of the parts, reduced mod l (RFC 8032's way of turning a hash into a scalar).
fn hash_to_scalar(parts: &[&[u8]]) -> Scalar {
    let mut h = Sha512::new();
    for p in parts {
        h.update(p);
    }
    Scalar::from_bytes_mod_order_wide(&h.finalize().into())
}

/// Everything strict verification checks of one signature except its equation and the encoding
/// of R (checked for the whole call at once), or None (then the signature is checked on its
/// own).
fn prepare(index: usize, a: EdwardsPoint, request: &Request, hint: &NonceHint) -> Option<Prepared> {
    let r_bytes: [u8; 32] = request.signature[..32].try_into().expect("32 bytes");
    let s_bytes: [u8; 32] = request.signature[32..].try_into().expect("32 bytes");
    let s = Option::<Scalar>::from(Scalar::from_canonical_bytes(s_bytes))?;
    let r = CompressedEdwardsY(*hint).decompress()?.mul_by_cofactor();
    if r.is_identity() {
        return None;
    }
    let k = hash_to_scalar(&[&r_bytes, &request.signer, &request.signed_bytes()]);
    Some(Prepared {
        index,
        s,
        k,
        signer: request.signer,
        a,
        r,
    })
}

/// sum z_i ([s_i]B - [k_i]A_i - R_i) = 0, with the terms of one key gathered: signatures by
/// the same key share one point in the multiscalar multiplication (coefficient -sum z_i k_i),
/// which costs per point, and busy accounts sign many requests of a chunk.
fn batch_equation_holds<R: RngCore + CryptoRng>(batch: &[Prepared], rng: &mut R) -> bool {
    let mut b = Scalar::ZERO;
    let mut scalars = Vec::with_capacity(2 * batch.len() + 1);
    let mut points = Vec::with_capacity(2 * batch.len() + 1);
    let mut key_slot: HashMap<PublicKey, usize> = HashMap::with_capacity(batch.len());
    scalars.push(Scalar::ZERO); // B's coefficient, filled in below
    points.push(curve25519_dalek::constants::ED25519_BASEPOINT_POINT);
    for p in batch {
        let mut z = [0u8; 32];
        rng.fill_bytes(&mut z[..16]);
        let z = Scalar::from_bytes_mod_order(z);
        b += z * p.s;
        match key_slot.entry(p.signer) {
            Entry::Occupied(slot) => {
                let i = *slot.get();
                scalars[i] -= z * p.k;
            }
            Entry::Vacant(slot) => {
                slot.insert(scalars.len());
                scalars.push(-(z * p.k));
                points.push(p.a);
            }
        }
        scalars.push(-z);
        points.push(p.r);
    }
    scalars[0] = b;
    EdwardsPoint::vartime_multiscalar_mul(scalars, points).is_identity()
}

/// SHA-256 of an envelope's wire bytes: what its receipts name.
pub fn envelope_hash(envelope: &Envelope) -> Hash {
    sha256(&[&envelope.encode()])
}

/// Strict Ed25519 verification of an envelope's one signature.
pub fn verify_envelope(envelope: &Envelope) -> bool {
    verify_strict(
        &envelope.signer,
        &envelope.signed_bytes(),
        &envelope.signature,
    )
}

/// Signs an envelope in place (clients, benches and tests).
pub fn sign_envelope(key: &SigningKey, envelope: &mut Envelope) {
    assert_eq!(
        envelope.signer,
        key.verifying_key().to_bytes(),
        "signer must be the key's public key"
    );
    envelope.signature = key.sign(&envelope.signed_bytes()).to_bytes();
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

/// Signs a request in place and returns its [`NonceHint`]: the point H = [r / 8]B, where r is
/// the signature's nonce (RFC 8032: SHA-512 of the key's prefix and the message), so that
/// [8]H = R. It lets a verifier check R's subgroup cheaply and batch the signature
/// ([`KeyCache::verify_requests`]).
///
/// The signature is RFC 8032's, byte for byte what [`sign_request`] makes (tested); it is
/// computed here from H (R = [8]H) so that hinting costs the signer three point doublings and
/// an encoding rather than a second base-point multiplication.
pub fn sign_request_with_hint(key: &SigningKey, request: &mut Request) -> NonceHint {
    let public = key.verifying_key().to_bytes();
    assert_eq!(
        request.signer, public,
        "signer must be the key's public key"
    );
    let expanded = ed25519_dalek::hazmat::ExpandedSecretKey::from(&key.to_bytes());
    // ed25519-dalek's scalar type is curve25519-dalek 4's; ours is 5's.
    let secret = Scalar::from_bytes_mod_order(expanded.scalar.to_bytes());
    let message = request.signed_bytes();
    let r = hash_to_scalar(&[&expanded.hash_prefix, &message]);
    let h = EdwardsPoint::mul_base(&(r * Scalar::from(8u8).invert()));
    let big_r = h.mul_by_cofactor().compress().to_bytes();
    let k = hash_to_scalar(&[&big_r, &public, &message]);
    let s = r + k * secret;
    request.signature[..32].copy_from_slice(&big_r);
    request.signature[32..].copy_from_slice(s.as_bytes());
    h.compress().to_bytes()
}

/// Signs an admin request in place: sets `admin_key` to the key's public key and `signature`
/// to its Ed25519 signature over [`AdminRequest::signing_bytes`] (which cover `admin_key`).
pub fn sign_admin(key: &SigningKey, req: &mut AdminRequest) {
    req.admin_key = key.verifying_key().to_bytes();
    req.signature = key.sign(&req.signing_bytes()).to_bytes();
}

/// Checks an admin request's signature strictly (§6 of PROTOCOL.md) under the key it names.
/// Whether that key is an admin key, and whether the request is fresh, is the server's to judge.
pub fn verify_admin(req: &AdminRequest) -> Result<()> {
    if !verify_strict(&req.admin_key, &req.signing_bytes(), &req.signature) {
        return Err(Error::Verify(
            "the admin signature does not verify under the key it names".into(),
        ));
    }
    Ok(())
}

/// The operator's signing key. Ed25519 signing is deterministic, so every replica holding this
/// key produces the same signature for the same header and none has to be replicated.
#[derive(Clone)]
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

    /// The signed note of `checkpoint` (C2SP signed-note, key name = its origin): deterministic,
    /// so the note any replica signs for a size is the archive's for that size.
    pub fn sign_checkpoint(&self, checkpoint: &crate::tlog::Checkpoint) -> String {
        crate::tlog::sign_note(&checkpoint.body(), &checkpoint.origin, &self.key)
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
    use tally_wire::{AdminCommand, Op};

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

    fn admin_request(key: &SigningKey, command: AdminCommand) -> AdminRequest {
        let mut req = AdminRequest {
            chain_id: [1; 32],
            issued_unix_ms: 1_700_000_000_000,
            nonce: 42,
            command,
            admin_key: [0; 32],
            signature: [0; 64],
        };
        sign_admin(key, &mut req);
        req
    }

    #[test]
    fn admin_signatures() {
        let key = SigningKey::from_bytes(&[9; 32]);
        let good = admin_request(&key, AdminCommand::Remove { id: 2 });
        assert_eq!(good.admin_key, key.verifying_key().to_bytes());
        assert!(verify_admin(&good).is_ok());
        // Deterministic: signing the same request again gives the same bytes.
        assert_eq!(admin_request(&key, AdminCommand::Remove { id: 2 }), good);

        let tampered = [
            AdminRequest {
                command: AdminCommand::Remove { id: 3 },
                ..good.clone()
            },
            AdminRequest {
                command: AdminCommand::TransferLeader { id: 2 },
                ..good.clone()
            },
            AdminRequest {
                chain_id: [2; 32],
                ..good.clone()
            },
            AdminRequest {
                issued_unix_ms: good.issued_unix_ms + 1,
                ..good.clone()
            },
            AdminRequest {
                nonce: 43,
                ..good.clone()
            },
        ];
        for t in &tampered {
            assert!(
                matches!(verify_admin(t), Err(Error::Verify(_))),
                "{:?}",
                t.command
            );
        }
        let mut flipped = good.clone();
        flipped.signature[40] ^= 1;
        assert!(verify_admin(&flipped).is_err());

        // Another key named in the request: the signature is not that key's.
        let other = SigningKey::from_bytes(&[10; 32]);
        let wrong_key = AdminRequest {
            admin_key: other.verifying_key().to_bytes(),
            ..good.clone()
        };
        assert!(verify_admin(&wrong_key).is_err());
        // Signed by another key: verifies, under that key only (authorization is the server's).
        let by_other = admin_request(&other, AdminCommand::Remove { id: 2 });
        assert!(verify_admin(&by_other).is_ok());
        assert_ne!(by_other.admin_key, good.admin_key);
        // Not a curve point, and a small-order key: refused, never a panic.
        for admin_key in [[0xff; 32], {
            let mut k = [0u8; 32];
            k[0] = 1;
            k
        }] {
            assert!(verify_admin(&AdminRequest {
                admin_key,
                ..good.clone()
            })
            .is_err());
        }
        // An add with addresses is covered too.
        let add = admin_request(
            &key,
            AdminCommand::Add {
                id: 4,
                address: "127.0.0.1:7503".into(),
                client_address: String::new(),
                learner: true,
            },
        );
        assert!(verify_admin(&add).is_ok());
        let mut moved = add.clone();
        if let AdminCommand::Add { address, .. } = &mut moved.command {
            *address = "127.0.0.1:7504".into();
        }
        assert!(verify_admin(&moved).is_err());
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
