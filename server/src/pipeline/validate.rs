//! The validation pools: stateless workers (chain id, keys, signatures, checked in batches)
//! and snapshot workers (the engine's `precheck` against the applied state, through lookups on
//! the storage thread). Both hand on to the next queue with a blocking send (backpressure).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use tally_core::engine::master::{precheck, precheck_envelope, Precheck};
use tally_core::ports::{LedgerRead, RequestRecord};
use tally_core::reserve::{Expiry, Reserve};
use tally_core::validate::StatelessRules;
use tally_core::Result as CoreResult;
use tally_wire::PublicKey;

use crate::channels::{Job, StorageCmd, Submission};
use crate::fail::on_error;
use crate::metrics::Metrics;

/// Waits for one job, then takes whatever else is queued, up to `max` in all, without waiting
/// for more. None once the queue is closed.
fn recv_chunk(rx: &Receiver<Job>, max: usize) -> Option<Vec<Job>> {
    let mut jobs = vec![rx.recv().ok()?];
    while jobs.len() < max {
        match rx.try_recv() {
            Ok(job) => jobs.push(job),
            Err(_) => break,
        }
    }
    Some(jobs)
}

/// Decompressed signer keys each stateless worker keeps.
const KEY_CACHE_MAX: usize = 65_536;

/// Most jobs one stateless worker takes from its queue at once: their hinted signatures are
/// checked in one batch equation (`KeyCache::verify_requests`). A worker takes what is queued
/// and does not wait for more, so a lone request is not held back. Under load the chunks fill
/// (`tally_signature_batch_size`), and bigger equations cost less per signature (here ~17.8 us
/// at 128, ~15.5 us at 512, one core). Measured with `tally-bench --start-server --duration
/// 20s`: 512 gave 55-58k/s, 1,024 63.3-63.6k/s, 2,048 63.4-64.9k/s; 1,024 holds a worker
/// ~15 ms, half what 2,048 would, for about the same rate.
const STATELESS_CHUNK_MAX: usize = 1024;

/// Queued requests that make a helper take work without being asked (see [`Backlog`]).
const HELP_QUEUED_MIN: usize = 64;
/// How long a helper sleeps between looks at the queue when nobody asks for help.
const HELP_POLL: Duration = Duration::from_millis(5);

/// How the stateless workers share one queue. The first worker takes whatever is queued
/// whenever it is free (a lone request is never held back); the others help only when work
/// is left behind: when the first finds the queue still non-empty after taking its chunk, or
/// when at least [`HELP_QUEUED_MIN`] requests wait. Before, every worker woke for every request,
/// so that below saturation each checked batches of a few signatures (a batch equation's fixed
/// cost paid for each few) while the other core was needed elsewhere; one worker lets the queue
/// gather while it works, and its batches grow with the load.
#[derive(Default)]
pub(super) struct Backlog {
    asked: Mutex<bool>,
    wake: Condvar,
    closed: AtomicBool,
}

impl Backlog {
    fn ask(&self) {
        *self.asked.lock().expect("not poisoned") = true;
        self.wake.notify_one();
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        *self.asked.lock().expect("not poisoned") = true;
        self.wake.notify_all();
    }

    /// Waits until asked, or [`HELP_POLL`] passed; says whether it was asked.
    fn wait(&self) -> bool {
        let asked = self.asked.lock().expect("not poisoned");
        let (mut asked, _) = self
            .wake
            .wait_timeout_while(asked, HELP_POLL, |asked| !*asked)
            .expect("not poisoned");
        std::mem::take(&mut *asked)
    }
}

