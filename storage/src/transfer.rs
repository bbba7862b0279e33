//! Moving a whole ledger between replicas: [`LedgerDb::dump`] writes the database as a byte
//! stream, [`LedgerInstaller`] rebuilds it in a new directory and checks it, and
//! [`install_ledger_dir`] swaps that directory in for the live one.
//!
//! A replica too far behind the leader's compacted raft log gets a raft snapshot whose data is
//! only a small descriptor; the ledger itself travels as this stream, in chunks of bounded size,
//! and only a directory that was received whole and checked replaces the live one.
//!
//! # Dump stream, version 1
//!
//! ```text
//! stream    = magic version record* end
//! magic     = "TLYD"                   4 bytes
//! version   = 0x01                     u8
//! record    = key_len key value_len value
//! key_len   = u32 LE, 4..=64           the key begins with its 4-byte table tag
//! value_len = u32 LE, 0..=67108864     (64 MiB)
//! end       = 0xFFFFFFFF checksum      checksum: SHA-256 of every byte before `end`
//! ```
//!
//! The records are the ledger's key/value pairs, state and archive databases merged (the archive
//! caught up first, nothing written meanwhile), as of one LevelDB snapshot each, in strictly
//! increasing bytewise key order, with the layout of the crate docs. Only the ledger's tables
//! appear; the `meta`/`open` marker and the archive point never do (the installer writes the
//! point: its archive holds every batch), nor do the derived tables `expiry` and `pending`:
//! the installer rebuilds them from the `reserve` rows as they stream. (Sending them would
//! only add rows to check against the reserves, which arrive after them in key order, so the
//! installer would have to hold them all in memory; rebuilding costs one write per open
//! reserve and a map of the accounts with pending amounts.) The stream is cut into chunks of at most
//! `chunk_bytes_max` bytes, all full but the last; chunk boundaries mean nothing (a record, even
//! a length field, may span chunks). The checksum catches damage in transit and bugs; it
//! authenticates nothing: the header chain and the operator's signature on its tip do.
//!
//! # What the installer checks
//!
//! While the stream arrives (no reads, bounded memory): keys strictly increase and carry a ledger
//! table's tag, keys and values have their table's lengths and decode, every body hashes to its
//! key, `header` holds exactly the heights `1..=n` and each header chains to the one before it. At [`LedgerInstaller::finish`]: the end record and its checksum; a summary
//! row; `n` equals its height, bodies number `n`, and the last header's hash is its
//! `last_header_hash`; the accounts and reserves hash to its state map root and the
//! accounts number `account_count`; their balances plus what open reserves hold add up to
//! deposits minus withdrawals; there are as many request records as the headers count
//! requests less the bodies' expiries and rotations (which use no request id), none beyond the height. Then the directory is
//! synced, reopened as a [`LedgerDb`] (which checks the tip header and body against the summary),
//! and the tip header must verify under the operator's key. Only then is the `COMPLETE` marker
//! written.
//!
//! # Swapping directories
//!
//! The staged directory is always [`staged_ledger_dir`]`(live)`, `<live>.staged`, so that a
//! restart can find it. [`install_ledger_dir`] renames `<live>` to `<live>.old`, then
//! `<live>.staged` to `<live>`, syncing the parent directory after each step, and deletes
//! `<live>.old`. [`recover_install`], which the server must call before opening the ledger,
//! finishes a swap a crash interrupted: while `<live>` is missing, a complete `<live>.staged`
//! takes its place, or else `<live>.old` moves back; once `<live>` exists, leftovers are deleted.
//! Renaming `<live>` away is thus the commit point of an install: before it the old ledger
//! stays, after it the new one wins.
//!
//! # Caveats
//!
//! - [`LedgerInstaller`] holds a rusty-leveldb `DB`, so like [`LedgerDb`] it is not `Send`:
//!   create it on the thread that feeds it.
//! - rusty-leveldb's iterator skips a block it cannot read instead of failing: a dump of a
//!   damaged database can lack rows. The installer's counts catch a missing row in every table.
//! - A header row's body digest is not matched against the `body` table while streaming (that
//!   would need memory per height); reopening checks the tip's.
//! - The request count check relies on each `(signer, id)` being applied once, which the
//!   sequencer guarantees.

use std::fmt::{self, Write as _};
use std::fs::{self, File};
use std::io::{self, Write as _};
use std::mem;
use std::path::{Path, PathBuf};

use rusty_leveldb::{WriteBatch, DB};
use sha2::{Digest, Sha256};
use std::collections::HashMap;

use tally_core::batch::{BatchBody, BatchItem};
use tally_core::crypto::{header_hash, sha256};
use tally_core::key_chain::{self, KeySchedule};
use tally_core::ports::LedgerStore;
use tally_core::reserve::Reserve;
use tally_core::state::{LedgerMeta, META_BYTES};
use tally_core::{Error, Result};
use tally_wire::{Hash, PublicKey};

use crate::archive::ArchivePoint;
use crate::bodies::{bodies_dir, BodyLog};
use crate::env::{parent_dir, SyncEnv};
use crate::layout::{self, corrupt, fixed, key_rest, Table, TAG_BYTES};
use crate::ledger::{archive_dir, decode_header, io_error, leveldb_options, state_leveldb_options};
use crate::{LedgerDb, StoreOptions};

