//! A test ledger: a sequencer fed with random, signed requests whose batches are replayed and
//! applied to a [`LedgerDb`] the way a replica does it.

use std::collections::HashMap;
use std::sync::Arc;

use ed25519_dalek::SigningKey;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tally_core::batch::{prepare_apply, BatchWrite};
use tally_core::crypto::{
    envelope_hash, header_hash, sign_envelope, sign_request, verify_header, OperatorKey,
};
use tally_core::ports::{LedgerRead, LedgerStore, RequestRecord};
use tally_core::sequencer::{Sequencer, SequencerConfig, Submitted};
use tally_core::state::LedgerMeta;
use tally_storage::LedgerDb;
use tally_wire::{Envelope, Hash, Op, Operation, PublicKey, Request};

pub const CHAIN_ID: [u8; 32] = [0x11; 32];
const ACCOUNTS: u8 = 16;

/// The seed of a randomized test: `TALLY_TEST_SEED` or a fixed default. Printed, so that a failing
/// run (whose output cargo shows) can be replayed.
pub fn seed() -> u64 {
    let seed = match std::env::var("TALLY_TEST_SEED") {
        Ok(s) => s.parse().expect("TALLY_TEST_SEED must be a u64"),
        Err(_) => 0x7a11_5eed,
    };
    println!("seed: {seed} (replay with TALLY_TEST_SEED={seed})");
    seed
}

pub fn operator() -> OperatorKey {
    OperatorKey::new(SigningKey::from_bytes(&[7; 32]))
}

/// The keys of every account the test ledger can touch.
pub fn account_keys() -> Vec<SigningKey> {
    (1..=ACCOUNTS)
        .map(|i| SigningKey::from_bytes(&[i; 32]))
        .collect()
}

pub struct Chain {
    seq: Sequencer,
    operator: OperatorKey,
    accounts: Vec<SigningKey>,
    depositor: SigningKey,
    rng: StdRng,
}