/// A helper's next chunk: taken from the queue without waiting once there is backlog (see
/// [`Backlog`]); None once the queue is closed.
fn help_chunk(rx: &Receiver<Job>, backlog: &Backlog) -> Option<Vec<Job>> {
    loop {
        let asked = backlog.wait();
        if backlog.closed.load(Ordering::Relaxed) {
            return None;
        }
        if !asked && rx.len() < HELP_QUEUED_MIN {
            continue;
        }
        let mut jobs = Vec::new();
        while jobs.len() < STATELESS_CHUNK_MAX {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        if !jobs.is_empty() {
            return Some(jobs);
        }
    }
}

/// Worker `index`'s next chunk (see [`Backlog`]): the first waits on the queue, the others
/// help; whoever leaves work behind asks for help. None once the queue is closed.
fn next_chunk(index: usize, rx: &Receiver<Job>, backlog: &Backlog) -> Option<Vec<Job>> {
    let jobs = if index == 0 {
        recv_chunk(rx, STATELESS_CHUNK_MAX)
    } else {
        help_chunk(rx, backlog)
    };
    match &jobs {
        None if index == 0 => backlog.close(),
        Some(_) if !rx.is_empty() => backlog.ask(),
        _ => {}
    }
    jobs
}

/// The stateless worker `index` (0 leads, the others help: see [`Backlog`]).
pub(super) fn stateless_worker(
    index: usize,
    rx: Receiver<Job>,
    tx: Sender<Job>,
    backlog: &Backlog,
    rules: &StatelessRules,
    metrics: &Metrics,
) {
    use rand::SeedableRng;
    let mut keys = tally_core::crypto::KeyCache::new(KEY_CACHE_MAX);
    let mut accounts = tally_core::validate::AccountKeys::new(KEY_CACHE_MAX);
    // The batch weights must be unpredictable to signers: a CSPRNG seeded from the OS.
    let mut rng = rand::rngs::StdRng::from_entropy();
    while let Some(jobs) = next_chunk(index, &rx, backlog) {
        let started = Instant::now();
        let taken = jobs.len();
        let mut signed = Vec::with_capacity(jobs.len());
        for job in jobs {
            let checked = match &job.submission {
                Submission::Request(request) => rules.check_unsigned(request, &mut accounts),
                Submission::Envelope { envelope, .. } => {
                    // One signature over many operations: checked alone, here.
                    match rules.check_envelope(envelope, &mut accounts) {
                        Ok(()) => {
                            if tx.send(job).is_err() {
                                return;
                            }
                            continue;
                        }
                        Err((Some(index), r)) => {
                            job.reply.fail(index, r);
                            continue;
                        }
                        Err((None, r)) => Err(r),
                    }
                }
            };
            match checked {
                Ok(()) => signed.push(job),
                Err(r) => job.reply.reject(r),
            }
        }
        let items: Vec<_> = signed
            .iter()
            .map(|j| (j.request(), j.hint.as_ref().map(|(h, _)| h)))
            .collect();
        let (verified, stats) = keys.verify_requests(&items, &mut rng);
        metrics.signature_checks(&stats);
        // Time per request: the chunk's time shared among its requests.
        let each = started.elapsed().as_secs_f64() / taken as f64;
        for _ in 0..taken {
            metrics.stateless.seconds.observe(each);
        }
        for (job, ok) in signed.into_iter().zip(verified) {
            if !ok {
                if let Some((_, hints)) = &job.hint {
                    hints.store(false, Ordering::Relaxed);
                }
                job.reply.reject(tally_core::validate::bad_signature());
            } else if tx.send(job).is_err() {
                return;
            }
        }
    }
}

/// Most jobs one snapshot lookup carries: amortizes the round trip to the storage thread.
const SNAPSHOT_CHUNK_MAX: usize = 256;

pub(super) fn snapshot_worker(
    rx: Receiver<Job>,
    tx: Sender<Job>,
    storage: Sender<StorageCmd>,
    metrics: &Metrics,
) {
    while let Some(jobs) = recv_chunk(&rx, SNAPSHOT_CHUNK_MAX) {
        let keys = jobs.iter().flat_map(Job::keys).collect();
        let accounts = jobs.iter().map(|j| *j.signer()).collect();
        let (reply_tx, reply_rx) = bounded(1);
        let started = Instant::now();
        if storage
            .send(StorageCmd::Lookup {
                keys,
                accounts,
                reply: reply_tx,
            })
            .is_err()
        {
            return;
        }
        let result = match reply_rx.recv() {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => {
                for job in jobs {
                    on_error("snapshot lookup", e.clone(), job.reply);
                }
                continue;
            }
            Err(_) => return,
        };
        metrics
            .snapshot
            .seconds
            .observe(started.elapsed().as_secs_f64());
        let mut records = result.records.into_iter();
        for (job, balance) in jobs.into_iter().zip(result.balances) {
            let job_records: Vec<_> = records.by_ref().take(job.keys().len()).collect();
            let Some((mut job, verdict)) = snapshot_verdict(job, job_records, balance) else {
                continue;
            };
            match verdict {
                Precheck::Pass => {}
                Precheck::Replay(record) => {
                    let _ = storage.send(StorageCmd::Replay {
                        height: record.height,
                        index: record.index,
                        request_hash: record.request_hash,
                        reply: job.reply,
                    });
                    continue;
                }
                Precheck::Reject(r) => {
                    job.reply.reject(r);
                    continue;
                }
            }
            job.snapshot_height = result.height;
            if tx.send(job).is_err() {
                return;
            }
        }
    }
}

/// The engine's precheck of one job from the records of its keys and its signer's balance;
/// None when it was answered here (an envelope with a used id fails at that operation).
fn snapshot_verdict(
    job: Job,
    records: Vec<Option<RequestRecord>>,
    balance: Option<u64>,
) -> Option<(Job, Precheck)> {
    let verdict = match &job.submission {
        Submission::Request(request) => precheck(request, records[0], balance),
        Submission::Envelope { hash, .. } => match precheck_envelope(hash, &records) {
            Ok(verdict) => verdict,
            Err((index, r)) => {
                job.reply.fail(index, r);
                return None;
            }
        },
    };
    Some((job, verdict))
}

/// The master's view of committed state: synchronous reads through the storage thread. Used
/// only on a cache miss of the sequencer, which is what `tally_account_cache_misses_total` counts.
pub(super) struct StorageReader<'a>(pub &'a Sender<StorageCmd>, pub &'a Metrics);

impl LedgerRead for StorageReader<'_> {
    fn account(&mut self, key: &PublicKey) -> CoreResult<Option<u64>> {
        self.1.batches.account_cache_misses_total.inc();
        let (tx, rx) = bounded(1);
        self.0
            .send(StorageCmd::LoadAccount {
                key: *key,
                reply: tx,
            })
            .map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())?
    }
    fn request(&mut self, signer: &PublicKey, id: u128) -> CoreResult<Option<RequestRecord>> {
        self.ask(|reply| StorageCmd::LoadRequest {
            signer: *signer,
            id,
            reply,
        })
    }
    fn reserve(&mut self, owner: &PublicKey, id: u128) -> CoreResult<Option<Reserve>> {
        self.ask(|reply| StorageCmd::LoadReserve {
            owner: *owner,
            id,
            reply,
        })
    }
    fn expiries(&mut self, limit: usize) -> CoreResult<Vec<Expiry>> {
        self.ask(|reply| StorageCmd::LoadExpiries { limit, reply })
    }
    fn header_time(&mut self, height: u64) -> CoreResult<u64> {
        self.ask(|reply| StorageCmd::HeaderTime { height, reply })
    }
}

