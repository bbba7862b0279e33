//! [`LedgerDb`]: the ledger's committed state in LevelDB, behind core's storage ports.

use std::fmt;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use rusty_leveldb::{LdbIterator, Options, WriteBatch, DB};
use tally_core::batch::BatchWrite;
use tally_core::crypto::{header_hash, sha256};
use tally_core::ports::{LedgerRead, LedgerStore, RequestRecord};
use tally_core::state::{LedgerMeta, META_BYTES};
use tally_core::{Error, Result};
use tally_wire::{PublicKey, SignedHeader, SIGNED_HEADER_BYTES};

use crate::env::{SyncEnv, SyncStats};
use crate::filter::RequestFilter;
use crate::layout::{self, corrupt, fixed, Table};
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
    /// Size of the memtable before it is written out as a table file. Larger means fewer,
    /// bigger compactions, which run inline in `apply` (see the crate caveats).
    pub write_buffer_bytes: usize,
    /// Size of the in-memory filter over request ids (see `filter.rs`); 0 turns it off.
    pub request_filter_bytes: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            block_cache_bytes: 256 << 10,
            write_buffer_bytes: 4 << 20,
            request_filter_bytes: 16 << 20,
        }
    }
}

/// The ledger's committed state: accounts, request index, headers, bodies and the summary.
///
/// Not `Send`: rusty-leveldb's `DB` is built on `Rc`. Open it on the thread that will own it.
pub struct LedgerDb {
    db: DB,
    /// The summary as of the last apply, so that apply and `meta()` need no read.
    meta: LedgerMeta,
    sync_stats: Arc<SyncStats>,
    /// Set when a write failed. rusty-leveldb inserts a batch into its memtable before writing
    /// the log, so after a failed write reads could see state that is not durable: refuse them.
    failed: Option<String>,
    /// Every key of the request table (and false positives); None when turned off.
    requests: Option<RequestFilter>,
    lookups: RequestLookups,
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
    /// last header agree.
    pub fn open(dir: &Path, opts: StoreOptions) -> Result<LedgerDb> {
        assert!(
            opts.write_buffer_bytes > 0 && opts.block_cache_bytes > 0,
            "{opts:?}"
        );
        let env = SyncEnv::new();
        let sync_stats = env.stats();
        let mut db = DB::open(dir, leveldb_options(&opts, env))
            .map_err(|e| io_error(format_args!("opening {}", dir.display()), e))?;
        advance_sequence(&mut db).map_err(|e| io_error("writing the open marker", e))?;
        let mut this = LedgerDb {
            db,
            meta: LedgerMeta::genesis(),
            sync_stats,
            failed: None,
            requests: None,
            lookups: RequestLookups::default(),
        };
        this.meta = this.read_meta()?;
        this.check_tip()?;
        if let Some(mut filter) = RequestFilter::new(opts.request_filter_bytes) {
            this.scan_requests(|key| filter.insert(key))?;
            this.requests = Some(filter);
        }
        Ok(this)
    }

