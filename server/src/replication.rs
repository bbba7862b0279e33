//! The raft thread: a runtime around the engine's replication stage
//! (`tally_core::engine::replication`), which owns raft-rs and decides the leadership
//! hand-off, what proposals and committed entries become, reads and compaction. This thread
//! feeds it peer messages, proposals and ticks, and carries its commands out.
//!
//! Also here: the cluster view connections read (leader, role, writability) and `GetInfo`,
//! and, on a threshold operator's replica, the signing stage (`tally_core::signing`): it
//! needs what this thread has (leadership, the peers, proposals), and its work is ~1.6 ms of
//! CPU per batch on the leader.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use raft::eraftpb::{Message, Snapshot};
use tally_core::engine::members::AddressBook;
use tally_core::engine::replication::{is_snapshot, ReplOut, Replication};
use tally_core::engine::Refusal;
use tally_core::replica::{encode_message, RaftLogStore, ReplicaStatus, Role};

use tally_core::signing::{SignOut, Signing, SigningStats};

use crate::channels::{Applied, MasterEvent, RaftEvent, ReplyTo, StorageCmd};
use crate::peer::{PeerSenders, FRAME_RAFT, FRAME_SIGN};
use crate::view::ClusterView;

/// How long a shutting-down replica waits for its proposals to commit.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The raft thread's wiring. The decisions are the engine's ([`Replication`]); this thread
/// feeds it events and ticks, carries its commands to peers, the master and the storage
/// thread, and keeps the cluster view and metrics current.
pub struct RaftThread<S: RaftLogStore> {
    pub engine: Replication<S, ReplyTo, StorageCmd>,
    pub events: Receiver<RaftEvent>,
    pub peers: PeerSenders,
    pub apply: Sender<StorageCmd>,
    pub master: Sender<MasterEvent>,
    pub applied: Arc<Applied>,
    pub view: Arc<ClusterView>,
    pub tick: Duration,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Whether this replica may start an election now (`archive::may_campaign`); asked at
    /// every tick while it does not lead.
    pub may_campaign: Box<dyn Fn() -> bool + Send>,
    /// The signing stage of a threshold operator's replica; None with a whole key.
    pub signing: Option<Signing<rand::rngs::OsRng>>,
    /// The origin of the signing stage's clock.
    pub started: Instant,
    /// The signing stage's figures as last published.
    pub signing_seen: SigningStats,
    /// The leader this replica knew at the last drive.
    pub leader_seen: u64,
    /// When this replica, leading without a share of the group that must sign, last handed
    /// leadership over.
    pub handed_over_at: Option<Instant>,
    /// The raft index of the newest snapshot handed to the storage thread to install: until
    /// the ledger has applied it, this replica does not campaign (it could not serve).
    pub installing_to: u64,
}

/// How often a leader that cannot coordinate a signature tries to hand leadership over.
const HAND_OVER_EVERY: Duration = Duration::from_secs(1);

type Out = Vec<ReplOut<ReplyTo, StorageCmd>>;

impl<S: RaftLogStore> RaftThread<S> {
    pub fn run(mut self) {
        let mut draining: Option<Instant> = None;
        let mut next_tick = Instant::now() + self.tick;
        let mut out: Out = Vec::new();
        self.address_book(self.engine.book().clone());
        if self.single_voter() {
            // Nobody else can vote: do not wait out an election timeout.
            let _ = self.engine.replica_mut().campaign();
        }
        loop {
            let timeout = next_tick.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(timeout) {
                Ok(RaftEvent::Drain) => draining = Some(Instant::now()),
                Ok(event) => self.event(event, &mut out),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
            }
            if Instant::now() >= next_tick {
                let may_campaign =
                    self.single_voter() || ((self.may_campaign)() && !self.installing());
                self.engine.tick(may_campaign, &mut out);
                next_tick = Instant::now() + self.tick;
            }
            self.sign(|s, now, o| s.tick(now, o));
            self.hand_over_if_stranded();
            self.drive(&mut out);
            if let Some(since) = draining {
                if self.engine.proposals_in_flight() == 0 || since.elapsed() >= DRAIN_TIMEOUT {
                    self.engine.refuse_proposals(&mut out);
                    self.execute(&mut out);
                    let _ = self.apply.send(StorageCmd::Stop);
                    return;
                }
            }
        }
    }

