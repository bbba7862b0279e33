//! [`LedgerDb`]: the ledger's committed state in LevelDB, behind core's storage ports.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use rusty_leveldb::{LdbIterator, Options, WriteBatch, DB};
use tally_core::batch::{BatchBody, BatchWrite, UNSIGNED};
use tally_core::crypto::{header_hash, sha256};
use tally_core::history::{HistoryPage, HistoryRow};
use tally_core::ports::{LedgerRead, LedgerStore, RequestRecord};
use tally_core::reserve::{Expiry, Reserve, ReserveChange};
use tally_core::state::{LedgerMeta, META_BYTES};
use tally_core::state_map::{account_path, account_value_hash, reserve_path, StateMap};
use tally_core::tlog::TreeEdge;
use tally_core::{Error, Result};
use tally_wire::{Hash, PublicKey, Signature, SignedHeader, HEADER_BYTES, SIGNED_HEADER_BYTES};

use crate::archive::{Archive, ArchiveBatch, ArchivePoint};
use crate::env::{SyncEnv, SyncStats};
use crate::filter::RequestFilter;
use crate::header_log;
use crate::layout::{self, corrupt, fixed, Table, HEADER_VALUE_BYTES};
use crate::transfer::DumpWriter;

/// Tuning of the LevelDB instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOptions {
    /// Capacity of LevelDB's block cache, divided by its 4 KiB block size: rusty-leveldb bounds
    /// the cache by a count of blocks, not by bytes, and a block holding one large value (a
    /// batch body, a raft entry: up to ~2.4 MB) is as large as that value. 8 MiB (2,048 blocks)
    /// let it grow past a gigabyte under load; 256 KiB keeps it to 64 blocks (at most ~150 MB,
    /// a few MB with typical bodies). Reads are rare on the hot path (accounts and request ids
    /// are answered from memory), so a small cache costs nothing measurable.
    pub block_cache_bytes: usize,
    /// Size of the memtable of the raft log and the archive before it is written out as a
    /// table file. Larger means fewer, bigger compactions, which run inline in the write that
    /// triggers them (see the crate caveats).
    pub write_buffer_bytes: usize,
    /// The state database's memtable (accounts, headers, summary). Its flushes and merges run
    /// inside `apply`, on the path that holds confirmations back. Smaller cuts the same work
    /// into shorter pauses, but with a large ledger each level-0 merge rewrites all of level 1
    /// (random account keys overlap every table), more often: 1 MiB with 256 KiB tables gave
    /// p99 50-82 ms at half load but 46k/s with a million accounts; 4 MiB with 2 MiB tables
    /// 89 ms and 53k/s.
    pub state_write_buffer_bytes: usize,
    /// The state database's table files, at most (LevelDB's `max_file_size`).
    pub state_table_bytes: usize,
    /// Size of the in-memory filter over request ids (see `filter.rs`); 0 turns it off.
    pub request_filter_bytes: usize,
    /// Bytes of the newest raft log entries kept in memory to answer raft's reads of what it
    /// just wrote (the newest entry is kept whatever its size).
    pub raft_tail_bytes: usize,
    /// Table files each LevelDB database of this store keeps open, at most (its table cache):
    /// [`TABLE_FILES_OPEN_MAX`] for live databases, [`STAGED_TABLE_FILES_OPEN_MAX`] for the
    /// staged ones a snapshot install or a raft log compaction builds beside them.
    pub table_files_open_max: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            block_cache_bytes: 256 << 10,
            write_buffer_bytes: 4 << 20,
            state_write_buffer_bytes: 4 << 20,
            state_table_bytes: 2 << 20,
            request_filter_bytes: 16 << 20,
            raft_tail_bytes: 32 << 20,
            table_files_open_max: TABLE_FILES_OPEN_MAX,
        }
    }
}

impl StoreOptions {
    /// The options of a database built beside the live ones (a snapshot install's staged
    /// ledger, a raft log compaction's next log): a smaller table cache, so that the
    /// descriptors of every database open at once stay within what the server keeps back.
    pub fn staged(self) -> StoreOptions {
        StoreOptions {
            table_files_open_max: STAGED_TABLE_FILES_OPEN_MAX,
            ..self
        }
    }
}

/// Batches applied but not yet durable in the archive, at most; at the bound `apply` waits. The
/// archive writes behind at a low CPU priority and one of its writes can take seconds while it
/// merges; at half load (~250 small batches a second) a bound of 256 was reached inside such a
/// write and held `apply` (and every confirmation) back. The byte bound below is the one that
/// binds for memory.
pub const ARCHIVE_LAG_BATCHES_MAX: usize = 4096;
/// Bytes held for batches applied but not yet durable in the archive (bodies, and request
/// records counted at [`PENDING_RECORD_BYTES`] each), at most; at the bound `apply` waits.
/// At saturation (~60k requests/s, ~30 MB/s of bodies and records) the niced archive falls
/// behind and this bound paces the pipeline: 64 MiB (about two seconds) made it stop and go
/// (53-61k/s against 58-65k/s with 128 MiB).
pub const ARCHIVE_LAG_BYTES_MAX: usize = 128 << 20;
/// What one pending request record costs in memory: its key and record in `pending_requests`
/// (96 bytes) and in the batch's key list (52), with the map's overhead, rounded up.
pub const PENDING_RECORD_BYTES: usize = 192;
/// Request records `pending_requests` is sized for at open: as many as the byte bound allows.
/// Grown on demand, the map resized (copying every record into freshly faulted pages) and
/// rehashed its tombstones while the archive caught up: at saturation a quarter of the
/// storage thread's time. Sized once, it holds about a quarter of its buckets at saturation,
/// a removal mostly frees its slot outright, and it never moves: ~100 MB of address space,
/// resident as records arrive (they would be anyway at the bound).
const PENDING_REQUESTS_CAPACITY: usize = ARCHIVE_LAG_BYTES_MAX / PENDING_RECORD_BYTES;

/// The ledger's committed state: accounts, reserves, headers, bodies, request index and the
/// summary.
///
/// Two LevelDB databases: the state database in `dir` (accounts, reserves with their expiry
/// and pending rows, headers, summary), written by `apply` in one synced write per batch, and the archive in
/// `dir/archive` (bodies, request records), written behind it by the archive thread (see
/// `archive.rs`). Until the archive holds a batch, its body and request records are answered
/// from memory.
///
/// Not `Send`: rusty-leveldb's `DB` is built on `Rc`. Open it on the thread that will own it.
pub struct LedgerDb {
    db: DB,
    /// The state database's directory (the request filter is saved here).
    dir: PathBuf,
    opts: StoreOptions,
    archive: Archive,
    /// Batches applied (or being re-archived) that the archive does not hold yet, by height.
    pending: BTreeMap<u64, Pending>,
    /// The request records of `pending`, by request table key.
    pending_requests: HashMap<[u8; 52], RequestRecord>,
    pending_bytes: usize,
    /// The summary of the last batch the archive holds, once known (see `compactable_meta`).
    archived_meta: LedgerMeta,
    /// Set at open when the archive is behind the state (a crash between the two writes): the
    /// next height to re-archive. Lookups fail until [`LedgerDb::rearchive`] has caught up.
    rearchive_next: Option<u64>,
    /// The summary as of the last apply, so that apply and `meta()` need no read.
    meta: LedgerMeta,
    sync_stats: Arc<SyncStats>,
    /// Set when a write failed. rusty-leveldb inserts a batch into its memtable before writing
    /// the log, so after a failed write reads could see state that is not durable: refuse them.
    failed: Option<String>,
    /// Every key of the request table (and false positives); None when turned off.
    requests: Option<RequestFilter>,
    filter_origin: FilterOrigin,
    lookups: RequestLookups,
    /// The sum of every account's balance and of what open reserves hold: counted at open,
    /// then moved by each batch's `balance_change` (apart from the meta's totals, so
    /// conservation can be checked).
    balance_total: u128,
    /// Every open reserve in deadline order: the `expiry` table, read at open and kept in step
    /// by `apply` (the state database is read with point reads only, see `reopen_fresh`, so
    /// "the first n by deadline" is answered from here). About 100 bytes per open reserve.
    expiries: BTreeSet<Expiry>,
    /// The time of the header at the summary's height (0 at genesis), for `header_time`.
    tip_time_ms: u64,
    /// The right edge of the header log at `signed_through` (see `header_log.rs`).
    header_log: TreeEdge,
    /// The highest height whose header is signed: the summary's height, but on a threshold
    /// operator's replica, whose headers are written unsigned and signed after
    /// (`LedgerStore::sign_header`). The header log holds the signed headers only.
    signed_through: u64,
    /// A threshold operator's ledger: the highest height whose checkpoint signature is stored
    /// (`layout::checkpointed_key`); None with a whole key.
    checkpointed: Option<u64>,
}

