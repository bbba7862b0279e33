//! Envelopes in a run's history, and the invariants over them that live and simulated runs
//! share (the live verdict names them `envelopes_atomic`, `envelopes_whole` and
//! `failed_operations_change_nothing`):
//!
//! - an atomic envelope is never partly applied: all its operations are in the final chain,
//!   as consecutive leaves of one batch under the envelope's hash and none marked failed, or
//!   none is;
//! - an independent envelope's operations are all in the final chain, consecutively, or none;
//! - a failed operation's receipt (`receipt.failed`) changes no balance: both its balances are
//!   zero, and the model leaves it out (so balances that equal the model's show it moved
//!   nothing);
//! - an envelope's fate agrees with the chain: confirmed ones are where their confirmation
//!   says with the same per-operation results, ones settled as not applied are absent.
//!
//! "Applied twice" is checked with the requests' keys: [`ChainIndex`] holds every operation of
//! the final chain by `(signer, id)` and notes a key it meets twice.

use std::collections::BTreeMap;
use std::sync::Arc;

use tally_core::batch::BatchBody;
use tally_wire::{Envelope, ErrorCode, Hash, PublicKey};

use crate::history::{Effect, Model};
use crate::load::OpState;

/// One operation as the final chain holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainOp {
    pub height: u64,
    /// Its leaf in the batch.
    pub index: u32,
    /// The hash of the item that carried it: the request's, or its envelope's.
    pub item_hash: Hash,
    pub failed: Option<ErrorCode>,
    pub signer_balance: u64,
    pub to_balance: u64,
}

/// Every operation of the final chain by `(signer, id)`.
#[derive(Debug, Default)]
pub struct ChainIndex {
    pub ops: BTreeMap<(PublicKey, u128), ChainOp>,
    /// Keys met twice, described.
    pub twice: Vec<String>,
}

impl ChainIndex {
    /// Adds the operations of the batch at `body.header.height`.
    pub fn add(&mut self, body: &BatchBody) {
        let height = body.header.height;
        for (signer, op, r) in body.operations() {
            let found = ChainOp {
                height,
                index: r.index,
                item_hash: r.request_hash,
                failed: r.failed,
                signer_balance: r.signer_balance,
                to_balance: r.to_balance,
            };
            if let Some(before) = self.ops.insert((*signer, op.id), found) {
                self.twice.push(format!(
                    "an operation was applied twice: at height {} index {} and at height \
                     {height} index {}",
                    before.height, before.index, r.index
                ));
            }
        }
    }

    pub fn get(&self, signer: &PublicKey, id: u128) -> Option<&ChainOp> {
        self.ops.get(&(*signer, id))
    }
}

/// An envelope the harness sent, and what it learned of its fate.
#[derive(Debug, Clone)]
pub struct SentEnvelope {
    /// The client that owns it.
    pub client: usize,
    pub envelope: Arc<Envelope>,
    pub hash: Hash,
    /// Operation `i`'s effect on balances when it applies.
    pub effects: Vec<Effect>,
    /// `Confirmed` names the first leaf; `Rejected` / `ResolvedNotApplied` an atomic failure
    /// (or a used id) that applied nothing.
    pub state: OpState,
    /// Per operation, the failure its confirmed receipt names (empty until confirmed).
    pub failed: Vec<Option<ErrorCode>>,
    /// Copies sent.
    pub sent: u32,
}

