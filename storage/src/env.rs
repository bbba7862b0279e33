//! [`SyncEnv`]: a rusty-leveldb [`Env`] whose flushes reach the disk.
//!
//! rusty-leveldb 4.0.2 never calls fsync. A `write(batch, true)` ends in `flush()` on the log
//! file's `BufWriter`, the manifest and finished tables also end in `flush()`, and with
//! [`PosixDiskEnv`] that only empties a userspace buffer into the page cache: a power loss can
//! still take a batch the caller was told is durable. `SyncEnv` opens writable files itself and
//! hands out [`SyncFile`]s whose `flush()` also calls `fdatasync`, so every place where LevelDB
//! means "make this durable" now does.
//!
//! A file's contents are not durable until its directory entry is, so a created file's
//! directory is synced, but only once it matters, and once for every file created since:
//! - a log or manifest (every file but a table) syncs the directories with entries created
//!   since the last directory sync before its own `fdatasync`, so that an acknowledged write
//!   never sits in a file whose name could vanish;
//! - a table (`.ldb`) only syncs its contents: LevelDB reads a table only through the manifest
//!   edit that names it, and that edit's flush syncs the directory first. A memtable flush and
//!   the merges after it used to sync the directory once per file created or deleted (13 times
//!   in one measured flush, most of its 30-120 ms inside a batch's durable write);
//! - a rename (LevelDB switches manifests by renaming a temporary file to `CURRENT`) syncs the
//!   renamed file's contents, then the directory;
//! - a delete is not synced: LevelDB deletes only files that the durable manifest no longer
//!   names (obsolete logs, tables, manifests), and one that comes back after a power loss is
//!   ignored and deleted again at the next open.
//!
//! Everything else (reads, locks, the info log) is delegated to [`PosixDiskEnv`].

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rusty_leveldb::env::{Env, FileLock, Logger, RandomAccess};
use rusty_leveldb::{PosixDiskEnv, Status};

/// How many fsyncs a [`SyncEnv`] has issued. Shared (`Arc`) so that tests and metrics can read
/// the counters from outside the thread that owns the database.
#[derive(Debug, Default)]
pub struct SyncStats {
    file_syncs: AtomicU64,
    dir_syncs: AtomicU64,
    read_errors: AtomicU64,
}

impl SyncStats {
    /// `fdatasync` calls on files (log, manifest, tables, and a renamed file's contents).
    pub fn file_syncs(&self) -> u64 {
        self.file_syncs.load(Ordering::Relaxed)
    }

    /// `fsync` calls on directories (after a create, rename or delete).
    pub fn dir_syncs(&self) -> u64 {
        self.dir_syncs.load(Ordering::Relaxed)
    }

    /// Table files that could not be opened, and reads of them that failed or came back short
    /// (see [`get_checked`]).
    pub fn read_errors(&self) -> u64 {
        self.read_errors.load(Ordering::Relaxed)
    }

    /// Counts a file sync made outside LevelDB (the raft log's files).
    pub(crate) fn count_file_sync(&self) {
        self.file_syncs.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a directory sync made outside LevelDB.
    pub(crate) fn count_dir_sync(&self) {
        self.dir_syncs.fetch_add(1, Ordering::Relaxed);
    }
}

/// `db.get(key)`, except that a read that failed is an error rather than "absent".
///
/// rusty-leveldb 4.0.2 has no point read that reports a table error: `DB::get` turns every
/// error into `None`, and below it `Version::get` (used by `get_at` too) skips a table it could
/// not read and goes on to older levels, so a damaged table can hide a key or show an older
/// value of it. A table read goes through [`SyncEnv`]'s files, which count failures (a file
/// that would not open, a failed or short read, a block whose checksum does not match): any
/// answer while the count moved is an error. An exactly-once check or a balance read must never
/// take that for "absent" or for the current value (a request applied twice, a balance reset).
pub(crate) fn get_checked(
    db: &mut rusty_leveldb::DB,
    key: &[u8],
    stats: &SyncStats,
) -> Result<Option<Vec<u8>>, tally_core::Error> {
    let before = stats.read_errors();
    let found = db.get(key).map(|v| v.to_vec());
    if stats.read_errors() != before {
        return Err(tally_core::Error::corrupt(
            "a LevelDB table could not be read or is corrupt (see the log for the file): the \
             key's value is unknown",
        ));
    }
    Ok(found)
}

/// A [`PosixDiskEnv`] whose writable files sync on `flush()` and whose directory changes are
/// synced. See the module docs.
pub struct SyncEnv {
    inner: PosixDiskEnv,
    stats: Arc<SyncStats>,
    /// Directories with an entry created since their last sync.
    unsynced_dirs: Arc<UnsyncedDirs>,
}

/// Directories whose new entries are not durable yet (see the module docs), shared by an env
/// and the files it opened.
#[derive(Debug, Default)]
struct UnsyncedDirs(Mutex<Vec<PathBuf>>);

impl UnsyncedDirs {
    fn add(&self, dir: PathBuf) {
        let mut dirs = self.0.lock().expect("unsynced dirs lock");
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }

