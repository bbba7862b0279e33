//! [`LedgerImport`]: a ledger directory built from verified history and a signed state
//! snapshot, without replaying the batches.
//!
//! `tally-server restore` starts from the newest signed snapshot at or below its target height
//! `S`: it feeds the archived batches `1..=S` to [`LedgerImport::batch`] (each header row, body
//! and request record: the history and the exactly-once state), then the snapshot's accounts to
//! [`LedgerImport::account`] and its reserves to [`LedgerImport::reserve`] (which rebuilds the
//! derived `expiry` and `pending` rows from them, as an install does), and
//! [`LedgerImport::finish`] writes the summary at `S`. Rows go
//! out in unsynced groups and are made durable once, at the end: a crash before that leaves a
//! directory the caller throws away (the restore's in-progress marker keeps a server from
//! starting on it).
//!
//! What it checks (the caller has verified each batch against the archive's log: operator
//! signature, hash link, Merkle root): headers arrive in height order from 1 and each chains to
//! the one before; at the end, the summary it builds (accounts' and reserves' terms, the
//! account count, the totals it is given, the last header's hash) must give the state digest
//! the last signed header carries, the balances plus what open reserves hold must add up to
//! deposits minus withdrawals, and the directory reopened as a
//! [`crate::LedgerDb`] must pass its own checks of the tip.

use std::path::Path;

use tally_core::crypto::{header_hash, sha256};
use tally_core::ports::{LedgerStore, RequestRecord};
use tally_core::reserve::Reserve;
use tally_core::state::LedgerMeta;
use tally_core::{Error, Result};
use tally_wire::{PublicKey, SignedHeader};

use crate::archive::ArchivePoint;
use crate::history::HistoryWriter;
use crate::layout;
use crate::ledger::{encode_header_row, leveldb_options, state_leveldb_options};
use crate::transfer::{require_empty, Derived, Part};
use crate::{LedgerDb, StoreOptions, SyncEnv};

/// Accounts whose newest history row an import keeps in memory before writing them out.
const IMPORT_HEADS_MAX: usize = 65_536;

/// Builds a ledger from history and a snapshot; see the module docs.
pub struct LedgerImport {
    dir: std::path::PathBuf,
    opts: StoreOptions,
    state: Part,
    /// The `body`, `request`, `history` and `receipt` tables (see `archive.rs`).
    archive: Part,
    /// Derives the history of every imported batch (held from height 1).
    history: HistoryWriter,
    /// The summary so far: height and last header from the batches, accounts from the rows.
    meta: LedgerMeta,
    /// The state digest the last header signed.
    tip_digest: tally_wire::Hash,
    /// Balances plus what open reserves hold.
    balance_total: u128,
    derived: Derived,
}

impl LedgerImport {
    /// Creates the ledger's databases in `dir`, which must be empty or absent.
    pub fn create(dir: &Path, opts: StoreOptions) -> Result<LedgerImport> {
        require_empty(dir, "import")?;
        Ok(LedgerImport {
            dir: dir.to_owned(),
            state: Part::open(dir, state_leveldb_options(&opts, SyncEnv::new()))?,
            archive: Part::open_archive(dir, leveldb_options(&opts, SyncEnv::new()))?,
            opts,
            history: HistoryWriter::default(),
            meta: LedgerMeta::genesis(),
            tip_digest: [0; 32],
            balance_total: 0,
            derived: Derived::default(),
        })
    }

    /// Height of the last batch imported.
    pub fn height(&self) -> u64 {
        self.meta.height
    }

    /// Imports the next batch of the history: its header row, its body (`encoded`, the
    /// canonical bytes of the body the header commits to) and a request record per entry.
    /// Returns the records, for the caller's exactly-once checks.
    pub fn batch(
        &mut self,
        signed: &SignedHeader,
        body: &tally_core::batch::BatchBody,
        encoded: &[u8],
    ) -> Result<Vec<(PublicKey, u128, RequestRecord)>> {
        let h = &signed.header;
        if h.height != self.meta.height + 1 || h.prev_hash != self.meta.last_header_hash {
            return Err(Error::Verify(format!(
                "batch {} does not follow batch {} of the import",
                h.height, self.meta.height
            )));
        }
        assert_eq!(&body.header, h, "the body is the header's");
        let digest = sha256(&[encoded]);
        self.state.put(
            &layout::header_key(h.height),
            &encode_header_row(signed, &digest),
        )?;
        self.archive.put(&layout::body_key(&digest), encoded)?;
        let records = body.records();
        for (signer, id, record) in &records {
            let key = layout::request_key(signer, *id);
            self.archive.put(&key, &layout::encode_request(record))?;
        }
        self.history_rows(body)?;
        self.meta.height = h.height;
        self.meta.last_header_hash = header_hash(h);
        self.tip_digest = h.state_digest;
        Ok(records)
    }