    fn event(&mut self, event: RaftEvent, out: &mut Out) {
        match event {
            // (`Replica::step` also releases a follower paused for a snapshot whose
            // acknowledgement was lost, once it answers a heartbeat.)
            RaftEvent::Peer(m) => self.engine.step(m),
            RaftEvent::Unreachable(id) => self.engine.unreachable(id),
            RaftEvent::PeerClosed(id) => self.engine.peer_closed(id),
            RaftEvent::Propose {
                body,
                waiters,
                sealed,
                epoch,
            } => self
                .engine
                .propose(&body, waiters, Some(sealed), epoch, out),
            RaftEvent::Read { cmd } => self.engine.read(cmd, out),
            RaftEvent::Status { reply } => {
                let _ = self.apply.send(StorageCmd::Status {
                    raft: self.engine.status(),
                    writable: self.view.writable.load(Ordering::SeqCst),
                    leader_client_address: self.view.leader_hint(),
                    reply,
                });
            }
            RaftEvent::TransferLeader(to) => {
                // 0: the follower that holds most of the log.
                let replica = self.engine.replica_mut();
                let to = if to == 0 {
                    replica.best_transferee()
                } else {
                    Some(to)
                };
                if let Some(to) = to {
                    tracing::info!(to, "transferring leadership");
                    replica.transfer_leader(to);
                }
            }
            RaftEvent::Resync => self.engine.resync(out),
            RaftEvent::Members { reply } => self.engine.members(reply, out),
            RaftEvent::ChangeMembers { change, reply } => {
                tracing::info!(?change, "membership change asked");
                self.engine.change_members(change, reply, out);
            }
            RaftEvent::RotateKey { new_key, reply } => {
                tracing::info!(new_key = %hex::encode(new_key), "operator key rotation asked");
                if let Err(e) = self.master.try_send(MasterEvent::Rotate { new_key, reply }) {
                    if let MasterEvent::Rotate { reply, .. } = e.into_inner() {
                        reply.busy("the master's event queue", 20);
                    }
                }
            }
            RaftEvent::SignPeer { from, msg } => {
                if let Ok(from) = u16::try_from(from) {
                    self.sign(|s, now, o| s.message(from, msg, now, o));
                }
            }
            RaftEvent::Unsigned(header) => self.sign(|s, now, o| s.applied(header, now, o)),
            RaftEvent::HeaderSigned {
                height,
                checkpoint,
                key,
            } => self.sign(|s, now, o| s.header_signed(height, checkpoint, key, now, o)),
            RaftEvent::CheckpointSigned(height) => self.sign(|s, _, _| s.checkpoint_signed(height)),
            RaftEvent::Drain => unreachable!("handled by the loop"),
        }
    }

    /// A threshold leader that holds no share of the group an unsigned item needs (a replica
    /// left out of the group rotated to) cannot coordinate its signature: it hands leadership
    /// to the follower that holds most of the log, at most once a second, until a member
    /// leads. (A replica campaigns only while it holds the next header's group, `node.rs`.)
    fn hand_over_if_stranded(&mut self) {
        let Some(signing) = &self.signing else {
            return;
        };
        let leading = self.view.writable.load(Ordering::SeqCst);
        let recently = self
            .handed_over_at
            .is_some_and(|t| t.elapsed() < HAND_OVER_EVERY);
        if !leading || recently || !signing.lacks_a_group() {
            return;
        }
        self.handed_over_at = Some(Instant::now());
        let replica = self.engine.replica_mut();
        if let Some(to) = replica.best_transferee() {
            tracing::warn!(
                to,
                "this replica holds no share of the group that signs next; handing leadership over"
            );
            replica.transfer_leader(to);
        }
    }

