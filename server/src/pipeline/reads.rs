//! What the storage thread serves besides applying: lookups for the validation stages and the
//! master, client reads (balances, headers, status), ledger dumps for peers installing a
//! snapshot, and applied batches for the archive writer. All read the applied state.

use std::sync::atomic::Ordering;

use tally_core::engine::apply::{find_confirmation, Found};
use tally_core::header_log::consistency_reply_with;
use tally_core::ports::LedgerStore;
use tally_core::replica::ReplicaStatus;
use tally_core::state::LedgerMeta;
use tally_core::Result as CoreResult;
use tally_wire::{
    BalanceProofReply, BalanceReply, ErrorCode, Message, PublicKey, SignedHeader, StatusReply,
    HEADERS_PER_REPLY_MAX,
};

use super::storage::StorageThread;
use crate::channels::{LookupResult, ReplyTo, StorageCmd};
use crate::fail::on_error;

impl<S: LedgerStore> StorageThread<S> {
    /// Serves one read command (never `Committed`, `InstallSnapshot`, `Replay` or `Stop`).
    pub(super) fn read(&mut self, cmd: StorageCmd) {
        let height = self.engine.meta().height;
        match cmd {
            StorageCmd::Dump {
                chunk_bytes_max,
                out,
                done,
            } => {
                let _ = done.send(self.dump(chunk_bytes_max, out));
            }
            StorageCmd::Lookup {
                keys,
                accounts,
                reply,
            } => self.serve_lookup(&keys, &accounts, reply),
            cmd @ (StorageCmd::LoadAccount { .. }
            | StorageCmd::LoadRequest { .. }
            | StorageCmd::LoadReserve { .. }
            | StorageCmd::LoadExpiries { .. }
            | StorageCmd::HeaderTime { .. }) => self.master_read(cmd),
            StorageCmd::Balance {
                account,
                mode,
                reply,
            } => self.balance(account, mode, height, reply),
            StorageCmd::Headers {
                from_height,
                limit,
                reply,
            } => match self.headers(from_height, limit) {
                Ok(headers) => reply.send(&Message::Headers(headers)),
                Err(e) => on_error("reading a header", e, reply),
            },
            StorageCmd::FindConfirmation { signer, id, reply } => {
                self.find_confirmation(&signer, id, reply)
            }
            StorageCmd::Supply { reply } => self.supply(reply),
            StorageCmd::Consistency { from, to, reply } => self.consistency(from, to, reply),
            StorageCmd::BalanceProof { account, reply } => self.prove_balance(&account, reply),
            StorageCmd::KeyChain { reply } => self.key_chain(reply),
            StorageCmd::LogProof { from, to, reply } => {
                let _ = reply.send(self.log_proof(from, to));
            }
            cmd @ (StorageCmd::History { .. }
            | StorageCmd::Account { .. }
            | StorageCmd::FindByReceipt { .. }) => self.accounting(cmd),
            StorageCmd::Status {
                raft,
                writable,
                leader_client_address,
                reply,
            } => match self.status(raft, writable, leader_client_address, height) {
                Ok(status) => reply.send(&Message::Status(Box::new(status))),
                Err(e) => on_error("reading a header", e, reply),
            },
            cmd @ (StorageCmd::ReadBatches { .. } | StorageCmd::CheckpointSignatures { .. }) => {
                self.archive_read(cmd)
            }
            StorageCmd::Committed(_)
            | StorageCmd::InstallSnapshot { .. }
            | StorageCmd::Replay { .. }
            | StorageCmd::Stop => unreachable!("not a read"),
        }
    }

    /// The archive writer's reads: signed batches, a threshold's checkpoint signatures.
    fn archive_read(&mut self, cmd: StorageCmd) {
        match cmd {
            StorageCmd::ReadBatches {
                from,
                to,
                bytes_max,
                reply,
            } => {
                let signed = to.min(self.readable_height());
                let _ = reply.send(self.read_batches(from, signed, bytes_max));
            }
            StorageCmd::CheckpointSignatures { from, to, reply } => {
                let to = to.min(from + crate::channels::CHECKPOINT_SIGNATURES_READ_MAX - 1);
                let signatures = (from..=to)
                    .map(|size| self.db().checkpoint_signature(size))
                    .collect();
                let _ = reply.send(signatures);
            }
            _ => unreachable!("not an archive read"),
        }
    }

