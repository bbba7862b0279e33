//! What an operation does to balances: the one rule the sequencer judges by and every replay
//! (a replica's apply, an auditor's check of the archive) checks receipts against.

use tally_wire::{ErrorCode, Op, Operation, PublicKey};

use crate::reserve::{Held, Reserve, ReserveChange};
use crate::{Rejection, Result};

/// Balances and reserves as the caller sees them: the sequencer's speculative state, or a
/// replay's.
pub trait Balances {
    /// The balance of `key`, or None if the account does not exist.
    fn balance(&mut self, key: &PublicKey) -> Result<Option<u64>>;
    /// The state of reserve `(owner, id)`, or None if it was never made.
    fn reserve(&mut self, owner: &PublicKey, id: u128) -> Result<Option<Reserve>>;
}

/// One account's change: balance before (None: did not exist) and after.
pub type Change = (PublicKey, Option<u64>, u64);

/// What an operation does when it applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effect {
    /// The signer's balance after it (0 for a deposit: deposit keys hold no balance); for the
    /// two-phase kinds and expiries, the reserve owner's.
    pub signer_balance: u64,
    /// The recipient's balance after it (0 for a withdrawal); for a post, the reserve's
    /// receiver's; 0 for the other two-phase kinds.
    pub to_balance: u64,
    /// At most two accounts, never the same one twice.
    pub changes: Vec<Change>,
    pub deposited: u64,
    pub withdrawn: u64,
    /// The reserve it makes or changes (the two-phase kinds and expiries).
    pub reserve: Option<ReserveChange>,
}

type Judged = Result<std::result::Result<Effect, Rejection>>;

/// Judges `op` by `signer` in a batch of time `time_ms` against `balances`: its effect, or why
/// it cannot apply. Reads only; the caller applies the effect. An `Err` is a failed read, not a
/// judgement.
pub fn judge(
    signer: &PublicKey,
    op: &Operation,
    time_ms: u64,
    balances: &mut impl Balances,
) -> Judged {
    match op.op {
        Op::Deposit | Op::Transfer | Op::Withdraw => judge_single(signer, op, balances),
        Op::Reserve => judge_reserve(signer, op, time_ms, balances),
        Op::Post | Op::Void | Op::Renew => judge_close(signer, op, time_ms, balances),
        // The wire decoder refuses them in envelopes; only the leader makes them.
        Op::Expire | Op::Rotate => Ok(Err(reject(
            ErrorCode::MalformedRequest,
            "expiries and rotations are not submitted",
        ))),
    }
}

fn no_change() -> Effect {
    Effect {
        signer_balance: 0,
        to_balance: 0,
        changes: Vec::new(),
        deposited: 0,
        withdrawn: 0,
        reserve: None,
    }
}

/// The signer's balance if it covers `amount`.
fn debit(signer: &PublicKey, amount: u64, balances: &mut impl Balances) -> Judged {
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
    let mut effect = no_change();
    effect.signer_balance = from - amount;
    effect.changes.push((*signer, Some(from), from - amount));
    Ok(Ok(effect))
}

/// `key`'s balance after `amount` more: (before, after), or an overflow.
fn credit(
    key: &PublicKey,
    amount: u64,
    what: &str,
    balances: &mut impl Balances,
) -> Result<std::result::Result<(Option<u64>, u64), Rejection>> {
    let before = balances.balance(key)?;
    Ok(match before.unwrap_or(0).checked_add(amount) {
        Some(after) => Ok((before, after)),
        None => Err(reject(
            ErrorCode::AmountOverflow,
            format!("the {what} would overflow the recipient's balance"),
        )),
    })
}

