//! The Raft replication driver: a sans-IO wrapper around raft-rs's `RawNode`.
//!
//! One thread owns a [`Replica`]. Its loop feeds it inputs (ticks, peer messages, proposals,
//! read requests) and, whenever raft-rs has a `Ready`, calls [`Replica::on_ready`], which walks
//! the `Ready` in exactly the order raft-rs documents and hands every effect to a [`RaftIo`]:
//!
//! 1. messages a leader may send before persisting (`Ready::messages`);
//! 2. a snapshot to install;
//! 3. committed entries to apply;
//! 4. new entries and the hard state, persisted in one synced write;
//! 5. messages that had to wait for that write (`Ready::persisted_messages`);
//! 6. `advance`, then the light ready's commit index, messages and committed entries, and
//!    `advance_apply`.
//!
//! Every normal entry that carries data is one sealed batch body (see [`crate::batch`]); a
//! membership change is a conf change entry, applied to raft where it stands in the log and
//! persisted with its configuration (`RaftLogStore::set_conf_state`). Every replica starts from
//! the cluster's initial configuration.
//!
//! Caveat: raft-rs 0.7 decodes peer messages with protobuf 2.x, which can overflow the stack on
//! crafted input (RUSTSEC-2024-0437). Only bytes from mutually authenticated peers, bounded in
//! size, may ever reach [`decode_message`].

use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeV2, ConfState, Entry, EntryType, HardState, Message, MessageType,
    Snapshot,
};
use raft::{
    Config, ProgressState, RawNode, ReadOnlyOption, ReadState, SnapshotStatus, StateRole, Storage,
};

use crate::{Error, Result};

/// Durable raft state: the log, the hard state and the snapshot point. Implemented on LevelDB by
/// `tally-storage`; every write is synced before it returns.
pub trait RaftLogStore: Storage {
    /// Appends `entries` (replacing any conflicting suffix of the log) and records `hard_state`,
    /// in one synced write.
    fn persist(&mut self, entries: &[Entry], hard_state: Option<&HardState>) -> Result<()>;
    /// Makes `snapshot`'s metadata the start of the log: entries up to its index are dropped and
    /// the hard state's commit moves up to it.
    fn apply_snapshot(&mut self, snapshot: &Snapshot) -> Result<()>;
    /// Drops the entries up to and including `index`, which must be applied. Later snapshot
    /// requests describe the state at `index` (the snapshot point).
    fn compact(&mut self, index: u64) -> Result<()>;
    /// Records the commit index without syncing; it becomes durable with the next `persist`.
    /// After a crash it may be behind what was applied, which is why a restarting replica
    /// starts raft at `min(ledger's raft_index, hard state's commit)`.
    fn set_commit(&mut self, commit: u64) -> Result<()>;
    /// What the next `compact` records as the snapshot point's ledger state (the `LedgerMeta`
    /// there, encoded), sent to a replica that needs a snapshot.
    fn set_snapshot_descriptor(&mut self, bytes: Vec<u8>);
    /// Records the configuration after a committed membership change, with the address book
    /// that goes with it (opaque to the store), in one synced write.
    fn set_conf_state(&mut self, conf: &ConfState, address_book: &[u8]) -> Result<()>;
}

/// Where the driver's effects go. Implemented by the server with sockets and threads.
pub trait RaftIo {
    /// Messages for peers. Sending is best effort: raft retransmits what is lost.
    fn send(&mut self, messages: Vec<Message>);
    /// A snapshot from the leader: the ledger state must be brought to (at least) the state it
    /// describes before any later entry is applied.
    fn install_snapshot(&mut self, snapshot: &Snapshot) -> Result<()>;
    /// Committed entries, in log order, each exactly once per process lifetime.
    fn apply(&mut self, entries: Vec<Entry>);
    /// Read index requests whose index is known (`ReadState::request_ctx` names the request).
    fn read_ready(&mut self, states: Vec<ReadState>);
    /// A committed membership change was applied to raft: `conf` is the configuration now. Returns
    /// the address book to keep with it (see `engine::members`).
    fn conf_changed(&mut self, change: &ConfChangeV2, conf: &ConfState) -> Vec<u8>;
}

