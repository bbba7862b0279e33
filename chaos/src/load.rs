//! The load of a live run: concurrent clients sending deposits, transfers and withdrawals with
//! client-chosen ids through [`ClusterClient`], and the record of every operation's fate.
//!
//! Each client is sequential: one operation at a time, so what it observes has an order
//! (heights must not go backwards). An operation whose outcome is unknown (the client gave up
//! after sending it, or its connection was cut before the answer) is *indeterminate*: the
//! client resubmits the same request (same id, same bytes) a little later, and whatever is
//! still unknown when the load stops is resolved after the cluster has healed.
//!
//! One write in twenty is an envelope instead ([`ClusterClient::submit_envelope`]): 2 to 8
//! operations from one account, atomic or not, a quarter of them with an overdraft among them
//! (an atomic one then fails whole, an independent one carries a failed receipt). Envelopes are
//! recorded, resubmitted and resolved like requests, in `History::envelopes`.
//!
//! A small share of the rest are two-phase operations (reserve, post, void, renew, misuse among
//! them: [`crate::two_phase`]), each alone in an envelope with the effect `Effect::TwoPhase`:
//! what they move is read from the final chain ([`crate::reserves`]), which the verdict judges.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tally_client::envelope::build_envelope;
use tally_client::{
    build_request, build_request_hinted, tls_connect, Client, ClusterClient, ClusterOptions,
    ClusterStats, ConnectFuture, Connector, Error as ClientError, Profile, ProfileConnector,
};
use tally_core::crypto::sha256;
use tally_core::verify::{verify_confirmation, verify_envelope_confirmation};
use tally_wire::{
    Confirmation, EnvelopeConfirmation, ErrorCode, Hash, Op, Operation as WireOperation, PublicKey,
    ReadMode, Request,
};

use crate::envelopes::SentEnvelope;
use crate::history::{Effect, HeaderLog, ReceiptLog};
use crate::two_phase::TwoPhaseLoad;

/// What every account is funded with before the load starts, unless told otherwise. Large
/// enough that no ordinary transfer is ever refused for lack of funds.
pub const FUNDING: u64 = 1_000_000;
/// An amount no account can ever hold (the whole supply is far below it): a transfer of it is
/// always refused with `insufficient_funds`, deterministically.
pub const OVERDRAFT: u64 = 1_000_000_000_000_000;
/// Codes that say a request was judged and refused, not lost in transit: resubmitting the same
/// bytes to a quiet cluster gets the same answer, so the request was not applied.
pub const DETERMINISTIC_REFUSALS: &[ErrorCode] = &[
    ErrorCode::InsufficientFunds,
    ErrorCode::UnknownAccount,
    ErrorCode::AmountOverflow,
    ErrorCode::MalformedRequest,
    ErrorCode::BadSignature,
    ErrorCode::WrongChain,
    ErrorCode::UnknownDepositKey,
    // A two-phase operation judged against its reserve (PROTOCOL.md §4.10): a retry of the
    // same bytes gets the same answer unless an earlier copy is still in flight.
    ErrorCode::ReserveNotFound,
    ErrorCode::ReserveClosed,
    ErrorCode::ReserveExpired,
    ErrorCode::PostExceedsReserve,
    ErrorCode::NotAReserveParty,
];

/// What the harness knows about an operation's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpState {
    /// Sent, no answer yet.
    InFlight,
    /// Confirmed on its first submission.
    Confirmed(Confirmed),
    /// Refused on its first submission, deterministically: never applied.
    Rejected(ErrorCode),
    /// Never reached a replica (the client gave up before any attempt): never applied.
    NotSent,
    /// The outcome is unknown; it will be resolved by resubmitting the same request.
    Indeterminate(String),
    /// Was indeterminate; a resubmission was confirmed (original or replayed confirmation).
    ResolvedApplied(Confirmed),
    /// Was indeterminate; a resubmission to the healed cluster was refused deterministically.
    ResolvedNotApplied(ErrorCode),
    /// Still unknown after the final resolution attempt.
    Unresolved(String),
}

