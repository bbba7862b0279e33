//! Threshold signing of headers (issue 20, RFC 9591 FROST over Ed25519, the `frost-ed25519`
//! crate): the operator's public key stays one ordinary Ed25519 key, every existing verifier
//! keeps working, and no replica holds the whole private key.
//!
//! The cryptographic steps a replica takes, sans IO, and their
//! encodings: a trusted dealer splits a key into `n` shares of which any `t` sign
//! ([`deal`]); a signer commits to fresh nonces ahead of time ([`Share::commit`], FROST's
//! round 1, which needs no message and so can run before the batch exists); once a header is
//! known, each of `t` signers signs it with one unused commitment set ([`Share::sign`], round
//! 2); anyone aggregates the shares into the signature ([`aggregate`]). Wiring it through
//! replication is [`crate::signing`].
//!
//! Nonces are used once: [`Nonces`] is consumed by [`Share::sign`], and a signer that crashed
//! after committing must commit afresh (reusing a nonce with two messages reveals the share).

use std::collections::BTreeMap;

use frost_ed25519 as frost;
use rand::{CryptoRng, RngCore};
use tally_wire::{PublicKey, Signature};

use crate::{Error, Result};

/// A signer's number in its group: 1..=n.
pub type SignerId = u16;

/// What a trusted dealer hands out: the group's public key and one share per signer.
pub struct Dealt {
    pub group_key: PublicKey,
    /// The public side every aggregator needs (each signer's verifying share), encoded.
    pub public: Vec<u8>,
    /// Each signer's secret share, encoded (to be written to its replica alone).
    pub shares: BTreeMap<SignerId, Vec<u8>>,
}

fn error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Verify(format!("threshold signing, {what}: {e}"))
}

fn identifier(id: SignerId) -> Result<frost::Identifier> {
    frost::Identifier::try_from(id).map_err(|e| error("signer id", e))
}

/// Splits a fresh key into `n` shares, signers `1..=n`, any `t` of which sign
/// (`2 <= t <= n`).
pub fn deal(n: SignerId, t: SignerId, rng: &mut (impl RngCore + CryptoRng)) -> Result<Dealt> {
    let ids: Vec<SignerId> = (1..=n).collect();
    deal_to(&ids, t, rng)
}

/// Splits a fresh key into one share per signer of `ids` (distinct, non-zero: a replica's
/// node id), any `t` of which sign (`2 <= t <= ids.len()`). A group dealt to the replicas of a
/// changed membership keeps each replica's signer number its node id.
pub fn deal_to(
    ids: &[SignerId],
    t: SignerId,
    rng: &mut (impl RngCore + CryptoRng),
) -> Result<Dealt> {
    let n = SignerId::try_from(ids.len()).map_err(|e| error("signers", e))?;
    assert!(2 <= t && t <= n, "a threshold of {t} of {n}");
    let identifiers = ids
        .iter()
        .map(|id| identifier(*id))
        .collect::<Result<Vec<_>>>()?;
    let (secret_shares, public) = frost::keys::generate_with_dealer(
        n,
        t,
        frost::keys::IdentifierList::Custom(&identifiers),
        rng,
    )
    .map_err(|e| error("dealing", e))?;
    let mut shares = BTreeMap::new();
    for (id, identifier) in ids.iter().zip(&identifiers) {
        let secret = &secret_shares[identifier];
        let package = frost::keys::KeyPackage::try_from(secret.clone())
            .map_err(|e| error("a dealt share", e))?;
        let bytes = package
            .serialize()
            .map_err(|e| error("encoding a share", e))?;
        shares.insert(*id, bytes);
    }
    assert_eq!(shares.len(), ids.len(), "signer ids are distinct");
    Ok(Dealt {
        group_key: group_key(&public)?,
        public: public.serialize().map_err(|e| error("encoding", e))?,
        shares,
    })
}

/// The signers of a group, from its public shares ([`Dealt::public`]), and its threshold.
pub fn group_signers(public: &[u8]) -> Result<(Vec<SignerId>, SignerId)> {
    let public = frost::keys::PublicKeyPackage::deserialize(public)
        .map_err(|e| error("the public shares", e))?;
    let mut ids = Vec::with_capacity(public.verifying_shares().len());
    for identifier in public.verifying_shares().keys() {
        ids.push(signer_number(identifier)?);
    }
    let t = public
        .min_signers()
        .ok_or_else(|| error("the public shares", "no threshold"))?;
    Ok((ids, t))
}

