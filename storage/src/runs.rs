//! Sorted runs: the `request` and `receipt` tables of the archive, kept out of LevelDB.
//!
//! Why: these are one row per request (one per operation of an envelope), with random keys,
//! written once and read rarely (a retried request's id, a receipt asked for by its hash). In
//! LevelDB each paid a memtable insert, a memtable flush and a rewrite at every merge: with
//! envelopes they were ~95% of the archive database's rows, and without them the archive
//! thread stopped pacing the pipeline (envelopes 120k -> 144-148k transfers/s, p99 1.1-2.0 s
//! -> 0.38 s, in a throwaway build that dropped them). Here each archive write group writes
//! its rows of one table as one sorted file, and runs of a size are merged in bulk.
//!
//! Layout: `<ledger>/runs/<seq, 16 digits>.run`, one table per file:
//! - blocks of up to [`BLOCK_ENTRIES`] entries (`key ‖ value`, fixed lengths per table, in
//!   ascending key order, no key twice), each followed by its `crc32c u32 LE`;
//! - the fences: the first key of each block, concatenated;
//! - the filter: a blocked Bloom filter of 64-byte blocks (u64 LE words), one block per
//!   [`FILTER_KEYS_PER_BLOCK`] entries (at least one); a key sets [`FILTER_PROBES`] bits of the
//!   one block its SipHash-1-3 (keyed by the footer) picks;
//! - the footer ([`FOOTER_BYTES`]): `TLRN` ‖ key length u32 LE ‖ value length u32 LE ‖ entries
//!   u64 LE ‖ crc32c(fences) u32 LE ‖ filter key (two u64 LE) ‖ crc32c(filter) u32 LE ‖
//!   crc32c(the footer's bytes before) u32 LE.
//!
//! Which runs count is recorded in the archive database (`layout::runs_key`), in the same synced
//! write as the archive point: a run file is synced (and its directory) before the write that
//! names it, and a file no record names (a crash between the two, or a merge's inputs after the
//! merge was recorded) is deleted at the next open. Newer runs win over older ones for a key.
//!
//! Bounded: the fences (one key per [`BLOCK_ENTRIES`] entries) and the filters (one byte per
//! entry) are held in memory, ~1.2 bytes per row; a read asks each run's filter, newest first,
//! and reads one block of a run whose filter says "maybe" (~2% of the absent keys); merges keep
//! at most [`RUNS_MAX`] runs per table.

use std::fs::File;
use std::hash::Hasher;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use siphasher::sip::SipHasher13;
use tally_core::{Error, Result};

use crate::bodies::{io, sync_dir};
use crate::layout::{corrupt, Table};

/// Entries per block: what a read of a present key reads (~24 KiB of request rows).
pub const BLOCK_ENTRIES: usize = 256;
/// The bytes of a run's footer.
pub const FOOTER_BYTES: usize = 48;
/// Entries per 64-byte filter block: 8 bits per entry.
pub const FILTER_KEYS_PER_BLOCK: u64 = 64;
/// Bits a key sets in its filter block (a false positive rate of ~2% at 8 bits per entry).
pub const FILTER_PROBES: usize = 6;
const MAGIC: [u8; 4] = *b"TLRN";
/// Runs merged at once.
const FANOUT: usize = 4;
/// The runs' descriptors open at once, at most: a merge's inputs, its output and the directory
/// while it is synced (a read opens one file, never during a merge: both run on the archive
/// thread).
pub const FILES_OPEN_MAX: usize = FANOUT + 2;
/// A merge of the newest runs of one size goes on while its inputs total at most this.
const MERGE_BYTES_MAX: u64 = 256 << 20;
/// Runs per table, at most: past it the adjacent runs that total the fewest bytes are merged,
/// whatever their size.
pub const RUNS_MAX: usize = 32;
/// Bytes written to a run before they are synced and dropped from the page cache (see
/// `env::drop_cached`).
const UNSYNCED_BYTES_MAX: u64 = 16 << 20;

