//! Threshold signing of headers across replicas (issue 20 point 4, PROTOCOL.md §4.15), sans IO.
//!
//! Every replica of a threshold operator holds one FROST share ([`crate::threshold`]) and runs
//! one [`Signing`]: a *signer* on every replica and, on the leader, a *coordinator*.
//!
//! - Round 1 runs ahead: each signer keeps [`STOCK`] fresh nonce commitments out, and sends
//!   the list of them ([`SignMsg::Stock`]) to every peer whenever it changes and every
//!   [`STOCK_RESEND_MS`]. A receiver keeps the latest list per signer; only a leader uses it.
//! - After a batch is applied unsigned (on every replica: the apply stage replays it and checks
//!   its header), the leader's coordinator picks `t` signers (itself first, then by fewest
//!   recent failures), takes one commitment of each and sends them the header and the
//!   commitments ([`SignMsg::Request`]).
//! - A signer signs only the header it applied itself at that height, and only with a nonce it
//!   still holds: a nonce is used once and then gone, whoever asks. A request for a height it
//!   has not applied yet waits ([`PENDING_MAX`] at most).
//! - The coordinator aggregates `t` shares into an ordinary Ed25519 signature and asks for it
//!   to be proposed as a raft entry ([`SignOut::Propose`], heights in order). Its apply, on
//!   every replica, checks the signature under the group key, stores it and releases the
//!   batch's confirmations (`engine::apply`). A round that does not finish within
//!   [`ROUND_TIMEOUT_MS`], or whose shares do not aggregate, starts over with other signers.
//!
//! Nonces live in memory only: a signer that restarts has none of the ones it sent, refuses
//! requests naming them, and sends a new stock. So no nonce is ever used twice, and one replica
//! alone can sign nothing: the others check the header against their own replay.

use std::collections::{BTreeMap, BTreeSet};

use rand::{CryptoRng, RngCore};
use tally_wire::{Header, PublicKey, Signature};

use crate::crypto::{key_id, verify_strict};
use crate::threshold::{
    aggregate, group_signers, Commitment, Nonces, Share, SignatureShare, SignerId,
};
use crate::{Error, Result};

/// Commitments a signer keeps out at once.
pub const STOCK: usize = 8;
/// How often a signer sends its stock even when it did not change (a restarted peer or a new
/// leader learns it).
pub const STOCK_RESEND_MS: u64 = 1_000;
/// Requests a signer holds for items it has not reached yet; beyond, the oldest go.
pub const PENDING_MAX: usize = 64;
/// Signers whose stock a replica keeps (node ids above are ignored): bounds its memory.
const SIGNERS_MAX: usize = 64;
/// Items a coordinator signs at once.
pub const IN_FLIGHT_MAX: usize = 8;
/// A round without `t` shares after this long starts over with other signers.
pub const ROUND_TIMEOUT_MS: u64 = 200;
/// A proposed signature not applied after this long is proposed again.
pub const REPROPOSE_MS: u64 = 1_000;
/// Bytes of a message to sign: a header (192) or a checkpoint's text (~110).
const MESSAGE_BYTES_MAX: usize = 512;

/// What is signed at each height, in this order: the header, then the checkpoint of the header
/// log of that size (whose last leaf is the signed header, so it waits for that signature).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Header = 0,
    Checkpoint = 1,
}

impl Kind {
    fn decode(b: u8) -> Option<Kind> {
        match b {
            0 => Some(Kind::Header),
            1 => Some(Kind::Checkpoint),
            _ => None,
        }
    }
}

/// One thing to sign: a height's header or checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Item {
    pub height: u64,
    pub kind: Kind,
}

/// The raft entry that carries a signature: domain ‖ height u64 LE ‖ kind u8 ‖ signature.
pub const SIGNATURE_ENTRY_DOMAIN: [u8; 16] = *b"tally/hsig/v1\0\0\0";
const SIGNATURE_ENTRY_BYTES: usize = 16 + 8 + 1 + 64;

pub fn encode_signature_entry(item: Item, signature: &Signature) -> Vec<u8> {
    let mut out = Vec::with_capacity(SIGNATURE_ENTRY_BYTES);
    out.extend_from_slice(&SIGNATURE_ENTRY_DOMAIN);
    out.extend_from_slice(&item.height.to_le_bytes());
    out.push(item.kind as u8);
    out.extend_from_slice(signature);
    out
}

/// A signature entry's item and signature; None for any other bytes.
pub fn decode_signature_entry(bytes: &[u8]) -> Option<(Item, Signature)> {
    if bytes.len() != SIGNATURE_ENTRY_BYTES || !bytes.starts_with(&SIGNATURE_ENTRY_DOMAIN) {
        return None;
    }
    let height = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
    let kind = Kind::decode(bytes[24])?;
    Some((
        Item { height, kind },
        bytes[25..].try_into().expect("64 bytes"),
    ))
}

/// A message between replicas' signing stages (PROTOCOL.md §4.15 gives the bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignMsg {
    /// A signer's unused commitments, by counter: replaces what the receiver held of it.
    Stock {
        from: SignerId,
        commitments: Vec<(u64, Commitment)>,
    },
    /// Sign `message` (the item's: a header's 192 bytes, a checkpoint's text) with these
    /// commitments, one per signer.
    Request {
        item: Item,
        message: Vec<u8>,
        package: Vec<(SignerId, u64, Commitment)>,
    },
    /// A signer's share for the request of `item` that named its commitment `counter`.
    Share {
        item: Item,
        from: SignerId,
        counter: u64,
        share: SignatureShare,
    },
}

