//! Batches: the unit of sequencing, replication, storage and signing.
//!
//! A sealed batch is fully determined: its body carries every request with its receipt (the
//! effects: balances after), and its header carries the Merkle root and the state digest. A
//! replica applying a committed body does not judge the requests again; it replays the effects
//! against its own state and checks that they lead to exactly the header's digest, so a replica
//! that would diverge stops instead ([`prepare_apply`]).

use std::collections::HashMap;
use std::iter::{Copied, Zip};
use std::sync::Arc;

use tally_wire::{
    Confirmation, Envelope, EnvelopeConfirmation, Hash, Header, Op, Operation, PublicKey, Receipt,
    Request, SignedHeader, WireError, HEADER_BYTES, RECEIPT_BYTES, REQUEST_BYTES,
};

use crate::crypto::{header_hash, request_hash, rotate_hash, sha256, OperatorKey};
use crate::merkle::{leaf_hash, ProofTree, Tree};
use crate::ports::LedgerRead;
use crate::reserve::{expire_hash, Held, Reserve, ReserveChange, HELD_BYTES};
use crate::rules::{judge, judge_expiry, Balances, Effect};
use crate::state::LedgerMeta;
use crate::state_map::StateMap;
use crate::{Error, Result};

/// No batch ever holds more operations (Merkle leaves) than this, whatever the configuration
/// says.
pub const BATCH_REQUESTS_LIMIT: u32 = 65_536;
/// Domain tag that starts a body in the layout with envelopes (PROTOCOL.md §12).
pub const BODY_V2_DOMAIN: [u8; 16] = *b"tally/body/v2\0\0\0";
const TAG_REQUEST: u8 = 1;
const TAG_ENVELOPE: u8 = 2;
const TAG_EXPIRE: u8 = 3;
const TAG_ROTATE: u8 = 4;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchEntry {
    pub request: Request,
    pub receipt: Receipt,
}

/// An envelope in a batch: one receipt per operation, in the envelope's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeEntry {
    pub envelope: Arc<Envelope>,
    /// SHA-256 of the envelope's wire bytes, as every receipt names it.
    pub hash: Hash,
    pub receipts: Vec<Receipt>,
    /// The record each applied `post`, `void` and `renew` found (its reserve before it), in
    /// operation order: a body says whom a post paid without the state it was judged on.
    pub held: Vec<Held>,
}

impl EnvelopeEntry {
    /// How many records [`EnvelopeEntry::held`] must have: one per applied post, void or renew.
    pub fn held_count(ops: &[Operation], receipts: &[Receipt]) -> usize {
        ops.iter()
            .zip(receipts)
            .filter(|(o, r)| matches!(o.op, Op::Post | Op::Void | Op::Renew) && r.failed.is_none())
            .count()
    }
}

/// A reserve that passed its deadline, expired by the batch: no client signed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpireEntry {
    pub owner: PublicKey,
    pub id: u128,
    /// The reserve as it was open.
    pub held: Held,
    pub receipt: Receipt,
}

/// The batch names a new operator key (PROTOCOL.md §4.14): this batch's header is the last the
/// old key signs, `new_key` signs every later one. Leader-made, last in its batch, at most one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotateEntry {
    pub new_key: PublicKey,
    /// The height of the rotation before (0: none; the old key is the genesis key).
    pub previous: u64,
    /// 1 for the ledger's first rotation, then 2, ...
    pub number: u32,
    pub receipt: Receipt,
}

impl RotateEntry {
    /// Rotation `number` of the ledger, the one before it at height `previous`, in height
    /// `height`'s batch with its receipt at leaf `index`.
    pub fn new(new_key: PublicKey, previous: u64, number: u32, at: (u64, u32)) -> RotateEntry {
        let (height, index) = at;
        RotateEntry {
            new_key,
            previous,
            number,
            receipt: Receipt {
                request_hash: rotate_hash(&new_key, previous, number),
                height,
                index,
                op: Op::Rotate,
                failed: None,
                op_index: 0,
                signer_balance: 0,
                to_balance: 0,
            },
        }
    }
}

/// What a client signed, with what applying it did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)] // requests are most items: not boxed
pub enum BatchItem {
    Request(BatchEntry),
    Envelope(EnvelopeEntry),
    /// Leader-made, first in its batch (PROTOCOL.md §4.10).
    Expire(ExpireEntry),
    /// Leader-made, last in its batch (PROTOCOL.md §4.14).
    Rotate(RotateEntry),
}

