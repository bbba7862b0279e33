//! A seeded random workload (requests and envelopes, atomic and not) against a model of the
//! ledger. After every applied batch: the balances are conserved and are the model's, and a
//! second replica that applies the same encoded bodies through `prepare_apply_sealed` is byte for byte
//! the same. An envelope's answer (an atomic one's failing index, every receipt's outcome) must
//! be the model's too.
//!
//! Replay a failure with `TALLY_SEED=<seed> cargo test -p tally-core --test it conservation`;
//! every assertion message starts with the seed.

use std::collections::HashMap;

use ed25519_dalek::SigningKey;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::Arc;

use tally_core::batch::{prepare_apply_sealed, BatchBody, BatchItem, BatchWrite};
use tally_core::crypto::{envelope_hash, request_hash, sign_envelope, OperatorKey};
use tally_core::ports::{LedgerRead, LedgerStore, MemStore, RequestRecord};
use tally_core::sequencer::Submitted;
use tally_wire::{Envelope, ErrorCode, Op, Operation, PublicKey, Request};

use crate::common::{key, operator, signed, total_balance, Node, DEPOSIT};

const ACCOUNTS: u8 = 50;
const BATCHES: u64 = 60;
const BATCH_REQUESTS_MAX: u32 = 40;
const DEFAULT_SEEDS: [u64; 3] = [0x7a11_0001, 0x7a11_0002, 0x7a11_0003];

#[test]
fn conservation_and_determinism_under_a_random_workload() {
    match std::env::var("TALLY_SEED") {
        Ok(s) => run(s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("TALLY_SEED={s:?} is not a u64"))),
        Err(_) => DEFAULT_SEEDS.into_iter().for_each(run),
    }
}

/// What the sequencer must answer, as the model predicts it.
#[derive(Debug, PartialEq)]
enum Expect {
    Accepted,
    InFlight(u64, u32),
    Applied(RequestRecord),
    Rejected(ErrorCode),
}

struct Sim {
    seed: u64,
    rng: StdRng,
    node: Node,
    replica: MemStore,
    replica_operator: OperatorKey,
    keys: HashMap<PublicKey, SigningKey>,
    deposit_key: PublicKey,
    accounts: Vec<PublicKey>,
    /// Balances after the open batch.
    model: HashMap<PublicKey, u64>,
    deposited: u128,
    withdrawn: u128,
    /// Balances and totals after each sealed height.
    sealed: HashMap<u64, (HashMap<PublicKey, u64>, u128, u128)>,
    /// Every accepted request, with where it went.
    accepted: Vec<(Request, u64, u32)>,
    next_id: u128,
    counts: HashMap<&'static str, u64>,
}

fn run(seed: u64) {
    let node = Node::with_config(|c| {
        c.batch_requests_max = BATCH_REQUESTS_MAX;
        // Small, so that eviction and the store fallback for old request keys both happen.
        c.accounts_cached_max = 8;
        c.recent_heights_kept = 2;
    });
    let keys: HashMap<PublicKey, SigningKey> = (1..=ACCOUNTS)
        .chain([DEPOSIT])
        .map(|s| (key(s).verifying_key().to_bytes(), key(s)))
        .collect();
    let mut sim = Sim {
        seed,
        rng: StdRng::seed_from_u64(seed),
        node,
        replica: MemStore::default(),
        replica_operator: operator(),
        accounts: (1..=ACCOUNTS)
            .map(|s| key(s).verifying_key().to_bytes())
            .collect(),
        keys,
        deposit_key: key(DEPOSIT).verifying_key().to_bytes(),
        model: HashMap::new(),
        deposited: 0,
        withdrawn: 0,
        sealed: HashMap::new(),
        accepted: Vec::new(),
        next_id: 1,
        counts: HashMap::new(),
    };
    for _ in 0..BATCHES {
        let requests = sim.rng.gen_range(0..=BATCH_REQUESTS_MAX);
        for _ in 0..requests {
            sim.step();
        }
        if sim.node.seal().is_some() {
            let h = sim.node.seq.sealed_height();
            sim.sealed
                .insert(h, (sim.model.clone(), sim.deposited, sim.withdrawn));
        }
        // Up to two batches in flight, as while earlier batches replicate.
        let depth = sim.rng.gen_range(0..=2);
        while sim.node.pending.len() > depth {
            sim.apply_next();
        }
    }
    while !sim.node.pending.is_empty() {
        sim.apply_next();
    }
    sim.finish();
}

