//! One simulated run: replicas, clients, a network and a clock, all driven by one seeded
//! generator, then the heal, the resolution of unknown outcomes, and the final checks.
//!
//! Time moves in steps of one raft tick (10 ms). In each step: packets that are due are
//! delivered (each delivery is followed by the receiving replica's ready processing), every
//! running replica ticks, leaders seal due batches, clients act, and faults are drawn.
//! Nothing iterates a hash map where order could matter, so a seed replays exactly.

mod two_phase;

use std::collections::{BTreeMap, BTreeSet};

use ed25519_dalek::SigningKey;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tally_client::build_request;
use tally_client::envelope::build_envelope;
use tally_core::batch::BatchBody;
use tally_core::crypto::{header_hash, request_hash, sha256, verify_header, OperatorKey};
use tally_core::merkle::{leaf_hash, verify_inclusion};
use tally_core::verify::verify_envelope_confirmation;
use tally_wire::{
    Confirmation, EnvelopeConfirmation, ErrorCode, Hash, Op, Operation, PublicKey, Request,
};

use super::node::{Answer, ClientRequest, Out, ReplyTo, SimNode, Watch};
use super::{SimOptions, SimStats, Tuning};
use crate::envelopes::{self, ChainIndex, SentEnvelope};
use crate::history::{Effect, HeaderLog, Model, ReceiptLog};
use crate::load::{Confirmed, OpState, DETERMINISTIC_REFUSALS};
use crate::reserves::Replay;
use crate::two_phase::TwoPhaseLoad;
use tally_core::engine::members::MemberChange;
use tally_core::ports::MemStore;
use tally_core::state::LedgerMeta;
use two_phase::TWO_PHASE_FRACTION;

const TICK_MS: u64 = 10;
const ACCOUNTS: usize = 5;
const FUNDING: u64 = 500;
const CLIENTS: usize = 3;
/// A client waits this long for an answer before it tries the next replica.
const REPLY_TIMEOUT_MS: u64 = 400;
/// Attempts per task before a client gives up on it (its outcome then stays unknown).
const TRIES_MAX: u32 = 12;
/// Steps the heal may take before the cluster must have converged.
const HEAL_STEPS_MAX: u64 = 6000;
/// The fraction of a client's new writes that are envelopes (of 2 to 8 operations) rather than
/// single requests.
const ENVELOPE_FRACTION: f64 = 0.1;
const ENVELOPE_OPS_MAX: usize = 8;

/// How the network misbehaves in this run (drawn once per seed).
#[derive(Debug, Clone, Copy)]
struct NetParams {
    loss: f64,
    duplicate: f64,
    delay_max_ms: u64,
}

