//! One simulated replica: the server's engine (`tally_core::engine`: master, replication and
//! apply stages) over a [`SimLog`] and a `MemStore` ledger. Nothing here decides what a
//! replica does; this is the simulator's runtime, as `server/src/pipeline` and
//! `server/src/replication.rs` are the server's:
//!
//! - the stages run in one thread: each input is followed by [`SimNode::drive`], which carries
//!   every command to the stage it names until none is left (the server carries them across
//!   queues between threads);
//! - the snapshot stage's rule (`engine::master::precheck`) is applied against the ledger
//!   directly (the server's snapshot workers ask the storage thread);
//! - a snapshot install copies a peer's ledger (the server downloads and verifies a dump);
//! - election timeouts come from the simulation's seed, not raft-rs's thread rng.

use std::collections::VecDeque;
use std::sync::Arc;

use raft::eraftpb::{Message, Snapshot};
use rand::rngs::StdRng;
use rand::Rng;
use tally_core::batch::{BatchBody, Confirmed};
use tally_core::crypto::OperatorKey;
use tally_core::crypto::{envelope_hash, header_hash};
use tally_core::engine::apply::{Applied, Applier, ApplierConfig, ApplyOut};
use tally_core::engine::master::{
    precheck, precheck_envelope, Master, MasterConfig, MasterOut, Poll, Precheck,
};
use tally_core::engine::members::{decode_descriptor, AddressBook, MemberChange};
use tally_core::engine::replication::{ReplOut, Replication, ReplicationConfig};
use tally_core::engine::{PlantedBug, Refusal, Waiter};
use tally_core::key_chain::SigningKeys;
use tally_core::merkle::ProofTree;
use tally_core::ports::{LedgerStore, MemStore};
use tally_core::replica::{Replica, ReplicaConfig, Role};
use tally_core::sequencer::SequencerConfig;
use tally_core::state::LedgerMeta;
use tally_wire::{
    Confirmation, Envelope, EnvelopeConfirmation, ErrorCode, PublicKey, Request, SignedHeader,
};

use super::log::SimLog;
use super::{SimBug, Tuning};

/// Where an answer goes: a client and the attempt it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTo {
    pub client: usize,
    pub attempt: u64,
}

/// A client's request to a replica.
#[derive(Debug, Clone)]
pub enum ClientRequest {
    Submit(Request),
    SubmitEnvelope(Arc<Envelope>),
    /// A linearizable balance read.
    Read(PublicKey),
}

/// A replica's answer to a client.
#[derive(Debug, Clone)]
pub enum Answer {
    Confirmed(Box<Confirmation>),
    EnvelopeConfirmed(Box<EnvelopeConfirmation>),
    /// An envelope applied nothing: its operation `index` failed with `code` (`by` as for
    /// `Refused`).
    EnvelopeFailed {
        index: u32,
        code: ErrorCode,
        by: (u64, u64),
    },
    /// `hint` names the leader (0 when unknown).
    /// `by` is the refusing replica and its term, for deterministic refusals (else zeros).
    Refused {
        code: ErrorCode,
        hint: u64,
        by: (u64, u64),
    },
    Balance {
        height: u64,
    },
}

/// What a replica sends.
pub enum Out {
    Raft(Message),
    Reply(ReplyTo, Answer),
}

/// What the whole simulation watches while replicas run.
pub struct Watch<'a> {
    pub headers: &'a mut crate::history::HeaderLog,
    pub violations: &'a mut Vec<String>,
    pub step: u64,
    pub snapshots_installed: &'a mut u64,
    pub elections: &'a mut u64,
}

/// A linearizable read: who asked, for which account.
type Read = (ReplyTo, PublicKey);

/// The engine's three stages and the commands in flight between them (the server's queues).
struct Engine {
    master: Master<ReplyTo>,
    repl: Replication<SimLog, ReplyTo, Read>,
    applier: Applier<ReplyTo>,
    to_master: VecDeque<MasterOut<ReplyTo>>,
    to_repl: VecDeque<ReplOut<ReplyTo, Read>>,
    to_apply: VecDeque<ApplyOut<ReplyTo>>,
    /// (term, role) when the election timeout was last drawn, and the draw.
    timeout_key: (u64, Role),
}