impl Sim {
    fn ctx(&self) -> String {
        format!(
            "TALLY_SEED={} (applied {}, sealed {})",
            self.seed,
            self.node.seq.applied_height(),
            self.node.seq.sealed_height()
        )
    }

    fn count(&mut self, what: &'static str) {
        *self.counts.entry(what).or_default() += 1;
    }

    fn account(&mut self) -> PublicKey {
        self.accounts[self.rng.gen_range(0..self.accounts.len())]
    }

    fn richest(&self) -> (PublicKey, u64) {
        let mut all: Vec<(PublicKey, u64)> = self.model.iter().map(|(k, b)| (*k, *b)).collect();
        // Ties broken by key, so that the run does not depend on the map's iteration order.
        all.sort_unstable_by_key(|(k, b)| (*b, *k));
        all.last().copied().unwrap_or((self.accounts[0], 0))
    }

    fn amount_for(&mut self, balance: u64) -> u64 {
        match self.rng.gen_range(0..10) {
            0 => balance.saturating_add(self.rng.gen_range(1..100)),
            1 if balance > 0 => balance,
            _ => self.rng.gen_range(1..=balance.clamp(1, 1_000)),
        }
    }

    fn fresh(&mut self, signer: PublicKey, op: Op, to: PublicKey, amount: u64) -> Request {
        self.next_id += 1;
        signed(&self.keys[&signer], op, self.next_id, to, amount)
    }

    fn step(&mut self) {
        let choice = self.rng.gen_range(0..100);
        if choice >= 95 {
            return self.envelope_step();
        }
        if choice < 10 && !self.accepted.is_empty() {
            let (request, h, i) = self.accepted[self.rng.gen_range(0..self.accepted.len())].clone();
            if choice < 6 {
                self.resubmit(request, h, i);
            } else {
                // Same signer and id, other content.
                let mut other = signed(
                    &self.keys[&request.signer],
                    request.op,
                    request.id,
                    request.to,
                    request.amount.checked_add(1).unwrap_or(1),
                );
                if choice == 9 && request.op == Op::Transfer {
                    other = signed(
                        &self.keys[&request.signer],
                        Op::Withdraw,
                        request.id,
                        [0; 32],
                        request.amount,
                    );
                }
                self.submit(other, Expect::Rejected(ErrorCode::IdConflict), 0);
            }
            return;
        }
        let request = match choice {
            0..=29 => {
                let mut to = self.account();
                let amount = match self.rng.gen_range(0..100) {
                    0 => u64::MAX - self.rng.gen_range(0..1_000),
                    // Just too much for the richest account, so that every run meets overflow.
                    1 | 2 => {
                        let (richest, balance) = self.richest();
                        to = richest;
                        (u64::MAX - balance).saturating_add(self.rng.gen_range(1..=10))
                    }
                    _ => self.rng.gen_range(1..=1_000),
                };
                self.fresh(self.deposit_key, Op::Deposit, to, amount)
            }
            30..=79 => {
                let (from, mut to) = (self.account(), self.account());
                while to == from {
                    to = self.account();
                }
                let amount = self.amount_for(self.model.get(&from).copied().unwrap_or(0));
                self.fresh(from, Op::Transfer, to, amount)
            }
            _ => {
                let from = self.account();
                let amount = self.amount_for(self.model.get(&from).copied().unwrap_or(0));
                self.fresh(from, Op::Withdraw, [0; 32], amount)
            }
        };
        let expect = self.predict(&request);
        let snapshot = if self.rng.gen_bool(0.5) {
            self.node.seq.applied_height()
        } else {
            0
        };
        self.submit(request, expect, snapshot);
    }