/// The directory of a ledger's runs.
pub fn runs_dir(ledger: &Path) -> PathBuf {
    ledger.join("runs")
}

/// One table's runs: the request index or the receipt index.
pub(crate) struct Runs {
    dir: PathBuf,
    table: Table,
    key_len: usize,
    value_len: usize,
    /// Oldest first.
    runs: Vec<Run>,
}

/// A run on disk, described by its footer, fences and filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Run {
    seq: u64,
    entries: u64,
    fences: Vec<u8>,
    filter: Filter,
}

/// A run's blocked Bloom filter: false only for a key the run does not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Filter {
    key: (u64, u64),
    /// Eight words per block.
    words: Vec<u64>,
}

impl Filter {
    fn blocks(entries: u64) -> u64 {
        entries.div_ceil(FILTER_KEYS_PER_BLOCK).max(1)
    }

    fn hash(key: (u64, u64), entry_key: &[u8]) -> u64 {
        let mut h = SipHasher13::new_with_keys(key.0, key.1);
        h.write(entry_key);
        h.finish()
    }

    /// The word and bit of each probe of the key hashed to `h`, in a filter of `blocks`.
    fn probes(h: u64, blocks: u64) -> [(usize, u64); FILTER_PROBES] {
        let block = ((u128::from(h) * u128::from(blocks)) >> 64) as usize;
        let mixed = h.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        std::array::from_fn(|i| {
            let bit = (mixed >> (9 * i)) & 511;
            (block * 8 + (bit / 64) as usize, 1 << (bit % 64))
        })
    }

    fn build(key: (u64, u64), hashes: &[u64]) -> Filter {
        let blocks = Filter::blocks(hashes.len() as u64);
        let mut words = vec![0u64; blocks as usize * 8];
        for &h in hashes {
            for (word, bit) in Filter::probes(h, blocks) {
                words[word] |= bit;
            }
        }
        Filter { key, words }
    }

    fn may_contain(&self, entry_key: &[u8]) -> bool {
        let blocks = self.words.len() as u64 / 8;
        Filter::probes(Filter::hash(self.key, entry_key), blocks)
            .iter()
            .all(|&(word, bit)| self.words[word] & bit != 0)
    }

    fn encode(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }
}

impl Runs {
    /// Opens `table`'s runs `listed` (as the archive database records them, oldest first).
    pub(crate) fn open(
        dir: &Path,
        table: Table,
        (key_len, value_len): (usize, usize),
        listed: &[u64],
    ) -> Result<Runs> {
        let mut runs = Runs {
            dir: dir.to_owned(),
            table,
            key_len,
            value_len,
            runs: Vec::new(),
        };
        for &seq in listed {
            let run = runs.read_footer(seq)?;
            runs.runs.push(run);
        }
        Ok(runs)
    }

    /// The sequence numbers of the runs, oldest first (what the archive database records).
    pub(crate) fn listed(&self) -> Vec<u64> {
        self.runs.iter().map(|r| r.seq).collect()
    }

    fn entry_len(&self) -> usize {
        self.key_len + self.value_len
    }

    fn run_bytes(&self, run: &Run) -> u64 {
        let blocks = run.fences.len() / self.key_len;
        let filter = run.filter.words.len() * 8;
        run.entries * self.entry_len() as u64
            + (blocks * (4 + self.key_len) + filter + FOOTER_BYTES) as u64
    }

    fn path(&self, seq: u64) -> PathBuf {
        run_path(&self.dir, seq)
    }

    fn bad(&self, seq: u64, why: &str) -> Error {
        corrupt(self.table, format_args!("run {seq}: {why}"))
    }