impl BatchItem {
    /// Its receipts: the Merkle leaves it adds, in order.
    pub fn receipts(&self) -> &[Receipt] {
        match self {
            BatchItem::Request(e) => std::slice::from_ref(&e.receipt),
            BatchItem::Envelope(e) => &e.receipts,
            BatchItem::Expire(e) => std::slice::from_ref(&e.receipt),
            BatchItem::Rotate(e) => std::slice::from_ref(&e.receipt),
        }
    }

    /// The signer; for an expiry, the reserve's owner; for a rotation, the new key.
    pub fn signer(&self) -> &PublicKey {
        match self {
            BatchItem::Request(e) => &e.request.signer,
            BatchItem::Envelope(e) => &e.envelope.signer,
            BatchItem::Expire(e) => &e.owner,
            BatchItem::Rotate(e) => &e.new_key,
        }
    }

    /// SHA-256 of what the client sent: the request's 208 bytes or the envelope's.
    pub fn hash(&self) -> Hash {
        match self {
            BatchItem::Request(e) => request_hash(&e.request),
            BatchItem::Envelope(e) => e.hash,
            BatchItem::Expire(e) => expire_hash(&e.owner, e.id),
            BatchItem::Rotate(e) => rotate_hash(&e.new_key, e.previous, e.number),
        }
    }

    /// Its signed operations with their receipts; none for an expiry or a rotation, which use no
    /// id.
    pub fn operations(&self) -> Operations<'_> {
        match self {
            BatchItem::Request(e) => Operations::One(Some((e.request.operation(), &e.receipt))),
            BatchItem::Envelope(e) => {
                Operations::Many(e.envelope.ops.iter().copied().zip(e.receipts.iter()))
            }
            BatchItem::Expire(_) | BatchItem::Rotate(_) => Operations::One(None),
        }
    }
}

/// An item's operations with their receipts ([`BatchItem::operations`]), without a vector:
/// every replica's apply, the archive and the archive writer walk them once per request.
pub enum Operations<'a> {
    One(Option<(Operation, &'a Receipt)>),
    Many(Zip<Copied<std::slice::Iter<'a, Operation>>, std::slice::Iter<'a, Receipt>>),
}

impl<'a> Iterator for Operations<'a> {
    type Item = (Operation, &'a Receipt);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Operations::One(one) => one.take(),
            Operations::Many(many) => many.next(),
        }
    }
}

/// One answer to a client: a request's confirmation or an envelope's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirmed {
    Request(Box<Confirmation>),
    Envelope(Box<EnvelopeConfirmation>),
    /// An admin's key rotation: the link that proves it (PROTOCOL.md §4.14).
    Rotation(Box<tally_wire::KeyLink>),
}

impl Confirmed {
    /// The hash of what was submitted: a resubmission must match it.
    pub fn submitted_hash(&self) -> Hash {
        match self {
            Confirmed::Request(c) => c.receipt.request_hash,
            Confirmed::Envelope(c) => c.envelope_hash,
            Confirmed::Rotation(l) => l.receipt.request_hash,
        }
    }

    pub fn set_replayed(&mut self) {
        match self {
            Confirmed::Request(c) => c.replayed = true,
            Confirmed::Envelope(c) => c.replayed = true,
            Confirmed::Rotation(_) => {}
        }
    }
}

/// What is replicated and stored for one batch: the unsigned header and the items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchBody {
    pub header: Header,
    pub items: Vec<BatchItem>,
}