    /// Applies `request` to the model if the ledger rules allow it; says what the sequencer must
    /// answer.
    fn predict(&mut self, r: &Request) -> Expect {
        match model_op(&mut self.model, &r.signer, &r.operation()) {
            Ok((deposited, withdrawn)) => {
                self.deposited += deposited as u128;
                self.withdrawn += withdrawn as u128;
                Expect::Accepted
            }
            Err(code) => Expect::Rejected(code),
        }
    }

    /// An envelope of 2 to 6 transfers and withdrawals by one account, atomic or independent,
    /// judged by the model operation by operation (an atomic one on a copy, kept only if every
    /// operation applies) and submitted; the sequencer's answer and receipts must be the model's.
    fn envelope_step(&mut self) {
        let (signer, n) = (self.account(), self.rng.gen_range(2..=6u32));
        if !self.node.seq.fits(n) {
            self.seal();
        }
        let atomic = self.rng.gen_bool(0.5);
        let ops: Vec<Operation> = (0..n).map(|_| self.envelope_op(signer)).collect();
        let mut model = self.model.clone();
        let results: Vec<_> = ops
            .iter()
            .map(|op| model_op(&mut model, &signer, op))
            .collect();
        let first_failure = results.iter().position(Result::is_err);
        let mut e = Envelope {
            chain_id: crate::common::CHAIN,
            signer,
            atomic,
            ops,
            signature: [0; 64],
        };
        sign_envelope(&self.keys[&signer], &mut e);
        let hash = envelope_hash(&e);
        let snapshot = self.node.seq.applied_height();
        let got = self.node.seq.submit_envelope(
            Arc::new(e),
            hash,
            snapshot,
            self.node.time_ms,
            &mut self.node.store,
        );
        let got = got.expect("mem store");
        let ctx = self.ctx();
        match (atomic, first_failure, got) {
            (true, Some(i), Submitted::Failed { index, rejection }) => {
                assert_eq!(
                    (index as usize, Err(rejection.code)),
                    (i, results[i]),
                    "{ctx}"
                );
                self.count("envelope: atomic, failed");
                return;
            }
            (_, _, Submitted::Accepted { .. }) if !(atomic && first_failure.is_some()) => {}
            (_, _, other) => {
                panic!("{ctx}: envelope answered {other:?}, the model says {results:?}")
            }
        }
        for (deposited, withdrawn) in results.iter().flatten() {
            self.deposited += *deposited as u128;
            self.withdrawn += *withdrawn as u128;
        }
        self.model = model;
        // Seals the batch (with the model as it leaves it) to read the receipts.
        self.check_receipts(&results);
        self.count(if first_failure.is_some() {
            "envelope: some failed"
        } else {
            "envelope: applied"
        });
    }

    fn envelope_op(&mut self, signer: PublicKey) -> Operation {
        self.next_id += 1;
        let amount = self.amount_for(self.model.get(&signer).copied().unwrap_or(0) / 2);
        let mut to = self.account();
        while to == signer {
            to = self.account();
        }
        let (op, to) = if self.rng.gen_bool(0.7) {
            (Op::Transfer, to)
        } else {
            (Op::Withdraw, [0; 32])
        };
        Operation {
            op,
            id: self.next_id,
            to,
            amount,
            timeout_ms: 0,
            reserve_id: 0,
            party: [0; 32],
        }
    }

    /// The open batch's last item is the envelope just accepted: its receipts' outcomes must be
    /// the model's (the balances are checked after apply, against the model).
    fn check_receipts(&mut self, results: &[Result<(u64, u64), ErrorCode>]) {
        let h = self.node.seq.sealed_height() + 1;
        self.seal();
        let body = self.node.pending.back().expect("just sealed");
        assert_eq!(body.header.height, h);
        let Some(BatchItem::Envelope(entry)) = body.items.last() else {
            panic!("{}: the envelope is not the batch's last item", self.ctx())
        };
        let failed: Vec<_> = entry.receipts.iter().map(|r| r.failed).collect();
        let expected: Vec<_> = results.iter().map(|r| r.err()).collect();
        assert_eq!(failed, expected, "{}: receipts of an envelope", self.ctx());
    }

