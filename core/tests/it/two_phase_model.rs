//! Two-phase transfers against a model, seeded: random reserves, posts (whole, partial, too
//! large), voids, renewals, acts by the named party and by strangers, and a clock that moves
//! between batches so that reserves expire by themselves. Every receipt's outcome, every expiry
//! the leader puts in a batch, and after every applied batch the balances, the reserves and
//! conservation (balances + held = deposits) must be the model's; a second replica applying
//! the same bytes must be identical.
//!
//! Replay a failure with `TALLY_SEED=<seed> cargo test -p tally-core --test it two_phase_model`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tally_core::batch::{prepare_apply, BatchItem};
use tally_core::crypto::{envelope_hash, sign_envelope};
use tally_core::ports::{LedgerStore, MemStore};
use tally_core::reserve::{Held, Reserve};
use tally_core::sequencer::Submitted;
use tally_wire::{Envelope, ErrorCode, Hash, Op, Operation, PublicKey};

use crate::common::{deposit, key, operator, pk, seed, Node, CHAIN};

const ACCOUNTS: u8 = 6;
const BATCHES: usize = 200;

/// The model: balances, reserves, and the time of the open batch.
#[derive(Default)]
struct Model {
    balances: HashMap<PublicKey, u64>,
    reserves: BTreeMap<(PublicKey, u128), Reserve>,
}

impl Model {
    fn held(&self) -> u128 {
        self.reserves.values().map(|r| r.held() as u128).sum()
    }

    /// Expiries due at `time`, in deadline order, applied.
    fn expire(&mut self, time: u64) -> Vec<(PublicKey, u128)> {
        let mut due: Vec<(u64, PublicKey, u128)> = self
            .reserves
            .iter()
            .filter_map(|(&(o, id), r)| r.open().map(|h| (h.expires_at_ms, o, id)))
            .filter(|(at, ..)| *at <= time)
            .collect();
        due.sort_unstable();
        for &(_, owner, id) in &due {
            let held = *self.reserves[&(owner, id)].open().unwrap();
            *self.balances.get_mut(&owner).unwrap() += held.amount;
            self.reserves.insert((owner, id), Reserve::Expired);
        }
        due.into_iter().map(|(_, o, id)| (o, id)).collect()
    }

    /// What `op` by `signer` does at batch time `time`: applied (None) or its code.
    fn apply(&mut self, signer: PublicKey, op: &Operation, time: u64) -> Option<ErrorCode> {
        if op.op == Op::Reserve {
            let Some(&from) = self.balances.get(&signer) else {
                return Some(ErrorCode::UnknownAccount);
            };
            if from < op.amount {
                return Some(ErrorCode::InsufficientFunds);
            }
            self.balances.insert(signer, from - op.amount);
            let held = Held {
                to: op.to,
                party: op.party,
                amount: op.amount,
                expires_at_ms: time + op.timeout_ms,
            };
            self.reserves.insert((signer, op.id), Reserve::Open(held));
            return None;
        }
        let owner = if op.party == [0; 32] {
            signer
        } else {
            op.party
        };
        let held = match self.reserves.get(&(owner, op.reserve_id)) {
            None => return Some(ErrorCode::ReserveNotFound),
            Some(Reserve::Expired) => return Some(ErrorCode::ReserveExpired),
            Some(Reserve::Open(h)) => *h,
            Some(_) => return Some(ErrorCode::ReserveClosed),
        };
        if signer != owner && signer != held.party {
            return Some(ErrorCode::NotAReserveParty);
        }
        if time >= held.expires_at_ms {
            return Some(ErrorCode::ReserveExpired);
        }
        let key = (owner, op.reserve_id);
        match op.op {
            Op::Post => {
                let posted = if op.amount == 0 {
                    held.amount
                } else {
                    op.amount
                };
                if posted > held.amount {
                    return Some(ErrorCode::PostExceedsReserve);
                }
                *self.balances.entry(held.to).or_default() += posted;
                *self.balances.get_mut(&owner).unwrap() += held.amount - posted;
                self.reserves.insert(key, Reserve::Posted);
            }
            Op::Void => {
                *self.balances.get_mut(&owner).unwrap() += held.amount;
                self.reserves.insert(key, Reserve::Voided);
            }
            _ => {
                let renewed = Held {
                    expires_at_ms: time + op.timeout_ms,
                    ..held
                };
                self.reserves.insert(key, Reserve::Open(renewed));
            }
        }
        None
    }
}

struct Run {
    rng: StdRng,
    seed: u64,
    node: Node,
    replica: MemStore,
    model: Model,
    next_id: u128,
    /// Reserves made so far: (owner, id).
    made: Vec<(PublicKey, u128)>,
    /// Per envelope of the open batch: what its receipt must say.
    expected: HashMap<Hash, Option<ErrorCode>>,
    expiries: Vec<(PublicKey, u128)>,
    counts: BTreeMap<String, u64>,
}

#[test]
fn two_phase_transfers_follow_the_model() {
    let seed = seed();
    eprintln!("two_phase_model: TALLY_SEED={seed}");
    let mut run = Run {
        rng: StdRng::seed_from_u64(seed),
        seed,
        node: Node::new(),
        replica: MemStore::default(),
        model: Model::default(),
        next_id: 1_000,
        made: Vec::new(),
        expected: HashMap::new(),
        expiries: Vec::new(),
        counts: BTreeMap::new(),
    };
    for a in 1..=ACCOUNTS {
        assert!(matches!(
            run.node.submit(deposit(a as u128, a, 1_000)),
            Submitted::Accepted { .. }
        ));
        run.model.balances.insert(pk(a), 1_000);
    }
    run.seal_and_check();
    for _ in 0..BATCHES {
        run.node.time_ms += run.rng.gen_range(0..300);
        for _ in 0..run.rng.gen_range(1..8) {
            run.step();
        }
        run.seal_and_check();
    }
    for what in [
        "applied",
        "reserve_expired",
        "reserve_closed",
        "post_exceeds_reserve",
        "not_a_reserve_party",
        "expiry",
    ] {
        assert!(
            run.counts.contains_key(what),
            "seed {seed}: nothing {what}: {:?}",
            run.counts
        );
    }
}