impl BatchBody {
    /// A body of requests only is written in the first layout, `header (192) || count u32 LE
    /// || count × (request 208 || receipt 80)`, so that batches without envelopes keep the
    /// bytes they always had; a body with an envelope in the second (PROTOCOL.md §12).
    pub fn encode(&self) -> Vec<u8> {
        let requests_only = self
            .items
            .iter()
            .all(|i| matches!(i, BatchItem::Request(_)));
        let mut out = Vec::with_capacity(16 + HEADER_BYTES + 8 + self.leaf_count() * 300);
        if !requests_only {
            out.extend_from_slice(&BODY_V2_DOMAIN);
        }
        out.extend_from_slice(&self.header.encode());
        out.extend_from_slice(&(self.items.len() as u32).to_le_bytes());
        for item in &self.items {
            match item {
                BatchItem::Request(e) => {
                    if !requests_only {
                        out.push(TAG_REQUEST);
                    }
                    out.extend_from_slice(&e.request.encode());
                    out.extend_from_slice(&e.receipt.encode());
                }
                BatchItem::Envelope(e) => {
                    let bytes = e.envelope.encode();
                    out.push(TAG_ENVELOPE);
                    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                    out.extend_from_slice(&bytes);
                    for r in &e.receipts {
                        out.extend_from_slice(&r.encode());
                    }
                    for h in &e.held {
                        out.extend_from_slice(&h.encode());
                    }
                }
                BatchItem::Expire(e) => {
                    out.push(TAG_EXPIRE);
                    out.extend_from_slice(&e.owner);
                    out.extend_from_slice(&e.id.to_le_bytes());
                    out.extend_from_slice(&e.held.encode());
                    out.extend_from_slice(&e.receipt.encode());
                }
                BatchItem::Rotate(e) => {
                    out.push(TAG_ROTATE);
                    out.extend_from_slice(&e.new_key);
                    out.extend_from_slice(&e.previous.to_le_bytes());
                    out.extend_from_slice(&e.number.to_le_bytes());
                    out.extend_from_slice(&e.receipt.encode());
                }
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<BatchBody> {
        match bytes.strip_prefix(&BODY_V2_DOMAIN[..]) {
            Some(rest) => decode_v2(rest),
            None => decode_v1(bytes),
        }
    }

    /// Whether an encoded body may end with a rotation (PROTOCOL.md §4.14): a check of a few
    /// bytes at its end, so that a reader of many bodies decodes only the few that may. False
    /// means it certainly does not; true is confirmed by decoding.
    pub fn may_hold_rotation(encoded: &[u8]) -> bool {
        const ROTATION_BYTES: usize = 1 + 32 + 8 + 4 + RECEIPT_BYTES;
        encoded.starts_with(&BODY_V2_DOMAIN)
            && encoded.len() >= ROTATION_BYTES
            && encoded[encoded.len() - ROTATION_BYTES] == TAG_ROTATE
            && encoded[encoded.len() - RECEIPT_BYTES + 60] == Op::Rotate as u8
    }

    /// Item `i`, which must be a request (for bodies known to hold requests only).
    pub fn entry(&self, i: usize) -> &BatchEntry {
        match &self.items[i] {
            BatchItem::Request(e) => e,
            _ => panic!("item {i} is not a request"),
        }
    }

    /// Item `i`, which must be a request, to change (tests forge bodies with it).
    pub fn entry_mut(&mut self, i: usize) -> &mut BatchEntry {
        match &mut self.items[i] {
            BatchItem::Request(e) => e,
            _ => panic!("item {i} is not a request"),
        }
    }

    /// One confirmation per item a client submitted (expiries and rotations have none), all
    /// from one tree.
    pub fn confirmations(&self, signed: &SignedHeader) -> Vec<Confirmed> {
        let (tree, starts) = (self.proof_tree(), self.item_starts());
        starts
            .iter()
            .filter_map(|&leaf| self.confirmed(&tree, &starts, signed, leaf))
            .filter(|c| !matches!(c, Confirmed::Rotation(_)))
            .collect()
    }

    /// Number of Merkle leaves: receipts over all items.
    pub fn leaf_count(&self) -> usize {
        self.items.iter().map(|i| i.receipts().len()).sum()
    }

    pub fn receipts(&self) -> impl Iterator<Item = &Receipt> {
        self.items.iter().flat_map(|i| i.receipts())
    }

    /// Every operation with its signer and receipt, in leaf order.
    pub fn operations(&self) -> impl Iterator<Item = (&PublicKey, Operation, &Receipt)> {
        self.items.iter().flat_map(|item| {
            let signer = item.signer();
            item.operations().map(move |(op, r)| (signer, op, r))
        })
    }

    /// Where each operation's `(signer, id)` was applied: the request index's rows.
    pub fn records(&self) -> Vec<(PublicKey, u128, crate::ports::RequestRecord)> {
        let mut out = Vec::with_capacity(self.leaf_count());
        for (item, first) in self.items.iter().zip(self.item_starts()) {
            let (signer, hash) = (*item.signer(), item.hash());
            for (i, (op, _)) in item.operations().enumerate() {
                let record = crate::ports::RequestRecord {
                    height: self.header.height,
                    index: first + i as u32,
                    request_hash: hash,
                };
                out.push((signer, op.id, record));
            }
        }
        out
    }

    pub fn leaf_hashes(&self) -> Vec<Hash> {
        self.receipts().map(|r| leaf_hash(&r.encode())).collect()
    }

    /// The tree to take this body's proofs from ([`BatchBody::confirmed`]).
    pub fn proof_tree(&self) -> ProofTree {
        ProofTree::new(self.leaf_hashes())
    }

    /// The first leaf of each item, for [`BatchBody::confirmed`].
    pub fn item_starts(&self) -> Vec<u32> {
        let mut at = 0u32;
        self.items
            .iter()
            .map(|i| {
                let start = at;
                at += i.receipts().len() as u32;
                start
            })
            .collect()
    }

    /// The item whose first leaf is `leaf`, if one is (`starts` from [`BatchBody::item_starts`]).
    pub fn item_at(&self, starts: &[u32], leaf: u32) -> Option<&BatchItem> {
        let i = starts.binary_search(&leaf).ok()?;
        self.items.get(i)
    }

    /// The confirmation of the item that starts at leaf `leaf`, its proof from `tree` (this
    /// body's [`BatchBody::proof_tree`]). None if no item starts there.
    pub fn confirmed(
        &self,
        tree: &ProofTree,
        starts: &[u32],
        signed: &SignedHeader,
        leaf: u32,
    ) -> Option<Confirmed> {
        Some(match self.item_at(starts, leaf)? {
            BatchItem::Request(e) => Confirmed::Request(Box::new(Confirmation {
                replayed: false,
                request: e.request.clone(),
                receipt: e.receipt.clone(),
                header: signed.clone(),
                proof: tree.proof(leaf),
            })),
            BatchItem::Envelope(e) => Confirmed::Envelope(Box::new(EnvelopeConfirmation {
                replayed: false,
                envelope_hash: e.hash,
                header: signed.clone(),
                receipts: e.receipts.clone(),
                proof: tree.range_proof(leaf, e.receipts.len() as u32),
            })),
            BatchItem::Rotate(e) => Confirmed::Rotation(Box::new(tally_wire::KeyLink {
                header: signed.clone(),
                new_key: e.new_key,
                previous: e.previous,
                number: e.number,
                receipt: e.receipt.clone(),
                proof: tree.proof(leaf),
            })),
            BatchItem::Expire(_) => return None,
        })
    }
}

fn malformed(field: &'static str, reason: &'static str) -> Error {
    WireError::Invalid { field, reason }.into()
}

fn decode_v1(bytes: &[u8]) -> Result<BatchBody> {
    let fixed = HEADER_BYTES + 4;
    if bytes.len() < fixed {
        return Err(WireError::Truncated {
            field: "batch.header",
        }
        .into());
    }
    let header = Header::decode(&bytes[..HEADER_BYTES])?;
    let count = u32::from_le_bytes(bytes[HEADER_BYTES..fixed].try_into().expect("4"));
    let entry = REQUEST_BYTES + RECEIPT_BYTES;
    if count > BATCH_REQUESTS_LIMIT || bytes.len() != fixed + count as usize * entry {
        return Err(malformed("batch.count", "does not match the body length"));
    }
    let mut items = Vec::with_capacity(count as usize);
    for chunk in bytes[fixed..].chunks_exact(entry) {
        items.push(BatchItem::Request(BatchEntry {
            request: Request::decode(&chunk[..REQUEST_BYTES])?,
            receipt: Receipt::decode(&chunk[REQUEST_BYTES..])?,
        }));
    }
    Ok(BatchBody { header, items })
}

/// A cursor over a body's bytes in the second layout.
struct Cut<'a>(&'a [u8]);

impl<'a> Cut<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(WireError::Truncated { field }.into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4, field)?.try_into().expect("4"),
        ))
    }
}

