//! An in-memory Bloom filter over the keys of the request table.
//!
//! Almost every request the server sees has a new id, and asking rusty-leveldb whether a key is
//! absent costs an index-block seek in every table that may hold it (about 9 µs per lookup under
//! load, 40% of the storage thread's time before this filter). The filter answers "certainly
//! absent" from memory; "maybe present" still reads LevelDB, so a false positive costs one read
//! and never a wrong answer.
//!
//! Invariant: every key in the request table is in the filter. [`LedgerDb::open`] builds it by
//! scanning the table, `apply` adds each batch's keys after its write succeeds, and the request
//! table has no other writer in a live database (a snapshot install writes a staged database
//! and the live one is reopened afterwards).
//!
//! Saved at a clean stop: the scan costs ~2 us per stored request (seconds per million), so
//! [`LedgerDb::shutdown`] writes the filter to `<ledger>/request-filter` together with the
//! ledger's height and tip header hash, and the next open loads it instead of scanning when
//! both still match the ledger's summary. Any apply after the save moves the tip, so a filter
//! file is only ever used for exactly the ledger it was saved from (a crash after more applies,
//! an install, or another ledger in the directory all fall back to the scan). The file carries
//! its own SHA-256; a file that does not check out is ignored, never trusted.
//!
//! Bounded: its size is fixed at open (`StoreOptions::request_filter_bytes`). With 7 probes and
//! 10 bits per key the false-positive rate is about 1%; past that load it rises smoothly (about
//! 8% at twice the load), which only sends more lookups to LevelDB.
//!
//! [`LedgerDb::open`]: crate::LedgerDb::open
//! [`LedgerDb::shutdown`]: crate::LedgerDb::shutdown

use std::hash::Hasher;
use std::io::Write;
use std::path::Path;

use sha2::{Digest, Sha256};
use siphasher::sip::SipHasher13;
use tally_wire::Hash;

/// Probes per key: the optimum for 10 bits per key.
const PROBES: usize = 7;

pub(crate) struct RequestFilter {
    words: Vec<u64>,
    /// Bit count minus one; the bit count is a power of two.
    mask: u64,
    /// SipHash-1-3 under a random key (made with the filter, saved with it): clients choose
    /// request ids, so they must not be able to aim many keys at the same bits.
    key: (u64, u64),
    hasher: SipHasher13,
    keys: u64,
}

/// The file a filter is saved to, in the ledger's directory.
pub(crate) const FILE_NAME: &str = "request-filter";
const MAGIC: &[u8; 8] = b"TALLYRQF";
const VERSION: u32 = 1;
/// magic, version, key (2 x u64), height, tip hash, keys, word count.
const HEAD_BYTES: usize = 8 + 4 + 16 + 8 + 32 + 8 + 8;

impl RequestFilter {
    /// A filter of at most `bytes` bytes (rounded down to a power of two, at least 8), or None
    /// when `bytes` is 0: no filter, every lookup reads LevelDB.
    pub(crate) fn new(bytes: usize) -> Option<RequestFilter> {
        if bytes == 0 {
            return None;
        }
        let words = (bytes / 8).max(1);
        let words = 1usize << (usize::BITS - 1 - words.leading_zeros());
        let key = (rand::random(), rand::random());
        Some(RequestFilter {
            words: vec![0; words],
            mask: (words as u64) * 64 - 1,
            key,
            hasher: SipHasher13::new_with_keys(key.0, key.1),
            keys: 0,
        })
    }

    fn probes(&self, key: &[u8]) -> [u64; PROBES] {
        let mut h = self.hasher;
        h.write(key);
        let h1 = h.finish();
        // Double hashing (Kirsch and Mitzenmacher): an odd step visits distinct bits.
        let h2 = h1.rotate_left(32) | 1;
        std::array::from_fn(|i| h1.wrapping_add((i as u64).wrapping_mul(h2)) & self.mask)
    }

    pub(crate) fn insert(&mut self, key: &[u8]) {
        for bit in self.probes(key) {
            self.words[(bit / 64) as usize] |= 1 << (bit % 64);
        }
        self.keys += 1;
    }

    /// False only if `key` was never inserted.
    pub(crate) fn may_contain(&self, key: &[u8]) -> bool {
        self.probes(key)
            .iter()
            .all(|bit| self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0)
    }

    /// Keys inserted (with repeats).
    pub(crate) fn keys(&self) -> u64 {
        self.keys
    }

    pub(crate) fn bytes(&self) -> usize {
        self.words.len() * 8
    }