impl SentEnvelope {
    pub fn new(client: usize, envelope: Envelope, effects: Vec<Effect>) -> SentEnvelope {
        assert_eq!(
            envelope.ops.len(),
            effects.len(),
            "one effect per operation"
        );
        let hash = tally_core::crypto::envelope_hash(&envelope);
        SentEnvelope {
            client,
            envelope: Arc::new(envelope),
            hash,
            effects,
            state: OpState::InFlight,
            failed: Vec::new(),
            sent: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.effects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.effects.is_empty()
    }

    /// Adds the effects of the operations that applied, if it is known to be applied.
    pub fn apply_to(&self, model: &mut Model) {
        if self.state.confirmed().is_none() {
            return;
        }
        for (i, effect) in self.effects.iter().enumerate() {
            if self.failed.get(i).copied().flatten().is_none() {
                model.apply(*effect);
            }
        }
    }

    /// How many operations applied (0 unless confirmed).
    pub fn applied_ops(&self) -> usize {
        match self.state.confirmed() {
            Some(_) => self.failed.iter().filter(|f| f.is_none()).count(),
            None => 0,
        }
    }
}

/// The envelope invariants' problems, one list per invariant.
#[derive(Debug, Default)]
pub struct EnvelopeVerdict {
    /// `envelopes_atomic`: atomic envelopes partly applied, split, or with a failed operation.
    pub atomic: Vec<String>,
    /// `envelopes_whole`: independent envelopes partly applied or split.
    pub whole: Vec<String>,
    /// `failed_operations_change_nothing`: failed receipts that name a balance.
    pub failed_ops: Vec<String>,
    /// Confirmations or settled refusals the final chain contradicts.
    pub fate: Vec<String>,
    /// Envelopes in the final chain (atomic, independent), and failed operations among them.
    pub in_chain: (u64, u64),
    pub failed_in_chain: u64,
}

/// Checks every envelope against the final chain.
pub fn check(envelopes: &[SentEnvelope], chain: &ChainIndex) -> EnvelopeVerdict {
    let mut v = EnvelopeVerdict::default();
    for (i, e) in envelopes.iter().enumerate() {
        let found: Vec<Option<&ChainOp>> = e
            .envelope
            .ops
            .iter()
            .map(|op| chain.get(&e.envelope.signer, op.id))
            .collect();
        let present = found.iter().flatten().count();
        let kind = if e.envelope.atomic {
            "atomic"
        } else {
            "independent"
        };
        if present > 0 && present < e.len() {
            let problems = if e.envelope.atomic {
                &mut v.atomic
            } else {
                &mut v.whole
            };
            problems.push(format!(
                "{kind} envelope #{i} is partly applied: {present} of its {} operations are in \
                 the final chain",
                e.len()
            ));
        }
        if present == e.len() {
            let ops: Vec<&ChainOp> = found.into_iter().flatten().collect();
            check_applied(i, e, &ops, &mut v);
        } else if let Some(c) = e.state.confirmed() {
            v.fate.push(format!(
                "{kind} envelope #{i} was confirmed at height {} index {} but the final chain \
                 holds {present} of its {} operations",
                c.height,
                c.index,
                e.len()
            ));
        }
    }
    v
}

/// The checks of an envelope whose operations are all in the chain (`ops`, in its order).
fn check_applied(i: usize, e: &SentEnvelope, ops: &[&ChainOp], v: &mut EnvelopeVerdict) {
    let first = ops[0];
    let consecutive = ops.iter().enumerate().all(|(k, o)| {
        o.height == first.height && o.index == first.index + k as u32 && o.item_hash == e.hash
    });
    let atomic = e.envelope.atomic;
    let (kind, problems) = if atomic {
        ("atomic", &mut v.atomic)
    } else {
        ("independent", &mut v.whole)
    };
    if !consecutive {
        problems.push(format!(
            "{kind} envelope #{i}'s operations are not consecutive leaves of one batch under its \
             hash (first at height {} index {})",
            first.height, first.index
        ));
    }
    let failed: Vec<Option<ErrorCode>> = ops.iter().map(|o| o.failed).collect();
    if atomic && failed.iter().any(Option::is_some) {
        v.atomic.push(format!(
            "atomic envelope #{i} is in the chain with a failed operation"
        ));
    }
    for (k, o) in ops.iter().enumerate() {
        if o.failed.is_some() && (o.signer_balance, o.to_balance) != (0, 0) {
            v.failed_ops.push(format!(
                "operation {k} of envelope #{i} failed ({:?}) but its receipt names balances \
                 {} and {}",
                o.failed, o.signer_balance, o.to_balance
            ));
        }
    }
    v.failed_in_chain += failed.iter().filter(|f| f.is_some()).count() as u64;
    if atomic {
        v.in_chain.0 += 1;
    } else {
        v.in_chain.1 += 1;
    }
    match e.state.confirmed() {
        Some(c) if (c.height, c.index) != (first.height, first.index) || e.failed != failed => {
            v.fate.push(format!(
                "{kind} envelope #{i} was confirmed at height {} index {} (failures {:?}) but \
                 the final chain has it at height {} index {} (failures {failed:?})",
                c.height, c.index, e.failed, first.height, first.index
            ))
        }
        None if e.state.applied() == Some(false) => v.fate.push(format!(
            "{kind} envelope #{i} was settled as not applied ({:?}) but the final chain \
             applies it at height {}",
            e.state, first.height
        )),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use tally_wire::{Op, Operation};

    fn envelope(atomic: bool) -> SentEnvelope {
        let key = SigningKey::from_bytes(&[7; 32]);
        let to = SigningKey::from_bytes(&[8; 32]).verifying_key().to_bytes();
        let ops: Vec<Operation> = (0..3)
            .map(|id| Operation {
                op: Op::Transfer,
                id: 100 + id,
                to,
                amount: 5,
                timeout_ms: 0,
                reserve_id: 0,
                party: [0; 32],
            })
            .collect();
        let effects = vec![
            Effect::Transfer {
                from: 0,
                to: 1,
                amount: 5
            };
            3
        ];
        let e = tally_client::envelope::build_envelope(&key, [1; 32], atomic, ops);
        SentEnvelope::new(0, e, effects)
    }

    /// The final chain holding operations `ops` of `e` at height 4 from leaf 10, with `failed`.
    fn chain(e: &SentEnvelope, ops: &[usize], failed: Option<ErrorCode>) -> ChainIndex {
        let mut c = ChainIndex::default();
        for &k in ops {
            let op = ChainOp {
                height: 4,
                index: 10 + k as u32,
                item_hash: e.hash,
                failed,
                signer_balance: 0,
                to_balance: 0,
            };
            c.ops.insert((e.envelope.signer, e.envelope.ops[k].id), op);
        }
        c
    }

    fn check_one(e: &SentEnvelope, c: &ChainIndex) -> EnvelopeVerdict {
        check(std::slice::from_ref(e), c)
    }

    #[test]
    fn a_half_applied_atomic_envelope_is_a_violation() {
        let e = envelope(true);
        let v = check_one(&e, &chain(&e, &[0, 1], None));
        assert_eq!(v.atomic.len(), 1, "{v:?}");
        assert!(v.atomic[0].contains("partly applied"), "{v:?}");
        let v = check_one(&e, &chain(&e, &[0, 1, 2], None));
        assert!(v.atomic.is_empty() && v.fate.is_empty(), "{v:?}");
        let v = check_one(&e, &chain(&e, &[], None));
        assert!(v.atomic.is_empty() && v.fate.is_empty(), "{v:?}");
    }

    #[test]
    fn an_atomic_envelope_with_a_failed_operation_is_a_violation() {
        let e = envelope(true);
        let v = check_one(
            &e,
            &chain(&e, &[0, 1, 2], Some(ErrorCode::InsufficientFunds)),
        );
        assert_eq!(v.atomic.len(), 1, "{v:?}");
    }

    #[test]
    fn a_split_or_partial_independent_envelope_is_a_violation() {
        let e = envelope(false);
        assert_eq!(check_one(&e, &chain(&e, &[2], None)).whole.len(), 1);
        let mut c = chain(&e, &[0, 1, 2], None);
        c.ops.values_mut().last().unwrap().index += 1;
        let v = check_one(&e, &c);
        assert!(v.whole[0].contains("not consecutive"), "{v:?}");
    }

    #[test]
    fn a_failed_operation_that_names_balances_is_a_violation() {
        let e = envelope(false);
        let mut c = chain(&e, &[0, 1, 2], Some(ErrorCode::InsufficientFunds));
        c.ops.values_mut().next().unwrap().to_balance = 5;
        let v = check_one(&e, &c);
        assert_eq!(v.failed_ops.len(), 1, "{v:?}");
        assert_eq!(v.failed_in_chain, 3);
    }

    #[test]
    fn fates_must_agree_with_the_chain() {
        let mut e = envelope(true);
        e.state = OpState::Rejected(ErrorCode::InsufficientFunds);
        let v = check_one(&e, &chain(&e, &[0, 1, 2], None));
        assert!(v.fate[0].contains("settled as not applied"), "{v:?}");
    }
}