fn decode_v2(bytes: &[u8]) -> Result<BatchBody> {
    let mut cut = Cut(bytes);
    let header = Header::decode(cut.take(HEADER_BYTES, "batch.header")?)?;
    let count = cut.u32("batch.count")?;
    if count > BATCH_REQUESTS_LIMIT || count > header.request_count {
        return Err(malformed("batch.count", "more items than leaves"));
    }
    let mut items = Vec::with_capacity(count as usize);
    let mut leaves = 0usize;
    for _ in 0..count {
        let item = decode_item(&mut cut)?;
        if matches!(items.last(), Some(BatchItem::Rotate(_))) {
            return Err(malformed("batch.rotate", "an item after the rotation"));
        }
        leaves += item.receipts().len();
        if leaves > header.request_count as usize {
            return Err(malformed(
                "batch.count",
                "more receipts than the header's leaves",
            ));
        }
        items.push(item);
    }
    if !cut.0.is_empty() {
        return Err(malformed("batch", "bytes after the last item"));
    }
    Ok(BatchBody { header, items })
}

/// One item of a body in the second layout: its tag, then its fields (PROTOCOL.md §12).
fn decode_item(cut: &mut Cut<'_>) -> Result<BatchItem> {
    Ok(match cut.take(1, "batch.tag")?[0] {
        TAG_REQUEST => BatchItem::Request(BatchEntry {
            request: Request::decode(cut.take(REQUEST_BYTES, "batch.request")?)?,
            receipt: Receipt::decode(cut.take(RECEIPT_BYTES, "batch.receipt")?)?,
        }),
        TAG_ENVELOPE => BatchItem::Envelope(decode_envelope(cut)?),
        TAG_EXPIRE => BatchItem::Expire(ExpireEntry {
            owner: cut.take(32, "batch.expire.owner")?.try_into().expect("32"),
            id: u128::from_le_bytes(cut.take(16, "batch.expire.id")?.try_into().expect("16")),
            held: Held::decode(cut.take(HELD_BYTES, "batch.expire.held")?)?,
            receipt: Receipt::decode(cut.take(RECEIPT_BYTES, "batch.receipt")?)?,
        }),
        TAG_ROTATE => BatchItem::Rotate(RotateEntry {
            new_key: cut
                .take(32, "batch.rotate.new_key")?
                .try_into()
                .expect("32"),
            previous: u64::from_le_bytes(
                cut.take(8, "batch.rotate.previous")?.try_into().expect("8"),
            ),
            number: cut.u32("batch.rotate.number")?,
            receipt: Receipt::decode(cut.take(RECEIPT_BYTES, "batch.receipt")?)?,
        }),
        _ => {
            return Err(malformed(
                "batch.tag",
                "not 1 (request), 2 (envelope), 3 (expiry) or 4 (rotation)",
            ))
        }
    })
}

