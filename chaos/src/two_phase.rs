//! The two-phase workload that live and simulated clients share (PROTOCOL.md §4.10): what to
//! send next, each operation alone in an envelope. Reserves with short timeouts (a few batch
//! windows, so many expire, some while a partition or a leader change holds the cluster) and
//! long ones, now and then naming a party; posts whole and partial, by the owner or the party;
//! voids and renewals; and misuse, on purpose or by the luck of the draw: acts on reserves
//! already posted, voided or expired (double posts, voids after posts, posts after expiry),
//! posts of more than any reserve holds, signers that are no party, and reserve ids nobody
//! made. Every choice comes from the caller's generator, so a seeded run replays.

use std::ops::Range;

use rand::Rng;
use tally_wire::{Op, Operation, PublicKey};

/// Acts pick one of the last few reserves asked for most of the time (often still open), any
/// reserve otherwise (often closed: misuse).
const RECENT_RESERVES: usize = 6;
/// Reserves hold 1 to this much.
pub const RESERVE_AMOUNT_MAX: u64 = 80;

/// A reserve a client asked for (made or not: the chain decides).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AskedReserve {
    pub owner: usize,
    pub id: u128,
    pub party: Option<usize>,
}

/// What a client has asked for so far, and its timeouts.
#[derive(Debug, Clone)]
pub struct TwoPhaseLoad {
    pub asked: Vec<AskedReserve>,
    /// Timeouts of reserves and renewals: short ones expire within a few batch windows, long
    /// ones usually outlive the operations that act on them.
    pub short_ms: Range<u64>,
    pub long_ms: Range<u64>,
}

impl TwoPhaseLoad {
    pub fn new(short_ms: Range<u64>, long_ms: Range<u64>) -> TwoPhaseLoad {
        TwoPhaseLoad {
            asked: Vec::new(),
            short_ms,
            long_ms,
        }
    }

    /// The next two-phase operation among `accounts`, under ids from `next_id`: the index of
    /// the account that signs it, and the operation.
    pub fn draw(
        &mut self,
        rng: &mut impl Rng,
        accounts: &[PublicKey],
        next_id: &mut impl FnMut() -> u128,
    ) -> (usize, Operation) {
        let roll = rng.gen_range(0..100);
        if roll < 40 || self.asked.is_empty() {
            self.reserve(rng, accounts, next_id)
        } else {
            self.act(roll, rng, accounts, next_id)
        }
    }

    fn timeout_ms(&self, rng: &mut impl Rng) -> u64 {
        if rng.gen_bool(0.5) {
            rng.gen_range(self.short_ms.clone())
        } else {
            rng.gen_range(self.long_ms.clone())
        }
    }

    /// A reserve from a random account to another, now and then naming a party (the receiver,
    /// as an escrow's counterparty, or a third account).
    fn reserve(
        &mut self,
        rng: &mut impl Rng,
        accounts: &[PublicKey],
        next_id: &mut impl FnMut() -> u128,
    ) -> (usize, Operation) {
        let n = accounts.len();
        let owner = rng.gen_range(0..n);
        let to = (owner + rng.gen_range(1..n)) % n;
        let party = rng.gen_bool(0.3).then(|| (owner + rng.gen_range(1..n)) % n);
        let id = next_id();
        let op = Operation {
            op: Op::Reserve,
            id,
            to: accounts[to],
            amount: rng.gen_range(1..=RESERVE_AMOUNT_MAX),
            timeout_ms: self.timeout_ms(rng),
            reserve_id: 0,
            party: party.map_or([0; 32], |p| accounts[p]),
        };
        self.asked.push(AskedReserve { owner, id, party });
        (owner, op)
    }

