//! Golden scripts for the replication stage (`engine::replication::Replication`): each file in
//! `core/tests/golden/replication/` runs several replicas' stages in memory over a scripted
//! network and lists, under each input, the commands the stages give back, prefixed with `> `
//! (see `script.rs` for the format and `TALLY_GOLDEN_UPDATE=1`).
//!
//! Each replica is a `Replication` over a [`MemRaftLog`]; the harness plays the apply stage
//! (every committed entry is applied at once) and the network (a queue of messages that moves
//! only when told). raft-rs draws election timeouts at random; here replica N always waits
//! `election + N - 1` ticks, so of replicas whose clocks started together the lowest id times
//! out first, and every script replays exactly.
//!
//! Inputs (replicas are numbers; `all` ticks every running replica, in id order):
//! - `cluster N [election=10] [heartbeat=3]`: replicas 1..=N, the initial voters, start
//! - `start ID`: a new replica with an empty log that knows the initial voters (a joiner)
//! - `tick ID|all [n]`, `campaign ID` (an election now, as when the timeout fires)
//! - `deliver [FROM->TO|all]`: every message queued now (or on that link) arrives, and what it
//!   makes the receiver send is queued; `all` repeats until nothing is queued
//! - `drop [FROM->TO]`, `partition 1|2,3` (a message between groups is lost), `heal`
//! - `propose ID height=H [epoch=E]` (a batch the master sealed; its waiter is `hH`)
//! - `change ID add=X [learner] | promote=X | remove=X`, `members ID` (the operator is `op`)
//! - `transfer-leader ID to=X`, `compact ID` (up to what it applied), `status`
//! - `closed FROM->TO`: the connection FROM opened to TO closed (TO's stage hears
//!   `peer_closed(FROM)`)
//!
//! Outputs: `> A->B MsgType term=T ...` for a message (`log=I/T` is the entry before the
//! appended ones or a candidate's last entry; entries are `index/term`), marked `(cut)` when
//! the partition loses it; `> ID: ...` for every other command of replica ID, and `persist`
//! for what it wrote to its raft log under that input (listed first: a leader sends its appends
//! before its own write, a follower answers after it).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;

use protobuf::Message as _;
use raft::eraftpb::{ConfChangeV2, Entry, EntryType, Message, MessageType, Snapshot};
use tally_core::batch::BatchBody;
use tally_core::engine::apply::Committed;
use tally_core::engine::members::{decode_descriptor, AddressBook, MemberAddress, MemberChange};
use tally_core::engine::replication::{ReplOut, Replication, ReplicationConfig};
use tally_core::engine::Waiter;
use tally_core::replica::{Replica, ReplicaConfig};
use tally_core::state::LedgerMeta;
use tally_wire::{Header, MemberRole};

use crate::common::CHAIN;
use crate::mem_raft_log::MemRaftLog;
use crate::script::{self, field};

/// Rounds of `deliver all` before the harness gives up on a network that never goes quiet.
const DELIVER_ROUNDS_MAX: usize = 100;
/// Rounds of ready work one input may cause on one replica.
const READY_ROUNDS_MAX: usize = 16;

type Stage = Replication<MemRaftLog, String, String>;
type Out = Vec<ReplOut<String, String>>;

struct Node {
    repl: Stage,
    /// The apply stage, played by the harness: where it stands.
    applied: LedgerMeta,
    /// The epoch of the last `Lead`: what the master would seal batches in.
    epoch: u64,
    /// The (term, vote) last written, to print only a change of them.
    vote: (u64, u64),
    /// Applied its own removal: the server would exit.
    stopped: bool,
}

struct Cluster {
    voters: Vec<u64>,
    election_ticks: usize,
    heartbeat_ticks: usize,
    nodes: BTreeMap<u64, Node>,
    /// Messages sent and not yet delivered, oldest first.
    queue: VecDeque<Message>,
    /// Links (from, to) the partition cuts.
    cut: BTreeSet<(u64, u64)>,
    out: String,
}

impl Cluster {
    fn new(words: &[&str]) -> Cluster {
        let n: u64 = words.get(1).map_or(0, |w| num(w));
        let mut c = Cluster {
            voters: (1..=n).collect(),
            election_ticks: field(words, "election").unwrap_or(10) as usize,
            heartbeat_ticks: field(words, "heartbeat").unwrap_or(3) as usize,
            nodes: BTreeMap::new(),
            queue: VecDeque::new(),
            cut: BTreeSet::new(),
            out: String::new(),
        };
        for id in 1..=n {
            c.start(id);
        }
        c
    }