/// An envelope item after its tag: length, envelope, a receipt per operation, the records of
/// its applied posts, voids and renewals.
fn decode_envelope(cut: &mut Cut<'_>) -> Result<EnvelopeEntry> {
    let len = cut.u32("batch.envelope_len")? as usize;
    let raw = cut.take(len, "batch.envelope")?;
    let envelope = Envelope::decode(raw)?;
    let receipts = (0..envelope.ops.len())
        .map(|_| Ok(Receipt::decode(cut.take(RECEIPT_BYTES, "batch.receipt")?)?))
        .collect::<Result<Vec<_>>>()?;
    let held = (0..EnvelopeEntry::held_count(&envelope.ops, &receipts))
        .map(|_| Held::decode(cut.take(HELD_BYTES, "batch.held")?))
        .collect::<Result<Vec<_>>>()?;
    Ok(EnvelopeEntry {
        hash: sha256(&[raw]),
        envelope: Arc::new(envelope),
        receipts,
        held,
    })
}

/// A request applied by a batch, as the request index stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedRequest {
    pub signer: PublicKey,
    pub id: u128,
    pub index: u32,
    pub request_hash: Hash,
}

/// Everything one batch changes in durable state; written in one atomic, synced write.
#[derive(Debug, Clone)]
pub struct BatchWrite {
    pub signed_header: SignedHeader,
    pub header_hash: Hash,
    /// The encoded [`BatchBody`] and its SHA-256 (the body table is content-addressed).
    pub body: Vec<u8>,
    pub body_digest: Hash,
    /// Final balance of each account the batch touched, each account once.
    pub accounts: Vec<(PublicKey, u64)>,
    pub requests: Vec<AppliedRequest>,
    /// Each reserve the batch made or changed, once: its state before the batch and after.
    pub reserves: Vec<ReserveChange>,
    /// The summary after the batch.
    pub meta: LedgerMeta,
    /// How much the sum of all balances and of what open reserves hold changed (after minus
    /// before, over what the batch touched): a store keeps the sum with it, apart from the
    /// totals of deposits and withdrawals, so that conservation is checked, not assumed.
    pub balance_change: i128,
    /// The body's receipt leaf hashes in leaf order (`BatchBody::leaf_hashes`), as the replay
    /// checked them against the header's Merkle root: the history's receipt index is keyed by
    /// them, and hashing every receipt again there cost the archive thread ~8%.
    pub leaf_hashes: Vec<Hash>,
}

/// Replays a committed batch against the applied state and prepares its durable write, signing
/// its header. Fails with [`Error::Diverged`] if the batch does not follow from this state.
pub fn prepare_apply(
    body: &BatchBody,
    encoded_body: Vec<u8>,
    meta: &LedgerMeta,
    store: &mut impl LedgerRead,
    operator: &OperatorKey,
) -> Result<BatchWrite> {
    prepare_apply_sealed(
        body,
        encoded_body,
        meta,
        store,
        HeaderKey::Sign(operator),
        None,
    )
}

/// How a replica's apply signs the header it replays.
#[derive(Clone, Copy)]
pub enum HeaderKey<'a> {
    /// With the whole operator key.
    Sign(&'a OperatorKey),
    /// Not at all (a threshold operator's replica, `crate::signing`): the header is written
    /// unsigned ([`UNSIGNED`]) and must name the key of this id.
    Unsigned([u8; 8]),
}

/// The signature of a header applied but not signed yet (never a valid Ed25519 signature).
pub const UNSIGNED: tally_wire::Signature = [0; 64];

