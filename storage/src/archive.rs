//! The archive: the ledger's `body` and `request` tables, in a LevelDB of their own
//! (`<ledger>/archive`), written behind the confirmation path by a thread of their own.
//!
//! Why: rusty-leveldb compacts inside writes, on the writing thread. Bodies (content-addressed)
//! and request records (keyed by signer) land at random keys and are about nine tenths of the
//! bytes a batch writes, so every level-0 compaction of a database holding them rewrites most of
//! level 1: 100-300 ms during which the storage thread, and with it every confirmation, stood
//! still. Split off, the state database (accounts, headers, summary) stays
//! small and its compactions short; the archive's compactions run on the archive thread while
//! the storage thread goes on.
//!
//! Durability: a confirmation leaves after the batch is durable in the state database *and* in
//! the raft log, which holds the whole body. The archive catches up from memory while the
//! process lives and from the raft log after a crash ([`crate::LedgerDb::rearchive`]); the raft
//! log is compacted only up to what the archive holds durably
//! ([`crate::LedgerDb::compactable_meta`]).
//!
//! Invariants:
//! - The archive's point (its summary row: height and raft index) is written in the same synced
//!   write as the rows of every batch up to it, and is never ahead of the state database.
//! - Every batch between the archive's point and the state's height is held in memory by
//!   [`crate::LedgerDb`] (bodies and request records) until the archive reports it durable, so
//!   lookups never miss it. The lag is bounded (`ARCHIVE_LAG_*`): at the bound, `apply` waits.
//! - An IO error on the archive thread is sticky: every later call of the ledger fails with it,
//!   and the server stops (it never confirms past a failed archive write without the raft log).

use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use rusty_leveldb::{LdbIterator, WriteBatch, DB};
use tally_core::{Error, Result};
use tally_wire::Hash;

use crate::bodies::{BodyLog, Locator};
use crate::env::{get_checked, SyncEnv, SyncStats};
use crate::filter::RequestFilter;
use crate::history::{Get, HistoryWriter};
use crate::layout::{self, Table};
use crate::ledger::{io_error, leveldb_options, reopen_fresh, scan_prefix};
use crate::runs::{self, Runs};
use crate::StoreOptions;

/// Batches queued to the archive thread, at most.
const QUEUE_MAX: usize = 1024;
/// Records per message of an archive dump, at most ...
const DUMP_GROUP_RECORDS: usize = 4096;
/// ... and bytes (keys and values; a group exceeds it by at most one record). With the dump
/// channel's bound of 2, a dump holds a few groups in memory at once.
const DUMP_GROUP_BYTES: usize = 4 << 20;
/// Batches one archive write takes from the queue, at most.
const WRITE_GROUP_MAX: usize = 64;

/// One applied batch's archive rows.
pub(crate) struct ArchiveBatch {
    pub height: u64,
    pub raft_index: u64,
    pub digest: Hash,
    pub body: Arc<Vec<u8>>,
    /// Request table rows: key, value.
    pub requests: Vec<([u8; 52], [u8; layout::REQUEST_VALUE_BYTES])>,
    /// The body's receipt leaf hashes, when the caller has them (an apply's replay does);
    /// otherwise the archive thread hashes the receipts.
    pub leaf_hashes: Option<Vec<Hash>>,
}

type Reply<T> = SyncSender<Result<T>>;
type Records = Vec<(Vec<u8>, Vec<u8>)>;

enum Cmd {
    Write(ArchiveBatch),
    Get {
        key: Vec<u8>,
        reply: Reply<Option<Vec<u8>>>,
    },
    /// The body of this digest, from the body log or (written before it) the `body` row.
    Body {
        digest: Hash,
        reply: Reply<Option<Vec<u8>>>,
    },
    /// Streams every row but the archive's summary, in key order, in groups; then an empty group.
    Dump {
        out: SyncSender<Result<Records>>,
    },
    RawPut {
        key: Vec<u8>,
        value: Vec<u8>,
        reply: Reply<()>,
    },
    /// Point reads run on the archive thread (history reads: many reads, one round trip).
    Read(Box<dyn FnOnce(&mut Get<'_>) + Send>),
    Stop,
}

/// What the archive holds durably.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ArchivePoint {
    pub height: u64,
    pub raft_index: u64,
}

impl ArchivePoint {
    pub(crate) fn encode(&self) -> [u8; 16] {
        let mut out = [0; 16];
        out[..8].copy_from_slice(&self.height.to_le_bytes());
        out[8..].copy_from_slice(&self.raft_index.to_le_bytes());
        out
    }

