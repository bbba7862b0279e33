//! The replication stage: raft-rs (through [`Replica`]) and the decisions around it.
//!
//! Leadership hand-off: when this replica becomes leader of term T, raft-rs appends an empty
//! entry at index I. Once everything up to I is applied, every entry of every earlier term is
//! too, so the applied state *is* the state to sequence on: the stage then says
//! [`ReplOut::Lead`] with a new epoch. When it stops leading it says [`ReplOut::Follow`] and
//! refuses the waiters of proposals not yet committed (they may still commit under the next
//! leader; a retry with the same id then gets the original confirmation).
//!
//! Each proposal carries the master's epoch. A proposal from another epoch is refused, and a
//! refused proposal or a superseded batch ([`Replication::resync`]) makes the master start over
//! from the applied state, because the batches sealed after it chain to it.

use std::collections::{BTreeMap, VecDeque};

use raft::eraftpb::{ConfChangeV2, ConfState, Entry, Message, MessageType, Snapshot};
use raft::ReadState;

use tally_wire::Hash;

use crate::batch::BatchBody;
use crate::crypto::header_hash;
use crate::replica::{is_batch, RaftIo, RaftLogStore, Replica, ReplicaStatus, Role};
use crate::state::LedgerMeta;
use crate::state_map::StateMap;
use crate::Result;

use super::apply::Committed;
use super::members::{decode_descriptor, encode_descriptor, AddressBook, MemberChange};
use super::{PlantedBug, Refusal, Waiter};
use tally_wire::Member;

/// Ticks during which a leader tells a replica it removed that its removal committed.
const REMOVAL_NOTICE_TICKS: u32 = 20;

#[derive(Debug, Clone, Copy)]
pub struct ReplicationConfig {
    /// Compact the raft log once this many entries are applied past the last snapshot point...
    pub compaction_entries: u64,
    /// ... or once the entries committed since the last compaction carry this many bytes.
    pub compaction_bytes: u64,
}

/// Commands of the replication stage. `R` answers a client, `Q` is a linearizable read.
#[derive(Debug)]
pub enum ReplOut<R, Q> {
    /// Raft messages for peers (best effort; raft retransmits what is lost). A snapshot message
    /// that cannot be queued must be reported: [`Replication::report_snapshot`].
    Send(Vec<Message>),
    /// A committed entry, in log order, for the apply stage.
    Committed(Committed<R>),
    /// The master may sequence from the applied state, under this term and epoch.
    Lead {
        term: u64,
        epoch: u64,
        meta: LedgerMeta,
    },
    /// The master must stop sequencing.
    Follow,
    Refuse(R, Refusal),
    /// A read this replica cannot serve linearizably (it does not lead).
    RefuseRead(Q),
    /// A read whose read index is applied: serve it from the applied state now.
    Serve(Q),
    /// This replica's raft role changed (for logs and metrics).
    Role(ReplicaStatus),
    /// The raft log was compacted up to this summary.
    Compacted(LedgerMeta),
    /// The replicas now (after a membership request or change): for an operator.
    Members {
        reply: R,
        leader_id: u64,
        members: Vec<Member>,
    },
    /// A membership change this replica cannot make (not retryable as is).
    RefuseChange(R, String),
    /// The address book changed: connect to whom it names.
    AddressBook(AddressBook),
    /// This replica was removed from the cluster: it must stop.
    Removed,
}

pub struct Replication<S: RaftLogStore, R, Q> {
    cfg: ReplicationConfig,
    replica: Replica<S>,
    /// Proposed batches not yet committed, by header hash.
    stash: BTreeMap<Hash, Proposal<R>>,
    reads: BTreeMap<u64, Q>,
    ready_reads: VecDeque<(u64, Q)>,
    read_ctx: u64,
    epoch: u64,
    /// Set while leading and waiting for the applied index to reach this raft index.
    lead_at: Option<u64>,
    leading: bool,
    last_role: Role,
    /// Bytes of entries committed since the raft log was last compacted.
    committed_bytes: u64,
    bug: Option<PlantedBug>,
    /// Where every replica is (see `members`).
    book: AddressBook,
    /// The operator waiting for the membership change this leader proposed.
    pending_change: Option<(MemberChange, R)>,
    /// Replicas this leader removed, each told for a few ticks that its removal committed:
    /// (id, commit index to announce, ticks left).
    removal_notices: Vec<(u64, u64, u32)>,
}