pub const DUMP_MAGIC: [u8; 4] = *b"TLYD";
pub const DUMP_VERSION: u8 = 1;
/// The key length that marks the end record.
pub const DUMP_END: u32 = u32::MAX;
pub const DUMP_KEY_BYTES_MAX: usize = 64;
pub const DUMP_VALUE_BYTES_MAX: usize = 64 << 20;
/// The file whose presence says that a staged directory was installed and checked in full.
pub const COMPLETE_MARKER: &str = "COMPLETE";

/// Records the installer gathers into one unsynced write.
const INSTALL_BATCH_BYTES: usize = 1 << 20;
/// A parse buffer that grew past this (for a big value) is freed rather than kept.
const PARSE_BUFFER_KEPT_BYTES: usize = 1 << 20;
const MAGIC_BYTES: usize = DUMP_MAGIC.len() + 1;

/// Writes a dump stream into chunks of at most `chunk_bytes_max` bytes.
pub(crate) struct DumpWriter<F> {
    chunk: Vec<u8>,
    chunk_bytes_max: usize,
    hasher: Sha256,
    out: F,
}

impl<F: FnMut(Vec<u8>) -> Result<()>> DumpWriter<F> {
    pub(crate) fn new(chunk_bytes_max: usize, out: F) -> Result<Self> {
        assert!(chunk_bytes_max > 0, "a chunk must hold at least one byte");
        let mut w = DumpWriter {
            chunk: Vec::new(),
            chunk_bytes_max,
            hasher: Sha256::new(),
            out,
        };
        w.new_chunk();
        w.hashed(&DUMP_MAGIC)?;
        w.hashed(&[DUMP_VERSION])?;
        Ok(w)
    }

    /// A key or value over the limits is in the database, so it is corruption, not a bug here.
    pub(crate) fn record(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        if !(TAG_BYTES..=DUMP_KEY_BYTES_MAX).contains(&key.len()) {
            return Err(Error::corrupt(format_args!(
                "cannot dump key {}: {} bytes, the limit is {DUMP_KEY_BYTES_MAX}",
                hex(key),
                key.len()
            )));
        }
        if value.len() > DUMP_VALUE_BYTES_MAX {
            return Err(Error::corrupt(format_args!(
                "cannot dump key {}: its value has {} bytes, the limit is {DUMP_VALUE_BYTES_MAX}",
                hex(key),
                value.len()
            )));
        }
        self.hashed(&(key.len() as u32).to_le_bytes())?;
        self.hashed(key)?;
        self.hashed(&(value.len() as u32).to_le_bytes())?;
        self.hashed(value)
    }

    pub(crate) fn finish(mut self) -> Result<()> {
        let checksum: Hash = self.hasher.clone().finalize().into();
        self.put(&DUMP_END.to_le_bytes())?;
        self.put(&checksum)?;
        if !self.chunk.is_empty() {
            (self.out)(mem::take(&mut self.chunk))?;
        }
        Ok(())
    }

    fn hashed(&mut self, bytes: &[u8]) -> Result<()> {
        self.hasher.update(bytes);
        self.put(bytes)
    }

    fn put(&mut self, mut bytes: &[u8]) -> Result<()> {
        while !bytes.is_empty() {
            let n = (self.chunk_bytes_max - self.chunk.len()).min(bytes.len());
            self.chunk.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.chunk.len() == self.chunk_bytes_max {
                let full = self.new_chunk();
                (self.out)(full)?;
            }
        }
        Ok(())
    }

    /// Starts a new chunk and returns the old one.
    fn new_chunk(&mut self) -> Vec<u8> {
        let capacity = self.chunk_bytes_max.min(PARSE_BUFFER_KEPT_BYTES);
        mem::replace(&mut self.chunk, Vec::with_capacity(capacity))
    }
}

/// The field of the stream the parser is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Magic,
    KeyLen,
    Key(usize),
    ValueLen,
    Value(usize),
    Checksum,
    Done,
}

impl Field {
    fn bytes(self) -> usize {
        match self {
            Field::Magic => MAGIC_BYTES,
            Field::KeyLen | Field::ValueLen => 4,
            Field::Key(n) | Field::Value(n) => n,
            Field::Checksum => 32,
            Field::Done => 0,
        }
    }
}

/// An incremental parser of the dump stream: it holds at most one field (a value of at most
/// [`DUMP_VALUE_BYTES_MAX`]) and checks every length before buffering what it announces.
struct StreamParser {
    field: Field,
    buf: Vec<u8>,
    key: Vec<u8>,
    hasher: Sha256,
    /// Stream bytes consumed so far, for error messages.
    offset: u64,
}

impl StreamParser {
    fn new() -> StreamParser {
        StreamParser {
            field: Field::Magic,
            buf: Vec::new(),
            key: Vec::with_capacity(DUMP_KEY_BYTES_MAX),
            hasher: Sha256::new(),
            offset: 0,
        }
    }