    /// Calls `f` with every key of the request table.
    fn scan_requests(&mut self, mut f: impl FnMut(&[u8])) -> Result<()> {
        let tag = Table::Request.tag();
        let mut iter = self
            .db
            .new_iter()
            .map_err(|e| io_error("scanning the request table", e))?;
        iter.seek(&tag);
        while let Some((key, _)) = iter.current() {
            if !key.starts_with(&tag) {
                break;
            }
            f(&key);
            iter.advance();
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
    pub fn headers(&mut self, from: u64, limit: usize) -> Result<Vec<SignedHeader>> {
        self.check_usable()?;
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        let mut iter = self
            .db
            .new_iter()
            .map_err(|e| io_error("iterating headers", e))?;
        iter.seek(&layout::header_key(from));
        while out.len() < limit {
            let Some((key, value)) = iter.current() else {
                break;
            };
            if !key.starts_with(&Table::Header.tag()) {
                break;
            }
            let height = layout::header_key_height(&key).ok_or_else(|| {
                corrupt(Table::Header, format_args!("key of {} bytes", key.len()))
            })?;
            out.push(decode_header(height, &value)?);
            if !iter.advance() {
                break;
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
        let snapshot = self.db.get_snapshot();
        let mut iter = self
            .db
            .new_iter_at(snapshot)
            .map_err(|e| io_error("iterating the ledger for a dump", e))?;
        let mut writer = DumpWriter::new(chunk_bytes_max, out)?;
        let meta_key = layout::meta_key();
        let open_marker = layout::open_marker_key();
        let mut meta = LedgerMeta::genesis();
        while let Some((key, value)) = iter.next() {
            // Deleted at every open, so never found; excluded all the same, being no state.
            if key == open_marker {
                continue;
            }
            if key == meta_key {
                meta = LedgerMeta::decode(&fixed::<META_BYTES>(Table::Meta, &value)?)?;
            }
            writer.record(&key, &value)?;
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

    /// Releases the database lock, reporting a failure to flush (every apply is already synced).
    pub fn close(mut self) -> Result<()> {
        self.db.close().map_err(|e| io_error("closing", e))
    }

    /// Writes one raw key and value, synced. For tests that need a corrupt database.
    #[doc(hidden)]
    pub fn raw_put(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.put(key, value);
        self.db
            .write(batch, true)
            .map_err(|e| io_error("raw put", e))?;
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
            Some(e) => Err(Error::Storage(format!(
                "an earlier write failed, the database must be reopened: {e}"
            ))),
        }
    }

    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.check_usable()?;
        // rusty-leveldb's `get` has no error path of its own: a table it cannot read reads as
        // a missing key (see the crate caveats).
        Ok(self.db.get(key).map(|v| v.to_vec()))
    }

    fn read_meta(&mut self) -> Result<LedgerMeta> {
        match self.get(&layout::meta_key())? {
            None => Ok(LedgerMeta::genesis()),
            Some(v) => LedgerMeta::decode(&fixed::<META_BYTES>(Table::Meta, &v)?),
        }
    }

    /// The summary, the header at its height and that height's body were written together: a
    /// database where they disagree is corrupt.
    fn check_tip(&mut self) -> Result<()> {
        let height = self.meta.height;
        if let Some(next) = self.header(height + 1)? {
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
        let Some(tip) = self.header(height)? else {
            return Err(corrupt(
                Table::Header,
                format_args!("no header at the summary's height {height}"),
            ));
        };
        if header_hash(&tip.header) != self.meta.last_header_hash {
            return Err(corrupt(
                Table::Meta,
                format_args!("last header hash does not match header {height}"),
            ));
        }
        if self.body(height)?.is_none() {
            return Err(corrupt(
                Table::BodyByHeight,
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
        let key = layout::request_key(signer, id);
        if let Some(filter) = &self.requests {
            if !filter.may_contain(&key) {
                self.lookups.filtered += 1;
                return Ok(None);
            }
        }
        self.lookups.read += 1;
        let found = self.get(&key)?;
        if found.is_none() {
            self.lookups.read_absent += 1;
        }
        found.map(|v| layout::decode_request(&v)).transpose()
    }
}

impl LedgerStore for LedgerDb {
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

    fn request_lookup_counts(&self) -> (u64, u64, u64) {
        let l = self.lookups;
        (l.filtered, l.read - l.read_absent, l.read_absent)
    }

    fn meta(&mut self) -> Result<LedgerMeta> {
        self.check_usable()?;
        Ok(self.meta.clone())
    }

    fn apply(&mut self, write: &BatchWrite) -> Result<()> {
        self.check_usable()?;
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
        assert_eq!(
            write.requests.len(),
            header.request_count as usize,
            "one record per request"
        );
        // Hashing the whole body costs O(body); prepare_apply has just computed it.
        debug_assert_eq!(sha256(&[&write.body]), write.body_digest, "body digest");

        let mut batch = WriteBatch::default();
        for (key, balance) in &write.accounts {
            batch.put(&layout::account_key(key), &layout::encode_account(*balance));
        }
        for r in &write.requests {
            assert!(
                r.index < header.request_count,
                "request index {} out of the batch",
                r.index
            );
            let record = RequestRecord {
                height,
                index: r.index,
                request_hash: r.request_hash,
            };
            batch.put(
                &layout::request_key(&r.signer, r.id),
                &layout::encode_request(&record),
            );
        }
        batch.put(&layout::header_key(height), &write.signed_header.encode());
        batch.put(&layout::body_key(&write.body_digest), &write.body);
        batch.put(&layout::body_by_height_key(height), &write.body_digest);
        batch.put(&layout::meta_key(), &write.meta.encode());
        if let Err(e) = self.db.write(batch, true) {
            let e = io_error(format_args!("writing batch {height}"), e);
            self.failed = Some(e.to_string());
            return Err(e);
        }
        if let Some(filter) = &mut self.requests {
            for r in &write.requests {
                filter.insert(&layout::request_key(&r.signer, r.id));
            }
        }
        self.meta = write.meta.clone();
        Ok(())
    }

    fn header(&mut self, height: u64) -> Result<Option<SignedHeader>> {
        self.get(&layout::header_key(height))?
            .map(|v| decode_header(height, &v))
            .transpose()
    }

    fn body(&mut self, height: u64) -> Result<Option<Vec<u8>>> {
        let Some(digest) = self.get(&layout::body_by_height_key(height))? else {
            return Ok(None);
        };
        let digest: [u8; 32] = fixed(Table::BodyByHeight, &digest)?;
        match self.get(&layout::body_key(&digest))? {
            Some(body) => Ok(Some(body)),
            None => Err(corrupt(
                Table::Body,
                format_args!("no body for the digest stored at height {height}"),
            )),
        }
    }
}

pub(crate) fn leveldb_options(opts: &StoreOptions, env: SyncEnv) -> Options {
    Options {
        env: Rc::new(Box::new(env)),
        create_if_missing: true,
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
fn advance_sequence(db: &mut DB) -> rusty_leveldb::Result<()> {
    let mut batch = WriteBatch::default();
    batch.delete(&layout::open_marker_key());
    // Unsynced: if it is lost, the next open writes it again.
    db.write(batch, false)
}

pub(crate) fn decode_header(height: u64, value: &[u8]) -> Result<SignedHeader> {
    let bytes: [u8; SIGNED_HEADER_BYTES] = fixed(Table::Header, value)?;
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

pub(crate) fn io_error(what: impl fmt::Display, e: rusty_leveldb::Status) -> Error {
    Error::Storage(format!("{what}: {e}"))
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
