//! Two-phase transfers in the final chain, and the invariants over them that live and simulated
//! runs share (PROTOCOL.md §4.10):
//!
//! - `reserves_settle_once`: a reserve closes once: no post, void or renew succeeds on a reserve
//!   that is posted, voided, expired or was never made, none succeeds for a signer that is
//!   neither the owner nor the reserve's party, no post captures more than the reserve held, no
//!   expiry closes a reserve that is not open, and a refusal with a reserve code (24 to 28)
//!   names the code the chain's own reserves imply;
//! - `expiries_on_time`: every expiry is in a batch whose time is at or after the reserve's
//!   deadline, no post, void or renew succeeds in a batch whose time has reached it, and batch
//!   times never go backwards;
//! - `reserves_not_lost`: every reserve a client saw confirmed is in the final chain, and every
//!   reserve open at the end is open in the final state with the amount, receiver and deadline
//!   the chain gives it (the simulator compares the store's reserves; a live run the state
//!   digest recomputed with the reserves, [`Replay::add_reserves`]);
//! - `supply_balanced`: after every batch, the balances its receipts name plus what open
//!   reserves hold equal deposits minus withdrawals.
//!
//! [`Replay`] reads the final chain's bodies in height order. Balances come from the receipts;
//! what reserves hold and whom a post pays come from the chain's own reserve operations (never
//! from the body's `held` records), so a body that lies about a reserve disagrees with them.
//! [`Replay::net`] is what two-phase operations and expiries did to each available balance,
//! from their amounts: the harness's balance model adds it.

use std::collections::BTreeMap;

use tally_core::batch::{BatchBody, BatchItem};
use tally_core::reserve::{Held, Reserve};
use tally_wire::{ErrorCode, Op, Operation, PublicKey, Receipt};

use crate::envelopes::SentEnvelope;
use crate::history::short;

/// The reserves clients saw confirmed as applied: `(owner, id)` of every reserve operation of a
/// confirmed envelope whose receipt did not fail.
pub fn confirmed_reserves(envelopes: &[SentEnvelope]) -> Vec<(PublicKey, u128)> {
    let mut out = Vec::new();
    for e in envelopes.iter().filter(|e| e.state.confirmed().is_some()) {
        for (k, op) in e.envelope.ops.iter().enumerate() {
            if op.op == Op::Reserve && e.failed.get(k).is_some_and(Option::is_none) {
                out.push((e.envelope.signer, op.id));
            }
        }
    }
    out
}

/// How a reserve of the chain ended (so far), with the height that closed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Open,
    Posted { height: u64, amount: u64 },
    Voided { height: u64 },
    Expired { height: u64 },
}

impl Fate {
    fn describe(&self) -> String {
        match self {
            Fate::Open => "open".into(),
            Fate::Posted { height, amount } => format!("posted ({amount}) at height {height}"),
            Fate::Voided { height } => format!("voided at height {height}"),
            Fate::Expired { height } => format!("expired at height {height}"),
        }
    }
}

/// A reserve the chain made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainReserve {
    pub held: Held,
    pub made_at: u64,
    /// The term of the leader whose batch made it.
    pub made_term: u64,
    pub fate: Fate,
}

impl ChainReserve {
    /// Its state as the ledger must hold it.
    pub fn state(&self) -> Reserve {
        match self.fate {
            Fate::Open => Reserve::Open(self.held),
            Fate::Posted { .. } => Reserve::Posted,
            Fate::Voided { .. } => Reserve::Voided,
            Fate::Expired { .. } => Reserve::Expired,
        }
    }
}

/// What the chain's two-phase operations did, counted.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReserveCounts {
    pub reserves: u64,
    pub posted: u64,
    pub posted_partly: u64,
    pub posted_by_party: u64,
    pub voided: u64,
    pub renewed: u64,
    pub expired: u64,
    /// Expiries in a batch of a later term than the reserve's: a leader change came between.
    pub expired_under_new_leader: u64,
    /// Two-phase operations that failed, by code name.
    pub refused: BTreeMap<&'static str, u64>,
}

