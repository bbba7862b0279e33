//! Three replicas of the real driver (`tally_core::replica::Replica`) on `RaftLogDb`s, connected
//! by an in-memory network that reorders, delays and drops messages as a seeded RNG says.
//!
//! Each replica's "ledger" is a list of the batches it applied with their indices, kept across
//! restarts of the replica (like the ledger database) and lost when its directory is wiped. The
//! scenario: elect, replicate 50 batches; stop a follower, replicate more, restart it from its
//! directory and let it catch up; wipe the other follower, compact the leader's log past it and
//! check that it is brought back by a snapshot carrying the leader's descriptor, then by entries.
//!
//! raft-rs draws election timeouts from its own RNG, so a seed replays the network's choices but
//! not every timing; the checks hold for any interleaving.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;

use raft::eraftpb::{Entry, Message, MessageType, Snapshot};
use raft::ReadState;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tally_core::replica::{is_batch, RaftIo, RaftLogStore, Replica, ReplicaConfig, Role};
use tally_storage::RaftLogDb;

use crate::raft_model::VOTERS;
use crate::support::seed;

const DROP_PERCENT: u32 = 5;
const DELAY_PERCENT: u32 = 10;
const SETTLE_ROUNDS_MAX: u32 = 3_000;

/// What a replica's state machine has applied. Survives a restart of the replica.
#[derive(Default)]
struct Ledger {
    /// The last raft index applied (empty entries included), like the ledger's `raft_index`.
    index: u64,
    /// Batches applied since the last snapshot (or since the start), with their indices.
    batches: Vec<(u64, Vec<u8>)>,
    /// The index the batches start after: the last installed snapshot's, or 0.
    base: u64,
    snapshots: Vec<Snapshot>,
}

#[derive(Default)]
struct NodeIo {
    outbox: Vec<Message>,
    ledger: Ledger,
}

impl RaftIo for NodeIo {
    fn send(&mut self, messages: Vec<Message>) {
        self.outbox.extend(messages);
    }

    fn install_snapshot(&mut self, snapshot: &Snapshot) -> tally_core::Result<()> {
        let index = snapshot.get_metadata().index;
        assert!(index > self.ledger.index, "a snapshot from the past");
        self.ledger.index = index;
        self.ledger.base = index;
        self.ledger.batches.clear();
        self.ledger.snapshots.push(snapshot.clone());
        Ok(())
    }

    fn apply(&mut self, entries: Vec<Entry>) {
        for e in entries {
            // After a restart raft starts from at most the durable commit, which may be behind
            // what was applied: skip what the ledger already has, as the server does.
            if e.index <= self.ledger.index {
                continue;
            }
            assert_eq!(e.index, self.ledger.index + 1, "entries applied in order");
            self.ledger.index = e.index;
            if is_batch(&e) {
                self.ledger.batches.push((e.index, e.data.to_vec()));
            }
        }
    }

    fn read_ready(&mut self, _states: Vec<ReadState>) {}

    // This cluster's membership never changes.
    fn conf_changed(
        &mut self,
        _change: &raft::eraftpb::ConfChangeV2,
        _conf: &raft::eraftpb::ConfState,
    ) -> Vec<u8> {
        unreachable!("no membership changes in this test")
    }
}

struct Node {
    dir: PathBuf,
    replica: Option<Replica<RaftLogDb>>,
    io: NodeIo,
}

struct Cluster {
    seed: u64,
    rng: StdRng,
    nodes: HashMap<u64, Node>,
    net: Vec<Message>,
    /// Every batch any replica ever applied, by index: replicas must agree on each.
    history: BTreeMap<u64, Vec<u8>>,
    logger: slog::Logger,
    _root: tempfile::TempDir,
}

fn config(id: u64, applied: u64) -> ReplicaConfig {
    ReplicaConfig {
        id,
        election_ticks: 10,
        heartbeat_ticks: 2,
        applied,
        max_size_per_msg: 1 << 20,
        max_inflight_msgs: 64,
    }
}

impl Cluster {
    fn new(seed: u64) -> Cluster {
        let root = tempfile::tempdir().unwrap();
        let nodes = VOTERS
            .iter()
            .map(|&id| {
                let node = Node {
                    dir: root.path().join(format!("node-{id}")),
                    replica: None,
                    io: NodeIo::default(),
                };
                (id, node)
            })
            .collect();
        let mut cluster = Cluster {
            seed,
            rng: StdRng::seed_from_u64(seed),
            nodes,
            net: Vec::new(),
            history: BTreeMap::new(),
            logger: slog::Logger::root(slog::Discard, slog::o!()),
            _root: root,
        };
        for id in VOTERS {
            cluster.start(id);
        }
        cluster
    }

    /// Starts replica `id` from its directory, the way the server does: raft resumes at what the
    /// ledger applied, but never past the durable commit index.
    fn start(&mut self, id: u64) {
        let node = self.nodes.get_mut(&id).unwrap();
        assert!(node.replica.is_none());
        let log = RaftLogDb::open(&node.dir, &VOTERS).unwrap();
        let applied = node.io.ledger.index.min(log.hard_state().commit);
        let replica = Replica::new(&config(id, applied), log, &self.logger).unwrap();
        node.replica = Some(replica);
    }