    fn decode(value: &[u8]) -> Result<ArchivePoint> {
        let v: [u8; 16] = layout::fixed(Table::Meta, value)?;
        Ok(ArchivePoint {
            height: u64::from_le_bytes(v[..8].try_into().expect("8")),
            raft_index: u64::from_le_bytes(v[8..].try_into().expect("8")),
        })
    }
}

#[derive(Default)]
struct ProgressState {
    point: ArchivePoint,
    failed: Option<String>,
}

#[derive(Default)]
struct Progress {
    state: Mutex<ProgressState>,
    changed: Condvar,
}

impl Progress {
    /// Records that the archive thread failed with `e` (every later call reports it) and
    /// wakes the threads waiting on its progress.
    fn fail(&self, e: &Error) {
        let mut s = self.state.lock().expect("progress lock");
        s.failed = Some(e.to_string());
        self.changed.notify_all();
    }

    /// Records that the archive holds every batch up to `point` durably and wakes the threads
    /// waiting on its progress.
    fn advance(&self, point: ArchivePoint) {
        let mut s = self.state.lock().expect("progress lock");
        s.point = point;
        self.changed.notify_all();
    }
}

/// The handle to the archive thread, owned by [`crate::LedgerDb`].
pub(crate) struct Archive {
    tx: SyncSender<Cmd>,
    progress: Arc<Progress>,
    thread: Option<JoinHandle<()>>,
    /// The oldest height whose history the archive holds (see `history.rs`).
    held_from: u64,
}

impl Archive {
    /// Opens (creating if missing) the archive database in `dir` on a new thread. Returns its
    /// point and, when `opts` asks for one, the request filter: `saved` if given (a filter
    /// saved for exactly this ledger), else built by scanning the request table.
    pub(crate) fn open(
        ledger: &Path,
        opts: &StoreOptions,
        saved: Option<RequestFilter>,
    ) -> Result<(Archive, ArchivePoint, Option<RequestFilter>)> {
        let dir = crate::ledger::archive_dir(ledger);
        let bodies_dir = crate::bodies::bodies_dir(ledger);
        let runs_dir = runs::runs_dir(ledger);
        let (tx, rx) = sync_channel(QUEUE_MAX);
        let (opened_tx, opened_rx) =
            sync_channel::<Result<(ArchivePoint, u64, Option<RequestFilter>)>>(1);
        let progress = Arc::new(Progress::default());
        let (opts, progress2) = (opts.clone(), Arc::clone(&progress));
        let thread = std::thread::Builder::new()
            .name("archive".into())
            .spawn(move || {
                lower_priority();
                // One count of failed reads for every handle on this database (`get_checked`).
                let stats = Arc::new(SyncStats::default());
                let env = || SyncEnv::sharing(Arc::clone(&stats));
                let opened = open_on_thread((&dir, &runs_dir), &opts, saved, &stats)
                    .and_then(|o| Ok((o, BodyLog::open(&bodies_dir)?)));
                match opened {
                    Ok(((db, point, (held_from, history), filter, index), bodies)) => {
                        progress2.state.lock().expect("progress lock").point = point;
                        let _ = opened_tx.send(Ok((point, held_from, filter)));
                        let reopen = || leveldb_options(&opts, env());
                        let mut stores = Stores { db, bodies, index };
                        run(&mut stores, rx, &progress2, (&dir, &stats), history, reopen);
                    }
                    Err(e) => {
                        let _ = opened_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| Error::io("starting the archive thread", e))?;
        let (point, held_from, filter) = opened_rx
            .recv()
            .map_err(|_| Error::stopped("the archive thread (while opening)"))??;
        Ok((
            Archive {
                tx,
                progress,
                thread: Some(thread),
                held_from,
            },
            point,
            filter,
        ))
    }

    /// Queues a batch. Blocks while the queue is full.
    pub(crate) fn write(&self, batch: ArchiveBatch) -> Result<()> {
        self.send(Cmd::Write(batch))
    }

    /// What the archive holds durably, or its write error.
    pub(crate) fn point(&self) -> Result<ArchivePoint> {
        let s = self.progress.state.lock().expect("progress lock");
        match &s.failed {
            Some(e) => Err(failed(e)),
            None => Ok(s.point),
        }
    }

    /// Waits until the archive holds `height` durably.
    pub(crate) fn wait_for(&self, height: u64) -> Result<ArchivePoint> {
        let mut s = self.progress.state.lock().expect("progress lock");
        loop {
            if let Some(e) = &s.failed {
                return Err(failed(e));
            }
            if s.point.height >= height {
                return Ok(s.point);
            }
            s = self.progress.changed.wait(s).expect("progress lock");
        }
    }

    /// Reads one row (after every queued write).
    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let (reply, rx) = sync_channel(1);
        self.send(Cmd::Get {
            key: key.to_vec(),
            reply,
        })?;
        self.answer(rx)
    }

    /// The body whose SHA-256 is `digest` (after every queued write).
    pub(crate) fn body(&self, digest: &Hash) -> Result<Option<Vec<u8>>> {
        let (reply, rx) = sync_channel(1);
        self.send(Cmd::Body {
            digest: *digest,
            reply,
        })?;
        self.answer(rx)
    }

    /// The oldest height whose history the archive holds.
    pub(crate) fn held_from(&self) -> u64 {
        self.held_from
    }

    /// Runs `f` with point reads of the archive on its thread, after every queued write: it
    /// sees every batch queued before the call.
    pub(crate) fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Get<'_>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (reply, rx) = sync_channel(1);
        self.send(Cmd::Read(Box::new(move |get: &mut Get<'_>| {
            let _ = reply.send(f(get));
        })))?;
        self.answer(rx)
    }