    fn read_footer(&self, seq: u64) -> Result<Run> {
        let path = self.path(seq);
        let file =
            crate::env::open_retrying(|| File::open(&path)).map_err(|e| io(&path, "opening", e))?;
        let len = file.metadata().map_err(|e| io(&path, "reading", e))?.len();
        let bad = |why| self.bad(seq, why);
        let footer_at = len
            .checked_sub(FOOTER_BYTES as u64)
            .ok_or_else(|| bad("shorter than its footer"))?;
        let mut footer = [0u8; FOOTER_BYTES];
        file.read_exact_at(&mut footer, footer_at)
            .map_err(|e| io(&path, "reading", e))?;
        let u32_at = |at: usize| u32::from_le_bytes(footer[at..at + 4].try_into().expect("4"));
        let u64_at = |at: usize| u64::from_le_bytes(footer[at..at + 8].try_into().expect("8"));
        if footer[..4] != MAGIC || crc32c::crc32c(&footer[..44]) != u32_at(44) {
            return Err(bad("its footer does not check out"));
        }
        if (u32_at(4) as usize, u32_at(8) as usize) != (self.key_len, self.value_len) {
            return Err(bad("entries of another table's lengths"));
        }
        let entries = u64_at(12);
        let blocks = entries.div_ceil(BLOCK_ENTRIES as u64);
        let fences_len = blocks * self.key_len as u64;
        let filter_len = Filter::blocks(entries) * 64;
        let want = entries
            .checked_mul(self.entry_len() as u64)
            .and_then(|n| n.checked_add(blocks * 4 + fences_len + filter_len));
        if want != Some(footer_at) {
            return Err(bad("its length is not what its footer says"));
        }
        let mut tail = vec![0u8; (fences_len + filter_len) as usize];
        file.read_exact_at(&mut tail, footer_at - fences_len - filter_len)
            .map_err(|e| io(&path, "reading", e))?;
        let filter = tail.split_off(fences_len as usize);
        if crc32c::crc32c(&tail) != u32_at(20) || crc32c::crc32c(&filter) != u32_at(40) {
            return Err(bad("its fences or its filter do not check out"));
        }
        let words = filter
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().expect("8")))
            .collect();
        Ok(Run {
            seq,
            entries,
            fences: tail,
            filter: Filter {
                key: (u64_at(24), u64_at(32)),
                words,
            },
        })
    }

    /// The value of `key`, newest run first.
    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if key.len() != self.key_len {
            return Ok(None);
        }
        for run in self.runs.iter().rev() {
            if let Some(v) = self.get_in(run, key)? {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }

    fn get_in(&self, run: &Run, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if !run.filter.may_contain(key) {
            return Ok(None);
        }
        let fence = |i: usize| &run.fences[i * self.key_len..(i + 1) * self.key_len];
        let blocks = run.fences.len() / self.key_len;
        // The last block whose first key is at or below `key`.
        let (mut low, mut high) = (0, blocks);
        while low < high {
            let mid = low + (high - low) / 2;
            if fence(mid) <= key {
                low = mid + 1;
            } else {
                high = mid;
            }
        }
        if low == 0 {
            return Ok(None);
        }
        let block = self.read_block(run, low - 1)?;
        let (n, k) = (self.entry_len(), self.key_len);
        let (mut low, mut high) = (0, block.len() / n);
        while low < high {
            let mid = low + (high - low) / 2;
            match block[mid * n..mid * n + k].cmp(key) {
                std::cmp::Ordering::Less => low = mid + 1,
                std::cmp::Ordering::Greater => high = mid,
                std::cmp::Ordering::Equal => {
                    return Ok(Some(block[mid * n + k..(mid + 1) * n].to_vec()))
                }
            }
        }
        Ok(None)
    }

    fn read_block(&self, run: &Run, index: usize) -> Result<Vec<u8>> {
        let n = self.entry_len();
        let first = (index * BLOCK_ENTRIES) as u64;
        let count = (run.entries - first).min(BLOCK_ENTRIES as u64) as usize;
        let at = first * n as u64 + index as u64 * 4;
        let path = self.path(run.seq);
        let file =
            crate::env::open_retrying(|| File::open(&path)).map_err(|e| io(&path, "opening", e))?;
        let mut block = vec![0u8; count * n + 4];
        file.read_exact_at(&mut block, at)
            .map_err(|e| io(&path, "reading", e))?;
        let crc = block.split_off(count * n);
        if crc32c::crc32c(&block) != u32::from_le_bytes(crc[..].try_into().expect("4")) {
            return Err(self.bad(run.seq, "a block does not check out"));
        }
        Ok(block)
    }

    /// Writes `entries` (concatenated `key ‖ value`, any order; of one key the later wins) as
    /// run `seq`, synced with its directory entry. It counts once [`Runs::add`] is called, after
    /// the archive database records it.
    pub(crate) fn write(&self, seq: u64, entries: &[u8]) -> Result<Run> {
        let n = self.entry_len();
        assert_eq!(entries.len() % n, 0, "whole entries");
        let key = |i: usize| &entries[i * n..i * n + self.key_len];
        let mut order: Vec<usize> = (0..entries.len() / n).collect();
        order.sort_by(|&a, &b| key(a).cmp(key(b)));
        // Of equal keys (stable: in arrival order) the last one.
        let mut kept = Vec::with_capacity(order.len());
        for (at, &i) in order.iter().enumerate() {
            if order.get(at + 1).is_none_or(|&next| key(next) != key(i)) {
                kept.push(i);
            }
        }
        let mut out = RunWriter::create(&self.dir, seq, (self.key_len, self.value_len))?;
        for i in kept {
            out.push(&entries[i * n..(i + 1) * n])?;
        }
        out.finish()
    }

    /// Counts `run` (written by [`Runs::write`]) as the newest.
    pub(crate) fn add(&mut self, run: Run) {
        self.runs.push(run);
    }

    /// The adjacent runs a merge should take now, if any: the newest [`FANOUT`] when they are of
    /// one size class and small, or, past [`RUNS_MAX`], the adjacent [`FANOUT`] totaling the
    /// fewest bytes. Indexes into the runs, oldest first.
    pub(crate) fn merge_due(&self) -> Option<std::ops::Range<usize>> {
        let len = self.runs.len();
        if len < FANOUT {
            return None;
        }
        let class = |r: &Run| (r.entries.max(1)).ilog2() / 2;
        let newest = &self.runs[len - FANOUT..];
        let total: u64 = newest.iter().map(|r| self.run_bytes(r)).sum();
        if newest.iter().all(|r| class(r) == class(&newest[0])) && total <= MERGE_BYTES_MAX {
            return Some(len - FANOUT..len);
        }
        if len <= RUNS_MAX {
            return None;
        }
        (0..=len - FANOUT)
            .min_by_key(|&i| {
                self.runs[i..i + FANOUT]
                    .iter()
                    .map(|r| self.run_bytes(r))
                    .sum::<u64>()
            })
            .map(|i| i..i + FANOUT)
    }

    /// Merges the runs at `range` into run `seq` (synced), newer entries winning. The runs
    /// are unchanged until [`Runs::replace`].
    pub(crate) fn merge(&self, range: std::ops::Range<usize>, seq: u64) -> Result<Run> {
        let inputs: Vec<u64> = self.runs[range].iter().map(|r| r.seq).collect();
        let mut out = RunWriter::create(&self.dir, seq, (self.key_len, self.value_len))?;
        let mut merged = self.merged(&inputs)?;
        while let Some(entry) = merged.next()? {
            out.push(&entry)?;
        }
        out.finish()
    }

    /// Every entry of every run in key order (`key ‖ value`), of one key the newest run's.
    pub(crate) fn entries(&self) -> Result<Merged> {
        self.merged(&self.listed())
    }

    /// The runs `inputs` (oldest first) as one stream.
    fn merged(&self, inputs: &[u64]) -> Result<Merged> {
        let mut readers = inputs
            .iter()
            .map(|&seq| self.reader(seq))
            .collect::<Result<Vec<_>>>()?;
        let heads = readers
            .iter_mut()
            .map(|r| r.next())
            .collect::<Result<_>>()?;
        Ok(Merged {
            readers,
            heads,
            key_len: self.key_len,
        })
    }

    /// The run numbers once the runs at `range` are replaced with run `seq`.
    pub(crate) fn listed_after(&self, range: std::ops::Range<usize>, seq: u64) -> Vec<u64> {
        let mut seqs = self.listed();
        seqs.splice(range, [seq]);
        seqs
    }

    /// Replaces the runs at `range` with `run` (a merge's, after the archive database records
    /// it); returns the replaced runs' numbers, whose files the caller deletes.
    pub(crate) fn replace(&mut self, range: std::ops::Range<usize>, run: Run) -> Vec<u64> {
        self.runs.splice(range, [run]).map(|r| r.seq).collect()
    }

    /// Deletes the files of runs no longer counted (after the record that dropped them).
    pub(crate) fn delete(&self, seqs: &[u64]) -> Result<()> {
        for &seq in seqs {
            let path = self.path(seq);
            std::fs::remove_file(&path).map_err(|e| io(&path, "deleting", e))?;
        }
        Ok(())
    }

    fn reader(&self, seq: u64) -> Result<RunReader> {
        let run = self
            .runs
            .iter()
            .find(|r| r.seq == seq)
            .expect("a listed run");
        let path = self.path(seq);
        let file =
            crate::env::open_retrying(|| File::open(&path)).map_err(|e| io(&path, "opening", e))?;
        Ok(RunReader {
            file: BufReader::with_capacity(1 << 20, file),
            entry_len: self.entry_len(),
            left: run.entries,
            block: Vec::new(),
            at: 0,
            table: self.table,
            seq,
        })
    }
}