/// What a replica is, for status reports and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaStatus {
    pub id: u64,
    pub role: Role,
    pub term: u64,
    /// 0 when no leader is known.
    pub leader_id: u64,
    pub commit_index: u64,
    pub last_index: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Follower,
    Candidate,
    Leader,
    PreCandidate,
}

impl Role {
    /// The numbering used on the wire (`StatusReply::role`) and in metrics.
    pub fn code(self) -> u8 {
        match self {
            Role::Follower => 0,
            Role::Candidate => 1,
            Role::Leader => 2,
            Role::PreCandidate => 3,
        }
    }
}

impl From<StateRole> for Role {
    fn from(r: StateRole) -> Role {
        match r {
            StateRole::Follower => Role::Follower,
            StateRole::Candidate => Role::Candidate,
            StateRole::Leader => Role::Leader,
            StateRole::PreCandidate => Role::PreCandidate,
        }
    }
}

/// Timing and flow-control settings for [`Replica::new`].
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    pub id: u64,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// The highest log index already applied to the ledger (from the ledger's own storage).
    pub applied: u64,
    /// Cap on the bytes of entries in one append message.
    pub max_size_per_msg: u64,
    pub max_inflight_msgs: usize,
}

pub struct Replica<S: RaftLogStore> {
    node: RawNode<S>,
}

/// Builds the configuration state a new raft log starts from: the cluster's initial voters.
pub fn initial_conf_state(voters: &[u64]) -> ConfState {
    ConfState {
        voters: voters.to_vec(),
        ..ConfState::default()
    }
}

impl<S: RaftLogStore> Replica<S> {
    pub fn new(cfg: &ReplicaConfig, store: S, logger: &slog::Logger) -> Result<Replica<S>> {
        let config = Config {
            id: cfg.id,
            election_tick: cfg.election_ticks,
            heartbeat_tick: cfg.heartbeat_ticks,
            applied: cfg.applied,
            max_size_per_msg: cfg.max_size_per_msg,
            max_inflight_msgs: cfg.max_inflight_msgs,
            // A leader that cannot hear a quorum steps down, so a partitioned old leader stops
            // taking proposals; pre-vote keeps a rejoining replica from disrupting the term.
            check_quorum: true,
            pre_vote: true,
            read_only_option: ReadOnlyOption::Safe,
            ..Config::default()
        };
        config
            .validate()
            .map_err(|e| Error::Config(format!("raft config: {e}")))?;
        let node =
            RawNode::new(&config, store, logger).map_err(|e| Error::io("starting raft", e))?;
        Ok(Replica { node })
    }

    /// Starts an election now (a single-voter cluster need not wait for a timeout).
    pub fn campaign(&mut self) -> Result<()> {
        self.node.campaign().map_err(|e| Error::io("campaign", e))
    }

    pub fn tick(&mut self) {
        self.node.tick();
    }

    /// A tick for a replica that must not start an election (the server's rule: a replica
    /// whose ledger lacks history the archive holds). A leader ticks as usual; a follower's
    /// election clock stops one tick short of the longest timeout, which is past the lease
    /// (`election_ticks`), so it still votes for candidates; a (pre-)candidate's clock stops.
    pub fn tick_without_campaign(&mut self) {
        let raft = &mut self.node.raft;
        match raft.state {
            StateRole::Leader => {
                self.node.tick();
            }
            StateRole::Follower => {
                let longest = 2 * raft.election_timeout() - 1;
                raft.set_randomized_election_timeout(longest);
                if raft.election_elapsed + 1 < longest {
                    self.node.tick();
                }
                assert!(
                    self.node.raft.election_elapsed < longest,
                    "a replica that must not campaign reached its election timeout"
                );
            }
            StateRole::Candidate | StateRole::PreCandidate => {}
        }
    }