impl OpState {
    /// Whether the operation took effect: Some(true/false), or None while unknown.
    pub fn applied(&self) -> Option<bool> {
        match self {
            OpState::Confirmed(_) | OpState::ResolvedApplied(_) => Some(true),
            OpState::Rejected(_) | OpState::NotSent | OpState::ResolvedNotApplied(_) => Some(false),
            OpState::InFlight | OpState::Indeterminate(_) | OpState::Unresolved(_) => None,
        }
    }

    pub fn confirmed(&self) -> Option<&Confirmed> {
        match self {
            OpState::Confirmed(c) | OpState::ResolvedApplied(c) => Some(c),
            _ => None,
        }
    }
}

/// The parts of a confirmation the final checks need (the whole confirmation was verified on
/// arrival).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confirmed {
    pub height: u64,
    pub index: u32,
    /// The raft term that sealed the batch (from the header).
    pub term: u64,
    /// SHA-256 of the signed header's bytes.
    pub header_digest: Hash,
    pub replayed: bool,
    /// Milliseconds since the run started.
    pub at_ms: u64,
    /// From this submission to the confirmation.
    pub latency_ms: u64,
}

/// One operation and everything known about it.
#[derive(Debug, Clone)]
pub struct Operation {
    /// The client that owns it (`usize::MAX` for the harness's own funding deposits).
    pub client: usize,
    pub effect: Effect,
    pub request: Request,
    /// Milliseconds since the run started, at the first submission.
    pub first_sent_ms: u64,
    /// Submissions by the harness (the client library's own retries not counted).
    pub submissions: u32,
    pub state: OpState,
    /// Whether the request was resubmitted after its outcome was unknown.
    pub retried: bool,
}

impl Operation {
    pub fn key(&self) -> (PublicKey, u128) {
        (self.request.signer, self.request.id)
    }
}

/// Everything observed during a run, shared by the client tasks.
pub struct History {
    pub ops: Vec<Operation>,
    /// Envelopes the clients sent (their operations are not in `ops`).
    pub envelopes: Vec<SentEnvelope>,
    pub headers: HeaderLog,
    pub receipts: ReceiptLog,
    /// Confirmations that did not verify or did not match their request.
    pub verify_failures: Vec<String>,
    /// A client saw a height lower than one it had seen before.
    pub regressions: Vec<String>,
    /// Linearizable balance reads answered.
    pub reads: u64,
    /// Linearizable reads a replica answered as stale instead (it knew no leader); they say
    /// so, and are left out of the height checks.
    pub reads_downgraded: u64,
    /// Replicas that exited without the harness stopping them.
    pub crashes: Vec<String>,
}

pub struct Recorder {
    pub t0: Instant,
    history: Mutex<History>,
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder {
            t0: Instant::now(),
            history: Mutex::new(History {
                ops: Vec::new(),
                envelopes: Vec::new(),
                headers: HeaderLog::default(),
                receipts: ReceiptLog::default(),
                verify_failures: Vec::new(),
                regressions: Vec::new(),
                reads: 0,
                reads_downgraded: 0,
                crashes: Vec::new(),
            }),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn now_ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }

    /// Adds a new operation; returns its index.
    pub fn begin(&self, client: usize, effect: Effect, request: Request) -> usize {
        let now = self.now_ms();
        let mut h = self.lock();
        h.ops.push(Operation {
            client,
            effect,
            request,
            first_sent_ms: now,
            submissions: 1,
            state: OpState::InFlight,
            retried: false,
        });
        h.ops.len() - 1
    }