/// Where [`LedgerDb::open`] got the request filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterOrigin {
    /// `request_filter_bytes` is 0.
    Off,
    /// Loaded from the file the last clean stop saved for exactly this ledger.
    Loaded,
    /// Built by scanning the request table, and why no saved filter was used.
    Scanned(String),
}

struct Pending {
    digest: tally_wire::Hash,
    body: Arc<Vec<u8>>,
    keys: Vec<[u8; 52]>,
    /// The summary after this batch; None for a batch being re-archived.
    meta: Option<LedgerMeta>,
}

/// The archive database's directory inside a ledger directory.
pub fn archive_dir(ledger: &Path) -> PathBuf {
    ledger.join("archive")
}

/// How request lookups were answered since open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestLookups {
    /// Answered "absent" by the in-memory filter, without reading LevelDB.
    pub filtered: u64,
    /// Read from LevelDB (the filter was off or said "maybe").
    pub read: u64,
    /// Of those reads, how many found nothing (the filter's false positives, when it is on).
    pub read_absent: u64,
}

impl LedgerDb {
    /// Opens (creating if missing) the database in `dir` and checks that its summary and its
    /// last header agree. When the archive is behind (see [`LedgerDb::archive_behind`]), the
    /// caller must feed [`LedgerDb::rearchive`] the missing batches before anything else.
    pub fn open(dir: &Path, opts: StoreOptions) -> Result<LedgerDb> {
        assert!(
            opts.write_buffer_bytes > 0
                && opts.state_write_buffer_bytes > 0
                && opts.state_table_bytes > 0
                && opts.block_cache_bytes > 0,
            "{opts:?}"
        );
        let env = SyncEnv::new();
        let sync_stats = env.stats();
        let mut db = DB::open(dir, state_leveldb_options(&opts, env))
            .map_err(|e| io_error(format_args!("opening {}", dir.display()), e))?;
        advance_sequence(&mut db).map_err(|e| io_error("writing the open marker", e))?;
        let meta = read_meta(&mut db)?;
        refuse_older_headers(&mut db, &meta)?;
        migrate_headers_if_v1(&mut db, dir, &opts, &sync_stats, &meta)?;
        let mut get = |db: &mut DB, key: &[u8]| crate::env::get_checked(db, key, &sync_stats);
        let signed_through = header_log::signed_prefix(&mut db, meta.height, &mut get)?;
        let header_log = header_log::catch_up(&mut db, signed_through, &mut get)?;
        let checkpointed = read_checkpointed(&mut db, signed_through, &sync_stats)?;
        let (saved, filter_origin) = load_request_filter(dir, &opts, &meta);
        let (archive, point, filter) = Archive::open(dir, &opts, saved)?;
        let Scanned {
            balance_total,
            expiries,
            map,
        } = scan_totals(&mut db, dir, &opts, &sync_stats)?;
        let mut meta = meta;
        if !meta.map.load(map) {
            return Err(corrupt(
                Table::Meta,
                "the accounts and reserves do not hash to the summary's state map root",
            ));
        }
        let mut this = LedgerDb {
            db,
            dir: dir.to_owned(),
            opts: opts.clone(),
            archive,
            pending: BTreeMap::new(),
            pending_requests: HashMap::with_capacity(PENDING_REQUESTS_CAPACITY),
            pending_bytes: 0,
            archived_meta: LedgerMeta::genesis(),
            rearchive_next: None,
            meta,
            sync_stats,
            failed: None,
            requests: filter,
            filter_origin,
            lookups: RequestLookups::default(),
            balance_total,
            expiries,
            tip_time_ms: 0,
            header_log,
            signed_through,
            checkpointed,
        };
        this.start_archive_from(point)?;
        this.check_tip()?;
        Ok(this)
    }

    /// Sets where archiving resumes, given the `point` the archive holds: caught up with the
    /// state, or re-archiving from the height after the point. An archive beyond the state is
    /// corrupt.
    fn start_archive_from(&mut self, point: ArchivePoint) -> Result<()> {
        if point.height > self.meta.height {
            return Err(corrupt(
                Table::Meta,
                format_args!(
                    "the archive holds height {} beyond the ledger's {}",
                    point.height, self.meta.height
                ),
            ));
        }
        if point.height == self.meta.height {
            self.archived_meta = self.meta.summary();
        } else {
            self.rearchive_next = Some(point.height + 1);
        }
        Ok(())
    }

    /// Asserts that `write` is the batch that comes next: the height after the applied one,
    /// a header that is for it and chains to the applied one, a summary naming that header and
    /// one request record per leaf that is not an expiry.
    fn assert_applicable(&self, write: &BatchWrite) {
        let height = write.meta.height;
        let header = &write.signed_header.header;
        assert_eq!(
            height,
            self.meta.height + 1,
            "batches are applied in height order"
        );
        assert_eq!(
            header.height, height,
            "the header is for the batch's height"
        );
        assert_eq!(
            header.prev_hash, self.meta.last_header_hash,
            "the header chains to the applied one"
        );
        assert_eq!(header_hash(header), write.header_hash, "header hash");
        assert_eq!(
            write.meta.last_header_hash, write.header_hash,
            "the summary names the header"
        );
        // Expiries are leaves without a request id; each closes one reserve as expired (a
        // reserve made in a batch cannot expire in it: expiries come first). A rotation is one
        // more, the batch's last, and the one that made `meta.operator` name this height.
        let expiries = write
            .reserves
            .iter()
            .filter(|c| c.after == Reserve::Expired)
            .count();
        let rotations = usize::from(write.meta.rotated_at() == header.height);
        assert_eq!(
            write.requests.len() + expiries + rotations,
            header.request_count as usize,
            "one record per request, none per expiry or rotation"
        );
        // Hashing the whole body costs O(body); prepare_apply has just computed it.
        debug_assert_eq!(sha256(&[&write.body]), write.body_digest, "body digest");
    }

    /// When the archive is behind the state database: the raft index of the last batch it holds
    /// and the state's raft index. The batches committed between the two must be passed to
    /// [`LedgerDb::rearchive`] (from the raft log) before the ledger answers lookups or applies.
    pub fn archive_behind(&self) -> Option<(u64, u64)> {
        self.rearchive_next?;
        let point = self.archive.point().ok()?;
        Some((point.raft_index, self.meta.raft_index))
    }

