//! The raft thread: owns the [`Replica`] (raft-rs `RawNode`), turns its effects into peer
//! messages and apply commands, and decides when the master may sequence.
//!
//! Leadership hand-off: when this replica becomes leader of term T, raft-rs appends an empty
//! entry at index I. Once the apply thread has applied everything up to I, every entry of every
//! earlier term is applied too, so the applied state *is* the state to sequence on: the raft
//! thread then tells the master `Lead { term, meta }`. Until then clients get `unavailable`.
//! When it stops leading, the master is told `Follow`: its open batch fails with `not_leader`,
//! and so do the requests of proposed batches that were not committed yet. Those batches may
//! still commit under the next leader; a client retrying with the same id then receives the
//! original confirmation.
//!
//! Each proposal carries the master's epoch (bumped at every `Lead`). A proposal from an older
//! epoch is refused, and a refused or failed proposal makes the raft thread resynchronize the
//! master, because the batches sealed after it chain to it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use raft::eraftpb::{Entry, Message, Snapshot};
use raft::ReadState;
use tally_core::batch::BatchBody;
use tally_core::crypto::header_hash;
use tally_core::replica::{
    encode_message, is_batch, RaftIo, RaftLogStore, Replica, ReplicaStatus, Role,
};
use tally_core::state::LedgerMeta;
use tally_wire::{ErrorCode, ErrorReply, Hash, Message as WireMessage, Retry};

use crate::peer::PeerSenders;
use crate::pipeline::{ReplyTo, StorageCmd};

/// Inputs of the raft thread. Its queue is bounded; peers' messages are dropped when it is full.
pub enum RaftEvent {
    Peer(Message),
    Unreachable(u64),
    Propose {
        body: BatchBody,
        replies: Vec<(u32, ReplyTo, bool)>,
        epoch: u64,
    },
    /// A read to serve once a linearizable read index is applied.
    Read {
        cmd: StorageCmd,
    },
    Status {
        reply: ReplyTo,
    },
    TransferLeader(u64),
    /// The master found its speculative state out of step with what was applied.
    Resync,
    /// Shutting down: commit and apply what was proposed (for a few seconds at most), then stop
    /// the storage thread and this one.
    Drain,
}

/// Lets the raft thread say what ledger state a compaction point stands for.
pub trait SnapshotDescriptor {
    fn set_snapshot_descriptor(&mut self, bytes: Vec<u8>);
}

impl SnapshotDescriptor for tally_storage::RaftLogDb {
    fn set_snapshot_descriptor(&mut self, bytes: Vec<u8>) {
        tally_storage::RaftLogDb::set_snapshot_descriptor(self, bytes)
    }
}

impl RaftEvent {
    /// The connection an event answers, when it is a read or a status request.
    pub fn into_cmd_reply(self) -> Option<ReplyTo> {
        match self {
            RaftEvent::Read { cmd } => cmd.into_reply(),
            RaftEvent::Status { reply } => Some(reply),
            _ => None,
        }
    }
}

/// What the master is told about leadership.
pub enum MasterEvent {
    Lead {
        term: u64,
        epoch: u64,
        meta: LedgerMeta,
    },
    Follow,
}

/// What `GetInfo` answers for a replica run with `config` and the operator key `operator`, whose
/// per-address connection limit in force is `connections_per_address_max` (after
/// `limits::connection_sizing`).
pub fn info_reply(
    config: &tally_config::Config,
    operator: tally_wire::PublicKey,
    connections_per_address_max: usize,
) -> tally_wire::InfoReply {
    let limits = &config.limits;
    let ms = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
    tally_wire::InfoReply {
        chain_id: config.chain_id_bytes(),
        operator_public_key: operator,
        node_id: config.node.id,
        frame_bytes_max: config.limits.frame_bytes_max,
        reply_payload_bytes_max: tally_wire::REPLY_PAYLOAD_BYTES_MAX,
        requests_in_flight_max: config.limits.requests_in_flight_per_connection_max,
        headers_per_reply_max: tally_wire::HEADERS_PER_REPLY_MAX,
        client_limits: Some(tally_wire::ClientLimits {
            handshake_timeout_ms: ms(limits.handshake_timeout_ms),
            first_request_timeout_ms: ms(limits.first_request_timeout_ms),
            frame_timeout_ms: ms(limits.frame_timeout_ms),
            idle_timeout_ms: ms(limits.idle_timeout_ms),
            write_timeout_ms: ms(limits.write_timeout_ms),
            connections_per_address_max: u32::try_from(connections_per_address_max)
                .unwrap_or(u32::MAX),
        }),
    }
}