/// Runs read as one stream in key order; of one key, the newest run's entry.
pub(crate) struct Merged {
    /// Oldest first.
    readers: Vec<RunReader>,
    heads: Vec<Option<Vec<u8>>>,
    key_len: usize,
}

impl Merged {
    /// The next entry (`key ‖ value`).
    pub(crate) fn next(&mut self) -> Result<Option<Vec<u8>>> {
        let k = self.key_len;
        // The smallest key; of equal keys the newest input (the highest index).
        let mut best: Option<usize> = None;
        for (i, h) in self.heads.iter().enumerate() {
            let Some(h) = h else { continue };
            if best.is_none_or(|b| h[..k] <= self.heads[b].as_ref().expect("a head")[..k]) {
                best = Some(i);
            }
        }
        let Some(b) = best else { return Ok(None) };
        let entry = self.heads[b].take().expect("a head");
        for (i, h) in self.heads.iter_mut().enumerate() {
            if i == b || h.as_ref().is_some_and(|h| h[..k] == entry[..k]) {
                *h = self.readers[i].next()?;
            }
        }
        Ok(Some(entry))
    }
}

/// Reads a run's entries in order, checking each block.
struct RunReader {
    file: BufReader<File>,
    entry_len: usize,
    /// Entries not yet read into `block`.
    left: u64,
    block: Vec<u8>,
    at: usize,
    table: Table,
    seq: u64,
}

