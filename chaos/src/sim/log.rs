//! [`SimLog`]: an in-memory raft log behind raft-rs's `Storage` and core's `RaftLogStore`, with
//! the same contract as `tally_storage::RaftLogDb`, and a crash that loses what was not synced.
//!
//! raft-rs's own `MemStorage` does not implement `RaftLogStore` (and keeps no snapshot
//! descriptor), hence this one. The state sits behind `Rc<RefCell<_>>`: the replica owns one
//! handle, the simulated node keeps another as its "disk", so a crash drops the replica and a
//! restart builds a new one over the same disk. Every write but `set_commit` is durable at
//! once, as `RaftLogDb`'s synced writes are.

use std::cell::RefCell;
use std::rc::Rc;

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::util::limit_size;
use raft::{GetEntriesContext, RaftState, Storage, StorageError};
use tally_core::replica::{initial_conf_state, RaftLogStore};
use tally_core::Result;

#[derive(Default)]
struct State {
    /// As last written, plus a commit raised by `set_commit` since.
    hard_state: HardState,
    /// The commit index as last made durable.
    durable_commit: u64,
    conf_state: ConfState,
    snapshot_index: u64,
    snapshot_term: u64,
    descriptor: Vec<u8>,
    next_descriptor: Option<Vec<u8>>,
    /// Entries `snapshot_index + 1 ..= last`.
    entries: Vec<Entry>,
}

impl State {
    fn first(&self) -> u64 {
        self.snapshot_index + 1
    }

    fn last(&self) -> u64 {
        self.snapshot_index + self.entries.len() as u64
    }
}

/// A handle on one replica's simulated raft log. Clones share it.
#[derive(Clone)]
pub struct SimLog(Rc<RefCell<State>>);

impl SimLog {
    /// An empty log of a static cluster of `voters`.
    pub fn new(voters: &[u64]) -> SimLog {
        SimLog(Rc::new(RefCell::new(State {
            conf_state: initial_conf_state(voters),
            ..State::default()
        })))
    }

    /// A crash: the commit index raised since the last durable write is lost.
    pub fn crash(&self) {
        let mut s = self.0.borrow_mut();
        s.hard_state.commit = s.durable_commit;
    }

    pub fn commit(&self) -> u64 {
        self.0.borrow().hard_state.commit
    }

    pub fn snapshot_index(&self) -> u64 {
        self.0.borrow().snapshot_index
    }

    /// What the next compaction point stands for (the ledger state at that index).
    pub fn set_snapshot_descriptor(&self, bytes: Vec<u8>) {
        self.0.borrow_mut().next_descriptor = Some(bytes);
    }
}

