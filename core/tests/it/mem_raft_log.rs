//! [`MemRaftLog`]: an in-memory raft log behind raft-rs's `Storage` and core's `RaftLogStore`,
//! with the contract of `tally_storage::RaftLogDb` (the simulator's `SimLog` is the same, with
//! crashes; tally-core cannot depend on either crate). raft-rs's own `MemStorage` implements no
//! `RaftLogStore` and keeps no snapshot descriptor.
//!
//! It also keeps a journal of its writes, so a test can print what a replica made durable.

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::util::limit_size;
use raft::{GetEntriesContext, RaftState, Storage, StorageError};
use tally_core::replica::{initial_conf_state, RaftLogStore};
use tally_core::Result;

/// One write the log took: the entries appended and the hard state recorded, if any.
pub struct Write {
    pub entries: Vec<(u64, u64)>,
    pub hard_state: Option<HardState>,
}

#[derive(Default)]
pub struct MemRaftLog {
    hard_state: HardState,
    conf_state: ConfState,
    snapshot_index: u64,
    snapshot_term: u64,
    descriptor: Vec<u8>,
    next_descriptor: Option<Vec<u8>>,
    /// Entries `snapshot_index + 1 ..= last`.
    entries: Vec<Entry>,
    journal: Vec<Write>,
}

impl MemRaftLog {
    /// An empty log of a cluster that starts with `voters`.
    pub fn new(voters: &[u64]) -> MemRaftLog {
        MemRaftLog {
            conf_state: initial_conf_state(voters),
            ..MemRaftLog::default()
        }
    }

    fn first(&self) -> u64 {
        self.snapshot_index + 1
    }

    fn last(&self) -> u64 {
        self.snapshot_index + self.entries.len() as u64
    }

    /// The entry at `index`, if the log still holds it.
    pub fn entry(&self, index: u64) -> Option<&Entry> {
        let at = index.checked_sub(self.first())?;
        self.entries.get(at as usize)
    }

    /// The writes since the last call, oldest first.
    pub fn take_journal(&mut self) -> Vec<Write> {
        std::mem::take(&mut self.journal)
    }
}

impl Storage for MemRaftLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        assert!(
            high <= self.last() + 1 && low <= high,
            "entries({low}, {high}) outside {}..={}",
            self.first(),
            self.last()
        );
        let from = (low - self.first()) as usize;
        let to = (high - self.first()) as usize;
        let mut out = self.entries[from..to].to_vec();
        limit_size(&mut out, max_size.into());
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.snapshot_index {
            return Ok(self.snapshot_term);
        }
        if idx < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.entries[(idx - self.first()) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.snapshot_index == 0 || self.snapshot_index < request_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let mut snapshot = Snapshot {
            data: self.descriptor.clone().into(),
            ..Snapshot::default()
        };
        let meta = snapshot.mut_metadata();
        meta.index = self.snapshot_index;
        meta.term = self.snapshot_term;
        meta.set_conf_state(self.conf_state.clone());
        Ok(snapshot)
    }
}

impl RaftLogStore for MemRaftLog {
    fn persist(&mut self, entries: &[Entry], hard_state: Option<&HardState>) -> Result<()> {
        if let Some(head) = entries.first() {
            let start = head.index;
            assert!(
                start >= self.first() && start <= self.last() + 1,
                "entries from {start} do not continue the log {}..={}",
                self.first(),
                self.last()
            );
            assert!(
                start > self.hard_state.commit,
                "entries from {start} would overwrite committed entries (commit {})",
                self.hard_state.commit
            );
            self.entries.truncate((start - self.first()) as usize);
            for (i, e) in entries.iter().enumerate() {
                assert_eq!(e.index, start + i as u64, "entries are contiguous");
                self.entries.push(e.clone());
            }
        }
        if let Some(hs) = hard_state {
            assert!(
                hs.commit >= self.hard_state.commit && hs.commit <= self.last(),
                "commit {} must not go back from {} nor pass the last index {}",
                hs.commit,
                self.hard_state.commit,
                self.last()
            );
            self.hard_state = hs.clone();
        }
        self.journal.push(Write {
            entries: entries.iter().map(|e| (e.index, e.term)).collect(),
            hard_state: hard_state.cloned(),
        });
        Ok(())
    }

    fn apply_snapshot(&mut self, snapshot: &Snapshot) -> Result<()> {
        let meta = snapshot.get_metadata();
        assert!(
            meta.index > self.snapshot_index,
            "snapshot at {} is out of date: the log is compacted to {}",
            meta.index,
            self.snapshot_index
        );
        self.entries.clear();
        self.snapshot_index = meta.index;
        self.snapshot_term = meta.term;
        self.descriptor = snapshot.data.to_vec();
        self.conf_state = meta.get_conf_state().clone();
        self.hard_state.commit = self.hard_state.commit.max(meta.index);
        self.hard_state.term = self.hard_state.term.max(meta.term);
        self.next_descriptor = None;
        Ok(())
    }

    fn compact(&mut self, index: u64) -> Result<()> {
        assert!(
            index >= self.snapshot_index && index <= self.hard_state.commit,
            "compact({index}): the index must be between the snapshot point {} and the commit {}",
            self.snapshot_index,
            self.hard_state.commit
        );
        if index == self.snapshot_index {
            return Ok(());
        }
        let drop = (index - self.snapshot_index) as usize;
        self.snapshot_term = self.entries[drop - 1].term;
        self.entries.drain(..drop);
        self.snapshot_index = index;
        if let Some(d) = self.next_descriptor.take() {
            self.descriptor = d;
        }
        Ok(())
    }

    fn set_commit(&mut self, commit: u64) -> Result<()> {
        assert!(
            commit >= self.hard_state.commit && commit <= self.last(),
            "commit {commit} must not go back from {} nor pass the last index {}",
            self.hard_state.commit,
            self.last()
        );
        self.hard_state.commit = commit;
        Ok(())
    }

    fn set_snapshot_descriptor(&mut self, bytes: Vec<u8>) {
        self.next_descriptor = Some(bytes);
    }

    fn set_conf_state(&mut self, conf: &ConfState, _address_book: &[u8]) -> Result<()> {
        self.conf_state = conf.clone();
        Ok(())
    }
}