    /// Writes one row, synced (tests that need a corrupt archive).
    pub(crate) fn raw_put(&self, key: &[u8], value: &[u8]) -> Result<()> {
        let (reply, rx) = sync_channel(1);
        self.send(Cmd::RawPut {
            key: key.to_vec(),
            value: value.to_vec(),
            reply,
        })?;
        self.answer(rx)
    }

    /// Every row but the archive's summary, in key order, in groups (after every queued write).
    /// The receiver yields an empty group at the end.
    pub(crate) fn dump(&self) -> Result<Receiver<Result<Records>>> {
        let (out, rx) = sync_channel(2);
        self.send(Cmd::Dump { out })?;
        Ok(rx)
    }

    /// Writes what is queued, stops the thread and reports a write error.
    pub(crate) fn close(mut self) -> Result<()> {
        self.stop();
        self.point().map(|_| ())
    }

    fn stop(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.tx.send(Cmd::Stop);
            let _ = thread.join();
        }
    }

    fn send(&self, cmd: Cmd) -> Result<()> {
        if self.tx.send(cmd).is_err() {
            self.point()?;
            return Err(Error::stopped("the archive thread"));
        }
        Ok(())
    }

    fn answer<T>(&self, rx: Receiver<Result<T>>) -> Result<T> {
        match rx.recv() {
            Ok(r) => r,
            Err(_) => {
                self.point()?;
                Err(Error::stopped("the archive thread"))
            }
        }
    }
}

impl Drop for Archive {
    fn drop(&mut self) {
        self.stop();
    }
}

fn failed(e: &str) -> Error {
    Error::io(
        "an archive write failed earlier, the ledger must be reopened",
        e,
    )
}

/// What the archive thread opens: its database, point, history start and writer, and filter.
type Opened = (
    DB,
    ArchivePoint,
    (u64, HistoryWriter),
    Option<RequestFilter>,
    Indexes,
);

/// Opens the archive database in `dir` (on the archive thread) and reads what it holds.
fn open_on_thread(
    (dir, runs_dir): (&Path, &Path),
    opts: &StoreOptions,
    saved: Option<RequestFilter>,
    stats: &Arc<SyncStats>,
) -> Result<Opened> {
    let env = || SyncEnv::sharing(Arc::clone(stats));
    let mut db = DB::open(dir, leveldb_options(opts, env()))
        .map_err(|e| io_error(format_args!("opening {}", dir.display()), e))?;
    crate::ledger::advance_sequence(&mut db)
        .map_err(|e| io_error("writing the archive's open marker", e))?;
    let point = match get_checked(&mut db, &layout::archive_point_key(), stats)? {
        None => ArchivePoint::default(),
        Some(v) => ArchivePoint::decode(&v)?,
    };
    drop_history_v1(&mut db, dir, || leveldb_options(opts, env()), stats)?;
    let held_from = open_held_from(&mut db, point, stats)?;
    let index = Indexes::open(&mut db, runs_dir, stats)?;
    if saved.is_some() {
        return Ok((db, point, held_from, saved, index));
    }
    let mut filter = RequestFilter::new(opts.request_filter_bytes);
    if let Some(filter) = &mut filter {
        scan_prefix(&mut db, &Table::Request.tag(), |key, _| {
            filter.insert(key);
            Ok(())
        })?;
        // The scan iterated (see `reopen_fresh`).
        reopen_fresh(&mut db, dir, leveldb_options(opts, env()))?;
        let mut entries = index.requests.entries()?;
        while let Some(entry) = entries.next()? {
            filter.insert(&entry[..layout::REQUEST_KEY_BYTES]);
        }
    }
    Ok((db, point, held_from, filter, index))
}