    /// Whether the ledger is still installing a snapshot raft has moved to.
    fn installing(&self) -> bool {
        self.applied.index.load(Ordering::SeqCst) < self.installing_to
    }

    /// Runs `step` on the signing stage, if any, and carries out what it says.
    fn sign(&mut self, step: impl FnOnce(&mut Signing<rand::rngs::OsRng>, u64, &mut Vec<SignOut>)) {
        let Some(signing) = self.signing.as_mut() else {
            return;
        };
        let mut out = Vec::new();
        step(signing, self.started.elapsed().as_millis() as u64, &mut out);
        let (stats, (headers, checkpoints)) = (signing.stats(), signing.signed_through());
        self.publish_signing(stats, headers, checkpoints);
        for o in out {
            match o {
                SignOut::Send(to, msg) => {
                    self.peers.send(to as u64, FRAME_SIGN, msg.encode());
                }
                SignOut::Broadcast(msg) => {
                    let bytes = msg.encode();
                    for to in self.peers.ids() {
                        self.peers.send(to, FRAME_SIGN, bytes.clone());
                    }
                }
                SignOut::Propose(item, signature) => {
                    if self.engine.propose_signature(item, &signature) {
                        tracing::debug!(?item, "threshold signature proposed");
                    }
                }
            }
        }
    }

    /// Runs raft's ready work, the hand-off and compaction, and carries out the commands.
    fn drive(&mut self, out: &mut Out) {
        let started = Instant::now();
        let had_ready = self.engine.replica().has_ready();
        let apply = self.apply.clone();
        let mut installing = self.installing_to;
        let mut install = |snapshot: &Snapshot| {
            installing = installing.max(snapshot.get_metadata().index);
            install_snapshot(&apply, snapshot)
        };
        if let Err(e) = self.engine.drive(&mut install, out) {
            crate::fail::fatal("raft persistence", &e);
        }
        self.installing_to = installing;
        if had_ready {
            let seconds = started.elapsed().as_secs_f64();
            self.metrics.raft.ready_seconds.observe(seconds);
        }
        self.execute(out);
        let applied = &self.applied;
        let index = applied.index.load(Ordering::SeqCst);
        self.engine.applied(
            index,
            || applied.meta.lock().expect("meta lock").clone(),
            out,
        );
        let compactable = applied.compactable.lock().expect("meta lock").clone();
        if let Err(e) = self.engine.maybe_compact(&compactable, out) {
            crate::fail::fatal("compacting the raft log", &e);
        }
        self.execute(out);
        let status = self.engine.status();
        if status.leader_id != std::mem::replace(&mut self.leader_seen, status.leader_id) {
            // A new leader coordinates the signing: it needs every signer's stock now.
            self.sign(|s, now, o| s.announce(now, o));
        }
        self.publish(&status);
        let in_flight = self.engine.proposals_in_flight() as i64;
        self.metrics.raft.proposals_in_flight.set(in_flight);
    }

