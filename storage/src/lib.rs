//! tally-storage: the ledger's durable state in LevelDB (rusty-leveldb), the raft log's in
//! segment files of its own.
//!
//! - [`LedgerDb`]: core's [`LedgerRead`](tally_core::ports::LedgerRead) and
//!   [`LedgerStore`](tally_core::ports::LedgerStore) ports, in two LevelDB databases. A committed
//!   batch's state is applied in one atomic, synced write to the state database (`<ledger>`):
//!   accounts, the signed header, the body's height index (its digest) and the ledger summary.
//!   Its body and request records go to the archive database (`<ledger>/archive`), written
//!   behind by a thread of its own (see `archive.rs`), so that the archive's long compactions
//!   never hold a confirmation back; until the archive holds them they are answered from
//!   memory, and after a crash they are rebuilt from the raft log ([`LedgerDb::rearchive`]).
//! - [`RaftLogDb`]: raft-rs's [`Storage`](raft::Storage) and core's
//!   [`RaftLogStore`](tally_core::replica::RaftLogStore) in files of their own (the server
//!   keeps them in `<data_dir>/raft`, next to the ledger's `<data_dir>/ledger`): the log in
//!   segments appended to and dropped whole at compaction, the hard and conf states, and the
//!   snapshot point with the server's descriptor of the ledger at it (`raft_log.rs`, format in
//!   `raft_files.rs`). Every change is one synced write. A LevelDB raft log of an earlier
//!   tally (`raft_log_leveldb.rs`) is rewritten at open.
//! - [`SyncEnv`]: the file layer under the LevelDB databases, which makes its "flush" mean fsync.
//! - [`layout`]: the tables and their key and value encodings.
//! - [`transfer`]: a whole ledger as a chunked byte stream ([`LedgerDb::dump`]), rebuilt and
//!   checked in a new directory ([`LedgerInstaller`]) and swapped in for the live one
//!   ([`install_ledger_dir`], [`recover_install`]): how a replica far behind catches up.
//! - [`LedgerImport`]: a ledger built from verified archive history and a signed state
//!   snapshot without replaying it (`tally-server restore`).
//! - [`bucket`], [`archiver`], [`archive_read`], [`snapshots`]: the archive in object storage.
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
//! | `header` v2         | `501486d3` | height u64 BE (8)             | signed header (256) ‖ body digest (32)             |
//! | `header` v2         | `501486d3` | height u64 BE (8) ‖ `b"t"`    | the header log's nodes appending this height completes, level 0 first (32 each; `header_log.rs`; derived) |
//! | `body` v1           | `758125ba` | SHA-256 of the body (32)      | encoded batch body (`BatchBody::encode`)           |
//! | `request` v1        | `949b6803` | signer (32) ‖ id u128 BE (16) | height u64 LE ‖ index u32 LE ‖ request hash (44)   |
//! | `reserve` v1        | `6fc17801` | owner (32) ‖ id u128 BE (16)  | `Reserve::encode`: state u8 (1 open, 2 posted, 3 voided, 4 expired), for an open one ‖ to (32) ‖ party (32) ‖ amount u64 LE ‖ expires_at_ms u64 LE |
//! | `expiry` v1         | `4bb064a3` | expires_at_ms u64 BE (8) ‖ owner (32) ‖ id u128 BE (16) | empty; present exactly while the reserve is open (derived) |
//! | `pending` v1        | `19393f70` | account (32)                  | pending debits u64 LE ‖ pending credits u64 LE (16); absent when both are 0 (derived) |
//! | `meta` v1           | `d8a7af8d` | `b"ledger"` (6)               | `LedgerMeta::encode` (120)                         |
//! | `meta` v1           | `d8a7af8d` | `b"open"` (4)                 | never present: deleted at each open (see caveats)  |
//! | `meta` v1           | `d8a7af8d` | `b"archive"` (7)              | archive point: height u64 LE ‖ raft index u64 LE   |
//! | `history` v2        | `06a77c34` | account (32) ‖ row number u64 BE (8) | the account's entries in one batch (52 + 118·n, `history.rs`): rows 1, 2, ... in apply order; 0 its head (56) |
//! | `history` v2        | `06a77c34` | `b"held_from"` (9)            | oldest height whose history is held, u64 LE        |
//! | `receipt` v1        | `42396e5c` | receipt leaf hash (32)        | height u64 LE ‖ leaf index u32 LE (12)             |
//! | `raft_entry` v1     | `92b84dfb` | index u64 BE (8)              | `raft::eraftpb::Entry` protobuf                    |
//! | `raft_entry` v1     | `92b84dfb` | index u64 BE (8) ‖ `b"h"`     | `HardState` protobuf, written with the log ending at index; the highest key is the newest |
//! | `raft_state` v2     | `bd94612d` | `b"conf"` (4)                 | `ConfState` protobuf                               |
//! | `raft_state` v2     | `bd94612d` | `b"snap"` (4)                 | index u64 LE ‖ term u64 LE ‖ descriptor (16 + n)   |
//! | `raft_state` v2     | `bd94612d` | `b"open"` (4)                 | never present, like the ledger's                   |
//!
//! Older layouts, rewritten at open: `header` v1 (`d95604df`, the signed header alone) and
//! `body_by_height` v1 (`78d7f608`, height → body digest) become `header` v2; the `raft_state`
//! rows `b"hard"` and `b"last"` become the hard state row at the last index; `raft_state` v1
//! (`43c7c0c0`) becomes v2. Each change keeps rows written once in key order out of the key
//! range of rows rewritten beside them: LevelDB's tables of new rows then never span old ones
//! (see `Table::version`).
//!
//! The `raft_*` tables live in the raft log's database; `body`, `request`, `history`,
//! `receipt` and the `archive` point in the ledger's archive database; the others in the ledger's state database. A dump
//! ([`transfer`]) interleaves the two ledger databases in key order and leaves out the archive
//! point, which an install writes.
//! `account`, `header`, `request` and `reserve` are intent-addressed (keyed by what the value is
//! about); `body` is content-addressed (keyed by the value's digest). `expiry` and `pending` are
//! derived from the open reserves, written by the same `apply` as the `reserve` rows: an open
//! reserve's owner has its amount in pending debits, its receiver in pending credits. A dump
//! leaves them out and an install or an import rebuilds them ([`layout::Table::derived`]). The
//! header log rows (`header` tag, key ending in `b"t"`) are derived from the headers the same way,
//! left out of dumps and rebuilt at open (`header_log.rs`).
//! The only ledger keys ever deleted are theirs (a reserve closes, a renewal moves its
//! deadline, an account's pending amounts return to 0); closed reserves stay as tombstones.
//! Raft entries are deleted when the log is compacted or a conflicting suffix is replaced.
//!
//! # Durability
//!
//! `LedgerDb::apply` writes with `sync = true`, which [`SyncEnv`] turns into `fdatasync` on the
//! write-ahead log; manifests, table files and `CURRENT` are synced too, and so are the
//! directories they live in. A value that does not decode (wrong length, bad header) is reported
//! as [`tally_core::Error::Corrupt`] naming its table, never a panic; at open, the summary is
//! checked against the last header and body. A failed read or write is `Io`, an absent row that
//! must exist `Missing`, a thread that is gone `Stopped`, settings that do not fit what is on
//! disk `Config`. Every one of them means the same thing to a replica, "stop"
//! ([`tally_core::Error::disposition`]), so this crate returns `tally_core::Error` instead of
//! defining an error type of its own.
//!
//! # Caveats
//!
//! - rusty-leveldb's `DB` is built on `Rc`: [`LedgerDb`] is not `Send` and must be opened on
//!   the thread that owns it.
//! - Compactions (memtable flushes and level merges) run inline, inside the write that
//!   triggers them, so some writes take much longer than others; a larger
//!   [`StoreOptions::write_buffer_bytes`] makes them rarer and bigger. The bulky, random-keyed
//!   tables (`body`, `request`) are in the archive for that reason: their merges run on the
//!   archive thread.
//! - rusty-leveldb 4.0.2's `Table::get` takes a lookup key equal to its block's index key for
//!   absent. That happens to the newest entry when it sits in a table at a block boundary between
//!   two versions of its key, as the summary row does after recovery has written the log into a
//!   table: after a crash, the ledger could read as empty. `LedgerDb::open` writes (deletes the
//!   `open` marker) before its first read, which moves the lookup sequence number past every
//!   entry in a table; a unit test pins the upstream behaviour, and the crash test catches a
//!   regression. Possibly the same bug as dermesser/leveldb-rs#58. The LevelDB raft log's open
//!   did the same (its hard state and last-index rows have a version per write).
//! - rusty-leveldb's `get` and `get_at` read a table they could not read as "not found" (and
//!   may then answer an older version from a lower level). Every point read of `LedgerDb`
//!   (state and history) goes through `env::get_checked`, which tells them
//!   apart by the env's count of table files that failed to open or read, read short, or hold a
//!   block whose CRC-32C does not match (the env checks every block it reads again, since
//!   rusty-leveldb's own check ends in an error `get` drops). Iterators and compactions skip a
//!   block they cannot read without an error: a compaction then writes its output without that
//!   block's rows. The env counts those reads too, but nothing stops the node on them yet.
//! - rusty-leveldb stops reading a log at its first bad record and would append after it if it
//!   reused the file; both databases turn off log and manifest reuse, so every open writes the
//!   recovered log into a table and starts new files.
//! - A failed write may already be visible in rusty-leveldb's memtable; after one, `LedgerDb`
//!   refuses every call until it is reopened. So does `RaftLogDb` (what a failed append left in
//!   its segment is not known).
//! - Directory fsync assumes a Unix file system.
//! - The open reserves' deadlines are also kept in memory (about 100 bytes each), read from the
//!   `expiry` table at open: "the first n by deadline" needs an iterator, and the state
//!   database is read with point reads only (see `ledger::reopen_fresh`). The scans at open
//!   (accounts, pending amounts, expiries) are followed by a fresh handle for the same reason.
//! - A crash while a ledger install swaps directories can leave `<live>` missing next to
//!   `<live>.old` or `<live>.staged`: the server must call [`recover_install`] before
//!   [`LedgerDb::open`], which knows nothing of installs.
//! - `RaftLogDb::set_commit` only updates memory (raft-rs reports commits after the write that
//!   made them possible); after a crash the durable commit may be behind what the ledger applied.
//! - `RaftLogDb` serves raft's reads of its newest entries from memory (up to
//!   [`StoreOptions::raft_tail_bytes`]); older ones are read back from the segments. It keeps
//!   each entry's position and term in memory (32 bytes per entry, a `Locator`), and opening reads every
//!   segment once to check its CRCs and find them.
//! - A damaged record at the very end of the newest segment is taken for a write a crash cut
//!   short and dropped (it was never acknowledged); a bit flip there in a synced record is
//!   indistinguishable from one and loses that write. Elsewhere it is corruption.

