//! A model of the raft log (a second, obviously simple implementation of `RaftLogDb`'s rules),
//! random operations drawn from it, and a randomized test that runs them against `RaftLogDb`,
//! reopening at random points. The crash test reuses the model to know what may be on disk.

use raft::eraftpb::{Entry, HardState, Snapshot};
use raft::{GetEntriesContext, Storage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tally_core::replica::RaftLogStore;
use tally_storage::{RaftLogDb, StoreOptions};

use crate::support::seed;

pub const VOTERS: [u64; 3] = [1, 2, 3];

/// What is on disk after an operation returned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Durable {
    pub snap_index: u64,
    pub snap_term: u64,
    pub descriptor: Vec<u8>,
    /// Terms of the entries `snap_index + 1 ..`.
    pub terms: Vec<u64>,
    pub term: u64,
    pub vote: u64,
    pub commit: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Model {
    pub durable: Durable,
    /// The commit index in memory (raised by `set_commit`).
    pub commit: u64,
    pub next_descriptor: Option<Vec<u8>>,
}

#[derive(Debug, Clone)]
pub enum Op {
    /// `persist(entries start.., hard)`; `hard` is (term, vote, commit).
    Persist {
        start: u64,
        terms: Vec<u64>,
        hard: Option<(u64, u64, u64)>,
    },
    SetCommit(u64),
    Compact {
        index: u64,
        descriptor: Option<Vec<u8>>,
    },
    ApplySnapshot {
        index: u64,
        term: u64,
        descriptor: Vec<u8>,
    },
}

/// The data of the entry at (index, term): recognisable, and of varying size (up to ~3 KB, so
/// that a small memtable fills often).
pub fn entry_data(index: u64, term: u64) -> Vec<u8> {
    let len = (index.wrapping_mul(2_654_435_761) ^ term.wrapping_mul(40_503)) % 3000;
    let mut data = Vec::with_capacity(16 + len as usize);
    data.extend_from_slice(&index.to_le_bytes());
    data.extend_from_slice(&term.to_le_bytes());
    data.resize(16 + len as usize, (index ^ term) as u8);
    data
}

pub fn entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        data: entry_data(index, term).into(),
        ..Entry::default()
    }
}

pub fn hard_state(term: u64, vote: u64, commit: u64) -> HardState {
    HardState {
        term,
        vote,
        commit,
        ..HardState::default()
    }
}

pub fn snapshot(index: u64, term: u64, data: &[u8]) -> Snapshot {
    let mut s = Snapshot {
        data: data.to_vec().into(),
        ..Snapshot::default()
    };
    s.mut_metadata().index = index;
    s.mut_metadata().term = term;
    s.mut_metadata().mut_conf_state().voters = VOTERS.to_vec();
    s
}

impl Model {
    pub fn last(&self) -> u64 {
        self.durable.snap_index + self.durable.terms.len() as u64
    }

    fn last_term(&self) -> u64 {
        self.durable
            .terms
            .last()
            .copied()
            .unwrap_or(self.durable.snap_term)
    }

    /// A random operation that raft could ask for in this state.
    pub fn next_op(&self, rng: &mut StdRng) -> Op {
        let d = &self.durable;
        let roll = rng.gen_range(0..100);
        if roll < 12 && self.commit < self.last() {
            return Op::SetCommit(rng.gen_range(self.commit + 1..=self.last()));
        }
        if roll < 27 && self.commit > d.snap_index {
            let index = rng.gen_range(d.snap_index + 1..=self.commit);
            let descriptor = rng.gen_bool(0.5).then(|| format!("d{index}").into_bytes());
            return Op::Compact { index, descriptor };
        }
        if roll < 30 {
            let index = self.last() + rng.gen_range(1..=3);
            let term = d.term.max(self.last_term()) + rng.gen_range(0..=1);
            let descriptor = format!("s{index}").into_bytes();
            return Op::ApplySnapshot {
                index,
                term,
                descriptor,
            };
        }
        // A new leader may replace the uncommitted tail; the current one appends.
        let new_term = d.term == 0 || rng.gen_bool(0.2);
        let term = d.term + u64::from(new_term);
        let start = if new_term {
            rng.gen_range(self.commit.max(d.snap_index) + 1..=self.last() + 1)
        } else {
            self.last() + 1
        };
        let count = rng.gen_range(1..=6);
        let last = start + count - 1;
        let hard = (new_term || rng.gen_bool(0.7)).then(|| {
            let vote = if new_term {
                rng.gen_range(1..=3)
            } else {
                d.vote
            };
            (term, vote, rng.gen_range(self.commit..=last))
        });
        Op::Persist {
            start,
            terms: vec![term; count as usize],
            hard,
        }
    }

    pub fn apply(&mut self, op: &Op) {
        let d = &mut self.durable;
        match op {
            Op::Persist { start, terms, hard } => {
                d.terms.truncate((start - d.snap_index - 1) as usize);
                d.terms.extend_from_slice(terms);
                let (term, vote, commit) = hard.unwrap_or((d.term, d.vote, self.commit));
                (d.term, d.vote, d.commit) = (term, vote, commit);
                self.commit = commit;
            }
            Op::SetCommit(c) => self.commit = *c,
            Op::Compact { index, descriptor } => {
                if let Some(desc) = descriptor {
                    self.next_descriptor = Some(desc.clone());
                }
                if *index > d.snap_index {
                    let dropped = (index - d.snap_index) as usize;
                    d.snap_term = d.terms[dropped - 1];
                    d.terms.drain(..dropped);
                    d.snap_index = *index;
                    if let Some(desc) = self.next_descriptor.take() {
                        d.descriptor = desc;
                    }
                    d.commit = self.commit;
                }
            }
            Op::ApplySnapshot {
                index,
                term,
                descriptor,
            } => {
                d.terms.clear();
                (d.snap_index, d.snap_term) = (*index, *term);
                d.descriptor = descriptor.clone();
                d.commit = self.commit.max(*index);
                d.term = d.term.max(*term);
                self.commit = d.commit;
                self.next_descriptor = None;
            }
        }
    }

