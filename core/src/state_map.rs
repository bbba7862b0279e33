//! The state map: an authenticated map of every account and reserve, whose root the state digest
//! of every header commits to (PROTOCOL.md §4.13). It is what makes a balance provable against a
//! signed header.
//!
//! The map is a compact binary sparse Merkle tree over 256-bit paths:
//! - an entry's path is SHA-256 of a domain and its key ([`account_path`], [`reserve_path`]);
//!   its value hash is SHA-256 of its value bytes;
//! - a subtree with no entry hashes to 32 zero bytes ([`EMPTY`]); a subtree with exactly one
//!   entry hashes to that entry's leaf hash, SHA-256(0x00 ‖ path ‖ value hash), wherever it sits;
//!   any other subtree hashes to SHA-256(0x01 ‖ left ‖ right), the left child being the half
//!   whose next path bit (most significant first) is 0.
//!
//! The hash is defined by the set of entries alone, not by the order they came in or how a
//! replica stores them. Here the tree is held in memory and rebuilt from the state when a
//! ledger opens; its nodes are immutable and shared (`Arc`), so a copy of the map, such as the
//! sequencer's speculative one, costs only the nodes it changes. Entries are never removed: an
//! account stays, and a closed reserve stays as a tombstone.
//!
//! Memory: two nodes per entry, about 200 bytes (docs/PERFORMANCE.md has the measured figure).

use std::fmt;
use std::sync::Arc;

use tally_wire::{Hash, PublicKey};

use crate::crypto::sha256;

/// Domain of an account's path.
pub const ACCOUNT_PATH_DOMAIN: &[u8; 16] = b"tally/map/acct\0\0";
/// Domain of a reserve's path.
pub const RESERVE_PATH_DOMAIN: &[u8; 16] = b"tally/map/resv\0\0";
/// The hash of an empty subtree, and the root of an empty map.
pub const EMPTY: Hash = [0; 32];
/// Most siblings a proof can have: one per path bit.
pub const PROOF_DEPTH_MAX: usize = 256;

/// SHA-256(ACCOUNT_PATH_DOMAIN ‖ key).
pub fn account_path(key: &PublicKey) -> Hash {
    sha256(&[ACCOUNT_PATH_DOMAIN, key])
}

/// SHA-256(balance u64 LE): an account's value hash.
pub fn account_value_hash(balance: u64) -> Hash {
    sha256(&[&balance.to_le_bytes()])
}

/// SHA-256(RESERVE_PATH_DOMAIN ‖ owner ‖ id u128 LE).
pub fn reserve_path(owner: &PublicKey, id: u128) -> Hash {
    sha256(&[RESERVE_PATH_DOMAIN, owner, &id.to_le_bytes()])
}

/// SHA-256(0x00 ‖ path ‖ value hash).
pub fn leaf_hash(path: &Hash, value_hash: &Hash) -> Hash {
    sha256(&[&[0], path, value_hash])
}

/// SHA-256(0x01 ‖ left ‖ right).
pub fn inner_hash(left: &Hash, right: &Hash) -> Hash {
    sha256(&[&[1], left, right])
}

/// Bit `depth` of `path`, most significant bit of byte 0 first.
fn bit(path: &Hash, depth: usize) -> bool {
    path[depth / 8] & (0x80 >> (depth % 8)) != 0
}

/// How many leading bits two paths share.
fn common_bits(a: &Hash, b: &Hash) -> usize {
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        if x != y {
            return i * 8 + (x ^ y).leading_zeros() as usize;
        }
    }
    256
}

enum Node {
    Leaf { path: Hash, value_hash: Hash },
    Inner { hash: Hash, left: Link, right: Link },
}

type Link = Option<Arc<Node>>;

fn hash_of(link: &Link) -> Hash {
    match link.as_deref() {
        None => EMPTY,
        Some(Node::Leaf { path, value_hash }) => leaf_hash(path, value_hash),
        Some(Node::Inner { hash, .. }) => *hash,
    }
}

fn inner(left: Link, right: Link) -> Link {
    let hash = inner_hash(&hash_of(&left), &hash_of(&right));
    Some(Arc::new(Node::Inner { hash, left, right }))
}