impl ReserveCounts {
    pub fn add(&mut self, o: &ReserveCounts) {
        self.reserves += o.reserves;
        self.posted += o.posted;
        self.posted_partly += o.posted_partly;
        self.posted_by_party += o.posted_by_party;
        self.voided += o.voided;
        self.renewed += o.renewed;
        self.expired += o.expired;
        self.expired_under_new_leader += o.expired_under_new_leader;
        for (code, n) in &o.refused {
            *self.refused.entry(code).or_default() += n;
        }
    }
}

/// The final chain's reserves and balances, batch by batch, with the problems found.
#[derive(Debug, Default)]
pub struct Replay {
    pub reserves: BTreeMap<(PublicKey, u128), ChainReserve>,
    /// Every account's balance as the last receipt that names it says.
    pub balances: BTreeMap<PublicKey, u64>,
    pub deposited: u128,
    pub withdrawn: u128,
    /// What two-phase operations and expiries did to each available balance.
    pub net: BTreeMap<PublicKey, i128>,
    pub height: u64,
    /// The term of the batch being read.
    term: u64,
    last_time_ms: u64,
    pub counts: ReserveCounts,
    pub settle_once: Vec<String>,
    pub on_time: Vec<String>,
    pub supply: Vec<String>,
}

/// The owner of the reserve a post, void or renew names: its `party` field, else the signer.
pub fn owner_of(signer: &PublicKey, op: &Operation) -> PublicKey {
    if op.party == [0; 32] {
        *signer
    } else {
        op.party
    }
}

impl Replay {
    /// Adds the batch after the last one added.
    pub fn add(&mut self, body: &BatchBody) {
        let (height, time) = (body.header.height, body.header.time_unix_ms);
        if time < self.last_time_ms {
            self.on_time.push(format!(
                "batch {height}'s time {time} is before batch {}'s ({})",
                self.height, self.last_time_ms
            ));
        }
        self.height = height;
        self.term = body.header.term;
        self.last_time_ms = time;
        for item in &body.items {
            match item {
                BatchItem::Expire(e) => self.expiry(height, time, &e.owner, e.id, &e.receipt),
                _ => {
                    for (op, r) in item.operations() {
                        self.operation(height, time, item.signer(), &op, r);
                    }
                }
            }
        }
        self.check_supply(height);
    }

    /// What open reserves hold in all.
    pub fn held(&self) -> u128 {
        (self.reserves.values())
            .filter(|r| r.fate == Fate::Open)
            .map(|r| r.held.amount as u128)
            .sum()
    }

    fn check_supply(&mut self, height: u64) {
        let balances: u128 = self.balances.values().map(|&b| b as u128).sum();
        let held = self.held();
        let supply = self.deposited as i128 - self.withdrawn as i128;
        if (balances + held) as i128 != supply {
            self.supply.push(format!(
                "after batch {height}: balances {balances} + held {held} = {}, deposits {} - \
                 withdrawals {} = {supply}",
                balances + held,
                self.deposited,
                self.withdrawn
            ));
        }
    }

    fn credit_net(&mut self, key: &PublicKey, amount: i128) {
        *self.net.entry(*key).or_default() += amount;
    }

    fn operation(
        &mut self,
        height: u64,
        time: u64,
        signer: &PublicKey,
        op: &Operation,
        r: &Receipt,
    ) {
        if let Some(code) = r.failed {
            self.refused(time, signer, op, code);
            return;
        }
        match op.op {
            Op::Deposit => {
                self.balances.insert(op.to, r.to_balance);
                self.deposited += op.amount as u128;
            }
            Op::Transfer => {
                self.balances.insert(*signer, r.signer_balance);
                self.balances.insert(op.to, r.to_balance);
            }
            Op::Withdraw => {
                self.balances.insert(*signer, r.signer_balance);
                self.withdrawn += op.amount as u128;
            }
            Op::Reserve => self.reserved(height, time, signer, op, r),
            Op::Post | Op::Void | Op::Renew => self.acted(height, time, signer, op, r),
            Op::Expire | Op::Rotate => self.settle_once.push(format!(
                "batch {height} holds a leader-made item signed by {} as an operation",
                short(signer)
            )),
        }
    }