    fn execute(&mut self, out: &mut Out) {
        for command in out.drain(..) {
            match command {
                ReplOut::Send(messages) => self.send(messages),
                ReplOut::Committed(c) => {
                    let _ = self.apply.send(StorageCmd::Committed(c));
                }
                ReplOut::Lead { term, epoch, meta } => {
                    tracing::info!(
                        term,
                        height = meta.height,
                        "leading: sequencing from the applied state"
                    );
                    let _ = self.master.send(MasterEvent::Lead { term, epoch, meta });
                    self.view.writable.store(true, Ordering::SeqCst);
                    self.sign(|s, _, _| s.set_leading(true));
                }
                ReplOut::Follow => {
                    self.view.writable.store(false, Ordering::SeqCst);
                    self.sign(|s, _, _| s.set_leading(false));
                    let _ = self.master.send(MasterEvent::Follow);
                }
                ReplOut::Refuse(reply, r) => reply.refuse(r, &self.view),
                ReplOut::RefuseRead(cmd) => {
                    if let Some(reply) = cmd.into_reply() {
                        reply.refuse(Refusal::NotWritable, &self.view);
                    }
                }
                ReplOut::Serve(cmd) => {
                    let _ = self.apply.send(cmd);
                }
                ReplOut::Role(s) => {
                    tracing::info!(
                        term = s.term,
                        leader = s.leader_id,
                        "raft role is now {:?}",
                        s.role
                    );
                    if s.role == Role::Leader {
                        self.metrics.raft.elections_total.inc();
                    }
                }
                ReplOut::Members {
                    reply,
                    leader_id,
                    members,
                } => reply.members(leader_id, members),
                ReplOut::RefuseChange(reply, why) => {
                    tracing::info!("membership change refused: {why}");
                    reply.error(tally_wire::ErrorCode::MembershipRefused, why);
                }
                ReplOut::AddressBook(book) => self.address_book(book),
                ReplOut::Removed => {
                    tracing::warn!("this replica was removed from the cluster; stopping");
                    eprintln!("tally-server: removed from the cluster; stopping");
                    std::process::exit(0);
                }
                ReplOut::Compacted(meta) => {
                    tracing::info!(
                        index = meta.raft_index,
                        height = meta.height,
                        "raft log compacted"
                    );
                }
            }
        }
    }

    /// Whether this replica is the only voter: it need not wait out an election timeout.
    fn single_voter(&self) -> bool {
        let voters = self.engine.replica().conf_state().voters;
        voters == [self.view.node_id]
    }

    /// The replicas' addresses changed: the view (hints, accepted peers, snapshot sources) and
    /// the dialing tasks follow.
    fn address_book(&mut self, book: AddressBook) {
        self.view.set_book(&book);
        self.peers.sync(&self.view.peers());
        tracing::info!(replicas = ?book.0.keys().collect::<Vec<_>>(), "address book");
    }

    /// Queues messages for peers; a snapshot that cannot be queued is reported, or raft would
    /// wait for it forever.
    fn send(&mut self, messages: Vec<Message>) {
        for m in messages {
            if !self.peers.send(m.to, FRAME_RAFT, encode_message(&m)) && is_snapshot(&m) {
                self.engine.report_snapshot(m.to, false);
            }
        }
    }

    /// The signing stage's figures, as metrics (counters by what they grew since last time).
    fn publish_signing(&mut self, stats: SigningStats, headers: u64, checkpoints: u64) {
        let r = &self.metrics.raft;
        r.threshold_headers_signed.set(headers as i64);
        r.threshold_checkpoints_signed.set(checkpoints as i64);
        let last = std::mem::replace(&mut self.signing_seen, stats);
        let rounds = &r.threshold_rounds;
        rounds
            .with_label_values(&["started"])
            .inc_by(stats.rounds - last.rounds);
        rounds
            .with_label_values(&["signed"])
            .inc_by(stats.signed - last.signed);
        rounds
            .with_label_values(&["failed"])
            .inc_by(stats.failed - last.failed);
        r.threshold_shares.inc_by(stats.shares - last.shares);
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

/// Has the storage thread bring the ledger to a snapshot's state, without waiting for it:
/// the committed entries after the snapshot point queue behind the install, and this thread
/// keeps voting and answering its leader meanwhile (a follower that blocked here for the
/// download could not vote, and a leader elected beside it lost its quorum). Raft's own log
/// moves to the snapshot point at once; a crash before the ledger follows is repaired at the
/// next start (`node.rs` `open_replica`).
fn install_snapshot(apply: &Sender<StorageCmd>, snapshot: &Snapshot) -> tally_core::Result<()> {
    apply
        .send(StorageCmd::InstallSnapshot {
            index: snapshot.get_metadata().index,
            descriptor: snapshot.data.to_vec(),
        })
        .map_err(|_| tally_core::Error::stopped("the storage thread"))
}