/// The subtree at `depth` holding exactly `entries` (sorted by path, distinct).
fn build(depth: usize, entries: &[(Hash, Hash)]) -> Link {
    match entries {
        [] => None,
        [(path, value_hash)] => Some(Arc::new(Node::Leaf {
            path: *path,
            value_hash: *value_hash,
        })),
        _ => {
            let split = entries.partition_point(|(p, _)| !bit(p, depth));
            inner(
                build(depth + 1, &entries[..split]),
                build(depth + 1, &entries[split..]),
            )
        }
    }
}

/// `node` (at `depth`) with `changes` written into it (sorted by path, distinct, all under
/// this node's prefix). Nodes off the changed paths are shared, not copied.
fn update(node: &Link, depth: usize, changes: &[(Hash, Hash)]) -> Link {
    if changes.is_empty() {
        return node.clone();
    }
    match node.as_deref() {
        None => build(depth, changes),
        Some(Node::Leaf { path, value_hash }) => {
            match changes.binary_search_by(|(p, _)| p.cmp(path)) {
                Ok(_) => build(depth, changes),
                Err(at) => {
                    let mut all = Vec::with_capacity(changes.len() + 1);
                    all.extend_from_slice(&changes[..at]);
                    all.push((*path, *value_hash));
                    all.extend_from_slice(&changes[at..]);
                    build(depth, &all)
                }
            }
        }
        Some(Node::Inner { left, right, .. }) => {
            let split = changes.partition_point(|(p, _)| !bit(p, depth));
            inner(
                update(left, depth + 1, &changes[..split]),
                update(right, depth + 1, &changes[split..]),
            )
        }
    }
}

#[derive(Clone)]
enum Tree {
    /// The whole tree is in memory.
    Loaded(Link),
    /// Only the root is known (a summary decoded from bytes): the map cannot change or prove
    /// until its owner loads the entries ([`StateMap::load`]).
    Unloaded(Hash),
}

/// The state map; see the module documentation. Writes are buffered and folded into the tree
/// in one pass by [`StateMap::flush`], so that a batch's changes share their hashing.
#[derive(Clone)]
pub struct StateMap {
    tree: Tree,
    /// (path, value hash) written since the last flush, in write order.
    pending: Vec<(Hash, Hash)>,
}

impl StateMap {
    pub fn empty() -> StateMap {
        StateMap {
            tree: Tree::Loaded(None),
            pending: Vec::new(),
        }
    }

    /// A map known only by its root.
    pub fn unloaded(root: Hash) -> StateMap {
        StateMap {
            tree: Tree::Unloaded(root),
            pending: Vec::new(),
        }
    }

    /// A map of exactly `entries` (path, value hash; any order, each path once).
    pub fn from_entries(mut entries: Vec<(Hash, Hash)>) -> StateMap {
        entries.sort_unstable_by_key(|e| e.0);
        assert!(
            entries.windows(2).all(|w| w[0].0 != w[1].0),
            "a state map entry appears twice"
        );
        StateMap {
            tree: Tree::Loaded(build(0, &entries)),
            pending: Vec::new(),
        }
    }

    pub fn is_loaded(&self) -> bool {
        matches!(self.tree, Tree::Loaded(_))
    }

    /// Replaces an unloaded map with `loaded` if their roots agree; false if they do not.
    pub fn load(&mut self, loaded: StateMap) -> bool {
        let Tree::Unloaded(root) = self.tree else {
            return self.root() == loaded.root();
        };
        if loaded.root() != root {
            return false;
        }
        *self = loaded;
        true
    }

    /// Sets the entry at `path` (buffered until [`StateMap::flush`]).
    pub fn set(&mut self, path: Hash, value_hash: Hash) {
        self.pending.push((path, value_hash));
    }

    pub fn set_account(&mut self, key: &PublicKey, balance: u64) {
        self.set(account_path(key), account_value_hash(balance));
    }

    pub fn set_reserve(&mut self, owner: &PublicKey, id: u128, record: &[u8]) {
        self.set(reserve_path(owner, id), sha256(&[record]));
    }