pub struct SimNode {
    pub id: u64,
    log: SimLog,
    /// Durable: every apply is one atomic write.
    ledger: MemStore,
    operator: OperatorKey,
    engine: Option<Engine>,
    /// Set when the node must stop (the server exits on a divergence or a failed install).
    fatal: Option<String>,
    /// Set when the node applied its own removal from the cluster (the server exits).
    removed: bool,
}

/// Where the answers to the simulation's own membership commands go: nowhere (it watches the
/// leader's configuration instead).
const OPERATOR: ReplyTo = ReplyTo {
    client: usize::MAX,
    attempt: 0,
};

fn copy_store(s: &MemStore) -> MemStore {
    MemStore {
        meta: s.meta.clone(),
        accounts: s.accounts.clone(),
        requests: s.requests.clone(),
        headers: s.headers.clone(),
        bodies: s.bodies.clone(),
        reserves: s.reserves.clone(),
        checkpoints: s.checkpoints.clone(),
        checkpointed: s.checkpointed,
    }
}

/// The engine's planted bug for a simulator bug, if the bug lives in the engine.
fn planted(bug: Option<SimBug>) -> Option<PlantedBug> {
    match bug? {
        SimBug::ServerCompactsPastCommit => Some(PlantedBug::CompactPastCommit),
        SimBug::ServerSnapshotStall => Some(PlantedBug::SnapshotStall),
        SimBug::ReadWithoutReadIndex => Some(PlantedBug::ReadWithoutReadIndex),
        SimBug::ConfirmBeforeCommit => None,
    }
}

impl SimNode {
    pub fn new(id: u64, voters: &[u64], operator: OperatorKey) -> SimNode {
        SimNode {
            id,
            log: SimLog::new(voters),
            ledger: MemStore::default(),
            operator,
            engine: None,
            fatal: None,
            removed: false,
        }
    }

    /// Whether it applied its own removal (it must stop for good).
    pub fn removed(&self) -> bool {
        self.removed
    }

    /// The configuration raft works with, while the node runs.
    pub fn conf_state(&self) -> Option<raft::eraftpb::ConfState> {
        self.engine.as_ref().map(|e| e.repl.replica().conf_state())
    }

    /// An operator's membership change, asked of this replica (answered through its
    /// configuration, which the simulation watches).
    pub fn change_members(&mut self, change: MemberChange) {
        if let Some(e) = self.engine.as_mut() {
            let mut out = Vec::new();
            e.repl.change_members(change, OPERATOR, &mut out);
            e.to_repl.extend(out);
        }
    }

    pub fn transfer_leader(&mut self, to: u64) {
        if let Some(e) = self.engine.as_mut() {
            e.repl.replica_mut().transfer_leader(to);
        }
    }

    pub fn is_up(&self) -> bool {
        self.engine.is_some()
    }

    pub fn ledger(&self) -> &MemStore {
        &self.ledger
    }

    /// The applied state (the ledger's own summary while the node is down).
    pub fn meta(&self) -> &LedgerMeta {
        match &self.engine {
            Some(e) => e.applier.meta(),
            None => self.ledger.meta.as_ref().unwrap_or(&GENESIS),
        }
    }

    /// Whether it leads and takes writes.
    pub fn writable(&self) -> bool {
        self.engine.as_ref().is_some_and(|e| e.master.is_leading())
    }

    /// A one-line description for failure reports.
    pub fn describe(&self) -> String {
        let Some(e) = &self.engine else {
            return format!("node {}: down", self.id);
        };
        let s = e.repl.status();
        format!(
            "node {}: {:?} term {} leader {} commit {} last {} applied {} (height {}), log from {}",
            self.id,
            s.role,
            s.term,
            s.leader_id,
            s.commit_index,
            s.last_index,
            e.applier.applied_index(),
            e.applier.meta().height,
            self.log.snapshot_index() + 1
        )
    }

