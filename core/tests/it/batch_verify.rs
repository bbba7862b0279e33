//! Batch verification of hinted signatures (`KeyCache::verify_requests`): it must answer exactly
//! what strict verification answers, for good signatures and for every kind of bad one, and in
//! particular never accept a signature whose R carries a small torsion component (which
//! ed25519-dalek's own batch equation does accept now and then).
//!
//! Randomized: replay a failure with `TALLY_SEED=<seed> cargo test -p tally-core --test it
//! batch_verify`.

use curve25519_dalek::constants::EIGHT_TORSION;
use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint};
use curve25519_dalek::scalar::Scalar;
use ed25519_dalek::hazmat::ExpandedSecretKey;
use ed25519_dalek::{SigningKey, VerifyingKey};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha512};
use tally_core::crypto::{
    sign_request, sign_request_with_hint, verify_request, KeyCache, VerifyStats,
};
use tally_wire::{NonceHint, Op, Request};

use crate::common::{seed, CHAIN};
use crate::signing::{identity_key_signature, with_s_plus_l, IDENTITY_KEY};

fn unsigned(signer: [u8; 32], id: u128) -> Request {
    Request {
        chain_id: CHAIN,
        op: Op::Transfer,
        id,
        signer,
        to: [2; 32],
        amount: 5,
        signature: [0; 64],
    }
}

/// SHA-512 of the parts, reduced mod l.
fn hash_scalar(parts: &[&[u8]]) -> Scalar {
    let mut h = Sha512::new();
    for p in parts {
        h.update(p);
    }
    Scalar::from_bytes_mod_order_wide(&h.finalize().into())
}

/// The secret scalar of `key` (ed25519-dalek's is curve25519-dalek 4's type).
fn secret_scalar(esk: &ExpandedSecretKey) -> Scalar {
    Scalar::from_bytes_mod_order(esk.scalar.to_bytes())
}

/// The RFC 8032 nonce of `key` for `message`.
fn nonce(key: &SigningKey, message: &[u8]) -> Scalar {
    let esk = ExpandedSecretKey::from(&key.to_bytes());
    hash_scalar(&[&esk.hash_prefix, message])
}

/// `n` good hinted requests by `key`, ids `first..first + n`.
fn hinted_requests(key: &SigningKey, first: u128, n: u128) -> Vec<(Request, NonceHint)> {
    (first..first + n)
        .map(|id| {
            let mut r = unsigned(key.verifying_key().to_bytes(), id);
            let h = sign_request_with_hint(key, &mut r);
            (r, h)
        })
        .collect()
}

fn hint_for(r: Scalar) -> NonceHint {
    EdwardsPoint::mul_base(&(r * Scalar::from(8u8).invert()))
        .compress()
        .to_bytes()
}

/// A signature by `key` whose R is [r]B + `torsion`, with s computed honestly for that R: the
/// key holder can make it, strict verification refuses it (its equation is off by the torsion
/// point), and a cofactorless batch equation with random weights misses the difference whenever
/// the weight is a multiple of the torsion point's order.
fn torsioned(key: &SigningKey, id: u128, torsion: EdwardsPoint) -> (Request, Scalar) {
    let mut request = unsigned(key.verifying_key().to_bytes(), id);
    let message = request.signed_bytes();
    let esk = ExpandedSecretKey::from(&key.to_bytes());
    let r = nonce(key, &message);
    let big_r = (EdwardsPoint::mul_base(&r) + torsion).compress();
    let k = hash_scalar(&[big_r.as_bytes(), &request.signer, &message]);
    let s = r + k * secret_scalar(&esk);
    request.signature[..32].copy_from_slice(big_r.as_bytes());
    request.signature[32..].copy_from_slice(s.as_bytes());
    (request, r)
}

/// A request signed by `key` but naming the mixed-order key A + T (T of order 8) as signer, with
/// an id chosen so that strict verification accepts it (k is a multiple of 8, so [k]T vanishes),
/// or so that it refuses it. Such a key must never take the batch path.
fn mixed_order_key_request(key: &SigningKey, strict_valid: bool) -> (Request, NonceHint) {
    let a = CompressedEdwardsY(key.verifying_key().to_bytes())
        .decompress()
        .unwrap()
        + EIGHT_TORSION[1];
    let signer = a.compress().to_bytes();
    let esk = ExpandedSecretKey::from(&key.to_bytes());
    for id in 0u128.. {
        let mut request = unsigned(signer, id);
        let message = request.signed_bytes();
        let r = nonce(key, &message);
        let big_r = EdwardsPoint::mul_base(&r).compress();
        let k = hash_scalar(&[big_r.as_bytes(), &signer, &message]);
        if (k.as_bytes()[0] & 7 == 0) != strict_valid {
            continue;
        }
        let s = r + k * secret_scalar(&esk);
        request.signature[..32].copy_from_slice(big_r.as_bytes());
        request.signature[32..].copy_from_slice(s.as_bytes());
        return (request, hint_for(r));
    }
    unreachable!()
}