    /// Folds the buffered writes into the tree (the last write of a path wins).
    pub fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let Tree::Loaded(root) = &self.tree else {
            panic!("the state map changed before its entries were loaded");
        };
        let mut changes = std::mem::take(&mut self.pending);
        // Stable: among writes of one path, the last stays last; keep it.
        changes.sort_by_key(|c| c.0);
        let mut last: Vec<(Hash, Hash)> = Vec::with_capacity(changes.len());
        for c in changes {
            match last.last_mut() {
                Some(l) if l.0 == c.0 => *l = c,
                _ => last.push(c),
            }
        }
        self.tree = Tree::Loaded(update(root, 0, &last));
    }

    /// The root hash. The map must be flushed.
    pub fn root(&self) -> Hash {
        assert!(
            self.pending.is_empty(),
            "the state map has unflushed writes"
        );
        match &self.tree {
            Tree::Loaded(root) => hash_of(root),
            Tree::Unloaded(root) => *root,
        }
    }

    /// The proof of what the map holds at `path`. None if the map is not loaded.
    pub fn prove(&self, path: &Hash) -> Option<MapProof> {
        assert!(
            self.pending.is_empty(),
            "the state map has unflushed writes"
        );
        let Tree::Loaded(mut node) = self.tree.clone() else {
            return None;
        };
        let mut siblings = Vec::new();
        let mut depth = 0;
        let neighbor = loop {
            match node.as_deref() {
                None => break None,
                Some(Node::Leaf {
                    path: p,
                    value_hash,
                }) => {
                    break (p != path).then_some((*p, *value_hash));
                }
                Some(Node::Inner { left, right, .. }) => {
                    let (next, other) = if bit(path, depth) {
                        (right, left)
                    } else {
                        (left, right)
                    };
                    siblings.push(hash_of(other));
                    node = next.clone();
                    depth += 1;
                }
            }
        };
        siblings.reverse();
        Some(MapProof { siblings, neighbor })
    }
}

impl StateMap {
    /// The proof of `key`'s account entry. None if the map is not loaded.
    pub fn prove_account(&self, key: &PublicKey) -> Option<MapProof> {
        self.prove(&account_path(key))
    }
}

impl PartialEq for StateMap {
    fn eq(&self, other: &StateMap) -> bool {
        self.pending == other.pending && self.root_unchecked() == other.root_unchecked()
    }
}

impl Eq for StateMap {}

impl StateMap {
    fn root_unchecked(&self) -> Hash {
        match &self.tree {
            Tree::Loaded(root) => hash_of(root),
            Tree::Unloaded(root) => *root,
        }
    }
}

impl fmt::Debug for StateMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateMap")
            .field("root", &hex::encode(self.root_unchecked()))
            .field("loaded", &self.is_loaded())
            .field("pending", &self.pending.len())
            .finish()
    }
}

/// What the map holds at one path, provable against its root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapProof {
    /// The siblings from the proved position up to the root (bottom first); their count is
    /// the depth of the position.
    pub siblings: Vec<Hash>,
    /// For a path the map does not hold: the entry (path, value hash) that sits where the path
    /// leads, if any (else the position is empty).
    pub neighbor: Option<(Hash, Hash)>,
}