    /// Re-archives one committed batch found in the raft log at `raft_index` while the archive
    /// is behind. Returns whether it was the one the archive lacks next: a batch at another
    /// height, or one whose body is not the one applied at its height (a committed batch every
    /// replica skipped), is ignored. Once the archive has caught up with the state, waits until
    /// it is durable; the ledger is then usable again.
    pub fn rearchive(&mut self, encoded_body: &[u8], raft_index: u64) -> Result<bool> {
        self.check_usable()?;
        let Some(next) = self.rearchive_next else {
            return Ok(false);
        };
        let Ok(body) = BatchBody::decode(encoded_body) else {
            return Ok(false);
        };
        let height = body.header.height;
        if height != next {
            return Ok(false);
        }
        let Some(stored) = self.body_digest(height)? else {
            return Err(corrupt(
                Table::Header,
                format_args!("no header (and body digest) at height {height}"),
            ));
        };
        let digest = sha256(&[encoded_body]);
        if stored != digest {
            return Ok(false);
        }
        let records = body
            .records()
            .into_iter()
            .map(|(signer, id, record)| (layout::request_key(&signer, id), record))
            .collect();
        self.archive_batch(
            height,
            raft_index,
            digest,
            (encoded_body.to_vec(), None),
            records,
            None,
        )?;
        if height == self.meta.height {
            self.archive.wait_for(height)?;
            self.reap()?;
            self.archived_meta = self.meta.summary();
            self.rearchive_next = None;
        } else {
            self.rearchive_next = Some(height + 1);
        }
        Ok(true)
    }

    /// Hands a batch to the archive thread and keeps it in memory until the archive holds it.
    /// `body`: the encoded body, and its receipt leaf hashes if known.
    fn archive_batch(
        &mut self,
        height: u64,
        raft_index: u64,
        digest: tally_wire::Hash,
        body: (Vec<u8>, Option<Vec<tally_wire::Hash>>),
        records: Vec<([u8; 52], RequestRecord)>,
        meta: Option<LedgerMeta>,
    ) -> Result<()> {
        let (body, leaf_hashes) = body;
        let body = Arc::new(body);
        let mut keys = Vec::with_capacity(records.len());
        let mut rows = Vec::with_capacity(records.len());
        for (key, record) in records {
            // The filter's invariant: it holds every key the request table will hold.
            if let Some(filter) = &mut self.requests {
                filter.insert(&key);
            }
            rows.push((key, layout::encode_request(&record)));
            keys.push(key);
            self.pending_requests.insert(key, record);
        }
        self.pending_bytes += pending_bytes(&body, keys.len());
        self.pending.insert(
            height,
            Pending {
                digest,
                body: Arc::clone(&body),
                keys,
                meta,
            },
        );
        self.archive.write(ArchiveBatch {
            height,
            raft_index,
            digest,
            body,
            requests: rows,
            leaf_hashes,
        })
    }

    /// Drops from memory the batches the archive holds durably.
    fn reap(&mut self) -> Result<ArchivePoint> {
        let point = self.archive.point()?;
        while let Some(entry) = self.pending.first_entry() {
            if *entry.key() > point.height {
                break;
            }
            let p = entry.remove();
            self.pending_bytes -= pending_bytes(&p.body, p.keys.len());
            for key in &p.keys {
                self.pending_requests.remove(key);
            }
            if let Some(meta) = p.meta {
                self.archived_meta = meta;
            }
        }
        Ok(point)
    }

    /// Waits while the archive is too far behind (see `ARCHIVE_LAG_*`).
    fn bound_archive_lag(&mut self) -> Result<()> {
        self.reap()?;
        while self.pending.len() >= ARCHIVE_LAG_BATCHES_MAX
            || self.pending_bytes >= ARCHIVE_LAG_BYTES_MAX
        {
            let oldest = *self.pending.keys().next().expect("pending is not empty");
            self.archive.wait_for(oldest)?;
            self.reap()?;
        }
        Ok(())
    }

    /// Stores a threshold operator's checkpoint signatures of sizes `first..` (at most the
    /// ledger's height) that a restore read from the archive's signature bundles and checked
    /// (`tally-server restore`); [`LedgerDb::restored_threshold`] follows.
    pub fn restore_checkpoint_signatures(
        &mut self,
        first: u64,
        signatures: &[Signature],
    ) -> Result<()> {
        self.check_usable()?;
        assert!(
            self.checkpointed.is_none() && first + signatures.len() as u64 <= self.meta.height + 1,
            "restoring checkpoint signatures {first}.. of {} into a ledger at {}",
            signatures.len(),
            self.meta.height
        );
        let mut rows = WriteBatch::default();
        for (size, signature) in (first..).zip(signatures) {
            rows.put(&layout::checkpoint_signature_key(size), signature);
        }
        self.write_restored(rows, "writing the restored checkpoint signatures")
    }

    /// Makes a ledger restored from a threshold operator's archive (every header signed: the
    /// archive's; every checkpoint signature stored) a threshold ledger checkpointed through its
    /// height.
    pub fn restored_threshold(&mut self) -> Result<()> {
        self.check_usable()?;
        let height = self.meta.height;
        assert!(
            self.checkpointed.is_none() && self.signed_through == height,
            "a restored ledger, every header signed: checkpointed {:?}, signed {} of {height}",
            self.checkpointed,
            self.signed_through
        );
        let mut rows = WriteBatch::default();
        rows.put(&layout::checkpointed_key(), &height.to_le_bytes());
        self.write_restored(rows, "marking the restored ledger a threshold operator's")?;
        self.checkpointed = Some(height);
        Ok(())
    }

    fn write_restored(&mut self, rows: WriteBatch, what: &str) -> Result<()> {
        if let Err(e) = self.db.write(rows, true) {
            let e = io_error(what, e);
            self.failed = Some(e.to_string());
            return Err(e);
        }
        Ok(())
    }

    /// What `key`'s open reserves hold (pending debits) and what open reserves hold for it
    /// (pending credits), as of the applied state.
    pub fn pending(&mut self, key: &PublicKey) -> Result<(u64, u64)> {
        Ok(match self.get(&layout::pending_key(key))? {
            Some(v) => layout::decode_pending(&v)?,
            None => (0, 0),
        })
    }

    /// Adds to `rows` what a batch's reserve changes write: each reserve's row, its expiry key
    /// out while it was open and in while it is, and the pending amounts of the owners and
    /// receivers (read, moved, written back; deleted at zero).
    fn reserve_rows(&mut self, changes: &[ReserveChange], rows: &mut WriteBatch) -> Result<()> {
        let mut moved: BTreeMap<PublicKey, (i128, i128)> = BTreeMap::new();
        for c in changes {
            if let Some(h) = c.before.as_ref().and_then(Reserve::open) {
                rows.delete(&layout::expiry_key(h.expires_at_ms, &c.owner, c.id));
                moved.entry(c.owner).or_default().0 -= i128::from(h.amount);
                moved.entry(h.to).or_default().1 -= i128::from(h.amount);
            }
        }
        for c in changes {
            if let Some(h) = c.after.open() {
                rows.put(&layout::expiry_key(h.expires_at_ms, &c.owner, c.id), &[]);
                moved.entry(c.owner).or_default().0 += i128::from(h.amount);
                moved.entry(h.to).or_default().1 += i128::from(h.amount);
            }
            rows.put(&layout::reserve_key(&c.owner, c.id), &c.after.encode());
        }
        for (key, (debits, credits)) in moved {
            let (old_debits, old_credits) = self.pending(&key)?;
            let add = |old: u64, by: i128| u64::try_from(i128::from(old) + by).ok();
            let (Some(d), Some(c)) = (add(old_debits, debits), add(old_credits, credits)) else {
                return Err(corrupt(
                    Table::Pending,
                    "a reserve's change moves pending amounts below 0 or above u64",
                ));
            };
            match (d, c) {
                (0, 0) => rows.delete(&layout::pending_key(&key)),
                _ => rows.put(&layout::pending_key(&key), &layout::encode_pending(d, c)),
            }
        }
        Ok(())
    }

