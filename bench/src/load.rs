//! The load: accounts and deposits (setup), pre-signed transfers, and the timed phase in a
//! closed or an open loop.
//!
//! Bounds: the pool of pre-signed transfers is fixed before the clock starts and only shrinks;
//! each request waits at most the client's timeout; a closed loop has exactly
//! `connections × in_flight` requests outstanding, an open loop at most that many (the
//! generator waits for room, and the wait counts as latency). So every phase ends by itself.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ed25519_dalek::SigningKey;
use rand::Rng;
use tally_client::envelope::build_envelope;
use tally_client::{build_request, build_request_hinted, Client, Error};
use tally_wire::{Envelope, Hash, Op, Operation, PublicKey, Request, Retry};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::report::thousands;
use crate::stats::{Live, Recorder};

/// What each account is funded with: enough that random transfers of at most
/// [`TRANSFER_AMOUNT_MAX`] never run an account dry.
pub const DEPOSIT_AMOUNT: u64 = 1_000_000_000;
pub const TRANSFER_AMOUNT_MAX: u64 = 100;
/// Deposits outstanding per connection during setup: the server's default limit on requests
/// in flight per connection (`limits.requests_in_flight_per_connection_max`), so that funding
/// a large ledger fills big batches. A server with a lower limit answers the excess
/// `too_many_in_flight`, which is retried like "busy".
pub const DEPOSITS_IN_FLIGHT_PER_CONNECTION: usize = 4096;
/// Attempts per deposit when the server says "later" (busy) or does not answer in time. The
/// same request is resubmitted, so a deposit never applies twice.
const DEPOSIT_ATTEMPTS_MAX: u32 = 5;
/// An open-loop send this late after its scheduled time is counted as late.
const LATE_SEND: Duration = Duration::from_millis(10);

/// The accounts of one run.
pub struct Accounts {
    pub keys: Vec<SigningKey>,
    pub public: Vec<PublicKey>,
}

impl Accounts {
    pub fn generate(count: usize, threads: usize) -> Accounts {
        let keys = parallel(count, threads, |range| {
            let mut rng = rand::thread_rng();
            range.map(|_| SigningKey::generate(&mut rng)).collect()
        });
        let public = keys.iter().map(|k| k.verifying_key().to_bytes()).collect();
        Accounts { keys, public }
    }
}

/// Request ids: a random 64-bit run nonce in the high half, so that runs against the same
/// operator never reuse an id; deposits and transfers apart by the top bit of the low half.
#[derive(Clone, Copy)]
pub struct Ids {
    nonce: u64,
}

impl Ids {
    pub fn new() -> Ids {
        Ids {
            nonce: rand::random(),
        }
    }

    pub fn deposit(self, index: u64) -> u128 {
        (u128::from(self.nonce) << 64) | (1 << 63) | u128::from(index)
    }

    pub fn transfer(self, index: u64) -> u128 {
        assert!(index < 1 << 63);
        (u128::from(self.nonce) << 64) | u128::from(index)
    }
}

impl Default for Ids {
    fn default() -> Self {
        Ids::new()
    }
}

/// Runs `f` over `0..count` split into one contiguous range per thread; results in order.
pub fn parallel<T: Send>(
    count: usize,
    threads: usize,
    f: impl Fn(Range<usize>) -> Vec<T> + Sync,
) -> Vec<T> {
    let threads = threads.clamp(1, count.max(1));
    let chunk = count.div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let range = (t * chunk).min(count)..((t + 1) * chunk).min(count);
                let f = &f;
                scope.spawn(move || f(range))
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a worker thread panicked"))
            .collect()
    })
}

/// A pre-signed request and, unless the run sends plain Submits, its nonce hint.
/// What the timed phase sends: a signed request (with its nonce hint, unless `--no-hints`), or
/// with `--envelope N` a signed envelope of N transfers.
#[derive(Clone)]
#[allow(clippy::large_enum_variant)] // a pool of requests, not boxed one by one
pub enum Presigned {
    Request(Request, Option<tally_wire::NonceHint>),
    Envelope(Arc<Envelope>),
}

/// What answered a send: a request's confirmation or an envelope's.
pub enum Answer {
    Request(tally_wire::Confirmation),
    Envelope(Arc<Envelope>, tally_wire::EnvelopeConfirmation),
}

