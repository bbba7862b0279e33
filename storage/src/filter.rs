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
//! Bounded: its size is fixed at open (`StoreOptions::request_filter_bytes`). With 7 probes and
//! 10 bits per key the false-positive rate is about 1%; past that load it rises smoothly (about
//! 8% at twice the load), which only sends more lookups to LevelDB.
//!
//! [`LedgerDb::open`]: crate::LedgerDb::open

use std::hash::{BuildHasher, Hasher};

/// Probes per key: the optimum for 10 bits per key.
const PROBES: usize = 7;

pub(crate) struct RequestFilter {
    words: Vec<u64>,
    /// Bit count minus one; the bit count is a power of two.
    mask: u64,
    /// Keyed (SipHash with a random key per process): clients choose request ids, so they must
    /// not be able to aim many keys at the same bits.
    hasher: std::collections::hash_map::RandomState,
    keys: u64,
}

impl RequestFilter {
    /// A filter of at most `bytes` bytes (rounded down to a power of two, at least 8), or None
    /// when `bytes` is 0: no filter, every lookup reads LevelDB.
    pub(crate) fn new(bytes: usize) -> Option<RequestFilter> {
        if bytes == 0 {
            return None;
        }
        let words = (bytes / 8).max(1);
        let words = 1usize << (usize::BITS - 1 - words.leading_zeros());
        Some(RequestFilter {
            words: vec![0; words],
            mask: (words as u64) * 64 - 1,
            hasher: Default::default(),
            keys: 0,
        })
    }

    fn probes(&self, key: &[u8]) -> [u64; PROBES] {
        let mut h = self.hasher.build_hasher();
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