    /// Consumes `bytes`, handing each complete record to `record`.
    fn push(
        &mut self,
        mut bytes: &[u8],
        record: &mut impl FnMut(&[u8], &[u8]) -> Result<()>,
    ) -> Result<()> {
        loop {
            if self.field == Field::Done {
                if !bytes.is_empty() {
                    return Err(self.malformed("bytes follow the end record"));
                }
                return Ok(());
            }
            let need = self.field.bytes() - self.buf.len();
            let n = need.min(bytes.len());
            self.buf.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            self.offset += n as u64;
            if n < need {
                return Ok(());
            }
            self.complete(record)?;
        }
    }

    /// The current field is in `buf`: check it and move on to the next.
    fn complete(&mut self, record: &mut impl FnMut(&[u8], &[u8]) -> Result<()>) -> Result<()> {
        let next = match self.field {
            Field::Magic => {
                if self.buf[..DUMP_MAGIC.len()] != DUMP_MAGIC {
                    return Err(self.malformed("not a ledger dump (bad magic)"));
                }
                let version = self.buf[DUMP_MAGIC.len()];
                if version != DUMP_VERSION {
                    return Err(self.malformed(format_args!("unsupported version {version}")));
                }
                self.hasher.update(&self.buf);
                Field::KeyLen
            }
            Field::KeyLen => match u32::from_le_bytes(self.len_field()) {
                DUMP_END => Field::Checksum,
                n => {
                    let n = n as usize;
                    if !(TAG_BYTES..=DUMP_KEY_BYTES_MAX).contains(&n) {
                        return Err(self.malformed(format_args!(
                            "key length {n} is outside {TAG_BYTES}..={DUMP_KEY_BYTES_MAX}"
                        )));
                    }
                    self.hasher.update(&self.buf);
                    Field::Key(n)
                }
            },
            Field::Key(_) => {
                self.hasher.update(&self.buf);
                self.key.clear();
                self.key.extend_from_slice(&self.buf);
                Field::ValueLen
            }
            Field::ValueLen => {
                let n = u32::from_le_bytes(self.len_field()) as usize;
                if n > DUMP_VALUE_BYTES_MAX {
                    return Err(self.malformed(format_args!(
                        "value length {n} is over the limit of {DUMP_VALUE_BYTES_MAX}"
                    )));
                }
                self.hasher.update(&self.buf);
                Field::Value(n)
            }
            Field::Value(_) => {
                self.hasher.update(&self.buf);
                record(&self.key, &self.buf).map_err(|e| self.in_record(e))?;
                Field::KeyLen
            }
            Field::Checksum => {
                let expected: Hash = self.hasher.clone().finalize().into();
                if self.buf != expected {
                    return Err(self.malformed(
                        "checksum mismatch: the stream was damaged or is not one dump",
                    ));
                }
                Field::Done
            }
            Field::Done => unreachable!("nothing follows the end record"),
        };
        self.field = next;
        self.buf.clear();
        if self.buf.capacity() > PARSE_BUFFER_KEPT_BYTES {
            self.buf = Vec::new();
        }
        Ok(())
    }

    fn len_field(&self) -> [u8; 4] {
        self.buf[..].try_into().expect("a length field has 4 bytes")
    }

    /// Says where in the stream a record was refused.
    fn in_record(&self, e: Error) -> Error {
        let at =
            |what: String| format!("ledger dump, record ending at byte {}: {what}", self.offset);
        match e {
            Error::Corrupt { what } => Error::Corrupt { what: at(what) },
            Error::Missing { what } => Error::Missing { what: at(what) },
            e => e,
        }
    }

    fn malformed(&self, what: impl fmt::Display) -> Error {
        Error::corrupt(format_args!(
            "ledger dump is malformed at byte {}: {what}",
            self.offset
        ))
    }
}

/// What the records that streamed past add up to, to be checked against the summary row.
struct StateCheck {
    prev_key: Vec<u8>,
    meta: Option<LedgerMeta>,
    /// The account and reserve terms' sum and the account count, built with the summary's own
    /// arithmetic.
    accounts: LedgerMeta,
    /// Balances plus what open reserves hold.
    balance_total: u128,
    /// Expiries in the bodies: leaves with no request record.
    expiries: u64,
    requests: u64,
    request_height_max: u64,
    bodies: u64,
    headers: u64,
    header_requests: u64,
    prev_header_hash: Hash,
}

impl StateCheck {
    fn new() -> StateCheck {
        StateCheck {
            prev_key: Vec::with_capacity(DUMP_KEY_BYTES_MAX),
            meta: None,
            accounts: LedgerMeta::genesis(),
            balance_total: 0,
            expiries: 0,
            requests: 0,
            request_height_max: 0,
            bodies: 0,
            headers: 0,
            header_requests: 0,
            prev_header_hash: [0; 32],
        }
    }

    /// Adds one streamed record to the totals, checking that its key follows the one before it
    /// and that it is well formed for its table.
    fn record(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        self.follow(key)?;
        let table = Table::from_tag(&key[..TAG_BYTES]).ok_or_else(|| {
            Error::corrupt(format_args!("key {} has an unknown table tag", hex(key)))
        })?;
        match table {
            Table::Account => self.record_account(table, key, value),
            Table::Request => self.record_request(table, key, value),
            Table::Body => self.record_body(table, key, value),
            Table::Meta => self.record_meta(table, key, value),
            Table::Header => self.record_header(table, key, value),
            Table::Reserve => self.record_reserve(table, key, value).map(|_| ()),
            Table::Expiry | Table::Pending => Err(Error::corrupt(format_args!(
                "key {} belongs to the derived table {table}, which a dump leaves out",
                hex(key)
            ))),
            Table::History => record_history(table, key, value),
            Table::Receipt => {
                let _leaf: Hash = key_rest(table, key)?;
                crate::history::decode_receipt(value).map(|_| ())
            }
            Table::RaftEntry | Table::RaftState => Err(Error::corrupt(format_args!(
                "key {} belongs to the raft log's table {table}",
                hex(key)
            ))),
        }
    }