/// The archive thread's nice value (Linux: per thread). Its merges are bulk work whose only
/// deadline is the lag bound (`ARCHIVE_LAG_*`), and one of them can take a core for seconds;
/// at the default priority that core was taken from the threads that confirm (at half of the
/// maximum rate, p99 of two 60 s runs 122-136 ms against 91-95 ms niced, both with a 1 MiB
/// state memtable). When the archive
/// falls behind anyway, the lag bound makes `apply` wait, which frees the CPU it needs.
const ARCHIVE_NICE: i32 = 19;

/// Lowers the calling thread's CPU priority to [`ARCHIVE_NICE`]. Best effort: a failure (a
/// sandbox refusing it) leaves the thread at the default priority, which only costs latency.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        let tid = rustix::thread::gettid();
        if let Err(e) = rustix::process::setpriority_process(Some(tid), ARCHIVE_NICE) {
            eprintln!("tally-storage: could not lower the archive thread's priority: {e}");
        }
    }
}

/// What the archive thread writes: its database and the body log beside it.
struct Stores {
    db: DB,
    bodies: BodyLog,
    index: Indexes,
}

impl Stores {
    /// The body of `digest`: the `body` row, resolved through the body log when it holds a
    /// locator (see `bodies.rs`).
    fn body(&mut self, digest: &Hash, stats: &SyncStats) -> Result<Option<Vec<u8>>> {
        self.get(&layout::body_key(digest), stats)
    }

    /// The row at `key`, a `body` or `history` row resolved through the body log.
    fn get(&mut self, key: &[u8], stats: &SyncStats) -> Result<Option<Vec<u8>>> {
        if let Some(runs) = self.index.runs_of(key) {
            if let Some(value) = runs.get(key)? {
                return Ok(Some(value));
            }
        }
        // Rows written before the runs, or by an install or an import.
        let row = get_checked(&mut self.db, key, stats)?;
        row.map(|v| resolve(&mut self.bodies, key, v)).transpose()
    }
}

/// The value of the row at `key` as what it stands for: a `body` or `history` row holding a
/// locator (see `bodies.rs`) as the record it names, any other as it is.
fn resolve(bodies: &mut BodyLog, key: &[u8], value: Vec<u8>) -> Result<Vec<u8>> {
    let located = [Table::Body, Table::History]
        .into_iter()
        .find(|t| key.starts_with(&t.tag()));
    let Some(table) = located else {
        return Ok(value);
    };
    match Locator::decode(table, &value)? {
        Some(at) => bodies.read(&at),
        None => Ok(value),
    }
}

/// The archive thread: writes queued batches in groups, one synced write per group.
fn run(
    stores: &mut Stores,
    rx: Receiver<Cmd>,
    progress: &Progress,
    (dir, stats): (&Path, &SyncStats),
    mut history: HistoryWriter,
    options: impl Fn() -> rusty_leveldb::Options,
) {
    let mut next = None;
    let mut scratch = Scratch::default();
    loop {
        let cmd = match next.take() {
            Some(cmd) => cmd,
            None => match rx.recv() {
                Ok(cmd) => cmd,
                Err(_) => return,
            },
        };
        match cmd {
            Cmd::Write(first) => {
                let (group, after) = gather_group(first, &rx);
                next = after;
                let written = write_group(stores, &group, &mut history, stats, &mut scratch);
                // Emptied whatever the outcome: a group that failed halfway leaves nothing.
                scratch.reset();
                if let Err(e) = written {
                    progress.fail(&e);
                    return;
                }
                let last = group.last().expect("a group is never empty");
                progress.advance(ArchivePoint {
                    height: last.height,
                    raft_index: last.raft_index,
                });
            }
            Cmd::Get { key, reply } => {
                let _ = reply.send(stores.get(&key, stats));
            }
            Cmd::Body { digest, reply } => {
                let _ = reply.send(stores.body(&digest, stats));
            }
            Cmd::Read(f) => f(&mut |key: &[u8]| stores.get(key, stats)),
            Cmd::RawPut { key, value, reply } => {
                // A raw row may be a history row: read heads again from the database.
                history.forget();
                let mut batch = WriteBatch::default();
                batch.put(&key, &value);
                let _ = reply.send(
                    stores
                        .db
                        .write(batch, true)
                        .map_err(|e| io_error("archive raw put", e)),
                );
            }
            Cmd::Dump { out } => {
                dump(stores, &out);
                // The dump iterated: go on with a handle that never did (see `reopen_fresh`).
                if let Err(e) = reopen_fresh(&mut stores.db, dir, options()) {
                    progress.fail(&e);
                    return;
                }
            }
            Cmd::Stop => {
                let _ = stores.db.close();
                return;
            }
        }
    }
}