    /// How request lookups were answered since open.
    pub fn request_lookups(&self) -> RequestLookups {
        self.lookups
    }

    /// Keys in the request filter and its size in bytes; None when it is turned off.
    pub fn request_filter_load(&self) -> Option<(u64, usize)> {
        self.requests.as_ref().map(|f| (f.keys(), f.bytes()))
    }

    /// Up to `limit` signed headers from height `from` on, in height order.
    ///
    /// Point reads, one per height (heights are `1..=meta.height`): an iterator would take a
    /// LevelDB snapshot, after which rusty-leveldb stops dropping overwritten rows (see
    /// `reopen_fresh`).
    pub fn headers(&mut self, from: u64, limit: usize) -> Result<Vec<SignedHeader>> {
        self.check_usable()?;
        let first = from.max(1);
        let last = self.signed_through;
        let mut out = Vec::new();
        if limit == 0 || first > last {
            return Ok(out);
        }
        let count = (last - first).saturating_add(1).min(limit as u64);
        out.reserve(count.min(4096) as usize);
        for height in first..first + count {
            match self.header(height)? {
                Some(signed) => out.push(signed),
                None => {
                    return Err(corrupt(
                        Table::Header,
                        format_args!("no header at height {height}, below the summary's {last}"),
                    ))
                }
            }
        }
        Ok(out)
    }

    /// Writes the whole database, as of one LevelDB snapshot, as a dump stream (format in
    /// [`crate::transfer`]) handed to `out` in chunks of at most `chunk_bytes_max` bytes, and
    /// returns the summary the dump contains. An error from `out` stops the dump and is
    /// returned; the chunks already out are then not a dump.
    pub fn dump(
        &mut self,
        chunk_bytes_max: usize,
        out: impl FnMut(Vec<u8>) -> Result<()>,
    ) -> Result<LedgerMeta> {
        self.check_usable()?;
        let result = self.dump_rows(chunk_bytes_max, out);
        // The dump iterated: continue on a handle that never did (see `reopen_fresh`).
        let options = state_leveldb_options(&self.opts, SyncEnv::sharing(self.sync_stats()));
        if let Err(e) = reopen_fresh(&mut self.db, &self.dir, options) {
            self.failed = Some(e.to_string());
            return Err(e);
        }
        result
    }

    fn dump_rows(
        &mut self,
        chunk_bytes_max: usize,
        out: impl FnMut(Vec<u8>) -> Result<()>,
    ) -> Result<LedgerMeta> {
        self.check_archive_caught_up()?;
        // Everything applied must be in the archive before it is read.
        self.archive.wait_for(self.meta.height)?;
        self.reap()?;
        let snapshot = self.db.get_snapshot();
        let mut iter = self
            .db
            .new_iter_at(snapshot)
            .map_err(|e| io_error("iterating the ledger for a dump", e))?;
        let mut writer = DumpWriter::new(chunk_bytes_max, out)?;
        let meta_key = layout::meta_key();
        let open_marker = layout::open_marker_key();
        let mut meta = LedgerMeta::genesis();
        // The archive's rows interleave with the state's in key order: merge the two streams.
        let archived = self.archive.dump()?;
        let mut group = Vec::new().into_iter();
        let mut next_archived = move || -> Result<Option<(Vec<u8>, Vec<u8>)>> {
            if let Some(row) = group.next() {
                return Ok(Some(row));
            }
            let rows = archived
                .recv()
                .map_err(|_| Error::stopped("the archive thread (during a dump)"))??;
            group = rows.into_iter();
            Ok(group.next())
        };
        let mut archived_row = next_archived()?;
        while let Some((key, value)) = iter.next() {
            // Deleted at every open, so never found; excluded all the same, being no state.
            if key == open_marker || is_derived(&key) {
                continue;
            }
            if key == meta_key {
                meta = LedgerMeta::decode(&fixed::<META_BYTES>(Table::Meta, &value)?)?;
            }
            while let Some((akey, avalue)) = archived_row.take() {
                if akey >= key {
                    archived_row = Some((akey, avalue));
                    break;
                }
                writer.record(&akey, &avalue)?;
                archived_row = next_archived()?;
            }
            writer.record(&key, &value)?;
        }
        while let Some((akey, avalue)) = archived_row.take() {
            writer.record(&akey, &avalue)?;
            archived_row = next_archived()?;
        }
        writer.finish()?;
        // Nothing can write while `self` is borrowed: the snapshot is the applied state.
        if meta != self.meta {
            return Err(corrupt(
                Table::Meta,
                format_args!(
                    "the dump's summary (height {}) differs from the applied one (height {})",
                    meta.height, self.meta.height
                ),
            ));
        }
        Ok(meta)
    }

    /// The fsync counters of this database's env.
    pub fn sync_stats(&self) -> Arc<SyncStats> {
        Arc::clone(&self.sync_stats)
    }

    /// Where the request filter came from at open.
    pub fn request_filter_origin(&self) -> &FilterOrigin {
        &self.filter_origin
    }

    /// A clean stop: waits until the archive holds every applied batch, then saves the request
    /// filter for the next open (see `filter.rs`). Nothing is written if the ledger has failed;
    /// a failure to save only costs the next open a scan, but is reported.
    pub fn shutdown(&mut self) -> Result<()> {
        self.check_usable()?;
        if self.rearchive_next.is_some() {
            return Ok(()); // never caught up: the filter may lack what rearchiving would add
        }
        self.archive.wait_for(self.meta.height)?;
        if let Some(filter) = &self.requests {
            filter
                .save(&self.dir, self.meta.height, &self.meta.last_header_hash)
                .map_err(|e| Error::io("saving the request filter", e))?;
        }
        Ok(())
    }

    /// Releases the database lock, reporting a failure to flush (every apply is already synced).
    pub fn close(mut self) -> Result<()> {
        let archived = self.archive.close();
        self.db.close().map_err(|e| io_error("closing", e))?;
        archived
    }

    /// Writes one raw key and value, synced. For tests that need a corrupt database.
    #[doc(hidden)]
    pub fn raw_put(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        let table = key.get(..layout::TAG_BYTES).and_then(Table::from_tag);
        if table.is_some_and(Table::in_archive) {
            self.archive.raw_put(key, value)?;
        } else {
            let mut batch = WriteBatch::default();
            batch.put(key, value);
            self.db
                .write(batch, true)
                .map_err(|e| io_error("raw put", e))?;
        }
        // Keeps the request filter's invariant: every key in the request table is in it.
        if let Some(filter) = &mut self.requests {
            if key.starts_with(&Table::Request.tag()) {
                filter.insert(key);
            }
        }
        Ok(())
    }

    fn check_usable(&self) -> Result<()> {
        match &self.failed {
            None => Ok(()),
            Some(e) => Err(Error::io(
                "an earlier write failed, the database must be reopened",
                e,
            )),
        }
    }

    fn check_archive_caught_up(&self) -> Result<()> {
        match self.rearchive_next {
            None => Ok(()),
            Some(next) => Err(Error::missing(format_args!(
                "the archive's batches {next}..={} (bodies, request index): they must be \
                 re-archived from the raft log first",
                self.meta.height
            ))),
        }
    }