impl Answer {
    /// Operations it confirms.
    pub fn operations(&self) -> u64 {
        match self {
            Answer::Request(_) => 1,
            Answer::Envelope(_, c) => c.receipts.len() as u64,
        }
    }

    pub fn header(&self) -> &tally_wire::Header {
        match self {
            Answer::Request(c) => &c.header.header,
            Answer::Envelope(_, c) => &c.header.header,
        }
    }

    /// Verifies it offline against the operator's key.
    pub fn verify(&self, operator: &PublicKey) -> tally_core::Result<()> {
        match self {
            Answer::Request(c) => tally_core::verify::verify_confirmation(c, operator),
            Answer::Envelope(e, c) => {
                tally_core::verify::verify_envelope_confirmation(e, c, operator)
            }
        }
    }
}

/// Signs `count` transfers into envelopes of `per_envelope` (the last may be smaller), each
/// from one random hot account to others, independent (each transfer its own result).
pub fn sign_envelopes(
    accounts: &Accounts,
    chain_id: Hash,
    ids: Ids,
    count: usize,
    per_envelope: usize,
    hot: usize,
) -> Vec<Presigned> {
    let n = hot.min(accounts.keys.len());
    assert!(n >= 2 && per_envelope >= 1, "a transfer needs two accounts");
    let envelopes = count.div_ceil(per_envelope);
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    parallel(envelopes, threads, |range| {
        let mut rng = rand::thread_rng();
        range
            .map(|e| {
                let from = rng.gen_range(0..n);
                let first = e * per_envelope;
                let ops = (first..(first + per_envelope).min(count))
                    .map(|i| Operation {
                        op: Op::Transfer,
                        id: ids.transfer(i as u64),
                        to: accounts.public[(from + rng.gen_range(1..n)) % n],
                        amount: rng.gen_range(1..=TRANSFER_AMOUNT_MAX),
                        timeout_ms: 0,
                        reserve_id: 0,
                        party: [0; 32],
                    })
                    .collect();
                let envelope = build_envelope(&accounts.keys[from], chain_id, false, ops);
                Presigned::Envelope(Arc::new(envelope))
            })
            .collect()
    })
}

/// Signs `count` transfers between random distinct accounts among the first `hot` (the hot
/// working set; at most all of them), for small random amounts; with `hints`, each with its
/// nonce hint (sent as `SubmitHinted`, checked by the server in batches).
pub fn sign_transfers(
    accounts: &Accounts,
    chain_id: Hash,
    ids: Ids,
    count: usize,
    hot: usize,
    threads: usize,
    hints: bool,
) -> Vec<Presigned> {
    let n = hot.min(accounts.keys.len());
    assert!(n >= 2, "a transfer needs two accounts");
    parallel(count, threads, |range| {
        let mut rng = rand::thread_rng();
        range
            .map(|i| {
                let from = rng.gen_range(0..n);
                // Any account but `from`, uniformly.
                let to = (from + rng.gen_range(1..n)) % n;
                let (key, id) = (&accounts.keys[from], ids.transfer(i as u64));
                let amount = rng.gen_range(1..=TRANSFER_AMOUNT_MAX);
                if hints {
                    let (r, h) = build_request_hinted(
                        key,
                        chain_id,
                        Op::Transfer,
                        id,
                        accounts.public[to],
                        amount,
                    );
                    Presigned::Request(r, Some(h))
                } else {
                    let r =
                        build_request(key, chain_id, Op::Transfer, id, accounts.public[to], amount);
                    Presigned::Request(r, None)
                }
            })
            .collect()
    })
}

/// Funds every account with one deposit and waits for every confirmation. Fails if a deposit
/// is refused for good or still unanswered after its retries.
///
/// Up to [`DEPOSITS_IN_FLIGHT_PER_CONNECTION`] deposits are outstanding on every connection at
/// once; each is signed just before it is sent, so memory does not grow with the number of
/// accounts. A line on stderr every second tells how far funding got.
pub async fn fund(
    clients: &[Arc<Client>],
    deposit_key: &SigningKey,
    chain_id: Hash,
    ids: Ids,
    accounts: &Accounts,
) -> Result<()> {
    fund_with(
        clients,
        deposit_key,
        chain_id,
        ids,
        &accounts.public,
        DEPOSITS_IN_FLIGHT_PER_CONNECTION,
    )
    .await
}

