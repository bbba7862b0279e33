//! One simulated replica: a `tally_core::replica::Replica` over a [`SimLog`], a `MemStore`
//! ledger, and the glue the server puts around them, mirrored from `server/src/replication.rs`
//! and `server/src/pipeline.rs`:
//!
//! - leadership hand-off: on becoming leader, wait until the term's first entry is applied,
//!   then sequence from the applied state (a new epoch); on losing it, fail the open batch, the
//!   proposed batches' waiters and the pending reads with `not_leader`;
//! - the snapshot stage (a request already applied is replayed; unknown account and
//!   insufficient funds as of the applied state are refused), then the sequencer;
//! - batches sealed on the window or when full, at most `in_flight_max` ahead of the applied
//!   height, proposed as one entry each;
//! - apply: skip what is already applied, skip (and resynchronize the master) a batch that does
//!   not extend the chain, else `prepare_apply` (which checks receipts, Merkle root and state
//!   digest) and one atomic write; then confirm; resubmissions wait for their batch (parked);
//! - linearizable reads through ReadIndex, answered once the read index is applied;
//! - log compaction, and snapshot installs that copy a peer's ledger (the server downloads it).

use std::collections::{BTreeMap, VecDeque};

use raft::eraftpb::{Entry, Message, Snapshot};
use raft::ReadState;
use rand::rngs::StdRng;
use rand::Rng;
use tally_core::batch::{prepare_apply, BatchBody};
use tally_core::crypto::{header_hash, request_hash, OperatorKey};
use tally_core::merkle::Tree;
use tally_core::ports::{LedgerStore, MemStore};
use tally_core::replica::{is_batch, RaftIo, Replica, ReplicaConfig, Role};
use tally_core::sequencer::{Sequencer, SequencerConfig, Submitted};
use tally_core::state::LedgerMeta;
use tally_wire::{Confirmation, ErrorCode, Hash, Op, PublicKey, Request};

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
    /// A linearizable balance read.
    Read(PublicKey),
}

/// A replica's answer to a client.
#[derive(Debug, Clone)]
pub enum Answer {
    Confirmed(Box<Confirmation>),
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

/// The sequencing state of a replica that leads and may take writes.
struct Leading {
    sequencer: Sequencer,
    term: u64,
    open: Vec<(u32, ReplyTo, bool)>,
    opened_at: Option<u64>,
}

/// Everything a replica keeps in memory only: rebuilt at every restart.
struct Volatile {
    meta: LedgerMeta,
    applied_index: u64,
    last_role: Role,
    lead_at: Option<u64>,
    leading: Option<Leading>,
    /// Waiters of proposed batches, by header hash.
    stash: BTreeMap<Hash, Vec<(u32, ReplyTo, bool)>>,
    /// Resubmissions waiting for their batch to be applied, by height.
    parked: BTreeMap<u64, Vec<(u32, Hash, ReplyTo)>>,
    reads: BTreeMap<u64, (ReplyTo, PublicKey)>,
    ready_reads: VecDeque<(u64, ReplyTo, PublicKey)>,
    read_ctx: u64,
    /// Set when a committed batch was skipped: the master must start over.
    resync: bool,
    /// (term, role) when the election timeout was last drawn, and the draw.
    timeout_key: (u64, Role),
    election_timeout: usize,
}

impl Volatile {
    fn new(meta: LedgerMeta) -> Volatile {
        Volatile {
            applied_index: meta.raft_index,
            meta,
            last_role: Role::Follower,
            lead_at: None,
            leading: None,
            stash: BTreeMap::new(),
            parked: BTreeMap::new(),
            reads: BTreeMap::new(),
            ready_reads: VecDeque::new(),
            read_ctx: 0,
            resync: false,
            timeout_key: (u64::MAX, Role::Follower),
            election_timeout: 0,
        }
    }
}

/// The parts of a node the raft driver's effects reach.
struct Core {
    id: u64,
    /// Durable: every apply is one atomic write.
    ledger: MemStore,
    operator: OperatorKey,
    v: Volatile,
    /// Set when the node must stop (the server exits on a divergence or a failed install).
    fatal: Option<String>,
}

pub struct SimNode {
    pub id: u64,
    log: SimLog,
    core: Core,
    replica: Option<Replica<SimLog>>,
}

fn copy_store(s: &MemStore) -> MemStore {
    MemStore {
        meta: s.meta.clone(),
        accounts: s.accounts.clone(),
        requests: s.requests.clone(),
        headers: s.headers.clone(),
        bodies: s.bodies.clone(),
    }
}

impl SimNode {
    pub fn new(id: u64, voters: &[u64], operator: OperatorKey) -> SimNode {
        SimNode {
            id,
            log: SimLog::new(voters),
            core: Core {
                id,
                ledger: MemStore::default(),
                operator,
                v: Volatile::new(LedgerMeta::genesis()),
                fatal: None,
            },
            replica: None,
        }
    }