    /// Runs a history read on the archive thread, behind the batches queued to it: it answers
    /// at the applied height (see `history.rs`). Refused while the archive is being rebuilt.
    fn history_read<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut crate::history::Get<'_>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.check_usable()?;
        self.check_archive_caught_up()?;
        self.archive.read(f)
    }

    /// The digest of the body applied at `height`, stored with its header.
    fn body_digest(&mut self, height: u64) -> Result<Option<Hash>> {
        let Some(row) = self.get(&layout::header_key(height))? else {
            return Ok(None);
        };
        decode_header(height, &row)?;
        Ok(Some(
            row[SIGNED_HEADER_BYTES..]
                .try_into()
                .expect("a decoded header row has a digest"),
        ))
    }

    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.check_usable()?;
        // rusty-leveldb's `get` reads a table it cannot read as a missing key: `get_checked`
        // tells the two apart by the env's count of failed reads.
        crate::env::get_checked(&mut self.db, key, &self.sync_stats)
    }

    /// The header row at `height` as stored, signed or not.
    fn stored_header(&mut self, height: u64) -> Result<Option<SignedHeader>> {
        self.get(&layout::header_key(height))?
            .map(|v| decode_header(height, &v))
            .transpose()
    }

    /// The summary, the header at its height and that height's body were written together: a
    /// database where they disagree is corrupt.
    fn check_tip(&mut self) -> Result<()> {
        let height = self.meta.height;
        if let Some(next) = self.stored_header(height + 1)? {
            return Err(corrupt(
                Table::Header,
                format_args!(
                    "header {} is beyond the summary's height {height}",
                    next.header.height
                ),
            ));
        }
        if height == 0 {
            return Ok(());
        }
        let Some(tip) = self.stored_header(height)? else {
            return Err(corrupt(
                Table::Header,
                format_args!("no header at the summary's height {height}"),
            ));
        };
        self.tip_time_ms = tip.header.time_unix_ms;
        if header_hash(&tip.header) != self.meta.last_header_hash {
            return Err(corrupt(
                Table::Meta,
                format_args!("last header hash does not match header {height}"),
            ));
        }
        if self.rearchive_next.is_none() && self.body(height)?.is_none() {
            return Err(corrupt(
                Table::Header,
                format_args!("no body at the summary's height {height}"),
            ));
        }
        Ok(())
    }
}

impl LedgerRead for LedgerDb {
    fn account(&mut self, key: &PublicKey) -> Result<Option<u64>> {
        self.get(&layout::account_key(key))?
            .map(|v| layout::decode_account(&v))
            .transpose()
    }

    fn request(&mut self, signer: &PublicKey, id: u128) -> Result<Option<RequestRecord>> {
        self.check_usable()?;
        self.check_archive_caught_up()?;
        let key = layout::request_key(signer, id);
        if let Some(filter) = &self.requests {
            if !filter.may_contain(&key) {
                self.lookups.filtered += 1;
                return Ok(None);
            }
        }
        if let Some(record) = self.pending_requests.get(&key) {
            return Ok(Some(*record));
        }
        self.lookups.read += 1;
        let found = self.archive.get(&key)?;
        if found.is_none() {
            self.lookups.read_absent += 1;
        }
        found.map(|v| layout::decode_request(&v)).transpose()
    }

    fn reserve(&mut self, owner: &PublicKey, id: u128) -> Result<Option<Reserve>> {
        self.get(&layout::reserve_key(owner, id))?
            .map(|v| layout::decode_reserve(&v))
            .transpose()
    }

    fn expiries(&mut self, limit: usize) -> Result<Vec<Expiry>> {
        self.check_usable()?;
        Ok(self.expiries.iter().take(limit).copied().collect())
    }

    fn header_time(&mut self, height: u64) -> Result<u64> {
        if height == self.meta.height {
            self.check_usable()?;
            return Ok(self.tip_time_ms);
        }
        // The applied header, signed or not: its time is what replay needs.
        match self.stored_header(height)? {
            Some(signed) => Ok(signed.header.time_unix_ms),
            None if height == 0 => Ok(0),
            None => Err(Error::missing(format_args!(
                "the header at height {height}"
            ))),
        }
    }
}

impl LedgerStore for LedgerDb {
    fn pending(&mut self, key: &PublicKey) -> Result<(u64, u64)> {
        LedgerDb::pending(self, key)
    }
    /// rusty-leveldb flushes a full memtable and runs the compactions that follow at the start
    /// of the next write, inside it. An empty, unsynced write runs them now instead, while the
    /// storage thread has nothing else to do, so that the next batch's durable write (which
    /// holds its confirmations back) does not pay for them. The empty log record is harmless
    /// to recovery (it carries no entries).
    fn maintain(&mut self) -> Result<()> {
        self.check_usable()?;
        if let Err(e) = self.db.write(WriteBatch::default(), false) {
            let e = io_error("flushing the memtable", e);
            self.failed = Some(e.to_string());
            return Err(e);
        }
        Ok(())
    }

    /// The summary of the last batch the archive holds durably (genesis while that is not
    /// known): the raft log may be compacted up to its raft index, never further, since after a
    /// crash the archive is rebuilt from the raft log.
    fn compactable_meta(&mut self) -> Result<LedgerMeta> {
        self.reap()?;
        Ok(self.archived_meta.clone())
    }

    /// Batches applied that the archive does not hold durably yet.
    fn archive_lag(&self) -> usize {
        self.pending.len()
    }

    fn request_lookup_counts(&self) -> (u64, u64, u64) {
        let l = self.lookups;
        (l.filtered, l.read - l.read_absent, l.read_absent)
    }

    fn shutdown(&mut self) -> Result<()> {
        LedgerDb::shutdown(self)
    }

    fn meta(&mut self) -> Result<LedgerMeta> {
        self.check_usable()?;
        Ok(self.meta.clone())
    }

    fn apply(&mut self, write: &BatchWrite) -> Result<()> {
        self.check_usable()?;
        self.assert_applicable(write);
        self.check_archive_caught_up()?;
        self.bound_archive_lag()?;

        let height = write.meta.height;
        // The state rows only: bodies and request records go to the archive (see archive.rs).
        let mut rows = state_rows(write);
        self.reserve_rows(&write.reserves, &mut rows)?;
        let mut header_log = self.header_log.clone();
        let signed = write.signed_header.signature != UNSIGNED;
        if signed {
            header_log::append(&mut header_log, &write.signed_header, &mut rows);
        }
        if let Err(e) = self.db.write(rows, true) {
            let e = io_error(format_args!("writing batch {height}"), e);
            self.failed = Some(e.to_string());
            return Err(e);
        }
        self.header_log = header_log;
        if signed {
            self.signed_through = height;
        }
        let records = request_records(write);
        self.meta = write.meta.clone();
        self.tip_time_ms = write.signed_header.header.time_unix_ms;
        for c in &write.reserves {
            if let Some(h) = c.before.as_ref().and_then(Reserve::open) {
                self.expiries.remove(&expiry_of(c, h.expires_at_ms));
            }
            if let Some(h) = c.after.open() {
                self.expiries.insert(expiry_of(c, h.expires_at_ms));
            }
        }
        let total = self.balance_total as i128 + write.balance_change;
        self.balance_total =
            u128::try_from(total).expect("a sum of u64 balances is never negative");
        self.archive_batch(
            height,
            write.meta.raft_index,
            write.body_digest,
            (write.body.clone(), Some(write.leaf_hashes.clone())),
            records,
            Some(write.meta.summary()),
        )
    }

    fn balance_total(&mut self) -> Result<u128> {
        self.check_usable()?;
        Ok(self.balance_total)
    }

    fn history_held_from(&mut self) -> Result<u64> {
        Ok(self.archive.held_from())
    }