/// [`fund`] with `in_flight` deposits outstanding per connection at most.
pub async fn fund_with(
    clients: &[Arc<Client>],
    deposit_key: &SigningKey,
    chain_id: Hash,
    ids: Ids,
    public: &[PublicKey],
    in_flight: usize,
) -> Result<()> {
    let total = public.len();
    if total == 0 || clients.is_empty() {
        return Ok(());
    }
    let public: Arc<[PublicKey]> = public.into();
    let next = Arc::new(AtomicUsize::new(0));
    let live = Arc::new(Live::default());
    // No more tasks than there are deposits: a small ledger does not spawn thousands.
    let per_connection = in_flight.max(1).min(total.div_ceil(clients.len()));
    let start = Instant::now();
    let progress = tokio::spawn(funding_progress(live.clone(), total, start));
    let mut workers = JoinSet::new();
    for client in clients {
        for _ in 0..per_connection {
            let (client, public, next, live) =
                (client.clone(), public.clone(), next.clone(), live.clone());
            let deposit_key = deposit_key.clone();
            workers.spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(to) = public.get(i) else {
                        return Ok::<(), anyhow::Error>(());
                    };
                    let request = build_request(
                        &deposit_key,
                        chain_id,
                        Op::Deposit,
                        ids.deposit(i as u64),
                        *to,
                        DEPOSIT_AMOUNT,
                    );
                    live.in_flight.fetch_add(1, Ordering::Relaxed);
                    let outcome = deposit(&client, request).await;
                    live.in_flight.fetch_sub(1, Ordering::Relaxed);
                    outcome?;
                    live.confirmed.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    }
    let mut outcome = Ok(());
    while let Some(result) = workers.join_next().await {
        match result.context("a deposit task panicked") {
            Ok(Ok(())) => {}
            Ok(Err(e)) | Err(e) => {
                // The first failure ends funding; the other deposits are abandoned.
                outcome = Err(e);
                break;
            }
        }
    }
    progress.abort();
    workers.abort_all();
    outcome?;
    let seconds = start.elapsed().as_secs_f64();
    eprintln!(
        "funded {} accounts in {seconds:.1} s ({}/s, {} in flight per connection)",
        thousands(total as f64),
        thousands(total as f64 / seconds.max(1e-9)),
        per_connection
    );
    Ok(())
}

/// Prints how far funding got to stderr every second until aborted.
async fn funding_progress(live: Arc<Live>, total: usize, start: Instant) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await; // the first tick is immediate
    let mut last = (0u64, Instant::now());
    loop {
        tick.tick().await;
        let funded = Live::get(&live.confirmed);
        let now = Instant::now();
        let rate = (funded - last.0) as f64 / (now - last.1).as_secs_f64();
        last = (funded, now);
        eprintln!(
            "[{:6.1} s] funded {:>10} of {}  rate {:>8}/s  in flight {:>6}",
            start.elapsed().as_secs_f64(),
            thousands(funded as f64),
            thousands(total as f64),
            thousands(rate),
            Live::get(&live.in_flight),
        );
    }
}

async fn deposit(client: &Client, request: Request) -> Result<()> {
    let mut attempt = 1;
    loop {
        match client.submit(request.clone()).await {
            Ok(_) => return Ok(()),
            Err(e @ (Error::Rejected(_) | Error::Timeout))
                if e.retry() == Some(Retry::Later) && attempt < DEPOSIT_ATTEMPTS_MAX =>
            {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
            }
            Err(e) => bail!("funding an account: a deposit failed after {attempt} attempts: {e}"),
        }
    }
}

/// Pre-signed requests, taken in order by many tasks.
pub struct Pool {
    requests: Vec<Presigned>,
    next: AtomicUsize,
    exhausted: AtomicBool,
}

impl Pool {
    pub fn new(requests: Vec<Presigned>) -> Pool {
        Pool {
            requests,
            next: AtomicUsize::new(0),
            exhausted: AtomicBool::new(false),
        }
    }

    pub fn len(&self) -> usize {
        self.requests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }

    /// The next request, or None once all were taken (and then remembers it ran out).
    pub fn take(&self) -> Option<Presigned> {
        self.take_ref().map(|(_, request)| request.clone())
    }

    /// [`Pool::take`] by reference, with the request's position in the pool.
    pub fn take_ref(&self) -> Option<(usize, &Presigned)> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        match self.requests.get(i) {
            Some(request) => Some((i, request)),
            None => {
                // Keep the counter from creeping towards overflow in a long tail of calls.
                self.next.store(self.requests.len(), Ordering::Relaxed);
                self.exhausted.store(true, Ordering::Relaxed);
                None
            }
        }
    }

    /// The request at position `i`.
    pub fn get(&self, i: usize) -> Option<&Presigned> {
        self.requests.get(i)
    }

    /// Whether some caller found the pool empty.
    pub fn exhausted(&self) -> bool {
        self.exhausted.load(Ordering::Relaxed)
    }
}

/// How the timed phase sends.
#[derive(Debug, Clone, Copy)]
pub enum Schedule {
    /// `in_flight` requests outstanding per connection at all times, until the pool is empty or
    /// the deadline has passed.
    Closed {
        in_flight: usize,
        deadline: Option<Duration>,
    },
    /// Every request of the pool at its fixed time, `rate` per second in total, at most
    /// `in_flight` per connection outstanding.
    Open { rate: f64, in_flight: usize },
}

/// What the timed phase measured.
pub struct Phase {
    pub recorder: Recorder,
    pub sent: u64,
    pub elapsed: Duration,
    pub pool_exhausted: bool,
    pub late_sends: u64,
}

/// Runs the timed phase over `clients` with the requests of `pool`.
pub async fn timed_phase(clients: &[Arc<Client>], pool: Arc<Pool>, schedule: Schedule) -> Phase {
    let live = Arc::new(Live::default());
    let recorders: Vec<Arc<Mutex<Recorder>>> = clients
        .iter()
        .map(|_| Arc::new(Mutex::new(Recorder::default())))
        .collect();
    let start = Instant::now();
    let progress = tokio::spawn(progress(live.clone(), start));
    let late_sends = match schedule {
        Schedule::Closed {
            in_flight,
            deadline,
        } => {
            let deadline = deadline.map(|d| start + d);
            let mut workers = JoinSet::new();
            for (client, recorder) in clients.iter().zip(&recorders) {
                for _ in 0..in_flight {
                    workers.spawn(closed_worker(
                        client.clone(),
                        pool.clone(),
                        recorder.clone(),
                        live.clone(),
                        deadline,
                    ));
                }
            }
            while let Some(result) = workers.join_next().await {
                result.expect("a load task panicked");
            }
            0
        }
        Schedule::Open { rate, in_flight } => {
            open_loop(clients, &pool, &recorders, &live, start, rate, in_flight).await
        }
    };
    let elapsed = start.elapsed();
    progress.abort();
    let mut recorder = Recorder::default();
    for r in recorders {
        let r = std::mem::take(&mut *r.lock().unwrap_or_else(|e| e.into_inner()));
        recorder.merge(r);
    }
    let sent = Live::get(&live.sent);
    Phase {
        recorder,
        sent,
        elapsed,
        pool_exhausted: pool.exhausted(),
        late_sends,
    }
}

async fn closed_worker(
    client: Arc<Client>,
    pool: Arc<Pool>,
    recorder: Arc<Mutex<Recorder>>,
    live: Arc<Live>,
    deadline: Option<Instant>,
) {
    loop {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return;
        }
        let Some(request) = pool.take() else { return };
        let sent_at = Instant::now();
        let outcome = send(&client, request, &live).await;
        let latency = sent_at.elapsed();
        live.latency(latency);
        // A dead connection fails every later call at once; stop rather than burn the pool.
        let gone = matches!(outcome, Err(Error::Disconnected)) && !client.is_connected();
        record(&recorder, outcome, latency);
        if gone {
            return;
        }
    }
}