impl Storage for SimLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let s = self.0.borrow();
        Ok(RaftState::new(s.hard_state.clone(), s.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let s = self.0.borrow();
        if low < s.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        assert!(
            high <= s.last() + 1 && low <= high,
            "entries({low}, {high}) outside {}..={}",
            s.first(),
            s.last()
        );
        let from = (low - s.first()) as usize;
        let to = (high - s.first()) as usize;
        let mut out = s.entries[from..to].to_vec();
        limit_size(&mut out, max_size.into());
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let s = self.0.borrow();
        if idx == s.snapshot_index {
            return Ok(s.snapshot_term);
        }
        if idx < s.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > s.last() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(s.entries[(idx - s.first()) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.0.borrow().first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.0.borrow().last())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let s = self.0.borrow();
        if s.snapshot_index == 0 || s.snapshot_index < request_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let mut snapshot = Snapshot {
            data: s.descriptor.clone().into(),
            ..Snapshot::default()
        };
        let meta = snapshot.mut_metadata();
        meta.index = s.snapshot_index;
        meta.term = s.snapshot_term;
        meta.set_conf_state(s.conf_state.clone());
        Ok(snapshot)
    }
}

impl RaftLogStore for SimLog {
    fn set_snapshot_descriptor(&mut self, bytes: Vec<u8>) {
        SimLog::set_snapshot_descriptor(self, bytes)
    }

    fn set_conf_state(&mut self, conf: &ConfState, _address_book: &[u8]) -> Result<()> {
        self.0.borrow_mut().conf_state = conf.clone();
        Ok(())
    }

    fn persist(&mut self, entries: &[Entry], hard_state: Option<&HardState>) -> Result<()> {
        let mut s = self.0.borrow_mut();
        if let Some(head) = entries.first() {
            let start = head.index;
            assert!(
                start >= s.first() && start <= s.last() + 1,
                "entries from {start} do not continue the log {}..={}",
                s.first(),
                s.last()
            );
            assert!(
                start > s.hard_state.commit,
                "entries from {start} would overwrite committed entries (commit {})",
                s.hard_state.commit
            );
            let keep = (start - s.first()) as usize;
            s.entries.truncate(keep);
            for (i, e) in entries.iter().enumerate() {
                assert_eq!(e.index, start + i as u64, "entries are contiguous");
                s.entries.push(e.clone());
            }
        }
        let hard_state = hard_state.cloned().unwrap_or_else(|| s.hard_state.clone());
        assert!(
            hard_state.commit >= s.hard_state.commit && hard_state.commit <= s.last(),
            "commit {} must not go back from {} nor pass the last index {}",
            hard_state.commit,
            s.hard_state.commit,
            s.last()
        );
        s.durable_commit = hard_state.commit;
        s.hard_state = hard_state;
        Ok(())
    }

    fn apply_snapshot(&mut self, snapshot: &Snapshot) -> Result<()> {
        let mut s = self.0.borrow_mut();
        let meta = snapshot.get_metadata();
        assert!(
            meta.index > s.snapshot_index,
            "snapshot at {} is out of date: the log is compacted to {}",
            meta.index,
            s.snapshot_index
        );
        s.entries.clear();
        s.snapshot_index = meta.index;
        s.snapshot_term = meta.term;
        s.descriptor = snapshot.data.to_vec();
        s.conf_state = meta.get_conf_state().clone();
        s.hard_state.commit = s.hard_state.commit.max(meta.index);
        s.hard_state.term = s.hard_state.term.max(meta.term);
        s.durable_commit = s.hard_state.commit;
        s.next_descriptor = None;
        Ok(())
    }

    fn compact(&mut self, index: u64) -> Result<()> {
        let mut s = self.0.borrow_mut();
        assert!(
            index >= s.snapshot_index && index <= s.hard_state.commit,
            "compact({index}): the index must be between the snapshot point {} and the commit {}",
            s.snapshot_index,
            s.hard_state.commit
        );
        if index == s.snapshot_index {
            return Ok(());
        }
        let drop = (index - s.snapshot_index) as usize;
        let term = s.entries[drop - 1].term;
        s.entries.drain(..drop);
        s.snapshot_index = index;
        s.snapshot_term = term;
        if let Some(d) = s.next_descriptor.take() {
            s.descriptor = d;
        }
        s.durable_commit = s.hard_state.commit;
        Ok(())
    }

    fn set_commit(&mut self, commit: u64) -> Result<()> {
        let mut s = self.0.borrow_mut();
        assert!(
            commit >= s.hard_state.commit && commit <= s.last(),
            "commit {commit} must not go back from {} nor pass the last index {}",
            s.hard_state.commit,
            s.last()
        );
        s.hard_state.commit = commit;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            ..Entry::default()
        }
    }

    #[test]
    fn appends_truncates_compacts_and_loses_the_unsynced_commit() {
        let mut log = SimLog::new(&[1, 2, 3]);
        log.persist(&[entry(1, 1), entry(2, 1), entry(3, 1)], None)
            .unwrap();
        assert_eq!(
            (log.first_index().unwrap(), log.last_index().unwrap()),
            (1, 3)
        );
        // A conflicting suffix replaces the tail.
        log.persist(&[entry(3, 2), entry(4, 2)], None).unwrap();
        assert_eq!(log.term(3).unwrap(), 2);
        assert_eq!(log.last_index().unwrap(), 4);
        log.set_commit(3).unwrap();
        log.crash();
        assert_eq!(log.commit(), 0, "set_commit is not durable");
        log.set_commit(3).unwrap();
        log.persist(&[], None).unwrap();
        log.crash();
        assert_eq!(log.commit(), 3, "a persist makes it durable");
        log.set_snapshot_descriptor(b"at 2".to_vec());
        log.compact(2).unwrap();
        assert_eq!(log.first_index().unwrap(), 3);
        assert_eq!(log.term(2).unwrap(), 1);
        assert!(log.term(1).is_err());
        let snap = log.snapshot(2, 2).unwrap();
        assert_eq!(snap.get_metadata().index, 2);
        assert_eq!(&snap.data[..], b"at 2");
        assert!(log.snapshot(3, 2).is_err());
        let ctx = GetEntriesContext::empty(false);
        assert_eq!(log.entries(3, 5, None, ctx).unwrap().len(), 2);
    }
}