    fn remove(&self, dir: &Path) {
        self.0
            .lock()
            .expect("unsynced dirs lock")
            .retain(|d| d != dir);
    }

    /// Syncs every directory added since the last call. One that fails stays listed.
    fn sync_all(&self, stats: &SyncStats) -> io::Result<()> {
        let mut dirs = self.0.lock().expect("unsynced dirs lock");
        while let Some(dir) = dirs.last() {
            File::open(dir).and_then(|d| d.sync_all()).map_err(|e| {
                io::Error::new(e.kind(), format!("sync dir {}: {e}", dir.display()))
            })?;
            stats.dir_syncs.fetch_add(1, Ordering::Relaxed);
            dirs.pop();
        }
        Ok(())
    }
}

/// Whether a file's own flush must make its directory entry durable: a table's is made durable
/// by the manifest edit that names it (see the module docs).
fn entry_synced_by_flush(path: &Path) -> bool {
    !path.extension().is_some_and(|e| e == "ldb" || e == "sst")
}

impl Default for SyncEnv {
    fn default() -> Self {
        SyncEnv::new()
    }
}

impl SyncEnv {
    pub fn new() -> SyncEnv {
        SyncEnv::sharing(Arc::new(SyncStats::default()))
    }

    /// An env that counts into `stats` (a database reopened in a new directory keeps its
    /// counters).
    pub fn sharing(stats: Arc<SyncStats>) -> SyncEnv {
        SyncEnv {
            inner: PosixDiskEnv::new(),
            stats,
            unsynced_dirs: Arc::default(),
        }
    }

    /// The counters of this env; keep a clone before boxing the env into `Options`.
    pub fn stats(&self) -> Arc<SyncStats> {
        Arc::clone(&self.stats)
    }

    fn open(
        &self,
        path: &Path,
        what: &'static str,
        options: &OpenOptions,
    ) -> rusty_leveldb::Result<Box<dyn Write>> {
        let created = !path.exists();
        let file = options.open(path).map_err(|e| status(what, path, e))?;
        if created {
            self.unsynced_dirs.add(parent_dir(path));
        }
        Ok(Box::new(SyncFile {
            file,
            dirty: false,
            stats: Arc::clone(&self.stats),
            dirs: entry_synced_by_flush(path).then(|| Arc::clone(&self.unsynced_dirs)),
        }))
    }

    fn sync_dir_of(&self, path: &Path) -> rusty_leveldb::Result<()> {
        let dir = parent_dir(path);
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| status("sync dir", &dir, e))?;
        self.stats.dir_syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// A table file for reading that counts failed and short reads, and blocks whose checksum does
/// not match (see [`get_checked`]).
struct CountedRead {
    file: File,
    path: PathBuf,
    /// The length at open: tables are written once and never change.
    len: u64,
    stats: Arc<SyncStats>,
}

impl CountedRead {
    fn count(&self, what: std::fmt::Arguments<'_>) {
        self.stats.read_errors.fetch_add(1, Ordering::Relaxed);
        tracing::error!("{}: {what}", self.path.display());
    }

