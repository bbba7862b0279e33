//! Batches: the unit of sequencing, replication, storage and signing.
//!
//! A sealed batch is fully determined: its body carries every request with its receipt (the
//! effects: balances after), and its header carries the Merkle root and the state digest. A
//! replica applying a committed body does not judge the requests again; it replays the effects
//! against its own state and checks that they lead to exactly the header's digest, so a replica
//! that would diverge stops instead ([`prepare_apply`]).

use std::collections::HashMap;

use tally_wire::{
    Confirmation, Hash, Header, Op, PublicKey, Receipt, Request, SignedHeader, WireError,
    HEADER_BYTES, RECEIPT_BYTES, REQUEST_BYTES,
};

use crate::crypto::{header_hash, request_hash, sha256, OperatorKey};
use crate::merkle::{leaf_hash, ProofTree, Tree};
use crate::ports::LedgerRead;
use crate::state::LedgerMeta;
use crate::{Error, Result};

/// No batch ever holds more requests than this, whatever the configuration says.
pub const BATCH_REQUESTS_LIMIT: u32 = 65_536;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchEntry {
    pub request: Request,
    pub receipt: Receipt,
}

/// What is replicated and stored for one batch: the unsigned header and the entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchBody {
    pub header: Header,
    pub entries: Vec<BatchEntry>,
}

impl BatchBody {
    /// header (192) || count u32 LE || count × (request 208 || receipt 80)
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            HEADER_BYTES + 4 + self.entries.len() * (REQUEST_BYTES + RECEIPT_BYTES),
        );
        out.extend_from_slice(&self.header.encode());
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            out.extend_from_slice(&e.request.encode());
            out.extend_from_slice(&e.receipt.encode());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<BatchBody> {
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
            return Err(WireError::Invalid {
                field: "batch.count",
                reason: "does not match the body length",
            }
            .into());
        }
        let mut entries = Vec::with_capacity(count as usize);
        for chunk in bytes[fixed..].chunks_exact(entry) {
            entries.push(BatchEntry {
                request: Request::decode(&chunk[..REQUEST_BYTES])?,
                receipt: Receipt::decode(&chunk[REQUEST_BYTES..])?,
            });
        }
        Ok(BatchBody { header, entries })
    }

    pub fn leaf_hashes(&self) -> Vec<Hash> {
        self.entries
            .iter()
            .map(|e| leaf_hash(&e.receipt.encode()))
            .collect()
    }

    /// One confirmation per entry, all from one tree.
    pub fn confirmations(&self, signed: &SignedHeader) -> Vec<Confirmation> {
        let tree = self.proof_tree();
        (0..self.entries.len() as u32)
            .map(|i| self.confirmation(&tree, signed, i))
            .collect()
    }

    /// The tree to take this body's proofs from ([`BatchBody::confirmation`]).
    pub fn proof_tree(&self) -> ProofTree {
        ProofTree::new(self.leaf_hashes())
    }

    /// The confirmation of entry `index`, its proof from `tree` (this body's
    /// [`BatchBody::proof_tree`]).
    pub fn confirmation(
        &self,
        tree: &ProofTree,
        signed: &SignedHeader,
        index: u32,
    ) -> Confirmation {
        let e = &self.entries[index as usize];
        Confirmation {
            replayed: false,
            request: e.request.clone(),
            receipt: e.receipt.clone(),
            header: signed.clone(),
            proof: tree.proof(index),
        }
    }
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
    /// The summary after the batch.
    pub meta: LedgerMeta,
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
    let replayed = replay_batch(body, meta, store, &operator.key_id())?;
    let signed_header = operator.sign_header(body.header.clone());
    let body_digest = sha256(&[&encoded_body]);
    Ok(BatchWrite {
        header_hash: replayed.meta.last_header_hash,
        signed_header,
        body: encoded_body,
        body_digest,
        accounts: replayed.accounts,
        requests: replayed.requests,
        meta: replayed.meta,
    })
}