    fn reserved(
        &mut self,
        height: u64,
        time: u64,
        signer: &PublicKey,
        op: &Operation,
        r: &Receipt,
    ) {
        self.balances.insert(*signer, r.signer_balance);
        self.credit_net(signer, -(op.amount as i128));
        self.counts.reserves += 1;
        let held = Held {
            to: op.to,
            party: op.party,
            amount: op.amount,
            expires_at_ms: time.saturating_add(op.timeout_ms),
        };
        let made = ChainReserve {
            held,
            made_at: height,
            made_term: self.term,
            fate: Fate::Open,
        };
        if let Some(before) = self.reserves.insert((*signer, op.id), made) {
            self.settle_once.push(format!(
                "reserve {}:{} made at height {height} was made before at height {}",
                short(signer),
                op.id,
                before.made_at
            ));
        }
    }

    /// A post, void or renew that applied.
    fn acted(&mut self, height: u64, time: u64, signer: &PublicKey, op: &Operation, r: &Receipt) {
        let owner = owner_of(signer, op);
        let what = format!(
            "{} {}:{} of reserve {}:{} at height {height}",
            op.op.name(),
            short(signer),
            op.id,
            short(&owner),
            op.reserve_id
        );
        let Some(&found) = self.reserves.get(&(owner, op.reserve_id)) else {
            self.settle_once.push(format!(
                "{what} succeeded, but the chain never made that reserve"
            ));
            return;
        };
        let held = found.held;
        if found.fate != Fate::Open {
            let fate = found.fate.describe();
            self.settle_once
                .push(format!("{what} succeeded on a reserve {fate}"));
        }
        if *signer != owner && *signer != held.party {
            self.settle_once.push(format!(
                "{what} succeeded for a signer that is no party to it"
            ));
        }
        if time >= held.expires_at_ms {
            self.on_time.push(format!(
                "{what} succeeded at batch time {time}, at or past the deadline {}",
                held.expires_at_ms
            ));
        }
        self.balances.insert(owner, r.signer_balance);
        let fate = match op.op {
            Op::Post => self.posted(&what, height, &owner, &held, op, r),
            Op::Void => {
                self.counts.voided += 1;
                self.credit_net(&owner, held.amount as i128);
                Fate::Voided { height }
            }
            _ => {
                self.counts.renewed += 1;
                let renewed = self.reserves.get_mut(&(owner, op.reserve_id));
                renewed.expect("found").held.expires_at_ms = time.saturating_add(op.timeout_ms);
                Fate::Open
            }
        };
        if *signer != owner && op.op == Op::Post {
            self.counts.posted_by_party += 1;
        }
        let reserve = self
            .reserves
            .get_mut(&(owner, op.reserve_id))
            .expect("found");
        reserve.fate = fate;
    }

    fn posted(
        &mut self,
        what: &str,
        height: u64,
        owner: &PublicKey,
        held: &Held,
        op: &Operation,
        r: &Receipt,
    ) -> Fate {
        let amount = if op.amount == 0 {
            held.amount
        } else {
            op.amount
        };
        if amount > held.amount {
            self.settle_once.push(format!(
                "{what} captured {amount}, more than the {} reserved",
                held.amount
            ));
        }
        self.counts.posted += 1;
        if amount < held.amount {
            self.counts.posted_partly += 1;
        }
        if amount > 0 {
            self.balances.insert(held.to, r.to_balance);
        }
        self.credit_net(&held.to, amount as i128);
        self.credit_net(owner, held.amount as i128 - amount as i128);
        Fate::Posted { height, amount }
    }

    /// A leader-made expiry.
    fn expiry(&mut self, height: u64, time: u64, owner: &PublicKey, id: u128, r: &Receipt) {
        let what = format!(
            "the expiry of reserve {}:{id} at height {height}",
            short(owner)
        );
        self.counts.expired += 1;
        let Some(found) = self.reserves.get_mut(&(*owner, id)) else {
            self.settle_once
                .push(format!("{what} closes a reserve the chain never made"));
            return;
        };
        let (fate, held) = (found.fate, found.held);
        found.fate = Fate::Expired { height };
        if found.made_term < self.term {
            self.counts.expired_under_new_leader += 1;
        }
        if fate != Fate::Open {
            let fate = fate.describe();
            self.settle_once
                .push(format!("{what} closes a reserve {fate}"));
        } else {
            self.credit_net(owner, held.amount as i128);
        }
        if time < held.expires_at_ms {
            self.on_time.push(format!(
                "{what} is in a batch of time {time}, before its deadline {}",
                held.expires_at_ms
            ));
        }
        self.balances.insert(*owner, r.signer_balance);
    }