fn judge_single(signer: &PublicKey, op: &Operation, balances: &mut impl Balances) -> Judged {
    let amount = op.amount;
    let mut effect = no_change();
    if op.op != Op::Deposit {
        // The wire decoder refuses these; a caller that skipped it must not mint money.
        if op.op == Op::Transfer && op.to == *signer {
            return Ok(Err(reject(
                ErrorCode::MalformedRequest,
                "a transfer to oneself moves nothing",
            )));
        }
        effect = match debit(signer, amount, balances)? {
            Ok(e) => e,
            Err(r) => return Ok(Err(r)),
        };
    }
    if op.op == Op::Withdraw {
        effect.withdrawn = amount;
    } else {
        let (to, new_to) = match credit(&op.to, amount, op.op.name(), balances)? {
            Ok(c) => c,
            Err(r) => return Ok(Err(r)),
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

/// A reserve is known by `(signer, op.id)`, which is also the operation's exactly-once key:
/// it cannot exist yet when the operation is judged.
fn judge_reserve(
    signer: &PublicKey,
    op: &Operation,
    time_ms: u64,
    balances: &mut impl Balances,
) -> Judged {
    if op.to == *signer {
        return Ok(Err(reject(
            ErrorCode::MalformedRequest,
            "a reserve for oneself moves nothing",
        )));
    }
    let mut effect = match debit(signer, op.amount, balances)? {
        Ok(e) => e,
        Err(r) => return Ok(Err(r)),
    };
    let held = Held {
        to: op.to,
        party: op.party,
        amount: op.amount,
        expires_at_ms: time_ms.saturating_add(op.timeout_ms),
    };
    // Its id is the operation's exactly-once key, so a sequencer never gets here with a used
    // one; a replayed batch that does is refused, not trusted.
    let before = balances.reserve(signer, op.id)?;
    if before.is_some() {
        return Ok(Err(reject(
            ErrorCode::IdConflict,
            "this id was already used by this signer",
        )));
    }
    effect.reserve = Some(ReserveChange {
        owner: *signer,
        id: op.id,
        before,
        after: Reserve::Open(held),
    });
    Ok(Ok(effect))
}

/// Post, void or renew: by the owner or the reserve's party, before its deadline.
fn judge_close(
    signer: &PublicKey,
    op: &Operation,
    time_ms: u64,
    balances: &mut impl Balances,
) -> Judged {
    let owner = if op.party == [0; 32] {
        *signer
    } else {
        op.party
    };
    let held = match open_reserve(signer, &owner, op.reserve_id, time_ms, balances)? {
        Ok(h) => h,
        Err(r) => return Ok(Err(r)),
    };
    let (after, to_owner, to_receiver) = match op.op {
        Op::Post => {
            let posted = if op.amount == 0 {
                held.amount
            } else {
                op.amount
            };
            if posted > held.amount {
                return Ok(Err(reject(
                    ErrorCode::PostExceedsReserve,
                    format!("the post of {posted} exceeds the {} reserved", held.amount),
                )));
            }
            (Reserve::Posted, held.amount - posted, posted)
        }
        Op::Void => (Reserve::Voided, held.amount, 0),
        _ => {
            let mut renewed = held;
            renewed.expires_at_ms = time_ms.saturating_add(op.timeout_ms);
            (Reserve::Open(renewed), 0, 0)
        }
    };
    let change = ReserveChange {
        owner,
        id: op.reserve_id,
        before: Some(Reserve::Open(held)),
        after,
    };
    release(&owner, &held, change, to_owner, to_receiver, balances)
}

/// The effect of a reserve's change that pays `to_owner` back to its owner and `to_receiver`
/// to its receiver (together at most what it held).
fn release(
    owner: &PublicKey,
    held: &Held,
    change: ReserveChange,
    to_owner: u64,
    to_receiver: u64,
    balances: &mut impl Balances,
) -> Judged {
    debug_assert!(to_owner + to_receiver <= held.amount);
    let mut effect = no_change();
    if to_receiver > 0 {
        let (before, after) = match credit(&held.to, to_receiver, "post", balances)? {
            Ok(c) => c,
            Err(r) => return Ok(Err(r)),
        };
        effect.to_balance = after;
        effect.changes.push((held.to, before, after));
    }
    // The owner's account existed when it reserved, and accounts are never removed.
    let before = balances.balance(owner)?.expect("a reserve's owner exists");
    let Some(after) = before.checked_add(to_owner) else {
        return Ok(Err(reject(
            ErrorCode::AmountOverflow,
            "the release would overflow the owner's balance",
        )));
    };
    effect.signer_balance = after;
    if to_owner > 0 {
        effect.changes.push((*owner, Some(before), after));
    }
    effect.reserve = Some(change);
    Ok(Ok(effect))
}

/// The open reserve `(owner, id)` that `signer` may act on at `time_ms`, or why not.
fn open_reserve(
    signer: &PublicKey,
    owner: &PublicKey,
    id: u128,
    time_ms: u64,
    balances: &mut impl Balances,
) -> Result<std::result::Result<Held, Rejection>> {
    let held = match balances.reserve(owner, id)? {
        None => {
            return Ok(Err(reject(
                ErrorCode::ReserveNotFound,
                format!("no reserve {id} of this owner"),
            )))
        }
        Some(Reserve::Open(h)) => h,
        Some(Reserve::Expired) => return Ok(Err(expired(id))),
        Some(closed) => {
            return Ok(Err(reject(
                ErrorCode::ReserveClosed,
                format!("reserve {id} was {} already", closed.name()),
            )))
        }
    };
    if signer != owner && *signer != held.party {
        return Ok(Err(reject(
            ErrorCode::NotAReserveParty,
            "only the reserve's owner or the party it names may act on it",
        )));
    }
    if time_ms >= held.expires_at_ms {
        return Ok(Err(expired(id)));
    }
    Ok(Ok(held))
}

fn expired(id: u128) -> Rejection {
    reject(
        ErrorCode::ReserveExpired,
        format!("reserve {id} passed its deadline"),
    )
}

/// The expiry of reserve `(owner, id)` in a batch of time `time_ms`: it must be open and due.
pub fn judge_expiry(
    owner: &PublicKey,
    id: u128,
    time_ms: u64,
    balances: &mut impl Balances,
) -> Judged {
    let held = match balances.reserve(owner, id)? {
        Some(Reserve::Open(h)) if h.expires_at_ms <= time_ms => h,
        other => {
            let state = other.map_or("missing", |r| r.name());
            return Ok(Err(reject(
                ErrorCode::MalformedRequest,
                format!("reserve {id} cannot expire: {state} or not due"),
            )));
        }
    };
    let change = ReserveChange {
        owner: *owner,
        id,
        before: Some(Reserve::Open(held)),
        after: Reserve::Expired,
    };
    release(owner, &held, change, held.amount, 0, balances)
}

fn reject(code: ErrorCode, message: impl Into<String>) -> Rejection {
    Rejection::new(code, message)
}