    /// The master's reads of committed state, on a cache miss of its sequencer.
    fn master_read(&mut self, cmd: StorageCmd) {
        match cmd {
            StorageCmd::LoadAccount { key, reply } => {
                let _ = reply.send(self.account(&key));
            }
            StorageCmd::LoadRequest { signer, id, reply } => {
                let _ = reply.send(self.db().request(&signer, id));
            }
            StorageCmd::LoadReserve { owner, id, reply } => {
                let _ = reply.send(self.db().reserve(&owner, id));
            }
            StorageCmd::LoadExpiries { limit, reply } => {
                let _ = reply.send(self.db().expiries(limit));
            }
            StorageCmd::HeaderTime { height, reply } => {
                let _ = reply.send(self.db().header_time(height));
            }
            _ => unreachable!("not a master read"),
        }
    }

    /// Serves the snapshot stage's lookups and counts how they were answered.
    fn serve_lookup(
        &mut self,
        keys: &[(tally_wire::PublicKey, u128)],
        accounts: &[tally_wire::PublicKey],
        reply: crossbeam_channel::Sender<CoreResult<crate::channels::LookupResult>>,
    ) {
        let _ = reply.send(self.lookup(keys, accounts));
        let now = self.db().request_lookup_counts();
        self.metrics.request_lookups(&mut self.lookups_seen, now);
    }

    /// Answers `GetConsistency` (PROTOCOL.md §4.12) at the applied height: two header reads,
    /// O(log n) header log rows and two checkpoint signatures, on this thread.
    fn consistency(&mut self, from: u64, to: u64, reply: ReplyTo) {
        let height = self.readable_height();
        let to = if to == 0 { height } else { to };
        if to > height || from > to {
            return reply.error(
                ErrorCode::HeightNotApplied,
                format!("height {to} is not applied and signed on this replica (it has {height})"),
            );
        }
        if let Some(size) = self.unsigned_checkpoint(&[from, to]) {
            return reply.error(
                ErrorCode::NotFound,
                format!(
                    "this replica holds no threshold signature of the checkpoint of size {size}"
                ),
            );
        }
        match self.log_proof(from, to) {
            Ok(r) => reply.send(&Message::Consistency(Box::new(r))),
            Err(e) => on_error("proving the header log's consistency", e, reply),
        }
    }

    /// On a threshold operator's replica, the first of `sizes` whose checkpoint signature it
    /// does not hold (a ledger installed or restored without it); None with a whole key,
    /// which signs when asked. A failed read is left to `log_proof` to report.
    fn unsigned_checkpoint(&mut self, sizes: &[u64]) -> Option<u64> {
        if !self.engine.is_threshold() {
            return None;
        }
        let store = self.store.as_mut().expect("store");
        sizes
            .iter()
            .copied()
            .find(|s| matches!(store.checkpoint_signature(*s), Ok(None)))
    }

    /// The header log's consistency from `from` to `to`, both applied heights (`from <= to`).
    fn log_proof(&mut self, from: u64, to: u64) -> CoreResult<tally_wire::ConsistencyReply> {
        assert!(1 <= from && from <= to && to <= self.readable_height());
        let threshold = self.engine.is_threshold();
        let key = (!threshold).then(|| self.engine.operator()).transpose()?;
        let store = self.store.as_mut().expect("store");
        let mut header = |h: u64| {
            store.header(h)?.ok_or_else(|| {
                tally_core::Error::missing(format_args!("header {h} below the signed height"))
            })
        };
        let (a, b) = (header(from)?, header(to)?);
        // A whole key signs a checkpoint when asked; a threshold signed each one ahead.
        // (Each under the key that signed it: the group of the header after it.)
        let mut stored = std::collections::BTreeMap::new();
        if key.is_none() {
            for size in [from, to] {
                let sig = store.checkpoint_signature(size)?.ok_or_else(|| {
                    tally_core::Error::missing(format_args!("checkpoint signature {size}"))
                })?;
                let group = self.engine.checkpoint_key(store, size)?;
                stored.insert(size, (group, sig));
            }
        }
        let mut sign = |c: &tally_core::tlog::Checkpoint| match key {
            Some(k) => Ok(k.sign_checkpoint(c)),
            None => {
                let (group, sig) = &stored[&c.size];
                Ok(tally_core::tlog::note_with_signature(
                    &c.body(),
                    &c.origin,
                    group,
                    sig,
                ))
            }
        };
        consistency_reply_with(a, b, &mut sign, &mut |l, i| store.header_log_node(l, i))
    }