    pub fn is_up(&self) -> bool {
        self.replica.is_some()
    }

    pub fn ledger(&self) -> &MemStore {
        &self.core.ledger
    }

    pub fn meta(&self) -> &LedgerMeta {
        &self.core.v.meta
    }

    /// Whether it leads and takes writes.
    pub fn writable(&self) -> bool {
        self.core.v.leading.is_some()
    }

    /// A one-line description for failure reports.
    pub fn describe(&self) -> String {
        match &self.replica {
            None => format!("node {}: down", self.id),
            Some(r) => {
                let s = r.status();
                format!(
                    "node {}: {:?} term {} leader {} commit {} last {} applied {} (height {}), \
                     log from {}",
                    self.id,
                    s.role,
                    s.term,
                    s.leader_id,
                    s.commit_index,
                    s.last_index,
                    self.core.v.applied_index,
                    self.core.v.meta.height,
                    self.log.snapshot_index() + 1
                )
            }
        }
    }

    /// Whether it must be stopped, and why.
    pub fn fatal(&self) -> Option<&str> {
        self.core.fatal.as_deref()
    }

    /// Starts (or restarts) the replica from its disk: the ledger as applied, the raft log as
    /// synced.
    pub fn start(&mut self, t: &Tuning) {
        assert!(self.replica.is_none(), "node {} is already up", self.id);
        let meta = self.core.ledger.meta().expect("a memory store cannot fail");
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
        self.core.v = Volatile::new(meta);
        self.core.fatal = None;
        self.replica = Some(replica);
    }

    /// A crash: everything in memory is gone, the disk stays (minus the unsynced commit index).
    pub fn crash(&mut self) {
        self.replica = None;
        self.log.crash();
        self.core.v = Volatile::new(LedgerMeta::genesis());
        self.core.fatal = None;
    }

    pub fn tick(&mut self) {
        if let Some(r) = self.replica.as_mut() {
            r.tick();
        }
    }

    /// The transport lost a message to `peer` (its connection broke): what the server's raft
    /// thread does on `RaftEvent::Unreachable`.
    pub fn unreachable(&mut self, peer: u64) {
        if let Some(r) = self.replica.as_mut() {
            r.report_unreachable(peer);
            r.report_snapshot(peer, false);
        }
    }

    pub fn step(&mut self, m: Message, t: &Tuning) {
        let Some(r) = self.replica.as_mut() else {
            return;
        };
        // `Replica::step` releases a follower paused for a snapshot once it answers a heartbeat
        // (a lost acknowledgement would otherwise stall it until the next election);
        // `SimBug::ServerSnapshotStall` brings that stall back.
        if t.bug == Some(SimBug::ServerSnapshotStall) {
            r.step_raw(m);
        } else {
            r.step(m);
        }
    }