/// What the runtime does for the signing stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignOut {
    /// To one replica (by signer id, which is its node id).
    Send(SignerId, SignMsg),
    /// To every other replica.
    Broadcast(SignMsg),
    /// Propose this signature of `item` as a raft entry.
    Propose(Item, Signature),
}

/// What a signing stage did so far (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SigningStats {
    /// Rounds this replica started as coordinator.
    pub rounds: u64,
    /// Rounds that ended in a signature.
    pub signed: u64,
    /// Rounds that timed out or whose shares did not aggregate (started over).
    pub failed: u64,
    /// Shares this replica signed as a signer.
    pub shares: u64,
}

/// A threshold group this replica holds a share of: the one that signs now, or the next one,
/// held ahead of a rotation to it (PROTOCOL.md §4.14).
pub struct Group {
    share: Share,
    key: PublicKey,
    key_id: [u8; 8],
    threshold: usize,
    /// The group's public shares ([`crate::threshold::Dealt::public`]).
    public: Vec<u8>,
    /// Its signers' numbers (their node ids).
    signers: BTreeSet<SignerId>,
}

impl Group {
    /// A share and its group's public shares, which must agree.
    pub fn new(share: Share, public: Vec<u8>) -> Result<Group> {
        share.check_against(&public)?;
        let key = share.group_key()?;
        let (ids, t) = group_signers(&public)?;
        Ok(Group {
            share,
            key,
            key_id: key_id(&key),
            threshold: t as usize,
            public,
            signers: ids.into_iter().collect(),
        })
    }

    pub fn key(&self) -> PublicKey {
        self.key
    }
}

/// What this replica will sign for an item: its own message, and the id of the key (the
/// group) that signs it.
struct ToSign {
    message: Vec<u8>,
    key_id: [u8; 8],
}

/// One replica's signing stage: its signer, and its coordinator while it leads.
pub struct Signing<G: RngCore + CryptoRng> {
    stats: SigningStats,
    id: SignerId,
    /// The groups this replica holds a share of (one, or two around a rotation); nonces are
    /// drawn with the first's share, and any group's share signs with them.
    groups: Vec<Group>,
    rng: G,
    /// This signer's unused nonces, by counter.
    nonces: BTreeMap<u64, Nonces>,
    next_counter: u64,
    stock_sent_ms: Option<u64>,
    /// What this replica would sign for each item not signed yet: its own applied header, the
    /// checkpoint of its own header log.
    messages: BTreeMap<Item, ToSign>,
    /// Signatures applied through these heights: headers, checkpoints.
    signed: [u64; 2],
    /// Requests for items this replica has not reached yet: (from, request).
    pending: Vec<(SignerId, SignMsg)>,
    stocks: Stocks,
    coordinator: Option<Coordinator>,
}

/// Every signer's unused commitments as it last sent them, kept whether or not this replica
/// leads (a follower about to lead hears them first).
#[derive(Default)]
struct Stocks {
    stock: BTreeMap<SignerId, Vec<(u64, Commitment)>>,
    /// Commitments this replica used as coordinator, which a stock sent before the signer saw
    /// the request may still list; only those some stock still lists are kept.
    spent: BTreeSet<(SignerId, u64)>,
}

/// The leader's half: the rounds under way.
#[derive(Default)]
struct Coordinator {
    rounds: BTreeMap<Item, Round>,
    /// Aggregated signatures until applied: (signature, proposed at).
    done: BTreeMap<Item, (Signature, Option<u64>)>,
    /// Rounds each signer failed lately (timeouts, bad shares); a share answered resets it.
    failures: BTreeMap<SignerId, u32>,
}

impl Stocks {
    /// `signer`'s stock as it sent it, less what this replica already used.
    fn restock(&mut self, signer: SignerId, mut commitments: Vec<(u64, Commitment)>) {
        let listed: BTreeSet<u64> = commitments.iter().map(|(n, _)| *n).collect();
        self.spent
            .retain(|(id, n)| *id != signer || listed.contains(n));
        commitments.retain(|(n, _)| !self.spent.contains(&(signer, *n)));
        self.stock.insert(signer, commitments);
    }
}

struct Round {
    message: Vec<u8>,
    key_id: [u8; 8],
    commitments: BTreeMap<SignerId, Commitment>,
    counters: BTreeMap<SignerId, u64>,
    shares: BTreeMap<SignerId, SignatureShare>,
    started_ms: u64,
}

impl<G: RngCore + CryptoRng> Signing<G> {
    /// `groups`: the ones this replica holds a share of (at least one; all with its signer
    /// number). `headers` and `checkpoints`: the heights through which this replica applied
    /// their signatures.
    pub fn new(groups: Vec<Group>, mut rng: G, headers: u64, checkpoints: u64) -> Result<Self> {
        assert!(
            checkpoints <= headers,
            "checkpoint {checkpoints} signed before its header"
        );
        let Some(first) = groups.first() else {
            return Err(Error::Config("a signing stage without a key share".into()));
        };
        let id = first.share.id()?;
        for g in &groups {
            if g.share.id()? != id {
                return Err(Error::Config(format!(
                    "key shares of signers {id} and {} on one replica",
                    g.share.id()?
                )));
            }
        }
        let next_counter = rng.next_u64() >> 1;
        Ok(Signing {
            stats: SigningStats::default(),
            id,
            groups,
            rng,
            nonces: BTreeMap::new(),
            next_counter,
            stock_sent_ms: None,
            messages: BTreeMap::new(),
            signed: [headers, checkpoints],
            pending: Vec::new(),
            stocks: Stocks::default(),
            coordinator: None,
        })
    }