/// Takes the writes queued behind `first`, without waiting, up to [`WRITE_GROUP_MAX`] in all.
/// Returns them as one group, and the command that ended the group if it is not a write.
fn gather_group(first: ArchiveBatch, rx: &Receiver<Cmd>) -> (Vec<ArchiveBatch>, Option<Cmd>) {
    let mut group = vec![first];
    while group.len() < WRITE_GROUP_MAX {
        match rx.try_recv() {
            Ok(Cmd::Write(b)) => group.push(b),
            Ok(other) => return (group, Some(other)),
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
        }
    }
    (group, None)
}

/// Writes a group of batches (bodies, request records, history and receipt rows) and the
/// archive point after them in one synced write. The bodies go to the body log first, synced
/// before the write that holds their locators (see `bodies.rs`).
///
/// The small rows go in key order: rusty-leveldb's memtable is a skip list, which (patched,
/// storage/vendor/README.md) searches a key greater than the last one from the last one's
/// path: a few comparisons on nodes still in the cache, where random keys descend from the top
/// and miss the cache at every level.
fn write_group(
    stores: &mut Stores,
    group: &[ArchiveBatch],
    history: &mut HistoryWriter,
    stats: &SyncStats,
    scratch: &mut Scratch,
) -> Result<()> {
    if let Err(e) = derive_rows(stores, group, history, stats, scratch) {
        // Heads it changed are in `history`'s memory only.
        history.forget();
        return Err(e);
    }
    let Scratch {
        rows,
        batch,
        requests,
        receipts,
    } = scratch;
    let Stores { db, bodies, index } = stores;
    rows.write_into(batch);
    bodies.sync()?;
    let added = index.write(requests, receipts, batch)?;
    let last = group.last().expect("a group is never empty");
    let point = ArchivePoint {
        height: last.height,
        raft_index: last.raft_index,
    };
    batch.put(&layout::archive_point_key(), &point.encode());
    db.write_ref(batch, true)
        .map_err(|e| io_error(format_args!("archiving batch {}", last.height), e))?;
    index.add(added);
    index.merge_due(db)
}

/// A group's rows into `scratch`: its bodies, request rows, history and receipt rows (the
/// bodies and history rows appended to the body log, their locators into the rows).
fn derive_rows(
    stores: &mut Stores,
    group: &[ArchiveBatch],
    history: &mut HistoryWriter,
    stats: &SyncStats,
    scratch: &mut Scratch,
) -> Result<()> {
    let Scratch {
        rows,
        requests,
        receipts,
        ..
    } = scratch;
    let Stores { db, bodies, .. } = stores;
    for b in group {
        let at = bodies.append(&b.body)?;
        rows.put(&layout::body_key(&b.digest), &at.encode());
        for (key, value) in &b.requests {
            requests.extend_from_slice(key);
            requests.extend_from_slice(value);
        }
        let body = tally_core::batch::BatchBody::decode(&b.body)
            .map_err(|e| Error::corrupt(format_args!("archiving batch {}: {e}", b.height)))?;
        let hashed;
        let leaves = match &b.leaf_hashes {
            Some(leaves) => leaves,
            None => {
                hashed = body.leaf_hashes();
                &hashed
            }
        };
        // Heads this group changed are in `history`'s memory, not yet in `db`.
        history.batch(
            &body,
            leaves,
            &mut |key: &[u8]| get_checked(db, key, stats),
            &mut GroupRows {
                rows,
                bodies,
                receipts,
            },
        )?;
    }
    history.finish(&mut GroupRows {
        rows,
        bodies,
        receipts,
    })
}

/// The `request` and `receipt` tables' sorted runs (see `runs.rs`), and the number of the next
/// run written.
struct Indexes {
    requests: Runs,
    receipts: Runs,
    next: u64,
}

impl Indexes {
    const TABLES: [Table; 2] = [Table::Request, Table::Receipt];

    /// Opens the runs the archive database lists, deleting every other run file.
    fn open(db: &mut DB, dir: &Path, stats: &SyncStats) -> Result<Indexes> {
        let mut lists = Vec::new();
        for table in Self::TABLES {
            let listed = get_checked(db, &layout::runs_key(table), stats)?;
            lists.push(match listed {
                Some(v) => runs::decode_list(table, &v)?,
                None => Vec::new(),
            });
        }
        let all: Vec<u64> = lists.concat();
        let next = runs::next_seq(dir, &all)?;
        runs::delete_unlisted(dir, &all)?;
        let lengths = [
            (layout::REQUEST_KEY_BYTES, layout::REQUEST_VALUE_BYTES),
            (
                layout::RECEIPT_KEY_BYTES,
                crate::history::RECEIPT_VALUE_BYTES,
            ),
        ];
        let requests = Runs::open(dir, Table::Request, lengths[0], &lists[0])?;
        let receipts = Runs::open(dir, Table::Receipt, lengths[1], &lists[1])?;
        Ok(Indexes {
            requests,
            receipts,
            next,
        })
    }