    fn start(&mut self, id: u64) {
        assert!(!self.nodes.contains_key(&id), "replica {id} already runs");
        let cfg = ReplicaConfig {
            id,
            election_ticks: self.election_ticks,
            heartbeat_ticks: self.heartbeat_ticks,
            applied: 0,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
        };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let log = MemRaftLog::new(&self.voters);
        let replica = Replica::new(&cfg, log, &logger).expect("a valid replica config");
        let book = AddressBook(self.voters.iter().map(|&v| (v, address(v))).collect());
        let repl_cfg = ReplicationConfig {
            // Compaction happens only when a script says `compact`.
            compaction_entries: 1,
            compaction_bytes: u64::MAX,
        };
        let mut node = Node {
            repl: Replication::new(repl_cfg, replica, book),
            applied: LedgerMeta::genesis(),
            epoch: 0,
            vote: (0, 0),
            stopped: false,
        };
        let timeout = self.timeout(id);
        node.repl.replica_mut().set_election_timeout_ticks(timeout);
        self.nodes.insert(id, node);
    }

    /// Replica `id`'s election timeout, in ticks: fixed, so scripts replay.
    fn timeout(&self, id: u64) -> usize {
        self.election_ticks + (id as usize - 1) % self.election_ticks
    }

    fn node(&mut self, word: &str) -> (u64, &mut Node) {
        let id = num(word);
        let node = self
            .nodes
            .get_mut(&id)
            .unwrap_or_else(|| panic!("no replica {id}"));
        assert!(!node.stopped, "replica {id} stopped");
        (id, node)
    }