    /// The model of a freshly opened log: what is durable.
    pub fn reopened(&self) -> Model {
        Model {
            durable: self.durable.clone(),
            commit: self.durable.commit,
            next_descriptor: None,
        }
    }

    /// Reads everything back from `log` (checking each entry's data) as a model.
    pub fn read(log: &RaftLogDb) -> Model {
        let (first, last) = (log.first_index().unwrap(), log.last_index().unwrap());
        let point = log.snapshot_point();
        assert_eq!(first, point.index + 1);
        assert_eq!(log.term(point.index).unwrap(), point.term);
        let entries = log
            .entries(first, last + 1, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(entries.len() as u64, last + 1 - first);
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(e.index, first + i as u64);
            assert_eq!(log.term(e.index).unwrap(), e.term, "term({})", e.index);
            assert_eq!(e.data, entry_data(e.index, e.term), "data of {}", e.index);
        }
        assert_eq!(log.entry_count(), entries.len() as u64);
        // Shorter reads, which the in-memory tail may answer alone: each entry, and the suffixes
        // that start in the last few.
        for (i, e) in entries.iter().enumerate() {
            let index = first + i as u64;
            let one = log.entries(index, index + 1, None, GetEntriesContext::empty(false));
            assert_eq!(one.unwrap(), std::slice::from_ref(e), "entry {index} alone");
            if last - index < 6 {
                let suffix = log.entries(index, last + 1, None, GetEntriesContext::empty(false));
                assert_eq!(suffix.unwrap(), entries[i..], "entries {index}..={last}");
            }
        }
        let hs = log.hard_state();
        let (initial, _) = {
            let s = log.initial_state().unwrap();
            (s.hard_state, s.conf_state)
        };
        assert_eq!(&initial, hs);
        assert_eq!(log.conf_state().voters, VOTERS);
        Model {
            durable: Durable {
                snap_index: point.index,
                snap_term: point.term,
                descriptor: point.descriptor.clone(),
                terms: entries.iter().map(|e| e.term).collect(),
                term: hs.term,
                vote: hs.vote,
                commit: hs.commit,
            },
            commit: hs.commit,
            next_descriptor: None,
        }
    }
}

/// Runs `op` against `log`.
pub fn run(log: &mut RaftLogDb, op: &Op) {
    match op {
        Op::Persist { start, terms, hard } => {
            let entries: Vec<Entry> = (*start..).zip(terms).map(|(i, &t)| entry(i, t)).collect();
            let hs = hard.map(|(t, v, c)| hard_state(t, v, c));
            log.persist(&entries, hs.as_ref()).unwrap();
        }
        Op::SetCommit(c) => log.set_commit(*c).unwrap(),
        Op::Compact { index, descriptor } => {
            if let Some(d) = descriptor {
                log.set_snapshot_descriptor(d.clone());
            }
            log.compact(*index).unwrap();
        }
        Op::ApplySnapshot {
            index,
            term,
            descriptor,
        } => log
            .apply_snapshot(&snapshot(*index, *term, descriptor))
            .unwrap(),
    }
}

/// The model's view with the in-memory commit, as the log should show it right now.
fn live_view(model: &Model) -> Durable {
    Durable {
        commit: model.commit,
        ..model.durable.clone()
    }
}

/// A small memtable, so that the crash test's kills also land in table writes and compactions.
pub fn small() -> StoreOptions {
    StoreOptions {
        write_buffer_bytes: 16 << 10,
        // A few entries (up to ~3 KB each): reads are served from the tail, from the database,
        // and across both as the tail moves on.
        raft_tail_bytes: 8 << 10,
        ..StoreOptions::default()
    }
}

#[test]
fn random_operations_match_the_model_across_reopens() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let open = || RaftLogDb::open_with_options(dir.path(), &VOTERS, small()).unwrap();
    let mut log = open();
    let mut model = Model::default();
    let (mut compactions, mut snapshots, mut reopens) = (0, 0, 0);
    for step in 0..600 {
        let op = model.next_op(&mut rng);
        run(&mut log, &op);
        model.apply(&op);
        compactions += matches!(op, Op::Compact { .. }) as u32;
        snapshots += matches!(op, Op::ApplySnapshot { .. }) as u32;
        let seen = Model::read(&log);
        assert_eq!(
            seen.durable,
            live_view(&model),
            "step {step} after {op:?} (seed {seed})"
        );
        if rng.gen_bool(0.05) {
            drop(log);
            log = open();
            model = model.reopened();
            reopens += 1;
            assert_eq!(
                Model::read(&log),
                model,
                "step {step}: reopen (seed {seed})"
            );
        }
    }
    println!("{compactions} compactions, {snapshots} snapshots, {reopens} reopens");
    assert!(compactions > 10 && snapshots > 3 && reopens > 10);
}
