//! The accounting reads the storage thread serves: an account's history (`GetHistory`), its
//! figures now or as of a height (`GetAccount`), and a confirmation by receipt hash
//! (`GetConfirmationByReceipt`). The store reads history on its archive thread behind the
//! batches queued there, so every answer is exact at the applied height it names.

use tally_core::batch::BatchBody;
use tally_core::engine::apply::Found;
use tally_core::history::{confirmation_at, Direction, HistoryRow};
use tally_core::merkle::leaf_hash;
use tally_core::ports::LedgerStore;
use tally_core::Result as CoreResult;
use tally_wire::{
    AccountReply, ErrorCode, Hash, HistoryEntry, HistoryReply, Message, PublicKey,
    HISTORY_ENTRIES_PER_REPLY_MAX,
};

use super::storage::StorageThread;
use crate::channels::{ReplyTo, StorageCmd};
use crate::fail::on_error;

/// A read the client asked wrongly or too early: its code and message.
type Refusal = (ErrorCode, String);

fn pruned(asked: u64, held_from: u64) -> Refusal {
    (
        ErrorCode::HistoryPruned,
        format!(
            "height {asked} is below the oldest height whose history this replica holds, \
             {held_from}"
        ),
    )
}

fn answer(what: &str, read: CoreResult<Result<Message, Refusal>>, reply: ReplyTo) {
    match read {
        Ok(Ok(message)) => reply.send(&message),
        Ok(Err((code, message))) => reply.error(code, message),
        Err(e) => on_error(what, e, reply),
    }
}

fn wire_entry(row: &HistoryRow) -> HistoryEntry {
    let e = &row.entry;
    HistoryEntry {
        height: e.height,
        index: e.index,
        op: e.op,
        debit: e.direction == Direction::Debit,
        counterparty: e.counterparty,
        amount: e.amount,
        balance: e.balance,
        request_hash: e.request_hash,
        receipt_hash: e.receipt_hash,
    }
}

impl<S: LedgerStore> StorageThread<S> {
    /// Serves `History`, `Account` or `FindByReceipt`.
    pub(super) fn accounting(&mut self, cmd: StorageCmd) {
        match cmd {
            StorageCmd::History {
                account,
                from_height,
                from_index,
                limit,
                reply,
            } => self.history(account, (from_height, from_index), limit, reply),
            StorageCmd::Account {
                account,
                at_height,
                reply,
            } => self.account_figures(account, at_height, reply),
            StorageCmd::FindByReceipt { leaf_hash, reply } => {
                self.find_by_receipt(&leaf_hash, reply)
            }
            _ => unreachable!("not an accounting read"),
        }
    }

    /// Answers `GetHistory`: from `(height, index)` on; `from.0` 0 means from the oldest
    /// height held.
    pub(super) fn history(
        &mut self,
        account: PublicKey,
        from: (u64, u32),
        limit: u16,
        reply: ReplyTo,
    ) {
        let read = self.history_page(account, from, limit);
        answer("reading an account's history", read, reply)
    }

    fn history_page(
        &mut self,
        account: PublicKey,
        from: (u64, u32),
        limit: u16,
    ) -> CoreResult<Result<Message, Refusal>> {
        let height = self.engine.meta().height;
        let held_from = self.db().history_held_from()?;
        if from.0 != 0 && from.0 < held_from {
            return Ok(Err(pruned(from.0, held_from)));
        }
        let from = if from.0 == 0 { (held_from, 0) } else { from };
        let limit = limit.clamp(1, HISTORY_ENTRIES_PER_REPLY_MAX) as usize;
        let mut page = self.db().history(&account, from, limit)?;
        // Rows of batches whose headers wait for their threshold signature come next time.
        let readable = self.readable_height();
        if let Some(cut) = page.rows.iter().position(|r| r.entry.height > readable) {
            let first = &page.rows[cut].entry;
            page.next = Some((first.height, first.index));
            page.rows.truncate(cut);
        }
        let height = height.min(readable);
        let mut headers = Vec::new();
        for row in &page.rows {
            let h = row.entry.height;
            if headers
                .last()
                .is_some_and(|s: &tally_wire::SignedHeader| s.header.height == h)
            {
                continue;
            }
            let signed = self.db().header(h)?.ok_or_else(|| {
                tally_core::Error::missing(format_args!("the header of height {h}"))
            })?;
            headers.push(signed);
        }
        Ok(Ok(Message::History(Box::new(HistoryReply {
            account,
            height,
            held_from,
            entries: page.rows.iter().map(wire_entry).collect(),
            headers,
            next: page.next,
        }))))
    }