    /// Checks a confirmation for operation `op` and records what it shows. Returns the summary
    /// to store in the operation's state.
    pub fn confirmation(
        &self,
        op: usize,
        c: &Confirmation,
        operator: &PublicKey,
        sent: Instant,
    ) -> Confirmed {
        let verified = verify_confirmation(c, operator);
        let confirmed = Confirmed {
            height: c.receipt.height,
            index: c.receipt.index,
            term: c.header.header.term,
            header_digest: sha256(&[&c.header.encode()]),
            replayed: c.replayed,
            at_ms: self.now_ms(),
            latency_ms: sent.elapsed().as_millis() as u64,
        };
        let mut h = self.lock();
        let client = h.ops[op].client;
        if let Err(e) = verified {
            h.verify_failures.push(format!(
                "op #{op}: confirmation at height {} does not verify: {e}",
                c.receipt.height
            ));
        }
        if c.request != h.ops[op].request {
            h.verify_failures
                .push(format!("op #{op}: the confirmation is for another request"));
        }
        h.headers
            .record(&c.header, || format!("a confirmation to client {client}"));
        h.receipts
            .record(&c.request.signer, c.request.id, &c.receipt);
        confirmed
    }

    pub fn set_state(&self, op: usize, state: OpState) {
        self.lock().ops[op].state = state;
    }

    /// Adds a new envelope; returns its index.
    pub fn begin_envelope(&self, envelope: SentEnvelope) -> usize {
        let mut h = self.lock();
        h.envelopes.push(envelope);
        h.envelopes.len() - 1
    }

    /// Checks envelope `e`'s confirmation and records what it shows; returns the summary.
    pub fn envelope_confirmation(
        &self,
        e: usize,
        c: &EnvelopeConfirmation,
        operator: &PublicKey,
        sent: Instant,
    ) -> Confirmed {
        let envelope = self.lock().envelopes[e].envelope.clone();
        let verified = verify_envelope_confirmation(&envelope, c, operator);
        let confirmed = Confirmed {
            height: c.header.header.height,
            index: c.proof.first,
            term: c.header.header.term,
            header_digest: sha256(&[&c.header.encode()]),
            replayed: c.replayed,
            at_ms: self.now_ms(),
            latency_ms: sent.elapsed().as_millis() as u64,
        };
        let mut h = self.lock();
        let client = h.envelopes[e].client;
        if let Err(err) = verified {
            h.verify_failures.push(format!(
                "envelope #{e}: confirmation at height {} does not verify: {err}",
                confirmed.height
            ));
        }
        h.headers.record(&c.header, || {
            format!("an envelope confirmation to client {client}")
        });
        for (op, r) in envelope.ops.iter().zip(&c.receipts) {
            h.receipts.record(&envelope.signer, op.id, r);
        }
        h.envelopes[e].failed = c.receipts.iter().map(|r| r.failed).collect();
        confirmed
    }

    /// Sets the state of what `s` names.
    pub fn set(&self, s: Submission, state: OpState) {
        let mut h = self.lock();
        match s {
            Submission::Op(op) => h.ops[op].state = state,
            Submission::Envelope(e) => h.envelopes[e].state = state,
        }
    }
}

impl Default for Recorder {
    fn default() -> Recorder {
        Recorder::new()
    }
}

/// Connects through the client proxy in front of each replica, so that the harness can drop a
/// connection between a request and its answer. Replies' `not_leader` hints name the replicas'
/// real addresses; those are mapped to their proxies too.
pub struct ProxiedConnector {
    profile: Profile,
    routes: Vec<(String, SocketAddr)>,
}

impl ProxiedConnector {
    pub fn new(profile: &Profile, routes: Vec<(String, SocketAddr)>) -> ProxiedConnector {
        ProxiedConnector {
            profile: profile.clone(),
            routes,
        }
    }
}

impl Connector for ProxiedConnector {
    fn connect<'a>(&'a self, address: &'a str, timeout: Duration) -> ConnectFuture<'a> {
        Box::pin(async move {
            let via = self
                .routes
                .iter()
                .find(|(real, _)| real == address)
                .map(|(_, proxy)| proxy.to_string())
                .unwrap_or_else(|| address.to_string());
            let stream = tokio::time::timeout(timeout, tls_connect(via.as_str(), &self.profile))
                .await
                .map_err(|_| ClientError::Timeout)??;
            Ok(Client::from_stream(stream, address.to_string()).with_timeout(timeout))
        })
    }
}

