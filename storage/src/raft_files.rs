//! The raft log's files: a `meta` file replaced whole, and segment files appended to (see
//! [`crate::RaftLogDb`] for what they hold and when each is written).
//!
//! `meta` (replaced by writing `meta.tmp`, syncing it, renaming it over `meta` and syncing the
//! directory):
//!
//! | bytes | field |
//! |---|---|
//! | 8 | magic `b"TLYRAFT1"` |
//! | 4 | CRC-32C (Castagnoli) of everything after it, u32 LE |
//! | 8 | write sequence number, u64 LE |
//! | 8 | first segment: segments numbered below it are garbage, u64 LE |
//! | 4 + n | snapshot point (`SnapshotPoint::encode`: index, term, descriptor), length-prefixed |
//! | 4 + n | `ConfState` protobuf, length-prefixed |
//! | 1 (+ 4 + n) | 1 and the address book, length-prefixed, or 0 when none was written |
//! | 4 + n | `HardState` protobuf, length-prefixed |
//!
//! A segment, `<number>.seg` (number: 20 decimal digits), is a run of records, one per write:
//!
//! | bytes | field |
//! |---|---|
//! | 4 | payload length, u32 LE |
//! | 4 | CRC-32C of the payload, u32 LE |
//! | 4 | CRC-32C of the 8 bytes before, u32 LE |
//! | 8 | payload: write sequence number, u64 LE |
//! | 4 | payload: entry count, u32 LE |
//! | 24 + n each | payload: entry index u64 LE ‖ term u64 LE ‖ length u32 LE ‖ CRC-32C of the entry u32 LE ‖ `Entry` protobuf |
//! | rest | payload: `HardState` protobuf |
//!
//! Length prefixes are u32 LE. Sequence numbers grow by one with every write (record or meta),
//! so that the newest hard state is the one with the highest number wherever it is.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use raft::eraftpb::{ConfState, Entry, HardState};
use tally_core::{Error, Result};

use crate::env::SyncStats;
use crate::layout::{corrupt, SnapshotPoint, Table};

const META_MAGIC: &[u8; 8] = b"TLYRAFT1";
pub(crate) const META_FILE: &str = "meta";
const META_TMP_FILE: &str = "meta.tmp";
const SEGMENT_SUFFIX: &str = ".seg";
/// Record header: payload length, payload CRC, and the CRC of those two.
pub(crate) const RECORD_HEADER_BYTES: usize = 12;
/// Entry header inside a payload: index, term, length, CRC.
const ENTRY_HEADER_BYTES: usize = 24;

/// What `meta` holds.
#[derive(Debug, Clone, Default)]
pub(crate) struct Meta {
    pub seq: u64,
    pub first_segment: u64,
    pub snapshot: SnapshotPoint,
    pub conf_state: ConfState,
    pub address_book: Option<Vec<u8>>,
    pub hard_state: HardState,
}

/// Where one entry's protobuf lies, and its term (so that opening decodes no entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Locator {
    pub segment: u64,
    pub offset: u64,
    pub len: u32,
    pub crc: u32,
    pub term: u64,
}

/// One record as read back: its sequence number, entries and hard state.
pub(crate) struct Record {
    pub seq: u64,
    /// Index and locator of each entry, in order.
    pub entries: Vec<(u64, Locator)>,
    pub hard_state: HardState,
}

pub(crate) fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:020}{SEGMENT_SUFFIX}"))
}

/// The segment numbers in `dir`, ascending.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    for item in fs::read_dir(dir).map_err(|e| fs_error("listing", dir, e))? {
        let item = item.map_err(|e| fs_error("listing", dir, e))?;
        let name = item.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(SEGMENT_SUFFIX)) else {
            continue;
        };
        if stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()) {
            out.push(
                stem.parse()
                    .expect("20 digits fit a u64 up to its maximum's length"),
            );
        }
    }
    out.sort_unstable();
    Ok(out)
}