/// What a committed batch does to the state it follows, checked (see [`replay_batch`]).
#[derive(Debug, Clone)]
pub struct Replayed {
    /// Final balance of each account the batch touched, each once, in first-touch order.
    pub accounts: Vec<(PublicKey, u64)>,
    pub requests: Vec<AppliedRequest>,
    /// The summary after the batch (`last_header_hash` is this batch's header's hash).
    pub meta: LedgerMeta,
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
    let h = &body.header;
    let diverged = |what: String| Err(Error::Diverged(format!("batch {}: {what}", h.height)));
    if h.height != meta.height + 1 {
        return diverged(format!("applied height is {}", meta.height));
    }
    if h.prev_hash != meta.last_header_hash {
        return diverged("previous header hash does not match the applied chain".into());
    }
    if &h.operator_key_id != operator_key_id {
        return diverged("the header names another operator key than this replica holds".into());
    }
    if h.request_count as usize != body.entries.len() {
        return diverged("request count does not match the entries".into());
    }
    let mut replay = Replay {
        next: meta.clone(),
        touched: HashMap::new(),
        order: Vec::new(),
    };
    replay.next.height = h.height;
    let mut requests = Vec::with_capacity(body.entries.len());
    for (i, e) in body.entries.iter().enumerate() {
        if !replay.entry(store, h.height, i, e)? {
            return diverged(format!(
                "entry {i}: the receipt does not describe its request or its balances do not \
                 follow from the applied state"
            ));
        }
        requests.push(AppliedRequest {
            signer: e.request.signer,
            id: e.request.id,
            index: i as u32,
            request_hash: e.receipt.request_hash,
        });
    }
    let Replay {
        mut next,
        touched,
        order,
    } = replay;
    // One term out and one in per account (the sum is additive): the digest per-request
    // updates would give, at a fraction of the hashing. In first-touch order, though any order
    // gives the same sum.
    for key in &order {
        let (before, after) = touched[key];
        next.account_changed(key, before, after);
    }
    if Tree::new(&body.leaf_hashes()).root() != h.merkle_root {
        return diverged("Merkle root does not match the receipts".into());
    }
    if next.state_digest() != h.state_digest {
        return diverged("state digest does not match the replayed state".into());
    }
    next.last_header_hash = header_hash(h);
    Ok(Replayed {
        accounts: order.iter().map(|k| (*k, touched[k].1)).collect(),
        requests,
        meta: next,
    })
}

/// Balances as a batch leaves them; the first touch of an account reads applied state.
struct Replay {
    next: LedgerMeta,
    /// Balance before the batch (None: did not exist) and now, per account touched.
    touched: HashMap<PublicKey, (Option<u64>, u64)>,
    order: Vec<PublicKey>,
}

impl Replay {
    /// Replays entry `i` of the batch at `height`; false if its receipt does not describe its
    /// request or its balances do not follow.
    fn entry(
        &mut self,
        store: &mut impl LedgerRead,
        height: u64,
        i: usize,
        e: &BatchEntry,
    ) -> Result<bool> {
        let (r, rc) = (&e.request, &e.receipt);
        if rc.request_hash != request_hash(r) || rc.height != height || rc.index != i as u32 {
            return Ok(false);
        }
        if rc.op != r.op {
            return Ok(false);
        }
        Ok(match r.op {
            Op::Deposit => {
                self.next.total_deposited += r.amount as u128;
                rc.signer_balance == 0
                    && self.change(store, r.to, rc.to_balance, |old| {
                        old.unwrap_or(0).checked_add(r.amount)
                    })?
            }
            Op::Transfer => {
                self.change(store, r.signer, rc.signer_balance, |old| {
                    old?.checked_sub(r.amount)
                })? && self.change(store, r.to, rc.to_balance, |old| {
                    old.unwrap_or(0).checked_add(r.amount)
                })?
            }
            Op::Withdraw => {
                self.next.total_withdrawn += r.amount as u128;
                rc.to_balance == 0
                    && self.change(store, r.signer, rc.signer_balance, |old| {
                        old?.checked_sub(r.amount)
                    })?
            }
        })
    }

    /// Moves `key` to `new` if `rule(old)` says that is the effect; returns false otherwise.
    fn change(
        &mut self,
        store: &mut impl LedgerRead,
        key: PublicKey,
        new: u64,
        rule: impl FnOnce(Option<u64>) -> Option<u64>,
    ) -> Result<bool> {
        let (before, old) = match self.touched.get(&key) {
            Some(&(before, now)) => (before, Some(now)),
            None => {
                let applied = store.account(&key)?;
                (applied, applied)
            }
        };
        if rule(old) != Some(new) {
            return Ok(false);
        }
        if self.touched.insert(key, (before, new)).is_none() {
            self.order.push(key);
        }
        Ok(true)
    }
}