    fn input(&mut self, line: &str) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let mut out = Out::new();
        match words[0] {
            "cluster" => *self = Cluster::new(&words),
            "start" => self.start(num(words[1])),
            "tick" => {
                let rounds = words.get(2).map_or(1, |w| num(w));
                for _ in 0..rounds {
                    for id in self.targets(words[1]) {
                        let mut out = Out::new();
                        self.nodes
                            .get_mut(&id)
                            .expect("running")
                            .repl
                            .tick(true, &mut out);
                        self.settle(id, out);
                    }
                }
            }
            "campaign" => {
                let (id, node) = self.node(words[1]);
                node.repl.replica_mut().campaign().expect("campaign");
                self.settle(id, out);
            }
            "propose" => {
                let height = field(&words, "height").expect("height=");
                let (id, node) = self.node(words[1]);
                let epoch = field(&words, "epoch").unwrap_or(node.epoch);
                let body = batch(height, node.repl.status().term);
                let waiter = Waiter {
                    index: 0,
                    reply: format!("h{height}"),
                    replayed: false,
                };
                node.repl
                    .propose(&body, vec![waiter], None, epoch, &mut out);
                self.settle(id, out);
            }
            "change" => {
                let change = member_change(&words);
                let (id, node) = self.node(words[1]);
                node.repl.change_members(change, "op".into(), &mut out);
                self.settle(id, out);
            }
            "members" => {
                let (id, node) = self.node(words[1]);
                node.repl.members("op".into(), &mut out);
                self.settle(id, out);
            }
            "closed" => {
                let (from, to) = parse_link(words[1]);
                let (id, node) = self.node(&to.to_string());
                node.repl.peer_closed(from);
                self.settle(id, out);
            }
            "transfer-leader" => {
                let to = field(&words, "to").expect("to=");
                let (id, node) = self.node(words[1]);
                node.repl.replica_mut().transfer_leader(to);
                self.settle(id, out);
            }
            "compact" => {
                let (id, node) = self.node(words[1]);
                let applied = node.applied.clone();
                node.repl.maybe_compact(&applied, &mut out).expect("memory");
                self.settle(id, out);
            }
            "deliver" => match words.get(1) {
                None => self.deliver(None),
                Some(&"all") => {
                    let mut rounds = 0;
                    while !self.queue.is_empty() {
                        rounds += 1;
                        assert!(rounds <= DELIVER_ROUNDS_MAX, "the network never goes quiet");
                        self.deliver(None);
                    }
                }
                Some(link) => self.deliver(Some(parse_link(link))),
            },
            "drop" => {
                let link = words.get(1).map(|w| parse_link(w));
                self.drop_where(|m| link.is_none_or(|l| (m.from, m.to) == l));
            }
            "partition" => {
                let groups: Vec<Vec<u64>> = words[1]
                    .split('|')
                    .map(|g| g.split(',').map(num).collect())
                    .collect();
                self.cut.clear();
                for (i, a) in groups.iter().enumerate() {
                    for (j, b) in groups.iter().enumerate() {
                        if i != j {
                            for &x in a {
                                self.cut.extend(b.iter().map(|&y| (x, y)));
                            }
                        }
                    }
                }
                let cut = self.cut.clone();
                self.drop_where(|m| cut.contains(&(m.from, m.to)));
            }
            "heal" => self.cut.clear(),
            "status" => self.status(),
            other => panic!("unknown input {other:?}"),
        }
    }

    /// The running replicas `word` names: one id, or `all`.
    fn targets(&self, word: &str) -> Vec<u64> {
        if word == "all" {
            let running = self.nodes.iter().filter(|(_, n)| !n.stopped);
            return running.map(|(id, _)| *id).collect();
        }
        vec![num(word)]
    }

    /// One round of the network: every queued message (on `link`, if given) arrives and is
    /// processed; what the receivers send is queued behind.
    fn deliver(&mut self, link: Option<(u64, u64)>) {
        let (now, later): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.queue)
            .into_iter()
            .partition(|m| link.is_none_or(|l| (m.from, m.to) == l));
        self.queue = later;
        for m in now {
            let to = m.to;
            let Some(node) = self.nodes.get_mut(&to).filter(|n| !n.stopped) else {
                continue;
            };
            node.repl.step(m);
            self.settle(to, Out::new());
        }
    }

    fn drop_where(&mut self, lost: impl Fn(&Message) -> bool) {
        let (dropped, kept): (VecDeque<_>, VecDeque<_>) =
            std::mem::take(&mut self.queue).into_iter().partition(lost);
        self.queue = kept;
        for m in dropped {
            let _ = writeln!(self.out, "> dropped {}", describe(&m));
        }
    }

    /// Prints `out`, then processes everything raft has ready on replica `id` (and what the
    /// apply stage makes possible) until nothing is left.
    fn settle(&mut self, id: u64, out: Out) {
        self.commands(id, out);
        for _ in 0..READY_ROUNDS_MAX {
            let node = self.nodes.get_mut(&id).expect("running");
            if node.stopped {
                return;
            }
            let mut installed: Vec<Snapshot> = Vec::new();
            let mut install = |s: &Snapshot| {
                installed.push(s.clone());
                Ok(())
            };
            let mut out = Out::new();
            node.repl.drive(&mut install, &mut out).expect("memory");
            for s in installed {
                let (meta, _) = decode_descriptor(&s.data).expect("a descriptor");
                let m = s.get_metadata();
                let line = format!(
                    "install snapshot={}/{} height={}",
                    m.index, m.term, meta.height
                );
                node.applied = meta;
                let _ = writeln!(self.out, "> {id}: {line}");
            }
            for w in node.repl.replica_mut().store_mut().take_journal() {
                let mut line = String::new();
                if !w.entries.is_empty() {
                    let _ = write!(line, " entries={}", entries(&w.entries));
                }
                if let Some(hs) = w.hard_state.filter(|hs| (hs.term, hs.vote) != node.vote) {
                    node.vote = (hs.term, hs.vote);
                    let _ = write!(line, " term={} vote={}", hs.term, hs.vote);
                }
                if !line.is_empty() {
                    let _ = writeln!(self.out, "> {id}: persist{line}");
                }
            }
            self.commands(id, out);
            let node = self.nodes.get_mut(&id).expect("running");
            let applied = node.applied.clone();
            let mut out = Out::new();
            node.repl
                .applied(applied.raft_index, || applied.clone(), &mut out);
            self.commands(id, out);
            let timeout = self.timeout(id);
            let node = self.nodes.get_mut(&id).expect("running");
            node.repl.replica_mut().set_election_timeout_ticks(timeout);
            if !node.repl.replica().has_ready() {
                return;
            }
        }
        panic!("replica {id} always has more ready work");
    }

    /// Prints (and carries out) the commands of replica `id`'s stage.
    fn commands(&mut self, id: u64, out: Out) {
        for c in out {
            let line = match c {
                ReplOut::Send(messages) => {
                    for m in messages {
                        self.send(m);
                    }
                    continue;
                }
                ReplOut::Committed(c) => self.committed(id, c),
                ReplOut::Lead { term, epoch, meta } => {
                    self.nodes.get_mut(&id).expect("running").epoch = epoch;
                    format!("lead term={term} epoch={epoch} height={}", meta.height)
                }
                ReplOut::Follow => "follow".into(),
                ReplOut::Refuse(reply, why) => format!("refuse {reply} {why:?}"),
                ReplOut::RefuseRead(q) => format!("refuse-read {q}"),
                ReplOut::Serve(q) => format!("serve {q}"),
                ReplOut::Role(s) => {
                    let leader = match s.leader_id {
                        0 => String::new(),
                        l => format!(" leader={l}"),
                    };
                    format!("role {:?} term={}{leader}", s.role, s.term)
                }
                ReplOut::Compacted(meta) => {
                    format!("compacted to={} height={}", meta.raft_index, meta.height)
                }
                ReplOut::Members {
                    reply,
                    leader_id,
                    members,
                } => {
                    let ids = |role| {
                        let mut of_role: Vec<u64> = members
                            .iter()
                            .filter(|m| m.role == role)
                            .map(|m| m.id)
                            .collect();
                        of_role.sort_unstable();
                        of_role.iter().map(u64::to_string).collect::<Vec<_>>()
                    };
                    let learners = ids(MemberRole::Learner);
                    let learners = match learners.is_empty() {
                        true => String::new(),
                        false => format!(" learners={}", learners.join(",")),
                    };
                    let voters = ids(MemberRole::Voter).join(",");
                    format!("members {reply} leader={leader_id} voters={voters}{learners}")
                }
                ReplOut::RefuseChange(reply, why) => format!("refuse-change {reply}: {why}"),
                ReplOut::AddressBook(book) => {
                    let ids: Vec<String> = book.0.keys().map(u64::to_string).collect();
                    format!("address-book {}", ids.join(","))
                }
                ReplOut::Removed => {
                    self.nodes.get_mut(&id).expect("running").stopped = true;
                    "removed (it stops)".into()
                }
            };
            let _ = writeln!(self.out, "> {id}: {line}");
        }
    }

    /// The apply stage's part: the entry is applied at once.
    fn committed(&mut self, id: u64, c: Committed<String>) -> String {
        let node = self.nodes.get_mut(&id).expect("running");
        match c {
            Committed::Batch {
                body,
                waiters,
                raft_index,
                ..
            } => {
                node.applied.raft_index = raft_index;
                node.applied.height = body.header.height;
                let replies: Vec<&str> = waiters.iter().map(|w| w.reply.as_str()).collect();
                let waiters = match replies.is_empty() {
                    true => String::new(),
                    false => format!(" waiters={}", replies.join(",")),
                };
                format!(
                    "committed {raft_index} height={}{waiters}",
                    body.header.height
                )
            }
            Committed::Signature {
                item, raft_index, ..
            } => {
                node.applied.raft_index = raft_index;
                format!("committed {raft_index} signature {item:?}")
            }
            Committed::Other { raft_index } => {
                node.applied.raft_index = raft_index;
                let store = node.repl.replica().store();
                let what = store.entry(raft_index).map_or("?".into(), entry_kind);
                format!("committed {raft_index} {what}")
            }
        }
    }

    fn send(&mut self, m: Message) {
        let to = self.nodes.get(&m.to);
        let lost = if to.is_none() {
            " (no such replica)"
        } else if to.is_some_and(|n| n.stopped) {
            " (stopped)"
        } else if self.cut.contains(&(m.from, m.to)) {
            " (cut)"
        } else {
            ""
        };
        let _ = writeln!(self.out, "> {}{lost}", describe(&m));
        if lost.is_empty() {
            self.queue.push_back(m);
        }
    }

    fn status(&mut self) {
        for (id, node) in &self.nodes {
            if node.stopped {
                let _ = writeln!(self.out, "> {id}: stopped");
                continue;
            }
            let s = node.repl.status();
            let conf = node.repl.replica().conf_state();
            // raft-rs keeps the configuration in hash sets: sorted here to read.
            let list = |ids: &[u64]| {
                let mut ids = ids.to_vec();
                ids.sort_unstable();
                let ids: Vec<String> = ids.iter().map(u64::to_string).collect();
                ids.join(",")
            };
            let first = raft::Storage::first_index(node.repl.replica().store()).expect("memory");
            let compacted = match first {
                1 => String::new(),
                _ => format!(" compacted={}", first - 1),
            };
            let learners = match conf.learners.is_empty() {
                true => String::new(),
                false => format!(" learners={}", list(&conf.learners)),
            };
            let _ = writeln!(
                self.out,
                "> {id}: {:?} term={} leader={} commit={} applied={} last={}{compacted} voters={}{learners}",
                s.role,
                s.term,
                s.leader_id,
                s.commit_index,
                node.applied.raft_index,
                s.last_index,
                list(&conf.voters),
            );
        }
    }
}