/// Sends `pool` on a fixed schedule; returns how many sends were late.
async fn open_loop(
    clients: &[Arc<Client>],
    pool: &Arc<Pool>,
    recorders: &[Arc<Mutex<Recorder>>],
    live: &Arc<Live>,
    start: Instant,
    rate: f64,
    in_flight: usize,
) -> u64 {
    let permits_total = u32::try_from(clients.len() * in_flight).unwrap_or(u32::MAX);
    let room = Arc::new(Semaphore::new(permits_total as usize));
    let mut late_sends = 0;
    for i in 0..pool.len() {
        let scheduled = start + Duration::from_secs_f64(i as f64 / rate);
        if scheduled > Instant::now() {
            tokio::time::sleep_until(scheduled.into()).await;
        }
        let permit = room
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        if scheduled.elapsed() > LATE_SEND {
            late_sends += 1;
        }
        let request = pool.take().expect("one request per scheduled send");
        let c = i % clients.len();
        let (client, recorder, live) = (clients[c].clone(), recorders[c].clone(), live.clone());
        tokio::spawn(async move {
            let outcome = send(&client, request, &live).await;
            // From the scheduled time, not the send: a generator that fell behind must not
            // hide the delay it suffered (coordinated omission).
            let latency = scheduled.elapsed();
            live.latency(latency);
            record(&recorder, outcome, latency);
            drop(permit);
        });
    }
    // Every request holds a permit until it is answered or times out.
    let _all = room
        .acquire_many(permits_total)
        .await
        .expect("the semaphore is never closed");
    late_sends
}

async fn send(client: &Client, presigned: Presigned, live: &Live) -> Result<Answer, Error> {
    let operations = match &presigned {
        Presigned::Request(..) => 1,
        Presigned::Envelope(e) => e.ops.len() as u64,
    };
    live.sent.fetch_add(operations, Ordering::Relaxed);
    live.in_flight.fetch_add(operations, Ordering::Relaxed);
    let outcome = match presigned {
        Presigned::Request(request, Some(hint)) => client
            .submit_hinted(request, hint)
            .await
            .map(Answer::Request),
        Presigned::Request(request, None) => client.submit(request).await.map(Answer::Request),
        Presigned::Envelope(e) => {
            let c = client.submit_envelope((*e).clone()).await;
            c.map(|c| Answer::Envelope(e, c))
        }
    };
    live.in_flight.fetch_sub(operations, Ordering::Relaxed);
    let counter = if outcome.is_ok() {
        &live.confirmed
    } else {
        &live.failed
    };
    counter.fetch_add(operations, Ordering::Relaxed);
    outcome
}

fn record(recorder: &Mutex<Recorder>, outcome: Result<Answer, Error>, latency: Duration) {
    recorder
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .record(outcome, latency);
}

