//! Accounting reads: an account's history (`GetHistory` → `History`) and its figures, now or
//! as of a height (`GetAccount` → `Account`). Layouts in PROTOCOL.md §3.

use crate::message::read_bool;
use crate::{Hash, Op, PublicKey, Reader, SignedHeader, WireError, SIGNED_HEADER_BYTES};

/// How many entries one `History` reply carries at most; a `GetHistory` asking more (or 0) is
/// malformed. With one header per entry at worst the reply stays far below the reply bound.
pub const HISTORY_ENTRIES_PER_REPLY_MAX: u16 = 1024;

/// The bytes of one history entry on the wire.
pub const HISTORY_ENTRY_BYTES: usize = 8 + 4 + 1 + 1 + 32 + 8 + 8 + 32 + 32;

/// The fixed part of a `History` reply: account, height, held_from, has_next, next height and
/// index, entry count; then the entries, a header count, the headers.
pub const HISTORY_FIXED_BYTES: usize = 32 + 8 + 8 + 1 + 8 + 4 + 2 + 2;

/// The largest `History` payload: a full page, each entry at a height of its own.
pub const HISTORY_BYTES_MAX: usize = HISTORY_FIXED_BYTES
    + HISTORY_ENTRIES_PER_REPLY_MAX as usize * (HISTORY_ENTRY_BYTES + SIGNED_HEADER_BYTES);
const _: () = assert!(HISTORY_BYTES_MAX <= crate::REPLY_PAYLOAD_BYTES_MAX as usize);

/// The payload of an `Account` reply.
pub const ACCOUNT_REPLY_BYTES: usize = 32 + 8 + 1 + 1 + 8 + 8 + 8 + 16 + 16 + 8 + 8;

/// One applied operation as one account saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryEntry {
    pub height: u64,
    /// The operation's leaf index in its batch.
    pub index: u32,
    pub op: Op,
    /// true: the account paid `amount`; false: it received it.
    pub debit: bool,
    /// The deposit key of a deposit, the other account of a transfer, zero for a withdrawal.
    pub counterparty: PublicKey,
    pub amount: u64,
    /// The account's balance after the operation.
    pub balance: u64,
    /// The receipt's request hash (the envelope's hash for an operation of one).
    pub request_hash: Hash,
    /// The Merkle leaf hash of the operation's receipt (`GetConfirmationByReceipt` finds it).
    pub receipt_hash: Hash,
}

impl HistoryEntry {
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.height.to_le_bytes());
        out.extend_from_slice(&self.index.to_le_bytes());
        out.push(self.op as u8);
        out.push(if self.debit { 1 } else { 2 });
        out.extend_from_slice(&self.counterparty);
        out.extend_from_slice(&self.amount.to_le_bytes());
        out.extend_from_slice(&self.balance.to_le_bytes());
        out.extend_from_slice(&self.request_hash);
        out.extend_from_slice(&self.receipt_hash);
    }

    fn read(r: &mut Reader<'_>) -> Result<HistoryEntry, WireError> {
        let height = r.u64("history.entry.height")?;
        let index = r.u32("history.entry.index")?;
        let op = Op::from_u8(r.u8("history.entry.op")?).ok_or(WireError::Invalid {
            field: "history.entry.op",
            reason: "unknown operation kind",
        })?;
        let debit = match r.u8("history.entry.direction")? {
            1 => true,
            2 => false,
            _ => {
                return Err(WireError::Invalid {
                    field: "history.entry.direction",
                    reason: "must be 1 (debit) or 2 (credit)",
                })
            }
        };
        Ok(HistoryEntry {
            height,
            index,
            op,
            debit,
            counterparty: r.array("history.entry.counterparty")?,
            amount: r.u64("history.entry.amount")?,
            balance: r.u64("history.entry.balance")?,
            request_hash: r.array("history.entry.request_hash")?,
            receipt_hash: r.array("history.entry.receipt_hash")?,
        })
    }
}

/// A page of an account's history, ascending by height then leaf index, with the signed
/// headers of the heights it names (each once, ascending).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryReply {
    pub account: PublicKey,
    /// The applied height the page was read at.
    pub height: u64,
    /// The oldest height whose history the replica holds.
    pub held_from: u64,
    pub entries: Vec<HistoryEntry>,
    pub headers: Vec<SignedHeader>,
    /// Where the next page starts (height, leaf index), if there is more.
    pub next: Option<(u64, u32)>,
}