impl HeaderKey<'_> {
    fn key_id(&self) -> [u8; 8] {
        match self {
            HeaderKey::Sign(key) => key.key_id(),
            HeaderKey::Unsigned(id) => *id,
        }
    }

    fn sign(&self, header: Header) -> SignedHeader {
        match self {
            HeaderKey::Sign(key) => key.sign_header(header),
            HeaderKey::Unsigned(_) => SignedHeader {
                header,
                signature: UNSIGNED,
            },
        }
    }
}

/// [`prepare_apply`] on the replica whose sequencer sealed the batch: `sealed` is the state map
/// its sequencer computed after it. The replay still checks every receipt against the applied
/// state and the state digest against the header, but takes the map instead of hashing the
/// batch's changes into it a second time (a debug build does both and asserts they agree).
pub fn prepare_apply_sealed(
    body: &BatchBody,
    encoded_body: Vec<u8>,
    meta: &LedgerMeta,
    store: &mut impl LedgerRead,
    operator: HeaderKey,
    sealed: Option<StateMap>,
) -> Result<BatchWrite> {
    let replayed = replay(body, meta, store, &operator.key_id(), sealed)?;
    let signed_header = operator.sign(body.header.clone());
    let body_digest = sha256(&[&encoded_body]);
    Ok(BatchWrite {
        header_hash: replayed.meta.last_header_hash,
        signed_header,
        body: encoded_body,
        body_digest,
        accounts: replayed.accounts,
        requests: replayed.requests,
        reserves: replayed.reserves,
        meta: replayed.meta,
        balance_change: replayed.balance_change,
        leaf_hashes: replayed.leaf_hashes,
    })
}

/// What a committed batch does to the state it follows, checked (see [`replay_batch`]).
#[derive(Debug, Clone)]
pub struct Replayed {
    /// Final balance of each account the batch touched, each once, in first-touch order.
    pub accounts: Vec<(PublicKey, u64)>,
    pub requests: Vec<AppliedRequest>,
    /// Each reserve touched, once, in first-touch order.
    pub reserves: Vec<ReserveChange>,
    /// The summary after the batch (`last_header_hash` is this batch's header's hash).
    pub meta: LedgerMeta,
    /// The touched accounts' balances and reserves' holdings after the batch minus before it.
    pub balance_change: i128,
    /// The body's receipt leaf hashes, in leaf order (checked against the Merkle root).
    pub leaf_hashes: Vec<Hash>,
}

/// Replays a committed batch against the applied state without signing anything: the receipts
/// must follow from the state, and the Merkle root and state digest must be the header's. A
/// replica's apply and an auditor's replay of the archive share this one rule.
pub fn replay_batch(
    body: &BatchBody,
    meta: &LedgerMeta,
    store: &mut impl LedgerRead,
    operator_key_id: &[u8; 8],
) -> Result<Replayed> {
    replay(body, meta, store, operator_key_id, None)
}

fn replay(
    body: &BatchBody,
    meta: &LedgerMeta,
    store: &mut impl LedgerRead,
    operator_key_id: &[u8; 8],
    sealed: Option<StateMap>,
) -> Result<Replayed> {
    let h = &body.header;
    let diverged = |what: String| Err(Error::Diverged(format!("batch {}: {what}", h.height)));
    if let Some(what) = header_mismatch(body, meta, operator_key_id) {
        return diverged(what);
    }
    let previous = store.header_time(meta.height)?;
    if h.time_unix_ms < previous {
        return diverged(format!(
            "time {} before the previous batch's {previous}",
            h.time_unix_ms
        ));
    }
    let mut replay = Replay {
        next: meta.clone(),
        signing_key_id: h.operator_key_id,
        time_ms: h.time_unix_ms,
        touched: HashMap::new(),
        order: Vec::new(),
        reserves: HashMap::new(),
        reserve_order: Vec::new(),
        store,
    };
    replay.next.height = h.height;
    let mut requests = Vec::with_capacity(body.leaf_count());
    for (item, first) in body.items.iter().zip(body.item_starts()) {
        let hash = item.hash();
        if let Err(what) = replay.item(h.height, first, item, hash)? {
            return diverged(format!("leaf {first}: {what}"));
        }
        for (i, (op, _)) in item.operations().enumerate() {
            requests.push(AppliedRequest {
                signer: *item.signer(),
                id: op.id,
                index: first + i as u32,
                request_hash: hash,
            });
        }
    }
    let (mut next, accounts, reserves, balance_change) = replay.finish(sealed);
    let leaf_hashes = body.leaf_hashes();
    if Tree::new(&leaf_hashes).root() != h.merkle_root {
        return diverged("Merkle root does not match the receipts".into());
    }
    if next.state_digest() != h.state_digest {
        return diverged("state digest does not match the replayed state".into());
    }
    next.last_header_hash = header_hash(h);
    Ok(Replayed {
        accounts,
        requests,
        reserves,
        meta: next,
        balance_change,
        leaf_hashes,
    })
}