    /// Answers `GetAccount`: at the applied height (`at_height` 0 or that height) from the
    /// state and the newest history row; below it from the newest row at or below
    /// `at_height`, without pending amounts (`pending_known` false).
    pub(super) fn account_figures(&mut self, account: PublicKey, at_height: u64, reply: ReplyTo) {
        let read = self.account_reply(account, at_height);
        answer("reading an account", read, reply)
    }

    fn account_reply(
        &mut self,
        account: PublicKey,
        at_height: u64,
    ) -> CoreResult<Result<Message, Refusal>> {
        let applied = self.engine.meta().height;
        if at_height > applied {
            let message = format!("height {at_height} is not applied here yet (at {applied})");
            return Ok(Err((ErrorCode::HeightNotApplied, message)));
        }
        let held_from = self.db().history_held_from()?;
        let latest = at_height == 0 || at_height == applied;
        if !latest && at_height < held_from {
            return Ok(Err(pruned(at_height, held_from)));
        }
        let height = if latest { applied } else { at_height };
        let row = self.db().history_at(&account, height)?;
        let (exists, balance, pending) = if latest {
            let balance = self
                .engine
                .account(self.store.as_mut().expect("store"), &account)?;
            (
                balance.is_some(),
                balance.unwrap_or(0),
                self.pending_of(&account)?,
            )
        } else {
            if row.is_none() && held_from > 1 {
                // The account may have existed before the history held: unknown here.
                let message = format!(
                    "the account has no history at or below height {at_height}, and this \
                     replica holds history only from height {held_from}: its state then is \
                     not known here"
                );
                return Ok(Err((ErrorCode::HistoryPruned, message)));
            }
            (row.is_some(), row.map_or(0, |r| r.entry.balance), (0, 0))
        };
        let counters = row.map(|r| r.counters).unwrap_or_default();
        Ok(Ok(Message::Account(Box::new(AccountReply {
            account,
            height,
            exists,
            pending_known: latest,
            balance,
            pending_debits: pending.0,
            pending_credits: pending.1,
            total_debited: counters.total_debited,
            total_credited: counters.total_credited,
            operation_count: counters.operation_count,
            last_height: row.map_or(0, |r| r.entry.height),
        }))))
    }

    /// Answers `GetConfirmationByReceipt` like `GetConfirmation`, or `not_found`.
    pub(super) fn find_by_receipt(&mut self, leaf: &Hash, reply: ReplyTo) {
        let read = self.confirmation_by_receipt(leaf);
        answer("reading a confirmation by receipt", read, reply)
    }

    fn confirmation_by_receipt(&mut self, leaf: &Hash) -> CoreResult<Result<Message, Refusal>> {
        let not_found = || {
            let message = "no batch applied here (since the history held) has this receipt";
            Ok(Err((ErrorCode::NotFound, message.to_string())))
        };
        let Some((height, index)) = self.db().receipt(leaf)? else {
            return not_found();
        };
        let (Some(bytes), Some(signed)) = (self.db().body(height)?, self.db().header(height)?)
        else {
            return not_found();
        };
        let corrupt =
            |what: &str| tally_core::Error::corrupt(format_args!("batch {height}: {what}"));
        let body = BatchBody::decode(&bytes).map_err(|e| corrupt(&e.to_string()))?;
        let found = confirmation_at(&body, signed, index)
            .ok_or_else(|| corrupt("the receipt index names a leaf outside the batch"))?;
        if leaf_hash(&found.receipt().encode()) != *leaf {
            return Err(corrupt("the receipt index names another receipt"));
        }
        Ok(Ok(match found {
            Found::Request(c) => Message::Confirmed(c),
            Found::Operation(c) => Message::OperationConfirmed(c),
            Found::Expiry(c) => Message::ExpiryConfirmed(c),
        }))
    }
}