pub(crate) fn encode_meta(m: &Meta) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&m.seq.to_le_bytes());
    body.extend_from_slice(&m.first_segment.to_le_bytes());
    put_prefixed(&mut body, &m.snapshot.encode());
    put_prefixed(&mut body, &encode_proto(&m.conf_state));
    match &m.address_book {
        None => body.push(0),
        Some(book) => {
            body.push(1);
            put_prefixed(&mut body, book);
        }
    }
    put_prefixed(&mut body, &encode_proto(&m.hard_state));
    let mut out = Vec::with_capacity(12 + body.len());
    out.extend_from_slice(META_MAGIC);
    out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

pub(crate) fn decode_meta(bytes: &[u8]) -> Result<Meta> {
    let bad = |what: &str| corrupt(Table::RaftState, format_args!("raft log meta: {what}"));
    if bytes.len() < 12 || &bytes[..8] != META_MAGIC {
        return Err(bad("no magic"));
    }
    let body = &bytes[12..];
    if crc32c::crc32c(body).to_le_bytes() != bytes[8..12] {
        return Err(bad("checksum mismatch"));
    }
    let mut r = Reader { bytes: body };
    let seq = r.u64().ok_or_else(|| bad("short"))?;
    let first_segment = r.u64().ok_or_else(|| bad("short"))?;
    let snapshot = SnapshotPoint::decode(r.prefixed().ok_or_else(|| bad("short"))?)?;
    let conf_state = decode_proto(
        Table::RaftState,
        "conf state",
        r.prefixed().ok_or_else(|| bad("short"))?,
    )?;
    let address_book = match r.take(1).ok_or_else(|| bad("short"))?[0] {
        0 => None,
        1 => Some(r.prefixed().ok_or_else(|| bad("short"))?.to_vec()),
        _ => return Err(bad("bad address book flag")),
    };
    let hard_state = decode_proto(
        Table::RaftState,
        "hard state",
        r.prefixed().ok_or_else(|| bad("short"))?,
    )?;
    if !r.bytes.is_empty() {
        return Err(bad("trailing bytes"));
    }
    Ok(Meta {
        seq,
        first_segment,
        snapshot,
        conf_state,
        address_book,
        hard_state,
    })
}

/// `meta` in `dir`, if there is one. A `meta.tmp` left by a crash is removed.
pub(crate) fn read_meta(dir: &Path) -> Result<Option<Meta>> {
    let tmp = dir.join(META_TMP_FILE);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(fs_error("removing", &tmp, e)),
    }
    let path = dir.join(META_FILE);
    match fs::read(&path) {
        Ok(bytes) => decode_meta(&bytes).map(Some),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(fs_error("reading", &path, e)),
    }
}

/// Replaces `meta` in `dir` atomically and durably.
pub(crate) fn write_meta(dir: &Path, meta: &Meta, stats: &SyncStats) -> Result<()> {
    let tmp = dir.join(META_TMP_FILE);
    let mut f = File::create(&tmp).map_err(|e| fs_error("creating", &tmp, e))?;
    f.write_all(&encode_meta(meta))
        .and_then(|()| f.sync_all())
        .map_err(|e| fs_error("writing", &tmp, e))?;
    stats.count_file_sync();
    let path = dir.join(META_FILE);
    fs::rename(&tmp, &path).map_err(|e| fs_error("renaming over", &path, e))?;
    sync_dir(dir, stats)
}