    /// A client's request. Answers may come at once (into `out`) or later.
    pub fn request(
        &mut self,
        reply: ReplyTo,
        request: ClientRequest,
        now: u64,
        out: &mut Vec<Out>,
    ) {
        let Some(replica) = self.replica.as_mut() else {
            return;
        };
        let status = replica.status();
        let refuse = |code: ErrorCode, out: &mut Vec<Out>| {
            let hint = if status.leader_id == self.id {
                0
            } else {
                status.leader_id
            };
            let by = (self.id, status.term);
            out.push(Out::Reply(reply, Answer::Refused { code, hint, by }));
        };
        let not_writable = if status.leader_id != 0 && status.leader_id != self.id {
            ErrorCode::NotLeader
        } else {
            ErrorCode::Unavailable
        };
        match request {
            ClientRequest::Read(account) => {
                if status.role == Role::Leader {
                    let v = &mut self.core.v;
                    v.read_ctx += 1;
                    v.reads.insert(v.read_ctx, (reply, account));
                    replica.read_index(v.read_ctx.to_le_bytes().to_vec());
                } else {
                    refuse(not_writable, out);
                }
            }
            ClientRequest::Submit(request) => {
                let core = &mut self.core;
                if core.v.leading.is_none() {
                    refuse(not_writable, out);
                    return;
                }
                // The snapshot stage, against the applied state.
                let rh = request_hash(&request);
                if let Some(record) = core.ledger.requests.get(&(request.signer, request.id)) {
                    if record.request_hash == rh {
                        let (height, index) = (record.height, record.index);
                        core.replay(height, index, rh, reply, out);
                    } else {
                        refuse(ErrorCode::IdConflict, out);
                    }
                    return;
                }
                if request.op != Op::Deposit {
                    match core.ledger.accounts.get(&request.signer) {
                        None => return refuse(ErrorCode::UnknownAccount, out),
                        Some(&b) if b < request.amount => {
                            return refuse(ErrorCode::InsufficientFunds, out)
                        }
                        Some(_) => {}
                    }
                }
                // The master.
                let applied = core.v.meta.height;
                let leading = core.v.leading.as_mut().expect("checked above");
                leading
                    .sequencer
                    .applied(applied.min(leading.sequencer.sealed_height()));
                if leading.sequencer.is_full() {
                    return refuse(ErrorCode::Busy, out);
                }
                let open_height = leading.sequencer.sealed_height() + 1;
                let submitted = leading
                    .sequencer
                    .submit(request, applied, &mut core.ledger)
                    .expect("a memory store cannot fail");
                match submitted {
                    Submitted::Accepted { index, .. } => {
                        leading.opened_at.get_or_insert(now);
                        leading.open.push((index, reply, false));
                    }
                    Submitted::InFlight { height, index } if height == open_height => {
                        leading.open.push((index, reply, true));
                    }
                    Submitted::InFlight { height, index }
                    | Submitted::Applied(tally_core::ports::RequestRecord {
                        height, index, ..
                    }) => {
                        if height <= core.v.meta.height {
                            core.replay(height, index, rh, reply, out);
                        } else {
                            core.v
                                .parked
                                .entry(height)
                                .or_default()
                                .push((index, rh, reply));
                        }
                    }
                    Submitted::Rejected(r) => refuse(r.code, out),
                }
            }
        }
    }