/// Cluster state shared with connection tasks (lock-free reads).
pub struct ClusterView {
    pub node_id: u64,
    pub leader_id: AtomicU64,
    pub term: AtomicU64,
    pub role: AtomicU8,
    pub commit_index: AtomicU64,
    /// Set when this replica leads and its master may sequence.
    pub writable: std::sync::atomic::AtomicBool,
    /// Client addresses of every replica, for `not_leader` hints.
    pub client_addresses: HashMap<u64, String>,
    /// The answer to `GetInfo` (the ledger and this replica's limits), once the node set it.
    pub info: Option<tally_wire::InfoReply>,
}

impl ClusterView {
    pub fn new(node_id: u64, client_addresses: HashMap<u64, String>) -> ClusterView {
        ClusterView {
            node_id,
            leader_id: AtomicU64::new(0),
            term: AtomicU64::new(0),
            role: AtomicU8::new(0),
            commit_index: AtomicU64::new(0),
            writable: std::sync::atomic::AtomicBool::new(false),
            client_addresses,
            info: None,
        }
    }

    /// The view, answering `GetInfo` with `info`.
    pub fn with_info(self, info: tally_wire::InfoReply) -> ClusterView {
        ClusterView {
            info: Some(info),
            ..self
        }
    }

    pub fn leader_hint(&self) -> String {
        let leader = self.leader_id.load(Ordering::SeqCst);
        if leader == self.node_id {
            return String::new();
        }
        self.client_addresses
            .get(&leader)
            .cloned()
            .unwrap_or_default()
    }

    /// The answer to a write this replica cannot take now.
    pub fn not_writable(&self) -> ErrorReply {
        let leader = self.leader_id.load(Ordering::SeqCst);
        if leader != 0 && leader != self.node_id {
            let mut r =
                ErrorReply::new(ErrorCode::NotLeader, format!("node {leader} is the leader"));
            r.leader_hint = self.leader_hint();
            r.retry = Retry::Elsewhere;
            r
        } else {
            let mut r = ErrorReply::new(
                ErrorCode::Unavailable,
                "no leader is ready yet; retry shortly",
            );
            r.retry_after_ms = 100;
            r
        }
    }
}

/// State the apply thread publishes for the raft thread and the master.
pub struct Applied {
    /// Highest raft index whose effects are applied (batches and empty entries alike).
    pub index: AtomicU64,
    /// The ledger summary after the last applied batch.
    pub meta: Mutex<LedgerMeta>,
    /// The summary of the last batch the ledger holds whole (its archive included): the raft
    /// log is compacted up to it, never further (`LedgerStore::compactable_meta`).
    pub compactable: Mutex<LedgerMeta>,
}

/// How long a shutting-down replica waits for its proposals to commit.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

pub struct RaftThread<S: RaftLogStore + SnapshotDescriptor> {
    pub replica: Replica<S>,
    pub events: Receiver<RaftEvent>,
    pub peers: PeerSenders,
    pub apply: Sender<StorageCmd>,
    pub master: Sender<MasterEvent>,
    pub applied: Arc<Applied>,
    pub view: Arc<ClusterView>,
    pub tick: Duration,
    pub single_voter: bool,
    /// Compact the raft log once this many entries are applied past the last snapshot point.
    pub compaction_entries: u64,
    /// ... or once the entries committed since the last compaction carry this many bytes.
    pub compaction_bytes: u64,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Whether this replica may start an election now (`archive::may_campaign`); asked at
    /// every tick while it does not lead.
    pub may_campaign: Box<dyn Fn() -> bool + Send>,
}

