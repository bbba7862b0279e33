//! State snapshots in the archive: the accounts and the request index (exactly-once state) at
//! a height, as content-addressed chunks named by a manifest.
//!
//! - A **differential** snapshot at height `S` holds the rows that batches `B+1..=S` changed,
//!   `B` being the snapshot before it (its `base`): each touched account's balance at `S`, and
//!   each request applied, with where it was applied (height, index, request hash). Its size
//!   follows the change, not the ledger.
//! - A **full** snapshot holds every row at `S` (`base` 0). The first snapshot of an archive is
//!   full: its base is the empty ledger.
//! - The state at `S` is the newest full snapshot at or below `S`, then every differential one
//!   after it in height order, later rows replacing earlier ones. Together with the totals in
//!   the manifest it gives the header's state digest at `S` ([`crate::state::LedgerMeta`]).
//!
//! Rows are fixed-size records; a chunk is rows back to back, stored under the SHA-256 of its
//! bytes, so a chunk that two snapshots share is stored once. Rows derive from batch bodies
//! alone (receipts carry the balances after each request), so the writer needs no state.

use std::collections::{BTreeMap, HashMap};

use tally_wire::{Hash, Op, PublicKey};

use ed25519_dalek::SigningKey;

use crate::batch::{BatchBody, BatchItem};
use crate::crypto::sha256;
use crate::reserve::{Held, Reserve, HELD_BYTES};
use crate::tlog::{origin_for, sign_note};
use crate::{Error, Result};

/// Prefix of the manifests: `snapshot/<height, 20 digits>`.
pub const MANIFEST_PREFIX: &str = "snapshot/";
/// Prefix of the chunks: `chunk/<SHA-256 of the chunk, hex>`.
pub const CHUNK_PREFIX: &str = "chunk/";
/// Rows per chunk at most.
pub const CHUNK_ROWS_MAX: usize = 16_384;
const MANIFEST_MAGIC: &str = "tally-snapshot 3";
/// Manifests written before reserves: no `reserves` line (read as 0).
const MANIFEST_MAGIC_2: &str = "tally-snapshot 2";
const TAG_ACCOUNT: u8 = 1;
const TAG_REQUEST: u8 = 2;
const TAG_RESERVE: u8 = 3;
/// tag ‖ public key ‖ balance u64 LE
pub const ACCOUNT_ROW_BYTES: usize = 1 + 32 + 8;
/// tag ‖ signer ‖ id u128 BE ‖ height u64 LE ‖ index u32 LE ‖ request hash
pub const REQUEST_ROW_BYTES: usize = 1 + 32 + 16 + 8 + 4 + 32;
/// tag ‖ owner ‖ id u128 BE ‖ state u8 ‖ held (80, zero unless open): see [`Reserve::encode`]
pub const RESERVE_ROW_BYTES: usize = 1 + 32 + 16 + 1 + HELD_BYTES;

pub fn manifest_key(height: u64) -> String {
    format!("{MANIFEST_PREFIX}{height:020}")
}

pub fn parse_manifest_key(key: &str) -> Option<u64> {
    let digits = key.strip_prefix(MANIFEST_PREFIX)?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

pub fn chunk_key(hash: &Hash) -> String {
    format!("{CHUNK_PREFIX}{}", hex::encode(hash))
}

/// Where a request was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestAt {
    pub height: u64,
    pub index: u32,
    pub request_hash: Hash,
}

/// One row of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Row {
    Account {
        key: PublicKey,
        balance: u64,
    },
    Request {
        signer: PublicKey,
        id: u128,
        at: RequestAt,
    },
    Reserve {
        owner: PublicKey,
        id: u128,
        reserve: Reserve,
    },
}

impl Row {
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Row::Account { key, balance } => {
                out.push(TAG_ACCOUNT);
                out.extend_from_slice(key);
                out.extend_from_slice(&balance.to_le_bytes());
            }
            Row::Request { signer, id, at } => {
                out.push(TAG_REQUEST);
                out.extend_from_slice(signer);
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&at.height.to_le_bytes());
                out.extend_from_slice(&at.index.to_le_bytes());
                out.extend_from_slice(&at.request_hash);
            }
            Row::Reserve { owner, id, reserve } => {
                out.push(TAG_RESERVE);
                out.extend_from_slice(owner);
                out.extend_from_slice(&id.to_be_bytes());
                let mut record = reserve.encode();
                record.resize(1 + HELD_BYTES, 0);
                out.extend_from_slice(&record);
            }
        }
    }
}