    /// Whether it must be stopped, and why.
    pub fn fatal(&self) -> Option<&str> {
        self.fatal.as_deref()
    }

    /// Starts (or restarts) the replica from its disk: the ledger as applied, the raft log as
    /// synced.
    pub fn start(&mut self, t: &Tuning) {
        assert!(self.engine.is_none(), "node {} is already up", self.id);
        let meta = self.ledger.meta().expect("a memory store cannot fail");
        let snapshot_index = self.log.snapshot_index();
        assert!(
            meta.raft_index >= snapshot_index,
            "node {}: the ledger (raft index {}) is behind the log's snapshot point {snapshot_index}",
            self.id,
            meta.raft_index
        );
        let cfg = ReplicaConfig {
            id: self.id,
            election_ticks: t.election_ticks,
            heartbeat_ticks: t.heartbeat_ticks,
            applied: meta.raft_index.min(self.log.commit()).max(snapshot_index),
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
        };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let replica =
            Replica::new(&cfg, self.log.clone(), &logger).expect("a valid replica config");
        self.engine = Some(Engine::new(t, replica, self.operator.clone(), meta));
        self.fatal = None;
    }

    /// A crash: everything in memory is gone, the disk stays (minus the unsynced commit index).
    pub fn crash(&mut self) {
        self.engine = None;
        self.log.crash();
        self.fatal = None;
    }

    pub fn tick(&mut self) {
        if let Some(e) = self.engine.as_mut() {
            let mut out = Vec::new();
            e.repl.tick(true, &mut out);
            e.to_repl.extend(out);
        }
    }

    /// The transport lost a message to `peer` (its connection broke).
    pub fn unreachable(&mut self, peer: u64) {
        if let Some(e) = self.engine.as_mut() {
            e.repl.unreachable(peer);
        }
    }

    pub fn step(&mut self, m: Message, _t: &Tuning) {
        if let Some(e) = self.engine.as_mut() {
            e.repl.step(m);
        }
    }

    /// A client's request. Its answer comes out of the next [`SimNode::drive`].
    pub fn request(&mut self, reply: ReplyTo, request: ClientRequest, now: u64) {
        let Some(e) = self.engine.as_mut() else {
            return;
        };
        match request {
            ClientRequest::Read(account) => {
                let mut out = Vec::new();
                e.repl.read((reply, account), &mut out);
                e.to_repl.extend(out);
            }
            ClientRequest::Submit(request) => {
                e.submit(&mut self.ledger, reply, request, now);
            }
            ClientRequest::SubmitEnvelope(envelope) => {
                e.submit_envelope(&mut self.ledger, reply, envelope, now);
            }
        }
    }

    /// Seals the open batch when it is due and the in-flight bound allows.
    pub fn maybe_seal(&mut self, now: u64) {
        if let Some(e) = self.engine.as_mut() {
            let poll = e.poll(now);
            let mut out = Vec::new();
            e.master
                .expire(&poll, &mut self.ledger)
                .expect("the simulated store does not fail");
            e.master.poll(&poll, &mut out);
            e.to_master.extend(out);
        }
    }

    /// Processes everything raft has ready and carries every command to its stage until none
    /// is left; then this replica's next election timeout (drawn from the simulation's seed).
    pub fn drive(
        &mut self,
        peers: &[Option<SimNode>],
        t: &Tuning,
        rng: &mut StdRng,
        watch: &mut Watch<'_>,
        out: &mut Vec<Out>,
    ) {
        let Some(e) = self.engine.as_mut() else {
            return;
        };
        let mut ctx = Ctx {
            id: self.id,
            ledger: &mut self.ledger,
            operator: &self.operator,
            bug: t.bug,
            watch,
            out,
            fatal: &mut self.fatal,
            removed: &mut self.removed,
        };
        e.ready(peers, &mut ctx);
        e.settle(&mut ctx);
        if ctx.fatal.is_some() {
            return;
        }
        let compactable = e.applier.meta().clone();
        let mut rout = Vec::new();
        let meta = || compactable.clone();
        e.repl.applied(e.applier.applied_index(), meta, &mut rout);
        e.repl
            .maybe_compact(&compactable, &mut rout)
            .expect("compaction of a memory log cannot fail");
        e.to_repl.extend(rout);
        e.settle(&mut ctx);
        let status = e.repl.status();
        let key = (status.term, status.role);
        if key != e.timeout_key {
            e.timeout_key = key;
            let ticks = rng.gen_range(t.election_ticks..2 * t.election_ticks);
            e.repl.replica_mut().set_election_timeout_ticks(ticks);
        }
    }
}

