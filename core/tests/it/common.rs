//! Keys, request builders and a one-node harness shared by the areas.

use std::collections::VecDeque;

use ed25519_dalek::SigningKey;
use tally_core::batch::{prepare_apply, BatchBody, BatchWrite};
use tally_core::crypto::{sign_request, OperatorKey};
use tally_core::ports::{LedgerStore, MemStore};
use tally_core::sequencer::{Sequencer, SequencerConfig, Submitted};
use tally_wire::{Confirmation, Hash, Op, PublicKey, Request};

pub const CHAIN: Hash = [7; 32];
/// The seed of the operator deposit key.
pub const DEPOSIT: u8 = 200;
/// The seed of the operator's header signing key.
pub const OPERATOR: u8 = 250;

pub fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

pub fn pk(seed: u8) -> PublicKey {
    key(seed).verifying_key().to_bytes()
}

pub fn operator() -> OperatorKey {
    OperatorKey::new(key(OPERATOR))
}

pub fn signed(signer: &SigningKey, op: Op, id: u128, to: PublicKey, amount: u64) -> Request {
    let mut r = Request {
        chain_id: CHAIN,
        op,
        id,
        signer: signer.verifying_key().to_bytes(),
        to,
        amount,
        signature: [0; 64],
    };
    sign_request(signer, &mut r);
    r
}

pub fn deposit(id: u128, to: u8, amount: u64) -> Request {
    signed(&key(DEPOSIT), Op::Deposit, id, pk(to), amount)
}

pub fn transfer(id: u128, from: u8, to: u8, amount: u64) -> Request {
    signed(&key(from), Op::Transfer, id, pk(to), amount)
}

pub fn withdraw(id: u128, from: u8, amount: u64) -> Request {
    signed(&key(from), Op::Withdraw, id, [0; 32], amount)
}

pub fn config(operator: &OperatorKey) -> SequencerConfig {
    SequencerConfig {
        chain_id: CHAIN,
        operator_key_id: operator.key_id(),
        batch_requests_max: 1_000,
        accounts_cached_max: 1_000,
        recent_heights_kept: 4,
    }
}

/// A single replica without replication: a sequencer over a [`MemStore`], with the sealed but not
/// yet applied batches in a queue (the pipeline depth is up to the test).
pub struct Node {
    pub seq: Sequencer,
    pub store: MemStore,
    pub operator: OperatorKey,
    pub pending: VecDeque<BatchBody>,
    /// The clock the sequencer opens batches by: 100 ms on per sealed batch.
    pub time_ms: u64,
}

impl Node {
    pub fn new() -> Node {
        Node::with_config(|_| {})
    }

    pub fn with_config(tweak: impl FnOnce(&mut SequencerConfig)) -> Node {
        let operator = operator();
        let mut cfg = config(&operator);
        tweak(&mut cfg);
        let mut store = MemStore::default();
        let seq = Sequencer::new(cfg, store.meta().expect("mem store"));
        Node {
            seq,
            store,
            operator,
            pending: VecDeque::new(),
            time_ms: 1_700_000_000_100,
        }
    }

    /// Submits as if the snapshot stage had not looked at the request (snapshot height 0).
    pub fn submit(&mut self, request: Request) -> Submitted {
        self.submit_at(request, 0)
    }

    pub fn submit_at(&mut self, request: Request, snapshot_height: u64) -> Submitted {
        self.seq
            .submit(request, snapshot_height, self.time_ms, &mut self.store)
            .expect("mem store does not fail")
    }

    /// Seals the open batch into the pending queue; returns its height, or None if it was empty.
    pub fn seal(&mut self) -> Option<u64> {
        let height = self.seq.sealed_height() + 1;
        let body = self.seq.seal(1)?;
        self.time_ms += 100;
        assert_eq!(body.header.height, height);
        self.pending.push_back(body);
        Some(height)
    }

    /// Applies the oldest pending batch as a replica would: through its encoded bytes.
    pub fn apply_next(&mut self) -> Option<(BatchBody, BatchWrite)> {
        let body = self.pending.pop_front()?;
        let encoded = body.encode();
        let decoded = BatchBody::decode(&encoded).expect("a sealed body decodes");
        assert_eq!(decoded, body, "encode/decode round trip");
        let meta = self.store.meta().expect("mem store");
        let write = prepare_apply(&decoded, encoded, &meta, &mut self.store, &self.operator)
            .expect("a sealed batch applies to the state it was sealed against");
        self.store.apply(&write).expect("mem store");
        self.seq.applied(write.meta.height);
        Some((body, write))
    }

    pub fn seal_and_apply_all(&mut self) -> Vec<(BatchBody, BatchWrite)> {
        self.seal();
        std::iter::from_fn(|| self.apply_next()).collect()
    }

    pub fn balance(&self, seed: u8) -> Option<u64> {
        self.store.accounts.get(&pk(seed)).copied()
    }
}

/// A copy of a store, so that each tampering attempt starts from the same state.
pub fn clone_store(s: &MemStore) -> MemStore {
    MemStore {
        meta: s.meta.clone(),
        accounts: s.accounts.clone(),
        requests: s.requests.clone(),
        headers: s.headers.clone(),
        bodies: s.bodies.clone(),
        reserves: s.reserves.clone(),
        checkpoints: s.checkpoints.clone(),
        checkpointed: s.checkpointed,
    }
}

/// Sum of every balance in a store, widened so that it cannot overflow.
pub fn total_balance(s: &MemStore) -> u128 {
    s.accounts.values().map(|b| *b as u128).sum()
}

/// The seed of a randomized test: `TALLY_SEED`, else a random one. The tests print it, so that
/// a failing run can be replayed.
/// The confirmations of a body of requests only.
pub fn request_confirmations(
    body: &BatchBody,
    signed: &tally_wire::SignedHeader,
) -> Vec<Confirmation> {
    body.confirmations(signed)
        .into_iter()
        .map(|c| match c {
            tally_core::batch::Confirmed::Request(c) => *c,
            tally_core::batch::Confirmed::Envelope(_) => panic!("an envelope"),
            tally_core::batch::Confirmed::Rotation(_) => panic!("a rotation"),
        })
        .collect()
}

pub fn seed() -> u64 {
    match std::env::var("TALLY_SEED") {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("TALLY_SEED={s:?} is not a u64")),
        Err(_) => rand::random(),
    }
}