/// Encodes one record into `out` (cleared first); returns each entry's offset in `out`, length
/// and CRC.
pub(crate) fn encode_record(
    seq: u64,
    entries: &[Entry],
    hard_state: &HardState,
    out: &mut Vec<u8>,
) -> Vec<(u64, u32, u32)> {
    out.clear();
    out.extend_from_slice(&[0; RECORD_HEADER_BYTES]);
    out.extend_from_slice(&seq.to_le_bytes());
    let count = u32::try_from(entries.len()).expect("fewer than 2^32 entries per write");
    out.extend_from_slice(&count.to_le_bytes());
    let mut at = Vec::with_capacity(entries.len());
    for e in entries {
        let start = out.len();
        out.extend_from_slice(&[0; ENTRY_HEADER_BYTES]);
        protobuf::Message::write_to_vec(e, out)
            .expect("raft's protobuf messages have no required fields");
        let len = u32::try_from(out.len() - start - ENTRY_HEADER_BYTES)
            .expect("an entry is smaller than 4 GiB");
        let crc = crc32c::crc32c(&out[start + ENTRY_HEADER_BYTES..]);
        let header = &mut out[start..start + ENTRY_HEADER_BYTES];
        header[..8].copy_from_slice(&e.index.to_le_bytes());
        header[8..16].copy_from_slice(&e.term.to_le_bytes());
        header[16..20].copy_from_slice(&len.to_le_bytes());
        header[20..].copy_from_slice(&crc.to_le_bytes());
        at.push(((start + ENTRY_HEADER_BYTES) as u64, len, crc));
    }
    out.extend_from_slice(&encode_proto(hard_state));
    let payload_len =
        u32::try_from(out.len() - RECORD_HEADER_BYTES).expect("a record is smaller than 4 GiB");
    let crc = crc32c::crc32c(&out[RECORD_HEADER_BYTES..]);
    out[..4].copy_from_slice(&payload_len.to_le_bytes());
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    let header_crc = crc32c::crc32c(&out[..8]);
    out[8..12].copy_from_slice(&header_crc.to_le_bytes());
    at
}

/// How reading a segment ended.
pub(crate) enum SegmentEnd {
    /// Every byte belongs to a whole record.
    Clean,
    /// From this offset to the end is what an interrupted append leaves (see `read_records`).
    Torn(u64),
}

/// Reads the records of segment `number` (its bytes `bytes`) in order, handing each to `each`.
///
/// What an append cut short by a crash can leave at the end, and is reported as
/// [`SegmentEnd::Torn`]: fewer bytes than a header; a header that fails its CRC followed only by
/// zeros (the file grew, its data never reached the disk); a whole header whose payload runs
/// past the end; or a last record that fails its CRC. Anything else that fails a CRC (a record
/// with bytes after it, a damaged header with data after it), or a record whose CRC matches
/// but which does not decode, is corruption.
pub(crate) fn read_records(
    number: u64,
    bytes: &[u8],
    mut each: impl FnMut(Record) -> Result<()>,
) -> Result<SegmentEnd> {
    let bad = |at: usize, what: &str| {
        corrupt(
            Table::RaftEntry,
            format_args!("segment {number}: the record at byte {at} {what}"),
        )
    };
    let mut at = 0usize;
    while at < bytes.len() {
        let Some(header) = bytes.get(at..at + RECORD_HEADER_BYTES) else {
            return Ok(SegmentEnd::Torn(at as u64));
        };
        if crc32c::crc32c(&header[..8]).to_le_bytes() != header[8..] {
            if bytes[at..].iter().all(|&b| b == 0) {
                return Ok(SegmentEnd::Torn(at as u64));
            }
            return Err(bad(at, "has a damaged header"));
        }
        let len = u32::from_le_bytes(header[..4].try_into().expect("4")) as usize;
        let crc = u32::from_le_bytes(header[4..8].try_into().expect("4"));
        let start = at + RECORD_HEADER_BYTES;
        let end = start.saturating_add(len);
        let Some(payload) = bytes.get(start..end) else {
            return Ok(SegmentEnd::Torn(at as u64));
        };
        if crc32c::crc32c(payload) != crc {
            if end == bytes.len() {
                return Ok(SegmentEnd::Torn(at as u64));
            }
            return Err(bad(at, "fails its checksum"));
        }
        each(decode_payload(number, start as u64, payload)?)?;
        at = end;
    }
    Ok(SegmentEnd::Clean)
}

