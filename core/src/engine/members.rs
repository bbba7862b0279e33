//! Membership: who the replicas are (raft's `ConfState`: voters and learners) and where they
//! are (the address book), and the changes an operator makes to them.
//!
//! A change is one raft conf change (ConfChangeV2, a single simple change, never a joint one),
//! proposed by the leader and applied by every replica when it commits. Its context carries
//! the added replica's addresses, so every replica's address book follows the log. The address
//! book is kept with the conf state in the raft log (one synced write) and travels in the
//! snapshot descriptor, so a replica that joins from a snapshot learns every address.

use std::collections::BTreeMap;

use raft::eraftpb::{ConfChangeSingle, ConfChangeType, ConfChangeV2, ConfState};

use tally_wire::{Member, MemberRole};

use crate::state::{LedgerMeta, META_BYTES};
use crate::{Error, Result};

/// Longest address (`host:port`) kept in the address book, in bytes.
pub const ADDRESS_BYTES_MAX: usize = 255;
/// Most replicas a cluster may have (voters and learners).
pub const MEMBERS_MAX: usize = 64;

/// Where a replica listens: its peer (raft) address and its client address (for `not_leader`
/// hints; may be empty when unknown).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MemberAddress {
    pub peer: String,
    pub client: String,
}

/// The address book: every known replica's addresses, by raft id.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AddressBook(pub BTreeMap<u64, MemberAddress>);

/// An operator's change to the replica set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberChange {
    /// A new replica, as a learner (it votes once promoted) or directly as a voter.
    Add {
        id: u64,
        address: MemberAddress,
        learner: bool,
    },
    /// A learner becomes a voter.
    Promote {
        id: u64,
    },
    Remove {
        id: u64,
    },
}

impl MemberChange {
    pub fn id(&self) -> u64 {
        match self {
            MemberChange::Add { id, .. }
            | MemberChange::Promote { id }
            | MemberChange::Remove { id } => *id,
        }
    }

    /// Why this change cannot be made to `conf` by the leader `leader`, if it cannot.
    pub fn refusal(&self, conf: &ConfState, leader: u64) -> Option<String> {
        let id = self.id();
        let voter = conf.voters.contains(&id);
        let learner = conf.learners.contains(&id);
        match self {
            MemberChange::Add { address, .. } => {
                if id == 0 {
                    Some("node id 0 is reserved".into())
                } else if voter || learner {
                    Some(format!("node {id} is already a member"))
                } else if address.peer.is_empty() || address.peer.len() > ADDRESS_BYTES_MAX {
                    Some("the peer address must be 1 to 255 bytes".into())
                } else if conf.voters.len() + conf.learners.len() >= MEMBERS_MAX {
                    Some(format!("a cluster has at most {MEMBERS_MAX} replicas"))
                } else {
                    None
                }
            }
            MemberChange::Promote { .. } if !learner => Some(format!("node {id} is not a learner")),
            MemberChange::Promote { .. } => None,
            MemberChange::Remove { .. } if !voter && !learner => {
                Some(format!("node {id} is not a member"))
            }
            MemberChange::Remove { .. } if id == leader => Some(format!(
                "node {id} leads; transfer leadership first (tally cluster transfer-leader)"
            )),
            MemberChange::Remove { .. } if voter && conf.voters.len() == 1 => {
                Some("the last voter cannot be removed".into())
            }
            MemberChange::Remove { .. } => None,
        }
    }

    /// The raft conf change and its context (the added replica's addresses).
    pub fn to_conf_change(&self) -> (ConfChangeV2, Vec<u8>) {
        let (change_type, context) = match self {
            MemberChange::Add {
                address, learner, ..
            } => {
                let t = if *learner {
                    ConfChangeType::AddLearnerNode
                } else {
                    ConfChangeType::AddNode
                };
                (t, encode_address(address))
            }
            MemberChange::Promote { .. } => (ConfChangeType::AddNode, Vec::new()),
            MemberChange::Remove { .. } => (ConfChangeType::RemoveNode, Vec::new()),
        };
        let mut single = ConfChangeSingle::default();
        single.set_change_type(change_type);
        single.node_id = self.id();
        let mut cc = ConfChangeV2::default();
        cc.set_changes(vec![single].into());
        cc.context = context.clone().into();
        (cc, context)
    }
}

impl AddressBook {
    /// The book after a committed conf change: an added replica's addresses (from the change's
    /// context), a removed replica forgotten.
    pub fn after(&self, cc: &ConfChangeV2) -> AddressBook {
        let mut book = self.clone();
        for change in cc.get_changes() {
            let id = change.node_id;
            match change.get_change_type() {
                ConfChangeType::RemoveNode => {
                    book.0.remove(&id);
                }
                ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                    if let Ok(address) = decode_address(&cc.context) {
                        book.0.insert(id, address);
                    }
                }
            }
        }
        book
    }

    /// The members of `conf` with their addresses (empty when unknown), voters first.
    pub fn members(&self, conf: &ConfState) -> Vec<Member> {
        let address = |id: &u64| self.0.get(id).cloned().unwrap_or_default();
        let roles = conf
            .voters
            .iter()
            .map(|id| (*id, MemberRole::Voter))
            .chain(conf.learners.iter().map(|id| (*id, MemberRole::Learner)));
        roles
            .map(|(id, role)| {
                let a = address(&id);
                Member {
                    id,
                    role,
                    address: a.peer,
                    client_address: a.client,
                }
            })
            .collect()
    }

    pub fn encode(&self) -> Vec<u8> {
        assert!(self.0.len() <= u16::MAX as usize, "address book too large");
        let mut out = (self.0.len() as u16).to_le_bytes().to_vec();
        for (id, address) in &self.0 {
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&encode_address(address));
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<AddressBook> {
        let mut r = Reader(bytes);
        let count = u16::from_le_bytes(r.take(2)?.try_into().expect("2"));
        let mut book = BTreeMap::new();
        for _ in 0..count {
            let id = u64::from_le_bytes(r.take(8)?.try_into().expect("8"));
            let peer = r.string()?;
            let client = r.string()?;
            book.insert(id, MemberAddress { peer, client });
        }
        if !r.0.is_empty() {
            return Err(corrupt("trailing bytes after the address book"));
        }
        Ok(AddressBook(book))
    }
}

