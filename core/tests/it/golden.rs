//! Golden scripts for the replica engine's master and apply stages: each file in
//! `core/tests/golden/` feeds the engine inputs, one per line, and lists the commands it gives
//! back under each input, prefixed with `> `. The test runs every script and fails on any
//! difference; `TALLY_GOLDEN_UPDATE=1 cargo test -p tally-core golden` rewrites the files with
//! what the engine does now (review the diff).
//!
//! The replication stage has scripts of its own in `core/tests/golden/replication/`
//! (`election.txt`, `membership.txt`), run over several replicas and a scripted network by
//! `golden_replication.rs`; `script.rs` holds what the two harnesses share.
//!
//! Inputs (clients are lower-case names, accounts upper-case letters; a replica without raft:
//! a proposal waits until a `commit` or `lose` takes it):
//! - `lead term=T epoch=E`, `follow`
//! - `submit CLIENT deposit|transfer|withdraw id=N [from=X] [to=Y] amount=N [now=MS]`
//! - `poll now=MS [busy] [stopping]` (`busy`: requests wait upstream)
//! - `commit` (the oldest proposal commits and is applied), `lose` (it never commits)

use std::collections::VecDeque;
use std::fmt::Write as _;

use tally_core::batch::{BatchBody, Confirmed};
use tally_core::engine::apply::{Applied, Applier, ApplierConfig, ApplyOut, Committed};
use tally_core::engine::master::{Master, MasterConfig, MasterOut, Poll};
use tally_core::engine::Waiter;
use tally_core::key_chain::SigningKeys;
use tally_core::ports::{LedgerStore, MemStore};
use tally_wire::Request;

use crate::common::{config, deposit, operator, transfer, withdraw};
use crate::script::{self, field};

struct Harness {
    master: Master<String>,
    applier: Applier<String>,
    store: MemStore,
    proposed: VecDeque<(BatchBody, Vec<Waiter<String>>)>,
    out: String,
}

/// Account letters map to key seeds: A is 1, B is 2, ...
fn account(words: &[&str], name: &str) -> u8 {
    let prefix = format!("{name}=");
    let letter = words
        .iter()
        .find_map(|w| w.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("{name}= missing"));
    letter.as_bytes()[0] - b'A' + 1
}

fn letter(key: &tally_wire::PublicKey) -> char {
    (1..=26u8)
        .find(|s| crate::common::pk(*s) == *key)
        .map_or('?', |s| (b'A' + s - 1) as char)
}

impl Harness {
    fn new(words: &[&str]) -> Harness {
        let operator = operator();
        let mut sequencer = config(&operator);
        sequencer.batch_requests_max = field(words, "max").unwrap_or(1000) as u32;
        let master = Master::new(MasterConfig {
            sequencer,
            window_ms: field(words, "window").unwrap_or(100),
            close_idle: field(words, "idle").unwrap_or(1) == 1,
            in_flight_max: field(words, "inflight").unwrap_or(1),
        });
        let mut store = MemStore::default();
        let meta = store.meta().expect("memory");
        let cfg = ApplierConfig {
            parked_max: field(words, "parked").unwrap_or(16) as usize,
            accounts_cached_max: 16,
        };
        Harness {
            master,
            applier: Applier::new(cfg, SigningKeys::single(operator), meta),
            store,
            proposed: VecDeque::new(),
            out: String::new(),
        }
    }

    fn poll(&self, words: &[&str]) -> Poll {
        Poll {
            now_ms: field(words, "now").unwrap_or(0),
            unix_ms: 1_700_000_000_000 + field(words, "now").unwrap_or(0),
            applied_height: self.applier.meta().height,
            upstream_empty: !words.contains(&"busy"),
            stopping: words.contains(&"stopping"),
        }
    }