    /// Answers `GetKeyChain` (PROTOCOL.md §4.14): the links, read back from the rotation
    /// batches the first time after each rotation, then from memory.
    fn key_chain(&mut self, reply: ReplyTo) {
        match self.key_links() {
            Ok(links) => reply.send(&Message::KeyChain(Box::new(tally_wire::KeyChainReply {
                links,
            }))),
            Err(e) => on_error("reading the key chain", e, reply),
        }
    }

    fn key_links(&mut self) -> CoreResult<Vec<tally_wire::KeyLink>> {
        let Some(last) = self.engine.meta().operator else {
            return Ok(Vec::new());
        };
        if let Some((at, links)) = &self.key_links {
            if *at == last {
                return Ok(links.clone());
            }
        }
        let store = self.store.as_mut().expect("store");
        let links = tally_core::key_chain::links(store, self.engine.meta())?;
        self.key_links = Some((last, links.clone()));
        Ok(links)
    }

    /// Answers `GetBalanceProof` (PROTOCOL.md §4.13).
    fn prove_balance(&mut self, account: &PublicKey, reply: ReplyTo) {
        if self.engine.meta().height > self.readable_height() {
            let why = "the newest batch's header waits for its threshold signature; retry";
            return reply.error(ErrorCode::Unavailable, why);
        }
        match self.balance_proof(account) {
            Ok(Some(p)) => reply.send(&Message::BalanceProof(Box::new(p))),
            Ok(None) => reply.error(ErrorCode::HeightNotApplied, "no batch is applied yet"),
            Err(e) => on_error("proving a balance", e, reply),
        }
    }

    /// `account`'s balance proved against the header at the applied height (PROTOCOL.md
    /// §4.13): one header read, one account read and a walk down the in-memory state map.
    /// None before the first batch (no header to prove against).
    fn balance_proof(&mut self, account: &PublicKey) -> CoreResult<Option<BalanceProofReply>> {
        let meta = self.engine.meta().clone();
        let store = self.store.as_mut().expect("store");
        let Some(header) = (meta.height > 0)
            .then(|| store.header(meta.height))
            .transpose()?
        else {
            return Ok(None);
        };
        let header = header.ok_or_else(|| {
            tally_core::Error::missing(format_args!("the applied header {}", meta.height))
        })?;
        let proof = meta
            .map
            .prove_account(account)
            .expect("the applied map is loaded");
        Ok(Some(BalanceProofReply {
            header,
            map_root: meta.map.root(),
            account_count: meta.account_count,
            total_deposited: meta.total_deposited,
            total_withdrawn: meta.total_withdrawn,
            account: *account,
            balance: store.account(account)?,
            siblings: proof.siblings,
            neighbor: proof.neighbor,
        }))
    }

    /// Answers `GetSupply` from the applied state.
    fn supply(&mut self, reply: ReplyTo) {
        let meta = self.engine.meta().clone();
        let store = self.store.as_mut().expect("store");
        match store.balance_total() {
            Ok(sum) => reply.send(&Message::Supply(tally_wire::SupplyReply {
                height: meta.height,
                total_deposited: meta.total_deposited,
                total_withdrawn: meta.total_withdrawn,
                sum_of_balances: sum,
                accounts: meta.account_count,
            })),
            Err(e) => on_error("reading the sum of balances", e, reply),
        }
    }

    /// Answers `GetBalance` from the applied state at `height`.
    fn balance(
        &mut self,
        account: tally_wire::PublicKey,
        mode: tally_wire::ReadMode,
        height: u64,
        reply: ReplyTo,
    ) {
        match self.account(&account) {
            Ok(b) => reply.send(&Message::Balance(BalanceReply {
                account,
                exists: b.is_some(),
                balance: b.unwrap_or(0),
                height,
                mode,
            })),
            Err(e) => on_error("reading an account", e, reply),
        }
    }