/// Decodes a chunk's rows.
pub fn decode_chunk(bytes: &[u8]) -> Result<Vec<Row>> {
    let bad = |why: &str| Error::Verify(format!("snapshot chunk: {why}"));
    let mut rows = Vec::new();
    let mut rest = bytes;
    while let Some(&tag) = rest.first() {
        let len = match tag {
            TAG_ACCOUNT => ACCOUNT_ROW_BYTES,
            TAG_REQUEST => REQUEST_ROW_BYTES,
            TAG_RESERVE => RESERVE_ROW_BYTES,
            _ => return Err(bad("unknown row tag")),
        };
        if rest.len() < len {
            return Err(bad("truncated row"));
        }
        let (row, tail) = rest.split_at(len);
        rows.push(decode_row(row)?);
        rest = tail;
    }
    Ok(rows)
}

fn decode_row(row: &[u8]) -> Result<Row> {
    let key: PublicKey = row[1..33].try_into().expect("32");
    if row[0] == TAG_ACCOUNT {
        return Ok(Row::Account {
            key,
            balance: u64::from_le_bytes(row[33..41].try_into().expect("8")),
        });
    }
    if row[0] == TAG_RESERVE {
        let record = &row[49..];
        let closed = record[0] != 1;
        let len = if closed { 1 } else { record.len() };
        if closed && record[1..].iter().any(|b| *b != 0) {
            return Err(Error::Verify(
                "snapshot chunk: a closed reserve with a record".into(),
            ));
        }
        return Ok(Row::Reserve {
            owner: key,
            id: u128::from_be_bytes(row[33..49].try_into().expect("16")),
            reserve: Reserve::decode(&record[..len])
                .map_err(|e| Error::Verify(format!("snapshot chunk: {e}")))?,
        });
    }
    Ok(Row::Request {
        signer: key,
        id: u128::from_be_bytes(row[33..49].try_into().expect("16")),
        at: RequestAt {
            height: u64::from_le_bytes(row[49..57].try_into().expect("8")),
            index: u32::from_le_bytes(row[57..61].try_into().expect("4")),
            request_hash: row[61..93].try_into().expect("32"),
        },
    })
}

/// What batches change, gathered for a differential snapshot: accounts (last balance wins),
/// requests, and the totals' growth.
#[derive(Debug, Clone, Default)]
pub struct Delta {
    /// Unordered, like `requests` (two inserts per transfer: with envelopes a B-tree's were a
    /// sixth of the archive writer's time); [`Delta::chunks`] sorts them.
    pub accounts: HashMap<PublicKey, u64>,
    /// Unordered (one insert per request: at saturation a B-tree's inserts into a map of
    /// millions were 1-2 us each on the archive writer); [`Delta::chunks`] sorts them.
    pub requests: HashMap<(PublicKey, u128), RequestAt>,
    pub reserves: BTreeMap<(PublicKey, u128), Reserve>,
    pub deposited: u128,
    pub withdrawn: u128,
    /// The last operator key rotation among the batches, with its height.
    pub operator: Option<crate::state::Rotation>,
}