    /// Checks that `key` strictly follows the previous record's key, and remembers it.
    /// (A history row is checked by [`record_history`].)
    fn follow(&mut self, key: &[u8]) -> Result<()> {
        if key <= self.prev_key.as_slice() {
            return Err(Error::corrupt(format_args!(
                "key {} does not follow key {} (keys must strictly increase)",
                hex(key),
                hex(&self.prev_key)
            )));
        }
        self.prev_key.clear();
        self.prev_key.extend_from_slice(key);
        Ok(())
    }

    /// An account row: adds its balance to the totals.
    fn record_account(&mut self, table: Table, key: &[u8], value: &[u8]) -> Result<()> {
        let public: PublicKey = key_rest(table, key)?;
        let balance = layout::decode_account(value)?;
        self.accounts.account_changed(&public, None, balance);
        self.balance_total += u128::from(balance);
        Ok(())
    }

    /// A reserve row: adds its term and what it holds to the totals; returns it.
    fn record_reserve(&mut self, table: Table, key: &[u8], value: &[u8]) -> Result<Reserve> {
        let rest: [u8; 48] = key_rest(table, key)?;
        let owner: PublicKey = rest[..32].try_into().expect("32 bytes");
        let id = u128::from_be_bytes(rest[32..].try_into().expect("16 bytes"));
        let reserve = layout::decode_reserve(value)?;
        self.accounts.reserve_changed(&owner, id, &reserve);
        self.balance_total += u128::from(reserve.held());
        Ok(reserve)
    }

    /// A request record: counts it, and the highest height a request was applied at.
    fn record_request(&mut self, table: Table, key: &[u8], value: &[u8]) -> Result<()> {
        let _signer_and_id: [u8; 48] = key_rest(table, key)?;
        let r = layout::decode_request(value)?;
        if r.height == 0 {
            return Err(corrupt(table, "a request applied at height 0"));
        }
        self.requests += 1;
        self.request_height_max = self.request_height_max.max(r.height);
        Ok(())
    }

    /// A batch body: checks that it hashes to its key and decodes, counts it and its
    /// leader-made items (expiries and rotations: leaves without a request id).
    fn record_body(&mut self, table: Table, key: &[u8], value: &[u8]) -> Result<()> {
        let digest: Hash = key_rest(table, key)?;
        if sha256(&[value]) != digest {
            return Err(corrupt(
                table,
                format_args!("body {} does not hash to its key", hex(&digest)),
            ));
        }
        let body = BatchBody::decode(value)
            .map_err(|e| corrupt(table, format_args!("body {}: {e}", hex(&digest))))?;
        let expiries = body
            .items
            .iter()
            .filter(|i| matches!(i, BatchItem::Expire(_) | BatchItem::Rotate(_)))
            .count();
        self.expiries += expiries as u64;
        self.bodies += 1;
        Ok(())
    }

    /// The summary row (then, in key order, the operator row): decodes and keeps it for
    /// [`StateCheck::finish`].
    fn record_meta(&mut self, table: Table, key: &[u8], value: &[u8]) -> Result<()> {
        if key == layout::meta_key() {
            self.meta = Some(LedgerMeta::decode(&fixed::<META_BYTES>(table, value)?)?);
            return Ok(());
        }
        if key == layout::checkpointed_key() {
            // A threshold operator's (it sorts before the summary); checked at the reopen.
            fixed::<8>(table, value)?;
            return Ok(());
        }
        match self.meta.as_mut() {
            Some(meta) if key == layout::operator_key() => meta.decode_operator(value),
            _ => Err(corrupt(table, format_args!("unexpected key {}", hex(key)))),
        }
    }

    /// A header row: checks that it is at the next height and chains to the header before it,
    /// and adds its request count to the totals.
    fn record_header(&mut self, table: Table, key: &[u8], value: &[u8]) -> Result<()> {
        if let Some(height) = layout::checkpoint_signature_height(key) {
            // A threshold's checkpoint signature: right after its header's row.
            if height != self.headers || value.len() != 64 {
                return Err(corrupt(
                    table,
                    format_args!("a checkpoint signature row of height {height}"),
                ));
            }
            return Ok(());
        }
        let height = u64::from_be_bytes(key_rest(table, key)?);
        self.headers += 1;
        if height != self.headers {
            return Err(corrupt(
                table,
                format_args!("height {height} where {} was due", self.headers),
            ));
        }
        let signed = decode_header(height, value)?;
        if signed.header.prev_hash != self.prev_header_hash {
            return Err(corrupt(
                table,
                format_args!("header {height} does not chain to the one before it"),
            ));
        }
        self.prev_header_hash = header_hash(&signed.header);
        self.header_requests += u64::from(signed.header.request_count);
        Ok(())
    }