    /// A message from an authenticated peer. Errors (a message for another term, from an
    /// unknown peer) are not fatal: the message is dropped.
    ///
    /// A follower that answers heartbeats is no longer installing a snapshot. If its
    /// acknowledgement of the snapshot was lost, raft-rs would keep it paused until the next
    /// election; a heartbeat answer to a leader releases it (a no-op unless it is paused).
    pub fn step(&mut self, message: Message) {
        let heartbeat_answer_from =
            (message.get_msg_type() == MessageType::MsgHeartbeatResponse).then_some(message.from);
        self.step_raw(message);
        if let Some(from) = heartbeat_answer_from {
            if self.node.raft.state == StateRole::Leader {
                self.report_snapshot(from, true);
            }
        }
    }

    /// [`Self::step`] without releasing a follower paused for a snapshot: for fault injection
    /// (the simulator's `server-snapshot-stall` bug), never for serving.
    pub fn step_raw(&mut self, mut message: Message) {
        // A replica whose disk was wiped is still remembered by the leader as holding entries it
        // no longer has, and raft-rs panics when told to commit past its last entry. Clamping
        // the commit to what this log holds lets it reject the append instead, so the leader
        // walks back and sends a snapshot. Without data loss a heartbeat's commit never exceeds
        // the last index, so this changes nothing in normal operation.
        if message.get_msg_type() == MessageType::MsgHeartbeat {
            message.commit = message.commit.min(self.node.raft.raft_log.last_index());
        }
        match self.node.step(message) {
            // A response from a replica no longer (or not yet) in the configuration: expected
            // around membership changes.
            Ok(()) | Err(raft::Error::StepPeerNotFound) => {}
            Err(e) => tracing_free_log(&format!("raft: dropped a peer message: {e}")),
        }
    }

    /// Proposes one batch body. Fails when this replica is not the leader (or is transferring
    /// leadership); the caller then fails the batch's requests as retryable.
    pub fn propose(&mut self, data: Vec<u8>) -> std::result::Result<(), String> {
        if self.node.raft.state != StateRole::Leader {
            return Err("not the leader".into());
        }
        self.node
            .propose(Vec::new(), data)
            .map_err(|e| e.to_string())
    }

    /// Asks for a linearizable read point; answered through [`RaftIo::read_ready`].
    pub fn read_index(&mut self, ctx: Vec<u8>) {
        self.node.read_index(ctx);
    }

    pub fn transfer_leader(&mut self, to: u64) {
        self.node.transfer_leader(to);
    }

    /// The lowest log index a follower catching up still needs from this leader's log: the
    /// entry after the snapshot it is being sent, or after what it holds if it answered
    /// lately. None when this replica does not lead, or no such follower lags.
    pub fn lowest_index_needed(&self) -> Option<u64> {
        self.followers()?
            .filter_map(|(_, pr)| match pr.state {
                ProgressState::Snapshot => Some(pr.pending_snapshot + 1),
                _ if pr.recent_active => Some(pr.matched + 1),
                _ => None,
            })
            .min()
    }

    /// The follower that holds the most of the leader's log (the one that can take over
    /// soonest), when this replica leads and has followers.
    pub fn best_transferee(&self) -> Option<u64> {
        self.followers()?
            .max_by_key(|(id, pr)| (pr.matched, std::cmp::Reverse(*id)))
            .map(|(id, _)| id)
    }

    /// Each follower's progress as the leader tracks it; None when this replica does not lead.
    fn followers(&self) -> Option<impl Iterator<Item = (u64, &raft::Progress)>> {
        let raft = &self.node.raft;
        (raft.state == StateRole::Leader).then(|| {
            raft.prs()
                .iter()
                .filter(move |(id, _)| **id != raft.id)
                .map(|(id, pr)| (*id, pr))
        })
    }

    /// Sets how many ticks this replica waits before its next election timeout, replacing
    /// raft-rs's random draw. raft-rs draws from `rand::thread_rng`, which no seed reaches, so a
    /// deterministic simulation (tally-chaos `sim`) calls this after every input with a value
    /// from its own seeded generator. `ticks` must lie in `[election_ticks, 2 * election_ticks)`.
    pub fn set_election_timeout_ticks(&mut self, ticks: usize) {
        self.node.raft.set_randomized_election_timeout(ticks);
    }