impl RunReader {
    fn next(&mut self) -> Result<Option<Vec<u8>>> {
        if self.at == self.block.len() {
            if self.left == 0 {
                return Ok(None);
            }
            let count = self.left.min(BLOCK_ENTRIES as u64) as usize;
            self.block.resize(count * self.entry_len + 4, 0);
            let read = self.file.read_exact(&mut self.block);
            read.map_err(|e| Error::io(format_args!("reading run {}", self.seq), e))?;
            let crc = self.block.split_off(count * self.entry_len);
            if crc32c::crc32c(&self.block) != u32::from_le_bytes(crc[..].try_into().expect("4")) {
                let why = format_args!("run {}: a block does not check out", self.seq);
                return Err(corrupt(self.table, why));
            }
            self.left -= count as u64;
            self.at = 0;
        }
        let entry = self.block[self.at..self.at + self.entry_len].to_vec();
        self.at += self.entry_len;
        Ok(Some(entry))
    }
}

/// Writes one run: blocks as entries come, then fences and footer; synced.
struct RunWriter {
    seq: u64,
    path: PathBuf,
    dir: PathBuf,
    file: BufWriter<File>,
    key_len: usize,
    value_len: usize,
    entries: u64,
    block: Vec<u8>,
    fences: Vec<u8>,
    /// The filter's key and each entry's hash under it.
    filter_key: (u64, u64),
    hashes: Vec<u64>,
    last_key: Vec<u8>,
    written: u64,
    synced: u64,
}