fn decode_payload(segment: u64, base: u64, payload: &[u8]) -> Result<Record> {
    let bad = |what: &str| {
        corrupt(
            Table::RaftEntry,
            format_args!(
                "segment {segment}, record at {}: {what}",
                base - RECORD_HEADER_BYTES as u64
            ),
        )
    };
    let mut r = Reader { bytes: payload };
    let seq = r.u64().ok_or_else(|| bad("short"))?;
    let count = r.u32().ok_or_else(|| bad("short"))?;
    let mut entries = Vec::with_capacity(count.min(1 << 16) as usize);
    for _ in 0..count {
        let index = r.u64().ok_or_else(|| bad("short entry header"))?;
        let term = r.u64().ok_or_else(|| bad("short entry header"))?;
        let len = r.u32().ok_or_else(|| bad("short entry header"))?;
        let crc = r.u32().ok_or_else(|| bad("short entry header"))?;
        let offset = base + (payload.len() - r.bytes.len()) as u64;
        r.take(len as usize).ok_or_else(|| bad("short entry"))?;
        let locator = Locator {
            segment,
            offset,
            len,
            crc,
            term,
        };
        entries.push((index, locator));
    }
    let hard_state = decode_proto(Table::RaftEntry, "hard state", r.bytes)?;
    Ok(Record {
        seq,
        entries,
        hard_state,
    })
}

/// Reads the entry at `locator` from `file` (its segment) and checks its CRC and index.
pub(crate) fn read_entry(file: &File, index: u64, locator: &Locator) -> Result<Entry> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0; locator.len as usize];
    file.read_exact_at(&mut buf, locator.offset).map_err(|e| {
        Error::io(
            format_args!(
                "reading raft entry {index} from segment {}",
                locator.segment
            ),
            e,
        )
    })?;
    if crc32c::crc32c(&buf) != locator.crc {
        return Err(corrupt(
            Table::RaftEntry,
            format_args!(
                "entry {index} in segment {} fails its checksum",
                locator.segment
            ),
        ));
    }
    let entry: Entry = decode_proto(Table::RaftEntry, format_args!("entry {index}"), &buf)?;
    if entry.index != index || entry.term != locator.term {
        return Err(corrupt(
            Table::RaftEntry,
            format_args!(
                "entry {index} (term {}) holds entry {} of term {}",
                locator.term, entry.index, entry.term
            ),
        ));
    }
    Ok(entry)
}

/// Creates segment `number` in `dir`, empty, durably; returns it open for appending.
pub(crate) fn create_segment(dir: &Path, number: u64, stats: &SyncStats) -> Result<File> {
    let path = segment_path(dir, number);
    let f = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .map_err(|e| fs_error("creating", &path, e))?;
    sync_dir(dir, stats)?;
    Ok(f)
}

/// Opens segment `number` for appending, cut to `len` bytes first if it is longer (a torn write).
pub(crate) fn open_segment(dir: &Path, number: u64, len: u64, stats: &SyncStats) -> Result<File> {
    let path = segment_path(dir, number);
    let f = OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(|e| fs_error("opening", &path, e))?;
    let on_disk = f
        .metadata()
        .map_err(|e| fs_error("inspecting", &path, e))?
        .len();
    if on_disk != len {
        f.set_len(len)
            .and_then(|()| f.sync_all())
            .map_err(|e| fs_error("cutting the torn tail of", &path, e))?;
        stats.count_file_sync();
    }
    Ok(f)
}

/// Removes the segments in `numbers`, then syncs the directory.
pub(crate) fn remove_segments(dir: &Path, numbers: &[u64], stats: &SyncStats) -> Result<()> {
    if numbers.is_empty() {
        return Ok(());
    }
    for &n in numbers {
        let path = segment_path(dir, n);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(fs_error("removing", &path, e)),
        }
    }
    sync_dir(dir, stats)
}

pub(crate) fn sync_dir(dir: &Path, stats: &SyncStats) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| fs_error("syncing directory", dir, e))?;
    stats.count_dir_sync();
    Ok(())
}