    /// Checks the block that a read of `got` at `off` holds (see [`block_checksum_ok`]); the
    /// footer, the last [`FOOTER_BYTES`] of the file, has no checksum (rusty-leveldb checks its
    /// magic number).
    fn check_block(&self, off: usize, got: &[u8]) {
        if off as u64 + got.len() as u64 == self.len && got.len() == FOOTER_BYTES {
            return;
        }
        let mut after = [0u8; BLOCK_TRAILER_BYTES];
        let after = match self.read_full(off + got.len(), &mut after) {
            Ok(n) => &after[..n],
            Err(_) => &[][..],
        };
        if !block_checksum_ok(got, after) {
            self.count(format_args!(
                "the block of {} bytes at offset {off} fails its checksum",
                got.len()
            ));
        }
    }

    fn read_full(&self, off: usize, dst: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let mut done = 0;
        while done < dst.len() {
            match FileExt::read_at(&self.file, &mut dst[done..], (off + done) as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }
}

/// A table's footer: two block handles, padding and the magic number (table_builder.rs).
const FOOTER_BYTES: usize = 48;
/// What follows every block of a table: its compression type (1 byte) and a masked CRC-32C
/// (4 bytes, little-endian) of the block's stored bytes and that type byte.
const BLOCK_TRAILER_BYTES: usize = 5;

/// Whether `got`, a read of a table block, matches the checksum rusty-leveldb wrote after it.
///
/// rusty-leveldb reads every block but one together with its trailer (`read_table_block`);
/// it reads the filter block without it (`read_filter_block`), and `after` holds the bytes that
/// follow the read. It checks the first kind itself but reports a mismatch only as an error that
/// `DB::get` drops, and never checks the filter block. A read of either kind matches one of the
/// two checksums, unless its bytes changed on disk (then both fail but for one chance in 2^32).
fn block_checksum_ok(got: &[u8], after: &[u8]) -> bool {
    if got.len() >= BLOCK_TRAILER_BYTES {
        let (stored, crc) = got.split_at(got.len() - 4);
        if crc32c::crc32c(stored) == unmask_crc(crc) {
            return true;
        }
    }
    if after.len() == BLOCK_TRAILER_BYTES {
        let typed = crc32c::crc32c_append(crc32c::crc32c(got), &after[..1]);
        return typed == unmask_crc(&after[1..]);
    }
    false
}

/// LevelDB stores a CRC rotated and offset, so that a CRC over bytes that hold CRCs stays
/// strong (log.rs `mask_crc`).
fn unmask_crc(masked: &[u8]) -> u32 {
    let masked = u32::from_le_bytes(masked.try_into().expect("a CRC is 4 bytes"));
    masked.wrapping_sub(0xa282_ead8).rotate_left(15)
}

impl RandomAccess for CountedRead {
    /// Reads `dst.len()` bytes at `off` unless the file ends first (rusty-leveldb takes fewer
    /// for an error of its own; they are counted here), and counts a block that fails its
    /// checksum (rusty-leveldb finds it too, and `get` drops the error).
    fn read_at(&self, off: usize, dst: &mut [u8]) -> rusty_leveldb::Result<usize> {
        let done = match self.read_full(off, dst) {
            Ok(done) => done,
            Err(e) => {
                self.count(format_args!("reading at offset {off}: {e}"));
                return Err(status("read", &self.path, e));
            }
        };
        if done < dst.len() {
            self.count(format_args!(
                "{} bytes at offset {off} asked, the file ended after {done}",
                dst.len()
            ));
        } else {
            self.check_block(off, dst);
        }
        Ok(done)
    }
}

impl Env for SyncEnv {
    fn open_sequential_file(&self, p: &Path) -> rusty_leveldb::Result<Box<dyn Read>> {
        self.inner.open_sequential_file(p)
    }

    fn open_random_access_file(&self, p: &Path) -> rusty_leveldb::Result<Box<dyn RandomAccess>> {
        match File::open(p).and_then(|file| Ok((file.metadata()?.len(), file))) {
            Ok((len, file)) => Ok(Box::new(CountedRead {
                file,
                path: p.to_owned(),
                len,
                stats: Arc::clone(&self.stats),
            })),
            Err(e) => {
                self.stats.read_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!("{}: opening for reading: {e}", p.display());
                Err(status("open (read)", p, e))
            }
        }
    }

    fn open_writable_file(&self, p: &Path) -> rusty_leveldb::Result<Box<dyn Write>> {
        self.open(
            p,
            "open (write)",
            OpenOptions::new().create(true).truncate(true).write(true),
        )
    }

    fn open_appendable_file(&self, p: &Path) -> rusty_leveldb::Result<Box<dyn Write>> {
        self.open(
            p,
            "open (append)",
            OpenOptions::new().create(true).append(true),
        )
    }

    fn exists(&self, p: &Path) -> rusty_leveldb::Result<bool> {
        self.inner.exists(p)
    }

    fn children(&self, p: &Path) -> rusty_leveldb::Result<Vec<PathBuf>> {
        self.inner.children(p)
    }

    fn size_of(&self, p: &Path) -> rusty_leveldb::Result<usize> {
        self.inner.size_of(p)
    }

    /// Not synced (see the module docs).
    fn delete(&self, p: &Path) -> rusty_leveldb::Result<()> {
        self.inner.delete(p)
    }

    fn mkdir(&self, p: &Path) -> rusty_leveldb::Result<()> {
        let created = !p.exists();
        self.inner.mkdir(p)?;
        if created {
            self.sync_dir_of(p)?;
        }
        Ok(())
    }

    fn rmdir(&self, p: &Path) -> rusty_leveldb::Result<()> {
        self.inner.rmdir(p)
    }

    /// LevelDB writes `CURRENT`'s replacement without ever flushing it, then renames it: sync
    /// the contents first, or the rename could become durable before the bytes it names.
    fn rename(&self, old: &Path, new: &Path) -> rusty_leveldb::Result<()> {
        File::open(old)
            .and_then(|f| f.sync_data())
            .map_err(|e| status("sync before rename", old, e))?;
        self.stats.file_syncs.fetch_add(1, Ordering::Relaxed);
        self.inner.rename(old, new)?;
        self.sync_dir_of(new)?;
        self.unsynced_dirs.remove(&parent_dir(new));
        if parent_dir(old) != parent_dir(new) {
            self.sync_dir_of(old)?;
        }
        Ok(())
    }

    fn lock(&self, p: &Path) -> rusty_leveldb::Result<FileLock> {
        self.inner.lock(p)
    }

    fn unlock(&self, l: FileLock) -> rusty_leveldb::Result<()> {
        self.inner.unlock(l)
    }

    /// The info log (`LOG`) is for humans and is never synced.
    fn new_logger(&self, p: &Path) -> rusty_leveldb::Result<Logger> {
        self.inner.new_logger(p)
    }

    fn micros(&self) -> u64 {
        self.inner.micros()
    }

    fn sleep_for(&self, micros: u32) {
        self.inner.sleep_for(micros)
    }
}

/// A file whose `flush()` is durable: it calls `fdatasync` if anything was written since the
/// last sync. `fdatasync` also persists the file size, which is all a reader needs. Every file
/// but a table first syncs the directories with new entries (see the module docs).
pub struct SyncFile {
    file: File,
    dirty: bool,
    stats: Arc<SyncStats>,
    /// The env's unsynced directories, for a file whose flush makes entries durable.
    dirs: Option<Arc<UnsyncedDirs>>,
}

impl Write for SyncFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.dirty |= n > 0;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()?;
        if let Some(dirs) = &self.dirs {
            dirs.sync_all(&self.stats)?;
        }
        if self.dirty {
            self.file.sync_data()?;
            self.dirty = false;
            self.stats.file_syncs.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Asks the kernel to drop the cached pages of `file` wholly inside `offset..offset + len`
/// (`None`: to the end of the file, its last page too), once they are synced (clean); with a
/// length, a partial page at either end stays (the next append writes into the last one). For files written once and rarely read (the body log, the raft log's segments, a
/// local archive's objects), whose pages would only pile up in the page cache, each a fresh
/// page: on a virtual machine that hands its free memory back to the host (a balloon with free
/// page reporting, as on the machines tally is measured on) every fresh page costs a host
/// fault, and appends ran at 120-320 MB/s against ~5 GB/s into pages dropped and reused
/// (`docs/PERFORMANCE.md`). Advice only: a failure changes nothing but speed, so it is ignored.
pub(crate) fn drop_cached(file: &File, offset: u64, len: Option<u64>) {
    let len = match len {
        Some(len) => match std::num::NonZeroU64::new(len) {
            Some(len) => Some(len),
            None => return,
        },
        None => None,
    };
    let _ = rustix::fs::fadvise(file, offset, len, rustix::fs::Advice::DontNeed);
}

pub(crate) fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Like `PosixDiskEnv`'s errors: the io error's code, annotated with the operation and path.
fn status(what: &str, path: &Path, e: io::Error) -> Status {
    Status::from(e).annotate(format!("{what}: {}", path.display()))
}

/// How long [`open_retrying`] waits for a descriptor, at most.
const OPEN_RETRY_MS: u64 = 5_000;

/// Opens a file with `open`, retrying for up to [`OPEN_RETRY_MS`] while the process is out of
/// descriptors (EMFILE, ENFILE). The archive thread opens files of its own (a run per table
/// and write group, the body log's readers and segments); running out of descriptors is
/// transient (the client listener gives its spares back and pauses, server/src/limits.rs), and
/// an error there would stop the node.
pub(crate) fn open_retrying(
    open: impl Fn() -> std::io::Result<std::fs::File>,
) -> std::io::Result<std::fs::File> {
    const EMFILE: i32 = 24;
    const ENFILE: i32 = 23;
    let mut waited = 0;
    loop {
        match open() {
            Err(e)
                if matches!(e.raw_os_error(), Some(EMFILE | ENFILE)) && waited < OPEN_RETRY_MS =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
                waited += 10;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::rc::Rc;

    use rusty_leveldb::{Options, WriteBatch, DB};

    use super::*;

    fn open(dir: &Path) -> (DB, Arc<SyncStats>) {
        let env = SyncEnv::new();
        let stats = env.stats();
        let opts = Options {
            env: Rc::new(Box::new(env)),
            create_if_missing: true,
            ..Options::default()
        };
        (DB::open(dir, opts).expect("open"), stats)
    }

    fn batch(k: &[u8]) -> WriteBatch {
        let mut b = WriteBatch::default();
        b.put(k, b"value");
        b
    }

    /// The point of `SyncEnv`: a synced write reaches the disk through an fsync, an unsynced
    /// one does not pay for one. Fails if a synced batch is acknowledged without an fsync.
    #[test]
    fn synced_write_fsyncs_the_log_and_unsynced_write_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let (mut db, stats) = open(dir.path());
        let before = stats.file_syncs();
        db.write(batch(b"a"), false).unwrap();
        assert_eq!(
            stats.file_syncs(),
            before,
            "an unsynced write must not fsync"
        );
        db.write(batch(b"b"), true).unwrap();
        assert_eq!(
            stats.file_syncs(),
            before + 1,
            "a synced write must fsync exactly once"
        );
        db.write(batch(b"c"), true).unwrap();
        assert_eq!(stats.file_syncs(), before + 2);
    }

    #[test]
    fn creating_a_database_syncs_files_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let (db, stats) = open(&path);
        // The manifest is synced, CURRENT is synced before its rename, and the directory entries
        // of the new files, of CURRENT and of the database directory itself are synced.
        assert!(
            stats.file_syncs() >= 2,
            "file syncs: {}",
            stats.file_syncs()
        );
        assert!(stats.dir_syncs() >= 3, "dir syncs: {}", stats.dir_syncs());
        drop(db);
        assert!(path.join("CURRENT").exists());
    }

    #[test]
    fn flush_without_writes_does_not_sync() {
        let dir = tempfile::tempdir().unwrap();
        let env = SyncEnv::new();
        let stats = env.stats();
        let mut f = env.open_writable_file(&dir.path().join("f")).unwrap();
        assert_eq!(
            stats.dir_syncs(),
            0,
            "the new entry is synced by the first flush"
        );
        f.flush().unwrap();
        assert_eq!(stats.file_syncs(), 0);
        assert_eq!(
            stats.dir_syncs(),
            1,
            "the file's flush synced its new entry"
        );
        f.write_all(b"x").unwrap();
        f.flush().unwrap();
        f.flush().unwrap();
        assert_eq!(stats.file_syncs(), 1);
        drop(f);
        // Reopening an existing file for append does not change the directory.
        let _f = env.open_appendable_file(&dir.path().join("f")).unwrap();
        assert_eq!(stats.dir_syncs(), 1);
        env.rename(&dir.path().join("f"), &dir.path().join("g"))
            .unwrap();
        assert_eq!((stats.file_syncs(), stats.dir_syncs()), (2, 2));
        env.delete(&dir.path().join("g")).unwrap();
        assert_eq!(stats.dir_syncs(), 2, "a delete is not synced");
    }

    /// Tables' new entries wait for the next flush of a file that is not a table (the manifest
    /// edit that names them): one directory sync for all of them, before that file's own sync.
    #[test]
    fn table_entries_are_synced_by_the_next_manifest_or_log_flush() {
        let dir = tempfile::tempdir().unwrap();
        let env = SyncEnv::new();
        let stats = env.stats();
        for n in 5..8 {
            let mut t = env
                .open_writable_file(&dir.path().join(format!("{n:06}.ldb")))
                .unwrap();
            t.write_all(b"table").unwrap();
            t.flush().unwrap();
        }
        assert_eq!((stats.file_syncs(), stats.dir_syncs()), (3, 0));
        let mut manifest = env
            .open_appendable_file(&dir.path().join("MANIFEST-000002"))
            .unwrap();
        manifest.write_all(b"edit").unwrap();
        manifest.flush().unwrap();
        assert_eq!((stats.file_syncs(), stats.dir_syncs()), (4, 1));
        manifest.write_all(b"edit").unwrap();
        manifest.flush().unwrap();
        assert_eq!(
            (stats.file_syncs(), stats.dir_syncs()),
            (5, 1),
            "nothing new in the directory"
        );
        let mut log = env
            .open_writable_file(&dir.path().join("000009.log"))
            .unwrap();
        log.write_all(b"batch").unwrap();
        log.flush().unwrap();
        assert_eq!((stats.file_syncs(), stats.dir_syncs()), (6, 2));
    }

    /// What the exactly-once check and balance reads rely on: a table that cannot be read is an
    /// error, where rusty-leveldb's own `get` answers "absent".
    #[test]
    fn a_table_that_cannot_be_read_is_an_error_not_an_absent_key() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(SyncStats::default());
        let options = || {
            let store = crate::StoreOptions::default();
            crate::ledger::leveldb_options(&store, SyncEnv::sharing(Arc::clone(&stats)))
        };
        let mut db = DB::open(dir.path(), options()).unwrap();
        db.put(b"k", b"v").unwrap();
        db.close().unwrap();
        // Opening again writes the log into a table (logs are never reused).
        let mut db = DB::open(dir.path(), options()).unwrap();
        assert_eq!(
            get_checked(&mut db, b"k", &stats).unwrap(),
            Some(b"v".to_vec())
        );
        assert_eq!(get_checked(&mut db, b"absent", &stats).unwrap(), None);
        db.close().unwrap();
        let mut tables = 0;
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "ldb") {
                // The footer stays (it names the index block), the blocks before it go: the
                // index block's read comes back short, as from a file cut by a bad disk.
                let bytes = std::fs::read(&path).unwrap();
                let footer = &bytes[bytes.len() - 48..];
                std::fs::write(&path, [&bytes[..4], footer].concat()).unwrap();
                tables += 1;
            }
        }
        assert!(tables >= 1, "the key is in a table");
        let mut db = DB::open(dir.path(), options()).unwrap();
        assert_eq!(db.get(b"k"), None, "rusty-leveldb's get: absent");
        let err = get_checked(&mut db, b"k", &stats).unwrap_err();
        assert!(err.to_string().contains("could not be read"), "{err}");
    }