    /// The runs that hold `key`'s table, if it is one of theirs.
    fn runs_of(&self, key: &[u8]) -> Option<&Runs> {
        if key.starts_with(&Table::Request.tag()) {
            Some(&self.requests)
        } else if key.starts_with(&Table::Receipt.tag()) {
            Some(&self.receipts)
        } else {
            None
        }
    }

    fn runs_mut(&mut self, table: Table) -> &mut Runs {
        match table {
            Table::Request => &mut self.requests,
            Table::Receipt => &mut self.receipts,
            other => unreachable!("table {other} has no runs"),
        }
    }

    /// Writes a group's request and receipt rows as one run each (synced), and puts the run
    /// lists naming them into `batch`. Returns the runs to [`Indexes::add`] once it is written.
    fn write(
        &mut self,
        requests: &[u8],
        receipts: &[u8],
        batch: &mut WriteBatch,
    ) -> Result<Vec<(Table, runs::Run)>> {
        let mut added = Vec::new();
        for (table, entries) in Self::TABLES.into_iter().zip([requests, receipts]) {
            if entries.is_empty() {
                continue;
            }
            let seq = self.next;
            self.next += 1;
            let runs = self.runs_mut(table);
            let run = runs.write(seq, entries)?;
            let mut listed = runs.listed();
            listed.push(seq);
            batch.put(&layout::runs_key(table), &runs::encode_list(&listed));
            added.push((table, run));
        }
        Ok(added)
    }

    fn add(&mut self, added: Vec<(Table, runs::Run)>) {
        for (table, run) in added {
            self.runs_mut(table).add(run);
        }
    }

    /// Merges runs while a merge is due (`Runs::merge_due`): the merged run is written and
    /// synced, the database's list replaced in a synced write, then the inputs deleted.
    fn merge_due(&mut self, db: &mut DB) -> Result<()> {
        for table in Self::TABLES {
            while let Some(range) = self.runs_mut(table).merge_due() {
                let seq = self.next;
                self.next += 1;
                let runs = self.runs_mut(table);
                let run = runs.merge(range.clone(), seq)?;
                let mut batch = WriteBatch::default();
                let listed = runs.listed_after(range.clone(), seq);
                batch.put(&layout::runs_key(table), &runs::encode_list(&listed));
                db.write(batch, true)
                    .map_err(|e| io_error("recording a merged run", e))?;
                let gone = runs.replace(range, run);
                runs.delete(&gone)?;
            }
        }
        Ok(())
    }

    /// Every run row of both tables in key order.
    fn rows(&self) -> Result<IndexRows> {
        let mut streams = vec![
            (self.requests.entries()?, layout::REQUEST_KEY_BYTES, None),
            (self.receipts.entries()?, layout::RECEIPT_KEY_BYTES, None),
        ];
        for (entries, _, head) in &mut streams {
            *head = entries.next()?;
        }
        Ok(IndexRows { streams })
    }
}

/// The run rows of both tables as one stream in key order (the tables' tags differ, so no key
/// is in both).
struct IndexRows {
    streams: Vec<(runs::Merged, usize, Option<Vec<u8>>)>,
}

impl IndexRows {
    fn peek(&self) -> Option<&[u8]> {
        self.streams
            .iter()
            .filter_map(|(_, k, head)| head.as_ref().map(|h| &h[..*k]))
            .min()
    }

    /// The row with the smallest key: key, value.
    fn next(&mut self) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        let smallest = self
            .streams
            .iter()
            .enumerate()
            .filter_map(|(i, (_, k, head))| head.as_ref().map(|h| (&h[..*k], i)))
            .min()
            .map(|(_, i)| i);
        let Some(i) = smallest else { return Ok(None) };
        let (entries, k, head) = &mut self.streams[i];
        let mut entry = head.take().expect("a head");
        *head = entries.next()?;
        let value = entry.split_off(*k);
        Ok(Some((entry, value)))
    }
}

/// A group's rows: history rows to the body log (their locators to the write), the others to
/// the write.
struct GroupRows<'a> {
    rows: &'a mut SortedRows,
    bodies: &'a mut BodyLog,
    /// The group's receipt rows (`key ‖ value`), for its receipt run.
    receipts: &'a mut Vec<u8>,
}