/// The options of every load client's [`ClusterClient`].
pub fn client_options() -> ClusterOptions {
    ClusterOptions {
        call_timeout: Duration::from_secs(2),
        total_timeout: Duration::from_secs(10),
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(500),
        queue_max: 64,
    }
}

/// What one load client needs.
pub struct ClientSetup {
    pub index: usize,
    pub seed: u64,
    pub client: ClusterClient,
    pub accounts: Arc<Vec<SigningKey>>,
    pub chain_id: Hash,
    pub operator: PublicKey,
    pub recorder: Arc<Recorder>,
    pub stop: Arc<AtomicBool>,
    /// Request ids come from one counter, so that they are unique for every signer.
    pub next_id: Arc<AtomicU64>,
    /// Whether to withdraw now and then (with small funding, withdrawals would drain the ledger
    /// within seconds, so money then only moves between accounts).
    pub withdrawals: bool,
}

/// What a client submitted: an operation (an index into `History::ops`) or an envelope (into
/// `History::envelopes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submission {
    Op(usize),
    Envelope(usize),
}

/// An indeterminate submission waiting for its next resubmission.
struct Pending {
    op: Submission,
    due: Instant,
}

/// The fraction of a client's writes that are envelopes (of 2 to 8 operations).
const ENVELOPE_FRACTION: f64 = 0.05;
/// The fraction of envelopes that carry an operation bound to fail (an overdraft): atomic ones
/// then apply nothing, independent ones carry a failed receipt.
const ENVELOPE_OVERDRAFT_FRACTION: f64 = 0.25;

/// The fraction of the other writes that are two-phase operations.
const TWO_PHASE_FRACTION: f64 = 0.05;
/// Reserve and renewal timeouts on the replicas' clocks: short ones expire within a few batch
/// windows or during a fault; long ones outlive the run, so that once the load stops and the
/// short ones have had [`TWO_PHASE_SETTLE`] to expire, no batch of expiries moves the height
/// while the final state is read (the open ones are checked in it).
const TWO_PHASE_SHORT_MS: std::ops::Range<u64> = 100..2_000;
const TWO_PHASE_LONG_MS: std::ops::Range<u64> = 3_600_000..7_200_000;
/// How long after the load stops every short reserve has passed its deadline, with a margin
/// for the expiry's batch.
pub const TWO_PHASE_SETTLE: std::time::Duration =
    std::time::Duration::from_millis(TWO_PHASE_SHORT_MS.end + 1_000);

/// How many times a client resubmits an indeterminate operation while the load runs; the rest
/// is left to the final resolution.
const RESUBMISSIONS_MAX: u32 = 6;

/// Runs one sequential client until `stop` is set. Returns its client library counters.
pub async fn run_client(s: ClientSetup) -> ClusterStats {
    let mut rng = StdRng::seed_from_u64(s.seed ^ (0xC11E_0000 + s.index as u64));
    let pubs: Vec<PublicKey> = s
        .accounts
        .iter()
        .map(|k| k.verifying_key().to_bytes())
        .collect();
    // The highest height this client has seen (confirmations and linearizable reads).
    let mut seen = 0u64;
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut done = 0u64;
    let mut two_phase = TwoPhaseLoad::new(TWO_PHASE_SHORT_MS, TWO_PHASE_LONG_MS);
    while !s.stop.load(Ordering::SeqCst) {
        if pending.front().is_some_and(|p| p.due <= Instant::now()) {
            let p = pending.pop_front().expect("front exists");
            if let Some(again) = resubmit(&s, p.op, &mut rng).await {
                pending.push_back(again);
            }
            continue;
        }
        done += 1;
        if done % 8 == 0 {
            read_balance(&s, &pubs, &mut rng, &mut seen).await;
            continue;
        }
        let unknown = if rng.gen_bool(ENVELOPE_FRACTION) {
            send_envelope(&s, &pubs, &mut rng, &mut seen).await
        } else if rng.gen_bool(TWO_PHASE_FRACTION) {
            let e = new_two_phase(&s, &pubs, &mut two_phase, &mut rng);
            submit_new_envelope(&s, e, &mut seen).await
        } else {
            send_request(&s, &pubs, &mut rng, &mut seen).await
        };
        if let Some(op) = unknown {
            pending.push_back(Pending {
                op,
                due: Instant::now() + Duration::from_millis(rng.gen_range(500..3000)),
            });
        }
    }
    s.client.stats()
}