impl RunWriter {
    fn create(dir: &Path, seq: u64, (key_len, value_len): (usize, usize)) -> Result<RunWriter> {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, "creating", e))?;
        let path = run_path(dir, seq);
        let file = crate::env::open_retrying(|| File::create(&path))
            .map_err(|e| io(&path, "creating", e))?;
        Ok(RunWriter {
            seq,
            path,
            dir: dir.to_owned(),
            file: BufWriter::with_capacity(1 << 20, file),
            key_len,
            value_len,
            entries: 0,
            block: Vec::with_capacity(BLOCK_ENTRIES * (key_len + value_len)),
            fences: Vec::new(),
            filter_key: (rand::random(), rand::random()),
            hashes: Vec::new(),
            last_key: Vec::new(),
            written: 0,
            synced: 0,
        })
    }

    fn push(&mut self, entry: &[u8]) -> Result<()> {
        assert_eq!(entry.len(), self.key_len + self.value_len);
        let key = &entry[..self.key_len];
        assert!(
            self.entries == 0 || key > &self.last_key[..],
            "a run's keys ascend"
        );
        self.last_key.clear();
        self.last_key.extend_from_slice(key);
        self.hashes.push(Filter::hash(self.filter_key, key));
        if self.block.is_empty() {
            self.fences.extend_from_slice(key);
        }
        self.block.extend_from_slice(entry);
        self.entries += 1;
        if self.entries % BLOCK_ENTRIES as u64 == 0 {
            self.end_block()?;
        }
        Ok(())
    }

    fn end_block(&mut self) -> Result<()> {
        let crc = crc32c::crc32c(&self.block).to_le_bytes();
        let bytes = [&self.block[..], &crc].concat();
        self.write(&bytes)?;
        self.block.clear();
        if self.written - self.synced >= UNSYNCED_BYTES_MAX {
            self.sync()?;
        }
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.written += bytes.len() as u64;
        self.file
            .write_all(bytes)
            .map_err(|e| io(&self.path, "writing", e))
    }

    fn sync(&mut self) -> Result<()> {
        self.file
            .flush()
            .map_err(|e| io(&self.path, "writing", e))?;
        let file = self.file.get_ref();
        file.sync_data().map_err(|e| io(&self.path, "syncing", e))?;
        // Read again only by merges and rare lookups: its pages are not kept.
        crate::env::drop_cached(file, self.synced, Some(self.written - self.synced));
        self.synced = self.written;
        Ok(())
    }

    /// Ends the run (fences, filter, footer), synced with its directory entry; returns what
    /// [`Runs::read_footer`] would read back.
    fn finish(mut self) -> Result<Run> {
        if !self.block.is_empty() {
            self.end_block()?;
        }
        let fences = std::mem::take(&mut self.fences);
        self.write(&fences)?;
        let built = Filter::build(self.filter_key, &self.hashes);
        let filter = built.encode();
        self.write(&filter)?;
        let mut footer = Vec::with_capacity(FOOTER_BYTES);
        footer.extend_from_slice(&MAGIC);
        footer.extend_from_slice(&(self.key_len as u32).to_le_bytes());
        footer.extend_from_slice(&(self.value_len as u32).to_le_bytes());
        footer.extend_from_slice(&self.entries.to_le_bytes());
        footer.extend_from_slice(&crc32c::crc32c(&fences).to_le_bytes());
        footer.extend_from_slice(&self.filter_key.0.to_le_bytes());
        footer.extend_from_slice(&self.filter_key.1.to_le_bytes());
        footer.extend_from_slice(&crc32c::crc32c(&filter).to_le_bytes());
        footer.extend_from_slice(&crc32c::crc32c(&footer).to_le_bytes());
        debug_assert_eq!(footer.len(), FOOTER_BYTES);
        self.write(&footer)?;
        self.sync()?;
        sync_dir(&self.dir)?;
        Ok(Run {
            seq: self.seq,
            entries: self.entries,
            fences,
            filter: built,
        })
    }
}