/// A FROST identifier as a signer number (a small integer scalar), or an error.
fn signer_number(identifier: &frost::Identifier) -> Result<SignerId> {
    let bytes = identifier.serialize();
    let low = u16::from_le_bytes([bytes[0], bytes[1]]);
    match bytes[2..].iter().all(|b| *b == 0) && low != 0 {
        true => Ok(low),
        false => Err(error(
            "a share",
            "an identifier that is not a signer number",
        )),
    }
}

fn group_key(public: &frost::keys::PublicKeyPackage) -> Result<PublicKey> {
    encode_key(public.verifying_key())
}

fn encode_key(key: &frost::VerifyingKey) -> Result<PublicKey> {
    let bytes = key.serialize().map_err(|e| error("the group key", e))?;
    bytes
        .try_into()
        .map_err(|_| error("the group key", "not 32 bytes"))
}

/// One signer's secret share.
pub struct Share {
    package: frost::keys::KeyPackage,
}

/// Round 1's secret half: used by one [`Share::sign`] and gone.
pub struct Nonces(frost::round1::SigningNonces);

impl Nonces {
    /// The commitment these nonces were made with (what the aggregator was sent).
    pub fn commitment(&self) -> Result<Commitment> {
        self.0
            .commitments()
            .serialize()
            .map_err(|e| error("a commitment", e))
    }
}

/// Round 1's public half, which the aggregator collects: encoded.
pub type Commitment = Vec<u8>;

/// Round 2's output, which the aggregator collects: encoded.
pub type SignatureShare = Vec<u8>;

impl Share {
    pub fn decode(bytes: &[u8]) -> Result<Share> {
        let package =
            frost::keys::KeyPackage::deserialize(bytes).map_err(|e| error("a share", e))?;
        Ok(Share { package })
    }

    /// This signer's number (its identifier is that integer scalar; [`deal_to`]).
    pub fn id(&self) -> Result<SignerId> {
        signer_number(self.package.identifier())
    }

    /// How many signers a signature takes (`t`).
    pub fn min_signers(&self) -> usize {
        *self.package.min_signers() as usize
    }

    /// The group's key, as every verifier knows it.
    pub fn group_key(&self) -> Result<PublicKey> {
        encode_key(self.package.verifying_key())
    }

    /// Round 1: fresh nonces and their commitment; needs no message.
    pub fn commit(&self, rng: &mut (impl RngCore + CryptoRng)) -> Result<(Nonces, Commitment)> {
        let (nonces, commitments) = frost::round1::commit(self.package.signing_share(), rng);
        let bytes = commitments
            .serialize()
            .map_err(|e| error("a commitment", e))?;
        Ok((Nonces(nonces), bytes))
    }

    /// Round 2: this signer's share of the signature over `message`, given the commitments of
    /// the `t` signers taking part (its own among them) and its nonces behind its commitment.
    pub fn sign(
        &self,
        message: &[u8],
        commitments: &BTreeMap<SignerId, Commitment>,
        nonces: Nonces,
    ) -> Result<SignatureShare> {
        let package = signing_package(message, commitments)?;
        let share = frost::round2::sign(&package, &nonces.0, &self.package)
            .map_err(|e| error("signing a share", e))?;
        Ok(share.serialize())
    }
}

fn signing_package(
    message: &[u8],
    commitments: &BTreeMap<SignerId, Commitment>,
) -> Result<frost::SigningPackage> {
    let mut map = BTreeMap::new();
    for (id, bytes) in commitments {
        let c = frost::round1::SigningCommitments::deserialize(bytes)
            .map_err(|e| error("a commitment", e))?;
        map.insert(identifier(*id)?, c);
    }
    Ok(frost::SigningPackage::new(map, message))
}

/// Aggregates `t` signature shares over `message` into the group's Ed25519 signature,
/// checking each share against its signer's public share (a bad share is named, not blended
/// into a signature that fails). `public` is [`Dealt::public`].
pub fn aggregate(
    message: &[u8],
    commitments: &BTreeMap<SignerId, Commitment>,
    shares: &BTreeMap<SignerId, SignatureShare>,
    public: &[u8],
) -> Result<Signature> {
    let package = signing_package(message, commitments)?;
    let public = frost::keys::PublicKeyPackage::deserialize(public)
        .map_err(|e| error("the public shares", e))?;
    let mut map = BTreeMap::new();
    for (id, bytes) in shares {
        let s = frost::round2::SignatureShare::deserialize(bytes)
            .map_err(|e| error("a signature share", e))?;
        map.insert(identifier(*id)?, s);
    }
    let signature =
        frost::aggregate(&package, &map, &public).map_err(|e| error("aggregating", e))?;
    let bytes = signature
        .serialize()
        .map_err(|e| error("the signature", e))?;
    bytes
        .try_into()
        .map_err(|_| error("the signature", "not 64 bytes"))
}