/// A linearizable read of a random account: its height must not go below `seen`.
async fn read_balance(s: &ClientSetup, pubs: &[PublicKey], rng: &mut StdRng, seen: &mut u64) {
    let account = pubs[rng.gen_range(0..pubs.len())];
    let Ok(b) = s.client.balance(account, ReadMode::Linearizable).await else {
        return;
    };
    let mut h = s.recorder.lock();
    if b.mode != ReadMode::Linearizable {
        h.reads_downgraded += 1;
        return;
    }
    h.reads += 1;
    if b.height < *seen {
        let at = s.recorder.now_ms();
        h.regressions.push(format!(
            "client {} at +{at} ms: a linearizable read answered at height {} after the client \
             had seen height {seen}",
            s.index, b.height
        ));
    }
    *seen = (*seen).max(b.height);
}

/// A transfer or withdrawal from account `from` (`to` the recipient's key, zeros for a
/// withdrawal); now and then an overdraft, always refused.
fn draw_effect(
    s: &ClientSetup,
    pubs: &[PublicKey],
    rng: &mut StdRng,
    from: usize,
) -> (Effect, PublicKey, u64) {
    let n = pubs.len();
    let roll = rng.gen_range(0..100);
    if roll < 2 {
        let to = (from + rng.gen_range(1..n)) % n;
        let amount = OVERDRAFT;
        (Effect::Transfer { from, to, amount }, pubs[to], amount)
    } else if roll < 6 && s.withdrawals {
        let amount = rng.gen_range(1..=50);
        (Effect::Withdraw { from, amount }, [0; 32], amount)
    } else {
        let to = (from + rng.gen_range(1..n)) % n;
        let amount = rng.gen_range(1..=100);
        (Effect::Transfer { from, to, amount }, pubs[to], amount)
    }
}

fn op_of(effect: &Effect) -> Op {
    match effect {
        Effect::Withdraw { .. } => Op::Withdraw,
        Effect::Transfer { .. } => Op::Transfer,
        Effect::Deposit { .. } => Op::Deposit,
        Effect::TwoPhase => unreachable!("two-phase operations are drawn by send_two_phase"),
    }
}

/// Checks that a new submission's confirmation at `height` lands above `floor`, the highest
/// height the client had seen before it existed.
fn check_floor(s: &ClientSetup, height: u64, floor: u64) {
    // Every batch up to `floor` was committed before this request existed.
    if height <= floor {
        s.recorder.lock().regressions.push(format!(
            "client {}: a new request was confirmed at height {height} although the client had \
             already seen height {floor}",
            s.index
        ));
    }
}