enum Packet {
    Raft(raft::eraftpb::Message),
    /// Tells `node` that a message it sent to `peer` was lost (as the server's transport does
    /// when a connection breaks).
    Unreachable {
        node: u64,
        peer: u64,
    },
    Request {
        to: u64,
        reply: ReplyTo,
        request: ClientRequest,
    },
    Reply {
        reply: ReplyTo,
        answer: Answer,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Task {
    /// Submit operation `op` (an index into `ops`).
    Submit(usize),
    /// Submit envelope `e` (an index into `envelopes`).
    Envelope(usize),
    /// A linearizable read.
    Read,
}

struct Current {
    task: Task,
    attempt: u64,
    /// Waiting for the answer to `attempt` until then; None when a retry is scheduled.
    deadline: Option<u64>,
    retry_at: Option<u64>,
    tries: u32,
    /// The highest height the client had seen when the task started.
    floor: u64,
    /// Set for the final resolution: a deterministic refusal then settles the outcome.
    resolving: bool,
}

struct SimClient {
    target: u64,
    current: Option<Current>,
    next_at: u64,
    /// The highest height this client has seen (confirmations of its new requests, reads).
    seen: u64,
    /// Submissions to resolve at the end, assigned to this client.
    resolve: Vec<Task>,
}

struct SimOp {
    effect: Effect,
    request: Request,
    state: OpState,
    /// Copies of the request sent to replicas.
    sent: u32,
    /// Refused deterministically after an earlier attempt had gone out.
    /// The step and code of a deterministic refusal received after an earlier copy had gone
    /// out (the outcome then stays unknown: that copy may still be applied).
    refused_after_retry: Option<(u64, ErrorCode, u32, (u64, u64))>,
}

/// A replica replacement in progress, as an operator does it: `new` joins as a learner, is
/// promoted once it caught up, then `old` is removed.
struct Replacing {
    old: u64,
    new: u64,
    stage: Stage,
    /// When the current step's command may be sent (again).
    next_try: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Add,
    Promote,
    Remove,
}

/// How often a step starts a replacement (while faults run and every replica is up).
const REPLACE_PROBABILITY: f64 = 0.002;
/// How long an unanswered membership command waits before it is sent again.
const MEMBERSHIP_RETRY_MS: u64 = 300;

pub struct World {
    rng: StdRng,
    now: u64,
    step: u64,
    t: Tuning,
    net: NetParams,
    nodes: Vec<Option<SimNode>>,
    /// The configuration the cluster was created with (a replica added later starts from it).
    initial_voters: Vec<u64>,
    replacing: Option<Replacing>,
    operator_secret: [u8; 32],
    operator_public: PublicKey,
    packets: BTreeMap<(u64, u64), Packet>,
    packet_seq: u64,
    /// A running SHA-256 over every event delivered (`record_event`): equal for two runs of a
    /// seed only if they delivered the same events in the same order.
    events: Hash,
    attempt_seq: u64,
    cut: BTreeSet<(u64, u64)>,
    partition_until: Option<u64>,
    restart_at: BTreeMap<u64, u64>,
    clients: Vec<SimClient>,
    accounts: Vec<SigningKey>,
    ops: Vec<SimOp>,
    op_by_key: BTreeMap<(PublicKey, u128), usize>,
    envelopes: Vec<SentEnvelope>,
    /// The envelope each operation key belongs to.
    envelope_by_key: BTreeMap<(PublicKey, u128), usize>,
    envelope_by_hash: BTreeMap<Hash, usize>,
    /// The clients' two-phase operations: every reserve asked for, in order.
    two_phase: TwoPhaseLoad,
    next_id: u128,
    accepting: bool,
    /// The chain height when the final resolution began: what was applied before it.
    resolution_height: u64,
    headers: HeaderLog,
    receipts: ReceiptLog,
    verified_headers: BTreeSet<Hash>,
    violations: Vec<String>,
    pub stats: SimStats,
}

fn key_from(rng: &mut StdRng) -> SigningKey {
    SigningKey::from_bytes(&rng.gen())
}

impl World {
    pub fn new(seed: u64, opts: &SimOptions) -> World {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = if rng.gen_bool(0.5) { 3 } else { 5 };
        let operator = key_from(&mut rng);
        let deposit = key_from(&mut rng);
        let accounts: Vec<SigningKey> = (0..ACCOUNTS).map(|_| key_from(&mut rng)).collect();
        let chain_id: Hash = rng.gen();
        let t = Tuning {
            chain_id,
            election_ticks: 10,
            heartbeat_ticks: 2,
            batch_window_ms: TICK_MS * rng.gen_range(1..=4),
            batch_requests_max: rng.gen_range(2..=16),
            in_flight_max: rng.gen_range(1..=4),
            compaction_entries: rng.gen_range(8..=64),
            bug: opts.bug,
        };
        let net = NetParams {
            loss: *[0.0, 0.01, 0.05, 0.15].choose(&mut rng).expect("not empty"),
            duplicate: *[0.0, 0.02, 0.1].choose(&mut rng).expect("not empty"),
            delay_max_ms: *[10, 30, 80].choose(&mut rng).expect("not empty"),
        };
        let voters: Vec<u64> = (1..=n).collect();
        let mut nodes: Vec<Option<SimNode>> = voters
            .iter()
            .map(|&id| {
                let key = OperatorKey::new(SigningKey::from_bytes(&operator.to_bytes()));
                Some(SimNode::new(id, &voters, key))
            })
            .collect();
        for node in nodes.iter_mut().flatten() {
            node.start(&t);
        }
        let clients = (0..CLIENTS)
            .map(|i| SimClient {
                target: (i as u64 % n) + 1,
                current: None,
                next_at: 0,
                seen: 0,
                resolve: Vec::new(),
            })
            .collect();
        let mut world = World {
            rng,
            now: 0,
            step: 0,
            t,
            net,
            nodes,
            initial_voters: voters,
            replacing: None,
            operator_secret: operator.to_bytes(),
            operator_public: operator.verifying_key().to_bytes(),
            packets: BTreeMap::new(),
            events: [0; 32],
            packet_seq: 0,
            attempt_seq: 0,
            cut: BTreeSet::new(),
            partition_until: None,
            restart_at: BTreeMap::new(),
            clients,
            accounts,
            ops: Vec::new(),
            op_by_key: BTreeMap::new(),
            envelopes: Vec::new(),
            envelope_by_key: BTreeMap::new(),
            envelope_by_hash: BTreeMap::new(),
            two_phase: two_phase::sim_load(),
            next_id: 1,
            accepting: true,
            resolution_height: u64::MAX,
            headers: HeaderLog::default(),
            receipts: ReceiptLog::default(),
            verified_headers: BTreeSet::new(),
            violations: Vec::new(),
            stats: SimStats {
                nodes: n,
                ..SimStats::default()
            },
        };
        world.fund(&deposit);
        world
    }

    /// Funding: one deposit per account, submitted by the clients like any operation.
    fn fund(&mut self, deposit: &SigningKey) {
        let chain_id = self.t.chain_id;
        for i in 0..ACCOUNTS {
            let to = self.accounts[i].verifying_key().to_bytes();
            let request = build_request(deposit, chain_id, Op::Deposit, i as u128 + 1, to, FUNDING);
            let op = self.add_op(
                Effect::Deposit {
                    to: i,
                    amount: FUNDING,
                },
                request,
            );
            self.clients[i % CLIENTS].resolve.push(Task::Submit(op));
        }
    }

    fn add_op(&mut self, effect: Effect, request: Request) -> usize {
        self.op_by_key
            .insert((request.signer, request.id), self.ops.len());
        self.ops.push(SimOp {
            effect,
            request,
            state: OpState::InFlight,
            sent: 0,
            refused_after_retry: None,
        });
        self.ops.len() - 1
    }

    fn n(&self) -> u64 {
        self.nodes.len() as u64
    }

    fn node(&mut self, id: u64) -> &mut SimNode {
        self.nodes[id as usize - 1]
            .as_mut()
            .expect("a node is only taken while it runs")
    }

    /// Runs the whole scenario and returns the violations found.
    pub fn run(mut self, steps: u64) -> (Vec<String>, SimStats, Hash) {
        // The funding deposits first, without faults.
        while self.step < steps
            && self
                .clients
                .iter()
                .any(|c| !c.resolve.is_empty() || c.current.is_some())
        {
            self.tick(false);
        }
        for c in &mut self.clients {
            c.resolve.clear();
        }
        while self.step < steps {
            self.tick(true);
        }
        self.heal();
        if self.settle("after the heal") {
            self.resolve();
            if self.settle("after resolving unknown outcomes") {
                self.final_checks();
            }
        }
        self.stats.steps = self.step;
        self.stats.violations = self.violations.len() as u64;
        (self.violations, self.stats, self.events)
    }

    /// One step of simulated time.
    fn tick(&mut self, faults: bool) {
        self.step += 1;
        self.now += TICK_MS;
        // Deliveries due by now, in (time, sequence) order.
        while let Some((&(at, _), _)) = self.packets.first_key_value() {
            if at > self.now {
                break;
            }
            let (_, packet) = self.packets.pop_first().expect("first exists");
            self.deliver(packet);
        }
        for id in 1..=self.n() {
            if self.nodes[id as usize - 1]
                .as_ref()
                .is_some_and(|n| n.is_up())
            {
                self.node(id).tick();
                let now = self.now;
                self.node(id).maybe_seal(now);
                self.drive(id, Vec::new());
            }
        }
        for c in 0..self.clients.len() {
            self.client_step(c);
        }
        self.membership(faults);
        if faults {
            self.faults();
        }
        let due: Vec<u64> = self
            .restart_at
            .iter()
            .filter(|(_, &at)| at <= self.now)
            .map(|(&id, _)| id)
            .collect();
        for id in due {
            self.restart_at.remove(&id);
            self.restart(id);
        }
        if self.partition_until.is_some_and(|until| until <= self.now) {
            self.cut.clear();
            self.partition_until = None;
        }
    }

    /// Processes node `id`'s ready state and routes what it sends, including `out`.
    fn drive(&mut self, id: u64, mut out: Vec<Out>) {
        let slot = id as usize - 1;
        let Some(mut node) = self.nodes[slot].take() else {
            return;
        };
        let mut watch = Watch {
            headers: &mut self.headers,
            violations: &mut self.violations,
            step: self.step,
            snapshots_installed: &mut self.stats.snapshots_installed,
            elections: &mut self.stats.elections,
        };
        node.drive(&self.nodes, &self.t, &mut self.rng, &mut watch, &mut out);
        let fatal = node.fatal().map(str::to_string);
        let removed = node.removed();
        self.nodes[slot] = Some(node);
        self.route(id, out);
        if removed {
            // The server exits once it applied its own removal.
            self.nodes[slot] = None;
            self.restart_at.remove(&id);
            return;
        }
        if let Some(why) = fatal {
            // The server stops the process; the operator (here, the simulation) restarts it.
            self.stats.fatal_stops += 1;
            self.crash(id);
            self.stats.last_fatal = Some(why);
        }
    }

    fn route(&mut self, from: u64, out: Vec<Out>) {
        for o in out {
            match o {
                Out::Raft(m) => {
                    let to = m.to;
                    if self.cut.contains(&(from, to)) {
                        self.stats.messages_dropped += 1;
                        self.lost(from, to);
                        continue;
                    }
                    self.send(Packet::Raft(m.clone()), true);
                    if self.rng.gen_bool(self.net.duplicate) {
                        self.stats.messages_duplicated += 1;
                        self.send(Packet::Raft(m), true);
                    }
                }
                Out::Reply(reply, answer) => self.send(Packet::Reply { reply, answer }, true),
            }
        }
    }

    /// A raft message from `from` to `to` was lost: the sender's transport notices a little
    /// later.
    fn lost(&mut self, from: u64, to: u64) {
        let delay = self.rng.gen_range(20..100);
        self.packet_seq += 1;
        self.packets.insert(
            (self.now + delay, self.packet_seq),
            Packet::Unreachable {
                node: from,
                peer: to,
            },
        );
    }

    /// Puts a packet on the network: it may be lost, and arrives after a random delay.
    fn send(&mut self, packet: Packet, lossy: bool) {
        self.stats.messages += 1;
        if lossy && self.rng.gen_bool(self.net.loss) {
            self.stats.messages_dropped += 1;
            if let Packet::Raft(m) = &packet {
                let (from, to) = (m.from, m.to);
                self.lost(from, to);
            }
            return;
        }
        let delay = self.rng.gen_range(1..=self.net.delay_max_ms.max(1));
        // Delivered in the first step at or after its arrival time.
        let at = self.now + delay;
        self.packet_seq += 1;
        self.packets.insert((at, self.packet_seq), packet);
    }

    /// Chains one delivered event into `events`: its step, and its bytes (a raft message's
    /// encoding, else its debug form, which for these types prints every field).
    fn record_event(&mut self, packet: &Packet) {
        let bytes = match packet {
            Packet::Raft(m) => tally_core::replica::encode_message(m),
            Packet::Unreachable { node, peer } => format!("lost {node}->{peer}").into_bytes(),
            Packet::Request { to, reply, request } => {
                format!("{to} {reply:?} {request:?}").into_bytes()
            }
            Packet::Reply { reply, answer } => format!("{reply:?} {answer:?}").into_bytes(),
        };
        self.events = sha256(&[&self.events, &self.step.to_le_bytes(), &bytes]);
    }

    fn deliver(&mut self, packet: Packet) {
        self.record_event(&packet);
        match packet {
            Packet::Raft(m) => {
                let (from, to) = (m.from, m.to);
                if self.cut.contains(&(from, to)) {
                    self.stats.messages_dropped += 1;
                    self.lost(from, to);
                    return;
                }
                let up = self.nodes[to as usize - 1]
                    .as_ref()
                    .is_some_and(|n| n.is_up());
                if !up {
                    self.lost(from, to);
                    return;
                }
                let t = self.t.clone();
                self.node(to).step(m, &t);
                self.drive(to, Vec::new());
            }
            Packet::Request { to, reply, request } => {
                let up = self.nodes[to as usize - 1]
                    .as_ref()
                    .is_some_and(|n| n.is_up());
                if !up {
                    return;
                }
                let now = self.now;
                self.node(to).request(reply, request, now);
                self.drive(to, Vec::new());
            }
            Packet::Reply { reply, answer } => self.answer(reply, answer),
            Packet::Unreachable { node, peer } => {
                if self.nodes[node as usize - 1]
                    .as_ref()
                    .is_some_and(|n| n.is_up())
                {
                    self.node(node).unreachable(peer);
                    self.drive(node, Vec::new());
                }
            }
        }
    }

    fn crash(&mut self, id: u64) {
        self.node(id).crash();
        self.stats.crashes += 1;
        let down = self.rng.gen_range(200..3000);
        self.restart_at.insert(id, self.now + down);
    }

    fn restart(&mut self, id: u64) {
        if self.nodes[id as usize - 1].is_none() {
            return;
        }
        if self.node(id).is_up() {
            return;
        }
        let t = self.t.clone();
        self.node(id).start(&t);
        self.stats.restarts += 1;
        self.drive(id, Vec::new());
    }

    fn down(&self) -> usize {
        self.nodes.iter().flatten().filter(|n| !n.is_up()).count()
    }

    /// Draws this step's faults: crashes (never more than a minority down) and partitions
    /// (isolation, majority/minority split, one-way cuts).
    fn faults(&mut self) {
        let minority = (self.nodes.iter().flatten().count() - 1) / 2;
        if self.rng.gen_bool(0.004) && self.down() < minority {
            // The leader more often than not: that is where the interesting cases are.
            let leader = self
                .nodes
                .iter()
                .flatten()
                .find(|n| n.writable())
                .map(|n| n.id);
            let up: Vec<u64> = self
                .nodes
                .iter()
                .flatten()
                .filter(|n| n.is_up())
                .map(|n| n.id)
                .collect();
            let victim = match leader {
                Some(l) if self.rng.gen_bool(0.6) => l,
                _ => *up.choose(&mut self.rng).expect("a majority is up"),
            };
            self.crash(victim);
        }
        if self.partition_until.is_none() && self.rng.gen_bool(0.003) {
            let n = self.n();
            let mut ids: Vec<u64> = (1..=n).collect();
            ids.shuffle(&mut self.rng);
            match self.rng.gen_range(0..3) {
                0 => {
                    // One replica isolated.
                    for other in 1..=n {
                        if other != ids[0] {
                            self.cut.insert((ids[0], other));
                            self.cut.insert((other, ids[0]));
                        }
                    }
                }
                1 => {
                    // A minority and a majority.
                    let m = self.rng.gen_range(1..=(n as usize - 1) / 2);
                    let (minor, major) = ids.split_at(m);
                    for &a in minor {
                        for &b in major {
                            self.cut.insert((a, b));
                            self.cut.insert((b, a));
                        }
                    }
                }
                _ => {
                    // Some links cut in one direction only.
                    let links = self.rng.gen_range(1..=n as usize);
                    for _ in 0..links {
                        let a = self.rng.gen_range(1..=n);
                        let b = self.rng.gen_range(1..=n);
                        if a != b {
                            self.cut.insert((a, b));
                        }
                    }
                }
            }
            self.stats.partitions += 1;
            self.partition_until = Some(self.now + self.rng.gen_range(200..4000));
        }
    }

    /// Ends every fault: the network heals and stops losing packets, every replica restarts,
    /// clients start no new operation.
    fn leader(&self) -> Option<u64> {
        self.nodes
            .iter()
            .flatten()
            .find(|n| n.writable())
            .map(|n| n.id)
    }

    /// Replica replacements: starts one now and then while faults run, and carries the one in
    /// progress a step further whenever the leader's configuration shows the last step done.
    fn membership(&mut self, faults: bool) {
        let Some(r) = &self.replacing else {
            if faults && self.down() == 0 && self.rng.gen_bool(REPLACE_PROBABILITY) {
                self.start_replacing();
            }
            return;
        };
        let (old, new, stage) = (r.old, r.new, r.stage);
        let Some(leader) = self.leader() else {
            return;
        };
        let conf = self.node(leader).conf_state().expect("the leader runs");
        let leader_height = self.node(leader).meta().height;
        let done = match stage {
            Stage::Add => {
                conf.learners.contains(&new)
                    && self.nodes[new as usize - 1]
                        .as_ref()
                        .is_some_and(|n| n.is_up() && n.meta().height >= leader_height)
            }
            Stage::Promote => conf.voters.contains(&new),
            Stage::Remove => !conf.voters.contains(&old) && !conf.learners.contains(&old),
        };
        if done {
            self.replaced_step(stage);
            return;
        }
        let r = self.replacing.as_mut().expect("checked");
        if self.now < r.next_try {
            return;
        }
        r.next_try = self.now + MEMBERSHIP_RETRY_MS;
        let change = match stage {
            Stage::Add => MemberChange::Add {
                id: new,
                // The simulated network routes by id; the address is only carried along.
                address: tally_core::engine::members::MemberAddress {
                    peer: format!("sim-{new}:7500"),
                    client: String::new(),
                },
                learner: true,
            },
            Stage::Promote => MemberChange::Promote { id: new },
            Stage::Remove if leader == old => {
                // A leader is not removed: it hands over first, as an operator would.
                self.node(leader).transfer_leader(new);
                self.drive(leader, Vec::new());
                return;
            }
            Stage::Remove => MemberChange::Remove { id: old },
        };
        self.node(leader).change_members(change);
        self.drive(leader, Vec::new());
    }

    /// A new replica (the next id, an empty disk, the cluster's initial configuration) that
    /// will replace a running voter other than the leader.
    fn start_replacing(&mut self) {
        let leader = self.leader();
        let voters: Vec<u64> = self
            .nodes
            .iter()
            .flatten()
            .filter(|n| Some(n.id) != leader)
            .filter_map(|n| {
                n.conf_state()
                    .filter(|c| c.voters.contains(&n.id))
                    .map(|_| n.id)
            })
            .collect();
        let Some(&old) = voters.choose(&mut self.rng) else {
            return;
        };
        let new = self.n() + 1;
        let key = OperatorKey::new(SigningKey::from_bytes(&self.operator_secret));
        let mut node = SimNode::new(new, &self.initial_voters, key);
        node.start(&self.t);
        self.nodes.push(Some(node));
        self.replacing = Some(Replacing {
            old,
            new,
            stage: Stage::Add,
            next_try: self.now,
        });
    }

    fn replaced_step(&mut self, done: Stage) {
        let r = self.replacing.as_mut().expect("a replacement in progress");
        r.next_try = self.now;
        match done {
            Stage::Add => r.stage = Stage::Promote,
            Stage::Promote => r.stage = Stage::Remove,
            Stage::Remove => {
                // The operator stops the removed replica (it stops by itself if it learned).
                let old = r.old;
                self.nodes[old as usize - 1] = None;
                self.restart_at.remove(&old);
                self.replacing = None;
                self.stats.replacements += 1;
            }
        }
    }

    fn heal(&mut self) {
        self.cut.clear();
        self.partition_until = None;
        self.net.loss = 0.0;
        self.net.duplicate = 0.0;
        self.accepting = false;
        for id in std::mem::take(&mut self.restart_at).into_keys() {
            self.restart(id);
        }
    }

    /// Runs until no client packet is in flight, every client is idle and every replica holds the same
    /// state with one of them writable. False (and a violation) if that never happens.
    fn settle(&mut self, when: &str) -> bool {
        let deadline = self.step + HEAL_STEPS_MAX;
        while self.step < deadline {
            self.tick(false);
            let quiet = self
                .packets
                .values()
                .all(|p| matches!(p, Packet::Raft(_) | Packet::Unreachable { .. }))
                && self
                    .clients
                    .iter()
                    .all(|c| c.current.is_none() && c.resolve.is_empty());
            if quiet && self.converged() {
                return true;
            }
        }
        let states: Vec<String> = self.nodes.iter().flatten().map(|n| n.describe()).collect();
        self.violations.push(format!(
            "no convergence {} {HEAL_STEPS_MAX} steps {when}: {}",
            "within",
            states.join("; ")
        ));
        false
    }

    fn converged(&self) -> bool {
        let nodes: Vec<&SimNode> = self.nodes.iter().flatten().collect();
        nodes.iter().all(|n| n.is_up())
            && nodes.iter().any(|n| n.writable())
            && nodes.iter().all(|n| n.meta() == nodes[0].meta())
    }

    /// Hands every operation whose outcome is unknown to a client, to resubmit once more.
    fn resolve(&mut self) {
        self.accepting = false;
        self.resolution_height = self
            .nodes
            .iter()
            .flatten()
            .map(|n| n.meta().height)
            .max()
            .unwrap_or(0);
        let ops = (self.ops.iter().enumerate())
            .filter(|(_, o)| o.state.applied().is_none())
            .map(|(i, _)| Task::Submit(i));
        let envelopes = (self.envelopes.iter().enumerate())
            .filter(|(_, e)| e.state.applied().is_none())
            .map(|(i, _)| Task::Envelope(i));
        let open: Vec<Task> = ops.chain(envelopes).collect();
        for (k, task) in open.into_iter().enumerate() {
            self.clients[k % CLIENTS].resolve.push(task);
        }
    }

    fn client_step(&mut self, c: usize) {
        let now = self.now;
        if let Some(cur) = &mut self.clients[c].current {
            if cur.deadline.is_some_and(|d| now >= d) {
                // No answer: try the next replica.
                cur.deadline = None;
                cur.retry_at = Some(now);
                let next = self.clients[c].target % self.n() + 1;
                self.clients[c].target = next;
            }
            let due = self.clients[c]
                .current
                .as_ref()
                .is_some_and(|cur| cur.retry_at.is_some_and(|r| now >= r));
            if due {
                self.attempt(c);
            }
            return;
        }
        if let Some(task) = self.clients[c].resolve.pop() {
            let floor = self.clients[c].seen;
            self.clients[c].current = Some(Current {
                task,
                attempt: 0,
                deadline: None,
                retry_at: Some(now),
                tries: 0,
                floor,
                resolving: !self.accepting,
            });
            self.attempt(c);
            return;
        }
        if !self.accepting || now < self.clients[c].next_at {
            return;
        }
        let task = if self.rng.gen_bool(0.15) {
            Task::Read
        } else if self.rng.gen_bool(ENVELOPE_FRACTION) {
            Task::Envelope(self.new_envelope(c))
        } else if self.rng.gen_bool(TWO_PHASE_FRACTION) {
            Task::Envelope(self.new_two_phase(c))
        } else {
            Task::Submit(self.new_op())
        };
        let floor = self.clients[c].seen;
        self.clients[c].current = Some(Current {
            task,
            attempt: 0,
            deadline: None,
            retry_at: Some(now),
            tries: 0,
            floor,
            resolving: false,
        });
        self.attempt(c);
    }

    fn new_op(&mut self) -> usize {
        let from = self.rng.gen_range(0..ACCOUNTS);
        let (effect, o) = self.draw_operation(from);
        let request = build_request(
            &self.accounts[from],
            self.t.chain_id,
            o.op,
            o.id,
            o.to,
            o.amount,
        );
        self.add_op(effect, request)
    }

    /// A new envelope of 2 to 8 operations (never more than a batch holds) from one account,
    /// atomic or not, for client `c`.
    fn new_envelope(&mut self, c: usize) -> usize {
        let from = self.rng.gen_range(0..ACCOUNTS);
        let most = ENVELOPE_OPS_MAX
            .min(self.t.batch_requests_max as usize)
            .max(2);
        let n = self.rng.gen_range(2..=most);
        let atomic = self.rng.gen_bool(0.5);
        let (effects, ops): (Vec<Effect>, Vec<Operation>) =
            (0..n).map(|_| self.draw_operation(from)).unzip();
        let envelope = build_envelope(&self.accounts[from], self.t.chain_id, atomic, ops);
        self.push_envelope(SentEnvelope::new(c, envelope, effects))
    }

    /// Records a new envelope; its index.
    fn push_envelope(&mut self, e: SentEnvelope) -> usize {
        let i = self.envelopes.len();
        for op in &e.envelope.ops {
            self.envelope_by_key.insert((e.envelope.signer, op.id), i);
        }
        self.envelope_by_hash.insert(e.hash, i);
        self.envelopes.push(e);
        i
    }

    /// A transfer or withdrawal from account `from`, under a new id.
    fn draw_operation(&mut self, from: usize) -> (Effect, Operation) {
        let roll = self.rng.gen_range(0..100);
        let id = self.next_id;
        self.next_id += 1;
        let (effect, op, to, amount) = if roll < 10 {
            let amount = self.rng.gen_range(1..=40);
            (
                Effect::Withdraw { from, amount },
                Op::Withdraw,
                [0; 32],
                amount,
            )
        } else {
            let to = (from + self.rng.gen_range(1..ACCOUNTS)) % ACCOUNTS;
            let amount = self.rng.gen_range(1..=120);
            (
                Effect::Transfer { from, to, amount },
                Op::Transfer,
                self.accounts[to].verifying_key().to_bytes(),
                amount,
            )
        };
        (effect, Operation::single(op, id, to, amount))
    }

    /// What is known of a submission's outcome, and how many copies went out (None for a read).
    fn submission(&mut self, task: Task) -> Option<(&mut OpState, u32)> {
        match task {
            Task::Submit(op) => {
                let o = &mut self.ops[op];
                Some((&mut o.state, o.sent))
            }
            Task::Envelope(e) => {
                let e = &mut self.envelopes[e];
                Some((&mut e.state, e.sent))
            }
            Task::Read => None,
        }
    }

    /// Sends the current task's next attempt to the client's target.
    fn attempt(&mut self, c: usize) {
        let n = self.n();
        let now = self.now;
        let client = &mut self.clients[c];
        let cur = client.current.as_mut().expect("a task is under way");
        cur.tries += 1;
        if cur.tries > TRIES_MAX {
            // Give up: the outcome of a submit stays unknown until the final resolution.
            let (task, resolving) = (cur.task, cur.resolving);
            client.current = None;
            client.next_at = now + self.rng.gen_range(0..50);
            if let Some((state, _)) = self.submission(task) {
                if state.applied().is_none() {
                    *state = if resolving {
                        OpState::Unresolved("no answer after many attempts".into())
                    } else {
                        OpState::Indeterminate("no answer".into())
                    };
                }
            }
            return;
        }
        self.stats.attempts += 1;
        self.attempt_seq += 1;
        cur.attempt = self.attempt_seq;
        cur.deadline = Some(now + REPLY_TIMEOUT_MS);
        cur.retry_at = None;
        let reply = ReplyTo {
            client: c,
            attempt: cur.attempt,
        };
        let request = match cur.task {
            Task::Submit(op) => {
                self.ops[op].sent += 1;
                ClientRequest::Submit(self.ops[op].request.clone())
            }
            Task::Envelope(e) => {
                self.envelopes[e].sent += 1;
                ClientRequest::SubmitEnvelope(self.envelopes[e].envelope.clone())
            }
            Task::Read => ClientRequest::Read(
                self.accounts[self.rng.gen_range(0..ACCOUNTS)]
                    .verifying_key()
                    .to_bytes(),
            ),
        };
        let to = client.target.clamp(1, n);
        self.send(Packet::Request { to, reply, request }, true);
    }

    /// A replica's answer reaches a client.
    fn answer(&mut self, reply: ReplyTo, answer: Answer) {
        let c = reply.client;
        // Every confirmation a client receives counts, even for an attempt it gave up on.
        match &answer {
            Answer::Confirmed(conf) => self.confirmation(conf),
            Answer::EnvelopeConfirmed(conf) => self.envelope_confirmation(conf),
            _ => {}
        }
        let Some(cur) = self.clients[c].current.as_ref() else {
            return;
        };
        if cur.attempt != reply.attempt || cur.deadline.is_none() {
            return;
        }
        match (answer, cur.task) {
            (Answer::Confirmed(conf), Task::Submit(_)) => self.confirmed(c, conf.receipt.height),
            (Answer::EnvelopeConfirmed(conf), Task::Envelope(_)) => {
                self.confirmed(c, conf.header.header.height)
            }
            (Answer::Balance { height }, Task::Read) => self.read_answered(c, height),
            (Answer::Refused { code, hint, by }, task) => self.refused(c, task, code, hint, by),
            (Answer::EnvelopeFailed { index, code, by }, Task::Envelope(e)) => {
                if index as usize >= self.envelopes[e].len() {
                    self.violations.push(format!(
                        "step {}: envelope #{e} failed at operation {index}, which it lacks",
                        self.step
                    ));
                }
                self.refused(c, Task::Envelope(e), code, 0, by)
            }
            _ => {}
        }
    }

    /// Client `c`'s current submission was confirmed at `height`.
    fn confirmed(&mut self, c: usize, height: u64) {
        let now = self.now;
        let client = &mut self.clients[c];
        let cur = client.current.as_ref().expect("a task is under way");
        // The submission did not exist when the client saw `floor`: it must land above.
        if !cur.resolving && height <= cur.floor {
            self.violations.push(format!(
                "step {}: client {c}'s new request was confirmed at height {height}, below \
                 height {} it had seen before",
                self.step, cur.floor
            ));
        }
        client.seen = client.seen.max(height);
        client.current = None;
        client.next_at = now + self.rng.gen_range(0..50);
    }

    /// Client `c`'s linearizable read was answered at `height`.
    fn read_answered(&mut self, c: usize, height: u64) {
        let client = &mut self.clients[c];
        if height < client.seen {
            self.violations.push(format!(
                "step {}: client {c}'s linearizable read answered at height {height} after it \
                 had seen height {}",
                self.step, client.seen
            ));
        }
        client.seen = client.seen.max(height);
        self.stats.reads += 1;
        client.current = None;
        client.next_at = self.now + self.rng.gen_range(0..50);
    }

    /// Client `c`'s current task was refused: retried elsewhere, or settled.
    fn refused(&mut self, c: usize, task: Task, code: ErrorCode, hint: u64, by: (u64, u64)) {
        let (n, now) = (self.n(), self.now);
        let backoff = self.rng.gen_range(10..60);
        let client = &mut self.clients[c];
        let cur = client.current.as_mut().expect("checked above");
        cur.deadline = None;
        if let ErrorCode::NotLeader | ErrorCode::Unavailable | ErrorCode::Busy = code {
            client.target = if hint != 0 {
                hint
            } else {
                client.target % n + 1
            };
            cur.retry_at = Some(now + if hint != 0 { TICK_MS } else { backoff });
            return;
        }
        let resolving = cur.resolving;
        client.current = None;
        client.next_at = now + backoff;
        self.settle_refusal(task, code, resolving, by);
    }

    /// What a refusal with a final `code` says of a submission's outcome.
    fn settle_refusal(&mut self, task: Task, code: ErrorCode, resolving: bool, by: (u64, u64)) {
        let step = self.step;
        if code == ErrorCode::IdConflict {
            self.violations.push(format!(
                "step {step}: {} resubmitted with the same bytes was refused as id_conflict",
                match task {
                    Task::Submit(op) => format!("op #{op}"),
                    Task::Envelope(e) => format!("envelope #{e}"),
                    Task::Read => "a read".into(),
                }
            ));
        }
        let deterministic = DETERMINISTIC_REFUSALS.contains(&code);
        let Some((state, sent)) = self.submission(task) else {
            return;
        };
        if state.applied().is_some() {
            return;
        }
        *state = if deterministic && sent == 1 {
            OpState::Rejected(code)
        } else if deterministic && resolving {
            OpState::ResolvedNotApplied(code)
        } else if resolving {
            OpState::Unresolved(code.name().into())
        } else {
            // An earlier copy may still be in flight: unknown.
            OpState::Indeterminate(code.name().into())
        };
        if let (OpState::Indeterminate(_), Task::Submit(op)) = (&*state, task) {
            self.ops[op].refused_after_retry = Some((step, code, sent, by));
        }
    }

    /// Checks a confirmation and records what it shows.
    fn confirmation(&mut self, c: &Confirmation) {
        self.stats.confirmations += 1;
        if let Err(e) = self.verify(c) {
            self.violations.push(format!(
                "step {}: a confirmation at height {} does not verify: {e}",
                self.step, c.receipt.height
            ));
        }
        let step = self.step;
        self.headers
            .record(&c.header, || format!("a confirmation at step {step}"));
        if !self
            .receipts
            .record(&c.request.signer, c.request.id, &c.receipt)
        {
            let last = self.receipts.conflicts.last().cloned().unwrap_or_default();
            self.violations.push(format!("step {step}: {last}"));
        }
        let Some(&op) = self.op_by_key.get(&(c.request.signer, c.request.id)) else {
            self.violations.push(format!(
                "step {step}: a confirmation for a request no client sent"
            ));
            return;
        };
        if self.ops[op].request != c.request {
            self.violations.push(format!(
                "step {step}: op #{op} confirmed with other request bytes"
            ));
        }
        let confirmed = Confirmed {
            height: c.receipt.height,
            index: c.receipt.index,
            term: c.header.header.term,
            header_digest: sha256(&[&c.header.encode()]),
            replayed: c.replayed,
            at_ms: self.now,
            latency_ms: 0,
        };
        let o = &mut self.ops[op];
        o.state = after_confirmation(&o.state, confirmed);
    }

    /// Checks an envelope's confirmation and records what it shows.
    fn envelope_confirmation(&mut self, c: &EnvelopeConfirmation) {
        self.stats.confirmations += 1;
        let step = self.step;
        let Some(&i) = self.envelope_by_hash.get(&c.envelope_hash) else {
            self.violations.push(format!(
                "step {step}: a confirmation for an envelope no client sent"
            ));
            return;
        };
        let envelope = self.envelopes[i].envelope.clone();
        if let Err(e) = verify_envelope_confirmation(&envelope, c, &self.operator_public) {
            self.violations.push(format!(
                "step {step}: envelope #{i}'s confirmation at height {} does not verify: {e}",
                c.header.header.height
            ));
        }
        self.headers.record(&c.header, || {
            format!("an envelope confirmation at step {step}")
        });
        for (op, r) in envelope.ops.iter().zip(&c.receipts) {
            if !self.receipts.record(&envelope.signer, op.id, r) {
                let last = self.receipts.conflicts.last().cloned().unwrap_or_default();
                self.violations.push(format!("step {step}: {last}"));
            }
        }
        let confirmed = Confirmed {
            height: c.header.header.height,
            index: c.proof.first,
            term: c.header.header.term,
            header_digest: sha256(&[&c.header.encode()]),
            replayed: c.replayed,
            at_ms: self.now,
            latency_ms: 0,
        };
        let e = &mut self.envelopes[i];
        e.state = after_confirmation(&e.state, confirmed);
        e.failed = c.receipts.iter().map(|r| r.failed).collect();
    }

    /// `verify_confirmation` without the request signature (the harness made it), with each
    /// header's signature checked once.
    fn verify(&mut self, c: &Confirmation) -> Result<(), String> {
        let h = &c.header.header;
        if c.request.chain_id != h.chain_id
            || c.receipt.request_hash != request_hash(&c.request)
            || c.receipt.op != c.request.op
            || c.receipt.height != h.height
            || c.receipt.index != c.proof.leaf_index
            || c.proof.tree_size != h.request_count
        {
            return Err("the receipt, proof and header do not agree".into());
        }
        if !verify_inclusion(&leaf_hash(&c.receipt.encode()), &c.proof, &h.merkle_root) {
            return Err("the inclusion proof does not lead to the header's root".into());
        }
        let digest = sha256(&[&c.header.encode()]);
        if !self.verified_headers.contains(&digest) {
            verify_header(&self.operator_public, &c.header).map_err(|e| e.to_string())?;
            self.verified_headers.insert(digest);
        }
        Ok(())
    }

    /// The invariants, on the healed and settled cluster.
    fn final_checks(&mut self) {
        // The replicas are only read from here on; set aside, so that the checks can record.
        let nodes = std::mem::take(&mut self.nodes);
        let up: Vec<&SimNode> = nodes.iter().flatten().collect();
        self.ledgers_agree(&up);
        let reference = up[0].ledger();
        let meta = up[0].meta().clone();
        if let Some(chain) = self.final_chain(reference, meta.height) {
            let (index, replay) = self.chain_index(reference, meta.height);
            let mut model = Model::new(ACCOUNTS);
            self.check_ops(&index, &chain, &mut model);
            self.check_envelopes(&index, &chain, &mut model);
            self.check_reserves(reference, &replay, &mut model);
            self.check_balances(reference, &meta, &model);
            for fork in self.headers.forks() {
                self.violations.push(format!("fork: {fork}"));
            }
            self.stats.height = meta.height;
            self.count_outcomes();
        }
        self.nodes = nodes;
    }

    /// Every replica holds the same ledger.
    fn ledgers_agree(&mut self, nodes: &[&SimNode]) {
        let reference = nodes[0].ledger();
        for n in &nodes[1..] {
            let l = n.ledger();
            if l.meta != reference.meta
                || l.accounts != reference.accounts
                || l.headers != reference.headers
                || l.requests != reference.requests
                || l.reserves != reference.reserves
            {
                self.violations.push(format!(
                    "node {}'s ledger differs from node {}'s",
                    n.id, nodes[0].id
                ));
            }
        }
    }

    /// The chain up to `height`: contiguous, linked, signed. The digest of each signed header,
    /// or None (and a violation) if a header is missing.
    fn final_chain(&mut self, reference: &MemStore, height: u64) -> Option<Vec<Hash>> {
        let mut prev = [0u8; 32];
        let mut chain = Vec::with_capacity(height as usize);
        for h in 1..=height {
            let Some(signed) = reference.headers.get(&h) else {
                self.violations
                    .push(format!("the final chain lacks header {h}"));
                return None;
            };
            if signed.header.prev_hash != prev {
                self.violations
                    .push(format!("header {h} does not link to header {}", h - 1));
            }
            let digest = sha256(&[&signed.encode()]);
            if !self.verified_headers.contains(&digest) {
                if let Err(e) = verify_header(&self.operator_public, signed) {
                    self.violations.push(format!("header {h}: {e}"));
                }
                self.verified_headers.insert(digest);
            }
            self.headers
                .record(signed, || "the final chain".to_string());
            prev = header_hash(&signed.header);
            chain.push(digest);
        }
        Some(chain)
    }

    /// Every operation in the chain, by key: none twice, none that no client sent; and the
    /// chain's reserves and balances, batch by batch.
    fn chain_index(&mut self, reference: &MemStore, height: u64) -> (ChainIndex, Replay) {
        let mut index = ChainIndex::default();
        let mut replay = Replay::default();
        for h in 1..=height {
            let Some(body) = reference
                .bodies
                .get(&h)
                .and_then(|b| BatchBody::decode(b).ok())
            else {
                self.violations
                    .push(format!("the body of batch {h} is missing"));
                continue;
            };
            index.add(&body);
            replay.add(&body);
            for (signer, op, _) in body.operations() {
                let key = (*signer, op.id);
                if !self.op_by_key.contains_key(&key) && !self.envelope_by_key.contains_key(&key) {
                    self.violations
                        .push(format!("batch {h} holds a request no client sent"));
                }
            }
        }
        self.violations.extend(index.twice.iter().cloned());
        (index, replay)
    }

    /// Each request against the chain (`chain`: its headers' digests), into the model.
    fn check_ops(&mut self, index: &ChainIndex, chain: &[Hash], model: &mut Model) {
        for i in 0..self.ops.len() {
            let o = &self.ops[i];
            let found = index
                .get(&o.request.signer, o.request.id)
                .map(|f| (f.height, f.index));
            match &o.state {
                state if state.confirmed().is_some() => {
                    let c = state.confirmed().expect("checked").clone();
                    model.apply(o.effect);
                    self.check_confirmed(&format!("op #{i}"), &c, found, chain);
                }
                state if state.applied() == Some(false) => {
                    if let Some((h, _)) = found {
                        self.violations.push(format!(
                            "op #{i} was settled as not applied ({state:?}) but the final \
                             chain applies it at height {h}"
                        ));
                    }
                }
                state => {
                    let v = format!("op #{i} is still unresolved: {state:?}");
                    self.violations.push(v)
                }
            }
            self.note_refused_then_applied(i);
        }
    }

    /// A confirmed submission (`what`) is where its confirmation `c` says (`found`: where the
    /// chain has its first operation), under the final chain's header.
    fn check_confirmed(
        &mut self,
        what: &str,
        c: &Confirmed,
        found: Option<(u64, u32)>,
        chain: &[Hash],
    ) {
        if found != Some((c.height, c.index)) {
            self.violations.push(format!(
                "{what} was confirmed at height {} index {} but the final chain has it {}",
                c.height,
                c.index,
                match found {
                    Some((h, x)) => format!("at height {h} index {x}"),
                    None => "nowhere".into(),
                }
            ));
        } else if chain.get(c.height as usize - 1) != Some(&c.header_digest) {
            self.violations.push(format!(
                "{what}'s confirmation names a header that is not the final chain's at height {}",
                c.height
            ));
        }
    }

    /// Counts (and describes the first) request refused with a "final" code while an earlier
    /// copy was in flight, and applied before the final resolution anyway.
    fn note_refused_then_applied(&mut self, i: usize) {
        let o = &self.ops[i];
        let applied_anyway = o
            .state
            .confirmed()
            .filter(|c| c.height <= self.resolution_height);
        let (Some((step, code, sent, by)), Some(c)) = (o.refused_after_retry, applied_anyway)
        else {
            return;
        };
        self.stats.refused_then_applied += 1;
        if self.stats.refused_then_applied_example.is_some() {
            return;
        }
        let text = format!(
            "op #{i} ({:?}) was refused as {} at step {step} by node {} in term {} (copy {sent} \
             of the request), yet the final chain applies it at height {} index {}, in a batch \
             of term {}",
            o.effect,
            code.name(),
            by.0,
            by.1,
            c.height,
            c.index,
            c.term
        );
        self.stats.refused_then_applied_example = Some((0, text));
    }

    /// The envelope invariants (`envelopes::check`), each confirmed envelope under the final
    /// chain's header, and the applied operations into the model.
    fn check_envelopes(&mut self, index: &ChainIndex, chain: &[Hash], model: &mut Model) {
        let v = envelopes::check(&self.envelopes, index);
        for (name, problems) in [
            ("envelopes_atomic", v.atomic),
            ("envelopes_whole", v.whole),
            ("failed_operations_change_nothing", v.failed_ops),
            ("envelope fate", v.fate),
        ] {
            let named = problems.into_iter().map(|p| format!("{name}: {p}"));
            self.violations.extend(named);
        }
        for i in 0..self.envelopes.len() {
            let e = &self.envelopes[i];
            e.apply_to(model);
            match e.state.confirmed().cloned() {
                Some(c) => {
                    let first = e.envelope.ops[0].id;
                    let found = index
                        .get(&e.envelope.signer, first)
                        .map(|f| (f.height, f.index));
                    self.check_confirmed(&format!("envelope #{i}"), &c, found, chain);
                }
                None if e.state.applied().is_none() => {
                    let v = format!("envelope #{i} is still unresolved: {:?}", e.state);
                    self.violations.push(v);
                }
                None => {}
            }
        }
        self.stats.envelopes_applied += v.in_chain.0 + v.in_chain.1;
        self.stats.envelope_ops_failed += v.failed_in_chain;
    }

    /// The reserve invariants (`reserves::Replay`), with the final state's reserves as what
    /// must be open; what two-phase operations moved into the model.
    fn check_reserves(&mut self, reference: &MemStore, replay: &Replay, model: &mut Model) {
        let confirmed = crate::reserves::confirmed_reserves(&self.envelopes);
        // Sorted, so that a seed's violations come in one order.
        let state: BTreeMap<_, _> = reference.reserves.iter().collect();
        let mut lost = replay.not_lost(confirmed, Some(state));
        lost.extend(digest_with_reserves(reference, replay));
        for (name, problems) in [
            ("reserves_settle_once", &replay.settle_once),
            ("expiries_on_time", &replay.on_time),
            ("reserves_not_lost", &lost),
            ("supply_balanced", &replay.supply),
        ] {
            let named = problems.iter().map(|p| format!("{name}: {p}"));
            self.violations.extend(named);
        }
        let keys: Vec<PublicKey> = (self.accounts.iter())
            .map(|k| k.verifying_key().to_bytes())
            .collect();
        model.add_net(&keys, &replay.net);
        self.stats.reserves.add(&replay.counts);
    }

    /// Balances equal the model's, and sum to deposits minus withdrawals.
    fn check_balances(&mut self, reference: &MemStore, meta: &LedgerMeta, model: &Model) {
        let balances: Vec<u64> = self
            .accounts
            .iter()
            .map(|k| {
                reference
                    .accounts
                    .get(&k.verifying_key().to_bytes())
                    .copied()
                    .unwrap_or(0)
            })
            .collect();
        // Open reserves hold the rest (PROTOCOL.md §4.10, conservation).
        let held: u128 = reference.reserves.values().map(|r| r.held() as u128).sum();
        let sum: u128 = balances.iter().map(|&b| b as u128).sum::<u128>() + held;
        if sum != meta.expected_total()
            || meta.total_deposited != model.deposited
            || meta.total_withdrawn != model.withdrawn
        {
            self.violations.push(format!(
                "conservation: balances and held sum to {sum}; the ledger says deposits {} - \
                 withdrawals {}, the model {} - {}",
                meta.total_deposited, meta.total_withdrawn, model.deposited, model.withdrawn
            ));
        }
        for d in model.differences(&balances) {
            self.violations.push(format!("balances: {d}"));
        }
    }

    fn count_outcomes(&mut self) {
        for o in &self.ops {
            match &o.state {
                OpState::Confirmed(_) => self.stats.confirmed += 1,
                OpState::ResolvedApplied(_) => self.stats.resolved_applied += 1,
                OpState::Rejected(_) => self.stats.rejected += 1,
                OpState::ResolvedNotApplied(_) => self.stats.resolved_not_applied += 1,
                _ => {}
            }
        }
        self.stats.envelopes = self.envelopes.len() as u64;
    }
}

/// The live verdict's check of open reserves, against the simulated store: the state digest
/// recomputed from the store's balances and the chain's reserves (`Replay::add_reserves`)
/// is the final header's.
fn digest_with_reserves(reference: &MemStore, replay: &Replay) -> Option<String> {
    let stored = reference.meta.clone()?;
    let mut meta = LedgerMeta::genesis();
    for (key, balance) in &reference.accounts {
        meta.account_changed(key, None, *balance);
    }
    replay.add_reserves(&mut meta);
    meta.map.flush();
    meta.height = stored.height;
    meta.total_deposited = stored.total_deposited;
    meta.total_withdrawn = stored.total_withdrawn;
    let header = reference.headers.get(&stored.height)?;
    (header.header.state_digest != meta.state_digest()).then(|| {
        format!(
            "the state digest recomputed from the balances and the chain's reserves is not \
             header {}'s",
            stored.height
        )
    })
}

/// A submission's state once a confirmation (`confirmed`) arrived for it.
fn after_confirmation(state: &OpState, confirmed: Confirmed) -> OpState {
    match state {
        OpState::InFlight | OpState::Confirmed(_) => OpState::Confirmed(confirmed),
        OpState::ResolvedApplied(_) => OpState::ResolvedApplied(confirmed),
        OpState::Indeterminate(_) | OpState::Unresolved(_) => OpState::ResolvedApplied(confirmed),
        // A confirmation for what was settled as not applied: the final checks report it (the
        // request is then in the chain although a refusal said it would not be).
        other => other.clone(),
    }
}