    /// Seals the open batch (if it has anything) and remembers the model as of it.
    fn seal(&mut self) {
        if self.node.seal().is_some() {
            let h = self.node.seq.sealed_height();
            self.sealed
                .insert(h, (self.model.clone(), self.deposited, self.withdrawn));
        }
    }

    fn resubmit(&mut self, request: Request, h: u64, i: u32) {
        let record = RequestRecord {
            height: h,
            index: i,
            request_hash: request_hash(&request),
        };
        let applied = h <= self.node.seq.applied_height();
        if self.rng.gen_bool(0.5) {
            // The snapshot stage looks first and answers an applied request itself.
            let found = self
                .node
                .store
                .request(&request.signer, request.id)
                .expect("mem store");
            assert_eq!(
                found,
                applied.then_some(record),
                "{}: snapshot lookup of {h}/{i}",
                self.ctx()
            );
            if applied {
                self.count("resubmitted, answered by the snapshot");
                return;
            }
            let snapshot = self.node.seq.applied_height();
            self.submit(request, Expect::InFlight(h, i), snapshot);
        } else {
            let expect = if applied {
                Expect::Applied(record)
            } else {
                Expect::InFlight(h, i)
            };
            self.submit(request, expect, 0);
        }
    }

    fn submit(&mut self, request: Request, expect: Expect, snapshot: u64) {
        let next = (
            self.node.seq.sealed_height() + 1,
            self.node.seq.open_len() as u32,
        );
        let got = self.node.submit_at(request.clone(), snapshot);
        let got = match got {
            Submitted::Accepted { height, index } => {
                assert_eq!(
                    (height, index),
                    next,
                    "{}: position of an accepted request",
                    self.ctx()
                );
                self.accepted.push((request.clone(), height, index));
                Expect::Accepted
            }
            Submitted::InFlight { height, index } => Expect::InFlight(height, index),
            Submitted::Applied(record) => Expect::Applied(record),
            Submitted::Rejected(r) => Expect::Rejected(r.code),
            Submitted::Failed { .. } => panic!("only envelopes fail by index"),
        };
        assert_eq!(
            got,
            expect,
            "{}: outcome of {:?} {} id {}",
            self.ctx(),
            request.op,
            request.amount,
            request.id
        );
        self.count(match got {
            Expect::Accepted => "accepted",
            Expect::InFlight(..) => "in flight",
            Expect::Applied(..) => "applied already",
            Expect::Rejected(ErrorCode::InsufficientFunds) => "insufficient funds",
            Expect::Rejected(ErrorCode::UnknownAccount) => "unknown account",
            Expect::Rejected(ErrorCode::AmountOverflow) => "overflow",
            Expect::Rejected(_) => "id conflict",
        });
        if self.node.seq.is_full() {
            self.seal();
        }
    }

    fn apply_next(&mut self) {
        let (_, write) = self.node.apply_next().expect("a pending batch");
        let ctx = self.ctx();
        let h = write.meta.height;
        self.check_applied(&write, &ctx);
        self.replicate(&write, &ctx);
        let (balances, deposited, withdrawn) = self.sealed.remove(&h).expect("sealed");
        for store in [&self.node.store, &self.replica] {
            let meta = store.meta.clone().expect("applied");
            assert_eq!(
                total_balance(store),
                meta.expected_total(),
                "{ctx}: conservation after {h}"
            );
            assert_eq!(
                (meta.total_deposited, meta.total_withdrawn),
                (deposited, withdrawn),
                "{ctx}: totals after {h}"
            );
            assert_eq!(
                store.accounts, balances,
                "{ctx}: balances after {h} are the model's"
            );
            assert_eq!(
                meta.account_count as usize,
                store.accounts.len(),
                "{ctx}: account count after {h}"
            );
        }
    }

    fn check_applied(&self, write: &BatchWrite, ctx: &str) {
        let h = write.meta.height;
        assert_eq!(
            write.signed_header.header.state_digest,
            write.meta.state_digest(),
            "{ctx}: digest of {h}"
        );
        assert_eq!(
            self.node.store.meta.as_ref(),
            Some(&write.meta),
            "{ctx}: stored meta of {h}"
        );
    }