/// Sends one new request. Returns it if its outcome is unknown.
async fn send_request(
    s: &ClientSetup,
    pubs: &[PublicKey],
    rng: &mut StdRng,
    seen: &mut u64,
) -> Option<Submission> {
    let from = rng.gen_range(0..pubs.len());
    let (effect, to, amount) = draw_effect(s, pubs, rng, from);
    let op_kind = op_of(&effect);
    let id = u128::from(s.next_id.fetch_add(1, Ordering::SeqCst));
    // Odd clients send nonce hints (the server's batch path), even ones plain Submits (its
    // strict path); resubmissions are always plain, the same request bytes either way.
    let (request, hint) = if s.index % 2 == 1 {
        let (r, h) = build_request_hinted(&s.accounts[from], s.chain_id, op_kind, id, to, amount);
        (r, Some(h))
    } else {
        let r = build_request(&s.accounts[from], s.chain_id, op_kind, id, to, amount);
        (r, None)
    };
    let op = s.recorder.begin(s.index, effect, request.clone());
    let sent = Instant::now();
    let attempts_before = s.client.stats().attempts;
    let result = match hint {
        Some(hint) => s.client.submit_hinted(request, hint).await,
        None => s.client.submit(request).await,
    };
    // This client runs one operation at a time, so the difference is this one's attempts.
    let attempts = s.client.stats().attempts - attempts_before;
    let state = match result {
        Ok(c) => {
            let confirmed = s.recorder.confirmation(op, &c, &s.operator, sent);
            check_floor(s, confirmed.height, *seen);
            *seen = (*seen).max(confirmed.height);
            OpState::Confirmed(confirmed)
        }
        Err(e) => first_failure(&e, attempts),
    };
    let unknown = matches!(state, OpState::Indeterminate(_));
    s.recorder.set_state(op, state);
    unknown.then_some(Submission::Op(op))
}

/// Sends one new envelope of 2 to 8 operations from one account, atomic or not, now and then
/// with an overdraft among them. Returns it if its outcome is unknown.
async fn send_envelope(
    s: &ClientSetup,
    pubs: &[PublicKey],
    rng: &mut StdRng,
    seen: &mut u64,
) -> Option<Submission> {
    let from = rng.gen_range(0..pubs.len());
    let n = rng.gen_range(2..=8);
    let overdraft = rng
        .gen_bool(ENVELOPE_OVERDRAFT_FRACTION)
        .then(|| rng.gen_range(0..n));
    let mut effects = Vec::with_capacity(n);
    let mut ops = Vec::with_capacity(n);
    for i in 0..n {
        let (mut effect, to, mut amount) = draw_effect(s, pubs, rng, from);
        if let (Some(k), Effect::Transfer { amount: a, .. }) = (overdraft, &mut effect) {
            if k == i {
                (*a, amount) = (OVERDRAFT, OVERDRAFT);
            }
        }
        let id = u128::from(s.next_id.fetch_add(1, Ordering::SeqCst));
        let op = op_of(&effect);
        ops.push(WireOperation::single(op, id, to, amount));
        effects.push(effect);
    }
    let envelope = build_envelope(&s.accounts[from], s.chain_id, rng.gen_bool(0.5), ops);
    submit_new_envelope(s, SentEnvelope::new(s.index, envelope, effects), seen).await
}

/// A two-phase operation (`load` draws it) alone in an envelope, atomic or not.
pub fn new_two_phase(
    s: &ClientSetup,
    pubs: &[PublicKey],
    load: &mut TwoPhaseLoad,
    rng: &mut StdRng,
) -> SentEnvelope {
    let mut next_id = || u128::from(s.next_id.fetch_add(1, Ordering::SeqCst));
    let (signer, op) = load.draw(rng, pubs, &mut next_id);
    let atomic = rng.gen_bool(0.5);
    let envelope = build_envelope(&s.accounts[signer], s.chain_id, atomic, vec![op]);
    SentEnvelope::new(s.index, envelope, vec![Effect::TwoPhase])
}

/// Records and submits a new envelope. Returns it if its outcome is unknown.
async fn submit_new_envelope(
    s: &ClientSetup,
    mut sent_envelope: SentEnvelope,
    seen: &mut u64,
) -> Option<Submission> {
    sent_envelope.sent = 1;
    let arc = sent_envelope.envelope.clone();
    let e = s.recorder.begin_envelope(sent_envelope);
    let sent = Instant::now();
    let attempts_before = s.client.stats().attempts;
    let result = s.client.submit_envelope(arc).await;
    let attempts = s.client.stats().attempts - attempts_before;
    let state = match result {
        Ok(c) => {
            let confirmed = s.recorder.envelope_confirmation(e, &c, &s.operator, sent);
            check_floor(s, confirmed.height, *seen);
            *seen = (*seen).max(confirmed.height);
            OpState::Confirmed(confirmed)
        }
        Err(err) => first_failure(&err, attempts),
    };
    let unknown = matches!(state, OpState::Indeterminate(_));
    s.recorder.set(Submission::Envelope(e), state);
    unknown.then_some(Submission::Envelope(e))
}