    /// Seals the open batch when it is due and the in-flight bound allows, and proposes it.
    pub fn maybe_seal(&mut self, now: u64, t: &Tuning, out: &mut Vec<Out>) {
        let Some(replica) = self.replica.as_mut() else {
            return;
        };
        let core = &mut self.core;
        let applied = core.v.meta.height;
        let Some(leading) = core.v.leading.as_mut() else {
            return;
        };
        leading
            .sequencer
            .applied(applied.min(leading.sequencer.sealed_height()));
        let due = leading.sequencer.is_full()
            || leading
                .opened_at
                .is_some_and(|at| now >= at + t.batch_window_ms);
        let in_flight = leading.sequencer.sealed_height().saturating_sub(applied);
        if !due || in_flight >= t.in_flight_max {
            return;
        }
        let Some(body) = leading.sequencer.seal(leading.term, now) else {
            leading.opened_at = None;
            return;
        };
        leading.opened_at = None;
        let replies = std::mem::take(&mut leading.open);
        match replica.propose(body.encode()) {
            Ok(()) => {
                if t.bug == Some(SimBug::ConfirmBeforeCommit) {
                    // The bug: confirm as soon as the batch is proposed, before it commits.
                    let signed = core.operator.sign_header(body.header.clone());
                    let confirmations = body.confirmations(&signed);
                    for (index, reply, replayed) in &replies {
                        let mut c = confirmations[*index as usize].clone();
                        c.replayed = *replayed;
                        out.push(Out::Reply(*reply, Answer::Confirmed(Box::new(c))));
                    }
                }
                core.v.stash.insert(header_hash(&body.header), replies);
            }
            Err(_) => {
                let hint = replica.status().leader_id;
                for (_, reply, _) in replies {
                    out.push(Out::Reply(
                        reply,
                        Answer::Refused {
                            code: ErrorCode::NotLeader,
                            hint,
                            by: (0, 0),
                        },
                    ));
                }
                core.v.leading = None;
                core.v.lead_at = replica
                    .term_start_index()
                    .map(|_| replica.status().last_index);
            }
        }
    }

    /// Processes everything raft has ready, then what the raft thread does after each input:
    /// leadership changes, the hand-off, pending reads, compaction, and this replica's next
    /// election timeout (drawn from the simulation's seed, not raft-rs's thread rng).
    pub fn drive(
        &mut self,
        peers: &[Option<SimNode>],
        t: &Tuning,
        rng: &mut StdRng,
        watch: &mut Watch<'_>,
        out: &mut Vec<Out>,
    ) {
        let Some(replica) = self.replica.as_mut() else {
            return;
        };
        let core = &mut self.core;
        let mut io = Io {
            core,
            peers,
            out,
            watch,
        };
        if let Err(e) = replica.on_ready(&mut io) {
            core.fatal.get_or_insert(format!("raft: {e}"));
        }
        if core.fatal.is_some() {
            return;
        }
        let status = replica.status();
        let v = &mut core.v;
        if status.role != v.last_role {
            if status.role == Role::Leader {
                *watch.elections += 1;
                v.lead_at = replica.term_start_index();
            } else if v.last_role == Role::Leader {
                v.lead_at = None;
                let hint = status.leader_id;
                let refusal = |reply| {
                    Out::Reply(
                        reply,
                        Answer::Refused {
                            code: if hint != 0 {
                                ErrorCode::NotLeader
                            } else {
                                ErrorCode::Unavailable
                            },
                            hint,
                            by: (0, 0),
                        },
                    )
                };
                if let Some(l) = v.leading.take() {
                    out.extend(l.open.into_iter().map(|(_, r, _)| refusal(r)));
                }
                for (_, waiters) in std::mem::take(&mut v.stash) {
                    out.extend(waiters.into_iter().map(|(_, r, _)| refusal(r)));
                }
                for (_, (r, _)) in std::mem::take(&mut v.reads) {
                    out.push(refusal(r));
                }
                for (_, r, _) in std::mem::take(&mut v.ready_reads) {
                    out.push(refusal(r));
                }
            }
            v.last_role = status.role;
        }
        if std::mem::take(&mut v.resync) {
            if let Some(l) = v.leading.take() {
                for (_, r, _) in l.open {
                    out.push(Out::Reply(
                        r,
                        Answer::Refused {
                            code: ErrorCode::Unavailable,
                            hint: 0,
                            by: (0, 0),
                        },
                    ));
                }
                v.lead_at = Some(status.last_index);
            }
        }
        if let Some(at) = v.lead_at {
            if status.role == Role::Leader && v.applied_index >= at {
                v.lead_at = None;
                v.leading = Some(Leading {
                    sequencer: Sequencer::new(
                        SequencerConfig {
                            chain_id: t.chain_id,
                            operator_key_id: core.operator.key_id(),
                            batch_requests_max: t.batch_requests_max,
                            accounts_cached_max: 64,
                            recent_heights_kept: 8,
                        },
                        v.meta.clone(),
                    ),
                    term: status.term,
                    open: Vec::new(),
                    opened_at: None,
                });
            }
        }
        while v
            .ready_reads
            .front()
            .is_some_and(|(index, _, _)| *index <= v.applied_index)
        {
            let (_, reply, _) = v.ready_reads.pop_front().expect("front exists");
            out.push(Out::Reply(
                reply,
                Answer::Balance {
                    height: v.meta.height,
                },
            ));
        }
        // Compaction, as the raft thread does it, but only up to what this log has committed:
        // after installing a peer's ledger that is newer than the snapshot, the applied raft
        // index can be ahead of the commit, and compacting past the commit is refused (the
        // server panicked there until it got the same check; `SimBug::ServerCompactsPastCommit`
        // brings the old behaviour back).
        let point = self.log.snapshot_index();
        let committed = v.meta.raft_index <= status.commit_index
            || t.bug == Some(SimBug::ServerCompactsPastCommit);
        if v.meta.raft_index >= point + t.compaction_entries && committed {
            self.log.set_snapshot_descriptor(v.meta.encode().to_vec());
            use tally_core::replica::RaftLogStore;
            replica
                .store_mut()
                .compact(v.meta.raft_index)
                .expect("compaction of a memory log cannot fail");
        }
        let key = (status.term, status.role);
        if key != v.timeout_key {
            v.timeout_key = key;
            v.election_timeout = rng.gen_range(t.election_ticks..2 * t.election_ticks);
        }
        replica.set_election_timeout_ticks(v.election_timeout);
    }
}

impl Core {
    /// Answers a resubmission with the original confirmation, rebuilt from the stored batch.
    fn replay(&mut self, height: u64, index: u32, rh: Hash, reply: ReplyTo, out: &mut Vec<Out>) {
        let stored = (
            self.ledger.body(height).expect("memory"),
            self.ledger.header(height).expect("memory"),
        );
        let confirmation = match stored {
            (Some(bytes), Some(signed)) => BatchBody::decode(&bytes).ok().and_then(|body| {
                let e = body.entries.get(index as usize)?;
                (request_hash(&e.request) == rh).then(|| Confirmation {
                    replayed: true,
                    request: e.request.clone(),
                    receipt: e.receipt.clone(),
                    header: signed,
                    proof: Tree::new(&body.leaf_hashes()).proof(index),
                })
            }),
            _ => None,
        };
        out.push(Out::Reply(
            reply,
            match confirmation {
                Some(c) => Answer::Confirmed(Box::new(c)),
                None => Answer::Refused {
                    code: ErrorCode::Unavailable,
                    hint: 0,
                    by: (0, 0),
                },
            },
        ));
    }

