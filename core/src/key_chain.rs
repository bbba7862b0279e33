//! Operator key rotation (PROTOCOL.md §4.14): which key signs which header, the links that
//! prove it, and the keys a replica holds.
//!
//! A rotation is a leader-made item, last in its batch, whose receipt names the new key. That
//! batch's header is the last one the old key signs; the new key signs every header after it.
//! A verifier starts from the genesis key (its profile's) and follows the links in order: each
//! link's header must verify under the key before it, and its receipt must be in that header's
//! Merkle tree and name the rotation that follows the one before (its height and number), so a
//! chain can neither skip nor reorder a rotation.
//!
//! Checkpoints (signed notes of the header log) are signed by the key that signs the headers
//! *after* their size, or a later one: a replica signs them with the key it holds now, and a
//! key rotated out never has to be kept to prove what it once signed.

use tally_wire::{KeyLink, Op, PublicKey, SignedHeader};

use crate::batch::{BatchBody, BatchItem, HeaderKey};
use crate::crypto::{key_id, rotate_hash, verify_header, OperatorKey};
use crate::merkle::{leaf_hash, verify_inclusion};
use crate::ports::LedgerStore;
use crate::state::LedgerMeta;
use crate::{Error, Result};

/// The operator keys one replica holds: the one its config names, and the next one ahead of a
/// rotation (`operator.next_signing_key`).
#[derive(Clone)]
pub struct SigningKeys {
    /// None on a replica of a threshold operator, which holds a share of the key, never the
    /// key (`crate::signing`).
    configured: Option<OperatorKey>,
    next: Option<OperatorKey>,
    /// On a replica of a threshold operator: the keys of the groups it holds a share of.
    groups: Vec<PublicKey>,
    /// The ledger's genesis key (it signs before any rotation), which this replica may or may
    /// not hold.
    genesis: PublicKey,
}

impl SigningKeys {
    pub fn new(
        configured: OperatorKey,
        next: Option<OperatorKey>,
        genesis: PublicKey,
    ) -> SigningKeys {
        SigningKeys {
            configured: Some(configured),
            next,
            groups: Vec::new(),
            genesis,
        }
    }

    /// A replica of a threshold operator holding shares of the groups `groups` (the one that
    /// signs, and the next one ahead of a rotation), whose genesis key is `genesis`: it signs
    /// no header alone (headers are applied unsigned and signed by a majority,
    /// `crate::signing`).
    pub fn threshold(genesis: PublicKey, groups: Vec<PublicKey>) -> SigningKeys {
        SigningKeys {
            configured: None,
            next: None,
            groups,
            genesis,
        }
    }

    pub fn is_threshold(&self) -> bool {
        self.configured.is_none()
    }

    /// The ledger's genesis key (held or not).
    pub fn genesis(&self) -> PublicKey {
        self.genesis
    }

    /// The public key that signs the header after `meta` (held or not).
    pub fn public_for_meta(&self, meta: &LedgerMeta) -> PublicKey {
        meta.operator.map_or(self.genesis, |r| r.key)
    }

    /// One key only, the genesis key (a replica that never rotates, tests).
    pub fn single(key: OperatorKey) -> SigningKeys {
        let genesis = key.public();
        SigningKeys::new(key, None, genesis)
    }

    /// The genesis key's id: what headers name before any rotation.
    pub fn genesis_key_id(&self) -> [u8; 8] {
        key_id(&self.genesis)
    }