impl Chain {
    /// Continues the chain from the applied state `meta`.
    pub fn new(meta: LedgerMeta, seed: u64) -> Chain {
        let operator = operator();
        let cfg = SequencerConfig {
            chain_id: CHAIN_ID,
            operator_key_id: operator.key_id(),
            batch_requests_max: 64,
            accounts_cached_max: 8,
            recent_heights_kept: 4,
        };
        Chain {
            seq: Sequencer::new(cfg, meta),
            operator,
            accounts: account_keys(),
            depositor: SigningKey::from_bytes(&[200; 32]),
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Sequences one batch of `requests` (1..=64) random requests, some of which may be rejected,
    /// replays it against `db` and applies it.
    pub fn step(&mut self, db: &mut LedgerDb, requests: usize) -> BatchWrite {
        self.step_logged(db, requests, |_| {})
    }

    /// As [`Chain::step`], calling `log` with the encoded body before applying it, as a replica
    /// has its raft log hold a batch before applying it.
    pub fn step_logged(
        &mut self,
        db: &mut LedgerDb,
        requests: usize,
        log: impl FnOnce(&[u8]),
    ) -> BatchWrite {
        assert!((1..=64).contains(&requests));
        let height = self.seq.sealed_height() + 1;
        for i in 0..requests {
            let request = self.random_request(height, i as u32);
            match self
                .seq
                .submit(request, 0, height * 100, db)
                .expect("submit")
            {
                Submitted::Accepted { .. } | Submitted::Rejected(_) => {}
                other => panic!("fresh ids cannot be known already: {other:?}"),
            }
        }
        // The first request is a deposit, which is always accepted: the batch is never empty.
        let body = self.seq.seal(1).expect("a batch");
        let meta = db.meta().expect("meta");
        let encoded = body.encode();
        log(&encoded);
        let write = prepare_apply(&body, encoded, &meta, db, &self.operator).expect("replay");
        db.apply(&write).expect("apply");
        self.seq.applied(height);
        write
    }

    /// As [`Chain::step`], writing the header unsigned, as a threshold operator's replica does
    /// (`tally_core::signing`); [`Chain::signature`] is what its signature entry carries.
    pub fn step_unsigned(&mut self, db: &mut LedgerDb, requests: usize) -> BatchWrite {
        let height = self.seq.sealed_height() + 1;
        for i in 0..requests {
            let request = self.random_request(height, i as u32);
            self.seq
                .submit(request, 0, height * 100, db)
                .expect("submit");
        }
        let body = self.seq.seal(1).expect("a batch");
        let meta = db.meta().expect("meta");
        let key = tally_core::batch::HeaderKey::Unsigned(self.operator.key_id());
        let write =
            tally_core::batch::prepare_apply_sealed(&body, body.encode(), &meta, db, key, None)
                .expect("replay");
        db.apply(&write).expect("apply");
        self.seq.applied(height);
        write
    }

    /// The operator's signature of `header`.
    pub fn signature(&self, header: &tally_wire::Header) -> tally_wire::Signature {
        self.operator.sign_header(header.clone()).signature
    }

    /// Sequences one batch at time `unix_ms` (the sequencer keeps batch times monotonic): the
    /// expiries then due, then `envelopes`, each of which must be accepted; replays it against
    /// `db` and applies it.
    pub fn step_envelopes(
        &mut self,
        db: &mut LedgerDb,
        unix_ms: u64,
        envelopes: &[(Arc<Envelope>, Hash)],
    ) -> BatchWrite {
        let height = self.seq.sealed_height() + 1;
        self.seq
            .open_batch(
                unix_ms,
                envelopes.iter().map(|e| e.0.ops.len() as u32).sum(),
                db,
            )
            .expect("open");
        for (e, hash) in envelopes {
            match self.seq.submit_envelope(e.clone(), *hash, 0, unix_ms, db) {
                Ok(Submitted::Accepted { .. }) => {}
                other => panic!("envelope not accepted: {other:?}"),
            }
        }
        let body = self.seq.seal(1).expect("expiries or envelopes");
        let meta = db.meta().expect("meta");
        let encoded = body.encode();
        let write = prepare_apply(&body, encoded, &meta, db, &self.operator).expect("replay");
        db.apply(&write).expect("apply");
        self.seq.applied(height);
        write
    }

    fn random_request(&mut self, height: u64, index: u32) -> Request {
        let n = self.accounts.len();
        let a = self.rng.gen_range(0..n);
        let b = (a + self.rng.gen_range(1..n)) % n;
        let to = self.accounts[b].verifying_key().to_bytes();
        let (key, op, to, amount) = match self.rng.gen_range(0..10) {
            _ if index == 0 => (
                &self.depositor,
                Op::Deposit,
                to,
                self.rng.gen_range(1..=1000),
            ),
            0..=3 => (
                &self.depositor,
                Op::Deposit,
                to,
                self.rng.gen_range(1..=1000),
            ),
            4..=8 => (
                &self.accounts[a],
                Op::Transfer,
                to,
                self.rng.gen_range(1..=300),
            ),
            _ => (
                &self.accounts[a],
                Op::Withdraw,
                [0; 32],
                self.rng.gen_range(1..=100),
            ),
        };
        let mut request = Request {
            chain_id: CHAIN_ID,
            op,
            // Unique per signer across restarts, since heights only grow.
            id: (height as u128) << 32 | index as u128,
            signer: key.verifying_key().to_bytes(),
            to,
            amount,
            signature: [0; 64],
        };
        sign_request(key, &mut request);
        request
    }
}

/// What a sequence of applied batches must have left in the database.
#[derive(Default)]
pub struct Model {
    pub writes: Vec<BatchWrite>,
    pub balances: HashMap<PublicKey, u64>,
    pub requests: HashMap<(PublicKey, u128), RequestRecord>,
}

impl Model {
    pub fn record(&mut self, write: BatchWrite) {
        let height = write.meta.height;
        self.balances.extend(write.accounts.iter().copied());
        for r in &write.requests {
            let record = RequestRecord {
                height,
                index: r.index,
                request_hash: r.request_hash,
            };
            self.requests.insert((r.signer, r.id), record);
        }
        self.writes.push(write);
    }

    /// Reads everything back and compares it with the model.
    pub fn check(&self, db: &mut LedgerDb) {
        let last = self.writes.last().expect("some batch");
        assert_eq!(db.meta().unwrap(), last.meta);
        for (key, balance) in &self.balances {
            assert_eq!(db.account(key).unwrap(), Some(*balance));
        }
        let total: u128 = self.balances.values().map(|b| *b as u128).sum();
        assert_eq!(total, last.meta.expected_total(), "conservation");
        for ((signer, id), record) in &self.requests {
            assert_eq!(db.request(signer, *id).unwrap(), Some(*record));
        }
        assert_eq!(db.request(&[0xee; 32], 1).unwrap(), None);
        assert_eq!(db.account(&[0xee; 32]).unwrap(), None);
        for w in &self.writes {
            let h = w.meta.height;
            assert_eq!(db.header(h).unwrap().as_ref(), Some(&w.signed_header));
            assert_eq!(db.body(h).unwrap().as_ref(), Some(&w.body));
        }
        let first = self.writes[0].meta.height;
        let all = db.headers(first, usize::MAX).unwrap();
        let expected: Vec<_> = self
            .writes
            .iter()
            .map(|w| w.signed_header.clone())
            .collect();
        assert_eq!(
            all, expected,
            "headers(from, limit) lists every header in height order"
        );
        check_chain(db);
    }
}

/// Checks what must hold of any database this test ledger wrote, however it was interrupted:
/// the headers form a signed chain up to the summary's height, each with its body, and the
/// accounts add up to the summary (which proves they were written in the same batch as it).
pub fn check_chain(db: &mut LedgerDb) -> LedgerMeta {
    let meta = db.meta().unwrap();
    let operator = operator().public();
    let headers = db.headers(0, usize::MAX).unwrap();
    assert_eq!(
        headers.len() as u64,
        meta.height,
        "one header per height, none beyond the summary"
    );
    let mut prev = [0; 32];
    for (i, signed) in headers.iter().enumerate() {
        let h = &signed.header;
        assert_eq!(h.height, i as u64 + 1);
        assert_eq!(
            h.prev_hash, prev,
            "header {} chains to its predecessor",
            h.height
        );
        verify_header(&operator, signed).unwrap();
        let body = db.body(h.height).unwrap().expect("every header has a body");
        let body = tally_core::batch::BatchBody::decode(&body).unwrap();
        assert_eq!(&body.header, h);
        prev = header_hash(h);
    }
    assert_eq!(prev, meta.last_header_hash);
    if let Some(tip) = headers.last() {
        assert_eq!(tip.header.state_digest, meta.state_digest());
    }
    let mut replayed = LedgerMeta::genesis();
    let mut total = 0u128;
    for key in account_keys() {
        let key = key.verifying_key().to_bytes();
        if let Some(balance) = db.account(&key).unwrap() {
            replayed.account_changed(&key, None, balance);
            total += balance as u128;
        }
    }
    replayed.map.flush();
    assert_eq!(
        replayed.map.root(),
        meta.map.root(),
        "accounts match the summary"
    );
    assert_eq!(replayed.account_count, meta.account_count);
    assert_eq!(total, meta.expected_total(), "conservation");
    meta
}

/// Every row of a raw LevelDB whose key starts with `prefix`, in key order (for tests that
/// rewrite a database into an older layout).
pub fn rows_with_prefix(db: &mut rusty_leveldb::DB, prefix: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    use rusty_leveldb::LdbIterator as _;
    let mut rows = Vec::new();
    let mut it = db.new_iter().unwrap();
    it.seek(prefix);
    while let Some((key, value)) = it.current() {
        if !key.starts_with(prefix) {
            break;
        }
        rows.push((key.to_vec(), value.to_vec()));
        it.advance();
    }
    rows
}

/// An envelope of `ops` signed by `key` for the test chain, with its hash.
pub fn envelope(key: &SigningKey, atomic: bool, ops: Vec<Operation>) -> (Arc<Envelope>, Hash) {
    let mut e = Envelope {
        chain_id: CHAIN_ID,
        signer: key.verifying_key().to_bytes(),
        atomic,
        ops,
        signature: [0; 64],
    };
    sign_envelope(key, &mut e);
    let hash = envelope_hash(&e);
    (Arc::new(e), hash)
}