/// The state after a first submission failed with `e` after `attempts` attempts. A refusal
/// settles it only if it answered the one attempt made: after a retry, an earlier attempt may
/// sit in a batch that still commits, while a replica judging on older state refuses the
/// retry.
fn first_failure(e: &ClientError, attempts: u64) -> OpState {
    match (e, deterministic_refusal(e)) {
        (_, Some(code)) if attempts <= 1 => OpState::Rejected(code),
        (ClientError::GaveUp { attempts: 0, .. } | ClientError::QueueFull { .. }, _) => {
            OpState::NotSent
        }
        // Anything else may have been applied: find out later.
        (other, _) => OpState::Indeterminate(other.to_string()),
    }
}

/// Submits `sub` once more (the same bytes) and records a confirmation. Returns the
/// confirmation's summary and how many times the harness has submitted it.
async fn submit_again(
    client: &ClusterClient,
    recorder: &Recorder,
    operator: &PublicKey,
    sub: Submission,
) -> (Result<Confirmed, ClientError>, u32) {
    let sent = Instant::now();
    match sub {
        Submission::Op(op) => {
            let (request, submissions) = {
                let mut h = recorder.lock();
                let o = &mut h.ops[op];
                o.submissions += 1;
                o.retried = true;
                (o.request.clone(), o.submissions)
            };
            let result = client.submit(request).await;
            let confirmed = result.map(|c| recorder.confirmation(op, &c, operator, sent));
            (confirmed, submissions)
        }
        Submission::Envelope(e) => {
            let (envelope, submissions) = {
                let mut h = recorder.lock();
                h.envelopes[e].sent += 1;
                (h.envelopes[e].envelope.clone(), h.envelopes[e].sent)
            };
            let result = client.submit_envelope(envelope).await;
            let confirmed = result.map(|c| recorder.envelope_confirmation(e, &c, operator, sent));
            (confirmed, submissions)
        }
    }
}

/// Resubmits an indeterminate submission. Returns it again if its outcome is still unknown
/// and it may be tried again during the run.
async fn resubmit(s: &ClientSetup, op: Submission, rng: &mut StdRng) -> Option<Pending> {
    match submit_again(&s.client, &s.recorder, &s.operator, op).await {
        (Ok(confirmed), _) => {
            s.recorder.set(op, OpState::ResolvedApplied(confirmed));
            None
        }
        (Err(e), submissions) => {
            // A refusal now does not prove the request was never applied: an earlier attempt
            // may still be in flight (sealed, not yet committed). Only the final resolution,
            // on a healed and quiet cluster, may conclude that.
            s.recorder.set(op, OpState::Indeterminate(e.to_string()));
            (submissions < RESUBMISSIONS_MAX).then(|| Pending {
                op,
                due: Instant::now() + Duration::from_millis(rng.gen_range(1000..4000)),
            })
        }
    }
}