    /// Tells raft whether a snapshot reached `id`; a lost one is resent instead of stalling.
    pub fn report_snapshot(&mut self, id: u64, delivered: bool) {
        let status = if delivered {
            SnapshotStatus::Finish
        } else {
            SnapshotStatus::Failure
        };
        self.node.report_snapshot(id, status);
    }

    /// The connection from `id` closed. When `id` is this follower's leader, its lease ends
    /// now instead of one election timeout after its last message: this replica grants votes
    /// at once, and campaigns itself after the random part of its election timeout (0 to
    /// `election_ticks` ticks, drawn by raft as usual, so that the followers of a dead leader
    /// do not all campaign together). Without it a follower's lease often outlived the other
    /// follower's own timeout, whose pre-vote it then ignored, and failover took two election
    /// timeouts. Only liveness is at stake: a leader that is still alive resets the clock with
    /// its next heartbeat, and a pre-vote changes no term.
    pub fn leader_lost(&mut self, id: u64) {
        let raft = &mut self.node.raft;
        if raft.state == StateRole::Follower && raft.leader_id == id && id != raft::INVALID_ID {
            raft.election_elapsed = raft.election_elapsed.max(raft.election_timeout());
        }
    }

    pub fn report_unreachable(&mut self, id: u64) {
        self.node.report_unreachable(id);
    }

    pub fn status(&self) -> ReplicaStatus {
        let raft = &self.node.raft;
        ReplicaStatus {
            id: raft.id,
            role: raft.state.into(),
            term: raft.term,
            leader_id: raft.leader_id,
            commit_index: raft.raft_log.committed,
            last_index: raft.raft_log.last_index(),
        }
    }

    /// The index of the first entry of the current term once this replica leads (the empty entry
    /// raft-rs appends on election): when it is applied, every earlier entry is too.
    pub fn term_start_index(&self) -> Option<u64> {
        let raft = &self.node.raft;
        if raft.state != StateRole::Leader {
            return None;
        }
        // raft-rs appends the empty entry at election; scanning back from the last index finds
        // the first entry whose term is the current one.
        let mut index = raft.raft_log.last_index();
        while index > raft.raft_log.committed.max(1) {
            match raft.raft_log.term(index - 1) {
                Ok(t) if t == raft.term => index -= 1,
                _ => break,
            }
        }
        Some(index)
    }

    pub fn store(&self) -> &S {
        self.node.store()
    }

    pub fn store_mut(&mut self) -> &mut S {
        self.node.mut_store()
    }

    /// Whether raft-rs has anything for [`Self::on_ready`] to process.
    pub fn has_ready(&self) -> bool {
        self.node.has_ready()
    }