static GENESIS: std::sync::LazyLock<LedgerMeta> = std::sync::LazyLock::new(LedgerMeta::genesis);

/// What the stages' commands reach while a node is driven.
struct Ctx<'a, 'w> {
    id: u64,
    ledger: &'a mut MemStore,
    operator: &'a OperatorKey,
    bug: Option<SimBug>,
    watch: &'a mut Watch<'w>,
    out: &'a mut Vec<Out>,
    fatal: &'a mut Option<String>,
    removed: &'a mut bool,
}

impl Engine {
    fn new(
        t: &Tuning,
        replica: Replica<SimLog>,
        operator: OperatorKey,
        meta: LedgerMeta,
    ) -> Engine {
        let sequencer = SequencerConfig {
            chain_id: t.chain_id,
            operator_key_id: operator.key_id(),
            batch_requests_max: t.batch_requests_max,
            accounts_cached_max: 64,
            recent_heights_kept: 8,
        };
        let master = Master::new(MasterConfig {
            sequencer,
            window_ms: t.batch_window_ms,
            close_idle: true,
            in_flight_max: t.in_flight_max,
        });
        let repl_cfg = ReplicationConfig {
            compaction_entries: t.compaction_entries,
            compaction_bytes: u64::MAX,
        };
        // The simulator's network needs no addresses.
        let mut repl = Replication::new(repl_cfg, replica, AddressBook::default());
        repl.plant(planted(t.bug));
        let applier_cfg = ApplierConfig {
            parked_max: 1024,
            accounts_cached_max: 64,
        };
        let applier = Applier::new(applier_cfg, SigningKeys::single(operator), meta);
        Engine {
            master,
            repl,
            applier,
            to_master: VecDeque::new(),
            to_repl: VecDeque::new(),
            to_apply: VecDeque::new(),
            timeout_key: (u64::MAX, Role::Follower),
        }
    }

    fn poll(&self, now: u64) -> Poll {
        Poll {
            now_ms: now,
            unix_ms: now,
            applied_height: self.applier.meta().height,
            upstream_empty: true,
            stopping: false,
        }
    }

    /// The snapshot stage against the applied ledger, then the master.
    fn submit(&mut self, ledger: &mut MemStore, reply: ReplyTo, request: Request, now: u64) {
        let mut out = Vec::new();
        if !self.master.is_leading() {
            out.push(MasterOut::Refuse(reply, Refusal::NotWritable));
            self.to_master.extend(out);
            return;
        }
        let record = ledger.requests.get(&(request.signer, request.id)).copied();
        let balance = ledger.accounts.get(&request.signer).copied();
        match precheck(&request, record, balance) {
            Precheck::Pass => {
                let poll = self.poll(now);
                let applied = poll.applied_height;
                self.master
                    .submit(request, applied, reply, &poll, ledger, &mut out)
                    .expect("a memory store cannot fail");
            }
            Precheck::Replay(r) => out.push(MasterOut::Replay {
                height: r.height,
                index: r.index,
                request_hash: r.request_hash,
                reply,
            }),
            Precheck::Reject(r) => out.push(MasterOut::Reject(reply, r)),
        }
        self.to_master.extend(out);
    }