    fn apply_entry(&mut self, e: &Entry, out: &mut Vec<Out>, watch: &mut Watch<'_>) {
        if !is_batch(e) {
            self.v.applied_index = self.v.applied_index.max(e.index);
            return;
        }
        let Ok(body) = BatchBody::decode(&e.data) else {
            // Deterministic on every replica: skipped alike.
            self.v.applied_index = self.v.applied_index.max(e.index);
            return;
        };
        let h = &body.header;
        let waiters = self.v.stash.remove(&header_hash(h)).unwrap_or_default();
        if h.height <= self.v.meta.height {
            for (index, reply, _) in waiters {
                let rh = request_hash(&body.entries[index as usize].request);
                self.replay(h.height, index, rh, reply, out);
            }
            self.v.applied_index = self.v.applied_index.max(e.index);
            return;
        }
        if h.height != self.v.meta.height + 1 || h.prev_hash != self.v.meta.last_header_hash {
            for (_, reply, _) in waiters {
                out.push(Out::Reply(
                    reply,
                    Answer::Refused {
                        code: ErrorCode::Unavailable,
                        hint: 0,
                        by: (0, 0),
                    },
                ));
            }
            self.v.resync = true;
            self.v.applied_index = self.v.applied_index.max(e.index);
            return;
        }
        let mut write = match prepare_apply(
            &body,
            e.data.to_vec(),
            &self.v.meta,
            &mut self.ledger,
            &self.operator,
        ) {
            Ok(w) => w,
            Err(err) => {
                watch.violations.push(format!(
                    "step {}: node {} cannot apply committed batch {}: {err}",
                    watch.step, self.id, h.height
                ));
                self.fatal = Some(err.to_string());
                return;
            }
        };
        write.meta.raft_index = e.index;
        self.ledger
            .apply(&write)
            .expect("a memory store cannot fail");
        self.v.meta = write.meta.clone();
        self.v.applied_index = self.v.applied_index.max(e.index);
        let id = self.id;
        let step = watch.step;
        if !watch.headers.record(&write.signed_header, || {
            format!("node {id}'s apply at step {step}")
        }) {
            watch.violations.push(format!(
                "step {step}: node {id} applied a header at height {} that differs from one \
                 seen before",
                h.height
            ));
        }
        if !waiters.is_empty() {
            let confirmations = body.confirmations(&write.signed_header);
            for (index, reply, replayed) in waiters {
                let mut c = confirmations[index as usize].clone();
                c.replayed = replayed;
                out.push(Out::Reply(reply, Answer::Confirmed(Box::new(c))));
            }
        }
        let later = self.v.parked.split_off(&(self.v.meta.height + 1));
        for (height, parked) in std::mem::replace(&mut self.v.parked, later) {
            for (index, rh, reply) in parked {
                self.replay(height, index, rh, reply, out);
            }
        }
    }