impl MapProof {
    /// Whether the map with root `root` holds `value_hash` at `path` (Some) or holds nothing
    /// there (None).
    pub fn verify(&self, root: &Hash, path: &Hash, value_hash: Option<&Hash>) -> bool {
        let depth = self.siblings.len();
        if depth > PROOF_DEPTH_MAX {
            return false;
        }
        let mut node = match (value_hash, &self.neighbor) {
            (Some(v), None) => leaf_hash(path, v),
            (Some(_), Some(_)) => return false,
            (None, None) => EMPTY,
            (None, Some((other, v))) => {
                if other == path || common_bits(other, path) < depth {
                    return false;
                }
                leaf_hash(other, v)
            }
        };
        for (i, sibling) in self.siblings.iter().enumerate() {
            node = if bit(path, depth - 1 - i) {
                inner_hash(sibling, &node)
            } else {
                inner_hash(&node, sibling)
            };
        }
        &node == root
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn h(n: u64) -> Hash {
        sha256(&[&n.to_le_bytes()])
    }

    /// The definition, computed from scratch over a sorted map.
    fn reference(entries: &BTreeMap<Hash, Hash>) -> Hash {
        fn sub(depth: usize, e: &[(Hash, Hash)]) -> Hash {
            match e {
                [] => EMPTY,
                [(p, v)] => leaf_hash(p, v),
                _ => {
                    let lo: Vec<_> = e.iter().filter(|(p, _)| !bit(p, depth)).cloned().collect();
                    let hi: Vec<_> = e.iter().filter(|(p, _)| bit(p, depth)).cloned().collect();
                    inner_hash(&sub(depth + 1, &lo), &sub(depth + 1, &hi))
                }
            }
        }
        let v: Vec<_> = entries.iter().map(|(p, v)| (*p, *v)).collect();
        sub(0, &v)
    }

    #[test]
    fn empty_and_single_entry_roots() {
        let mut m = StateMap::empty();
        assert_eq!(m.root(), EMPTY);
        m.set(h(1), h(2));
        m.flush();
        assert_eq!(m.root(), leaf_hash(&h(1), &h(2)));
    }

    #[test]
    fn paths_sharing_a_long_prefix_nest_deep() {
        let mut a = [0u8; 32];
        let mut b = [0u8; 32];
        a[31] = 0;
        b[31] = 1; // differ only in the last bit
        let m = StateMap::from_entries(vec![(a, h(1)), (b, h(2))]);
        let p = m.prove(&b).expect("loaded");
        assert_eq!(p.siblings.len(), 256);
        assert!(p.verify(&m.root(), &b, Some(&h(2))));
        assert!(!p.verify(&m.root(), &b, Some(&h(3))));
    }

    #[test]
    fn an_unloaded_map_loads_only_its_own_entries() {
        let full = StateMap::from_entries(vec![(h(1), h(2)), (h(3), h(4))]);
        let mut m = StateMap::unloaded(full.root());
        assert!(!m.load(StateMap::from_entries(vec![(h(1), h(2))])));
        assert!(!m.is_loaded());
        assert!(m.load(full.clone()));
        assert!(m.is_loaded() && m == full);
    }

    proptest! {
        #[test]
        fn incremental_updates_match_the_definition_and_prove(
            rounds in prop::collection::vec(
                prop::collection::vec((0u64..200, 0u64..5), 0..40), 1..8),
            probes in prop::collection::vec(0u64..260, 1..20),
        ) {
            let mut map = StateMap::empty();
            let mut model = BTreeMap::new();
            let mut copies = Vec::new();
            for round in &rounds {
                copies.push((map.clone(), reference(&model)));
                for &(k, v) in round {
                    map.set(h(k), h(1000 + v));
                    model.insert(h(k), h(1000 + v));
                }
                map.flush();
                prop_assert_eq!(map.root(), reference(&model));
            }
            // Earlier copies are untouched by later writes (nodes are shared, never mutated).
            for (copy, root) in copies {
                prop_assert_eq!(copy.root(), root);
            }
            let rebuilt = StateMap::from_entries(model.iter().map(|(p, v)| (*p, *v)).collect());
            prop_assert_eq!(rebuilt.root(), map.root());
            for k in probes {
                let path = h(k);
                let proof = map.prove(&path).expect("loaded");
                let held = model.get(&path);
                prop_assert!(proof.verify(&map.root(), &path, held));
                // The opposite claim never verifies.
                let other = h(999_999);
                let lie = if held.is_some() { None } else { Some(&other) };
                prop_assert!(!proof.verify(&map.root(), &path, lie));
                if let Some(v) = held {
                    let wrong = h(7_777);
                    prop_assert!(v == &wrong || !proof.verify(&map.root(), &path, Some(&wrong)));
                }
            }
        }
    }

    #[test]
    fn a_neighbor_cannot_stand_in_for_the_entry_itself() {
        // Two entries; proving absence of one by naming the other as the neighbor must fail.
        let m = StateMap::from_entries(vec![(h(1), h(10)), (h(2), h(20))]);
        let real = m.prove(&h(1)).expect("loaded");
        let forged = MapProof {
            siblings: real.siblings.clone(),
            neighbor: Some((h(2), h(20))),
        };
        assert!(!forged.verify(&m.root(), &h(1), None));
        let mut tampered = real.clone();
        if let Some(s) = tampered.siblings.first_mut() {
            s[0] ^= 1;
        }
        assert!(!tampered.verify(&m.root(), &h(1), Some(&h(10))));
    }
}