    /// A failed operation: counted, and for a post, void or renew refused with a reserve code,
    /// the code the chain's reserves imply.
    fn refused(&mut self, time: u64, signer: &PublicKey, op: &Operation, code: ErrorCode) {
        if !matches!(op.op, Op::Reserve | Op::Post | Op::Void | Op::Renew) {
            return;
        }
        *self.counts.refused.entry(code.name()).or_default() += 1;
        let reserve_code = matches!(
            code,
            ErrorCode::ReserveNotFound
                | ErrorCode::ReserveClosed
                | ErrorCode::ReserveExpired
                | ErrorCode::PostExceedsReserve
                | ErrorCode::NotAReserveParty
        );
        if op.op == Op::Reserve || !reserve_code {
            return;
        }
        let expected = self.expected_code(time, signer, op);
        if expected != Some(code) {
            self.settle_once.push(format!(
                "{} {}:{} was refused as {}, but the chain's reserves say {}",
                op.op.name(),
                short(signer),
                op.id,
                code.name(),
                expected.map_or("it applies", |c| c.name())
            ));
        }
    }

    /// What the rules of PROTOCOL.md §4.10 answer a post, void or renew at batch time `time`.
    pub fn expected_code(
        &self,
        time: u64,
        signer: &PublicKey,
        op: &Operation,
    ) -> Option<ErrorCode> {
        let owner = owner_of(signer, op);
        let Some(r) = self.reserves.get(&(owner, op.reserve_id)) else {
            return Some(ErrorCode::ReserveNotFound);
        };
        match r.fate {
            Fate::Expired { .. } => return Some(ErrorCode::ReserveExpired),
            Fate::Posted { .. } | Fate::Voided { .. } => return Some(ErrorCode::ReserveClosed),
            Fate::Open => {}
        }
        let wanted = if op.amount == 0 {
            r.held.amount
        } else {
            op.amount
        };
        if *signer != owner && *signer != r.held.party {
            Some(ErrorCode::NotAReserveParty)
        } else if time >= r.held.expires_at_ms {
            Some(ErrorCode::ReserveExpired)
        } else if op.op == Op::Post && wanted > r.held.amount {
            Some(ErrorCode::PostExceedsReserve)
        } else {
            None
        }
    }