    /// Processes everything raft-rs has ready, in its documented order.
    pub fn on_ready(&mut self, io: &mut impl RaftIo) -> Result<()> {
        if !self.node.has_ready() {
            return Ok(());
        }
        let mut ready = self.node.ready();
        if !ready.messages().is_empty() {
            io.send(ready.take_messages());
        }
        if !ready.snapshot().is_empty() {
            let snapshot = ready.snapshot().clone();
            io.install_snapshot(&snapshot)?;
            self.node.mut_store().apply_snapshot(&snapshot)?;
        }
        if !ready.read_states().is_empty() {
            io.read_ready(ready.take_read_states());
        }
        self.apply_committed(ready.take_committed_entries(), io)?;
        let entries = ready.take_entries();
        let hard_state = ready.hs().cloned();
        if !entries.is_empty() || hard_state.is_some() {
            self.node
                .mut_store()
                .persist(&entries, hard_state.as_ref())?;
        }
        if !ready.persisted_messages().is_empty() {
            io.send(ready.take_persisted_messages());
        }
        let mut light = self.node.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.node.mut_store().set_commit(commit)?;
        }
        if !light.messages().is_empty() {
            io.send(light.take_messages());
        }
        self.apply_committed(light.take_committed_entries(), io)?;
        self.node.advance_apply();
        Ok(())
    }

    /// Hands committed entries to `io` in log order; a membership change is applied to raft
    /// (and its configuration persisted) where it stands in the log, then handed on too, so the
    /// apply stage's index passes it.
    fn apply_committed(&mut self, entries: Vec<Entry>, io: &mut impl RaftIo) -> Result<()> {
        let mut run = Vec::new();
        for e in entries {
            let Some(cc) = conf_change(&e) else {
                run.push(e);
                continue;
            };
            if !run.is_empty() {
                io.apply(std::mem::take(&mut run));
            }
            // raft-rs checked the change when it was proposed; one it refuses now is refused
            // by every replica alike, and the configuration stays as it was.
            if let Ok(conf) = self.node.apply_conf_change(&cc) {
                let book = io.conf_changed(&cc, &conf);
                self.node.mut_store().set_conf_state(&conf, &book)?;
            }
            io.apply(vec![e]);
        }
        if !run.is_empty() {
            io.apply(run);
        }
        Ok(())
    }

    /// Proposes a membership change; fails when this replica does not lead or a change is
    /// still pending (raft-rs would silently turn a second one into an empty entry).
    pub fn propose_conf_change(&mut self, cc: ConfChangeV2) -> std::result::Result<(), String> {
        let raft = &self.node.raft;
        if raft.state != StateRole::Leader {
            return Err("not the leader".into());
        }
        if raft.has_pending_conf() {
            return Err("a membership change is still being applied; retry shortly".into());
        }
        let context = cc.context.to_vec();
        self.node
            .propose_conf_change(context, cc)
            .map_err(|e| e.to_string())
    }

    /// The configuration raft works with now (voters and learners).
    pub fn conf_state(&self) -> ConfState {
        self.node.raft.prs().conf().to_conf_state()
    }

    /// A heartbeat to `to` carrying `commit`: tells a replica just removed that the change
    /// removing it committed (the leader no longer replicates to it; see `engine::replication`).
    pub fn heartbeat_to(&self, to: u64, commit: u64) -> Message {
        let raft = &self.node.raft;
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgHeartbeat);
        m.to = to;
        m.from = raft.id;
        m.term = raft.term;
        m.commit = commit;
        m
    }
}

/// The membership change a committed entry carries, if it is one (v1 changes are read as v2).
fn conf_change(e: &Entry) -> Option<ConfChangeV2> {
    match e.get_entry_type() {
        EntryType::EntryConfChange => ConfChange::parse_from_bytes(&e.data).ok().map(|v1| {
            let mut single = raft::eraftpb::ConfChangeSingle::default();
            single.set_change_type(v1.get_change_type());
            single.node_id = v1.node_id;
            let mut cc = ConfChangeV2::default();
            cc.set_changes(vec![single].into());
            cc.context = v1.context;
            cc
        }),
        EntryType::EntryConfChangeV2 => ConfChangeV2::parse_from_bytes(&e.data).ok(),
        EntryType::EntryNormal => None,
    }
}

/// raft-rs logs through slog; tally-core has no logger of its own, so the rare messages the
/// driver itself emits go to stderr.
fn tracing_free_log(line: &str) {
    eprintln!("{line}");
}

/// True for an entry that carries a batch (not raft's own empty or configuration entries).
pub fn is_batch(entry: &Entry) -> bool {
    entry.get_entry_type() == EntryType::EntryNormal
        && !entry.data.is_empty()
        && crate::signing::decode_signature_entry(&entry.data).is_none()
}

/// Encodes a raft message for the peer transport.
pub fn encode_message(m: &Message) -> Vec<u8> {
    m.write_to_bytes()
        .expect("encoding a raft message cannot fail")
}

/// Decodes a raft message from an authenticated peer (see the caveat in the module docs).
pub fn decode_message(bytes: &[u8]) -> Result<Message> {
    Message::parse_from_bytes(bytes).map_err(|e| Error::Verify(format!("bad raft message: {e}")))
}
