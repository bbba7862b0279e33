//! The body log: batch bodies in append-only segment files beside the archive database,
//! `<ledger>/bodies/<segment, 16 digits>.bodies`, written and read by the archive thread only.
//!
//! Why: bodies are the largest rows of the archive (about 260 bytes per request) and are
//! content-addressed, so in LevelDB they landed at random keys and every compaction that
//! reached them copied them again: about a third of the archive thread's work, which at
//! saturation is the pipeline's bottleneck (the lag bound makes `apply` wait for it). Here a
//! body is written once and never moved. The `body` table keeps its key (the body's SHA-256)
//! and its row now holds a [`Locator`] instead of the body; rows written before the body log
//! hold the body itself and are read as before (a body is always longer than a locator).
//!
//! History rows (`history.rs`) are records of the log too, for the same reason: random account
//! keys, written once.
//!
//! Record: `len u32 LE ‖ crc32c(body) u32 LE ‖ body`, at the offset its locator names. Appends
//! are buffered and written out at each sync (a group's history rows are thousands of records),
//! or every [`UNWRITTEN_BYTES_MAX`]; written bytes are synced at each sync or every
//! [`UNSYNCED_BYTES_MAX`], and synced pages are dropped from the page cache (`env::drop_cached`).
//!
//! Crash safety: the archive thread appends a group's bodies, syncs the segment (and the
//! directory when it created the segment), and only then writes the group's locators in its
//! synced LevelDB write. A crash in between leaves bytes no locator names: the next open
//! appends after them (a locator holds an absolute offset, nothing ever scans a segment), so
//! they cost space and nothing else; rearchiving writes those bodies again.
//!
//! Bounded: a segment grows to [`SEGMENT_BYTES`] and the next body starts a new one; a read
//! allocates the length its locator names, which the archive itself wrote (at most a frame's
//! worth of batch); the CRC refuses a damaged record.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tally_core::{Error, Result};

use crate::layout::{corrupt, Table};

/// A segment grows to this size, at most by one body more.
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// Appended bytes held in memory before they are written out (a sync writes them whatever
/// their size).
const UNWRITTEN_BYTES_MAX: usize = 4 << 20;
/// Bytes written out to the active segment before they are synced and dropped from the page
/// cache, at most, whether or not a sync was asked: an archive write group can append hundreds
/// of megabytes, and pages held until its end are fresh pages for every write (see
/// `env::drop_cached`), where pages dropped every few megabytes are taken again at once.
const UNSYNCED_BYTES_MAX: u64 = 16 << 20;
/// The bytes of a record before its body: length, CRC.
const RECORD_HEAD_BYTES: usize = 8;
/// The bytes of an encoded [`Locator`]: magic, segment, offset, length.
pub const LOCATOR_BYTES: usize = 4 + 8 + 8 + 4;
const LOCATOR_MAGIC: [u8; 4] = *b"TLBL";
const SUFFIX: &str = ".bodies";
/// Read handles kept open, at most (then all are closed and reopened as needed): reads are
/// history pages and dumps, an open costs microseconds, and each handle is a descriptor the
/// server keeps back from its connections.
const READ_FILES_MAX: usize = 4;
/// The body log's descriptors open at once, at most: its readers, the active segment and the
/// directory while it is synced.
pub const FILES_OPEN_MAX: usize = READ_FILES_MAX + 2;

/// Where a body is in the body log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Locator {
    pub segment: u64,
    /// Of the record, from the start of the segment.
    pub offset: u64,
    /// Of the body.
    pub len: u32,
}

impl Locator {
    pub fn encode(&self) -> [u8; LOCATOR_BYTES] {
        let mut out = [0; LOCATOR_BYTES];
        out[..4].copy_from_slice(&LOCATOR_MAGIC);
        out[4..12].copy_from_slice(&self.segment.to_le_bytes());
        out[12..20].copy_from_slice(&self.offset.to_le_bytes());
        out[20..].copy_from_slice(&self.len.to_le_bytes());
        out
    }

    /// The locator a row of `table` (`body`, `history`) holds, or None if the row holds its
    /// value itself (written before the body log, or a value that never goes there: every body
    /// and history row is longer than a locator, every other history value shorter).
    pub fn decode(table: Table, value: &[u8]) -> Result<Option<Locator>> {
        if value.len() != LOCATOR_BYTES {
            return Ok(None);
        }
        if value[..4] != LOCATOR_MAGIC {
            return Err(corrupt(table, "a row of a locator's length"));
        }
        Ok(Some(Locator {
            segment: u64::from_le_bytes(value[4..12].try_into().expect("8")),
            offset: u64::from_le_bytes(value[12..20].try_into().expect("8")),
            len: u32::from_le_bytes(value[20..].try_into().expect("4")),
        }))
    }
}