    /// Checks the totals against the summary row and returns it.
    fn finish(&mut self) -> Result<LedgerMeta> {
        let meta = self
            .meta
            .clone()
            .ok_or_else(|| invalid("there is no summary (meta row)"))?;
        let height = meta.height;
        if self.headers != height {
            return Err(invalid(format_args!(
                "{} headers for a summary at height {height}",
                self.headers
            )));
        }
        if self.prev_header_hash != meta.last_header_hash {
            return Err(invalid(
                "the last header does not hash to the summary's last_header_hash",
            ));
        }
        if self.bodies != height {
            return Err(invalid(format_args!(
                "{} bodies for a summary at height {height}",
                self.bodies
            )));
        }
        if self.accounts.account_count != meta.account_count {
            return Err(invalid(format_args!(
                "account_count: {} accounts, the summary says {}",
                self.accounts.account_count, meta.account_count
            )));
        }
        self.accounts.map.flush();
        if self.accounts.map.root() != meta.map.root() {
            return Err(invalid(
                "map_root: the accounts and reserves do not hash to the summary's state map root",
            ));
        }
        let Some(expected_total) = meta.total_deposited.checked_sub(meta.total_withdrawn) else {
            return Err(invalid(format_args!(
                "withdrawals {} exceed deposits {}",
                meta.total_withdrawn, meta.total_deposited
            )));
        };
        if self.balance_total != expected_total {
            let total = self.balance_total;
            return Err(invalid(format_args!(
                "balances and open reserves: {total}, deposits minus withdrawals: {expected_total}"
            )));
        }
        if self.requests + self.expiries != self.header_requests {
            return Err(invalid(format_args!(
                "{} request records and {} expiries for {} leaves in the headers",
                self.requests, self.expiries, self.header_requests
            )));
        }
        if self.request_height_max > height {
            return Err(invalid(format_args!(
                "a request record at height {}, beyond the summary's {height}",
                self.request_height_max
            )));
        }
        Ok(meta)
    }
}

/// Where the records go: the new database, in unsynced batches of about
/// [`INSTALL_BATCH_BYTES`].
struct Sink {
    state: Part,
    /// The archive database (`body` and `request` rows, see `archive.rs`).
    archive: Part,
    check: StateCheck,
    derived: Derived,
}

/// The derived rows of the `reserve` table (see [`Table::derived`]), rebuilt by an install or
/// an import: expiry keys are written as each open reserve goes by, pending amounts gathered
/// per account and written at the end.
#[derive(Default)]
pub(crate) struct Derived {
    pending: HashMap<PublicKey, (u64, u64)>,
}

impl Derived {
    /// Writes reserve `(owner, id)`'s expiry key into `state` if it is open, and counts what
    /// it holds.
    pub(crate) fn reserve(
        &mut self,
        state: &mut Part,
        owner: &PublicKey,
        id: u128,
        reserve: &Reserve,
    ) -> Result<()> {
        let Some(h) = reserve.open() else {
            return Ok(());
        };
        state.put(&layout::expiry_key(h.expires_at_ms, owner, id), &[])?;
        let overflow = || {
            corrupt(
                Table::Reserve,
                "pending amounts of one account overflow u64",
            )
        };
        let debits = &mut self.pending.entry(*owner).or_default().0;
        *debits = debits.checked_add(h.amount).ok_or_else(overflow)?;
        let credits = &mut self.pending.entry(h.to).or_default().1;
        *credits = credits.checked_add(h.amount).ok_or_else(overflow)?;
        Ok(())
    }

    /// Writes the pending rows gathered.
    pub(crate) fn finish(self, state: &mut Part) -> Result<()> {
        for (key, (debits, credits)) in self.pending {
            state.put(
                &layout::pending_key(&key),
                &layout::encode_pending(debits, credits),
            )?;
        }
        Ok(())
    }
}

/// One of the two databases of a ledger directory, with its pending unsynced batch; the
/// archive's with the body log beside it.
pub(crate) struct Part {
    db: DB,
    batch: WriteBatch,
    batch_bytes: usize,
    /// The archive's: `body` rows put go to the body log, their locators to `db`.
    bodies: Option<BodyLog>,
}

impl Part {
    pub(crate) fn open(dir: &Path, options: rusty_leveldb::Options) -> Result<Part> {
        let db = DB::open(dir, options)
            .map_err(|e| io_error(format_args!("creating {}", dir.display()), e))?;
        Ok(Part {
            db,
            bodies: None,
            batch: WriteBatch::default(),
            batch_bytes: 0,
        })
    }

    /// The archive database of the ledger in `ledger`, with its body log.
    pub(crate) fn open_archive(ledger: &Path, options: rusty_leveldb::Options) -> Result<Part> {
        let mut part = Part::open(&archive_dir(ledger), options)?;
        part.bodies = Some(BodyLog::open(&bodies_dir(ledger))?);
        Ok(part)
    }

    pub(crate) fn put(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        let located;
        let value = match &mut self.bodies {
            Some(bodies) if key.starts_with(&Table::Body.tag()) => {
                located = bodies.append(value)?.encode();
                &located[..]
            }
            _ => value,
        };
        self.batch.put(key, value);
        self.batch_bytes += key.len() + value.len();
        if self.batch_bytes >= INSTALL_BATCH_BYTES {
            self.write()?;
        }
        Ok(())
    }