    /// Brings the ledger to at least the state a snapshot describes, by copying the ledger of
    /// a peer that has it (the server downloads a dump from the leader or another peer).
    fn install(&mut self, snapshot: &Snapshot, peers: &[Option<SimNode>]) -> Result<(), String> {
        let index = snapshot.get_metadata().index;
        let descriptor =
            LedgerMeta::decode(&snapshot.data).map_err(|e| format!("snapshot descriptor: {e}"))?;
        let source = peers
            .iter()
            .flatten()
            .filter(|p| p.is_up() && p.core.v.meta.raft_index >= index)
            .max_by_key(|p| (p.core.v.meta.height, std::cmp::Reverse(p.id)))
            .ok_or_else(|| format!("no peer holds the ledger at raft index {index}"))?;
        let copy = copy_store(&source.core.ledger);
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
        self.ledger = copy;
        self.v.meta = self.ledger.meta().expect("memory");
        self.v.applied_index = self.v.applied_index.max(index.max(self.v.meta.raft_index));
        Ok(())
    }
}

struct Io<'a, 'w> {
    core: &'a mut Core,
    peers: &'a [Option<SimNode>],
    out: &'a mut Vec<Out>,
    watch: &'a mut Watch<'w>,
}

impl RaftIo for Io<'_, '_> {
    fn send(&mut self, messages: Vec<Message>) {
        self.out.extend(messages.into_iter().map(Out::Raft));
    }

    fn install_snapshot(&mut self, snapshot: &Snapshot) -> tally_core::Result<()> {
        match self.core.install(snapshot, self.peers) {
            Ok(()) => {
                *self.watch.snapshots_installed += 1;
                Ok(())
            }
            Err(e) => {
                self.core.fatal = Some(e.clone());
                Err(tally_core::Error::Storage(e))
            }
        }
    }

    fn apply(&mut self, entries: Vec<Entry>) {
        for e in &entries {
            if self.core.fatal.is_some() {
                return;
            }
            self.core.apply_entry(e, self.out, self.watch);
        }
    }

    fn read_ready(&mut self, states: Vec<ReadState>) {
        for s in states {
            let ctx = u64::from_le_bytes(s.request_ctx.as_slice().try_into().unwrap_or([0; 8]));
            if let Some((reply, account)) = self.core.v.reads.remove(&ctx) {
                self.core.v.ready_reads.push_back((s.index, reply, account));
            }
        }
    }
}