impl<S: RaftLogStore, R, Q> Replication<S, R, Q> {
    /// `book` is the address book the raft log holds (or the configured one at first start).
    pub fn new(
        cfg: ReplicationConfig,
        replica: Replica<S>,
        book: AddressBook,
    ) -> Replication<S, R, Q> {
        Replication {
            book,
            pending_change: None,
            removal_notices: Vec::new(),
            cfg,
            replica,
            stash: BTreeMap::new(),
            reads: BTreeMap::new(),
            ready_reads: VecDeque::new(),
            read_ctx: 0,
            epoch: 0,
            lead_at: None,
            leading: false,
            last_role: Role::Follower,
            committed_bytes: 0,
            bug: None,
        }
    }

    /// For the simulator's planted-bug tests only.
    pub fn plant(&mut self, bug: Option<PlantedBug>) {
        self.bug = bug;
    }

    pub fn replica(&self) -> &Replica<S> {
        &self.replica
    }

    pub fn replica_mut(&mut self) -> &mut Replica<S> {
        &mut self.replica
    }

    /// Where every replica is, as far as this one knows.
    pub fn book(&self) -> &AddressBook {
        &self.book
    }

    pub fn status(&self) -> ReplicaStatus {
        self.replica.status()
    }

    /// Whether the master sequences (this replica leads and has caught up).
    pub fn is_leading(&self) -> bool {
        self.leading
    }

    /// Proposed batches whose commit is awaited.
    pub fn proposals_in_flight(&self) -> usize {
        self.stash.len()
    }

    /// A tick of the raft clock. A replica that `may_campaign` not (see the server's archive
    /// rule) still votes and, leading, heartbeats.
    pub fn tick(&mut self, may_campaign: bool, out: &mut Vec<ReplOut<R, Q>>) {
        if may_campaign {
            self.replica.tick();
        } else {
            self.replica.tick_without_campaign();
        }
        self.notify_removed(out);
    }

    /// A replica this leader removed no longer hears from it, so it would never learn that
    /// its removal committed: for a few ticks it gets a heartbeat carrying the commit index.
    fn notify_removed(&mut self, out: &mut Vec<ReplOut<R, Q>>) {
        if self.replica.status().role != Role::Leader {
            self.removal_notices.clear();
            return;
        }
        let mut notices = Vec::new();
        for (id, commit, ticks) in &mut self.removal_notices {
            notices.push(self.replica.heartbeat_to(*id, *commit));
            *ticks -= 1;
        }
        self.removal_notices.retain(|(_, _, ticks)| *ticks > 0);
        if !notices.is_empty() {
            out.push(ReplOut::Send(notices));
        }
    }

    /// The replicas and their roles, answered to `reply`.
    pub fn members(&self, reply: R, out: &mut Vec<ReplOut<R, Q>>) {
        out.push(ReplOut::Members {
            reply,
            leader_id: self.replica.status().leader_id,
            members: self.book.members(&self.replica.conf_state()),
        });
    }

    /// An operator's membership change: proposed if this replica leads and the change can be
    /// made; `reply` is answered with the members once it is applied here.
    pub fn change_members(&mut self, change: MemberChange, reply: R, out: &mut Vec<ReplOut<R, Q>>) {
        let status = self.replica.status();
        if status.role != Role::Leader {
            out.push(ReplOut::Refuse(reply, Refusal::NotWritable));
            return;
        }
        if let Some(why) = change.refusal(&self.replica.conf_state(), status.id) {
            out.push(ReplOut::RefuseChange(reply, why));
            return;
        }
        if self.pending_change.is_some() {
            let why = "another membership change is pending; retry shortly".to_string();
            out.push(ReplOut::RefuseChange(reply, why));
            return;
        }
        let (cc, _) = change.to_conf_change();
        match self.replica.propose_conf_change(cc) {
            Ok(()) => self.pending_change = Some((change, reply)),
            Err(why) => out.push(ReplOut::RefuseChange(reply, why)),
        }
    }

    /// What follows a committed membership change applied here.
    fn conf_applied(&mut self, cc: &ConfChangeV2, conf: &ConfState, out: &mut Vec<ReplOut<R, Q>>) {
        let status = self.replica.status();
        let me = status.id;
        for change in cc.get_changes() {
            let removed = change.get_change_type() == raft::eraftpb::ConfChangeType::RemoveNode;
            // Only a change that removes this replica says it must stop: a replica that joined
            // later replays the changes before its own addition without being in them.
            if removed && change.node_id == me {
                assert!(
                    !conf.voters.contains(&me) && !conf.learners.contains(&me),
                    "a removal leaves the removed replica out"
                );
                out.push(ReplOut::Removed);
            }
            if removed && status.role == Role::Leader && change.node_id != me {
                let notice = (change.node_id, status.commit_index, REMOVAL_NOTICE_TICKS);
                self.removal_notices.push(notice);
            }
            let answers = |(c, _): &(MemberChange, R)| c.id() == change.node_id;
            if self.pending_change.as_ref().is_some_and(answers) {
                let (_, reply) = self.pending_change.take().expect("checked");
                self.members(reply, out);
            }
        }
    }

