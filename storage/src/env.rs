//! [`SyncEnv`]: a rusty-leveldb [`Env`] whose flushes reach the disk.
//!
//! rusty-leveldb 4.0.2 never calls fsync. A `write(batch, true)` ends in `flush()` on the log
//! file's `BufWriter`, the manifest and finished tables also end in `flush()`, and with
//! [`PosixDiskEnv`] that only empties a userspace buffer into the page cache: a power loss can
//! still take a batch the caller was told is durable. `SyncEnv` opens writable files itself and
//! hands out [`SyncFile`]s whose `flush()` also calls `fdatasync`, so every place where LevelDB
//! means "make this durable" now does. It also fsyncs the parent directory whenever a file is
//! created, renamed or deleted, because a file's contents are not durable until its directory
//! entry is, and because LevelDB switches to a new manifest by renaming a temporary file to
//! `CURRENT`.
//!
//! Everything else (reads, locks, the info log) is delegated to [`PosixDiskEnv`].

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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
}

/// `db.get(key)`, except that a read that failed is an error rather than "absent".
///
/// rusty-leveldb 4.0.2's `DB::get` turns every error into `None`, and its `get_at`, which
/// reports them, needs a snapshot, which the snapshot-list caveat of `ledger::reopen_fresh`
/// rules out. A table read goes through [`SyncEnv`]'s files, which count failures: a `None`
/// while the count moved was a failed read. An exactly-once check or a balance read must never
/// take that for "absent" (a request applied twice, a balance reset to zero). Errors that
/// rusty-leveldb finds itself in bytes it did read (a bad block checksum) are not seen here.
pub(crate) fn get_checked(
    db: &mut rusty_leveldb::DB,
    key: &[u8],
    stats: &SyncStats,
) -> Result<Option<Vec<u8>>, tally_core::Error> {
    let before = stats.read_errors();
    let found = db.get(key).map(|v| v.to_vec());
    if found.is_none() && stats.read_errors() != before {
        return Err(tally_core::Error::io(
            "reading a LevelDB table",
            "a table file could not be read (see the log for the file): the key's value is \
             unknown",
        ));
    }
    Ok(found)
}

/// A [`PosixDiskEnv`] whose writable files sync on `flush()` and whose directory changes are
/// synced. See the module docs.
pub struct SyncEnv {
    inner: PosixDiskEnv,
    stats: Arc<SyncStats>,
}

impl Default for SyncEnv {
    fn default() -> Self {
        SyncEnv::new()
    }
}

impl SyncEnv {
    pub fn new() -> SyncEnv {
        SyncEnv {
            inner: PosixDiskEnv::new(),
            stats: Arc::new(SyncStats::default()),
        }
    }

    /// An env that counts into `stats` (a database reopened in a new directory keeps its
    /// counters).
    pub fn sharing(stats: Arc<SyncStats>) -> SyncEnv {
        SyncEnv {
            inner: PosixDiskEnv::new(),
            stats,
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
            self.sync_dir_of(path)?;
        }
        Ok(Box::new(SyncFile {
            file,
            dirty: false,
            stats: Arc::clone(&self.stats),
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

/// A table file for reading that counts failed and short reads (see [`get_checked`]).
struct CountedRead {
    file: File,
    path: PathBuf,
    stats: Arc<SyncStats>,
}

impl RandomAccess for CountedRead {
    /// Reads `dst.len()` bytes at `off` unless the file ends first (rusty-leveldb takes fewer
    /// for an error of its own; they are counted here).
    fn read_at(&self, off: usize, dst: &mut [u8]) -> rusty_leveldb::Result<usize> {
        use std::os::unix::fs::FileExt;
        let mut done = 0;
        while done < dst.len() {
            match FileExt::read_at(&self.file, &mut dst[done..], (off + done) as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.stats.read_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!("{}: reading at offset {off}: {e}", self.path.display());
                    return Err(status("read", &self.path, e));
                }
            }
        }
        if done < dst.len() {
            self.stats.read_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                "{}: {} bytes at offset {off} asked, the file ended after {done}",
                self.path.display(),
                dst.len()
            );
        }
        Ok(done)
    }
}

impl Env for SyncEnv {
    fn open_sequential_file(&self, p: &Path) -> rusty_leveldb::Result<Box<dyn Read>> {
        self.inner.open_sequential_file(p)
    }

    fn open_random_access_file(&self, p: &Path) -> rusty_leveldb::Result<Box<dyn RandomAccess>> {
        match File::open(p) {
            Ok(file) => Ok(Box::new(CountedRead {
                file,
                path: p.to_owned(),
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

    fn delete(&self, p: &Path) -> rusty_leveldb::Result<()> {
        self.inner.delete(p)?;
        self.sync_dir_of(p)
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
/// last sync. `fdatasync` also persists the file size, which is all a reader needs.
pub struct SyncFile {
    file: File,
    dirty: bool,
    stats: Arc<SyncStats>,
}

impl Write for SyncFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.dirty |= n > 0;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()?;
        if self.dirty {
            self.file.sync_data()?;
            self.dirty = false;
            self.stats.file_syncs.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
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
        assert_eq!(stats.dir_syncs(), 1, "creating a file syncs its directory");
        f.flush().unwrap();
        assert_eq!(stats.file_syncs(), 0);
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
        assert_eq!(stats.dir_syncs(), 3);
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
}