    /// Stops replica `id`, losing the messages it has not sent.
    fn stop(&mut self, id: u64) {
        self.check_histories();
        let node = self.nodes.get_mut(&id).unwrap();
        node.replica = None;
        node.io.outbox.clear();
    }

    /// Stops replica `id` and deletes its raft log and its ledger.
    fn wipe(&mut self, id: u64) {
        self.stop(id);
        let node = self.nodes.get_mut(&id).unwrap();
        std::fs::remove_dir_all(&node.dir).unwrap();
        node.io.ledger = Ledger::default();
    }

    fn replica(&mut self, id: u64) -> &mut Replica<RaftLogDb> {
        self.nodes
            .get_mut(&id)
            .unwrap()
            .replica
            .as_mut()
            .expect("a running replica")
    }

    fn live(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.replica.is_some())
            .map(|(&id, _)| id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// The running leader of the highest term, if any.
    fn leader(&self) -> Option<u64> {
        self.nodes
            .iter()
            .filter_map(|(&id, n)| Some((id, n.replica.as_ref()?.status())))
            .filter(|(_, s)| s.role == Role::Leader)
            .max_by_key(|(_, s)| s.term)
            .map(|(id, _)| id)
    }

    /// One tick of every replica, one pass over the network, and every replica's ready.
    fn round(&mut self) {
        for id in self.live() {
            self.replica(id).tick();
        }
        let mut messages = std::mem::take(&mut self.net);
        messages.shuffle(&mut self.rng);
        for m in messages {
            let roll = self.rng.gen_range(0..100);
            // raft-rs pauses a follower's replication after sending it a snapshot until the
            // follower answers or the transport reports a failure (`report_snapshot`, which the
            // driver does not expose), so this network never loses snapshots.
            if roll < DROP_PERCENT && m.get_msg_type() != MessageType::MsgSnapshot {
                continue;
            }
            if roll >= 100 - DELAY_PERCENT {
                self.net.push(m);
                continue;
            }
            if let Some(replica) = self.nodes.get_mut(&m.to).unwrap().replica.as_mut() {
                replica.step(m);
            }
        }
        for id in self.live() {
            let node = self.nodes.get_mut(&id).unwrap();
            let replica = node.replica.as_mut().unwrap();
            // A ready can make another one (a light ready's commit can apply more).
            for _ in 0..4 {
                replica.on_ready(&mut node.io).unwrap();
            }
            self.net.append(&mut node.io.outbox);
        }
    }

    /// True when a leader is known to every running replica, and every running replica has
    /// committed and applied the leader's whole log.
    fn settled(&self) -> bool {
        let Some(leader) = self.leader() else {
            return false;
        };
        let ls = self.nodes[&leader].replica.as_ref().unwrap().status();
        ls.commit_index == ls.last_index
            && self.nodes.values().all(|n| match &n.replica {
                None => true,
                Some(r) => {
                    let s = r.status();
                    s.term == ls.term
                        && s.leader_id == leader
                        && s.commit_index == ls.last_index
                        && s.last_index == ls.last_index
                        && n.io.ledger.index == ls.last_index
                }
            })
    }

    fn settle(&mut self) -> u64 {
        for _ in 0..SETTLE_ROUNDS_MAX {
            self.round();
            if self.settled() {
                self.check_histories();
                return self.leader().unwrap();
            }
        }
        panic!(
            "the cluster did not settle in {SETTLE_ROUNDS_MAX} rounds (seed {})",
            self.seed
        );
    }

    /// Replicates every batch of `data` (proposing again what a leader change lost).
    fn replicate(&mut self, data: &[Vec<u8>]) {
        for _ in 0..20 {
            let leader = self.settle();
            let applied: HashSet<&Vec<u8>> = self.history.values().collect();
            let missing: Vec<Vec<u8>> = data
                .iter()
                .filter(|d| !applied.contains(d))
                .cloned()
                .collect();
            if missing.is_empty() {
                return;
            }
            for d in missing {
                if self.replica(leader).propose(d).is_err() {
                    break;
                }
            }
        }
        panic!("batches were not replicated (seed {})", self.seed);
    }

    /// Every replica agrees with every other on the batch at each index, and its batches since
    /// its base are exactly the history's batches in that range, in order.
    fn check_histories(&mut self) {
        for (id, node) in &self.nodes {
            let ledger = &node.io.ledger;
            for (index, data) in &ledger.batches {
                let known = self.history.entry(*index).or_insert_with(|| data.clone());
                assert_eq!(
                    known, data,
                    "replica {id} applied another batch at {index} (seed {})",
                    self.seed
                );
            }
        }
        for (id, node) in &self.nodes {
            let ledger = &node.io.ledger;
            let want: Vec<(u64, Vec<u8>)> = self
                .history
                .range(ledger.base + 1..)
                .take_while(|(i, _)| **i <= ledger.index)
                .map(|(i, d)| (*i, d.clone()))
                .collect();
            assert_eq!(
                ledger.batches, want,
                "replica {id} missed batches in {}..={} (seed {})",
                ledger.base, ledger.index, self.seed
            );
        }
    }

    fn batches(&self, id: u64) -> Vec<Vec<u8>> {
        let ledger = &self.nodes[&id].io.ledger;
        ledger.batches.iter().map(|(_, d)| d.clone()).collect()
    }
}

fn batch(n: usize) -> Vec<u8> {
    format!("batch {n}").into_bytes()
}

/// `applied` holds each proposed batch exactly once (a batch lost to a leader change is proposed
/// again, so the order may differ from the proposals').
fn assert_each_once(applied: &[Vec<u8>], proposed: &[Vec<u8>], seed: u64) {
    let mut a = applied.to_vec();
    let mut p = proposed.to_vec();
    a.sort();
    p.sort();
    assert_eq!(
        a, p,
        "every proposed batch applied exactly once (seed {seed})"
    );
}

#[test]
fn three_replicas_replicate_restart_and_catch_up_by_snapshot() {
    let seed = seed();
    let mut c = Cluster::new(seed);
    let mut proposed: Vec<Vec<u8>> = (0..50).map(batch).collect();
    c.replicate(&proposed);
    let leader = c.settle();
    let all: Vec<Vec<u8>> = c.history.values().cloned().collect();
    assert_each_once(&all, &proposed, seed);
    for id in VOTERS {
        assert_eq!(c.batches(id), all, "replica {id} (seed {seed})");
    }

    // A follower misses some batches, restarts from its directory and catches up.
    let followers: Vec<u64> = VOTERS.into_iter().filter(|&id| id != leader).collect();
    let (a, b) = (followers[0], followers[1]);
    c.stop(a);
    let more: Vec<Vec<u8>> = (50..80).map(batch).collect();
    c.replicate(&more);
    proposed.extend(more);
    assert_eq!(c.nodes[&a].io.ledger.batches.len(), 50);
    c.start(a);
    c.settle();
    let all: Vec<Vec<u8>> = c.history.values().cloned().collect();
    assert_each_once(&all, &proposed, seed);
    for id in VOTERS {
        assert_eq!(
            c.batches(id),
            all,
            "replica {id} after the restart (seed {seed})"
        );
    }

    // Another follower loses everything. It must come back through a snapshot: leadership moves
    // to the restarted follower (a new leader forgets how far the wiped one had got; the old one
    // would send it a commit index beyond its empty log, which raft-rs treats as fatal), which
    // compacts its log.
    c.wipe(b);
    let more: Vec<Vec<u8>> = (80..100).map(batch).collect();
    c.replicate(&more);
    proposed.extend(more);
    let mut leader = c.settle();
    for attempt in 0.. {
        if leader == a {
            break;
        }
        assert!(attempt < 20, "leadership did not move to {a} (seed {seed})");
        c.replica(leader).transfer_leader(a);
        for _ in 0..30 {
            c.round();
        }
        leader = c.settle();
    }
    let mut descriptors = HashMap::new();
    for id in c.live() {
        let index = c.nodes[&id].io.ledger.index;
        let descriptor = format!("ledger of replica {id} at {index}").into_bytes();
        let log = c.replica(id).store_mut();
        log.set_snapshot_descriptor(descriptor.clone());
        log.compact(index).unwrap();
        assert_eq!(log.entry_count(), 0);
        descriptors.insert(id, (index, descriptor));
    }
    let more: Vec<Vec<u8>> = (100..110).map(batch).collect();
    c.replicate(&more);
    proposed.extend(more);
    c.start(b);
    let leader = c.settle();
    let snapshots = &c.nodes[&b].io.ledger.snapshots;
    assert_eq!(
        snapshots.len(),
        1,
        "one snapshot for the wiped replica (seed {seed})"
    );
    let (index, descriptor) = &descriptors[&leader];
    assert_eq!(snapshots[0].get_metadata().index, *index);
    assert_eq!(
        snapshots[0].data, *descriptor,
        "the snapshot carries the leader's descriptor (seed {seed})"
    );
    let after: Vec<Vec<u8>> = c
        .history
        .range(index + 1..)
        .map(|(_, d)| d.clone())
        .collect();
    assert_eq!(after.len(), 10);
    assert_eq!(c.batches(b), after);

    // And it goes on replicating.
    let more: Vec<Vec<u8>> = (110..130).map(batch).collect();
    c.replicate(&more);
    proposed.extend(more);
    c.settle();
    let all: Vec<Vec<u8>> = c.history.values().cloned().collect();
    assert_each_once(&all, &proposed, seed);
    for id in [leader, a] {
        assert_eq!(c.batches(id), all, "replica {id} (seed {seed})");
    }
    let after: Vec<Vec<u8>> = c
        .history
        .range(index + 1..)
        .map(|(_, d)| d.clone())
        .collect();
    assert_eq!(c.batches(b), after);
    assert_eq!(c.replica(b).store().snapshot_index(), *index);
}