    pub fn stats(&self) -> SigningStats {
        self.stats
    }

    /// Signatures applied through these heights: (headers, checkpoints).
    pub fn signed_through(&self) -> (u64, u64) {
        (self.signed[0], self.signed[1])
    }

    /// Whether an item waits for a group this replica holds no share of: as leader it cannot
    /// coordinate that signature (it lacks the group's public shares) and should hand over.
    pub fn lacks_a_group(&self) -> bool {
        self.messages
            .values()
            .any(|m| !self.groups.iter().any(|g| g.key_id == m.key_id))
    }

    /// This replica leads (or no longer does): a new coordinator starts with no round, from
    /// the stocks every signer sent.
    pub fn set_leading(&mut self, leading: bool) {
        match (leading, self.coordinator.is_some()) {
            (true, false) => self.coordinator = Some(Coordinator::default()),
            (false, true) => self.coordinator = None,
            _ => {}
        }
    }

    fn own_commitments(&self) -> Vec<(u64, Commitment)> {
        self.nonces
            .iter()
            .filter_map(|(n, nonces)| Some((*n, nonces.commitment().ok()?)))
            .collect()
    }

    /// A batch was applied here unsigned; its header is what this replica will sign, with the
    /// group whose key the header names.
    pub fn applied(&mut self, header: Header, now_ms: u64, out: &mut Vec<SignOut>) {
        let item = Item {
            height: header.height,
            kind: Kind::Header,
        };
        let to_sign = ToSign {
            message: header.encode().to_vec(),
            key_id: header.operator_key_id,
        };
        self.reached(item, to_sign, now_ms, out);
    }

    /// The header at `height` is signed here, and `checkpoint` is the text of the checkpoint of
    /// this replica's header log of that size: what it will sign next for that height, with
    /// the group of `key` (the key that signs the header after it: PROTOCOL.md §4.14).
    pub fn header_signed(
        &mut self,
        height: u64,
        checkpoint: Vec<u8>,
        key: PublicKey,
        now_ms: u64,
        out: &mut Vec<SignOut>,
    ) {
        self.forget(Kind::Header, height);
        let item = Item {
            height,
            kind: Kind::Checkpoint,
        };
        let to_sign = ToSign {
            message: checkpoint,
            key_id: key_id(&key),
        };
        self.reached(item, to_sign, now_ms, out);
    }

    /// Checkpoints are signed here through `height` (so their headers are too: after a
    /// snapshot install this is all the stage learns).
    pub fn checkpoint_signed(&mut self, height: u64) {
        self.forget(Kind::Header, height);
        self.forget(Kind::Checkpoint, height);
    }

