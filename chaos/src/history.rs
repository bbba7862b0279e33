//! What a run observed, and the checks over it that live and simulated runs share: every signed
//! header seen per height (forks), every receipt confirmed per request key (double applies),
//! and the balances a set of applied operations implies (the model).

use std::collections::{BTreeMap, HashMap};

use tally_core::crypto::sha256;
use tally_wire::{Hash, PublicKey, Receipt, SignedHeader};

/// Every distinct signed header seen at each height, with where it was first seen.
#[derive(Default)]
pub struct HeaderLog {
    by_height: BTreeMap<u64, Vec<(Hash, SignedHeader, String)>>,
    /// How many observations were recorded (the same header seen twice counts twice).
    pub observations: u64,
}

impl HeaderLog {
    /// Records that `source` saw `header`. Returns false if another header was already seen at
    /// its height (a fork).
    pub fn record(&mut self, header: &SignedHeader, source: impl FnOnce() -> String) -> bool {
        self.observations += 1;
        let digest = sha256(&[&header.encode()]);
        let seen = self.by_height.entry(header.header.height).or_default();
        if seen.iter().any(|(d, _, _)| *d == digest) {
            return seen.len() == 1;
        }
        seen.push((digest, header.clone(), source()));
        seen.len() == 1
    }

    /// Heights at which more than one signed header was seen, with a description of each.
    pub fn forks(&self) -> Vec<String> {
        self.by_height
            .iter()
            .filter(|(_, seen)| seen.len() > 1)
            .map(|(height, seen)| {
                let versions: Vec<String> = seen
                    .iter()
                    .map(|(d, h, source)| {
                        format!(
                            "{} (term {}, first seen in {source})",
                            short(d),
                            h.header.term
                        )
                    })
                    .collect();
                format!("height {height}: {}", versions.join(" vs "))
            })
            .collect()
    }

    pub fn heights(&self) -> usize {
        self.by_height.len()
    }

    /// The one header seen at `height`, if exactly one was.
    pub fn unique(&self, height: u64) -> Option<&SignedHeader> {
        match self.by_height.get(&height).map(Vec::as_slice) {
            Some([(_, h, _)]) => Some(h),
            _ => None,
        }
    }
}

/// The receipts confirmed for each request key `(signer, id)`: one request must always be
/// confirmed with the same receipt, however often it is resubmitted.
#[derive(Default)]
pub struct ReceiptLog {
    by_key: HashMap<(PublicKey, u128), Receipt>,
    pub conflicts: Vec<String>,
}

impl ReceiptLog {
    /// Records a confirmed receipt; false (and a conflict noted) if the key was confirmed before
    /// with a different receipt.
    pub fn record(&mut self, signer: &PublicKey, id: u128, receipt: &Receipt) -> bool {
        match self.by_key.get(&(*signer, id)) {
            Some(r) if r == receipt => true,
            Some(r) => {
                self.conflicts.push(format!(
                    "request {}:{id} confirmed at height {} index {} and again at height {} \
                     index {}",
                    short(signer),
                    r.height,
                    r.index,
                    receipt.height,
                    receipt.index
                ));
                false
            }
            None => {
                self.by_key.insert((*signer, id), receipt.clone());
                true
            }
        }
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

/// An operation's effect on balances, as the model sees it.
#[derive(Debug, Clone, Copy)]
pub enum Effect {
    Deposit {
        to: usize,
        amount: u64,
    },
    Transfer {
        from: usize,
        to: usize,
        amount: u64,
    },
    Withdraw {
        from: usize,
        amount: u64,
    },
    /// A reserve, post, void or renew: what it moves depends on the chain (deadlines, the
    /// reserve's state), so the model takes it from the chain's replay
    /// ([`crate::reserves::Replay::net`], through [`Model::add_net`]).
    TwoPhase,
}

/// Balances and totals implied by a set of applied operations over `accounts` accounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Model {
    pub balances: Vec<i128>,
    pub deposited: u128,
    pub withdrawn: u128,
}

impl Model {
    pub fn new(accounts: usize) -> Model {
        Model {
            balances: vec![0; accounts],
            deposited: 0,
            withdrawn: 0,
        }
    }

    pub fn apply(&mut self, effect: Effect) {
        match effect {
            Effect::Deposit { to, amount } => {
                self.balances[to] += amount as i128;
                self.deposited += amount as u128;
            }
            Effect::Transfer { from, to, amount } => {
                self.balances[from] -= amount as i128;
                self.balances[to] += amount as i128;
            }
            Effect::Withdraw { from, amount } => {
                self.balances[from] -= amount as i128;
                self.withdrawn += amount as u128;
            }
            Effect::TwoPhase => {}
        }
    }

    /// Adds what two-phase operations and expiries did to the balances of `accounts`.
    pub fn add_net(&mut self, accounts: &[PublicKey], net: &BTreeMap<PublicKey, i128>) {
        for (balance, key) in self.balances.iter_mut().zip(accounts) {
            *balance += net.get(key).copied().unwrap_or(0);
        }
    }

    /// Compares actual balances with the model; one line per account that differs.
    pub fn differences(&self, actual: &[u64]) -> Vec<String> {
        self.balances
            .iter()
            .zip(actual)
            .enumerate()
            .filter(|(_, (m, a))| **m != **a as i128)
            .map(|(i, (m, a))| {
                format!(
                    "account #{i}: balance {a}, the model says {m} (off by {})",
                    *a as i128 - m
                )
            })
            .collect()
    }
}

/// The first 8 hex characters of a hash or key, for messages.
pub fn short(bytes: &[u8; 32]) -> String {
    bytes[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// Nearest-rank percentile of sorted values (0 when empty).
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
    }

    #[test]
    fn the_model_follows_effects() {
        let mut m = Model::new(2);
        m.apply(Effect::Deposit { to: 0, amount: 10 });
        m.apply(Effect::Transfer {
            from: 0,
            to: 1,
            amount: 4,
        });
        m.apply(Effect::Withdraw { from: 1, amount: 1 });
        assert_eq!(m.balances, vec![6, 3]);
        assert_eq!((m.deposited, m.withdrawn), (10, 1));
        assert!(m.differences(&[6, 3]).is_empty());
        assert_eq!(m.differences(&[6, 4]).len(), 1);
    }
}
