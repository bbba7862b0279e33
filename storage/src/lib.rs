//! tally-storage: the ledger's durable state in LevelDB (rusty-leveldb).
//!
//! - [`LedgerDb`]: core's [`LedgerRead`](tally_core::ports::LedgerRead) and
//!   [`LedgerStore`](tally_core::ports::LedgerStore) ports. A committed batch is applied in one
//!   atomic, synced LevelDB write holding every key it changes: accounts, request records, the
//!   signed header, the body, the body's height index and the ledger summary.
//! - [`SyncEnv`]: the file layer under it, which makes LevelDB's "flush" mean fsync.
//! - [`layout`]: the tables and their key and value encodings.
//!
//! # Key layout
//!
//! Every key starts with a 4-byte table tag: the first 4 bytes of
//! `SHA-256("tally/table/<name>/v<version>")`. Integers in keys are big-endian, so that keys sort
//! in numeric order; integers in values are little-endian, like the wire format.
//!
//! | table               | tag        | key after the tag             | value                                              |
//! |---------------------|------------|-------------------------------|----------------------------------------------------|
//! | `account` v1        | `92f44278` | public key (32)               | balance u64 LE (8)                                 |
//! | `header` v1         | `d95604df` | height u64 BE (8)             | signed header (256): header (192) ‖ signature (64) |
//! | `body` v1           | `758125ba` | SHA-256 of the body (32)      | encoded batch body (`BatchBody::encode`)           |
//! | `body_by_height` v1 | `78d7f608` | height u64 BE (8)             | body digest (32)                                   |
//! | `request` v1        | `949b6803` | signer (32) ‖ id u128 BE (16) | height u64 LE ‖ index u32 LE ‖ request hash (44)   |
//! | `meta` v1           | `d8a7af8d` | `b"ledger"` (6)               | `LedgerMeta::encode` (112)                         |
//! | `meta` v1           | `d8a7af8d` | `b"open"` (4)                 | never present: deleted at each open (see caveats)  |
//!
//! `account`, `header` and `request` are intent-addressed (keyed by what the value is about);
//! `body` is content-addressed (keyed by the value's digest). No stored key is ever deleted.
//!
//! # Durability
//!
//! `LedgerDb::apply` writes with `sync = true`, which [`SyncEnv`] turns into `fdatasync` on the
//! write-ahead log; manifests, table files and `CURRENT` are synced too, and so are the
//! directories they live in. A value that does not decode (wrong length, bad header) is reported
//! as [`tally_core::Error::Storage`] naming its table, never a panic; at open, the summary is
//! checked against the last header and body. Every error here means the same thing to the caller,
//! "stop the node", so this crate returns `tally_core::Error::Storage` instead of defining an
//! error type of its own.
//!
//! # Caveats
//!
//! - rusty-leveldb's `DB` is built on `Rc`: [`LedgerDb`] is not `Send` and must be opened on the
//!   thread that owns it.
//! - Compactions (memtable flushes and level merges) run inline, inside the `apply` that
//!   triggers them, so some applies take much longer than others; a larger
//!   [`StoreOptions::write_buffer_bytes`] makes them rarer and bigger.
//! - rusty-leveldb 4.0.2's `Table::get` takes a lookup key equal to its block's index key for
//!   absent. That happens to the newest entry when it sits in a table at a block boundary between
//!   two versions of its key, as the summary row does after recovery has written the log into a
//!   table: after a crash, the ledger could read as empty. `LedgerDb::open` writes (deletes the
//!   `open` marker) before its first read, which moves the lookup sequence number past every
//!   entry in a table; a unit test pins the upstream behaviour, and the crash test catches a
//!   regression. Possibly the same bug as dermesser/leveldb-rs#58.
//! - rusty-leveldb's `get` turns an error reading a table file into "not found". An unreadable
//!   table can therefore look like a missing account or request rather than an IO error.
//! - rusty-leveldb stops reading a log at its first bad record and would append after it if it
//!   reused the file; `LedgerDb` turns off log and manifest reuse, so every open writes the
//!   recovered log into a table and starts new files.
//! - A failed write may already be visible in rusty-leveldb's memtable; after one, `LedgerDb`
//!   refuses every call until it is reopened.
//! - Directory fsync assumes a Unix file system.
//! - Raft's log and hard state are not stored here yet.

mod env;
pub mod layout;
mod ledger;

pub use env::{SyncEnv, SyncStats};
pub use ledger::{LedgerDb, StoreOptions};
