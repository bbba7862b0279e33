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

/// For each applied operation of `body`, in leaf order, each account whose available balance
/// it moved: a deposit credits `to`, a transfer debits its signer and credits `to`, a
/// withdrawal debits its signer; a reserve debits its owner (counterparty: the receiver), a
/// post credits the receiver what it captured and the owner the rest, a void and an expiry
/// credit the owner what was held. A renewal moves no balance and has no entry.
pub fn account_entries(body: &BatchBody) -> Vec<AccountEntry> {
    account_entries_with(body, &body.leaf_hashes())
}

/// [`account_entries`] given the body's receipt leaf hashes (`BatchBody::leaf_hashes`), for a
/// caller that has them already.
pub fn account_entries_with(body: &BatchBody, leaves: &[Hash]) -> Vec<AccountEntry> {
    assert_eq!(leaves.len(), body.leaf_count(), "one leaf hash per receipt");
    let mut out = Vec::new();
    for item in &body.items {
        if let BatchItem::Expire(e) = item {
            let r = &e.receipt;
            let entry = Entry::new(body.header.height, r, Op::Expire, e.owner, leaves);
            out.push(entry.make(
                e.owner,
                Direction::Credit,
                e.held.to,
                e.held.amount,
                r.signer_balance,
            ));
            continue;
        }
        let mut held = match item {
            BatchItem::Envelope(e) => e.held.iter(),
            _ => [].iter(),
        };
        let signer = *item.signer();
        for (op, receipt) in item.operations() {
            let record = matches!(op.op, Op::Post | Op::Void | Op::Renew)
                .then(|| held.next().copied())
                .flatten();
            if receipt.failed.is_some() {
                continue;
            }
            let entry = Entry::new(body.header.height, receipt, op.op, signer, leaves);
            entry.push(&op, record, &mut out);
        }
    }
    out
}

/// What every entry of one operation shares.
struct Entry<'a> {
    height: u64,
    receipt: &'a tally_wire::Receipt,
    op: Op,
    signer: PublicKey,
    receipt_hash: Hash,
}

impl<'a> Entry<'a> {
    /// `leaves`: the body's receipt leaf hashes, in leaf order.
    fn new(
        height: u64,
        receipt: &'a tally_wire::Receipt,
        op: Op,
        signer: PublicKey,
        leaves: &[Hash],
    ) -> Entry<'a> {
        let receipt_hash = leaves[receipt.index as usize];
        debug_assert_eq!(receipt_hash, leaf_hash(&receipt.encode()));
        Entry {
            height,
            receipt,
            op,
            signer,
            receipt_hash,
        }
    }

    fn make(
        &self,
        account: PublicKey,
        direction: Direction,
        counterparty: PublicKey,
        amount: u64,
        balance: u64,
    ) -> AccountEntry {
        AccountEntry {
            account,
            height: self.height,
            index: self.receipt.index,
            op: self.op,
            direction,
            counterparty,
            amount,
            balance,
            request_hash: self.receipt.request_hash,
            receipt_hash: self.receipt_hash,
        }
    }

    /// A post's or void's entries: the receiver credited what was captured, the owner the rest.
    fn release(
        &self,
        op: &tally_wire::Operation,
        owner: PublicKey,
        held: &crate::reserve::Held,
        out: &mut Vec<AccountEntry>,
    ) {
        let rc = self.receipt;
        let posted = match op.op {
            Op::Post if op.amount == 0 => held.amount,
            Op::Post => op.amount,
            _ => 0,
        };
        if posted > 0 {
            out.push(self.make(held.to, Direction::Credit, owner, posted, rc.to_balance));
        }
        if held.amount > posted {
            let back = held.amount - posted;
            out.push(self.make(owner, Direction::Credit, held.to, back, rc.signer_balance));
        }
    }

    /// The entries of `op`; `held`: the record a post, void or renewal found.
    fn push(
        &self,
        op: &tally_wire::Operation,
        held: Option<crate::reserve::Held>,
        out: &mut Vec<AccountEntry>,
    ) {
        let (signer, rc) = (self.signer, self.receipt);
        let owner = if op.party == [0; 32] {
            signer
        } else {
            op.party
        };
        // Every kind says here whom it touches: a new kind does not compile until it does.
        match op.op {
            Op::Deposit => {
                out.push(self.make(op.to, Direction::Credit, signer, op.amount, rc.to_balance))
            }
            Op::Transfer => {
                out.push(self.make(
                    signer,
                    Direction::Debit,
                    op.to,
                    op.amount,
                    rc.signer_balance,
                ));
                out.push(self.make(op.to, Direction::Credit, signer, op.amount, rc.to_balance));
            }
            Op::Withdraw => out.push(self.make(
                signer,
                Direction::Debit,
                [0; 32],
                op.amount,
                rc.signer_balance,
            )),
            Op::Reserve => out.push(self.make(
                signer,
                Direction::Debit,
                op.to,
                op.amount,
                rc.signer_balance,
            )),
            Op::Post | Op::Void => {
                let held = held.expect("an applied post or void carries its record");
                self.release(op, owner, &held, out);
            }
            Op::Renew | Op::Expire | Op::Rotate => {}
        }
    }
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
        BatchItem::Expire(e) => Found::Expiry(Box::new(tally_wire::ExpiryConfirmation {
            owner: e.owner,
            id: e.id,
            receipt,
            header: signed,
            proof,
        })),
        // A rotation is proven by the key chain (`GetKeyChain`), not by a confirmation.
        BatchItem::Rotate(_) => return None,
    })
}