fn num<T: std::str::FromStr>(word: &str) -> T {
    word.parse()
        .unwrap_or_else(|_| panic!("{word:?} is not a number"))
}

/// `FROM->TO`.
fn parse_link(word: &str) -> (u64, u64) {
    let (from, to) = word
        .split_once("->")
        .unwrap_or_else(|| panic!("{word:?} is not FROM->TO"));
    (num(from), num(to))
}

fn address(id: u64) -> MemberAddress {
    MemberAddress {
        peer: format!("n{id}:7000"),
        client: String::new(),
    }
}

fn member_change(words: &[&str]) -> MemberChange {
    if let Some(id) = field(words, "add") {
        let learner = words.contains(&"learner");
        let address = address(id);
        MemberChange::Add {
            id,
            address,
            learner,
        }
    } else if let Some(id) = field(words, "promote") {
        MemberChange::Promote { id }
    } else if let Some(id) = field(words, "remove") {
        MemberChange::Remove { id }
    } else {
        panic!("change needs add=, promote= or remove=")
    }
}

/// A batch body of no requests: the replication stage only needs its height and hash.
fn batch(height: u64, term: u64) -> BatchBody {
    let header = Header {
        chain_id: CHAIN,
        height,
        term,
        time_unix_ms: 0,
        request_count: 0,
        prev_hash: [0; 32],
        merkle_root: [0; 32],
        state_digest: [0; 32],
        operator_key_id: [0; 8],
    };
    BatchBody {
        header,
        items: Vec::new(),
    }
}