    /// Writes the history and receipt rows of `body`. Heads are put (and the archive part
    /// written, so that reads find them) every [`IMPORT_HEADS_MAX`] accounts and at the end.
    fn history_rows(&mut self, body: &tally_core::batch::BatchBody) -> Result<()> {
        let mut rows = Vec::new();
        let archive = &mut self.archive;
        self.history.batch(
            body,
            &body.leaf_hashes(),
            &mut |key: &[u8]| Ok(archive.get(key)),
            &mut rows,
        )?;
        for (k, v) in rows {
            self.archive.put(&k, &v)?;
        }
        if self.history.touched() >= IMPORT_HEADS_MAX {
            self.put_history_heads()?;
        }
        Ok(())
    }

    fn put_history_heads(&mut self) -> Result<()> {
        let mut rows = Vec::new();
        self.history.finish(&mut rows)?;
        for (k, v) in rows {
            self.archive.put(&k, &v)?;
        }
        self.archive.write_pending()
    }

    /// Imports one account's balance at the last batch's height. Each account once.
    pub fn account(&mut self, key: &PublicKey, balance: u64) -> Result<()> {
        self.meta.account_changed(key, None, balance);
        self.balance_total += u128::from(balance);
        self.state
            .put(&layout::account_key(key), &layout::encode_account(balance))
    }

    /// Imports one reserve's state at the last batch's height (open or closed). Each once.
    pub fn reserve(&mut self, owner: &PublicKey, id: u128, reserve: &Reserve) -> Result<()> {
        self.meta.reserve_changed(owner, id, reserve);
        self.balance_total += u128::from(reserve.held());
        self.derived.reserve(&mut self.state, owner, id, reserve)?;
        self.state
            .put(&layout::reserve_key(owner, id), &reserve.encode())
    }

    /// The ledger's last operator key rotation at the imported height (the snapshot's), if it
    /// had one (PROTOCOL.md §4.14).
    pub fn operator(&mut self, rotation: Option<tally_core::state::Rotation>) {
        if let Some(r) = rotation {
            assert!(
                r.height <= self.meta.height,
                "a rotation above the imported height"
            );
        }
        self.meta.operator = rotation;
    }

    /// Checks the state against the last header (see the module docs), writes the summary
    /// with the ledger's totals and the raft index it is to carry, syncs, and opens the ledger
    /// (which checks its tip).
    pub fn finish(
        mut self,
        total_deposited: u128,
        total_withdrawn: u128,
        raft_index: u64,
    ) -> Result<LedgerDb> {
        self.meta.total_deposited = total_deposited;
        self.meta.total_withdrawn = total_withdrawn;
        self.meta.raft_index = raft_index;
        self.meta.map.flush();
        let meta = self.meta.clone();
        if meta.state_digest() != self.tip_digest {
            return Err(Error::Verify(format!(
                "the imported state does not give the state digest of header {}",
                meta.height
            )));
        }
        if total_withdrawn > total_deposited
            || self.balance_total != total_deposited - total_withdrawn
        {
            return Err(Error::Verify(
                "the imported balances and open reserves do not add up to deposits minus \
                 withdrawals"
                    .into(),
            ));
        }
        self.state.put(&layout::meta_key(), &meta.encode())?;
        if let Some(operator) = meta.encode_operator() {
            self.state.put(&layout::operator_key(), &operator)?;
        }
        self.put_history_heads()?;
        self.archive
            .put(&layout::history_held_from_key(), &1u64.to_le_bytes())?;
        let point = ArchivePoint {
            height: meta.height,
            raft_index: meta.raft_index,
        };
        self.archive
            .put(&layout::archive_point_key(), &point.encode())?;
        self.archive.finish()?;
        self.derived.finish(&mut self.state)?;
        self.state.finish()?;
        let mut db = LedgerDb::open(&self.dir, self.opts)?;
        let stored = db.meta()?;
        assert_eq!(stored, meta, "the summary reads back as written");
        Ok(db)
    }
}