    fn reached(&mut self, item: Item, to_sign: ToSign, now_ms: u64, out: &mut Vec<SignOut>) {
        if item.height <= self.signed[item.kind as usize] {
            return;
        }
        self.messages.insert(item, to_sign);
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|(_, m)| matches!(m, SignMsg::Request { item: i, .. } if *i == item));
        self.pending = waiting;
        for (from, msg) in ready {
            self.message(from, msg, now_ms, out);
        }
    }

    fn forget(&mut self, kind: Kind, height: u64) {
        let through = &mut self.signed[kind as usize];
        *through = (*through).max(height);
        let through = *through;
        let gone = |i: &Item| i.kind == kind && i.height <= through;
        self.messages.retain(|i, _| !gone(i));
        self.pending
            .retain(|(_, m)| !matches!(m, SignMsg::Request { item, .. } if gone(item)));
        if let Some(c) = self.coordinator.as_mut() {
            c.rounds.retain(|i, _| !gone(i));
            c.done.retain(|i, _| !gone(i));
        }
    }

    /// A message from replica `from` (authenticated by the transport).
    pub fn message(&mut self, from: SignerId, msg: SignMsg, now_ms: u64, out: &mut Vec<SignOut>) {
        match msg {
            SignMsg::Stock {
                from: signer,
                commitments,
            } => {
                if signer == from && (signer as usize) <= SIGNERS_MAX {
                    self.stocks.restock(signer, commitments);
                }
            }
            SignMsg::Request { item, .. } if item.height <= self.signed[item.kind as usize] => {}
            SignMsg::Request { item, .. } if !self.messages.contains_key(&item) => {
                if self.pending.len() >= PENDING_MAX {
                    self.pending.remove(0);
                }
                self.pending.push((from, msg));
            }
            SignMsg::Request {
                item,
                message,
                package,
            } => self.answer(from, item, &message, &package, now_ms, out),
            SignMsg::Share {
                item,
                from: signer,
                counter,
                share,
            } if signer == from => self.collect(item, signer, counter, share, now_ms, out),
            SignMsg::Share { .. } => {}
        }
    }

    /// Round 2 for a request of an item this replica reached.
    fn answer(
        &mut self,
        to: SignerId,
        item: Item,
        message: &[u8],
        package: &[(SignerId, u64, Commitment)],
        now_ms: u64,
        out: &mut Vec<SignOut>,
    ) {
        let Some(&(_, counter, _)) = package.iter().find(|(id, _, _)| *id == self.id) else {
            return;
        };
        let Some(ours) = self.messages.get(&item) else {
            return;
        };
        if ours.message != message || !distinct_signers(package) {
            return; // not what this replica applied: sign nothing
        }
        let Some(group) = self.groups.iter().find(|g| g.key_id == ours.key_id) else {
            return; // a group this replica holds no share of
        };
        let Some(nonces) = self.nonces.remove(&counter) else {
            return; // used or never ours: the stock below tells the leader what is
        };
        let commitments = package.iter().map(|(i, _, c)| (*i, c.clone())).collect();
        if let Ok(share) = group.share.sign(message, &commitments, nonces) {
            self.stats.shares += 1;
            let msg = SignMsg::Share {
                item,
                from: self.id,
                counter,
                share,
            };
            match to == self.id {
                true => self.message(self.id, msg, now_ms, out),
                false => out.push(SignOut::Send(to, msg)),
            }
        }
        self.send_stock(now_ms, out);
    }

    /// Tops the stock up to [`STOCK`] and sends it to every peer (and to this replica's own
    /// coordinator).
    fn send_stock(&mut self, now_ms: u64, out: &mut Vec<SignOut>) {
        while self.nonces.len() < STOCK {
            let Ok((nonces, _)) = self.groups[0].share.commit(&mut self.rng) else {
                return;
            };
            self.nonces.insert(self.next_counter, nonces);
            self.next_counter += 1;
        }
        let commitments = self.own_commitments();
        self.stocks.restock(self.id, commitments.clone());
        out.push(SignOut::Broadcast(SignMsg::Stock {
            from: self.id,
            commitments,
        }));
        self.stock_sent_ms = Some(now_ms);
    }

    /// Sends this signer's stock now (the cluster has a new leader, which needs it at once
    /// rather than at the next resend).
    pub fn announce(&mut self, now_ms: u64, out: &mut Vec<SignOut>) {
        self.send_stock(now_ms, out);
    }

    /// Time passes: resend the stock when due; as leader, start, restart and finish rounds.
    pub fn tick(&mut self, now_ms: u64, out: &mut Vec<SignOut>) {
        let due = self
            .stock_sent_ms
            .is_none_or(|t| now_ms >= t + STOCK_RESEND_MS);
        if due || self.nonces.len() < STOCK {
            self.send_stock(now_ms, out);
        }
        if self.coordinator.is_some() {
            self.expire_rounds(now_ms);
            self.start_rounds(now_ms, out);
            self.propose_done(now_ms, out);
        }
    }

    fn expire_rounds(&mut self, now_ms: u64) {
        let c = self.coordinator.as_mut().expect("leading");
        let late: Vec<Item> = c
            .rounds
            .iter()
            .filter(|(_, r)| now_ms >= r.started_ms + ROUND_TIMEOUT_MS)
            .map(|(i, _)| *i)
            .collect();
        for item in late {
            self.stats.failed += 1;
            let round = c.rounds.remove(&item).expect("listed");
            for id in round
                .counters
                .keys()
                .filter(|i| !round.shares.contains_key(i))
            {
                *c.failures.entry(*id).or_default() += 1;
            }
        }
    }

    /// Starts a round for each item without one, in height order.
    fn start_rounds(&mut self, now_ms: u64, out: &mut Vec<SignOut>) {
        let items: Vec<Item> = {
            let c = self.coordinator.as_ref().expect("leading");
            let busy = c.rounds.len() + c.done.len();
            self.messages
                .keys()
                .filter(|i| !c.rounds.contains_key(i) && !c.done.contains_key(i))
                .take(IN_FLIGHT_MAX.saturating_sub(busy))
                .copied()
                .collect()
        };
        for item in items {
            if !self.start_round(item, now_ms, out) {
                return;
            }
        }
    }

    /// Picks `t` signers of the item's group with stock and asks each; false when too few
    /// have stock, or when this replica holds no share of the group (it cannot aggregate).
    fn start_round(&mut self, item: Item, now_ms: u64, out: &mut Vec<SignOut>) -> bool {
        let ToSign { message, key_id } = &self.messages[&item];
        let (message, key_id) = (message.clone(), *key_id);
        let Some(group) = self.groups.iter().find(|g| g.key_id == key_id) else {
            return false;
        };
        let c = self.coordinator.as_mut().expect("leading");
        let stocks = &mut self.stocks;
        let mut candidates: Vec<SignerId> = stocks
            .stock
            .iter()
            .filter(|(id, s)| !s.is_empty() && group.signers.contains(id))
            .map(|(id, _)| *id)
            .collect();
        let own = self.id;
        candidates.sort_by_key(|id| (*id != own, c.failures.get(id).copied().unwrap_or(0), *id));
        if candidates.len() < group.threshold {
            return false;
        }
        let mut package = Vec::new();
        for id in candidates.into_iter().take(group.threshold) {
            let (counter, commitment) = stocks.stock.get_mut(&id).expect("listed").remove(0);
            stocks.spent.insert((id, counter));
            package.push((id, counter, commitment));
        }
        self.stats.rounds += 1;
        c.rounds.insert(
            item,
            Round {
                message: message.clone(),
                key_id,
                commitments: package.iter().map(|(i, _, m)| (*i, m.clone())).collect(),
                counters: package.iter().map(|(i, n, _)| (*i, *n)).collect(),
                shares: BTreeMap::new(),
                started_ms: now_ms,
            },
        );
        let request = SignMsg::Request {
            item,
            message,
            package: package.clone(),
        };
        for (id, _, _) in &package {
            match *id == own {
                true => self.message(own, request.clone(), now_ms, out),
                false => out.push(SignOut::Send(*id, request.clone())),
            }
        }
        true
    }

    /// A share for a round under way; `t` of them make the signature.
    fn collect(
        &mut self,
        item: Item,
        signer: SignerId,
        counter: u64,
        share: SignatureShare,
        now_ms: u64,
        out: &mut Vec<SignOut>,
    ) {
        let Some(c) = self.coordinator.as_mut() else {
            return;
        };
        let Some(round) = c.rounds.get_mut(&item) else {
            return;
        };
        if round.counters.get(&signer) != Some(&counter) {
            return;
        }
        let Some(group) = self.groups.iter().find(|g| g.key_id == round.key_id) else {
            return;
        };
        round.shares.insert(signer, share);
        c.failures.remove(&signer);
        if round.shares.len() < group.threshold {
            return;
        }
        let round = c.rounds.remove(&item).expect("found");
        match aggregate(
            &round.message,
            &round.commitments,
            &round.shares,
            &group.public,
        ) {
            Ok(sig) if verify_strict(&group.key, &round.message, &sig) => {
                self.stats.signed += 1;
                c.done.insert(item, (sig, None));
            }
            _ => {
                self.stats.failed += 1;
                for id in round.counters.keys() {
                    *c.failures.entry(*id).or_default() += 1;
                }
            }
        }
        self.propose_done(now_ms, out);
    }

    /// Proposes the signatures ready for the next items of each kind in height order, and
    /// again any not applied [`REPROPOSE_MS`] after it was proposed.
    fn propose_done(&mut self, now_ms: u64, out: &mut Vec<SignOut>) {
        let c = self.coordinator.as_mut().expect("leading");
        for kind in [Kind::Header, Kind::Checkpoint] {
            let mut item = Item {
                height: self.signed[kind as usize] + 1,
                kind,
            };
            while let Some((sig, proposed)) = c.done.get_mut(&item) {
                if proposed.is_none_or(|t| now_ms >= t + REPROPOSE_MS) {
                    *proposed = Some(now_ms);
                    out.push(SignOut::Propose(item, *sig));
                }
                item.height += 1;
            }
        }
    }
}