/// `index/term` of each entry; a long run as its first and last.
fn entries(entries: &[(u64, u64)]) -> String {
    let one = |(i, t): &(u64, u64)| format!("{i}/{t}");
    match entries {
        [] => "[]".into(),
        [first, .., last] if entries.len() > 4 => format!("[{}..{}]", one(first), one(last)),
        _ => {
            let all: Vec<String> = entries.iter().map(one).collect();
            format!("[{}]", all.join(" "))
        }
    }
}

/// What a committed entry that is not a batch carries.
fn entry_kind(e: &Entry) -> String {
    match e.get_entry_type() {
        EntryType::EntryNormal => "empty".into(),
        EntryType::EntryConfChange => "conf-change (v1)".into(),
        EntryType::EntryConfChangeV2 => match ConfChangeV2::parse_from_bytes(&e.data) {
            Ok(cc) => {
                let changes: Vec<String> = cc
                    .get_changes()
                    .iter()
                    .map(|c| format!("{:?} {}", c.get_change_type(), c.node_id))
                    .collect();
                format!("conf-change {}", changes.join(", "))
            }
            Err(_) => "conf-change (garbled)".into(),
        },
    }
}

/// A raft message, by the fields that matter to its type.
fn describe(m: &Message) -> String {
    use MessageType::*;
    let t = m.get_msg_type();
    let head = format!("{}->{} {t:?} term={}", m.from, m.to, m.term);
    let tail = match t {
        MsgRequestVote | MsgRequestPreVote => format!(" log={}/{}", m.index, m.log_term),
        MsgRequestVoteResponse | MsgRequestPreVoteResponse => {
            (if m.reject { " rejected" } else { " granted" }).into()
        }
        MsgAppend => {
            let sent: Vec<(u64, u64)> = m.get_entries().iter().map(|e| (e.index, e.term)).collect();
            format!(
                " log={}/{} entries={} commit={}",
                m.index,
                m.log_term,
                entries(&sent),
                m.commit
            )
        }
        MsgAppendResponse if m.reject => {
            format!(
                " rejected index={} hint={}/{}",
                m.index, m.reject_hint, m.log_term
            )
        }
        MsgAppendResponse => format!(" index={}", m.index),
        MsgHeartbeat => format!(" commit={}", m.commit),
        MsgSnapshot => {
            let s = m.get_snapshot().get_metadata();
            let voters: Vec<String> = s
                .get_conf_state()
                .voters
                .iter()
                .map(u64::to_string)
                .collect();
            format!(
                " snapshot={}/{} voters={}",
                s.index,
                s.term,
                voters.join(",")
            )
        }
        _ => String::new(),
    };
    head + &tail
}

/// Runs one script and returns it with the stages' current answers under each input.
fn run(script: &str) -> String {
    let mut cluster = Cluster::new(&["cluster", "0"]);
    script::run(script, |input| {
        cluster.out.clear();
        cluster.input(input);
        std::mem::take(&mut cluster.out)
    })
}

#[test]
fn golden_scripts_of_the_replication_stage() {
    script::check_dir("tests/golden/replication", run);
}