struct Io<'a> {
    peers: &'a PeerSenders,
    apply: &'a Sender<StorageCmd>,
    stash: &'a mut HashMap<Hash, Vec<(u32, ReplyTo, bool)>>,
    reads: &'a mut HashMap<u64, StorageCmd>,
    ready_reads: &'a mut VecDeque<(u64, StorageCmd)>,
    /// Peers a snapshot message could not be queued for: raft must be told, or it waits forever.
    failed_snapshots: Vec<u64>,
    /// Bytes of entries committed since the raft log was last compacted.
    committed_bytes: &'a mut u64,
}

impl RaftIo for Io<'_> {
    fn send(&mut self, messages: Vec<Message>) {
        for m in messages {
            let to = m.to;
            let snapshot = m.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot;
            if !self.peers.send(to, encode_message(&m)) && snapshot {
                self.failed_snapshots.push(to);
            }
        }
    }

    fn install_snapshot(&mut self, snapshot: &Snapshot) -> tally_core::Result<()> {
        let index = snapshot.get_metadata().index;
        let (tx, rx) = crossbeam_channel::bounded(1);
        let data = snapshot.data.to_vec();
        self.apply
            .send(StorageCmd::InstallSnapshot {
                index,
                descriptor: data,
                done: tx,
            })
            .map_err(|_| tally_core::Error::Storage("the apply thread has stopped".into()))?;
        rx.recv()
            .map_err(|_| tally_core::Error::Storage("the apply thread has stopped".into()))?
    }

    fn apply(&mut self, entries: Vec<Entry>) {
        for e in entries {
            *self.committed_bytes += e.data.len() as u64;
            let cmd = if is_batch(&e) {
                match BatchBody::decode(&e.data) {
                    Ok(body) => {
                        let replies = self
                            .stash
                            .remove(&header_hash(&body.header))
                            .unwrap_or_default();
                        StorageCmd::Apply {
                            body,
                            replies,
                            raft_index: e.index,
                        }
                    }
                    // Deterministic on every replica: a committed entry that is not a batch body
                    // is skipped by all of them alike.
                    Err(err) => {
                        tracing::error!(
                            index = e.index,
                            "committed entry is not a batch body: {err}"
                        );
                        StorageCmd::AppliedIndex {
                            raft_index: e.index,
                        }
                    }
                }
            } else {
                StorageCmd::AppliedIndex {
                    raft_index: e.index,
                }
            };
            if self.apply.send(cmd).is_err() {
                return;
            }
        }
    }

    fn read_ready(&mut self, states: Vec<ReadState>) {
        for s in states {
            let ctx = u64::from_le_bytes(s.request_ctx.as_slice().try_into().unwrap_or([0; 8]));
            if let Some(cmd) = self.reads.remove(&ctx) {
                self.ready_reads.push_back((s.index, cmd));
            }
        }
    }
}