fn distinct_signers(package: &[(SignerId, u64, Commitment)]) -> bool {
    package
        .iter()
        .map(|(id, _, _)| id)
        .collect::<BTreeSet<_>>()
        .len()
        == package.len()
}

const TAG_STOCK: u8 = 1;
const TAG_REQUEST: u8 = 2;
const TAG_SHARE: u8 = 3;
/// Commitments a stock or a request may carry.
const PARTS_MAX: usize = 64;

impl SignMsg {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            SignMsg::Stock { from, commitments } => {
                out.push(TAG_STOCK);
                out.extend_from_slice(&from.to_le_bytes());
                out.push(commitments.len() as u8);
                for (n, c) in commitments {
                    out.extend_from_slice(&n.to_le_bytes());
                    put_part(&mut out, c);
                }
            }
            SignMsg::Request {
                item,
                message,
                package,
            } => {
                out.push(TAG_REQUEST);
                put_item(&mut out, item);
                put_part(&mut out, message);
                out.push(package.len() as u8);
                for (id, n, c) in package {
                    out.extend_from_slice(&id.to_le_bytes());
                    out.extend_from_slice(&n.to_le_bytes());
                    put_part(&mut out, c);
                }
            }
            SignMsg::Share {
                item,
                from,
                counter,
                share,
            } => {
                out.push(TAG_SHARE);
                put_item(&mut out, item);
                out.extend_from_slice(&from.to_le_bytes());
                out.extend_from_slice(&counter.to_le_bytes());
                put_part(&mut out, share);
            }
        }
        out
    }

    /// Decodes a peer's message; every length is checked before it is trusted.
    pub fn decode(bytes: &[u8]) -> Result<SignMsg> {
        let mut r = Reader(bytes);
        let msg = match r.u8()? {
            TAG_STOCK => {
                let from = r.u16()?;
                let count = r.count()?;
                let mut commitments = Vec::with_capacity(count);
                for _ in 0..count {
                    commitments.push((r.u64()?, r.part()?));
                }
                SignMsg::Stock { from, commitments }
            }
            TAG_REQUEST => {
                let item = r.item()?;
                let message = r.part()?;
                let count = r.count()?;
                let mut package = Vec::with_capacity(count);
                for _ in 0..count {
                    package.push((r.u16()?, r.u64()?, r.part()?));
                }
                SignMsg::Request {
                    item,
                    message,
                    package,
                }
            }
            TAG_SHARE => SignMsg::Share {
                item: r.item()?,
                from: r.u16()?,
                counter: r.u64()?,
                share: r.part()?,
            },
            t => return Err(malformed(format!("unknown tag {t}"))),
        };
        match r.0.is_empty() {
            true => Ok(msg),
            false => Err(malformed("trailing bytes".into())),
        }
    }
}

fn put_item(out: &mut Vec<u8>, item: &Item) {
    out.extend_from_slice(&item.height.to_le_bytes());
    out.push(item.kind as u8);
}