    /// A row already written (not one still in the pending batch).
    pub(crate) fn get(&mut self, key: &[u8]) -> Option<Vec<u8>> {
        self.db.get(key).map(|b| b.to_vec())
    }

    /// Writes the pending batch (unsynced), so that [`Part::get`] sees it.
    pub(crate) fn write_pending(&mut self) -> Result<()> {
        self.write()
    }

    fn write(&mut self) -> Result<()> {
        if self.batch_bytes == 0 {
            return Ok(());
        }
        let batch = mem::take(&mut self.batch);
        self.batch_bytes = 0;
        self.db
            .write(batch, false)
            .map_err(|e| io_error("writing the installed ledger", e))
    }

    /// Writes what is pending, syncs (the body log first) and closes.
    pub(crate) fn finish(mut self) -> Result<()> {
        if let Some(bodies) = &mut self.bodies {
            bodies.sync()?;
        }
        self.write()?;
        self.db
            .flush()
            .map_err(|e| io_error("syncing the installed ledger", e))?;
        self.db
            .close()
            .map_err(|e| io_error("closing the installed ledger", e))
    }
}

impl Sink {
    fn record(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        if key.starts_with(&layout::HISTORY_V1_TAG) {
            // A dump from a replica before `history` v2: its history rows are left out, and
            // without a v2 history start the installed ledger holds history from the height
            // after the dump's, as with a dump from before history.
            return Ok(());
        }
        self.check.record(key, value)?;
        // `check.record` has checked the tag, and a reserve row's key and value.
        let table = Table::from_tag(&key[..TAG_BYTES]).expect("a known table");
        if table == Table::Reserve {
            let owner: PublicKey = key[TAG_BYTES..TAG_BYTES + 32].try_into().expect("32");
            let id = u128::from_be_bytes(key[TAG_BYTES + 32..].try_into().expect("16"));
            let reserve = layout::decode_reserve(value)?;
            self.derived
                .reserve(&mut self.state, &owner, id, &reserve)?;
        }
        if table.in_archive() {
            self.archive.put(key, value)
        } else {
            self.state.put(key, value)
        }
    }
}

/// Builds a ledger database from a dump stream in a new directory and checks it (see the module
/// docs). On any error the directory is garbage: the caller deletes it.
pub struct LedgerInstaller {
    dir: PathBuf,
    opts: StoreOptions,
    parser: StreamParser,
    sink: Sink,
    /// Set when a push failed: the stream cannot be resumed.
    failed: Option<String>,
}

impl LedgerInstaller {
    /// Creates a database in `dir`, which must not exist or be empty. For a swap with
    /// [`install_ledger_dir`], `dir` is [`staged_ledger_dir`] of the live directory.
    pub fn create(dir: &Path, opts: StoreOptions) -> Result<LedgerInstaller> {
        assert!(
            opts.write_buffer_bytes > 0
                && opts.state_write_buffer_bytes > 0
                && opts.state_table_bytes > 0
                && opts.block_cache_bytes > 0,
            "{opts:?}"
        );
        require_empty(dir, "install")?;
        let state = Part::open(dir, state_leveldb_options(&opts, SyncEnv::new()))?;
        let archive = Part::open_archive(dir, leveldb_options(&opts, SyncEnv::new()))?;
        Ok(LedgerInstaller {
            dir: dir.to_owned(),
            opts,
            parser: StreamParser::new(),
            sink: Sink {
                state,
                archive,
                check: StateCheck::new(),
                derived: Derived::default(),
            },
            failed: None,
        })
    }

    /// Consumes the next chunk of the stream, which may end anywhere. After an error the
    /// installer refuses every call.
    pub fn push(&mut self, chunk: &[u8]) -> Result<()> {
        self.check_usable()?;
        let LedgerInstaller { parser, sink, .. } = self;
        let result = parser.push(chunk, &mut |key, value| sink.record(key, value));
        if let Err(e) = &result {
            self.failed = Some(e.to_string());
        }
        result
    }

    /// Requires the whole stream, syncs and closes the database, checks it (see the module docs)
    /// and marks the directory complete. Returns the installed ledger's summary. `operator` is
    /// the genesis operator key: the tip must verify under the key its key chain leads to.
    pub fn finish(self, operator: &PublicKey) -> Result<LedgerMeta> {
        self.check_usable()?;
        let LedgerInstaller {
            dir,
            opts,
            parser,
            mut sink,
            ..
        } = self;
        if parser.field != Field::Done {
            return Err(Error::corrupt(format_args!(
                "ledger dump is truncated: it stops at byte {} without its end record",
                parser.offset
            )));
        }
        let meta = sink.check.finish()?;
        // The archive holds every batch of the dump.
        let point = ArchivePoint {
            height: meta.height,
            raft_index: meta.raft_index,
        };
        sink.archive
            .put(&layout::archive_point_key(), &point.encode())?;
        sink.derived.finish(&mut sink.state)?;
        sink.archive.finish()?;
        sink.state.finish()?;

        // Read back through the code that opens a live ledger: it checks the tip against the
        // summary.
        let mut db = LedgerDb::open(&dir, opts)?;
        let stored = db.meta()?;
        if stored != meta {
            return Err(invalid(
                "the summary read back differs from the one streamed",
            ));
        }
        // The newest signed header: the tip, but on a threshold operator's ledger, whose
        // newest headers may wait for their signatures (each replica signs only headers it
        // applied itself, never installed ones).
        let signed = db.signed_through()?;
        if signed > 0 {
            let tip = db
                .header(signed)?
                .ok_or_else(|| invalid(format_args!("no header at height {signed}")))?;
            let links = key_chain::links(&mut db, &meta)?;
            KeySchedule::follow(*operator, &links)
                .and_then(|schedule| schedule.verify_header(&tip))
                .map_err(|e| {
                    invalid(format_args!(
                        "header {signed} does not verify under the operator key chain: {e}"
                    ))
                })?;
        }
        db.close()?;
        write_complete_marker(&dir)?;
        Ok(meta)
    }