fn encode_address(a: &MemberAddress) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + a.peer.len() + a.client.len());
    for s in [&a.peer, &a.client] {
        let s = &s.as_bytes()[..s.len().min(ADDRESS_BYTES_MAX)];
        out.extend_from_slice(&(s.len() as u16).to_le_bytes());
        out.extend_from_slice(s);
    }
    out
}

fn decode_address(bytes: &[u8]) -> Result<MemberAddress> {
    let mut r = Reader(bytes);
    let peer = r.string()?;
    let client = r.string()?;
    if !r.0.is_empty() {
        return Err(corrupt("trailing bytes after a member address"));
    }
    Ok(MemberAddress { peer, client })
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        if self.0.len() < n {
            return Err(corrupt("truncated membership record"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn string(&mut self) -> Result<String> {
        let len = u16::from_le_bytes(self.take(2)?.try_into().expect("2")) as usize;
        if len > ADDRESS_BYTES_MAX {
            return Err(corrupt("an address longer than 255 bytes"));
        }
        String::from_utf8(self.take(len)?.to_vec()).map_err(|_| corrupt("an address not UTF-8"))
    }
}

fn corrupt(what: &str) -> Error {
    Error::corrupt(format!("membership: {what}"))
}

/// The raft snapshot's data: the ledger summary at the snapshot point, then the address book.
/// A descriptor of exactly `META_BYTES` (written before membership changes existed) has an
/// empty book.
pub fn encode_descriptor(meta: &LedgerMeta, book: &AddressBook) -> Vec<u8> {
    let mut out = meta.encode().to_vec();
    out.extend_from_slice(&book.encode());
    out
}

pub fn decode_descriptor(bytes: &[u8]) -> Result<(LedgerMeta, AddressBook)> {
    if bytes.len() < META_BYTES {
        return LedgerMeta::decode(bytes).map(|m| (m, AddressBook::default()));
    }
    let meta = LedgerMeta::decode(&bytes[..META_BYTES])?;
    let book = if bytes.len() == META_BYTES {
        AddressBook::default()
    } else {
        AddressBook::decode(&bytes[META_BYTES..])?
    };
    Ok((meta, book))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(n: u16) -> MemberAddress {
        MemberAddress {
            peer: format!("10.0.0.{n}:7500"),
            client: format!("10.0.0.{n}:7400"),
        }
    }

    #[test]
    fn the_address_book_follows_conf_changes_and_round_trips() {
        let mut book = AddressBook::default();
        book.0.insert(1, address(1));
        let add = MemberChange::Add {
            id: 4,
            address: address(4),
            learner: true,
        };
        let (cc, _) = add.to_conf_change();
        let book = book.after(&cc);
        assert_eq!(book.0.get(&4), Some(&address(4)));
        let (cc, _) = MemberChange::Remove { id: 1 }.to_conf_change();
        let book = book.after(&cc);
        assert_eq!(book.0.keys().copied().collect::<Vec<_>>(), vec![4]);
        assert_eq!(AddressBook::decode(&book.encode()).unwrap(), book);
        let mut bytes = book.encode();
        bytes.push(0);
        assert!(AddressBook::decode(&bytes).is_err());
        assert!(AddressBook::decode(&book.encode()[..5]).is_err());
    }

    #[test]
    fn changes_are_refused_where_they_cannot_apply() {
        let conf = ConfState {
            voters: vec![1, 2],
            learners: vec![3],
            ..ConfState::default()
        };
        let add = |id| MemberChange::Add {
            id,
            address: address(1),
            learner: true,
        };
        assert!(add(2).refusal(&conf, 1).is_some());
        assert!(add(4).refusal(&conf, 1).is_none());
        assert!(MemberChange::Promote { id: 2 }.refusal(&conf, 1).is_some());
        assert!(MemberChange::Promote { id: 3 }.refusal(&conf, 1).is_none());
        assert!(MemberChange::Remove { id: 1 }.refusal(&conf, 1).is_some());
        assert!(MemberChange::Remove { id: 2 }.refusal(&conf, 1).is_none());
        assert!(MemberChange::Remove { id: 9 }.refusal(&conf, 1).is_some());
    }

    #[test]
    fn descriptors_carry_the_book_and_old_ones_still_read() {
        let meta = LedgerMeta::genesis();
        let mut book = AddressBook::default();
        book.0.insert(2, address(2));
        let (m, b) = decode_descriptor(&encode_descriptor(&meta, &book)).unwrap();
        assert_eq!((m, b), (meta.clone(), book));
        let (m, b) = decode_descriptor(&meta.encode()).unwrap();
        assert_eq!((m, b), (meta, AddressBook::default()));
    }
}