    /// How the header after `meta` is written: signed with the key [`SigningKeys::for_meta`]
    /// gives, or, on a threshold operator's replica, unsigned (its signature comes later, from
    /// a majority: `crate::signing`), naming the key that will sign it.
    pub fn header_key(&self, meta: &LedgerMeta) -> Result<HeaderKey<'_>> {
        match self.is_threshold() {
            true => Ok(HeaderKey::Unsigned(
                meta.signing_key_id(&self.genesis_key_id()),
            )),
            false => self.for_meta(meta).map(HeaderKey::Sign),
        }
    }

    /// The key that signs the header after `meta`: the last rotation's, or the genesis key
    /// before any. Fails when this replica does not hold it (a replica configured with a
    /// rotated-in key that must replay batches from before the rotation needs the old key too,
    /// as `operator.next_signing_key`).
    pub fn for_meta(&self, meta: &LedgerMeta) -> Result<&OperatorKey> {
        if self.is_threshold() {
            return Err(Error::Config(format!(
                "this replica holds a share of the operator key {} (operator.signing_key_share): \
                 a majority of replicas signs together, no replica signs alone",
                hex::encode(self.genesis)
            )));
        }
        let Some(rotation) = meta.operator else {
            return self.holding(&self.genesis).ok_or_else(|| {
                Error::Config(format!(
                    "this replica holds no private key for the genesis operator key {}, which \
                     signs the ledger's headers before its first rotation: name it as \
                     operator.next_signing_key and restart",
                    hex::encode(self.genesis)
                ))
            });
        };
        self.holding(&rotation.key).ok_or_else(|| {
            Error::Config(format!(
                "rotation {} at height {} made {} the operator key, and this replica holds \
                 no private key for it: name it as operator.next_signing_key (or \
                 operator.signing_key) and restart",
                rotation.number,
                rotation.height,
                hex::encode(rotation.key)
            ))
        })
    }

    /// The public keys of the keys held (of the groups, on a threshold operator's replica).
    pub fn publics(&self) -> Vec<PublicKey> {
        self.configured
            .iter()
            .chain(self.next.as_ref())
            .map(|k| k.public())
            .chain(self.groups.iter().copied())
            .collect()
    }

    /// The held key whose public key is `public`, if any.
    pub fn holding(&self, public: &PublicKey) -> Option<&OperatorKey> {
        self.configured
            .iter()
            .chain(self.next.as_ref())
            .find(|k| &k.public() == public)
    }
}

/// Which key signs which height, learned from a verified chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySchedule {
    pub genesis: PublicKey,
    /// (height of the rotation, new key), in height order: the key signs every header after
    /// the height.
    pub rotations: Vec<(u64, PublicKey)>,
}

impl KeySchedule {
    /// The genesis key alone: no rotation known.
    pub fn genesis(key: PublicKey) -> KeySchedule {
        KeySchedule {
            genesis: key,
            rotations: Vec::new(),
        }
    }

    /// Follows `links` from `genesis` (PROTOCOL.md §4.14), checking each.
    pub fn follow(genesis: PublicKey, links: &[KeyLink]) -> Result<KeySchedule> {
        let mut schedule = KeySchedule::genesis(genesis);
        for (i, link) in links.iter().enumerate() {
            schedule.extend(link).map_err(|e| {
                Error::Verify(format!("key chain link {} (rotation {}): {e}", i, i + 1))
            })?;
        }
        Ok(schedule)
    }

    /// Checks `link` as the next rotation after those known and adds it.
    pub fn extend(&mut self, link: &KeyLink) -> Result<()> {
        let (previous, number) = (self.last_height(), self.rotations.len() as u32 + 1);
        let h = &link.header.header;
        if (link.previous, link.number) != (previous, number) || h.height <= previous {
            return Err(Error::Verify(format!(
                "names rotation {} after height {}, expected rotation {number} after {previous}",
                link.number, link.previous
            )));
        }
        verify_header(&self.current(), &link.header)?;
        let r = &link.receipt;
        let expected = (
            rotate_hash(&link.new_key, previous, number),
            h.height,
            Op::Rotate,
        );
        if (r.request_hash, r.height, r.op) != expected || r.failed.is_some() {
            return Err(Error::Verify(
                "the receipt does not name this rotation".into(),
            ));
        }
        if r.index != link.proof.leaf_index || r.index + 1 != h.request_count {
            return Err(Error::Verify(
                "the rotation is not its batch's last leaf".into(),
            ));
        }
        if !verify_inclusion(&leaf_hash(&r.encode()), &link.proof, &h.merkle_root) {
            return Err(Error::Verify(
                "the receipt is not in the header's tree".into(),
            ));
        }
        if key_id(&link.new_key) == key_id(&self.current()) {
            return Err(Error::Verify(
                "the rotation names the key that signs".into(),
            ));
        }
        self.rotations.push((h.height, link.new_key));
        Ok(())
    }

    fn last_height(&self) -> u64 {
        self.rotations.last().map_or(0, |(h, _)| *h)
    }

    /// The newest key: what signs headers after the last rotation known.
    pub fn current(&self) -> PublicKey {
        self.rotations.last().map_or(self.genesis, |(_, k)| *k)
    }

    /// The key that signs the header at `height`.
    pub fn key_for(&self, height: u64) -> PublicKey {
        self.rotations
            .iter()
            .take_while(|(h, _)| *h < height)
            .last()
            .map_or(self.genesis, |(_, k)| *k)
    }

    /// Checks a signed header under the key for its height.
    pub fn verify_header(&self, signed: &SignedHeader) -> Result<()> {
        verify_header(&self.key_for(signed.header.height), signed)
    }