    /// Opens a database of `keys` keys (`k00000`...) written into tables, through the ledger's
    /// options.
    fn tables_of(keys: u32) -> (tempfile::TempDir, Arc<SyncStats>, impl Fn() -> Options) {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(SyncStats::default());
        let shared = Arc::clone(&stats);
        let options = move || {
            let store = crate::StoreOptions::default();
            crate::ledger::leveldb_options(&store, SyncEnv::sharing(Arc::clone(&shared)))
        };
        let mut db = DB::open(dir.path(), options()).unwrap();
        for i in 0..keys {
            db.put(format!("k{i:05}").as_bytes(), &[i as u8; 100])
                .unwrap();
        }
        db.close().unwrap();
        // Opening again writes the log into a table (logs are never reused).
        DB::open(dir.path(), options()).unwrap().close().unwrap();
        (dir, stats, options)
    }

    fn table_files(dir: &Path) -> Vec<PathBuf> {
        let mut tables: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "ldb"))
            .collect();
        tables.sort();
        tables
    }

    /// The checksum check must not take a sound table for a damaged one: every kind of block
    /// (data, index, meta index, the filter block read without its trailer) and the footer pass.
    #[test]
    fn sound_tables_read_without_errors() {
        let (_dir, stats, options) = tables_of(2_000);
        let mut db = DB::open(_dir.path(), options()).unwrap();
        for i in (0..2_000).step_by(7) {
            let got = get_checked(&mut db, format!("k{i:05}").as_bytes(), &stats).unwrap();
            assert_eq!(got, Some(vec![i as u8; 100]), "key {i}");
        }
        assert_eq!(get_checked(&mut db, b"k99999x", &stats).unwrap(), None);
        assert_eq!(stats.read_errors(), 0);
    }