    /// Writes the filter to `dir/request-filter` as the filter of the ledger whose summary is at
    /// `height` with tip header hash `tip`: to a temporary file, synced, then renamed over the
    /// old one and the directory synced, so a crash leaves the old file or the new one.
    pub(crate) fn save(&self, dir: &Path, height: u64, tip: &Hash) -> std::io::Result<()> {
        let mut out = Vec::with_capacity(HEAD_BYTES + self.bytes() + 32);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.key.0.to_le_bytes());
        out.extend_from_slice(&self.key.1.to_le_bytes());
        out.extend_from_slice(&height.to_le_bytes());
        out.extend_from_slice(tip);
        out.extend_from_slice(&self.keys.to_le_bytes());
        out.extend_from_slice(&(self.words.len() as u64).to_le_bytes());
        for w in &self.words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        let digest = Sha256::digest(&out);
        out.extend_from_slice(&digest);
        let path = dir.join(FILE_NAME);
        let staged = dir.join(format!("{FILE_NAME}.tmp"));
        let mut file = std::fs::File::create(&staged)?;
        file.write_all(&out)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&staged, &path)?;
        std::fs::File::open(dir)?.sync_all()
    }

    /// The filter saved in `dir` for the ledger whose summary is at `height` with tip header
    /// hash `tip`, if one is there, checks out, has the size a new filter of `bytes` would have,
    /// and was saved for exactly that ledger; otherwise why not (for the log).
    pub(crate) fn load(dir: &Path, bytes: usize, height: u64, tip: &Hash) -> Result<Self, String> {
        let path = dir.join(FILE_NAME);
        let data = match std::fs::read(&path) {
            Ok(data) => data,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err("no saved filter".into())
            }
            Err(e) => return Err(format!("reading {}: {e}", path.display())),
        };
        let Some(fresh) = RequestFilter::new(bytes) else {
            return Err("the filter is turned off".into());
        };
        let expected = HEAD_BYTES + fresh.bytes() + 32;
        if data.len() != expected || &data[..8] != MAGIC {
            return Err(format!(
                "{} is not a filter of this size ({} bytes, expected {expected})",
                path.display(),
                data.len()
            ));
        }
        let (body, digest) = data.split_at(data.len() - 32);
        if Sha256::digest(body).as_slice() != digest {
            return Err(format!("{} fails its checksum", path.display()));
        }
        let u64_at = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().expect("8"));
        let version = u32::from_le_bytes(body[8..12].try_into().expect("4"));
        let key = (u64_at(12), u64_at(20));
        let (saved_height, saved_tip) = (u64_at(28), &body[36..68]);
        let (keys, words) = (u64_at(68), u64_at(76));
        if version != VERSION || words as usize != fresh.words.len() {
            return Err(format!("{} has another version or size", path.display()));
        }
        if saved_height != height || saved_tip != tip {
            return Err(format!(
                "the saved filter is for height {saved_height}, the ledger is at {height} \
                 (applied since, or another ledger)"
            ));
        }
        let words = body[HEAD_BYTES..]
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().expect("8")))
            .collect();
        Ok(RequestFilter {
            words,
            mask: fresh.mask,
            key,
            hasher: SipHasher13::new_with_keys(key.0, key.1),
            keys,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn key(rng: &mut impl Rng) -> [u8; 52] {
        let mut k = [0u8; 52];
        rng.fill(&mut k[..]);
        k
    }

    #[test]
    fn never_forgets_a_key_and_rarely_claims_an_absent_one() {
        let seed: u64 = rand::random();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        // 64 KiB: 524,288 bits, loaded to 10 bits per key.
        let mut f = RequestFilter::new(64 << 10).unwrap();
        assert_eq!(f.bytes(), 64 << 10);
        let inserted: Vec<[u8; 52]> = (0..52_428).map(|_| key(&mut rng)).collect();
        for k in &inserted {
            f.insert(k);
        }
        assert_eq!(f.keys(), inserted.len() as u64);
        for k in &inserted {
            assert!(
                f.may_contain(k),
                "seed {seed}: an inserted key reads as absent"
            );
        }
        let trials = 100_000;
        let false_positives = (0..trials)
            .filter(|_| f.may_contain(&key(&mut rng)))
            .count();
        // Expected about 0.8%; 2% would mean the probes are far from independent.
        assert!(
            false_positives < trials / 50,
            "seed {seed}: {false_positives} false positives in {trials}"
        );
    }

    #[test]
    fn size_rounds_down_to_a_power_of_two_and_zero_disables() {
        assert!(RequestFilter::new(0).is_none());
        assert_eq!(RequestFilter::new(1).unwrap().bytes(), 8);
        assert_eq!(RequestFilter::new(100_000).unwrap().bytes(), 65_536);
        let f = RequestFilter::new(8).unwrap();
        assert!(!f.may_contain(b"anything"), "an empty filter holds nothing");
    }
}