impl crate::history::Rows for GroupRows<'_> {
    fn put_row(&mut self, key: &[u8], row: &[u8]) -> Result<()> {
        let at = self.bodies.append(row)?;
        self.rows.put(key, &at.encode());
        Ok(())
    }

    fn put(&mut self, key: &[u8], value: &[u8]) {
        if key.len() == layout::RECEIPT_KEY_BYTES && key.starts_with(&Table::Receipt.tag()) {
            self.receipts.extend_from_slice(key);
            self.receipts.extend_from_slice(value);
        } else {
            self.rows.put(key, value);
        }
    }
}

/// Buffers one archive write group is built in, kept from one group to the next: a group's rows
/// run to tens of megabytes (envelopes of 8,189 transfers write ~3 MB of rows each), and fresh
/// buffers that large are fresh pages, each faulted in (a fifth of the archive thread's time
/// with envelopes). `run` empties them after each group; each keeps at most
/// [`SCRATCH_KEPT_BYTES`] of its capacity.
#[derive(Default)]
struct Scratch {
    rows: SortedRows,
    batch: WriteBatch,
    /// The group's request and receipt rows (`key ‖ value` each), for its runs.
    requests: Vec<u8>,
    receipts: Vec<u8>,
}

/// Bytes each of the archive thread's write buffers keeps between groups, at most.
const SCRATCH_KEPT_BYTES: usize = 64 << 20;

impl Scratch {
    fn reset(&mut self) {
        self.rows.clear(SCRATCH_KEPT_BYTES);
        self.batch.reset(SCRATCH_KEPT_BYTES);
        for entries in [&mut self.requests, &mut self.receipts] {
            entries.clear();
            entries.shrink_to(SCRATCH_KEPT_BYTES);
        }
    }
}

/// Rows gathered for one write, put into it in key order. Of two puts of one key the later
/// wins, as in the write itself.
#[derive(Default)]
struct SortedRows {
    bytes: Vec<u8>,
    /// Where each row's key and value are in `bytes`: start, key length, value length.
    rows: Vec<(usize, u32, u32)>,
}

impl SortedRows {
    fn put(&mut self, key: &[u8], value: &[u8]) {
        let at = self.bytes.len();
        self.bytes.extend_from_slice(key);
        self.bytes.extend_from_slice(value);
        let len = |b: &[u8]| u32::try_from(b.len()).expect("a row is smaller than 4 GiB");
        self.rows.push((at, len(key), len(value)));
    }

    /// Empties the rows, keeping at most `keep_bytes` of the row bytes' buffer.
    fn clear(&mut self, keep_bytes: usize) {
        self.bytes.clear();
        self.bytes.shrink_to(keep_bytes);
        self.rows.clear();
        self.rows
            .shrink_to(keep_bytes / std::mem::size_of::<(usize, u32, u32)>());
    }

    fn write_into(&self, batch: &mut WriteBatch) {
        let bytes = &self.bytes;
        let key = |i: usize| {
            let (at, k, _) = self.rows[i];
            &bytes[at..at + k as usize]
        };
        // Sorted by the keys' first 16 bytes held inline (most keys differ in them), then by
        // the whole key, then by arrival: puts of one key keep their order.
        let mut order: Vec<(u128, usize)> = (0..self.rows.len())
            .map(|i| {
                let mut prefix = [0u8; 16];
                let k = key(i);
                let n = k.len().min(16);
                prefix[..n].copy_from_slice(&k[..n]);
                (u128::from_be_bytes(prefix), i)
            })
            .collect();
        order.sort_unstable_by(|a, b| {
            a.0.cmp(&b.0)
                .then_with(|| key(a.1).cmp(key(b.1)))
                .then(a.1.cmp(&b.1))
        });
        for &(_, i) in &order {
            let (at, k, v) = self.rows[i];
            let value_at = at + k as usize;
            batch.put(key(i), &bytes[value_at..value_at + v as usize]);
        }
    }
}

/// Deletes the rows of `history` v1 (see `Table::version`), if the archive has any: it then has
/// no history start of v2 either, and holds history from its next batch. A v1 archive always
/// has v1's history start (written with its first rows), so a point read says whether to scan.
fn drop_history_v1(
    db: &mut DB,
    dir: &Path,
    options: impl Fn() -> rusty_leveldb::Options,
    stats: &SyncStats,
) -> Result<()> {
    let mut held_from_v1 = layout::HISTORY_V1_TAG.to_vec();
    held_from_v1.extend_from_slice(b"held_from");
    if get_checked(db, &held_from_v1, stats)?.is_none() {
        return Ok(());
    }
    // One write for every v1 row, once per archive: its size is the v1 history's keys (about
    // 70 bytes per entry), bounded by the ledger that wrote it, not by anything a client sends.
    let mut batch = WriteBatch::default();
    scan_prefix(db, &layout::HISTORY_V1_TAG, |key, _| {
        batch.delete(key);
        Ok(())
    })?;
    db.write(batch, true)
        .map_err(|e| io_error("dropping the history rows of v1", e))?;
    // The scan iterated (see `reopen_fresh`).
    reopen_fresh(db, dir, options())
}