impl Delta {
    /// Adds one batch's effects, from its receipts and the reserve records its body carries.
    pub fn add_batch(&mut self, body: &BatchBody) {
        let time = body.header.time_unix_ms;
        for (item, first) in body.items.iter().zip(body.item_starts()) {
            let signer = *item.signer();
            let mut held = match item {
                BatchItem::Envelope(e) => e.held.iter(),
                BatchItem::Expire(e) => {
                    self.accounts.insert(e.owner, e.receipt.signer_balance);
                    self.reserves.insert((e.owner, e.id), Reserve::Expired);
                    continue;
                }
                BatchItem::Rotate(e) => {
                    self.operator = Some(crate::state::Rotation {
                        key: e.new_key,
                        height: body.header.height,
                        number: e.number,
                    });
                    continue;
                }
                BatchItem::Request(_) => [].iter(),
            };
            for (i, (op, rc)) in item.operations().enumerate() {
                // A failed operation of an independent envelope changed nothing, but its id is
                // used: it is a request row like any other.
                if rc.failed.is_none() {
                    let record = matches!(op.op, Op::Post | Op::Void | Op::Renew)
                        .then(|| *held.next().expect("a record per applied post, void, renew"));
                    self.add_operation(&signer, &op, rc, record, time);
                }
                let at = RequestAt {
                    height: body.header.height,
                    index: first + i as u32,
                    request_hash: rc.request_hash,
                };
                self.requests.insert((signer, op.id), at);
            }
        }
    }

    /// The rows one applied operation changes. `held`: the record a post, void or renewal found.
    fn add_operation(
        &mut self,
        signer: &PublicKey,
        op: &tally_wire::Operation,
        rc: &tally_wire::Receipt,
        held: Option<Held>,
        time: u64,
    ) {
        let owner = if op.party == [0; 32] {
            *signer
        } else {
            op.party
        };
        match op.op {
            Op::Deposit => {
                self.deposited += op.amount as u128;
                self.accounts.insert(op.to, rc.to_balance);
            }
            Op::Transfer => {
                self.accounts.insert(*signer, rc.signer_balance);
                self.accounts.insert(op.to, rc.to_balance);
            }
            Op::Withdraw => {
                self.withdrawn += op.amount as u128;
                self.accounts.insert(*signer, rc.signer_balance);
            }
            Op::Reserve => {
                self.accounts.insert(*signer, rc.signer_balance);
                let held = Held {
                    to: op.to,
                    party: op.party,
                    amount: op.amount,
                    expires_at_ms: time.saturating_add(op.timeout_ms),
                };
                self.reserves.insert((*signer, op.id), Reserve::Open(held));
            }
            Op::Post | Op::Void | Op::Renew => {
                let held = held.expect("the body's record");
                self.accounts.insert(owner, rc.signer_balance);
                let after = match op.op {
                    Op::Post => {
                        self.accounts.insert(held.to, rc.to_balance);
                        Reserve::Posted
                    }
                    Op::Void => Reserve::Voided,
                    _ => Reserve::Open(Held {
                        expires_at_ms: time.saturating_add(op.timeout_ms),
                        ..held
                    }),
                };
                self.reserves.insert((owner, op.reserve_id), after);
            }
            Op::Expire | Op::Rotate => {
                unreachable!("expiries and rotations are items of their own")
            }
        }
    }

    pub fn rows(&self) -> usize {
        self.accounts.len() + self.requests.len() + self.reserves.len()
    }

    /// The rows in key order (accounts, then requests), cut into chunks.
    pub fn chunks(&self) -> Vec<Vec<u8>> {
        let mut requests: Vec<_> = self.requests.iter().collect();
        requests.sort_unstable_by_key(|(key, _)| *key);
        let mut accounts: Vec<_> = self.accounts.iter().collect();
        accounts.sort_unstable_by_key(|(key, _)| *key);
        let rows = accounts
            .into_iter()
            .map(|(key, balance)| Row::Account {
                key: *key,
                balance: *balance,
            })
            .chain(requests.into_iter().map(|((signer, id), at)| Row::Request {
                signer: *signer,
                id: *id,
                at: *at,
            }))
            .chain(self.reserves.iter().map(|((owner, id), r)| Row::Reserve {
                owner: *owner,
                id: *id,
                reserve: *r,
            }));
        cut_chunks(rows)
    }

    /// Applies `later` on top of this (later rows replace earlier ones; totals add up).
    pub fn merge(&mut self, later: Delta) {
        self.accounts.extend(later.accounts);
        self.requests.extend(later.requests);
        self.reserves.extend(later.reserves);
        self.deposited += later.deposited;
        self.withdrawn += later.withdrawn;
        self.operator = later.operator.or(self.operator);
    }