struct Case {
    name: &'static str,
    request: Request,
    hint: Option<NonceHint>,
}

/// Good and bad signatures of every kind, with and without hints.
fn cases(rng: &mut StdRng) -> Vec<Case> {
    let mut out = Vec::new();
    let keys: Vec<SigningKey> = (0..6).map(|_| SigningKey::generate(rng)).collect();
    let mut next_id = 1u128;
    let mut good = |key: &SigningKey| {
        next_id += 1;
        let mut r = unsigned(key.verifying_key().to_bytes(), next_id);
        let h = sign_request_with_hint(key, &mut r);
        (r, h)
    };
    for i in 0..24 {
        let (request, hint) = good(&keys[i % keys.len()]);
        out.push(Case {
            name: "good, hinted",
            request,
            hint: Some(hint),
        });
    }
    for key in &keys[..4] {
        let (request, _) = good(key);
        out.push(Case {
            name: "good, no hint",
            request,
            hint: None,
        });
    }
    let (request, _) = good(&keys[0]);
    let (_, other_hint) = good(&keys[0]);
    out.push(Case {
        name: "good, another request's hint",
        request,
        hint: Some(other_hint),
    });
    let (request, _) = good(&keys[1]);
    out.push(Case {
        name: "good, a hint that is not a point",
        request,
        hint: Some([0xff; 32]),
    });
    let (request, _) = good(&keys[1]);
    let mut small = [0u8; 32];
    small[0] = 1; // the identity: [8]H is the identity
    out.push(Case {
        name: "good, the identity as hint",
        request,
        hint: Some(small),
    });
    for byte in [0usize, 17, 31, 32, 45, 63] {
        let (mut request, hint) = good(&keys[2]);
        request.signature[byte] ^= 0x04;
        out.push(Case {
            name: "signature byte flipped, hinted",
            request,
            hint: Some(hint),
        });
    }
    let (mut request, hint) = good(&keys[3]);
    request.amount += 1;
    out.push(Case {
        name: "message changed after signing, hinted",
        request,
        hint: Some(hint),
    });
    let (mut request, hint) = good(&keys[3]);
    request.signature = with_s_plus_l(&request.signature);
    out.push(Case {
        name: "s + l (not canonical), hinted",
        request,
        hint: Some(hint),
    });
    // The identity key "signs" anything with R = [s]B; the hint [s/8]B matches that R, so only
    // the per-key check keeps it off the batch path.
    let mut request = unsigned(IDENTITY_KEY, 7);
    request.signature = identity_key_signature();
    let s = Scalar::from_bytes_mod_order(request.signature[32..].try_into().unwrap());
    out.push(Case {
        name: "identity key, hinted",
        request,
        hint: Some(hint_for(s)),
    });
    for (t, torsion) in EIGHT_TORSION.iter().enumerate().skip(1) {
        let (request, r) = torsioned(&keys[4], 1000 + t as u128, *torsion);
        out.push(Case {
            name: "R with a torsion component, hint for its prime-order part",
            request: request.clone(),
            hint: Some(hint_for(r)),
        });
        out.push(Case {
            name: "R with a torsion component, no hint",
            request,
            hint: None,
        });
    }
    for strict_valid in [true, false] {
        let (request, hint) = mixed_order_key_request(&keys[5], strict_valid);
        out.push(Case {
            name: if strict_valid {
                "mixed-order key, strict-valid, hinted"
            } else {
                "mixed-order key, strict-invalid, hinted"
            },
            request,
            hint: Some(hint),
        });
    }
    out
}

#[test]
fn hints_multiply_to_r_and_leave_the_signature_alone() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    for id in 0..32u128 {
        let key = SigningKey::generate(&mut rng);
        let mut plain = unsigned(key.verifying_key().to_bytes(), id);
        plain.amount = rng.gen_range(1..1_000_000);
        let mut hinted = plain.clone();
        sign_request(&key, &mut plain);
        let hint = sign_request_with_hint(&key, &mut hinted);
        assert_eq!(plain, hinted, "seed {seed}: the hint changed the signature");
        let h = curve25519_dalek::edwards::CompressedEdwardsY(hint)
            .decompress()
            .expect("the hint is a point");
        assert_eq!(
            h.mul_by_cofactor().compress().as_bytes()[..],
            hinted.signature[..32],
            "seed {seed}: [8]H is not R"
        );
        assert!(verify_request(&hinted));
    }
}