impl Share {
    /// Checks a share read from a file against the group's public shares `public`
    /// ([`Dealt::public`]): its public share is its secret share's and the one `public` lists
    /// for it, under the same group key and threshold. Decoding alone takes any 32 bytes below
    /// the group order as a secret share. Returns the threshold and the number of signers,
    /// `(t, n)`.
    pub fn check_against(&self, public: &[u8]) -> Result<(SignerId, SignerId)> {
        let public = frost::keys::PublicKeyPackage::deserialize(public)
            .map_err(|e| error("the public shares", e))?;
        let own = frost::keys::VerifyingShare::from(*self.package.signing_share());
        let listed = public.verifying_shares().get(self.package.identifier());
        if own != *self.package.verifying_share() || listed != Some(&own) {
            return Err(error(
                "a share",
                "its public share is not its secret share's",
            ));
        }
        let t = *self.package.min_signers();
        if public.verifying_key() != self.package.verifying_key() || public.min_signers() != Some(t)
        {
            return Err(error("a share", "another group's than the public shares'"));
        }
        Ok((t, public.max_signers()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::verify_strict;

    /// Signs `message` with the signers `ids` of `dealt`.
    fn sign_with(dealt: &Dealt, ids: &[SignerId], message: &[u8]) -> Result<Signature> {
        let mut rng = rand::rngs::OsRng;
        let shares: BTreeMap<SignerId, Share> = ids
            .iter()
            .map(|i| (*i, Share::decode(&dealt.shares[i]).unwrap()))
            .collect();
        let mut nonces = BTreeMap::new();
        let mut commitments = BTreeMap::new();
        for (id, share) in &shares {
            let (n, c) = share.commit(&mut rng)?;
            nonces.insert(*id, n);
            commitments.insert(*id, c);
        }
        let mut sig_shares = BTreeMap::new();
        for (id, share) in &shares {
            let n = nonces.remove(id).unwrap();
            sig_shares.insert(*id, share.sign(message, &commitments, n)?);
        }
        aggregate(message, &commitments, &sig_shares, &dealt.public)
    }

    #[test]
    fn any_two_of_three_sign_an_ordinary_ed25519_signature() {
        let dealt = deal(3, 2, &mut rand::rngs::OsRng).unwrap();
        let message = b"a header's 192 bytes";
        for ids in [[1, 2], [1, 3], [2, 3]] {
            let sig = sign_with(&dealt, &ids, message).unwrap();
            assert!(verify_strict(&dealt.group_key, message, &sig), "{ids:?}");
            assert!(!verify_strict(&dealt.group_key, b"another", &sig));
        }
        for (id, bytes) in &dealt.shares {
            let share = Share::decode(bytes).unwrap();
            assert_eq!(share.id().unwrap(), *id);
            assert_eq!(share.group_key().unwrap(), dealt.group_key);
        }
    }

    #[test]
    fn one_signer_alone_or_a_forged_share_signs_nothing() {
        let dealt = deal(3, 2, &mut rand::rngs::OsRng).unwrap();
        assert!(
            sign_with(&dealt, &[1], b"m").is_err(),
            "below the threshold"
        );
        // A share over another message is refused by name at aggregation.
        let mut rng = rand::rngs::OsRng;
        let (a, b) = (
            Share::decode(&dealt.shares[&1]).unwrap(),
            Share::decode(&dealt.shares[&2]).unwrap(),
        );
        let ((na, ca), (nb, cb)) = (a.commit(&mut rng).unwrap(), b.commit(&mut rng).unwrap());
        let commitments: BTreeMap<_, _> = [(1, ca), (2, cb)].into_iter().collect();
        let good = a.sign(b"m", &commitments, na).unwrap();
        let forged = b.sign(b"other", &commitments, nb).unwrap();
        let shares: BTreeMap<_, _> = [(1, good), (2, forged)].into_iter().collect();
        assert!(aggregate(b"m", &commitments, &shares, &dealt.public).is_err());
    }
}