    /// An envelope through the snapshot stage's rule (`precheck_envelope`), then the master.
    fn submit_envelope(
        &mut self,
        ledger: &mut MemStore,
        reply: ReplyTo,
        envelope: Arc<Envelope>,
        now: u64,
    ) {
        let mut out = Vec::new();
        if !self.master.is_leading() {
            out.push(MasterOut::Refuse(reply, Refusal::NotWritable));
            self.to_master.extend(out);
            return;
        }
        let hash = envelope_hash(&envelope);
        let records: Vec<_> = envelope
            .ops
            .iter()
            .map(|op| ledger.requests.get(&(envelope.signer, op.id)).copied())
            .collect();
        match precheck_envelope(&hash, &records) {
            Ok(Precheck::Pass) => {
                let poll = self.poll(now);
                let applied = poll.applied_height;
                self.master
                    .submit_envelope(envelope, hash, applied, reply, &poll, ledger, &mut out)
                    .expect("a memory store cannot fail");
            }
            Ok(Precheck::Replay(r)) => out.push(MasterOut::Replay {
                height: r.height,
                index: r.index,
                request_hash: r.request_hash,
                reply,
            }),
            Ok(Precheck::Reject(r)) => out.push(MasterOut::Reject(reply, r)),
            Err((index, r)) => out.push(MasterOut::Fail(reply, index, r)),
        }
        self.to_master.extend(out);
    }

    /// Raft's ready work; a snapshot install copies the ledger of a peer that has it.
    fn ready(&mut self, peers: &[Option<SimNode>], ctx: &mut Ctx<'_, '_>) {
        let applier = &mut self.applier;
        let mut aout = Vec::new();
        let mut install = |snapshot: &Snapshot| -> tally_core::Result<()> {
            let index = snapshot.get_metadata().index;
            match install(snapshot, peers, ctx.ledger) {
                Ok(()) => {
                    *ctx.watch.snapshots_installed += 1;
                    applier
                        .installed(ctx.ledger, index, &mut aout)
                        .expect("a memory store cannot fail");
                    Ok(())
                }
                Err(why) => {
                    *ctx.fatal = Some(why.clone());
                    Err(tally_core::Error::io("installing a snapshot", why))
                }
            }
        };
        let mut rout = Vec::new();
        if let Err(err) = self.repl.drive(&mut install, &mut rout) {
            ctx.fatal.get_or_insert(format!("raft: {err}"));
        }
        self.to_apply.extend(aout);
        self.to_repl.extend(rout);
    }

    /// Carries commands between the stages until none is left (or the node must stop).
    fn settle(&mut self, ctx: &mut Ctx<'_, '_>) {
        while ctx.fatal.is_none() {
            if let Some(c) = self.to_master.pop_front() {
                self.master_command(c, ctx);
            } else if let Some(c) = self.to_repl.pop_front() {
                self.repl_command(c, ctx);
            } else if let Some(c) = self.to_apply.pop_front() {
                self.apply_command(c, ctx);
            } else {
                return;
            }
        }
    }

    fn master_command(&mut self, c: MasterOut<ReplyTo>, ctx: &mut Ctx<'_, '_>) {
        let mut rout = Vec::new();
        let mut aout = Vec::new();
        match c {
            MasterOut::Propose {
                body,
                waiters,
                sealed,
                epoch,
                ..
            } => {
                if ctx.bug == Some(SimBug::ConfirmBeforeCommit) && self.repl.is_leading() {
                    // The bug: confirm as soon as the batch is proposed, before it commits.
                    let signed = ctx.operator.sign_header(body.header.clone());
                    confirm(&body, body.leaf_hashes(), &signed, &waiters, ctx);
                }
                self.repl
                    .propose(&body, waiters, Some(sealed), epoch, &mut rout);
            }
            MasterOut::Replay {
                height,
                index,
                request_hash,
                reply,
            } => self
                .applier
                .replay(ctx.ledger, height, index, request_hash, reply, &mut aout)
                .expect("a memory store cannot fail"),
            MasterOut::Refuse(reply, r) => self.refuse(reply, r, ctx),
            MasterOut::Reject(reply, r) => self.reject(reply, r.code, ctx),
            MasterOut::Fail(reply, index, r) => {
                let by = (ctx.id, self.repl.status().term);
                let answer = Answer::EnvelopeFailed {
                    index,
                    code: r.code,
                    by,
                };
                ctx.out.push(Out::Reply(reply, answer));
            }
        }
        self.to_repl.extend(rout);
        self.to_apply.extend(aout);
    }