    /// Answers `GetConfirmation`: the original confirmation of `(signer, id)`, or `not_found`.
    fn find_confirmation(&mut self, signer: &tally_wire::PublicKey, id: u128, reply: ReplyTo) {
        let store = self.store.as_mut().expect("store");
        match find_confirmation(store, signer, id) {
            Ok(Some(Found::Request(c))) => reply.send(&Message::Confirmed(c)),
            Ok(Some(Found::Operation(c))) => reply.send(&Message::OperationConfirmed(c)),
            Ok(Some(Found::Expiry(c))) => reply.send(&Message::ExpiryConfirmed(c)),
            Ok(None) => reply.error(
                ErrorCode::NotFound,
                format!("no batch applied here holds id {id} of this signer"),
            ),
            Err(e) => on_error("reading a confirmation", e, reply),
        }
    }

    /// The pending debits and credits of `account` at the applied height (`GetAccount`).
    pub(super) fn pending_of(&mut self, account: &tally_wire::PublicKey) -> CoreResult<(u64, u64)> {
        self.db().pending(account)
    }

    /// Streams the ledger to a peer installing a snapshot. The dump holds this thread (and so
    /// the apply path) until the peer has taken every chunk: a known cost of serving one.
    fn dump(
        &mut self,
        chunk_bytes_max: usize,
        out: tokio::sync::mpsc::Sender<Vec<u8>>,
    ) -> CoreResult<LedgerMeta> {
        let store = self.store.as_mut().expect("store");
        self.installer.dump(store, chunk_bytes_max, &mut |chunk| {
            out.blocking_send(chunk)
                .map_err(|_| tally_core::Error::stopped("the peer taking the snapshot"))
        })
    }

    fn status(
        &mut self,
        raft: ReplicaStatus,
        writable: bool,
        leader_client_address: String,
        height: u64,
    ) -> CoreResult<StatusReply> {
        Ok(StatusReply {
            node_id: self.node_id,
            role: raft.role.code(),
            term: raft.term,
            leader_id: raft.leader_id,
            commit_index: raft.commit_index,
            applied_index: self.applied.index.load(Ordering::SeqCst),
            applied_height: height,
            writable,
            leader_client_address,
            latest_header: self.latest_header(height.min(self.readable_height()))?,
            archive_height: self
                .archive
                .as_ref()
                .map(|gate| gate.progress.height.load(Ordering::SeqCst)),
        })
    }

    fn account(&mut self, key: &tally_wire::PublicKey) -> CoreResult<Option<u64>> {
        let store = self.store.as_mut().expect("store");
        self.engine.account(store, key)
    }

    fn lookup(
        &mut self,
        keys: &[(tally_wire::PublicKey, u128)],
        accounts: &[tally_wire::PublicKey],
    ) -> CoreResult<LookupResult> {
        let mut records = Vec::with_capacity(keys.len());
        for (signer, id) in keys {
            records.push(self.db().request(signer, *id)?);
        }
        let mut balances = Vec::with_capacity(accounts.len());
        for a in accounts {
            balances.push(self.account(a)?);
        }
        Ok(LookupResult {
            height: self.engine.meta().height,
            records,
            balances,
        })
    }

    fn headers(&mut self, from_height: u64, limit: u16) -> CoreResult<Vec<SignedHeader>> {
        let limit = limit.clamp(1, HEADERS_PER_REPLY_MAX) as u64;
        let from = from_height.max(1);
        let to = from
            .saturating_add(limit)
            .min(self.engine.meta().height + 1);
        let mut headers = Vec::new();
        for h in from..to {
            match self.db().header(h)? {
                Some(sh) => headers.push(sh),
                None => break,
            }
        }
        Ok(headers)
    }

    fn latest_header(&mut self, height: u64) -> CoreResult<Option<SignedHeader>> {
        if height == 0 {
            return Ok(None);
        }
        self.db().header(height)
    }

    /// Applied batches for the archive writer (see `StorageCmd::ReadBatches`).
    fn read_batches(
        &mut self,
        from: u64,
        to: u64,
        bytes_max: usize,
    ) -> CoreResult<Vec<(SignedHeader, Vec<u8>)>> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for height in from..=to {
            let (Some(signed), Some(body)) = (self.db().header(height)?, self.db().body(height)?)
            else {
                return Err(tally_core::Error::missing(format_args!(
                    "the header or body of applied batch {height}"
                )));
            };
            assert_eq!(signed.header.height, height, "header table keyed by height");
            bytes += body.len();
            out.push((signed, body));
            if bytes >= bytes_max {
                break;
            }
        }
        Ok(out)
    }
}