/// The directory of a ledger's body log.
pub fn bodies_dir(ledger: &Path) -> PathBuf {
    ledger.join("bodies")
}

pub(crate) struct BodyLog {
    dir: PathBuf,
    /// The segment appended to, its number and length (counting `unwritten`).
    active: Option<(File, u64, u64)>,
    /// Records appended to the active segment but not yet written to it: a group's history
    /// rows are thousands of small records, one write each would be a system call each.
    unwritten: Vec<u8>,
    /// Whether the active segment was created since the last [`BodyLog::sync`].
    created: bool,
    /// The active segment's length at the last [`BodyLog::sync`].
    synced: u64,
    readers: HashMap<u64, File>,
}

impl BodyLog {
    /// Opens the body log in `dir`, creating the directory if missing. Appends go to the
    /// newest segment, after whatever it holds.
    pub(crate) fn open(dir: &Path) -> Result<BodyLog> {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, "creating", e))?;
        let newest = segments(dir)?.into_iter().max();
        let active = match newest {
            None => None,
            Some(n) => {
                let path = segment_path(dir, n);
                let file = append_handle(&path, false)?;
                let len = file.metadata().map_err(|e| io(&path, "reading", e))?.len();
                Some((file, n, len))
            }
        };
        Ok(BodyLog {
            dir: dir.to_owned(),
            synced: active.as_ref().map_or(0, |a| a.2),
            active,
            unwritten: Vec::new(),
            created: false,
            readers: HashMap::new(),
        })
    }

    /// Appends a body (or a history row); durable after the next [`BodyLog::sync`].
    pub(crate) fn append(&mut self, body: &[u8]) -> Result<Locator> {
        let len = u32::try_from(body.len()).expect("a body is smaller than 4 GiB");
        if self.active.as_ref().is_none_or(|a| a.2 >= SEGMENT_BYTES) {
            self.roll()?;
        }
        let (_, segment, at) = self.active.as_mut().expect("an active segment");
        let locator = Locator {
            segment: *segment,
            offset: *at,
            len,
        };
        self.unwritten.extend_from_slice(&len.to_le_bytes());
        self.unwritten
            .extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
        self.unwritten.extend_from_slice(body);
        *at += (RECORD_HEAD_BYTES + body.len()) as u64;
        if self.unwritten.len() >= UNWRITTEN_BYTES_MAX {
            self.write_out()?;
        }
        Ok(locator)
    }

    /// Writes the records appended since the last call to the active segment.
    fn write_out(&mut self) -> Result<()> {
        if self.unwritten.is_empty() {
            return Ok(());
        }
        let (file, segment, _) = self.active.as_mut().expect("records for an active segment");
        file.write_all(&self.unwritten)
            .map_err(|e| io(&segment_path(&self.dir, *segment), "appending to", e))?;
        self.unwritten.clear();
        self.unwritten.shrink_to(UNWRITTEN_BYTES_MAX);
        let (_, _, len) = self.active.as_ref().expect("written to an active segment");
        if len - self.synced >= UNSYNCED_BYTES_MAX {
            self.sync_written()?;
        }
        Ok(())
    }

    /// Syncs what was written out to the active segment and drops it from the page cache
    /// (written once, rarely read: its pages are not kept).
    fn sync_written(&mut self) -> Result<()> {
        let Some((file, segment, len)) = &self.active else {
            return Ok(());
        };
        debug_assert!(self.unwritten.is_empty(), "only written bytes are synced");
        if *len > self.synced {
            file.sync_data()
                .map_err(|e| io(&segment_path(&self.dir, *segment), "syncing", e))?;
            crate::env::drop_cached(file, self.synced, Some(len - self.synced));
            self.synced = *len;
        }
        Ok(())
    }

    /// Makes every appended record durable: writes them out, syncs the active segment, and the
    /// directory if the segment is new. (A segment is synced before the next one is started.)
    pub(crate) fn sync(&mut self) -> Result<()> {
        self.write_out()?;
        self.sync_written()?;
        if self.created && self.active.is_some() {
            sync_dir(&self.dir)?;
        }
        self.created = false;
        Ok(())
    }

    /// Reads the record at `at`, checking it.
    pub(crate) fn read(&mut self, at: &Locator) -> Result<Vec<u8>> {
        // Nothing reads a record before the write that names it, after a sync; but a record
        // must never be read from a segment that does not hold it yet.
        self.write_out()?;
        if self.readers.len() >= READ_FILES_MAX {
            self.readers.clear();
        }
        let path = segment_path(&self.dir, at.segment);
        let file = match self.readers.entry(at.segment) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(
                crate::env::open_retrying(|| File::open(&path))
                    .map_err(|err| io(&path, "opening", err))?,
            ),
        };
        let mut record = vec![0; RECORD_HEAD_BYTES + at.len as usize];
        file.read_exact_at(&mut record, at.offset)
            .map_err(|e| io(&path, "reading", e))?;
        let len = u32::from_le_bytes(record[..4].try_into().expect("4"));
        let crc = u32::from_le_bytes(record[4..8].try_into().expect("4"));
        let body = record.split_off(RECORD_HEAD_BYTES);
        if len != at.len || crc32c::crc32c(&body) != crc {
            return Err(corrupt(
                Table::Body,
                format_args!(
                    "the body log's record at {}:{} does not check out",
                    at.segment, at.offset
                ),
            ));
        }
        Ok(body)
    }

    /// Starts the next segment (after syncing the active one).
    fn roll(&mut self) -> Result<()> {
        self.sync()?;
        let next = self.active.as_ref().map_or(1, |a| a.1 + 1);
        let file = append_handle(&segment_path(&self.dir, next), true)?;
        self.active = Some((file, next, 0));
        self.synced = 0;
        self.created = true;
        Ok(())
    }
}

fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:016}{SUFFIX}"))
}

/// The numbers of the segments in `dir` (other files are ignored).
fn segments(dir: &Path) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io(dir, "listing", e))? {
        let entry = entry.map_err(|e| io(dir, "listing", e))?;
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(SUFFIX)) else {
            continue;
        };
        if let Ok(n) = stem.parse::<u64>() {
            out.push(n);
        }
    }
    Ok(out)
}

fn append_handle(path: &Path, create: bool) -> Result<File> {
    crate::env::open_retrying(|| {
        OpenOptions::new()
            .append(true)
            .create_new(create)
            .open(path)
    })
    .map_err(|e| io(path, "opening", e))
}

/// Syncs `dir` (a new file's entry in it). Also the sorted runs' (`runs.rs`).
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    crate::env::open_retrying(|| File::open(dir))
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir, "syncing", e))
}

/// An IO error on `path`. Also the sorted runs' (`runs.rs`).
pub(crate) fn io(path: &Path, what: &str, e: std::io::Error) -> Error {
    Error::io(format!("{what} {}", path.display()), e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tally-bodies-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn body(i: u32, len: usize) -> Vec<u8> {
        (0..len)
            .map(|k| (k as u32 ^ i.wrapping_mul(2654435761)) as u8)
            .collect()
    }

    #[test]
    fn bodies_read_back_across_segments_and_reopens() {
        let dir = temp_dir("roundtrip");
        let mut log = BodyLog::open(&dir).unwrap();
        // Bodies of 1 MiB: a segment holds 64 and the 65th starts the next.
        let mut at = Vec::new();
        for i in 0..70 {
            at.push(log.append(&body(i, 1 << 20)).unwrap());
        }
        log.sync().unwrap();
        assert_eq!(at[63].segment, 1);
        assert_eq!((at[64].segment, at[64].offset), (2, 0));
        drop(log);
        let mut log = BodyLog::open(&dir).unwrap();
        let next = log.append(&body(70, 300)).unwrap();
        assert_eq!(next.segment, 2, "appends go on in the newest segment");
        at.push(next);
        for (i, l) in at.iter().enumerate() {
            let len = if i == 70 { 300 } else { 1 << 20 };
            assert_eq!(log.read(l).unwrap(), body(i as u32, len), "body {i}");
            assert_eq!(Locator::decode(Table::Body, &l.encode()).unwrap(), Some(*l));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_damaged_record_or_a_torn_tail_is_refused_and_appends_go_on_after_it() {
        let dir = temp_dir("damage");
        let mut log = BodyLog::open(&dir).unwrap();
        let first = log.append(&body(1, 1000)).unwrap();
        log.sync().unwrap();
        drop(log);
        // A crash mid-append: half a record no locator names.
        let path = segment_path(&dir, 1);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[7; 500]).unwrap();
        drop(f);
        let mut log = BodyLog::open(&dir).unwrap();
        let second = log.append(&body(2, 1000)).unwrap();
        log.sync().unwrap();
        assert_eq!(second.offset, first.offset + 8 + 1000 + 500);
        assert_eq!(log.read(&second).unwrap(), body(2, 1000));
        // One flipped byte in the first body.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xAA], first.offset + 8 + 10).unwrap();
        drop(f);
        let e = log.read(&first).unwrap_err();
        assert!(e.to_string().contains("does not check out"), "{e}");
        // A locator beyond the end, and a body row that is neither body nor locator.
        let beyond = Locator {
            offset: 1 << 30,
            ..second
        };
        assert!(log.read(&beyond).is_err());
        assert!(Locator::decode(Table::Body, &[0; LOCATOR_BYTES]).is_err());
        assert_eq!(
            Locator::decode(Table::Body, &[0; LOCATOR_BYTES + 1]).unwrap(),
            None
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