impl Run {
    fn account(&mut self) -> u8 {
        self.rng.gen_range(1..=ACCOUNTS)
    }

    /// One random two-phase operation, submitted as an independent envelope of one.
    fn step(&mut self) {
        let signer = self.account();
        let op = self.operation(signer);
        // The batch's time is fixed when it opens, and its due expiries are put in first.
        if self.node.seq.open_len() == 0 {
            let time = self.node.time_ms.max(self.last_time());
            self.expiries = self.model.expire(time);
        }
        let time = self.node.time_ms.max(self.last_time());
        let code = self.model.apply(pk(signer), &op, time);
        let mut e = Envelope {
            chain_id: CHAIN,
            signer: pk(signer),
            atomic: false,
            ops: vec![op],
            signature: [0; 64],
        };
        sign_envelope(&key(signer), &mut e);
        let hash = envelope_hash(&e);
        let got = self.node.seq.submit_envelope(
            Arc::new(e),
            hash,
            0,
            self.node.time_ms,
            &mut self.node.store,
        );
        assert!(
            matches!(got, Ok(Submitted::Accepted { .. })),
            "seed {}: {got:?}",
            self.seed
        );
        self.expected.insert(hash, code);
        *self
            .counts
            .entry(code.map_or("applied".into(), |c| c.name().into()))
            .or_default() += 1;
        if op.op == Op::Reserve && code.is_none() {
            self.made.push((pk(signer), op.id));
        }
    }

    /// The time of the last sealed batch (the sequencer's floor for the next).
    fn last_time(&mut self) -> u64 {
        let h = self.node.seq.sealed_height();
        self.node
            .pending
            .back()
            .map(|b| b.header.time_unix_ms)
            .unwrap_or_else(|| {
                tally_core::ports::LedgerRead::header_time(&mut self.node.store, h).unwrap()
            })
    }

    fn operation(&mut self, signer: u8) -> Operation {
        self.next_id += 1;
        let mut o = Operation::single(Op::Reserve, self.next_id, [0; 32], 0);
        let pick = self.rng.gen_range(0..10);
        if pick < 4 || self.made.is_empty() {
            let mut to = self.account();
            while to == signer {
                to = self.account();
            }
            let party = self.account();
            (o.to, o.amount, o.timeout_ms) = (
                pk(to),
                self.rng.gen_range(1..700),
                self.rng.gen_range(50..4_000),
            );
            o.party = if party != signer && party != to {
                pk(party)
            } else {
                [0; 32]
            };
            return o;
        }
        // Mostly recent reserves, which are more likely still open.
        let recent = self.made.len().saturating_sub(8);
        let from = if self.rng.gen_bool(0.8) { recent } else { 0 };
        let (owner, id) = self.made[self.rng.gen_range(from..self.made.len())];
        o.op = [Op::Post, Op::Post, Op::Void, Op::Renew][self.rng.gen_range(0..4)];
        o.reserve_id = id;
        o.party = if owner == pk(signer) { [0; 32] } else { owner };
        match o.op {
            Op::Post => o.amount = [0, self.rng.gen_range(1..800)][self.rng.gen_range(0..2)],
            Op::Renew => o.timeout_ms = self.rng.gen_range(50..4_000),
            _ => {}
        }
        o
    }

    /// Seals, applies on both replicas, and compares with the model.
    fn seal_and_check(&mut self) {
        let Some(h) = self.node.seal() else { return };
        let ctx = format!("seed {} height {h}", self.seed);
        let body = self.node.pending.back().unwrap().clone();
        let expiries: Vec<_> = body
            .items
            .iter()
            .filter_map(|i| match i {
                BatchItem::Expire(e) => Some((e.owner, e.id)),
                _ => None,
            })
            .collect();
        assert_eq!(
            expiries,
            std::mem::take(&mut self.expiries),
            "{ctx}: expiries"
        );
        *self.counts.entry("expiry".into()).or_default() += expiries.len() as u64;
        for item in &body.items {
            if let BatchItem::Envelope(e) = item {
                assert_eq!(
                    e.receipts[0].failed, self.expected[&e.hash],
                    "{ctx}: {:?}",
                    e.envelope.ops[0]
                );
            }
        }
        self.expected.clear();
        let (_, write) = self.node.apply_next().unwrap();
        let meta = self.replica.meta().unwrap();
        let w2 = prepare_apply(
            &body,
            write.body.clone(),
            &meta,
            &mut self.replica,
            &operator(),
        )
        .unwrap();
        assert_eq!(
            w2.meta.encode(),
            write.meta.encode(),
            "{ctx}: the replica's state"
        );
        self.replica.apply(&w2).unwrap();
        let store = &mut self.node.store;
        assert_eq!(store.accounts, self.model.balances, "{ctx}: balances");
        let reserves: BTreeMap<_, _> = store.reserves.iter().map(|(k, v)| (*k, *v)).collect();
        assert_eq!(reserves, self.model.reserves, "{ctx}: reserves");
        let total: u128 =
            store.accounts.values().map(|b| *b as u128).sum::<u128>() + self.model.held();
        assert_eq!(total, write.meta.expected_total(), "{ctx}: conservation");
        assert_eq!(
            store.balance_total().unwrap(),
            total,
            "{ctx}: the store's sum"
        );
    }
}