fn put_part(out: &mut Vec<u8>, part: &[u8]) {
    assert!(
        part.len() <= MESSAGE_BYTES_MAX,
        "a part of {} bytes",
        part.len()
    );
    out.extend_from_slice(&(part.len() as u16).to_le_bytes());
    out.extend_from_slice(part);
}

fn malformed(what: String) -> Error {
    Error::Verify(format!("a signing message: {what}"))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(malformed("truncated".into()));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn count(&mut self) -> Result<usize> {
        let n = self.u8()? as usize;
        match n <= PARTS_MAX {
            true => Ok(n),
            false => Err(malformed(format!("{n} parts"))),
        }
    }
    /// A commitment, a share or a message to sign.
    fn part(&mut self) -> Result<Vec<u8>> {
        let n = self.u16()? as usize;
        match n <= MESSAGE_BYTES_MAX {
            true => Ok(self.take(n)?.to_vec()),
            false => Err(malformed(format!("a part of {n} bytes"))),
        }
    }
    fn item(&mut self) -> Result<Item> {
        let height = self.u64()?;
        let kind = Kind::decode(self.u8()?).ok_or_else(|| malformed("an unknown kind".into()))?;
        Ok(Item { height, kind })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::threshold::deal;
    use rand::rngs::OsRng;

    fn header_by(height: u64, salt: u8, operator_key_id: [u8; 8]) -> Header {
        Header {
            chain_id: [7; 32],
            height,
            term: 1,
            time_unix_ms: 1_000 + height,
            request_count: 1,
            prev_hash: [salt; 32],
            merkle_root: [2; 32],
            state_digest: [3; 32],
            operator_key_id,
        }
    }

    fn checkpoint(height: u64) -> Vec<u8> {
        format!("tally.ledger/test\n{height}\nroot\n").into_bytes()
    }

    fn item(height: u64, kind: Kind) -> Item {
        Item { height, kind }
    }

    /// Three replicas in memory; `down` receive nothing and send nothing.
    struct Net {
        nodes: BTreeMap<SignerId, Signing<OsRng>>,
        down: BTreeSet<SignerId>,
        proposed: Vec<(Item, Signature)>,
        group_key: tally_wire::PublicKey,
    }

    fn group(dealt: &crate::threshold::Dealt, id: SignerId) -> Group {
        let share = Share::decode(&dealt.shares[&id]).unwrap();
        Group::new(share, dealt.public.clone()).unwrap()
    }

    impl Net {
        fn new() -> Net {
            let dealt = deal(3, 2, &mut OsRng).unwrap();
            Net::with(&dealt, None)
        }

        /// Replicas 1..=3 holding shares of `dealt` and, if given, of `next` too.
        fn with(dealt: &crate::threshold::Dealt, next: Option<&crate::threshold::Dealt>) -> Net {
            let nodes = (1..=3)
                .map(|id| {
                    let groups = std::iter::once(group(dealt, id))
                        .chain(
                            next.filter(|n| n.shares.contains_key(&id))
                                .map(|n| group(n, id)),
                        )
                        .collect();
                    (id, Signing::new(groups, OsRng, 0, 0).unwrap())
                })
                .collect();
            let mut net = Net {
                nodes,
                down: BTreeSet::new(),
                proposed: Vec::new(),
                group_key: dealt.group_key,
            };
            net.nodes.get_mut(&1).unwrap().set_leading(true);
            net
        }

        /// Delivers `out` of `from` and everything it causes, in order.
        fn deliver(&mut self, from: SignerId, out: Vec<SignOut>, now: u64) {
            let mut queue: std::collections::VecDeque<(SignerId, SignOut)> =
                out.into_iter().map(|o| (from, o)).collect();
            while let Some((from, o)) = queue.pop_front() {
                let targets: Vec<(SignerId, SignMsg)> = match o {
                    SignOut::Propose(i, sig) => {
                        self.proposed.push((i, sig));
                        continue;
                    }
                    SignOut::Send(to, m) => vec![(to, m)],
                    SignOut::Broadcast(m) => (1..=3)
                        .filter(|i| *i != from)
                        .map(|i| (i, m.clone()))
                        .collect(),
                };
                for (to, m) in targets {
                    if self.down.contains(&to) || self.down.contains(&from) {
                        continue;
                    }
                    let decoded = SignMsg::decode(&m.encode()).unwrap();
                    assert_eq!(decoded, m);
                    let mut more = Vec::new();
                    let node = self.nodes.get_mut(&to).unwrap();
                    node.message(from, decoded, now, &mut more);
                    queue.extend(more.into_iter().map(|o| (to, o)));
                }
            }
        }

        fn tick(&mut self, now: u64) {
            for id in 1..=3 {
                if self.down.contains(&id) {
                    continue;
                }
                let mut out = Vec::new();
                self.nodes.get_mut(&id).unwrap().tick(now, &mut out);
                self.deliver(id, out, now);
            }
        }

        /// A header at `height` (its contents by `salt`), naming the group's key.
        fn header(&self, height: u64, salt: u8) -> Header {
            header_by(height, salt, key_id(&self.group_key))
        }

        fn apply(&mut self, id: SignerId, h: Header, now: u64) {
            let mut out = Vec::new();
            self.nodes.get_mut(&id).unwrap().applied(h, now, &mut out);
            self.deliver(id, out, now);
        }

        /// What applying header signatures through `through` does on replica `id`.
        fn header_signed(&mut self, id: SignerId, through: u64, now: u64) {
            let mut out = Vec::new();
            let node = self.nodes.get_mut(&id).unwrap();
            for h in node.signed_through().0 + 1..=through {
                node.header_signed(h, checkpoint(h), self.group_key, now, &mut out);
            }
            self.deliver(id, out, now);
        }

        fn proposed(&mut self, kind: Kind) -> Vec<u64> {
            let heights = self.proposed.iter().filter(|(i, _)| i.kind == kind);
            heights.map(|(i, _)| i.height).collect()
        }
    }

    #[test]
    fn a_majority_signs_headers_then_checkpoints_in_order_with_one_replica_down() {
        let mut net = Net::new();
        net.down.insert(3);
        net.tick(0);
        for h in 1..=5 {
            for id in 1..=2 {
                net.apply(id, net.header(h, 1), 10);
            }
        }
        net.tick(20);
        assert_eq!(net.proposed(Kind::Header), vec![1, 2, 3, 4, 5]);
        assert!(
            net.proposed(Kind::Checkpoint).is_empty(),
            "not before the headers"
        );
        for (i, sig) in &net.proposed {
            assert!(verify_strict(
                &net.group_key,
                &net.header(i.height, 1).encode(),
                sig
            ));
        }
        // Not applied: proposed again after REPROPOSE_MS, and not before.
        net.proposed.clear();
        net.tick(30);
        assert!(net.proposed.is_empty());
        net.tick(20 + REPROPOSE_MS);
        assert_eq!(net.proposed.len(), 5);
        net.proposed.clear();
        // The header signatures apply (each replica its own pace); the checkpoints follow.
        net.header_signed(1, 5, 40 + REPROPOSE_MS);
        net.header_signed(2, 3, 40 + REPROPOSE_MS);
        net.tick(50 + REPROPOSE_MS);
        assert_eq!(net.proposed(Kind::Checkpoint), vec![1, 2, 3]);
        net.header_signed(2, 5, 60 + REPROPOSE_MS);
        assert_eq!(net.proposed(Kind::Checkpoint), vec![1, 2, 3, 4, 5]);
        for (i, sig) in &net.proposed {
            assert!(verify_strict(&net.group_key, &checkpoint(i.height), sig));
        }
        assert!(
            net.proposed(Kind::Header).is_empty(),
            "applied signatures are not proposed again"
        );
        for n in net.nodes.values_mut() {
            n.checkpoint_signed(5);
        }
        net.proposed.clear();
        net.tick(20 + 5 * REPROPOSE_MS);
        assert!(net.proposed.is_empty());
    }

    #[test]
    fn a_signer_signs_only_what_it_applied_so_a_leader_alone_signs_nothing() {
        let mut net = Net::new();
        net.tick(0);
        // Replica 2 applied another header at height 1 than the leader; 3 is down.
        net.down.insert(3);
        net.apply(1, net.header(1, 1), 10);
        net.apply(2, net.header(1, 9), 10);
        net.tick(20);
        assert!(net.proposed.is_empty());
        // Replica 3 comes back with the leader's header: after the timeout the round starts
        // over with it (2 failed it), and signs.
        net.down.clear();
        net.tick(30);
        net.apply(3, net.header(1, 1), 40);
        net.tick(50 + ROUND_TIMEOUT_MS);
        net.tick(60 + ROUND_TIMEOUT_MS);
        assert_eq!(net.proposed.len(), 1, "{:?}", net.proposed);
        assert_eq!(net.proposed[0].0, item(1, Kind::Header));
        assert!(verify_strict(
            &net.group_key,
            &net.header(1, 1).encode(),
            &net.proposed[0].1
        ));
    }

    #[test]
    fn a_request_for_an_item_not_reached_yet_waits_and_a_nonce_signs_once() {
        let mut net = Net::new();
        net.tick(0);
        net.apply(1, net.header(1, 1), 10);
        net.tick(20); // the request reaches 2 before it applied height 1
        assert!(net.proposed.is_empty());
        net.apply(2, net.header(1, 1), 30);
        assert_eq!(net.proposed.len(), 1);

        // The same request again (a replay by anyone): the nonce is gone, no second share.
        let mut n2 = net.nodes.remove(&2).unwrap();
        let (counter, commitment) = {
            let mut out = Vec::new();
            n2.tick(10_000, &mut out);
            match &out[0] {
                SignOut::Broadcast(SignMsg::Stock { commitments, .. }) => commitments[0].clone(),
                o => panic!("{o:?}"),
            }
        };
        n2.applied(net.header(2, 1), 10_000, &mut Vec::new());
        let request = SignMsg::Request {
            item: item(2, Kind::Header),
            message: net.header(2, 1).encode().to_vec(),
            package: vec![(1, 5, commitment.clone()), (2, counter, commitment)],
        };
        let shares = |out: &Vec<SignOut>| {
            let share = |o: &&SignOut| matches!(o, SignOut::Send(_, SignMsg::Share { .. }));
            out.iter().filter(share).count()
        };
        let mut out = Vec::new();
        n2.message(1, request.clone(), 10_001, &mut out);
        assert_eq!(shares(&out), 1);
        out.clear();
        n2.message(1, request, 10_002, &mut out);
        assert_eq!(shares(&out), 0, "a nonce signs once");
    }

    #[test]
    fn a_new_leader_signs_at_once_with_the_stocks_it_heard_while_following() {
        let mut net = Net::new();
        net.tick(0); // every signer sends its stock to every peer
        net.nodes.get_mut(&1).unwrap().set_leading(false);
        net.nodes.get_mut(&2).unwrap().set_leading(true);
        for id in 1..=3 {
            net.apply(id, net.header(1, 1), 10);
        }
        // No resend is due yet: the new leader signs from what it heard as a follower.
        let mut out = Vec::new();
        net.nodes.get_mut(&2).unwrap().tick(20, &mut out);
        net.deliver(2, out, 20);
        assert_eq!(net.proposed(Kind::Header), vec![1]);
    }

    #[test]
    fn around_a_rotation_each_item_is_signed_by_the_group_that_owns_it() {
        let old = deal(3, 2, &mut OsRng).unwrap();
        let new = crate::threshold::deal_to(&[1, 2, 3], 2, &mut OsRng).unwrap();
        let mut net = Net::with(&old, Some(&new));
        net.tick(0);
        // The batch at height 2 rotates: headers 1 and 2 name the old key, 3 and 4 the new.
        let key_at = |h: u64| match h <= 2 {
            true => old.group_key,
            false => new.group_key,
        };
        for h in 1..=4 {
            for id in 1..=3 {
                net.apply(id, header_by(h, 1, key_id(&key_at(h))), 10);
            }
        }
        net.tick(20);
        assert_eq!(net.proposed(Kind::Header), vec![1, 2, 3, 4]);
        for (i, sig) in &net.proposed {
            let message = header_by(i.height, 1, key_id(&key_at(i.height))).encode();
            assert!(verify_strict(&key_at(i.height), &message, sig), "{i:?}");
            let other = [old.group_key, new.group_key];
            let other = other.iter().find(|k| **k != key_at(i.height)).unwrap();
            assert!(!verify_strict(other, &message, sig), "{i:?}");
        }
        // Checkpoint h is signed by the key of the header after it: the new one from 2 on.
        net.proposed.clear();
        for id in 1..=3 {
            let mut out = Vec::new();
            let node = net.nodes.get_mut(&id).unwrap();
            for h in 1..=4 {
                node.header_signed(h, checkpoint(h), key_at(h + 1), 30, &mut out);
            }
            net.deliver(id, out, 30);
        }
        net.tick(40);
        assert_eq!(net.proposed(Kind::Checkpoint), vec![1, 2, 3, 4]);
        for (i, sig) in &net.proposed {
            let key = key_at(i.height + 1);
            assert!(verify_strict(&key, &checkpoint(i.height), sig), "{i:?}");
        }
    }

    #[test]
    fn a_group_dealt_to_other_members_signs_with_them_alone() {
        // The next group was dealt to replicas 2 and 3 only (replica 1 leaves): 2 of 2.
        let old = deal(3, 2, &mut OsRng).unwrap();
        let new = crate::threshold::deal_to(&[2, 3], 2, &mut OsRng).unwrap();
        let mut net = Net::with(&old, Some(&new));
        net.nodes.get_mut(&1).unwrap().set_leading(false);
        net.nodes.get_mut(&2).unwrap().set_leading(true);
        net.tick(0);
        let h = header_by(1, 1, key_id(&new.group_key));
        for id in 1..=3 {
            net.apply(id, h.clone(), 10);
        }
        net.tick(20);
        assert_eq!(net.proposed(Kind::Header), vec![1]);
        assert!(verify_strict(
            &new.group_key,
            &h.encode(),
            &net.proposed[0].1
        ));
        // Without replica 3, the new group cannot sign (replica 1 holds no share of it).
        let mut net = Net::with(&old, Some(&new));
        net.nodes.get_mut(&1).unwrap().set_leading(false);
        net.nodes.get_mut(&2).unwrap().set_leading(true);
        net.down.insert(3);
        net.tick(0);
        for id in 1..=2 {
            net.apply(id, h.clone(), 10);
        }
        net.tick(20 + ROUND_TIMEOUT_MS);
        assert!(net.proposed.is_empty(), "{:?}", net.proposed);
        assert!(
            net.nodes[&1].lacks_a_group(),
            "replica 1 should hand leadership over"
        );
        assert!(!net.nodes[&2].lacks_a_group());
    }

    #[test]
    fn messages_and_entries_decode_only_what_they_encode() {
        let msgs = [
            SignMsg::Stock {
                from: 3,
                commitments: vec![(9, vec![1; 69]), (10, vec![2; 69])],
            },
            SignMsg::Request {
                item: item(4, Kind::Checkpoint),
                message: vec![5; 192],
                package: vec![(1, 2, vec![3; 69])],
            },
            SignMsg::Share {
                item: item(4, Kind::Header),
                from: 2,
                counter: 7,
                share: vec![8; 36],
            },
        ];
        for m in msgs {
            let bytes = m.encode();
            assert_eq!(SignMsg::decode(&bytes).unwrap(), m);
            for cut in 0..bytes.len() {
                assert!(
                    SignMsg::decode(&bytes[..cut]).is_err(),
                    "{m:?} cut at {cut}"
                );
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(SignMsg::decode(&longer).is_err());
        }
        let it = item(12, Kind::Checkpoint);
        let entry = encode_signature_entry(it, &[6; 64]);
        assert_eq!(decode_signature_entry(&entry), Some((it, [6; 64])));
        assert_eq!(decode_signature_entry(&entry[..entry.len() - 1]), None);
        for at in [0, 24] {
            let mut other = entry.clone();
            other[at] ^= 2;
            assert_eq!(decode_signature_entry(&other), None, "byte {at}");
        }
    }
}