    /// A bit flipped inside a data block: rusty-leveldb finds the bad checksum and its `get`
    /// answers "absent"; `get_checked` must answer an error.
    #[test]
    fn a_block_that_fails_its_checksum_is_an_error_not_an_absent_key() {
        let (dir, stats, options) = tables_of(2_000);
        let tables = table_files(dir.path());
        assert_eq!(tables.len(), 1, "{tables:?}");
        let mut bytes = std::fs::read(&tables[0]).unwrap();
        // The first data block starts at offset 0 and holds the first key.
        bytes[20] ^= 0x10;
        std::fs::write(&tables[0], bytes).unwrap();
        let mut db = DB::open(dir.path(), options()).unwrap();
        assert_eq!(db.get(b"k00000"), None, "rusty-leveldb's get: absent");
        let err = get_checked(&mut db, b"k00000", &stats).unwrap_err();
        assert!(err.to_string().contains("corrupt"), "{err}");
        // Keys in other blocks still read.
        let got = get_checked(&mut db, b"k01999", &stats).unwrap();
        assert_eq!(got, Some(vec![1_999u32 as u8; 100]));
    }

    #[test]
    fn block_checksums() {
        let crc = |b: &[u8]| {
            let c = crc32c::crc32c(b);
            c.rotate_right(15).wrapping_add(0xa282_ead8).to_le_bytes()
        };
        let stored = b"block bytes\x00"; // ends with its compression type
        let block = [&stored[..], &crc(stored)].concat();
        assert!(block_checksum_ok(&block, b""), "a block with its trailer");
        let trailer = [&stored[stored.len() - 1..], &crc(stored)].concat();
        let data = &stored[..stored.len() - 1];
        assert!(block_checksum_ok(data, &trailer), "a block read without it");
        let mut bad = block.clone();
        bad[3] ^= 1;
        assert!(!block_checksum_ok(&bad, b""));
        assert!(!block_checksum_ok(
            &bad[..bad.len() - 5],
            &bad[bad.len() - 5..]
        ));
        assert!(!block_checksum_ok(b"abc", b""), "shorter than a trailer");
    }
}