    fn repl_command(&mut self, c: ReplOut<ReplyTo, Read>, ctx: &mut Ctx<'_, '_>) {
        let mut mout = Vec::new();
        match c {
            ReplOut::Send(messages) => ctx.out.extend(messages.into_iter().map(Out::Raft)),
            ReplOut::Committed(entry) => self.apply_entry(entry, ctx),
            ReplOut::Lead { term, epoch, meta } => self.master.lead(term, epoch, meta, &mut mout),
            ReplOut::Follow => self.master.follow(&mut mout),
            ReplOut::Refuse(reply, r) => self.refuse(reply, r, ctx),
            ReplOut::RefuseRead((reply, _)) => self.refuse(reply, Refusal::NotWritable, ctx),
            ReplOut::Serve((reply, _)) => {
                let height = self.applier.meta().height;
                ctx.out.push(Out::Reply(reply, Answer::Balance { height }));
            }
            ReplOut::Role(s) => {
                if s.role == Role::Leader {
                    *ctx.watch.elections += 1;
                }
            }
            // The simulation's network needs no addresses; it watches configurations rather
            // than the answers to its membership commands.
            ReplOut::Compacted(_) | ReplOut::AddressBook(_) => {}
            ReplOut::Members { reply, .. } | ReplOut::RefuseChange(reply, _) => {
                assert_eq!(reply, OPERATOR, "only the simulation changes membership");
            }
            ReplOut::Removed => *ctx.removed = true,
        }
        self.to_master.extend(mout);
    }

    fn apply_entry(
        &mut self,
        entry: tally_core::engine::apply::Committed<ReplyTo>,
        ctx: &mut Ctx<'_, '_>,
    ) {
        let mut aout = Vec::new();
        let height = match &entry {
            tally_core::engine::apply::Committed::Batch { body, .. } => body.header.height,
            tally_core::engine::apply::Committed::Signature { item, .. } => item.height,
            tally_core::engine::apply::Committed::Other { .. } => 0,
        };
        match self.applier.committed(ctx.ledger, entry, &mut aout) {
            Ok(Applied::Written(write)) => {
                let (id, step) = (ctx.id, ctx.watch.step);
                let fresh = ctx.watch.headers.record(&write.signed_header, || {
                    format!("node {id}'s apply at step {step}")
                });
                if !fresh {
                    ctx.watch.violations.push(format!(
                        "step {step}: node {id} applied a header at height {height} that \
                         differs from one seen before"
                    ));
                }
            }
            // The simulator's replicas hold the whole key: no header waits for a signature.
            Ok(Applied::Skipped | Applied::Superseded | Applied::Signed(_)) => {}
            Err(err) => {
                ctx.watch.violations.push(format!(
                    "step {}: node {} cannot apply committed batch {height}: {err}",
                    ctx.watch.step, ctx.id
                ));
                *ctx.fatal = Some(err.to_string());
            }
        }
        self.to_apply.extend(aout);
    }

    fn apply_command(&mut self, c: ApplyOut<ReplyTo>, ctx: &mut Ctx<'_, '_>) {
        match c {
            ApplyOut::Confirm {
                body,
                leaves,
                signed,
                waiters,
            } => confirm(&body, leaves, &signed, &waiters, ctx),
            ApplyOut::Replayed(reply, c) => ctx.out.push(Out::Reply(reply, answer_of(c))),
            ApplyOut::Refuse(reply, r) => self.refuse(reply, r, ctx),
            ApplyOut::Reject(reply, r) => self.reject(reply, r.code, ctx),
            ApplyOut::Resync => {
                let mut rout = Vec::new();
                self.repl.resync(&mut rout);
                self.to_repl.extend(rout);
            }
            ApplyOut::Unsigned(_)
            | ApplyOut::HeaderSigned { .. }
            | ApplyOut::CheckpointSigned(_) => {
                unreachable!("the simulator's replicas hold the whole key")
            }
        }
    }