    fn history(
        &mut self,
        account: &PublicKey,
        from: (u64, u32),
        limit: usize,
    ) -> Result<HistoryPage> {
        let account = *account;
        self.history_read(move |get| crate::history::page(&account, from, limit, get))
    }

    fn history_at(&mut self, account: &PublicKey, height: u64) -> Result<Option<HistoryRow>> {
        let account = *account;
        self.history_read(move |get| crate::history::at_height(&account, height, get))
    }

    fn receipt(&mut self, leaf: &Hash) -> Result<Option<(u64, u32)>> {
        let leaf = *leaf;
        self.history_read(move |get| crate::history::receipt(&leaf, get))
    }

    fn header_log_node(&mut self, level: u8, index: u64) -> Result<Hash> {
        let height = self.signed_through;
        header_log::node(level, index, height, &mut |key| self.get(key))
    }

    fn header(&mut self, height: u64) -> Result<Option<SignedHeader>> {
        let stored = self.stored_header(height)?;
        Ok(stored.filter(|s| s.signature != UNSIGNED))
    }

    fn applied_header(&mut self, height: u64) -> Result<Option<tally_wire::Header>> {
        Ok(self.stored_header(height)?.map(|s| s.header))
    }

    fn signed_through(&mut self) -> Result<u64> {
        self.check_usable()?;
        Ok(self.signed_through)
    }

    fn sign_header(&mut self, height: u64, signature: Signature) -> Result<SignedHeader> {
        self.check_usable()?;
        assert!(
            height == self.signed_through + 1 && height <= self.meta.height,
            "signing header {height} after {} of {}",
            self.signed_through,
            self.meta.height
        );
        let key = layout::header_key(height);
        let mut value = self
            .get(&key)?
            .ok_or_else(|| corrupt(Table::Header, format_args!("no header at {height}")))?;
        let mut signed = decode_header(height, &value)?;
        signed.signature = signature;
        value[HEADER_BYTES..SIGNED_HEADER_BYTES].copy_from_slice(&signature);
        let mut rows = WriteBatch::default();
        rows.put(&key, &value);
        let checkpointed = self.checkpointed.unwrap_or(0);
        rows.put(&layout::checkpointed_key(), &checkpointed.to_le_bytes());
        let mut header_log = self.header_log.clone();
        header_log::append(&mut header_log, &signed, &mut rows);
        if let Err(e) = self.db.write(rows, true) {
            let e = io_error(format_args!("writing the signature of header {height}"), e);
            self.failed = Some(e.to_string());
            return Err(e);
        }
        self.header_log = header_log;
        self.signed_through = height;
        self.checkpointed = Some(checkpointed);
        Ok(signed)
    }

    fn checkpointed_through(&mut self) -> Result<u64> {
        self.check_usable()?;
        Ok(self.checkpointed.unwrap_or(self.signed_through))
    }

    fn sign_checkpoint(&mut self, size: u64, signature: Signature) -> Result<()> {
        self.check_usable()?;
        let through = self
            .checkpointed
            .expect("a threshold's header is signed first");
        assert!(
            size == through + 1 && size <= self.signed_through,
            "signing checkpoint {size} after {through}, headers signed through {}",
            self.signed_through
        );
        let mut rows = WriteBatch::default();
        rows.put(&layout::checkpoint_signature_key(size), &signature);
        rows.put(&layout::checkpointed_key(), &size.to_le_bytes());
        if let Err(e) = self.db.write(rows, true) {
            let e = io_error(
                format_args!("writing the signature of checkpoint {size}"),
                e,
            );
            self.failed = Some(e.to_string());
            return Err(e);
        }
        self.checkpointed = Some(size);
        Ok(())
    }

    fn checkpoint_signature(&mut self, size: u64) -> Result<Option<Signature>> {
        let Some(value) = self.get(&layout::checkpoint_signature_key(size))? else {
            return Ok(None);
        };
        Ok(Some(fixed(Table::Header, &value)?))
    }

    fn body(&mut self, height: u64) -> Result<Option<Vec<u8>>> {
        let Some(digest) = self.body_digest(height)? else {
            return Ok(None);
        };
        if let Some(p) = self.pending.get(&height) {
            if p.digest == digest {
                return Ok(Some(p.body.to_vec()));
            }
        }
        if self.rearchive_next.is_some_and(|next| height >= next) {
            self.check_archive_caught_up()?;
        }
        match self.archive.body(&digest)? {
            Some(body) => Ok(Some(body)),
            None => Err(corrupt(
                Table::Body,
                format_args!("no body for the digest stored at height {height}"),
            )),
        }
    }
}

/// Closes `db` and opens the database in `dir` again, for a handle that never took a snapshot.
///
/// rusty-leveldb 4.0.2's snapshot list (`snapshot.rs`) says it is empty only while no snapshot
/// was ever taken (`empty` tests a field set by the first one and never reset), and once all
/// are dropped its `oldest` answers 0: from the first snapshot on (every iterator takes one),
/// each compaction keeps every overwritten version and every deletion. On the state database,
/// where each batch rewrites its accounts, that made every level-0 merge rewrite all versions
/// ever written (11 MB per merge after a minute at half load, growing without bound). Hence
/// the state database is read with point reads only, and a handle that iterated (the migration
/// at open, a dump) is replaced by a fresh one.
pub(crate) fn reopen_fresh(db: &mut DB, dir: &Path, options: Options) -> Result<()> {
    db.close()
        .map_err(|e| io_error(format_args!("closing {}", dir.display()), e))?;
    let mut fresh = DB::open(dir, options)
        .map_err(|e| io_error(format_args!("reopening {}", dir.display()), e))?;
    advance_sequence(&mut fresh).map_err(|e| io_error("writing the open marker", e))?;
    // The closed handle is dropped here; it holds no lock and writes nothing.
    *db = fresh;
    Ok(())
}

/// Refuses a ledger whose tip header has another layout version than this release writes
/// (PROTOCOL.md §4.3): version 1 headers carried the additive state digest, which this release
/// neither computes nor reads, so replaying on from them could only diverge.
fn refuse_older_headers(db: &mut DB, meta: &LedgerMeta) -> Result<()> {
    let Some(row) = (meta.height > 0)
        .then(|| db.get(&layout::header_key(meta.height)))
        .flatten()
    else {
        return Ok(());
    };
    match row.get(16) {
        Some(&v) if v != tally_wire::HEADER_VERSION => Err(Error::Config(format!(
            "this ledger's headers are version {v}, written by a tally older than header \
             version {} (the state map, PROTOCOL.md §4.3); this release cannot open it",
            tally_wire::HEADER_VERSION
        ))),
        _ => Ok(()),
    }
}

/// The summary row of `db` with its operator row, or genesis for a new ledger.
fn read_meta(db: &mut DB) -> Result<LedgerMeta> {
    let mut meta = match db.get(&layout::meta_key()) {
        None => LedgerMeta::genesis(),
        Some(v) => LedgerMeta::decode(&fixed::<META_BYTES>(Table::Meta, &v)?)?,
    };
    if let Some(v) = db.get(&layout::operator_key()) {
        meta.decode_operator(&v)?;
    }
    Ok(meta)
}