#[test]
fn batched_answers_are_strict_answers() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let all = cases(&mut rng);
    // The bad cases are bad and the good ones good, by strict verification itself.
    for c in &all {
        let strict = verify_request(&c.request);
        let expect_good = c.name.starts_with("good") || c.name.ends_with("strict-valid, hinted");
        assert_eq!(strict, expect_good, "seed {seed}: {}", c.name);
    }
    let mut cache = KeyCache::new(4); // small: keys are evicted and decompressed again
    for round in 0..40 {
        let mut picked: Vec<&Case> = all.iter().collect();
        picked.shuffle(&mut rng);
        picked.truncate(rng.gen_range(1..=all.len()));
        let items: Vec<(&Request, Option<&NonceHint>)> = picked
            .iter()
            .map(|c| (&c.request, c.hint.as_ref()))
            .collect();
        let (answers, stats) = cache.verify_requests(&items, &mut rng);
        for (c, got) in picked.iter().zip(&answers) {
            assert_eq!(
                *got,
                verify_request(&c.request),
                "seed {seed}, round {round}: {}",
                c.name
            );
        }
        assert_eq!(
            stats.batched + stats.single,
            picked
                .iter()
                .filter(|c| VerifyingKey::from_bytes(&c.request.signer).is_ok())
                .count(),
            "seed {seed}, round {round}: every decodable key is checked once, one way"
        );
    }
}

#[test]
fn good_hinted_signatures_take_the_batch_path_and_a_bad_one_is_found() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let key = SigningKey::generate(&mut rng);
    let mut requests = hinted_requests(&key, 0, 64);
    let mut cache = KeyCache::new(16);
    let items: Vec<(&Request, Option<&NonceHint>)> =
        requests.iter().map(|(r, h)| (r, Some(h))).collect();
    let (answers, stats) = cache.verify_requests(&items, &mut rng);
    assert!(answers.iter().all(|a| *a), "seed {seed}");
    assert_eq!(
        stats,
        VerifyStats {
            batched: 64,
            single: 0,
            batches_failed: 0,
            batch_size: 64,
        }
    );
    // One bad s among them: R still matches its hint, so only the equation can tell.
    let bad = rng.gen_range(0..requests.len());
    requests[bad].0.signature[40] ^= 1;
    let items: Vec<(&Request, Option<&NonceHint>)> =
        requests.iter().map(|(r, h)| (r, Some(h))).collect();
    let (answers, stats) = cache.verify_requests(&items, &mut rng);
    for (i, a) in answers.iter().enumerate() {
        assert_eq!(*a, i != bad, "seed {seed}: request {i}");
    }
    assert_eq!(stats.batches_failed, 1);
    assert_eq!(stats.single, 64);
    assert_eq!(stats.batch_size, 64);
    // Too few for a batch: checked one by one.
    let (answers, stats) = cache.verify_requests(&items[..3], &mut rng);
    assert_eq!(answers.len(), 3);
    assert_eq!((stats.batched, stats.single, stats.batch_size), (0, 3, 0));
}

/// Why the hint exists: ed25519-dalek's batch verification accepts a torsioned R for some
/// inputs (its weights are derived from the batch's own bytes, so the signer can grind the
/// message until it does; with an order-2 torsion point, half of all messages pass), strict
/// verification never, and `verify_requests` never, whatever hint comes with it.
#[test]
fn a_torsioned_r_passes_dalek_batches_sometimes_and_ours_never() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let key = SigningKey::generate(&mut rng);
    let good = hinted_requests(&key, 0, 6);
    let vk = key.verifying_key();
    let mut dalek_accepted = 0;
    let mut cache = KeyCache::new(16);
    for id in 100..164u128 {
        let (bad, r) = torsioned(&key, id, EIGHT_TORSION[4]);
        assert!(
            !verify_request(&bad),
            "seed {seed}: strict took a torsioned R"
        );
        let all: Vec<&Request> = std::iter::once(&bad)
            .chain(good.iter().map(|(g, _)| g))
            .collect();
        let messages: Vec<[u8; 144]> = all.iter().map(|r| r.signed_bytes()).collect();
        let msg_refs: Vec<&[u8]> = messages.iter().map(|m| &m[..]).collect();
        let sigs: Vec<ed25519_dalek::Signature> = all
            .iter()
            .map(|r| ed25519_dalek::Signature::from_bytes(&r.signature))
            .collect();
        let keys = vec![vk; sigs.len()];
        if ed25519_dalek::verify_batch(&msg_refs, &sigs, &keys).is_ok() {
            dalek_accepted += 1;
        }
        for hint in [Some(hint_for(r)), Some(rng.gen::<[u8; 32]>()), None] {
            let mut items: Vec<(&Request, Option<&NonceHint>)> =
                good.iter().map(|(g, h)| (g, Some(h))).collect();
            items.push((&bad, hint.as_ref()));
            let (answers, _) = cache.verify_requests(&items, &mut rng);
            assert!(
                !answers[items.len() - 1],
                "seed {seed}: accepted a torsioned R"
            );
            assert!(answers[..items.len() - 1].iter().all(|a| *a), "seed {seed}");
        }
    }
    // 64 different messages: (1/2)^64 that none passes.
    assert!(
        dalek_accepted > 0,
        "seed {seed}: ed25519-dalek's batch never accepted the torsioned R"
    );
}