    /// `reserves_not_lost`: each of `confirmed` (reserves clients saw confirmed as applied) is
    /// in the chain, and, given the final state's reserves, the open ones agree both ways.
    pub fn not_lost<'a>(
        &self,
        confirmed: impl IntoIterator<Item = (PublicKey, u128)>,
        state: Option<impl IntoIterator<Item = (&'a (PublicKey, u128), &'a Reserve)>>,
    ) -> Vec<String> {
        let mut problems = Vec::new();
        for key in confirmed {
            if !self.reserves.contains_key(&key) {
                problems.push(format!(
                    "reserve {}:{} was confirmed, but the final chain never made it",
                    short(&key.0),
                    key.1
                ));
            }
        }
        let Some(state) = state else {
            return problems;
        };
        let mut open_in_state = 0;
        for (key, reserve) in state {
            let chain = self.reserves.get(key).map(ChainReserve::state);
            if let Reserve::Open(_) = reserve {
                open_in_state += 1;
            }
            if chain.as_ref() != Some(reserve) {
                problems.push(format!(
                    "reserve {}:{} is {reserve:?} in the final state, the chain says {chain:?}",
                    short(&key.0),
                    key.1
                ));
            }
        }
        let open_in_chain = (self.reserves.values())
            .filter(|r| r.fate == Fate::Open)
            .count();
        if open_in_chain != open_in_state {
            problems.push(format!(
                "{open_in_chain} reserves are open in the final chain, {open_in_state} in the \
                 final state"
            ));
        }
        problems
    }

    /// Writes every reserve (in its final state) into a state being recomputed.
    pub fn add_reserves(&self, meta: &mut tally_core::state::LedgerMeta) {
        for ((owner, id), r) in &self.reserves {
            meta.reserve_changed(owner, *id, &r.state());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tally_core::batch::{EnvelopeEntry, ExpireEntry};
    use tally_wire::{Envelope, Header};

    use super::*;

    const D: PublicKey = [9; 32];
    const A: PublicKey = [1; 32];
    const B: PublicKey = [2; 32];
    const P: PublicKey = [3; 32];

    fn operation(op: Op, id: u128, to: PublicKey, amount: u64) -> Operation {
        Operation::single(op, id, to, amount)
    }

    fn reserve(id: u128, amount: u64, timeout_ms: u64) -> Operation {
        Operation {
            timeout_ms,
            party: P,
            ..operation(Op::Reserve, id, B, amount)
        }
    }

    /// A post (`amount` 0: all), void or renew (`amount`: the timeout) of A's reserve `of`.
    fn act(op: Op, id: u128, of: u128, amount: u64) -> Operation {
        Operation {
            reserve_id: of,
            party: A,
            timeout_ms: if op == Op::Renew { amount } else { 0 },
            ..operation(op, id, [0; 32], if op == Op::Post { amount } else { 0 })
        }
    }

    /// One operation of `signer` as a one-operation envelope with its receipt.
    fn item(
        signer: PublicKey,
        op: Operation,
        failed: Option<ErrorCode>,
        b: (u64, u64),
    ) -> BatchItem {
        let envelope = Envelope {
            chain_id: [0; 32],
            signer,
            atomic: false,
            ops: vec![op],
            signature: [0; 64],
        };
        BatchItem::Envelope(EnvelopeEntry {
            envelope: Arc::new(envelope),
            hash: [op.id as u8; 32],
            receipts: vec![receipt(op.op, failed, b)],
            held: Vec::new(),
        })
    }

    fn receipt(op: Op, failed: Option<ErrorCode>, (signer, to): (u64, u64)) -> Receipt {
        Receipt {
            request_hash: [0; 32],
            height: 0,
            index: 0,
            op,
            failed,
            op_index: 0,
            signer_balance: signer,
            to_balance: to,
        }
    }

    fn expire(id: u128, owner_balance: u64) -> BatchItem {
        let held = Held {
            to: B,
            party: P,
            amount: 0,
            expires_at_ms: 0,
        };
        let receipt = receipt(Op::Expire, None, (owner_balance, 0));
        BatchItem::Expire(ExpireEntry {
            owner: A,
            id,
            held,
            receipt,
        })
    }

    /// Replays batches (time, items) from height 1.
    fn replay(batches: Vec<(u64, Vec<BatchItem>)>) -> Replay {
        let mut r = Replay::default();
        for (i, (time, items)) in batches.into_iter().enumerate() {
            let header = Header {
                chain_id: [0; 32],
                height: i as u64 + 1,
                term: 1,
                time_unix_ms: time,
                request_count: items.len() as u32,
                prev_hash: [0; 32],
                merkle_root: [0; 32],
                state_digest: [0; 32],
                operator_key_id: [0; 8],
            };
            r.add(&BatchBody { header, items });
        }
        r
    }

    /// A funded with 100, reserving 60 for B until time 1500.
    fn start() -> Vec<(u64, Vec<BatchItem>)> {
        vec![
            (
                900,
                vec![item(D, operation(Op::Deposit, 1, A, 100), None, (0, 100))],
            ),
            (1000, vec![item(A, reserve(10, 60, 500), None, (40, 0))]),
        ]
    }

    fn problems(r: &Replay) -> usize {
        r.settle_once.len() + r.on_time.len() + r.supply.len()
    }

    #[test]
    fn a_sound_history_passes_and_nets_what_moved() {
        let mut h = start();
        h.push((
            1200,
            vec![item(P, act(Op::Post, 11, 10, 25), None, (75, 25))],
        ));
        h.push((
            1300,
            vec![item(
                A,
                act(Op::Void, 12, 10, 0),
                Some(ErrorCode::ReserveClosed),
                (0, 0),
            )],
        ));
        h.push((1300, vec![item(A, reserve(20, 30, 100), None, (45, 0))]));
        h.push((
            1350,
            vec![item(A, act(Op::Renew, 21, 20, 100), None, (45, 0))],
        ));
        h.push((1450, vec![expire(20, 75)]));
        let r = replay(h);
        assert_eq!(problems(&r), 0, "{r:?}");
        assert_eq!((r.net[&A], r.net[&B]), (-25, 25));
        assert_eq!(r.counts.posted_by_party, 1);
        assert_eq!(r.counts.refused["reserve_closed"], 1);
        assert_eq!(r.reserves[&(A, 20)].fate, Fate::Expired { height: 7 });
    }

    #[test]
    fn settle_once_catches_a_double_post_and_a_wrong_code() {
        let mut h = start();
        h.push((
            1200,
            vec![item(A, act(Op::Post, 11, 10, 0), None, (40, 60))],
        ));
        h.push((
            1210,
            vec![item(A, act(Op::Post, 12, 10, 0), None, (40, 120))],
        ));
        let r = replay(h);
        assert_eq!(r.settle_once.len(), 1, "{r:?}");
        assert!(
            r.settle_once[0].contains("posted (60) at height 3"),
            "{r:?}"
        );
        // A post refused as closed while the reserve is open.
        let mut h = start();
        let code = Some(ErrorCode::ReserveClosed);
        h.push((1200, vec![item(A, act(Op::Post, 11, 10, 0), code, (0, 0))]));
        let r = replay(h);
        assert!(
            r.settle_once[0].contains("the chain's reserves say it applies"),
            "{r:?}"
        );
        // A post of more than was reserved, and an expiry of a posted reserve.
        let mut h = start();
        h.push((
            1200,
            vec![item(A, act(Op::Post, 11, 10, 61), None, (40, 61))],
        ));
        h.push((1600, vec![expire(10, 100)]));
        let r = replay(h);
        assert_eq!(r.settle_once.len(), 2, "{r:?}");
    }

    #[test]
    fn expiries_on_time_catches_an_early_expiry_and_a_late_post() {
        let mut h = start();
        h.push((1499, vec![expire(10, 100)]));
        let r = replay(h);
        assert_eq!(r.on_time.len(), 1, "{r:?}");
        assert!(r.on_time[0].contains("before its deadline 1500"), "{r:?}");
        let mut h = start();
        h.push((
            1500,
            vec![item(A, act(Op::Post, 11, 10, 0), None, (40, 60))],
        ));
        let r = replay(h);
        assert_eq!(r.on_time.len(), 1, "{r:?}");
        // Time going backwards.
        let mut h = start();
        h.push((999, vec![]));
        assert_eq!(replay(h).on_time.len(), 1);
    }

    #[test]
    fn supply_balanced_catches_a_post_that_mints() {
        let mut h = start();
        // B is paid 25 and A gets 35 back, yet A's receipt says 80: 5 minted.
        h.push((
            1200,
            vec![item(A, act(Op::Post, 11, 10, 25), None, (80, 25))],
        ));
        let r = replay(h);
        assert_eq!(r.supply.len(), 1, "{r:?}");
        assert!(r.supply[0].starts_with("after batch 3"), "{r:?}");
        // An expiry that does not return the held amount.
        let mut h = start();
        h.push((1500, vec![expire(10, 40)]));
        assert_eq!(replay(h).supply.len(), 1);
    }

    #[test]
    fn reserves_not_lost_catches_a_missing_or_different_reserve() {
        let r = replay(start());
        let none: Option<Vec<(&(PublicKey, u128), &Reserve)>> = None;
        assert!(r.not_lost([(A, 10)], none.clone()).is_empty());
        assert_eq!(r.not_lost([(A, 11)], none).len(), 1);
        let open = r.reserves[&(A, 10)].state();
        let state = [((A, 10), open)];
        let found = |s: &[((PublicKey, u128), Reserve)]| {
            r.not_lost([], Some(s.iter().map(|(k, v)| (k, v)))).len()
        };
        assert_eq!(found(&state), 0);
        // The final state lost the open reserve, or holds it posted.
        assert_eq!(found(&[]), 1);
        assert_eq!(found(&[((A, 10), Reserve::Posted)]), 2);
        let mut less = open.open().copied().unwrap();
        less.amount = 59;
        assert_eq!(found(&[((A, 10), Reserve::Open(less))]), 1);
    }
}