pub(crate) fn decode_proto<M: protobuf::Message>(
    table: Table,
    what: impl std::fmt::Display,
    value: &[u8],
) -> Result<M> {
    M::parse_from_bytes(value).map_err(|e| corrupt(table, format_args!("{what}: {e}")))
}

pub(crate) fn encode_proto<M: protobuf::Message>(m: &M) -> Vec<u8> {
    m.write_to_bytes()
        .expect("raft's protobuf messages have no required fields")
}

pub(crate) fn fs_error(what: &str, path: &Path, e: io::Error) -> Error {
    Error::io(format_args!("{what} {}", path.display()), e)
}

fn put_prefixed(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u32::try_from(bytes.len()).expect("a meta field is smaller than 4 GiB");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.bytes.len() < n {
            return None;
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }

    fn prefixed(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            data: data.to_vec().into(),
            ..Entry::default()
        }
    }

    #[test]
    fn meta_round_trips_and_a_flipped_bit_is_caught() {
        let mut m = Meta {
            seq: 7,
            first_segment: 3,
            address_book: Some(b"book".to_vec()),
            ..Meta::default()
        };
        m.snapshot.index = 10;
        m.snapshot.descriptor = b"desc".to_vec();
        m.hard_state.commit = 12;
        m.conf_state.voters = vec![1, 2, 3];
        let bytes = encode_meta(&m);
        let back = decode_meta(&bytes).unwrap();
        assert_eq!(encode_meta(&back), bytes);
        assert_eq!(back.conf_state.voters, vec![1, 2, 3]);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(
                decode_meta(&bad).is_err(),
                "flipped byte {i} went unnoticed"
            );
        }
    }

    #[test]
    fn records_read_back_and_a_cut_record_is_a_torn_tail() {
        let mut seg = Vec::new();
        let mut buf = Vec::new();
        let hs = HardState {
            commit: 1,
            ..HardState::default()
        };
        let at = encode_record(1, &[entry(1, 1, b"a"), entry(2, 1, b"bb")], &hs, &mut buf);
        assert_eq!(at.len(), 2);
        seg.extend_from_slice(&buf);
        let first_len = seg.len();
        encode_record(2, &[], &hs, &mut buf);
        seg.extend_from_slice(&buf);
        let mut seen = Vec::new();
        let end = read_records(5, &seg, |r| {
            seen.push((r.seq, r.entries.iter().map(|(i, _)| *i).collect::<Vec<_>>()));
            Ok(())
        })
        .unwrap();
        assert!(matches!(end, SegmentEnd::Clean));
        assert_eq!(seen, vec![(1, vec![1, 2]), (2, vec![])]);
        for cut in first_len + 1..seg.len() {
            let mut n = 0;
            let end = read_records(5, &seg[..cut], |_| {
                n += 1;
                Ok(())
            })
            .unwrap();
            assert_eq!(n, 1);
            assert!(matches!(end, SegmentEnd::Torn(at) if at == first_len as u64));
        }
        // A bad byte in the last record is a torn write; with a record after it, corruption.
        let mut last_bad = seg.clone();
        *last_bad.last_mut().unwrap() ^= 1;
        let end = read_records(5, &last_bad, |_| Ok(())).unwrap();
        assert!(matches!(end, SegmentEnd::Torn(at) if at == first_len as u64));
        let mut first_bad = seg.clone();
        first_bad[first_len - 1] ^= 1;
        let err = read_records(5, &first_bad, |_| Ok(())).err().unwrap();
        assert!(err.to_string().contains("raft_entry"), "{err}");
        // A damaged length: corruption, unless only zeros follow (the file grew, no data).
        let mut len_bad = seg.clone();
        len_bad[first_len + 1] ^= 1;
        assert!(read_records(5, &len_bad, |_| Ok(())).is_err());
        let mut zeros = seg[..first_len].to_vec();
        zeros.resize(first_len + 100, 0);
        let end = read_records(5, &zeros, |_| Ok(())).unwrap();
        assert!(matches!(end, SegmentEnd::Torn(at) if at == first_len as u64));
    }
}