/// Prints a line to stderr every second until aborted.
pub(crate) async fn progress(live: Arc<Live>, start: Instant) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await; // the first tick is immediate
    let mut last = (0u64, Instant::now());
    loop {
        tick.tick().await;
        let confirmed = Live::get(&live.confirmed);
        let now = Instant::now();
        let rate = (confirmed - last.0) as f64 / (now - last.1).as_secs_f64();
        last = (confirmed, now);
        let latency_max_us = live.latency_max_us.swap(0, Ordering::Relaxed);
        eprintln!(
            "[{:6.1} s] confirmed {:>10}  rate {:>8}/s  in flight {:>6}  failed {}  max latency {:>6.1} ms",
            start.elapsed().as_secs_f64(),
            thousands(confirmed as f64),
            thousands(rate),
            Live::get(&live.in_flight),
            Live::get(&live.failed),
            latency_max_us as f64 / 1000.0,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(p: &Presigned) -> (&Request, Option<&tally_wire::NonceHint>) {
        match p {
            Presigned::Request(r, h) => (r, h.as_ref()),
            Presigned::Envelope(_) => panic!("an envelope"),
        }
    }

    #[test]
    fn envelopes_hold_every_transfer_once_signed_and_in_order() {
        let accounts = Accounts::generate(6, 2);
        let ids = Ids::new();
        let envelopes = sign_envelopes(&accounts, [9; 32], ids, 1000, 64, 4);
        assert_eq!(
            envelopes.len(),
            16,
            "1000 in envelopes of 64: the last holds 40"
        );
        let mut next = 0u64;
        for p in &envelopes {
            let Presigned::Envelope(e) = p else {
                panic!("a request")
            };
            assert!(tally_core::crypto::verify_envelope(e));
            assert!(accounts.public[..4].contains(&e.signer));
            for op in &e.ops {
                assert_eq!(op.id, ids.transfer(next), "ids follow the pool order");
                assert_ne!(op.to, e.signer);
                assert!(accounts.public[..4].contains(&op.to));
                next += 1;
            }
        }
        assert_eq!(next, 1000);
    }

    #[test]
    fn transfers_are_signed_valid_and_unique() {
        let accounts = Accounts::generate(5, 2);
        let ids = Ids::new();
        let transfers = sign_transfers(&accounts, [9; 32], ids, 200, 5, 3, true);
        assert_eq!(transfers.len(), 200);
        let mut seen = std::collections::HashSet::new();
        let mut cache = tally_core::crypto::KeyCache::new(8);
        let items: Vec<_> = transfers.iter().map(request).collect();
        let (ok, stats) = cache.verify_requests(&items, &mut rand::thread_rng());
        assert!(ok.iter().all(|ok| *ok), "every hinted transfer verifies");
        assert_eq!(stats.batched, 200, "every hint matches its signature");
        for (i, t) in transfers.iter().map(|p| request(p).0).enumerate() {
            assert!(tally_core::crypto::verify_request(t), "transfer {i}");
            assert_eq!(t.op, Op::Transfer);
            assert_ne!(t.signer, t.to, "transfer {i} is to itself");
            assert!(accounts.public.contains(&t.to));
            assert!((1..=TRANSFER_AMOUNT_MAX).contains(&t.amount));
            assert_eq!(t.id, ids.transfer(i as u64), "ids follow the pool order");
            assert!(seen.insert(t.id));
        }
        assert!(!seen.contains(&ids.deposit(0)));
        // Two runs never share an id (with overwhelming probability).
        assert_ne!(Ids::new().transfer(0), ids.transfer(0));
    }

    #[test]
    fn hot_restricts_the_accounts_transfers_use() {
        let accounts = Accounts::generate(50, 2);
        let index = |key: &PublicKey| {
            accounts
                .public
                .iter()
                .position(|k| k == key)
                .expect("a key of the run")
        };
        for hot in [2, 3, 10, 50] {
            let transfers = sign_transfers(&accounts, [7; 32], Ids::new(), 2000, hot, 3, false);
            assert_eq!(transfers.len(), 2000);
            assert!(transfers.iter().all(|p| request(p).1.is_none()));
            let mut used = std::collections::HashSet::new();
            for (i, t) in transfers.iter().map(|p| request(p).0).enumerate() {
                let (from, to) = (index(&t.signer), index(&t.to));
                assert!(
                    from < hot,
                    "hot {hot}: transfer {i} is signed by account {from}"
                );
                assert!(to < hot, "hot {hot}: transfer {i} goes to account {to}");
                assert_ne!(from, to, "transfer {i} is to itself");
                assert!(tally_core::crypto::verify_request(t), "transfer {i}");
                used.insert(from);
                used.insert(to);
            }
            // 2000 uniform draws touch every one of at most 50 accounts.
            assert_eq!(used.len(), hot, "the whole hot set is used");
        }
        // A hot set larger than the ledger is the whole ledger.
        let transfers = sign_transfers(&accounts, [7; 32], Ids::new(), 100, 1000, 2, false);
        assert!(transfers.iter().all(|p| index(&request(p).0.to) < 50));
    }

    #[test]
    fn parallel_keeps_order_and_covers_everything() {
        for (count, threads) in [(0, 4), (1, 4), (10, 3), (10, 10), (7, 1)] {
            let got = parallel(count, threads, |range| range.collect());
            assert_eq!(got, (0..count).collect::<Vec<_>>(), "{count} on {threads}");
        }
    }

    #[test]
    fn pool_hands_out_each_request_once() {
        let accounts = Accounts::generate(2, 1);
        let pool = Pool::new(sign_transfers(
            &accounts,
            [1; 32],
            Ids::new(),
            3,
            2,
            1,
            false,
        ));
        assert!(!pool.exhausted());
        let ids: Vec<u128> = std::iter::from_fn(|| pool.take())
            .map(|p| request(&p).0.id)
            .collect();
        assert_eq!(ids.len(), 3);
        assert!(pool.exhausted());
        assert!(pool.take().is_none());
    }
}