/// Resolves every submission still unknown by resubmitting it to the healed, quiet cluster:
/// a confirmation (original or replayed) settles it as applied; a deterministic refusal as not
/// applied (nothing else can be in flight any more).
pub async fn resolve_all(recorder: &Arc<Recorder>, profile: &Profile, operator: &PublicKey) {
    let open: Vec<Submission> = {
        let h = recorder.lock();
        let ops = (h.ops.iter().enumerate())
            .filter(|(_, o)| o.state.applied().is_none())
            .map(|(i, _)| Submission::Op(i));
        let envelopes = (h.envelopes.iter().enumerate())
            .filter(|(_, e)| e.state.applied().is_none())
            .map(|(i, _)| Submission::Envelope(i));
        ops.chain(envelopes).collect()
    };
    let client = ClusterClient::with_connector(
        profile.replicas.clone(),
        ClusterOptions {
            total_timeout: Duration::from_secs(30),
            ..client_options()
        },
        Arc::new(ProfileConnector::new(profile)),
    );
    for chunk in open.chunks(32) {
        let mut tasks = Vec::new();
        for &sub in chunk {
            let (client, recorder, operator) = (client.clone(), recorder.clone(), *operator);
            tasks.push(tokio::spawn(async move {
                let (result, _) = submit_again(&client, &recorder, &operator, sub).await;
                (sub, result)
            }));
        }
        for t in tasks {
            let Ok((sub, result)) = t.await else {
                continue;
            };
            let state = match result {
                Ok(c) => OpState::ResolvedApplied(c),
                Err(e) => match deterministic_refusal(&e) {
                    Some(code) => OpState::ResolvedNotApplied(code),
                    None => OpState::Unresolved(e.to_string()),
                },
            };
            recorder.set(sub, state);
        }
    }
}

/// The code of a refusal that says the submission was judged and not applied.
fn deterministic_refusal(e: &ClientError) -> Option<ErrorCode> {
    let code = match e {
        ClientError::Rejected(reply) => reply.code,
        ClientError::EnvelopeFailed(f) => f.code,
        _ => return None,
    };
    DETERMINISTIC_REFUSALS.contains(&code).then_some(code)
}

/// Deposits `funding` into every account (retrying each with its own id until confirmed) and
/// records the deposits as operations of the harness.
pub async fn fund(
    recorder: &Recorder,
    profile: &Profile,
    accounts: &[SigningKey],
    operator: &PublicKey,
    funding: u64,
) -> anyhow::Result<()> {
    let deposit_key = profile.load_deposit_key()?;
    let chain_id = profile.chain_id_bytes()?;
    let client = ClusterClient::new(
        profile,
        ClusterOptions {
            total_timeout: Duration::from_secs(20),
            ..client_options()
        },
    );
    for (i, key) in accounts.iter().enumerate() {
        let to = key.verifying_key().to_bytes();
        let request = build_request(
            &deposit_key,
            chain_id,
            Op::Deposit,
            i as u128 + 1,
            to,
            funding,
        );
        let op = recorder.begin(
            usize::MAX,
            Effect::Deposit {
                to: i,
                amount: funding,
            },
            request.clone(),
        );
        let mut tries = 0;
        loop {
            tries += 1;
            let sent = Instant::now();
            match client.submit(request.clone()).await {
                Ok(c) => {
                    let confirmed = recorder.confirmation(op, &c, operator, sent);
                    recorder.set_state(op, OpState::Confirmed(confirmed));
                    break;
                }
                Err(e) if tries < 10 => {
                    eprintln!("tally-chaos: funding account #{i}: {e}; retrying");
                }
                Err(e) => anyhow::bail!("funding account #{i} failed 10 times: {e}"),
            }
        }
    }
    Ok(())
}

/// Polls linearizable reads in a loop, one at a time, and checks that the height they answer
/// at never goes backwards.
pub async fn observe(
    client: ClusterClient,
    account: PublicKey,
    recorder: Arc<Recorder>,
    stop: Arc<AtomicBool>,
) {
    let mut seen = 0u64;
    while !stop.load(Ordering::SeqCst) {
        if let Ok(b) = client.balance(account, ReadMode::Linearizable).await {
            let mut h = recorder.lock();
            if b.mode != ReadMode::Linearizable {
                h.reads_downgraded += 1;
            } else {
                h.reads += 1;
                if b.height < seen {
                    let at = recorder.now_ms();
                    h.regressions.push(format!(
                        "observer at +{at} ms: a linearizable read answered at height {} after \
                         height {seen}",
                        b.height
                    ));
                }
                seen = seen.max(b.height);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