    fn check_usable(&self) -> Result<()> {
        match &self.failed {
            None => Ok(()),
            Some(e) => Err(Error::io("an earlier chunk of the ledger dump failed", e)),
        }
    }
}

/// `<live>.staged`: where an install builds the next ledger directory.
pub fn staged_ledger_dir(live: &Path) -> PathBuf {
    sibling(live, ".staged")
}

/// `<live>.old`: where the replaced ledger directory waits for deletion during a swap.
pub fn old_ledger_dir(live: &Path) -> PathBuf {
    sibling(live, ".old")
}

/// Replaces the ledger directory `live` by `staged`, which must be [`staged_ledger_dir`]`(live)`
/// and complete ([`LedgerInstaller::finish`] succeeded). The [`LedgerDb`] in `live` must be
/// closed first. A crash anywhere in here is finished by [`recover_install`].
pub fn install_ledger_dir(live: &Path, staged: &Path) -> Result<()> {
    assert_eq!(
        staged,
        staged_ledger_dir(live),
        "recover_install only knows the staged directory by its name"
    );
    if !exists(&staged.join(COMPLETE_MARKER))? {
        return Err(Error::missing(format_args!(
            "the complete marker in {}: it is not a complete ledger install",
            staged.display()
        )));
    }
    let old = old_ledger_dir(live);
    let parent = parent_dir(live);
    if exists(live)? {
        if exists(&old)? {
            remove_dir(&old)?;
        }
        rename(live, &old)?;
        sync_dir(&parent)?;
    }
    rename(staged, live)?;
    sync_dir(&parent)?;
    tidy(live)?;
    if exists(&old)? {
        remove_dir(&old)?;
        sync_dir(&parent)?;
    }
    Ok(())
}

/// Finishes a swap of [`install_ledger_dir`] that a crash interrupted, leaving `live` holding
/// either the old ledger or the complete new one, and no leftovers. Call it before opening the
/// ledger in `live` and before any [`LedgerInstaller`] starts on `<live>.staged`.
///
/// - `live` missing: a complete `<live>.staged` is renamed to `live`; else `<live>.old`, if any,
///   is renamed back (with neither, `live` stays missing: a new node).
/// - Then `<live>.old` and `<live>.staged` are deleted, complete or not.
pub fn recover_install(live: &Path) -> Result<()> {
    let staged = staged_ledger_dir(live);
    let old = old_ledger_dir(live);
    let parent = parent_dir(live);
    if !exists(live)? {
        if exists(&staged.join(COMPLETE_MARKER))? {
            rename(&staged, live)?;
            sync_dir(&parent)?;
        } else if exists(&old)? {
            rename(&old, live)?;
            sync_dir(&parent)?;
        }
    }
    let mut removed = false;
    for leftover in [&old, &staged] {
        if exists(leftover)? {
            remove_dir(leftover)?;
            removed = true;
        }
    }
    if removed {
        sync_dir(&parent)?;
    }
    if exists(live)? {
        tidy(live)?;
    }
    Ok(())
}

/// An installed directory keeps no marker: it is a plain ledger directory again.
fn tidy(live: &Path) -> Result<()> {
    let marker = live.join(COMPLETE_MARKER);
    if exists(&marker)? {
        fs::remove_file(&marker).map_err(|e| fs_error("removing", &marker, e))?;
        sync_dir(live)?;
    }
    Ok(())
}

pub(crate) fn write_complete_marker(dir: &Path) -> Result<()> {
    let path = dir.join(COMPLETE_MARKER);
    let mut f = File::create(&path).map_err(|e| fs_error("creating", &path, e))?;
    f.write_all(b"tally ledger install: complete and checked\n")
        .and_then(|()| f.sync_all())
        .map_err(|e| fs_error("writing", &path, e))?;
    sync_dir(dir)
}

fn sibling(live: &Path, suffix: &str) -> PathBuf {
    assert!(
        live.file_name().is_some(),
        "the ledger directory {} needs a name",
        live.display()
    );
    let mut name = live.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

fn exists(path: &Path) -> Result<bool> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(fs_error("inspecting", path, e)),
    }
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    fs::rename(from, to).map_err(|e| {
        Error::io(
            format_args!("renaming {} to {}", from.display(), to.display()),
            e,
        )
    })
}