/// Migrates the header rows of a ledger whose tip (at `meta`'s height) is still in the v1
/// layout, then reopens `db` on a fresh handle. Does nothing for a ledger in the v2 layout.
fn migrate_headers_if_v1(
    db: &mut DB,
    dir: &Path,
    opts: &StoreOptions,
    sync_stats: &Arc<SyncStats>,
    meta: &LedgerMeta,
) -> Result<()> {
    // Migrating scans (an iterator): only when the tip is still in the old layout (a
    // migration moves heights upwards), and on a fresh handle afterwards (`reopen_fresh`).
    let mut tip_v1 = layout::HEADER_V1_TAG.to_vec();
    tip_v1.extend_from_slice(&meta.height.to_be_bytes());
    if meta.height > 0 && db.get(&tip_v1).is_some() {
        migrate_header_rows_v1(db)?;
        reopen_fresh(
            db,
            dir,
            state_leveldb_options(opts, SyncEnv::sharing(Arc::clone(sync_stats))),
        )?;
    }
    Ok(())
}

/// The request filter the last clean stop saved in `dir` for exactly this ledger (the one at
/// `meta`), and where the filter comes from: off, loaded, or to be scanned (and why).
fn load_request_filter(
    dir: &Path,
    opts: &StoreOptions,
    meta: &LedgerMeta,
) -> (Option<RequestFilter>, FilterOrigin) {
    match opts.request_filter_bytes {
        0 => (None, FilterOrigin::Off),
        bytes => match RequestFilter::load(dir, bytes, meta.height, &meta.last_header_hash) {
            Ok(filter) => (Some(filter), FilterOrigin::Loaded),
            Err(why) => (None, FilterOrigin::Scanned(why)),
        },
    }
}

/// The state rows one applied batch writes: its accounts' balances, its header row and the
/// summary (bodies and request records go to the archive). Accounts go in key order, which is
/// the order of their keys in the database: the memtable's skip list then finds each one next
/// to the last (see `archive::write_group`).
fn state_rows(write: &BatchWrite) -> WriteBatch {
    let mut batch = WriteBatch::default();
    let mut accounts: Vec<&(PublicKey, u64)> = write.accounts.iter().collect();
    accounts.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    for (key, balance) in accounts {
        batch.put(&layout::account_key(key), &layout::encode_account(*balance));
    }
    batch.put(
        &layout::header_key(write.meta.height),
        &encode_header_row(&write.signed_header, &write.body_digest),
    );
    batch.put(&layout::meta_key(), &write.meta.encode());
    if let Some(operator) = write.meta.encode_operator() {
        batch.put(&layout::operator_key(), &operator);
    }
    batch
}

/// The request records of one applied batch, keyed by signer and request id.
fn request_records(write: &BatchWrite) -> Vec<([u8; 52], RequestRecord)> {
    let header = &write.signed_header.header;
    let mut records = Vec::with_capacity(write.requests.len());
    for r in &write.requests {
        assert!(
            r.index < header.request_count,
            "request index {} out of the batch",
            r.index
        );
        let key = layout::request_key(&r.signer, r.id);
        let record = RequestRecord {
            height: write.meta.height,
            index: r.index,
            request_hash: r.request_hash,
        };
        records.push((key, record));
    }
    records
}

/// Heights one synced write of [`migrate_header_rows_v1`] moves, at most.
const MIGRATE_GROUP_HEIGHTS: usize = 4096;

/// Merges the rows of `header` v1 and `body_by_height` v1 (a ledger written by an earlier
/// tally) into `header` v2, in synced writes of up to [`MIGRATE_GROUP_HEIGHTS`] heights. Each
/// write moves whole heights (the v2 row in, both v1 rows out), so a migration a crash
/// interrupted goes on at the next open.
fn migrate_header_rows_v1(db: &mut DB) -> Result<()> {
    loop {
        let mut group = Vec::new();
        {
            let mut iter = db
                .new_iter()
                .map_err(|e| io_error("scanning header v1 rows", e))?;
            iter.seek(&layout::HEADER_V1_TAG);
            while let Some((key, value)) = iter.current() {
                if !key.starts_with(&layout::HEADER_V1_TAG) || group.len() == MIGRATE_GROUP_HEIGHTS
                {
                    break;
                }
                group.push((key.to_vec(), value.to_vec()));
                iter.advance();
            }
        }
        if group.is_empty() {
            break;
        }
        let mut batch = WriteBatch::default();
        for (key, value) in &group {
            let height = key[layout::TAG_BYTES..]
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| corrupt(Table::Header, "a header v1 key is not tag || height"))?;
            let mut digest_key = layout::BODY_BY_HEIGHT_V1_TAG.to_vec();
            digest_key.extend_from_slice(&height.to_be_bytes());
            let Some(digest) = db.get(&digest_key) else {
                return Err(corrupt(
                    Table::Header,
                    format_args!("header v1 at height {height} has no body_by_height v1 row"),
                ));
            };
            let digest: Hash = fixed(Table::Header, &digest)?;
            let signed: [u8; SIGNED_HEADER_BYTES] = fixed(Table::Header, value)?;
            let mut row = signed.to_vec();
            row.extend_from_slice(&digest);
            batch.put(&layout::header_key(height), &row);
            batch.delete(key);
            batch.delete(&digest_key);
        }
        db.write(batch, true)
            .map_err(|e| io_error("moving header v1 rows to v2", e))?;
    }
    let mut orphan = false;
    scan_prefix(db, &layout::BODY_BY_HEIGHT_V1_TAG, |_, _| {
        orphan = true;
        Ok(())
    })?;
    if orphan {
        return Err(corrupt(
            Table::Header,
            "body_by_height v1 rows remain without their header v1 rows",
        ));
    }
    Ok(())
}

/// Memory held for a pending batch (see `ARCHIVE_LAG_BYTES_MAX`).
fn pending_bytes(body: &[u8], records: usize) -> usize {
    body.len() + records * PENDING_RECORD_BYTES
}

/// The state database's options: its own memtable and table sizes (see [`StoreOptions`]).
pub(crate) fn state_leveldb_options(opts: &StoreOptions, env: SyncEnv) -> Options {
    Options {
        write_buffer_size: opts.state_write_buffer_bytes,
        max_file_size: opts.state_table_bytes,
        ..leveldb_options(opts, env)
    }
}

/// Table files one live LevelDB database keeps open (its table cache), at most. rusty-leveldb's
/// default (1,014) would let the ledger's state, its history and the raft log hold ~3,000
/// descriptors between them; the server keeps a reserve of its descriptors for storage,
/// computed from this and [`STAGED_TABLE_FILES_OPEN_MAX`] (`server/src/limits.rs`), and sizes
/// the connection limits under the rest. A table outside the cache is opened again when read
/// (rare on the hot path: accounts and request ids are answered from memory).
pub const TABLE_FILES_OPEN_MAX: usize = 64;

/// Table files a staged database keeps open, at most (see [`StoreOptions::staged`]). Such a
/// database is written once in bulk and read to be checked, then closed; a table it evicts is
/// opened again by a merge that needs it.
pub const STAGED_TABLE_FILES_OPEN_MAX: usize = 16;

pub(crate) fn leveldb_options(opts: &StoreOptions, env: SyncEnv) -> Options {
    Options {
        env: Rc::new(Box::new(env)),
        create_if_missing: true,
        // rusty-leveldb's table cache holds `max_open_files - 10` tables.
        max_open_files: opts.table_files_open_max + 10,
        write_buffer_size: opts.write_buffer_bytes,
        block_cache_capacity_bytes: opts.block_cache_bytes,
        // rusty-leveldb reads a log or manifest only up to its first bad record, and when it
        // reuses one it appends after that record: a torn tail left by a crash would then hide
        // every later, synced write at the next recovery. Starting new files on each open
        // avoids that.
        reuse_logs: false,
        reuse_manifest: false,
        ..Options::default()
    }
}