mod archive;
pub mod archive_read;
pub mod archiver;
pub mod bodies;
pub mod bucket;
mod env;
mod filter;
mod header_log;
mod history;
mod import;
pub mod layout;
mod ledger;
mod raft_files;
mod raft_log;
mod raft_log_leveldb;
mod runs;
pub mod snapshots;
pub mod transfer;

pub use env::{SyncEnv, SyncStats};
pub use import::LedgerImport;
pub use ledger::{
    archive_dir, FilterOrigin, LedgerDb, RequestLookups, StoreOptions, ARCHIVE_LAG_BATCHES_MAX,
    ARCHIVE_LAG_BYTES_MAX, PENDING_RECORD_BYTES, STAGED_TABLE_FILES_OPEN_MAX, TABLE_FILES_OPEN_MAX,
};
pub use raft_log::{RaftLogDb, RAFT_LOG_FILES_OPEN_MAX, SEGMENT_BYTES};

/// The archive thread's files outside LevelDB open at once, at most: the body log's and the
/// sorted runs'.
pub const ARCHIVE_FILES_OPEN_MAX: usize = bodies::FILES_OPEN_MAX + runs::FILES_OPEN_MAX;
/// The raft log as earlier tallies kept it in LevelDB: opened only to rewrite it
/// ([`RaftLogDb::open`] does), and by tests that make one.
#[doc(hidden)]
pub use raft_log_leveldb::LevelDbRaftLog;
pub use transfer::{install_ledger_dir, recover_install, staged_ledger_dir, LedgerInstaller};