    /// The rows of decoded chunks, as a delta (totals left at 0: they are in the manifest).
    pub fn from_rows(rows: impl IntoIterator<Item = Row>) -> Delta {
        let mut d = Delta::default();
        for row in rows {
            match row {
                Row::Account { key, balance } => {
                    d.accounts.insert(key, balance);
                }
                Row::Request { signer, id, at } => {
                    d.requests.insert((signer, id), at);
                }
                Row::Reserve { owner, id, reserve } => {
                    d.reserves.insert((owner, id), reserve);
                }
            }
        }
        d
    }
}

/// Cuts rows (in key order) into chunks. A chunk ends after a row whose key hash ends in ten
/// zero bits (content-defined, so an unchanged stretch of keys gives the same chunk in the next
/// full snapshot) or at [`CHUNK_ROWS_MAX`].
fn cut_chunks(rows: impl Iterator<Item = Row>) -> Vec<Vec<u8>> {
    let mut chunks = Vec::new();
    let mut current = Vec::new();
    let mut count = 0;
    for row in rows {
        row.encode(&mut current);
        count += 1;
        let h = match &row {
            Row::Account { key, .. } => sha256(&[key]),
            Row::Request { signer, id, .. }
            | Row::Reserve {
                owner: signer, id, ..
            } => sha256(&[signer, &id.to_be_bytes()]),
        };
        if count == CHUNK_ROWS_MAX || (h[0] == 0 && h[1] & 0x03 == 0) {
            chunks.push(std::mem::take(&mut current));
            count = 0;
        }
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

/// A snapshot's manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub height: u64,
    /// 0 for a full snapshot, else the height of the snapshot this one applies on.
    pub base: u64,
    pub header_hash: Hash,
    pub state_digest: Hash,
    /// The ledger's totals at `height` (not derivable from the rows).
    pub total_deposited: u128,
    pub total_withdrawn: u128,
    pub accounts: u64,
    pub requests: u64,
    /// Reserve rows (open and closed); 0 in a layout-2 manifest.
    pub reserves: u64,
    /// (SHA-256, bytes) of each chunk, in order.
    pub chunks: Vec<(Hash, u64)>,
    /// The ledger's last operator key rotation at `height` (None: none yet). A line of its own
    /// after `reserves`, present only after a rotation.
    pub operator: Option<crate::state::Rotation>,
}

impl Manifest {
    pub fn is_full(&self) -> bool {
        self.base == 0
    }

    /// The stored manifest: its text as a C2SP signed note by the operator key, under the
    /// ledger's log origin (`tlog::origin_for`), as the checkpoint is. The signed text names
    /// every chunk's SHA-256, so a reader refuses a substituted chunk as soon as it reads it;
    /// the state digest (over the state map, see `state_map.rs`) binds the whole state.
    pub fn sign(&self, chain_id: &Hash, key: &SigningKey) -> Vec<u8> {
        let text = String::from_utf8(self.encode()).expect("a manifest's text is ASCII");
        sign_note(&text, &origin_for(chain_id), key).into_bytes()
    }

    /// The stored manifest: [`Manifest::sign`]ed with `key`, or, written by a threshold
    /// operator's replica (which holds no key), its text alone. An unsigned manifest vouches for
    /// nothing: its rows are trusted only once they give the state digest of the signed header
    /// it names (PROTOCOL.md §15.9).
    pub fn stored(&self, chain_id: &Hash, key: Option<&SigningKey>) -> Vec<u8> {
        match key {
            Some(key) => self.sign(chain_id, key),
            None => self.encode(),
        }
    }

    /// Opens a stored manifest: signed by one of `operators` ([`Manifest::open_under`]), or,
    /// when `unsigned` allows it (a threshold operator's archive), its text alone. A manifest
    /// that carries signatures must open under `operators` either way.
    pub fn open_stored(
        bytes: &[u8],
        chain_id: &Hash,
        operators: &[PublicKey],
        unsigned: bool,
    ) -> Result<Manifest> {
        // A signed note's signatures follow a blank line; a manifest's text has none.
        let signed = bytes.windows(2).any(|w| w == b"\n\n");
        match (signed, unsigned) {
            (false, true) => Manifest::decode(bytes),
            _ => Manifest::open_under(bytes, chain_id, operators),
        }
    }

    /// Checks the operator's signature on a stored manifest and decodes it.
    pub fn open(bytes: &[u8], chain_id: &Hash, operator: &PublicKey) -> Result<Manifest> {
        Manifest::open_under(bytes, chain_id, std::slice::from_ref(operator))
    }

    /// [`Manifest::open`] for a ledger whose key rotated: signed by any of `operators` (the
    /// writer signs with the key it holds when it writes, PROTOCOL.md §4.14).
    pub fn open_under(bytes: &[u8], chain_id: &Hash, operators: &[PublicKey]) -> Result<Manifest> {
        let bad = |why: String| Error::Verify(format!("snapshot manifest: {why}"));
        let note = std::str::from_utf8(bytes).map_err(|_| bad("not UTF-8".into()))?;
        let text = crate::header_log::open_note_under(note, &origin_for(chain_id), operators)
            .map_err(|e| bad(e.to_string()))?;
        Manifest::decode(text.as_bytes())
    }

    /// Text, one field a line; see PROTOCOL.md, "The archive".
    pub fn encode(&self) -> Vec<u8> {
        let mut t = format!(
            "{MANIFEST_MAGIC}\nheight {}\nbase {}\nheader_hash {}\nstate_digest {}\n\
             total_deposited {}\ntotal_withdrawn {}\naccounts {}\nrequests {}\nreserves {}\n",
            self.height,
            self.base,
            hex::encode(self.header_hash),
            hex::encode(self.state_digest),
            self.total_deposited,
            self.total_withdrawn,
            self.accounts,
            self.requests,
            self.reserves,
        );
        if let Some(r) = &self.operator {
            t.push_str(&format!(
                "operator {} {} {}\n",
                hex::encode(r.key),
                r.height,
                r.number
            ));
        }
        for (hash, bytes) in &self.chunks {
            t.push_str(&format!("chunk {} {bytes}\n", hex::encode(hash)));
        }
        t.into_bytes()
    }

    pub fn decode(bytes: &[u8]) -> Result<Manifest> {
        let bad = |why: String| Error::Verify(format!("snapshot manifest: {why}"));
        let text = std::str::from_utf8(bytes).map_err(|_| bad("not UTF-8".into()))?;
        let mut lines = text.strip_suffix('\n').unwrap_or(text).split('\n');
        let layout_2 = match lines.next() {
            Some(MANIFEST_MAGIC) => false,
            Some(MANIFEST_MAGIC_2) => true,
            _ => return Err(bad("not a layout-2 or layout-3 manifest".into())),
        };
        let mut field = |name: &str| -> Result<String> {
            let line = lines.next().ok_or_else(|| bad(format!("{name} missing")))?;
            line.strip_prefix(name)
                .and_then(|v| v.strip_prefix(' '))
                .map(str::to_string)
                .ok_or_else(|| bad(format!("expected {name}")))
        };
        let num = |v: String, name: &str| -> Result<u128> {
            v.parse().map_err(|_| bad(format!("bad {name}")))
        };
        let hash = |v: String, name: &str| -> Result<Hash> {
            let mut h = [0u8; 32];
            hex::decode_to_slice(&v, &mut h).map_err(|_| bad(format!("bad {name}")))?;
            Ok(h)
        };
        let mut m = Manifest {
            height: num(field("height")?, "height")? as u64,
            base: num(field("base")?, "base")? as u64,
            header_hash: hash(field("header_hash")?, "header_hash")?,
            state_digest: hash(field("state_digest")?, "state_digest")?,
            total_deposited: num(field("total_deposited")?, "total_deposited")?,
            total_withdrawn: num(field("total_withdrawn")?, "total_withdrawn")?,
            accounts: num(field("accounts")?, "accounts")? as u64,
            requests: num(field("requests")?, "requests")? as u64,
            reserves: 0,
            chunks: Vec::new(),
            operator: None,
        };
        if !layout_2 {
            m.reserves = num(field("reserves")?, "reserves")? as u64;
        }
        let mut lines = lines.peekable();
        if let Some(line) = lines.next_if(|l| l.starts_with("operator ")) {
            let parts: Vec<&str> = line.split(' ').collect();
            let [_, key, height, number] = parts[..] else {
                return Err(bad(format!("bad line {line:?}")));
            };
            m.operator = Some(crate::state::Rotation {
                key: hash(key.into(), "operator key")?,
                height: num(height.into(), "operator height")? as u64,
                number: u32::try_from(num(number.into(), "operator number")?)
                    .map_err(|_| bad("bad operator number".into()))?,
            });
        }
        for line in lines {
            let mut parts = line.split(' ');
            let (Some("chunk"), Some(h), Some(n), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(bad(format!("bad line {line:?}")));
            };
            m.chunks.push((
                hash(h.into(), "chunk")?,
                num(n.into(), "chunk size")? as u64,
            ));
        }
        if m.base >= m.height && m.base != 0 {
            return Err(bad("base must be below height".into()));
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            height: 14,
            base: 7,
            header_hash: [1; 32],
            state_digest: [2; 32],
            total_deposited: 1 << 70,
            total_withdrawn: 5,
            accounts: 3,
            requests: 4,
            reserves: 2,
            chunks: vec![([3; 32], 41), ([4; 32], 93)],
            operator: None,
        }
    }

    #[test]
    fn a_signed_manifest_opens_only_for_its_ledger_and_operator() {
        let key = SigningKey::from_bytes(&[5; 32]);
        let operator = key.verifying_key().to_bytes();
        let m = manifest();
        let stored = m.sign(&[6; 32], &key);
        assert_eq!(Manifest::open(&stored, &[6; 32], &operator).unwrap(), m);
        assert!(
            Manifest::open(&stored, &[7; 32], &operator).is_err(),
            "another chain"
        );
        let other = SigningKey::from_bytes(&[8; 32]).verifying_key().to_bytes();
        assert!(
            Manifest::open(&stored, &[6; 32], &other).is_err(),
            "another key"
        );
        let text = String::from_utf8(stored).unwrap();
        let tampered = text.replace("accounts 3", "accounts 2");
        assert_ne!(tampered, text);
        assert!(Manifest::open(tampered.as_bytes(), &[6; 32], &operator).is_err());
        assert!(
            Manifest::open(&m.encode(), &[6; 32], &operator).is_err(),
            "unsigned"
        );
    }

    #[test]
    fn an_unsigned_manifest_opens_only_where_allowed_and_a_signed_one_must_verify() {
        let key = SigningKey::from_bytes(&[5; 32]);
        let operator = [key.verifying_key().to_bytes()];
        let m = manifest();
        let open =
            |bytes: &[u8], unsigned| Manifest::open_stored(bytes, &[6; 32], &operator, unsigned);
        let text = m.stored(&[6; 32], None);
        assert_eq!(text, m.encode());
        assert_eq!(open(&text, true).unwrap(), m);
        assert!(open(&text, false).is_err(), "a whole key's archive signs");
        let signed = m.stored(&[6; 32], Some(&key));
        assert_eq!(open(&signed, false).unwrap(), m);
        assert_eq!(open(&signed, true).unwrap(), m);
        let other = SigningKey::from_bytes(&[8; 32]);
        assert!(
            open(&m.stored(&[6; 32], Some(&other)), true).is_err(),
            "a signature by another key is refused even where unsigned is allowed"
        );
    }

    #[test]
    fn a_layout_2_manifest_reads_with_no_reserves() {
        let m = Manifest {
            reserves: 0,
            ..manifest()
        };
        let text = String::from_utf8(m.encode()).unwrap();
        assert!(text.starts_with("tally-snapshot 3\n") && text.contains("\nreserves 0\n"));
        let old = text
            .replace("tally-snapshot 3", "tally-snapshot 2")
            .replace("reserves 0\n", "");
        assert_eq!(Manifest::decode(old.as_bytes()).unwrap(), m);
        let missing = text.replace("reserves 0\n", "");
        assert!(Manifest::decode(missing.as_bytes()).is_err());
    }
}