impl StorageReader<'_> {
    /// Sends a command to the storage thread and waits for its answer.
    fn ask<T>(&self, cmd: impl FnOnce(Sender<CoreResult<T>>) -> StorageCmd) -> CoreResult<T> {
        let (tx, rx) = bounded(1);
        self.0.send(cmd(tx)).map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())?
    }
}

pub(super) fn gone() -> tally_core::Error {
    tally_core::Error::stopped("the storage thread")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A helper sleeps until asked (or its poll passes); one ask wakes one wait, and a close
    /// wakes every helper for good.
    #[test]
    fn a_helper_wakes_when_asked_and_when_closed() {
        let backlog = Backlog::default();
        let started = Instant::now();
        assert!(!backlog.wait(), "nobody asked");
        assert!(started.elapsed() >= HELP_POLL);
        backlog.ask();
        assert!(backlog.wait(), "asked");
        assert!(!backlog.wait(), "one ask is taken once");

        let backlog = std::sync::Arc::new(Backlog::default());
        let helpers: Vec<_> = (0..3)
            .map(|_| {
                let backlog = backlog.clone();
                std::thread::spawn(move || {
                    let (_tx, rx) = bounded::<Job>(1);
                    help_chunk(&rx, &backlog).is_none()
                })
            })
            .collect();
        backlog.close();
        for h in helpers {
            assert!(h.join().unwrap(), "a closed backlog ends the helper");
        }
    }
}