fn run_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016}.run"))
}

/// The numbers of the run files in `dir` (none if it does not exist).
fn run_files(dir: &Path) -> Result<Vec<u64>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(dir, "listing", e)),
    };
    let mut seqs = Vec::new();
    for entry in entries {
        let name = entry.map_err(|e| io(dir, "listing", e))?.file_name();
        let seq = name
            .to_str()
            .and_then(|n| n.strip_suffix(".run"))
            .and_then(|n| n.parse::<u64>().ok());
        seqs.extend(seq);
    }
    Ok(seqs)
}

/// Deletes the run files in `dir` not in `keep` (a crash's leftovers, a merge's inputs).
pub(crate) fn delete_unlisted(dir: &Path, keep: &[u64]) -> Result<()> {
    for seq in run_files(dir)? {
        if !keep.contains(&seq) {
            let path = run_path(dir, seq);
            std::fs::remove_file(&path).map_err(|e| io(&path, "deleting", e))?;
        }
    }
    Ok(())
}

/// The number after every run file in `dir` (listed or not).
pub(crate) fn next_seq(dir: &Path, listed: &[u64]) -> Result<u64> {
    let files = run_files(dir)?;
    Ok(listed.iter().chain(&files).copied().max().unwrap_or(0) + 1)
}

/// The record of which runs count: run numbers u64 LE, oldest first.
pub(crate) fn encode_list(seqs: &[u64]) -> Vec<u8> {
    seqs.iter().flat_map(|s| s.to_le_bytes()).collect()
}