/// What is wrong with a body's header against the applied state, if anything.
fn header_mismatch(
    body: &BatchBody,
    meta: &LedgerMeta,
    operator_key_id: &[u8; 8],
) -> Option<String> {
    let h = &body.header;
    if h.height != meta.height + 1 {
        return Some(format!("applied height is {}", meta.height));
    }
    if h.prev_hash != meta.last_header_hash {
        return Some("previous header hash does not match the applied chain".into());
    }
    if &h.operator_key_id != operator_key_id {
        return Some("the header names another operator key than this replica holds".into());
    }
    if h.request_count as usize != body.leaf_count() {
        return Some("request count does not match the receipts".into());
    }
    None
}

/// Balances and reserves as a batch leaves them; the first touch reads applied state.
struct Replay<'s, S> {
    next: LedgerMeta,
    /// The id of the key that signs this batch's header.
    signing_key_id: [u8; 8],
    time_ms: u64,
    /// Balance before the batch (None: did not exist) and now, per account touched.
    touched: HashMap<PublicKey, (Option<u64>, u64)>,
    order: Vec<PublicKey>,
    /// State before the batch and now, per reserve touched.
    reserves: HashMap<(PublicKey, u128), (Option<Reserve>, Reserve)>,
    reserve_order: Vec<(PublicKey, u128)>,
    store: &'s mut S,
}

impl<S: LedgerRead> Balances for Replay<'_, S> {
    fn balance(&mut self, key: &PublicKey) -> Result<Option<u64>> {
        match self.touched.get(key) {
            Some(&(_, now)) => Ok(Some(now)),
            None => self.store.account(key),
        }
    }
    fn reserve(&mut self, owner: &PublicKey, id: u128) -> Result<Option<Reserve>> {
        match self.reserves.get(&(*owner, id)) {
            Some(&(_, now)) => Ok(Some(now)),
            None => self.store.reserve(owner, id),
        }
    }
}

type Checked = Result<std::result::Result<(), String>>;