impl<S: RaftLogStore + SnapshotDescriptor> RaftThread<S> {
    pub fn run(mut self) {
        let mut stash: HashMap<Hash, Vec<(u32, ReplyTo, bool)>> = HashMap::new();
        let mut reads: HashMap<u64, StorageCmd> = HashMap::new();
        let mut ready_reads: VecDeque<(u64, StorageCmd)> = VecDeque::new();
        let mut read_ctx = 0u64;
        let mut epoch = 0u64;
        // Set while leading and waiting for the applied index to reach this raft index.
        let mut lead_at: Option<u64> = None;
        let mut leading = false;
        let mut last_role = Role::Follower;
        let mut draining: Option<Instant> = None;
        let mut committed_bytes = 0u64;
        let mut next_tick = Instant::now() + self.tick;
        if self.single_voter {
            // Nobody else can vote: do not wait out an election timeout.
            let _ = self.replica.campaign();
        }
        loop {
            let timeout = next_tick.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(timeout) {
                Ok(RaftEvent::Drain) => draining = Some(Instant::now()),
                // (`Replica::step` also releases a follower paused for a snapshot whose
                // acknowledgement was lost, once it answers a heartbeat.)
                Ok(RaftEvent::Peer(m)) => self.replica.step(m),
                Ok(RaftEvent::Unreachable(id)) => {
                    self.replica.report_unreachable(id);
                    self.replica.report_snapshot(id, false);
                }
                Ok(RaftEvent::Propose {
                    body,
                    replies,
                    epoch: e,
                }) => {
                    if !leading || e != epoch {
                        fail(replies, self.view.not_writable());
                    } else {
                        let key = header_hash(&body.header);
                        match self.replica.propose(body.encode()) {
                            Ok(()) => {
                                stash.insert(key, replies);
                            }
                            Err(why) => {
                                tracing::warn!(
                                    "proposal refused: {why}; resynchronizing the master"
                                );
                                fail(replies, self.view.not_writable());
                                leading = false;
                                self.view.writable.store(false, Ordering::SeqCst);
                                let _ = self.master.send(MasterEvent::Follow);
                                lead_at = self
                                    .replica
                                    .term_start_index()
                                    .map(|_| self.replica.status().last_index);
                            }
                        }
                    }
                }
                Ok(RaftEvent::Read { cmd }) => {
                    if self.replica.status().role == Role::Leader {
                        read_ctx += 1;
                        reads.insert(read_ctx, cmd);
                        self.replica.read_index(read_ctx.to_le_bytes().to_vec());
                    } else {
                        fail_cmd(cmd, self.view.not_writable());
                    }
                }
                Ok(RaftEvent::Status { reply }) => {
                    let status = self.replica.status();
                    let _ = self.apply.send(StorageCmd::Status {
                        raft: status,
                        writable: self.view.writable.load(Ordering::SeqCst),
                        leader_client_address: self.view.leader_hint(),
                        reply,
                    });
                }
                Ok(RaftEvent::TransferLeader(to)) => {
                    // 0: the follower that holds most of the log.
                    let to = if to == 0 {
                        self.replica.best_transferee()
                    } else {
                        Some(to)
                    };
                    if let Some(to) = to {
                        tracing::info!(to, "transferring leadership");
                        self.replica.transfer_leader(to);
                    }
                }
                Ok(RaftEvent::Resync) => {
                    if leading {
                        leading = false;
                        self.view.writable.store(false, Ordering::SeqCst);
                        let _ = self.master.send(MasterEvent::Follow);
                        lead_at = Some(self.replica.status().last_index);
                    }
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
            }
            if Instant::now() >= next_tick {
                if self.single_voter || (self.may_campaign)() {
                    self.replica.tick();
                } else {
                    self.replica.tick_without_campaign();
                }
                next_tick = Instant::now() + self.tick;
            }
            let mut io = Io {
                peers: &self.peers,
                apply: &self.apply,
                stash: &mut stash,
                reads: &mut reads,
                ready_reads: &mut ready_reads,
                failed_snapshots: Vec::new(),
                committed_bytes: &mut committed_bytes,
            };
            let started = Instant::now();
            let had_ready = self.replica.has_ready();
            if let Err(e) = self.replica.on_ready(&mut io) {
                crate::pipeline::fatal("raft persistence", &e);
            }
            if had_ready {
                self.metrics
                    .raft
                    .ready_seconds
                    .observe(started.elapsed().as_secs_f64());
            }
            for id in std::mem::take(&mut io.failed_snapshots) {
                self.replica.report_snapshot(id, false);
            }

            let status = self.replica.status();
            self.publish(&status);
            self.metrics
                .raft
                .proposals_in_flight
                .set(stash.len() as i64);
            if status.role != last_role {
                tracing::info!(
                    term = status.term,
                    leader = status.leader_id,
                    "raft role is now {:?}",
                    status.role
                );
                if status.role == Role::Leader {
                    self.metrics.raft.elections_total.inc();
                    lead_at = self.replica.term_start_index();
                } else if last_role == Role::Leader {
                    lead_at = None;
                    leading = false;
                    self.view.writable.store(false, Ordering::SeqCst);
                    let _ = self.master.send(MasterEvent::Follow);
                    let hint = self.view.not_writable();
                    for (_, replies) in stash.drain() {
                        fail(replies, hint.clone());
                    }
                    for (_, cmd) in reads.drain() {
                        fail_cmd(cmd, hint.clone());
                    }
                    while let Some((_, cmd)) = ready_reads.pop_front() {
                        fail_cmd(cmd, hint.clone());
                    }
                }
                last_role = status.role;
            }
            let applied = self.applied.index.load(Ordering::SeqCst);
            if let Some(at) = lead_at {
                if status.role == Role::Leader && applied >= at {
                    lead_at = None;
                    leading = true;
                    epoch += 1;
                    let meta = self.applied.meta.lock().expect("meta lock").clone();
                    tracing::info!(
                        term = status.term,
                        height = meta.height,
                        "leading: sequencing from the applied state"
                    );
                    let _ = self.master.send(MasterEvent::Lead {
                        term: status.term,
                        epoch,
                        meta,
                    });
                    self.view.writable.store(true, Ordering::SeqCst);
                }
            }
            while ready_reads
                .front()
                .is_some_and(|(index, _)| *index <= applied)
            {
                let (_, cmd) = ready_reads.pop_front().expect("front exists");
                let _ = self.apply.send(cmd);
            }
            self.maybe_compact(&mut committed_bytes);
            if let Some(since) = draining {
                if stash.is_empty() || since.elapsed() >= DRAIN_TIMEOUT {
                    let hint = self.view.not_writable();
                    for (_, replies) in stash.drain() {
                        fail(replies, hint.clone());
                    }
                    let _ = self.apply.send(StorageCmd::Stop);
                    return;
                }
            }
        }
    }

    /// Compacts the raft log up to the last batch the ledger holds whole (bodies and request
    /// index included, which a restart rebuilds from the raft log) once enough entries (or
    /// bytes) piled up, so the log stays bounded on disk (at full load 10,000 entries of 2,000
    /// requests would be about 6 GB, and rusty-leveldb compacts what it holds); a replica that
    /// needs older entries gets a snapshot instead.
    fn maybe_compact(&mut self, committed_bytes: &mut u64) {
        let meta = self.applied.compactable.lock().expect("meta lock").clone();
        let point = self
            .replica
            .store()
            .first_index()
            .unwrap_or(1)
            .saturating_sub(1);
        let entries_due = meta.raft_index >= point + self.compaction_entries.max(1);
        let bytes_due = *committed_bytes >= self.compaction_bytes.max(1) && meta.raft_index > point;
        if !entries_due && !bytes_due {
            return;
        }
        // After installing a peer's ledger that is newer than the snapshot named, the applied
        // raft index can be past what this log has committed; compacting there is refused
        // (RaftLogDb asserts). Wait until raft has caught up. (Found by tally-chaos.)
        let commit = self
            .replica
            .store()
            .initial_state()
            .map_or(0, |s| s.hard_state.commit);
        if meta.raft_index > commit {
            return;
        }
        self.replica
            .store_mut()
            .set_snapshot_descriptor(meta.encode().to_vec());
        if let Err(e) = self.replica.store_mut().compact(meta.raft_index) {
            crate::pipeline::fatal("compacting the raft log", &e);
        }
        *committed_bytes = 0;
        tracing::info!(
            index = meta.raft_index,
            height = meta.height,
            "raft log compacted"
        );
    }

    fn publish(&self, s: &ReplicaStatus) {
        let r = &self.metrics.raft;
        r.term.set(s.term as i64);
        r.role.set(s.role.code() as i64);
        r.leader_id.set(s.leader_id as i64);
        r.commit_index.set(s.commit_index as i64);
        // Ready: a leader is known and this replica has applied what it knows is committed.
        let applied = self.applied.index.load(Ordering::SeqCst);
        self.metrics
            .set_ready(s.leader_id != 0 && applied >= s.commit_index);
        self.view.leader_id.store(s.leader_id, Ordering::SeqCst);
        self.view.term.store(s.term, Ordering::SeqCst);
        self.view.role.store(s.role.code(), Ordering::SeqCst);
        self.view
            .commit_index
            .store(s.commit_index, Ordering::SeqCst);
    }
}

fn fail(replies: Vec<(u32, ReplyTo, bool)>, reply: ErrorReply) {
    for (_, to, _) in replies {
        to.send(&WireMessage::Error(reply.clone()));
    }
}

fn fail_cmd(cmd: StorageCmd, reply: ErrorReply) {
    if let Some(to) = cmd.into_reply() {
        to.send(&WireMessage::Error(reply));
    }
}