    /// A message from an authenticated peer.
    pub fn step(&mut self, m: Message) {
        if self.bug == Some(PlantedBug::SnapshotStall) {
            self.replica.step_raw(m);
        } else {
            self.replica.step(m);
        }
    }

    /// The transport lost a message to `peer`.
    pub fn unreachable(&mut self, peer: u64) {
        self.replica.report_unreachable(peer);
        self.replica.report_snapshot(peer, false);
    }

    /// The raft channel `peer` opened to this replica closed. If `peer` is the leader, it
    /// most likely died (a fail-stop replica exits, and the kernel closes its connections at
    /// once): this replica stops honouring its lease ([`crate::replica::Replica::leader_lost`]).
    pub fn peer_closed(&mut self, peer: u64) {
        self.replica.leader_lost(peer);
    }

    pub fn report_snapshot(&mut self, peer: u64, delivered: bool) {
        self.replica.report_snapshot(peer, delivered);
    }

    /// Proposes a batch the master sealed in `epoch`, with the state map its sequencer
    /// computed for it (see [`Proposal`]).
    pub fn propose(
        &mut self,
        body: &BatchBody,
        waiters: Vec<Waiter<R>>,
        sealed: Option<StateMap>,
        epoch: u64,
        out: &mut Vec<ReplOut<R, Q>>,
    ) {
        if !self.leading || epoch != self.epoch {
            refuse(waiters, out);
            return;
        }
        match self.replica.propose(body.encode()) {
            Ok(()) => {
                let proposal = Proposal { waiters, sealed };
                self.stash.insert(header_hash(&body.header), proposal);
            }
            Err(_) => {
                refuse(waiters, out);
                self.stop_leading(out);
                self.lead_at = self
                    .replica
                    .term_start_index()
                    .map(|_| self.replica.status().last_index);
            }
        }
    }

    /// Proposes a header's signature (a threshold operator's, `crate::signing`): best effort,
    /// as the signing stage proposes it again until it applies. False when not leading.
    pub fn propose_signature(
        &mut self,
        item: crate::signing::Item,
        signature: &tally_wire::Signature,
    ) -> bool {
        self.leading
            && self
                .replica
                .propose(crate::signing::encode_signature_entry(item, signature))
                .is_ok()
    }

    /// A committed batch did not extend the chain: the master must start over from the
    /// applied state once everything proposed so far is applied.
    pub fn resync(&mut self, out: &mut Vec<ReplOut<R, Q>>) {
        if self.leading {
            self.stop_leading(out);
            self.lead_at = Some(self.replica.status().last_index);
        }
    }

    /// A linearizable read: served once a read index is confirmed and applied.
    pub fn read(&mut self, q: Q, out: &mut Vec<ReplOut<R, Q>>) {
        if self.bug == Some(PlantedBug::ReadWithoutReadIndex) {
            out.push(ReplOut::Serve(q));
            return;
        }
        if self.replica.status().role != Role::Leader {
            out.push(ReplOut::RefuseRead(q));
            return;
        }
        self.read_ctx += 1;
        self.reads.insert(self.read_ctx, q);
        self.replica
            .read_index(self.read_ctx.to_le_bytes().to_vec());
    }

    fn stop_leading(&mut self, out: &mut Vec<ReplOut<R, Q>>) {
        self.leading = false;
        out.push(ReplOut::Follow);
    }

    /// Refuses every proposal still awaited (a shutdown that cannot wait any longer).
    pub fn refuse_proposals(&mut self, out: &mut Vec<ReplOut<R, Q>>) {
        for (_, proposal) in std::mem::take(&mut self.stash) {
            refuse(proposal.waiters, out);
        }
    }