impl HistoryReply {
    pub(crate) fn write(&self, out: &mut Vec<u8>) {
        assert!(self.entries.len() <= HISTORY_ENTRIES_PER_REPLY_MAX as usize);
        assert!(self.headers.len() <= self.entries.len());
        out.extend_from_slice(&self.account);
        out.extend_from_slice(&self.height.to_le_bytes());
        out.extend_from_slice(&self.held_from.to_le_bytes());
        let (next_height, next_index) = self.next.unwrap_or((0, 0));
        out.push(self.next.is_some() as u8);
        out.extend_from_slice(&next_height.to_le_bytes());
        out.extend_from_slice(&next_index.to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u16).to_le_bytes());
        for e in &self.entries {
            e.write(out);
        }
        out.extend_from_slice(&(self.headers.len() as u16).to_le_bytes());
        for h in &self.headers {
            out.extend_from_slice(&h.encode());
        }
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<HistoryReply, WireError> {
        let account = r.array("history.account")?;
        let height = r.u64("history.height")?;
        let held_from = r.u64("history.held_from")?;
        let has_next = read_bool(r, "history.has_next")?;
        let next = (r.u64("history.next_height")?, r.u32("history.next_index")?);
        let count = r.u16("history.count")?;
        if count > HISTORY_ENTRIES_PER_REPLY_MAX {
            return Err(WireError::Invalid {
                field: "history.count",
                reason: "more than 1024 entries",
            });
        }
        let mut entries = Vec::with_capacity(count as usize);
        for _ in 0..count {
            entries.push(HistoryEntry::read(r)?);
        }
        let header_count = r.u16("history.header_count")?;
        if header_count > count {
            return Err(WireError::Invalid {
                field: "history.header_count",
                reason: "more headers than entries",
            });
        }
        let mut headers = Vec::with_capacity(header_count as usize);
        for _ in 0..header_count {
            headers.push(SignedHeader::read(r)?);
        }
        Ok(HistoryReply {
            account,
            height,
            held_from,
            entries,
            headers,
            next: has_next.then_some(next),
        })
    }
}

/// An account's figures at one height.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountReply {
    pub account: PublicKey,
    /// The height the figures are as of: the applied height, or the one asked.
    pub height: u64,
    pub exists: bool,
    /// Whether the pending amounts are known: only for the latest height (an as-of answer
    /// carries zero pending amounts and false).
    pub pending_known: bool,
    /// The available balance.
    pub balance: u64,
    pub pending_debits: u64,
    pub pending_credits: u64,
    pub total_debited: u128,
    pub total_credited: u128,
    pub operation_count: u64,
    /// The height of the account's newest history entry at or below `height`; 0 if none.
    pub last_height: u64,
}

impl AccountReply {
    pub(crate) fn write(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&self.account);
        out.extend_from_slice(&self.height.to_le_bytes());
        out.push(self.exists as u8);
        out.push(self.pending_known as u8);
        for v in [self.balance, self.pending_debits, self.pending_credits] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.total_debited.to_le_bytes());
        out.extend_from_slice(&self.total_credited.to_le_bytes());
        out.extend_from_slice(&self.operation_count.to_le_bytes());
        out.extend_from_slice(&self.last_height.to_le_bytes());
        assert_eq!(out.len() - start, ACCOUNT_REPLY_BYTES);
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<AccountReply, WireError> {
        Ok(AccountReply {
            account: r.array("account.account")?,
            height: r.u64("account.height")?,
            exists: read_bool(r, "account.exists")?,
            pending_known: read_bool(r, "account.pending_known")?,
            balance: r.u64("account.balance")?,
            pending_debits: r.u64("account.pending_debits")?,
            pending_credits: r.u64("account.pending_credits")?,
            total_debited: u128::from_le_bytes(r.array("account.total_debited")?),
            total_credited: u128::from_le_bytes(r.array("account.total_credited")?),
            operation_count: r.u64("account.operation_count")?,
            last_height: r.u64("account.last_height")?,
        })
    }
}

/// Reads a `GetHistory` limit: 1 to [`HISTORY_ENTRIES_PER_REPLY_MAX`].
pub(crate) fn read_history_limit(r: &mut Reader<'_>) -> Result<u16, WireError> {
    let limit = r.u16("get_history.limit")?;
    if limit == 0 || limit > HISTORY_ENTRIES_PER_REPLY_MAX {
        return Err(WireError::Invalid {
            field: "get_history.limit",
            reason: "must be 1 to 1024",
        });
    }
    Ok(limit)
}