    /// Every key of the chain, the genesis key first: what may have signed a checkpoint or a
    /// manifest whose size is not known yet.
    pub fn keys(&self) -> Vec<PublicKey> {
        std::iter::once(self.genesis)
            .chain(self.rotations.iter().map(|(_, k)| *k))
            .collect()
    }

    /// The keys that may sign a checkpoint of `size`: the key for height `size + 1` and every
    /// later one.
    pub fn checkpoint_keys(&self, size: u64) -> Vec<PublicKey> {
        let later = self
            .rotations
            .iter()
            .filter(|(h, _)| *h > size)
            .map(|(_, k)| *k);
        std::iter::once(self.key_for(size + 1))
            .chain(later)
            .collect()
    }

    /// Whether a header names a key this schedule does not know for its height: a sign that
    /// the chain is behind (fetch it again) rather than of a forgery.
    pub fn is_behind(&self, signed: &SignedHeader) -> bool {
        let h = &signed.header;
        h.height > self.last_height() && h.operator_key_id != key_id(&self.current())
    }
}

/// The link a rotation batch makes: None if `body` has no rotation. `signed` is its header.
pub fn link_of(body: &BatchBody, signed: &SignedHeader) -> Option<KeyLink> {
    let Some(BatchItem::Rotate(e)) = body.items.last() else {
        return None;
    };
    let starts = body.item_starts();
    match body.confirmed(&body.proof_tree(), &starts, signed, e.receipt.index)? {
        crate::batch::Confirmed::Rotation(link) => Some(*link),
        _ => None,
    }
}

/// The key that signs the header at `height` (at most one above `meta`'s): the newest
/// rotation's key when `height` is after it, else read back from the ledger's rotation batches
/// (rare: a threshold operator's header or checkpoint that waits for its signature across a
/// rotation).
pub fn key_for_height(
    store: &mut impl LedgerStore,
    meta: &LedgerMeta,
    genesis: PublicKey,
    height: u64,
) -> Result<PublicKey> {
    assert!(
        height <= meta.height + 1,
        "no key is known beyond the next header"
    );
    let (mut key, mut at) = (meta.operator.map_or(genesis, |r| r.key), meta.rotated_at());
    for _ in 0..=tally_wire::KEY_LINKS_MAX {
        if height > at {
            return Ok(key);
        }
        // The rotation at `at` names the one before it; read that one's key (the header need
        // not be signed yet: only the bodies are read).
        let previous = rotation_at(store, at)?.previous;
        key = match previous {
            0 => genesis,
            p => rotation_at(store, p)?.new_key,
        };
        at = previous;
    }
    Err(Error::corrupt("a key chain longer than 64 rotations"))
}

/// The rotation in the batch at `height`, which the ledger says has one.
fn rotation_at(store: &mut impl LedgerStore, height: u64) -> Result<crate::batch::RotateEntry> {
    let missing = || Error::missing(format_args!("the rotation batch at height {height}"));
    let body = BatchBody::decode(&store.body(height)?.ok_or_else(missing)?)?;
    match body.items.last() {
        Some(BatchItem::Rotate(e)) => Ok(e.clone()),
        _ => Err(Error::corrupt(format_args!(
            "batch {height} names no rotation, the ledger says it does"
        ))),
    }
}

/// Every rotation the ledger applied up to `meta`, oldest first, read back from the rotation
/// batches' headers and bodies (`meta.operator` names the newest, each the one before).
pub fn links(store: &mut impl LedgerStore, meta: &LedgerMeta) -> Result<Vec<KeyLink>> {
    let mut out: Vec<KeyLink> = Vec::new();
    let mut at = meta.rotated_at();
    while at > 0 {
        if out.len() >= tally_wire::KEY_LINKS_MAX {
            return Err(Error::corrupt("a key chain longer than 64 rotations"));
        }
        let missing = || Error::missing(format_args!("the rotation batch at height {at}"));
        let signed = store.header(at)?.ok_or_else(missing)?;
        let body = BatchBody::decode(&store.body(at)?.ok_or_else(missing)?)?;
        let link = link_of(&body, &signed).ok_or_else(|| {
            Error::corrupt(format_args!(
                "batch {at} names no rotation, its successor says it does"
            ))
        })?;
        if link.previous >= at {
            return Err(Error::corrupt(format_args!(
                "rotation at {at} follows a later one"
            )));
        }
        at = link.previous;
        out.push(link);
    }
    out.reverse();
    Ok(out)
}