    /// A post, void or renew (`roll` in 40..100 picks which) of a reserve asked for before, or
    /// of one nobody made.
    fn act(
        &mut self,
        roll: u32,
        rng: &mut impl Rng,
        accounts: &[PublicKey],
        next_id: &mut impl FnMut() -> u128,
    ) -> (usize, Operation) {
        let (n, asked) = (accounts.len(), self.asked.len());
        let k = if rng.gen_bool(0.8) {
            asked - 1 - rng.gen_range(0..asked.min(RECENT_RESERVES))
        } else {
            rng.gen_range(0..asked)
        };
        let mut r = self.asked[k];
        if roll >= 97 {
            // No such reserve: an id its owner never used for one.
            r.id = next_id();
        }
        let signer = match (r.party, rng.gen_range(0..20)) {
            (_, 0) => (r.owner + rng.gen_range(1..n)) % n,
            (Some(p), 1..=7) => p,
            _ => r.owner,
        };
        let (kind, amount, timeout_ms) = match roll {
            40..=69 => (Op::Post, post_amount(rng), 0),
            70..=82 => (Op::Void, 0, 0),
            83..=96 => (Op::Renew, 0, self.timeout_ms(rng)),
            _ => (Op::Post, 0, 0),
        };
        // The owner field may be left zero when the owner signs.
        let name_owner = signer != r.owner || rng.gen_bool(0.5);
        let op = Operation {
            op: kind,
            id: next_id(),
            to: [0; 32],
            amount,
            timeout_ms,
            reserve_id: r.id,
            party: if name_owner {
                accounts[r.owner]
            } else {
                [0; 32]
            },
        };
        (signer, op)
    }
}

/// All (0), part, or more than any reserve holds.
fn post_amount(rng: &mut impl Rng) -> u64 {
    match rng.gen_range(0..20) {
        0..=7 => 0,
        8..=17 => rng.gen_range(1..=60),
        _ => rng.gen_range(RESERVE_AMOUNT_MAX + 1..=200),
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;

    /// A thousand draws over five accounts: every kind, both timeouts, parties, misuse; and
    /// the same seed draws the same operations.
    #[test]
    fn the_draws_cover_every_kind_and_replay() {
        let accounts: Vec<PublicKey> = (1..=5).map(|i| [i; 32]).collect();
        let run = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut load = TwoPhaseLoad::new(20..400, 1_500..12_000);
            let mut id = 0u128;
            let mut next = || {
                id += 1;
                id
            };
            let ops: Vec<(usize, Operation)> = (0..1000)
                .map(|_| load.draw(&mut rng, &accounts, &mut next))
                .collect();
            (ops, load.asked)
        };
        let (ops, asked) = run(7);
        assert_eq!(run(7).0, ops);
        let count = |f: &dyn Fn(&(usize, Operation)) -> bool| ops.iter().filter(|o| f(o)).count();
        assert!(count(&|(_, o)| o.op == Op::Reserve) > 300);
        assert!(count(&|(_, o)| o.op == Op::Reserve && o.timeout_ms < 400) > 100);
        assert!(count(&|(_, o)| o.op == Op::Reserve && o.party != [0; 32]) > 50);
        assert!(count(&|(_, o)| o.op == Op::Post && o.amount == 0) > 50);
        assert!(count(&|(_, o)| o.op == Op::Post && o.amount > RESERVE_AMOUNT_MAX) > 10);
        assert!(count(&|(_, o)| o.op == Op::Void) > 50);
        assert!(count(&|(_, o)| o.op == Op::Renew) > 50);
        let owners: std::collections::BTreeMap<u128, usize> =
            asked.iter().map(|r| (r.id, r.owner)).collect();
        let by_other = |(s, o): &(usize, Operation)| {
            o.op != Op::Reserve && owners.get(&o.reserve_id).is_some_and(|w| w != s)
        };
        assert!(
            count(&by_other) > 30,
            "posts, voids and renewals by a party or a stranger"
        );
        let unknown = |(_, o): &(usize, Operation)| {
            o.op == Op::Post && o.reserve_id != 0 && !owners.contains_key(&o.reserve_id)
        };
        assert!(count(&unknown) > 5, "reserves nobody made");
        // Each signer is one of the accounts, and a reserve never pays its owner.
        for (s, o) in &ops {
            assert!(*s < accounts.len());
            assert!(o.op != Op::Reserve || o.to != accounts[*s]);
        }
    }
}