    /// A deterministic refusal of the request itself.
    fn reject(&self, reply: ReplyTo, code: ErrorCode, ctx: &mut Ctx<'_, '_>) {
        let by = (ctx.id, self.repl.status().term);
        let answer = Answer::Refused { code, hint: 0, by };
        ctx.out.push(Out::Reply(reply, answer));
    }

    /// A retryable refusal; `NotWritable` names the leader when one is known, as the server's.
    fn refuse(&self, reply: ReplyTo, r: Refusal, ctx: &mut Ctx<'_, '_>) {
        let leader = self.repl.status().leader_id;
        let hint = if leader == ctx.id { 0 } else { leader };
        let code = match r {
            Refusal::NotWritable if hint != 0 => ErrorCode::NotLeader,
            _ => r.code(),
        };
        let hint = if r == Refusal::NotWritable { hint } else { 0 };
        let answer = Answer::Refused {
            code,
            hint,
            by: (0, 0),
        };
        ctx.out.push(Out::Reply(reply, answer));
    }
}

/// A confirmation as the client's answer.
fn answer_of(c: Confirmed) -> Answer {
    match c {
        Confirmed::Request(c) => Answer::Confirmed(c),
        Confirmed::Envelope(c) => Answer::EnvelopeConfirmed(c),
        Confirmed::Rotation(_) => unreachable!("the simulator rotates no keys"),
    }
}

/// Answers each waiter with its item's confirmation, as the server's confirm stage: a waiter's
/// `index` is its item's first leaf.
fn confirm(
    body: &BatchBody,
    leaves: Vec<tally_wire::Hash>,
    signed: &SignedHeader,
    waiters: &[Waiter<ReplyTo>],
    ctx: &mut Ctx<'_, '_>,
) {
    if waiters.is_empty() {
        return;
    }
    assert_eq!(
        leaves,
        body.leaf_hashes(),
        "the apply's leaf hashes are the body's"
    );
    let (tree, starts) = (ProofTree::new(leaves), body.item_starts());
    for w in waiters {
        let mut c = body
            .confirmed(&tree, &starts, signed, w.index)
            .expect("a waiter's index is its item's first leaf");
        if w.replayed {
            c.set_replayed();
        }
        ctx.out.push(Out::Reply(w.reply, answer_of(c)));
    }
}

/// Brings `ledger` to at least the state a snapshot describes, by copying the ledger of a peer
/// that has it (the server downloads a dump from the leader or another peer, and verifies it).
fn install(
    snapshot: &Snapshot,
    peers: &[Option<SimNode>],
    ledger: &mut MemStore,
) -> Result<(), String> {
    let index = snapshot.get_metadata().index;
    let (descriptor, _) =
        decode_descriptor(&snapshot.data).map_err(|e| format!("snapshot descriptor: {e}"))?;
    let source = peers
        .iter()
        .flatten()
        .filter(|p| p.is_up() && p.meta().raft_index >= index)
        .max_by_key(|p| (p.meta().height, std::cmp::Reverse(p.id)))
        .ok_or_else(|| format!("no peer holds the ledger at raft index {index}"))?;
    let copy = copy_store(&source.ledger);
    // The server verifies a dump before installing it; here it must at least contain the
    // state the descriptor names.
    let at = copy
        .headers
        .get(&descriptor.height)
        .map(|h| header_hash(&h.header));
    if descriptor.height > 0 && at != Some(descriptor.last_header_hash) {
        return Err(format!(
            "node {}'s ledger does not hold the snapshot's header {}",
            source.id, descriptor.height
        ));
    }
    *ledger = copy;
    Ok(())
}