fn remove_dir(path: &Path) -> Result<()> {
    fs::remove_dir_all(path).map_err(|e| fs_error("removing", path, e))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| fs_error("syncing directory", dir, e))
}

/// The suffix of `key` after its tag, which must have `N` bytes.
fn invalid(what: impl fmt::Display) -> Error {
    Error::corrupt(format_args!("installed ledger does not check out: {what}"))
}

/// A ledger is only ever built in a directory that is empty or absent (`what`: the verb).
pub(crate) fn require_empty(dir: &Path, what: &str) -> Result<()> {
    let empty = match fs::read_dir(dir) {
        Ok(mut entries) => entries.next().is_none(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => true,
        Err(e) => return Err(fs_error("reading", dir, e)),
    };
    if !empty {
        return Err(Error::Config(format!(
            "cannot {what} a ledger into {}: the directory is not empty",
            dir.display()
        )));
    }
    Ok(())
}

fn fs_error(what: &str, path: &Path, e: io::Error) -> Error {
    Error::io(format_args!("{what} {}", path.display()), e)
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        write!(s, "{b:02x}").expect("writing to a String");
    }
    s
}

/// A history row or head (its account and row number in the key) or the history start: each
/// must decode.
fn record_history(table: Table, key: &[u8], value: &[u8]) -> Result<()> {
    if key == layout::history_held_from_key() {
        return crate::history::decode_held_from(value).map(|_| ());
    }
    let rest: [u8; 40] = key_rest(table, key)?;
    let account: PublicKey = rest[..32].try_into().expect("32");
    match u64::from_be_bytes(rest[32..].try_into().expect("8")) {
        0 => crate::history::decode_head(value).map(|_| ()),
        _ => crate::history::decode_row(&account, value).map(|_| ()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dump(records: &[(&[u8], &[u8])], chunk_bytes_max: usize) -> Vec<Vec<u8>> {
        let mut chunks = Vec::new();
        let mut w = DumpWriter::new(chunk_bytes_max, |c| {
            chunks.push(c);
            Ok(())
        })
        .unwrap();
        for (k, v) in records {
            w.record(k, v).unwrap();
        }
        w.finish().unwrap();
        chunks
    }

    type Records = Vec<(Vec<u8>, Vec<u8>)>;

    fn parse(stream: &[u8], piece_bytes: usize) -> Result<(Records, bool)> {
        let mut p = StreamParser::new();
        let mut out = Vec::new();
        for piece in stream.chunks(piece_bytes) {
            p.push(piece, &mut |k, v| {
                out.push((k.to_vec(), v.to_vec()));
                Ok(())
            })?;
        }
        Ok((out, p.field == Field::Done))
    }

    #[test]
    fn writer_and_parser_agree_at_every_chunk_size() {
        let big = vec![7u8; 3000];
        let records: [(&[u8], &[u8]); 3] = [(b"abcd", b""), (b"abcde", &big), (b"zzzz", b"v")];
        let whole = dump(&records, usize::MAX).concat();
        assert_eq!(&whole[..5], b"TLYD\x01");
        let body_bytes = 5 + (8 + 4) + (8 + 5 + 3000) + (8 + 4 + 1);
        assert_eq!(whole.len(), body_bytes + 4 + 32);
        assert_eq!(&whole[body_bytes..body_bytes + 4], &[0xff; 4]);
        assert_eq!(&whole[body_bytes + 4..], &sha256(&[&whole[..body_bytes]]));
        for size in [1, 2, 3, 4, 5, 7, 100, 1000, whole.len(), whole.len() + 1] {
            let chunks = dump(&records, size);
            assert_eq!(chunks.concat(), whole, "chunk size {size}");
            let (last, full) = chunks.split_last().unwrap();
            assert!(full.iter().all(|c| c.len() == size), "chunk size {size}");
            assert!(!last.is_empty() && last.len() <= size);
            let (parsed, done) = parse(&whole, size).unwrap();
            assert!(done);
            let expected: Vec<_> = records
                .iter()
                .map(|(k, v)| (k.to_vec(), v.to_vec()))
                .collect();
            assert_eq!(parsed, expected);
        }
    }

    #[test]
    fn parser_rejects_bad_framing_before_buffering() {
        let check = |stream: &[u8], expected: &str| {
            let e = parse(stream, 3).unwrap_err().to_string();
            assert!(e.contains(expected), "{e:?} should contain {expected:?}");
        };
        check(b"TLYX\x01", "bad magic");
        check(b"TLYD\x02", "unsupported version 2");
        check(b"TLYD\x01\x03\0\0\0", "key length 3");
        check(b"TLYD\x01\x41\0\0\0", "key length 65");
        check(
            b"TLYD\x01\x04\0\0\0abcd\x01\0\0\x04",
            "value length 67108865",
        );
        let mut trailing = dump(&[], 100).concat();
        trailing.push(0);
        check(&trailing, "bytes follow the end record");
        let mut damaged = dump(&[(b"abcd", b"xyz")], 100).concat();
        damaged[18] ^= 1;
        check(&damaged, "checksum mismatch");
        let (_, done) = parse(&dump(&[], 100).concat()[..40], 1).unwrap();
        assert!(!done, "a stream without its end record is not done");
    }
}
