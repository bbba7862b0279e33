//! What an operation does to balances: the one rule the sequencer judges by and every replay
//! (a replica's apply, an auditor's check of the archive) checks receipts against.

use tally_wire::{ErrorCode, Op, Operation, PublicKey};

use crate::{Rejection, Result};

/// Balances as the caller sees them: the sequencer's speculative state, or a replay's.
pub trait Balances {
    /// The balance of `key`, or None if the account does not exist.
    fn balance(&mut self, key: &PublicKey) -> Result<Option<u64>>;
}

/// One account's change: balance before (None: did not exist) and after.
pub type Change = (PublicKey, Option<u64>, u64);

/// What an operation does when it applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effect {
    /// The signer's balance after it (0 for a deposit: deposit keys hold no balance).
    pub signer_balance: u64,
    /// The recipient's balance after it (0 for a withdrawal).
    pub to_balance: u64,
    /// At most two accounts, never the same one twice.
    pub changes: Vec<Change>,
    pub deposited: u64,
    pub withdrawn: u64,
}

/// Judges `op` by `signer` against `balances`: its effect, or why it cannot apply. Reads only;
/// the caller applies the effect. An `Err` is a failed read, not a judgement.
pub fn judge(
    signer: &PublicKey,
    op: &Operation,
    balances: &mut impl Balances,
) -> Result<std::result::Result<Effect, Rejection>> {
    let amount = op.amount;
    let no_change = Effect {
        signer_balance: 0,
        to_balance: 0,
        changes: Vec::new(),
        deposited: 0,
        withdrawn: 0,
    };
    let mut effect = no_change;
    if op.op != Op::Deposit {
        // The wire decoder refuses these; a caller that skipped it must not mint money.
        if op.op == Op::Transfer && op.to == *signer {
            return Ok(Err(reject(
                ErrorCode::MalformedRequest,
                "a transfer to oneself moves nothing",
            )));
        }
        let Some(from) = balances.balance(signer)? else {
            return Ok(Err(reject(
                ErrorCode::UnknownAccount,
                "the sending account does not exist",
            )));
        };
        if from < amount {
            return Ok(Err(reject(
                ErrorCode::InsufficientFunds,
                format!("balance {from} is less than {amount}"),
            )));
        }
        effect.signer_balance = from - amount;
        effect.changes.push((*signer, Some(from), from - amount));
    }
    if op.op == Op::Withdraw {
        effect.withdrawn = amount;
    } else {
        let to = balances.balance(&op.to)?;
        let Some(new_to) = to.unwrap_or(0).checked_add(amount) else {
            return Ok(Err(reject(
                ErrorCode::AmountOverflow,
                format!(
                    "the {} would overflow the recipient's balance",
                    op.op.name()
                ),
            )));
        };
        effect.to_balance = new_to;
        effect.changes.push((op.to, to, new_to));
        if op.op == Op::Deposit {
            effect.deposited = amount;
        }
    }
    debug_assert!(effect.changes.len() <= 2);
    Ok(Ok(effect))
}

fn reject(code: ErrorCode, message: impl Into<String>) -> Rejection {
    Rejection::new(code, message)
}