    fn input(&mut self, line: &str) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let mut mout = Vec::new();
        match words[0] {
            "config" => *self = Harness::new(&words),
            "lead" => {
                let meta = self.applier.meta().clone();
                let (term, epoch) = (
                    field(&words, "term").unwrap(),
                    field(&words, "epoch").unwrap(),
                );
                self.master.lead(term, epoch, meta, &mut mout);
            }
            "follow" => self.master.follow(&mut mout),
            "submit" => {
                let request = request(&words);
                let poll = self.poll(&words);
                let applied = poll.applied_height;
                let reply = words[1].to_string();
                self.master
                    .submit(request, applied, reply, &poll, &mut self.store, &mut mout)
                    .expect("memory");
            }
            "poll" => {
                let poll = self.poll(&words);
                self.master.poll(&poll, &mut mout);
            }
            "commit" => self.commit(),
            "lose" => {
                self.proposed.pop_front().expect("a proposal to lose");
            }
            other => panic!("unknown input {other:?}"),
        }
        self.master_out(mout);
    }

    fn master_out(&mut self, out: Vec<MasterOut<String>>) {
        for c in out {
            match c {
                MasterOut::Propose {
                    body,
                    waiters,
                    epoch,
                    close,
                    ..
                } => {
                    let names: Vec<String> = waiters
                        .iter()
                        .map(|w| format!("{}#{}", w.reply, w.index))
                        .collect();
                    let _ = writeln!(
                        self.out,
                        "> propose height={} requests={} close={} epoch={epoch} waiters={}",
                        body.header.height,
                        body.items.len(),
                        close.name(),
                        names.join(",")
                    );
                    self.proposed.push_back((body, waiters));
                }
                MasterOut::Replay {
                    height,
                    index,
                    request_hash,
                    reply,
                } => {
                    let _ = writeln!(self.out, "> replay {reply} height={height} index={index}");
                    let mut aout = Vec::new();
                    self.applier
                        .replay(
                            &mut self.store,
                            height,
                            index,
                            request_hash,
                            reply,
                            &mut aout,
                        )
                        .expect("memory");
                    self.apply_out(aout);
                }
                MasterOut::Refuse(reply, r) => {
                    let _ = writeln!(self.out, "> refuse {reply} {:?}", r);
                }
                MasterOut::Fail(reply, index, r) => {
                    let _ = writeln!(self.out, "> fail {reply} index={index} {}", r.code);
                }
                MasterOut::Reject(reply, r) => {
                    let _ = writeln!(self.out, "> reject {reply} {}", r.code);
                }
            }
        }
    }

    fn commit(&mut self) {
        let (body, waiters) = self.proposed.pop_front().expect("a proposal to commit");
        let encoded = body.encode();
        let raft_index = self.applier.applied_index() + 1;
        let entry = Committed::Batch {
            body,
            encoded,
            waiters,
            sealed: None,
            raft_index,
        };
        let mut aout = Vec::new();
        let applied = self
            .applier
            .committed(&mut self.store, entry, &mut aout)
            .expect("memory");
        let what = match &applied {
            Applied::Written(w) => format!("written height={}", w.meta.height),
            Applied::Skipped => "skipped".into(),
            Applied::Superseded => "superseded".into(),
            Applied::Signed(i) => format!("signed {:?} height={}", i.kind, i.height),
        };
        let _ = writeln!(self.out, "> {what}");
        self.apply_out(aout);
    }

    fn apply_out(&mut self, out: Vec<ApplyOut<String>>) {
        for c in out {
            let line = match c {
                ApplyOut::Confirm { body, waiters, .. } => waiters
                    .iter()
                    .map(|w| {
                        let e = body.entry(w.index as usize);
                        let replayed = if w.replayed { " replayed" } else { "" };
                        format!(
                            "> confirm {} height={} index={} {}{replayed}",
                            w.reply,
                            body.header.height,
                            w.index,
                            balances(e)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n"),
                ApplyOut::Replayed(reply, Confirmed::Request(c)) => format!(
                    "> confirm {reply} height={} index={} replayed",
                    c.header.header.height, c.receipt.index
                ),
                ApplyOut::Replayed(reply, Confirmed::Envelope(c)) => format!(
                    "> confirm {reply} height={} index={} replayed",
                    c.header.header.height, c.proof.first
                ),
                ApplyOut::Replayed(_, Confirmed::Rotation(_)) => {
                    unreachable!("a rotation is never resubmitted")
                }
                ApplyOut::Refuse(reply, r) => format!("> refuse {reply} {r:?}"),
                ApplyOut::Reject(reply, r) => format!("> reject {reply} {}", r.code),
                ApplyOut::Resync => "> resync".into(),
                ApplyOut::Unsigned(h) => format!("> unsigned height={}", h.height),
                ApplyOut::HeaderSigned { height, .. } => format!("> header signed {height}"),
                ApplyOut::CheckpointSigned(h) => format!("> checkpoint signed {h}"),
            };
            if !line.is_empty() {
                let _ = writeln!(self.out, "{line}");
            }
        }
    }
}

/// The balances a receipt gives, by account letter.
fn balances(e: &tally_core::batch::BatchEntry) -> String {
    let (r, q) = (&e.receipt, &e.request);
    match q.op {
        tally_wire::Op::Deposit => format!("{}={}", letter(&q.to), r.to_balance),
        tally_wire::Op::Transfer => format!(
            "{}={} {}={}",
            letter(&q.signer),
            r.signer_balance,
            letter(&q.to),
            r.to_balance
        ),
        tally_wire::Op::Withdraw => format!("{}={}", letter(&q.signer), r.signer_balance),
        other => unreachable!("a request carries no {}", other.name()),
    }
}

fn request(words: &[&str]) -> Request {
    let id = field(words, "id").expect("id=") as u128;
    let amount = field(words, "amount").expect("amount=");
    match words[2] {
        "deposit" => deposit(id, account(words, "to"), amount),
        "transfer" => transfer(id, account(words, "from"), account(words, "to"), amount),
        "withdraw" => withdraw(id, account(words, "from"), amount),
        other => panic!("unknown operation {other:?}"),
    }
}

/// Runs one script and returns it with the engine's current answers under each input.
fn run(script: &str) -> String {
    let mut h = Harness::new(&[]);
    script::run(script, |input| {
        h.out.clear();
        h.input(input);
        std::mem::take(&mut h.out)
    })
}

#[test]
fn golden_scripts_of_the_engine() {
    script::check_dir("tests/golden", run);
}

/// The master asks to be polled when an idle close's spacing ends, so that a request that
/// arrives just after a seal, with nothing after it, is not held for the whole idle wait.
#[test]
fn a_batch_held_back_by_the_in_flight_bound_names_no_deadline() {
    let mut h = Harness::new(&["config", "window=100", "idle=0", "inflight=1"]);
    for line in [
        "lead term=1 epoch=1",
        "submit a deposit id=1 to=A amount=1 now=0",
        "poll now=100",
        "submit b deposit id=2 to=A amount=1 now=101",
        "poll now=201",
    ] {
        h.input(line);
    }
    assert!(h.out.contains("waiters=a#0"), "{}", h.out);
    assert!(!h.out.contains("waiters=b#0"), "{}", h.out);
    let applied = h.applier.meta().height;
    // b's window ended at 201, but a is not applied: a deadline in the past would have the
    // runtime spin until the apply wakes it.
    assert_eq!(h.master.next_poll_ms(250, 0, applied), None);
    assert_eq!(h.master.next_poll_ms(250, 0, applied + 1), Some(201));
    h.input("commit");
    h.input("poll now=250");
    assert!(h.out.contains("waiters=b#0"), "{}", h.out);
}

#[test]
fn the_master_wakes_when_the_idle_spacing_ends() {
    let mut h = Harness::new(&["config", "window=100", "idle=1", "inflight=4"]);
    for line in [
        "lead term=1 epoch=1",
        "submit a deposit id=1 to=A amount=1 now=0",
        "poll now=0",
        "commit",
        "submit b deposit id=2 to=A amount=1 now=3",
        "poll now=3",
    ] {
        h.input(line);
    }
    assert!(
        h.out.contains("close=idle epoch=1 waiters=a#0"),
        "{}",
        h.out
    );
    assert!(!h.out.contains("waiters=b#0"), "{}", h.out);
    // Spacing ends at 0 + 10, before the idle wait (3 + 20) and the window (3 + 100).
    assert_eq!(h.master.next_poll_ms(3, 0, 1), Some(10));
    assert_eq!(h.master.next_poll_ms(10, 0, 1), Some(23));
}