pub(crate) fn decode_list(table: Table, value: &[u8]) -> Result<Vec<u64>> {
    if value.len() % 8 != 0 {
        return Err(corrupt(table, "a run list of the wrong length"));
    }
    Ok(value
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8")))
        .collect())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use rand::{Rng, SeedableRng};

    use super::*;

    const K: usize = 12;
    const V: usize = 5;

    /// Writes `groups` of random entries (keys from a small space, so that later groups
    /// overwrite earlier ones), merging whenever a merge is due, and checks every read and a
    /// scan against a map.
    fn model_run(seed: u64, groups: usize) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("runs");
        let mut runs = Runs::open(&dir, Table::Request, (K, V), &[]).unwrap();
        let mut model = BTreeMap::new();
        let (mut next, mut merges) = (1, 0);
        for _ in 0..groups {
            let mut entries = Vec::new();
            for _ in 0..rng.gen_range(1..=3 * BLOCK_ENTRIES) {
                let mut key = [0u8; K];
                key[..4].copy_from_slice(&rng.gen_range(0u32..4000).to_be_bytes());
                let value: [u8; V] = rng.gen();
                entries.extend_from_slice(&key);
                entries.extend_from_slice(&value);
                model.insert(key, value);
            }
            let run = runs.write(next, &entries).unwrap();
            runs.add(run);
            next += 1;
            while let Some(range) = runs.merge_due() {
                let run = runs.merge(range.clone(), next).unwrap();
                let gone = runs.replace(range, run);
                runs.delete(&gone).unwrap();
                next += 1;
                merges += 1;
            }
            assert!(runs.runs.len() <= RUNS_MAX, "seed {seed}");
        }
        assert!(merges > 2, "seed {seed}: {merges} merges");
        for (key, value) in &model {
            assert_eq!(
                runs.get(key).unwrap().as_deref(),
                Some(&value[..]),
                "seed {seed}"
            );
        }
        assert_eq!(runs.get(&[0xff; K]).unwrap(), None, "seed {seed}");
        let mut scanned = Vec::new();
        let mut entries = runs.entries().unwrap();
        while let Some(e) = entries.next().unwrap() {
            scanned.push(e);
        }
        let want: Vec<Vec<u8>> = model
            .iter()
            .map(|(k, v)| [&k[..], &v[..]].concat())
            .collect();
        assert_eq!(scanned, want, "seed {seed}");
        // Reopened from the list, with a stray file beside it: the stray is deleted.
        let listed = runs.listed();
        std::fs::write(run_path(&dir, next + 5), b"stray").unwrap();
        delete_unlisted(&dir, &listed).unwrap();
        assert!(!run_path(&dir, next + 5).exists());
        let files = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(files, listed.len(), "seed {seed}: merged inputs deleted");
        let reopened = Runs::open(&dir, Table::Request, (K, V), &listed).unwrap();
        assert_eq!(reopened.runs, runs.runs, "seed {seed}");
    }

    #[test]
    fn runs_read_as_the_newest_value_of_each_key_across_merges_and_a_reopen() {
        let seed: u64 = rand::random();
        println!("seed {seed}");
        model_run(seed, 40);
    }

    #[test]
    fn a_filter_never_forgets_a_key_and_rarely_claims_an_absent_one() {
        let seed: u64 = rand::random();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let keys: Vec<[u8; K]> = (0..5000).map(|_| rng.gen()).collect();
        let key = (rng.gen(), rng.gen());
        let hashes: Vec<u64> = keys.iter().map(|k| Filter::hash(key, k)).collect();
        let filter = Filter::build(key, &hashes);
        assert_eq!(filter.words.len(), 5000usize.div_ceil(64) * 8);
        assert!(keys.iter().all(|k| filter.may_contain(k)), "seed {seed}");
        let trials = 20_000;
        let claimed = (0..trials)
            .filter(|_| filter.may_contain(&rng.gen::<[u8; K]>()))
            .count();
        assert!(claimed < trials / 20, "seed {seed}: {claimed} of {trials}");
    }

    #[test]
    fn a_damaged_run_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("runs");
        let mut runs = Runs::open(&dir, Table::Receipt, (K, V), &[]).unwrap();
        let entries: Vec<u8> = (0..600u32)
            .flat_map(|i| {
                let mut e = [0u8; K + V];
                e[..4].copy_from_slice(&i.to_be_bytes());
                e
            })
            .collect();
        let run = runs.write(1, &entries).unwrap();
        runs.add(run);
        assert!(runs.get(&entries[..K]).unwrap().is_some());
        // A flipped byte in the first block: reads and scans of it fail, other blocks read.
        let path = run_path(&dir, 1);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[3] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(runs.get(&entries[..K]).is_err());
        let last = 599 * (K + V);
        assert!(runs.get(&entries[last..last + K]).unwrap().is_some());
        assert!(runs.entries().and_then(|mut e| e.next()).is_err());
        // A footer or a length that does not check out: the run does not open.
        bytes[3] ^= 1;
        let n = bytes.len();
        bytes[n - 10] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(Runs::open(&dir, Table::Receipt, (K, V), &[1]).is_err());
        std::fs::write(&path, &bytes[..n - 1]).unwrap();
        assert!(Runs::open(&dir, Table::Receipt, (K, V), &[1]).is_err());
        // Another table's lengths.
        bytes[n - 10] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(Runs::open(&dir, Table::Receipt, (K, V), &[1]).is_ok());
        assert!(Runs::open(&dir, Table::Receipt, (K + 1, V), &[1]).is_err());
    }
}