/// Works around a rusty-leveldb 4.0.2 bug. `Table::get` (table_reader.rs) takes a lookup key
/// that is *equal* to its block's index key for absent. A lookup is made at the newest sequence
/// number, so only the newest entry can be equal; and the index key of a block that ends between
/// two versions of one key is exactly the newer version. Recovery writes the log into a table,
/// and the newest entry is our summary row (the last key of every batch), which has a version
/// per batch: after a restart the summary could read as missing. Writing anything before the
/// first read puts the newest sequence number past every entry in a table; later memtable
/// flushes happen only at the start of a write, whose own entries are newer.
pub(crate) fn advance_sequence(db: &mut DB) -> rusty_leveldb::Result<()> {
    let mut batch = WriteBatch::default();
    batch.delete(&layout::open_marker_key());
    // Unsynced: if it is lost, the next open writes it again.
    db.write(batch, false)
}

/// A `header` row's value: the signed header, then the digest of the height's body.
pub(crate) fn encode_header_row(
    signed: &SignedHeader,
    body_digest: &Hash,
) -> [u8; HEADER_VALUE_BYTES] {
    let mut out = [0u8; HEADER_VALUE_BYTES];
    out[..SIGNED_HEADER_BYTES].copy_from_slice(&signed.encode());
    out[SIGNED_HEADER_BYTES..].copy_from_slice(body_digest);
    out
}

/// The signed header of a `header` row (see `encode_header_row`), checked against its height.
pub(crate) fn decode_header(height: u64, value: &[u8]) -> Result<SignedHeader> {
    let row: [u8; HEADER_VALUE_BYTES] = fixed(Table::Header, value)?;
    let bytes: [u8; SIGNED_HEADER_BYTES] = row[..SIGNED_HEADER_BYTES]
        .try_into()
        .expect("a header row starts with a signed header");
    let signed = SignedHeader::decode(&bytes)
        .map_err(|e| corrupt(Table::Header, format_args!("height {height}: {e}")))?;
    if signed.header.height != height {
        return Err(corrupt(
            Table::Header,
            format_args!("key height {height} holds header {}", signed.header.height),
        ));
    }
    Ok(signed)
}

/// The sum of every balance in the account table plus what open reserves hold (the owners'
/// pending debits), and the open reserves in deadline order: scans at open (about a second
/// per million accounts), then a fresh handle (an iterator was taken, see `reopen_fresh`).
fn scan_totals(
    db: &mut DB,
    dir: &Path,
    opts: &StoreOptions,
    sync_stats: &Arc<SyncStats>,
) -> Result<Scanned> {
    let mut total = 0u128;
    let mut entries = Vec::new();
    scan_prefix(db, &Table::Account.tag(), |key, value| {
        let balance = layout::decode_account(value)?;
        let public: PublicKey = layout::key_rest(Table::Account, key)?;
        entries.push((account_path(&public), account_value_hash(balance)));
        total += u128::from(balance);
        Ok(())
    })?;
    scan_prefix(db, &Table::Reserve.tag(), |key, value| {
        let rest: [u8; 48] = layout::key_rest(Table::Reserve, key)?;
        let owner: PublicKey = rest[..32].try_into().expect("32 bytes");
        let id = u128::from_be_bytes(rest[32..].try_into().expect("16 bytes"));
        let record = layout::decode_reserve(value)?.encode();
        entries.push((reserve_path(&owner, id), sha256(&[&record])));
        Ok(())
    })?;
    // Every open reserve's amount is in its owner's debits and its receiver's credits.
    let (mut debits, mut credits) = (0u128, 0u128);
    scan_prefix(db, &Table::Pending.tag(), |_, value| {
        let (d, c) = layout::decode_pending(value)?;
        (debits, credits) = (debits + u128::from(d), credits + u128::from(c));
        Ok(())
    })?;
    if debits != credits {
        return Err(corrupt(
            Table::Pending,
            format_args!("pending debits add up to {debits}, pending credits to {credits}"),
        ));
    }
    total += debits;
    let mut expiries = BTreeSet::new();
    scan_prefix(db, &Table::Expiry.tag(), |key, value| {
        match (layout::expiry_key_decode(key), value.is_empty()) {
            (Some(e), true) => expiries.insert(e),
            _ => {
                return Err(corrupt(
                    Table::Expiry,
                    "a row that is not tag ‖ deadline ‖ owner ‖ id → empty",
                ))
            }
        };
        Ok(())
    })?;
    let options = state_leveldb_options(opts, SyncEnv::sharing(Arc::clone(sync_stats)));
    reopen_fresh(db, dir, options)?;
    Ok(Scanned {
        balance_total: total,
        expiries,
        map: StateMap::from_entries(entries),
    })
}

/// The stored checkpointed height of a threshold operator's ledger (None: a whole key's).
fn read_checkpointed(db: &mut DB, signed_through: u64, stats: &SyncStats) -> Result<Option<u64>> {
    let Some(value) = crate::env::get_checked(db, &layout::checkpointed_key(), stats)? else {
        return Ok(None);
    };
    let h = u64::from_le_bytes(fixed(Table::Meta, &value)?);
    if h > signed_through {
        return Err(corrupt(
            Table::Meta,
            format_args!("checkpoints signed through {h}, headers through {signed_through}"),
        ));
    }
    Ok(Some(h))
}

/// What opening a ledger learns from one pass over its accounts and reserves.
struct Scanned {
    balance_total: u128,
    expiries: BTreeSet<Expiry>,
    map: StateMap,
}

/// Whether `key` is a row of a derived table (see [`Table::derived`]).
fn is_derived(key: &[u8]) -> bool {
    layout::is_header_log_key(key)
        || key
            .get(..layout::TAG_BYTES)
            .and_then(Table::from_tag)
            .is_some_and(Table::derived)
}

/// The place in deadline order of reserve `c` while it is open until `at_ms`.
fn expiry_of(c: &ReserveChange, at_ms: u64) -> Expiry {
    Expiry {
        at_ms,
        owner: c.owner,
        id: c.id,
    }
}

/// Calls `f` with every row whose key starts with `prefix`, in key order.
pub(crate) fn scan_prefix(
    db: &mut DB,
    prefix: &[u8],
    mut f: impl FnMut(&[u8], &[u8]) -> Result<()>,
) -> Result<()> {
    let mut iter = db.new_iter().map_err(|e| io_error("scanning a table", e))?;
    iter.seek(prefix);
    while let Some((key, value)) = iter.current() {
        if !key.starts_with(prefix) {
            break;
        }
        f(&key, &value)?;
        iter.advance();
    }
    Ok(())
}

/// A LevelDB failure: `Corrupt` where LevelDB found bad bytes (a block checksum), else `Io`.
pub(crate) fn io_error(what: impl fmt::Display, e: rusty_leveldb::Status) -> Error {
    match e.code {
        rusty_leveldb::StatusCode::Corruption => Error::corrupt(format_args!("{what}: {e}")),
        _ => Error::io(what, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// When the first assertion fails, rusty-leveldb has fixed the bug and `advance_sequence`
    /// can go.
    #[test]
    fn advance_sequence_makes_the_newest_entry_readable_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let options = || leveldb_options(&StoreOptions::default(), SyncEnv::new());
        {
            let mut db = DB::open(dir.path(), options()).unwrap();
            // Two versions of one key, each bigger than a block: the table written at recovery
            // has a block boundary between them.
            db.put(b"k", &[1; 5000]).unwrap();
            db.put(b"k", &[2; 5000]).unwrap();
            db.close().unwrap();
        }
        let mut db = DB::open(dir.path(), options()).unwrap();
        assert_eq!(db.get(b"k"), None, "the upstream bug");
        advance_sequence(&mut db).unwrap();
        assert_eq!(db.get(b"k").map(|v| v[0]), Some(2));
    }
}