    /// The second replica applies the same bytes and must come out the same, whether it is
    /// handed the leader's sealed state map, a wrong one (which it must not take) or none.
    fn replicate(&mut self, write: &BatchWrite, ctx: &str) {
        let h = write.meta.height;
        let body = BatchBody::decode(&write.body)
            .unwrap_or_else(|e| panic!("{ctx}: body {h} does not decode: {e}"));
        let meta = self.replica.meta().expect("mem store");
        let sealed = match h % 3 {
            0 => None,
            1 => Some(write.meta.map.clone()),
            _ => Some(tally_core::state_map::StateMap::from_entries(vec![(
                [h as u8; 32],
                [1; 32],
            )])),
        };
        let w2 = prepare_apply_sealed(
            &body,
            write.body.clone(),
            &meta,
            &mut self.replica,
            tally_core::batch::HeaderKey::Sign(&self.replica_operator),
            sealed,
        )
        .unwrap_or_else(|e| panic!("{ctx}: the replica refused batch {h}: {e}"));
        assert_eq!(
            w2.meta.encode(),
            write.meta.encode(),
            "{ctx}: replica meta after {h}"
        );
        assert_eq!(
            w2.signed_header, write.signed_header,
            "{ctx}: replica's signed header {h}"
        );
        assert_eq!(
            (&w2.accounts, &w2.requests),
            (&write.accounts, &write.requests),
            "{ctx}: replica's write {h}"
        );
        assert_eq!(w2.body_digest, write.body_digest, "{ctx}: body digest {h}");
        self.replica.apply(&w2).expect("mem store");
    }

    fn finish(&mut self) {
        let ctx = self.ctx();
        let (a, b) = (&mut self.node.store, &mut self.replica);
        let (ma, mb) = (a.meta().expect("mem"), b.meta().expect("mem"));
        assert!(
            ma.height > BATCHES / 2,
            "{ctx}: only {} batches were applied",
            ma.height
        );
        assert_eq!(ma.encode(), mb.encode(), "{ctx}: final meta");
        assert_eq!(ma.state_digest(), mb.state_digest(), "{ctx}: final digest");
        assert_eq!(a.accounts, b.accounts, "{ctx}: final balances");
        assert_eq!(a.requests, b.requests, "{ctx}: request index");
        assert_eq!(a.headers, b.headers, "{ctx}: headers");
        assert_eq!(a.bodies, b.bodies, "{ctx}: bodies");
        assert_eq!(
            *self.node.seq.meta(),
            ma,
            "{ctx}: the sequencer agrees with the store"
        );
        // The workload must have reached every rule, or this test proves less than it says.
        for what in [
            "accepted",
            "in flight",
            "applied already",
            "insufficient funds",
            "unknown account",
            "overflow",
            "id conflict",
            "envelope: applied",
            "envelope: some failed",
            "envelope: atomic, failed",
        ] {
            assert!(
                self.counts.get(what).copied().unwrap_or(0) > 0,
                "{ctx}: no request was {what}: {:?}",
                self.counts
            );
        }
    }
}

/// What `op` by `signer` does to the model's balances, by the ledger's rules: the amounts it
/// deposits and withdraws, or the error code it must get.
fn model_op(
    m: &mut HashMap<PublicKey, u64>,
    signer: &PublicKey,
    op: &Operation,
) -> Result<(u64, u64), ErrorCode> {
    let credit = |m: &HashMap<PublicKey, u64>| {
        m.get(&op.to)
            .copied()
            .unwrap_or(0)
            .checked_add(op.amount)
            .ok_or(ErrorCode::AmountOverflow)
    };
    if op.op == Op::Deposit {
        let to = credit(m)?;
        m.insert(op.to, to);
        return Ok((op.amount, 0));
    }
    let from = m.get(signer).copied().ok_or(ErrorCode::UnknownAccount)?;
    if from < op.amount {
        return Err(ErrorCode::InsufficientFunds);
    }
    if op.op == Op::Withdraw {
        m.insert(*signer, from - op.amount);
        return Ok((0, op.amount));
    }
    let to = credit(m)?;
    m.insert(*signer, from - op.amount);
    m.insert(op.to, to);
    Ok((0, 0))
}