impl<S: LedgerRead> Replay<'_, S> {
    /// Replays one item whose first leaf is `first` (`hash` its [`BatchItem::hash`]):
    /// `Ok(Err(why))` if a receipt does not describe its operation or is not what the rule
    /// gives.
    fn item(&mut self, height: u64, first: u32, item: &BatchItem, hash: Hash) -> Checked {
        let (atomic, held) = match item {
            BatchItem::Request(_) => (true, &[][..]),
            BatchItem::Envelope(e) => (e.envelope.atomic, &e.held[..]),
            BatchItem::Expire(e) => return self.expiry(height, first, e),
            BatchItem::Rotate(e) => return Ok(self.rotation(height, first, e)),
        };
        let mut held = held.iter();
        let signer = *item.signer();
        for (i, (op, rc)) in item.operations().enumerate() {
            let at = (hash, height, first + i as u32, op.op, i as u16);
            if (rc.request_hash, rc.height, rc.index, rc.op, rc.op_index) != at {
                return Ok(Err("the receipt does not describe its operation".into()));
            }
            match (judge(&signer, &op, self.time_ms, self)?, rc.failed) {
                (Ok(effect), None) if same_balances(&effect, rc) => {
                    if let Err(why) = check_held(&op, &effect, &mut held) {
                        return Ok(Err(why));
                    }
                    self.apply(&effect)
                }
                (Err(r), Some(code)) if r.code == code && !atomic => {
                    if (rc.signer_balance, rc.to_balance) != (0, 0) {
                        return Ok(Err("a failed operation's receipt shows balances".into()));
                    }
                }
                _ => {
                    return Ok(Err(
                        "the receipt is not what the operation does to the applied state".into(),
                    ))
                }
            }
        }
        if held.next().is_some() {
            return Ok(Err(
                "more reserve records than applied posts, voids and renewals".into(),
            ));
        }
        Ok(Ok(()))
    }

    /// A rotation: its receipt what it names, the rotation before it the one the state holds,
    /// a key other than the current one; the state then holds it. Last in its batch (decoding
    /// refuses an item after it, and `replay` checks it against the leaf count).
    fn rotation(
        &mut self,
        height: u64,
        first: u32,
        e: &RotateEntry,
    ) -> std::result::Result<(), String> {
        let expected = RotateEntry::new(e.new_key, e.previous, e.number, (height, first));
        if e.receipt != expected.receipt {
            return Err("the receipt does not describe its rotation".into());
        }
        if (e.previous, e.number) != (self.next.rotated_at(), self.next.rotations() + 1) {
            return Err("the rotation does not follow the ledger's last one".into());
        }
        if e.number as usize > tally_wire::KEY_LINKS_MAX {
            return Err("more rotations than a key chain holds".into());
        }
        if crate::crypto::key_id(&e.new_key) == self.signing_key_id {
            return Err("the rotation names the key that signs already".into());
        }
        self.next.operator = Some(crate::state::Rotation {
            key: e.new_key,
            height,
            number: e.number,
        });
        Ok(())
    }

    /// An expiry: its reserve open and due at the batch's time, its receipt what it does.
    fn expiry(&mut self, height: u64, first: u32, e: &ExpireEntry) -> Checked {
        let rc = &e.receipt;
        let at = (
            expire_hash(&e.owner, e.id),
            height,
            first,
            Op::Expire,
            0,
            None,
        );
        if (
            rc.request_hash,
            rc.height,
            rc.index,
            rc.op,
            rc.op_index,
            rc.failed,
        ) != at
        {
            return Ok(Err("the receipt does not describe its expiry".into()));
        }
        match judge_expiry(&e.owner, e.id, self.time_ms, self)? {
            Ok(effect)
                if same_balances(&effect, rc)
                    && effect.reserve.and_then(|c| c.before) == Some(Reserve::Open(e.held)) =>
            {
                self.apply(&effect);
                Ok(Ok(()))
            }
            Ok(_) => Ok(Err(
                "the expiry's receipt or record is not its reserve's".into()
            )),
            Err(r) => Ok(Err(format!("an expiry that cannot apply: {}", r.message))),
        }
    }

    fn apply(&mut self, effect: &Effect) {
        for &(key, before, after) in &effect.changes {
            let entry = self.touched.entry(key).or_insert_with(|| {
                self.order.push(key);
                (before, after)
            });
            entry.1 = after;
        }
        if let Some(c) = effect.reserve {
            let entry = self.reserves.entry((c.owner, c.id)).or_insert_with(|| {
                self.reserve_order.push((c.owner, c.id));
                (c.before, c.after)
            });
            entry.1 = c.after;
        }
        self.next.total_deposited += effect.deposited as u128;
        self.next.total_withdrawn += effect.withdrawn as u128;
    }

    /// The summary after the batch (each account and reserve touched written into the state map
    /// once, with its final value), each account's and reserve's change, and the change of
    /// the sum of balances and holdings.
    fn finish(
        self,
        sealed: Option<StateMap>,
    ) -> (LedgerMeta, Vec<(PublicKey, u64)>, Vec<ReserveChange>, i128) {
        let Replay {
            mut next,
            touched,
            order,
            reserves,
            reserve_order,
            ..
        } = self;
        // With the sequencer's map, a release build does not hash the changes again; a debug
        // build does, and takes the sealed map only if it is the same (else the digest check
        // reports the divergence).
        let hash_changes = sealed.is_none() || cfg!(debug_assertions);
        let mut balance_change = 0i128;
        for key in &order {
            let (before, after) = touched[key];
            if hash_changes {
                next.account_changed(key, before, after);
            } else {
                next.account_counted(before);
            }
            balance_change += after as i128 - before.unwrap_or(0) as i128;
        }
        let changes: Vec<ReserveChange> = reserve_order
            .iter()
            .map(|&(owner, id)| {
                let (before, after) = reserves[&(owner, id)];
                ReserveChange {
                    owner,
                    id,
                    before,
                    after,
                }
            })
            .collect();
        for c in &changes {
            if hash_changes {
                next.reserve_changed(&c.owner, c.id, &c.after);
            }
            balance_change += c.held_change();
        }
        next.map.flush();
        if let Some(map) = sealed {
            if !hash_changes || map.root() == next.map.root() {
                next.map = map;
            }
        }
        let accounts = order.iter().map(|k| (*k, touched[k].1)).collect();
        (next, accounts, changes, balance_change)
    }
}

fn same_balances(effect: &Effect, rc: &Receipt) -> bool {
    (effect.signer_balance, effect.to_balance) == (rc.signer_balance, rc.to_balance)
}

/// A post, void or renewal must come with the record it found, as its body says.
fn check_held<'a>(
    op: &Operation,
    effect: &Effect,
    held: &mut impl Iterator<Item = &'a Held>,
) -> std::result::Result<(), String> {
    if !matches!(op.op, Op::Post | Op::Void | Op::Renew) {
        return Ok(());
    }
    let found = effect.reserve.and_then(|c| c.before);
    match held.next() {
        Some(h) if found == Some(Reserve::Open(*h)) => Ok(()),
        _ => Err("the body's reserve record is not the one the operation found".into()),
    }
}
