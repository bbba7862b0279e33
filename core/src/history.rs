//! Account history: what each applied operation did to each account it touched, derived from a
//! batch body alone (its operations and their receipts), and the running counters a store keeps
//! per account beside it (`tally_storage`'s `history` table, written behind the confirmation
//! path by the archive thread).
//!
//! Only applied operations enter history: a receipt whose `failed` is set changed nothing.
//! Entries of one batch come in leaf order; within one operation, the debited account first.

use tally_wire::{Hash, Op, PublicKey};

use crate::batch::{BatchBody, BatchItem};
use crate::engine::apply::Found;
use crate::merkle::leaf_hash;

/// How an entry moved the account's balance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Direction {
    /// The account paid `amount` (the signer of a transfer or a withdrawal).
    Debit = 1,
    /// The account received `amount` (the recipient of a deposit or a transfer).
    Credit = 2,
}

impl Direction {
    pub fn from_u8(v: u8) -> Option<Direction> {
        match v {
            1 => Some(Direction::Debit),
            2 => Some(Direction::Credit),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Direction::Debit => "debit",
            Direction::Credit => "credit",
        }
    }
}

/// One applied operation as one account saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccountEntry {
    pub account: PublicKey,
    pub height: u64,
    /// The operation's leaf index in its batch.
    pub index: u32,
    pub op: Op,
    pub direction: Direction,
    /// The other side: the deposit key of a deposit, the other account of a transfer, all zero
    /// for a withdrawal.
    pub counterparty: PublicKey,
    pub amount: u64,
    /// The account's balance after the operation (from the receipt).
    pub balance: u64,
    /// The receipt's request hash: the request's, or the envelope's for an operation of one.
    pub request_hash: Hash,
    /// The Merkle leaf hash of the receipt (the receipt index's key).
    pub receipt_hash: Hash,
}

/// An account's running counters after one of its entries: what the newest row of an account
/// says about it as of that row's height.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub total_debited: u128,
    pub total_credited: u128,
    /// Entries of the account (from the height history is held from).
    pub operation_count: u64,
}

impl Counters {
    /// The counters after `entry`.
    pub fn after(self, entry: &AccountEntry) -> Counters {
        let amount = u128::from(entry.amount);
        let (debited, credited) = match entry.direction {
            Direction::Debit => (amount, 0),
            Direction::Credit => (0, amount),
        };
        Counters {
            total_debited: self.total_debited + debited,
            total_credited: self.total_credited + credited,
            operation_count: self.operation_count + 1,
        }
    }
}

/// One stored history row: an entry and the account's counters after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryRow {
    pub entry: AccountEntry,
    pub counters: Counters,
}

/// One page of an account's history (`GetHistory`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryPage {
    /// Ascending by height, then leaf index.
    pub rows: Vec<HistoryRow>,
    /// Where the next page starts (height, leaf index), when there are more rows.
    pub next: Option<(u64, u32)>,
}

/// For each applied operation of `body`, in leaf order, each account it touched: a deposit
/// credits `to`, a transfer debits its signer and credits `to`, a withdrawal debits its signer.
pub fn account_entries(body: &BatchBody) -> Vec<AccountEntry> {
    let height = body.header.height;
    let mut out = Vec::new();
    for (signer, op, receipt) in body.operations() {
        if receipt.failed.is_some() {
            continue;
        }
        let receipt_hash = leaf_hash(&receipt.encode());
        let entry = |account, direction, counterparty, balance| AccountEntry {
            account,
            height,
            index: receipt.index,
            op: op.op,
            direction,
            counterparty,
            amount: op.amount,
            balance,
            request_hash: receipt.request_hash,
            receipt_hash,
        };
        // Every kind says here whom it touches: a new kind does not compile until it does.
        match op.op {
            Op::Deposit => out.push(entry(op.to, Direction::Credit, *signer, receipt.to_balance)),
            Op::Transfer => {
                out.push(entry(
                    *signer,
                    Direction::Debit,
                    op.to,
                    receipt.signer_balance,
                ));
                out.push(entry(op.to, Direction::Credit, *signer, receipt.to_balance));
            }
            Op::Withdraw => out.push(entry(
                *signer,
                Direction::Debit,
                [0; 32],
                receipt.signer_balance,
            )),
        }
    }
    out
}

/// The receipt leaf hashes of `body` with their leaf indexes: the receipt index's rows.
pub fn receipt_leaves(body: &BatchBody) -> Vec<(Hash, u32)> {
    body.leaf_hashes().into_iter().zip(0u32..).collect()
}

/// The confirmation of the operation at leaf `index` of `body` (applied at `signed`'s height),
/// as `GetConfirmation` answers it, or None if the body has no such leaf.
pub fn confirmation_at(
    body: &BatchBody,
    signed: tally_wire::SignedHeader,
    index: u32,
) -> Option<Found> {
    let starts = body.item_starts();
    let i = match starts.binary_search(&index) {
        Ok(i) => i,
        Err(0) => return None,
        Err(i) => i - 1,
    };
    let item = body.items.get(i)?;
    let receipt = item.receipts().get((index - starts[i]) as usize)?.clone();
    let proof = body.proof_tree().proof(index);
    Some(match item {
        BatchItem::Request(e) => Found::Request(Box::new(tally_wire::Confirmation {
            replayed: true,
            request: e.request.clone(),
            receipt,
            header: signed,
            proof,
        })),
        BatchItem::Envelope(e) => Found::Operation(Box::new(tally_wire::OperationConfirmation {
            envelope: (*e.envelope).clone(),
            receipt,
            header: signed,
            proof,
        })),
    })
}