/// The oldest height whose history the archive in `db` holds, and the history writer to go
/// on with. An archive without one: a new archive (point 0) holds it from 1 and writes it with
/// its first batch; one written before history existed holds it from the height after its
/// point (its older batches have no history rows), written now.
fn open_held_from(
    db: &mut DB,
    point: ArchivePoint,
    stats: &SyncStats,
) -> Result<(u64, HistoryWriter)> {
    let key = layout::history_held_from_key();
    if let Some(v) = get_checked(db, &key, stats)? {
        let held_from = crate::history::decode_held_from(&v)?;
        return Ok((held_from, HistoryWriter::default()));
    }
    if point.height == 0 {
        return Ok((1, HistoryWriter::starting_at(1)));
    }
    let held_from = point.height + 1;
    let mut batch = WriteBatch::default();
    batch.put(&key, &held_from.to_le_bytes());
    db.write(batch, true)
        .map_err(|e| io_error("writing the archive's history start", e))?;
    Ok((held_from, HistoryWriter::default()))
}

/// Streams the rows (see [`Cmd::Dump`]), a `body` or `history` row always with the record it
/// stands for (the body log's locators are this replica's own business).
fn dump(stores: &mut Stores, out: &SyncSender<Result<Records>>) {
    let Stores { db, bodies, index } = stores;
    let result = (|| {
        let snapshot = db.get_snapshot();
        let mut iter = db
            .new_iter_at(snapshot)
            .map_err(|e| io_error("iterating the archive for a dump", e))?;
        let skip = [
            layout::archive_point_key().to_vec(),
            layout::open_marker_key().to_vec(),
        ];
        let skip = [
            &skip[..],
            &Indexes::TABLES.map(|t| layout::runs_key(t).to_vec()),
        ]
        .concat();
        // The runs' rows interleave with the database's in key order: merge the two streams
        // (of one key, which only a rearchived batch can repeat, the run's).
        let mut runs = index.rows()?;
        let mut row = iter.next();
        let mut group = Vec::new();
        let mut group_bytes = 0;
        loop {
            let from_runs = match (&row, runs.peek()) {
                (None, None) => break,
                (Some(_), None) => false,
                (None, Some(_)) => true,
                (Some((key, _)), Some(run_key)) => run_key <= &key[..],
            };
            let (key, value) = if from_runs {
                let (key, value) = runs.next()?.expect("a run row");
                if row.as_ref().is_some_and(|(k, _)| *k == key) {
                    row = iter.next();
                }
                (key, value)
            } else {
                let taken = row.take().expect("a database row");
                row = iter.next();
                taken
            };
            if skip.contains(&key) {
                continue;
            }
            let value = resolve(bodies, &key, value)?;
            group_bytes += key.len() + value.len();
            group.push((key, value));
            if group.len() == DUMP_GROUP_RECORDS || group_bytes >= DUMP_GROUP_BYTES {
                group_bytes = 0;
                if out.send(Ok(std::mem::take(&mut group))).is_err() {
                    return Ok(());
                }
            }
        }
        if !group.is_empty() && out.send(Ok(group)).is_err() {
            return Ok(());
        }
        let _ = out.send(Ok(Vec::new()));
        Ok(())
    })();
    if let Err(e) = result {
        let _ = out.send(Err(e));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorted_rows_go_in_key_order_and_the_later_put_of_a_key_comes_last() {
        let mut rows = SortedRows::default();
        // Keys that tie on their first 16 bytes, one shorter than 16, and a repeated key.
        let long = |last: u8| {
            let mut k = vec![7u8; 20];
            k[19] = last;
            k
        };
        rows.put(&long(2), b"b");
        rows.put(b"short", b"s");
        rows.put(&long(1), b"a1");
        rows.put(&[0u8; 16], b"zero");
        rows.put(&long(1), b"a2");
        let mut batch = WriteBatch::default();
        rows.write_into(&mut batch);
        let written: Vec<(Vec<u8>, Vec<u8>)> = batch
            .iter()
            .map(|(k, v)| (k.to_vec(), v.expect("a put").to_vec()))
            .collect();
        let expected = vec![
            (vec![0u8; 16], b"zero".to_vec()),
            (long(1), b"a1".to_vec()),
            (long(1), b"a2".to_vec()),
            (long(2), b"b".to_vec()),
            (b"short".to_vec(), b"s".to_vec()),
        ];
        assert_eq!(written, expected);
    }
}