    /// Processes everything raft has ready (persisting through the log store) and follows the
    /// role. `install` brings the ledger to a snapshot a leader sent; its error stops the node.
    pub fn drive(
        &mut self,
        install: &mut dyn FnMut(&Snapshot) -> Result<()>,
        out: &mut Vec<ReplOut<R, Q>>,
    ) -> Result<()> {
        let mut io = Io {
            stash: &mut self.stash,
            reads: &mut self.reads,
            ready_reads: &mut self.ready_reads,
            committed_bytes: &mut self.committed_bytes,
            install,
            book: &mut self.book,
            changes: Vec::new(),
            installed_book: false,
            out,
        };
        self.replica.on_ready(&mut io)?;
        let (changes, installed_book) = (std::mem::take(&mut io.changes), io.installed_book);
        if installed_book {
            // The snapshot's descriptor named the replicas; keep them with its configuration.
            let conf = self.replica.conf_state();
            let book = self.book.encode();
            self.replica.store_mut().set_conf_state(&conf, &book)?;
            out.push(ReplOut::AddressBook(self.book.clone()));
        }
        for (cc, conf) in &changes {
            self.conf_applied(cc, conf, out);
        }
        self.follow_role(out);
        Ok(())
    }

    fn follow_role(&mut self, out: &mut Vec<ReplOut<R, Q>>) {
        let status = self.replica.status();
        if status.role == self.last_role {
            return;
        }
        out.push(ReplOut::Role(status));
        if status.role == Role::Leader {
            self.lead_at = self.replica.term_start_index();
        } else if self.last_role == Role::Leader {
            self.lead_at = None;
            self.stop_leading(out);
            self.refuse_proposals(out);
            if let Some((_, reply)) = self.pending_change.take() {
                let why = "leadership changed before the membership change applied; check \
                           tally cluster members"
                    .to_string();
                out.push(ReplOut::RefuseChange(reply, why));
            }
            for (_, q) in std::mem::take(&mut self.reads) {
                out.push(ReplOut::RefuseRead(q));
            }
            for (_, q) in self.ready_reads.drain(..) {
                out.push(ReplOut::RefuseRead(q));
            }
        }
        self.last_role = status.role;
    }

    /// What becomes possible as the apply stage reaches `applied_index`: the hand-off to the
    /// master (`meta` is asked for only then) and reads whose index is applied.
    pub fn applied(
        &mut self,
        applied_index: u64,
        meta: impl FnOnce() -> LedgerMeta,
        out: &mut Vec<ReplOut<R, Q>>,
    ) {
        let status = self.replica.status();
        if let Some(at) = self.lead_at {
            if status.role == Role::Leader && applied_index >= at {
                self.lead_at = None;
                self.leading = true;
                self.epoch += 1;
                out.push(ReplOut::Lead {
                    term: status.term,
                    epoch: self.epoch,
                    meta: meta(),
                });
            }
        }
        while self
            .ready_reads
            .front()
            .is_some_and(|(index, _)| *index <= applied_index)
        {
            let (_, q) = self.ready_reads.pop_front().expect("front exists");
            out.push(ReplOut::Serve(q));
        }
    }

    /// Compacts the raft log up to `compactable` (the last batch the ledger holds whole) once
    /// enough entries or bytes piled up since the last compaction; never past what this log
    /// has committed (after installing a peer's ledger newer than the snapshot named, the
    /// applied raft index can be ahead of the commit). A replica that needs older entries gets
    /// a snapshot instead.
    pub fn maybe_compact(
        &mut self,
        compactable: &LedgerMeta,
        out: &mut Vec<ReplOut<R, Q>>,
    ) -> Result<()> {
        let store = self.replica.store();
        let point = store.first_index().unwrap_or(1).saturating_sub(1);
        let entries_due = compactable.raft_index >= point + self.cfg.compaction_entries.max(1);
        let bytes_due = self.committed_bytes >= self.cfg.compaction_bytes.max(1)
            && compactable.raft_index > point;
        if !entries_due && !bytes_due {
            return Ok(());
        }
        // A leader keeps the entries a follower catching up needs next (one just sent a
        // snapshot above all), up to HOLD_ENTRIES_FACTOR times the usual log: compacting them
        // away would send it another snapshot, and a snapshot that takes longer to transfer
        // than the leader takes to compact again would never let it catch up.
        let needed = self.replica.lowest_index_needed();
        let hold_max = point + HOLD_ENTRIES_FACTOR * self.cfg.compaction_entries.max(1);
        if needed.is_some_and(|n| n <= compactable.raft_index)
            && !bytes_due
            && compactable.raft_index < hold_max
        {
            return Ok(());
        }
        let commit = store.initial_state().map_or(0, |s| s.hard_state.commit);
        if compactable.raft_index > commit && self.bug != Some(PlantedBug::CompactPastCommit) {
            return Ok(());
        }
        let store = self.replica.store_mut();
        store.set_snapshot_descriptor(encode_descriptor(compactable, &self.book));
        store.compact(compactable.raft_index)?;
        self.committed_bytes = 0;
        out.push(ReplOut::Compacted(compactable.clone()));
        Ok(())
    }
}

/// How far past its usual length (`compaction_entries`) a leader's log may grow while a
/// follower catching up needs its older entries (`Replication::maybe_compact`).
pub const HOLD_ENTRIES_FACTOR: u64 = 4;

/// A proposed batch: who waits for it, and the state map the leader's sequencer computed for
/// it, which this replica's apply may take instead of computing it again (the header commits to
/// its root, and the replay still checks every receipt against the applied state).
struct Proposal<R> {
    waiters: Vec<Waiter<R>>,
    sealed: Option<StateMap>,
}

fn refuse<R, Q>(waiters: Vec<Waiter<R>>, out: &mut Vec<ReplOut<R, Q>>) {
    out.extend(
        waiters
            .into_iter()
            .map(|w| ReplOut::Refuse(w.reply, Refusal::NotWritable)),
    );
}

/// The driver's effects, as commands.
struct Io<'a, R, Q> {
    stash: &'a mut BTreeMap<Hash, Proposal<R>>,
    reads: &'a mut BTreeMap<u64, Q>,
    ready_reads: &'a mut VecDeque<(u64, Q)>,
    committed_bytes: &'a mut u64,
    install: &'a mut dyn FnMut(&Snapshot) -> Result<()>,
    book: &'a mut AddressBook,
    /// Membership changes applied during this ready, in order, with the configuration after.
    changes: Vec<(ConfChangeV2, ConfState)>,
    /// A snapshot replaced the address book.
    installed_book: bool,
    out: &'a mut Vec<ReplOut<R, Q>>,
}

impl<R, Q> RaftIo for Io<'_, R, Q> {
    fn send(&mut self, messages: Vec<Message>) {
        self.out.push(ReplOut::Send(messages));
    }

    fn install_snapshot(&mut self, snapshot: &Snapshot) -> Result<()> {
        (self.install)(snapshot)?;
        let (_, book) = decode_descriptor(&snapshot.data)?;
        if !book.0.is_empty() {
            *self.book = book;
            self.installed_book = true;
        }
        Ok(())
    }

    fn conf_changed(&mut self, change: &ConfChangeV2, conf: &ConfState) -> Vec<u8> {
        *self.book = self.book.after(change);
        self.out.push(ReplOut::AddressBook(self.book.clone()));
        self.changes.push((change.clone(), conf.clone()));
        self.book.encode()
    }

    fn apply(&mut self, entries: Vec<Entry>) {
        for e in entries {
            *self.committed_bytes += e.data.len() as u64;
            let raft_index = e.index;
            if let Some((item, signature)) = is_signature(&e) {
                let committed = Committed::Signature {
                    item,
                    signature,
                    raft_index,
                };
                self.out.push(ReplOut::Committed(committed));
                continue;
            }
            // Bytes that are not a batch body are skipped by every replica alike.
            let body = is_batch(&e)
                .then(|| BatchBody::decode(&e.data).ok())
                .flatten();
            let committed = match body {
                Some(body) => {
                    let proposal = self.stash.remove(&header_hash(&body.header));
                    let (waiters, sealed) =
                        proposal.map_or((Vec::new(), None), |p| (p.waiters, p.sealed));
                    Committed::Batch {
                        waiters,
                        sealed,
                        body,
                        encoded: e.data.to_vec(),
                        raft_index,
                    }
                }
                None => Committed::Other { raft_index },
            };
            self.out.push(ReplOut::Committed(committed));
        }
    }

    fn read_ready(&mut self, states: Vec<ReadState>) {
        for s in states {
            let ctx = u64::from_le_bytes(s.request_ctx.as_slice().try_into().unwrap_or([0; 8]));
            if let Some(q) = self.reads.remove(&ctx) {
                self.ready_reads.push_back((s.index, q));
            }
        }
    }
}

/// A signature entry's height and signature (`crate::signing`).
fn is_signature(e: &Entry) -> Option<(crate::signing::Item, tally_wire::Signature)> {
    match e.get_entry_type() == raft::eraftpb::EntryType::EntryNormal {
        true => crate::signing::decode_signature_entry(&e.data),
        false => None,
    }
}

/// Whether a message carries a snapshot (whose failed delivery must be reported).
pub fn is_snapshot(m: &Message) -> bool {
    m.get_msg_type() == MessageType::MsgSnapshot
}
