//! RFC 6962 Merkle trees over receipts, built with rs_merkle and verified independently.
//!
//! Hashing is domain-separated as in RFC 6962 (Certificate Transparency): a leaf hashes as
//! SHA-256(0x00 || leaf bytes) and an interior node as SHA-256(0x01 || left || right). rs_merkle
//! pairs nodes left to right and carries an odd last node up unchanged, which yields exactly the
//! RFC 6962 tree shape (the left subtree is the largest power of two); tests check both against
//! the reference roots and against [`verify_inclusion`], which follows RFC 9162 section 2.1.3.2.

use rs_merkle::{Hasher, MerkleTree};
use tally_wire::{Hash, InclusionProof, RangeProof};

use crate::crypto::sha256;

/// rs_merkle hasher with RFC 6962 node hashing. Leaves are hashed by [`leaf_hash`] before they
/// are handed to rs_merkle, which treats leaves as already hashed.
#[derive(Clone)]
pub struct Rfc6962;

impl Hasher for Rfc6962 {
    type Hash = Hash;

    fn hash(data: &[u8]) -> Hash {
        sha256(&[data])
    }

    fn concat_and_hash(left: &Hash, right: Option<&Hash>) -> Hash {
        match right {
            Some(right) => node_hash(left, right),
            // RFC 6962 carries an unpaired node up unchanged.
            None => *left,
        }
    }
}

pub fn leaf_hash(leaf: &[u8]) -> Hash {
    sha256(&[&[0x00], leaf])
}

pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    sha256(&[&[0x01], left, right])
}

/// The tree hash of the empty list: SHA-256 of the empty string (RFC 6962 section 2.1).
pub fn empty_root() -> Hash {
    sha256(&[])
}

/// A Merkle tree over a batch's leaves (already leaf-hashed).
pub struct Tree {
    tree: MerkleTree<Rfc6962>,
    size: u32,
}

impl Tree {
    pub fn new(leaf_hashes: &[Hash]) -> Tree {
        let size = u32::try_from(leaf_hashes.len()).expect("batch larger than u32::MAX leaves");
        Tree {
            tree: MerkleTree::<Rfc6962>::from_leaves(leaf_hashes),
            size,
        }
    }

    pub fn root(&self) -> Hash {
        self.tree.root().unwrap_or_else(empty_root)
    }

    pub fn proof(&self, index: u32) -> InclusionProof {
        assert!(
            index < self.size,
            "leaf index {index} out of a tree of {}",
            self.size
        );
        let proof = self.tree.proof(&[index as usize]);
        InclusionProof {
            leaf_index: index,
            tree_size: self.size,
            path: proof.proof_hashes().to_vec(),
        }
    }
}

/// A batch's tree kept level by level, for handing out one inclusion proof per request.
///
/// rs_merkle builds the roots that go into headers ([`Tree`]); its `proof` walks the tree and
/// allocates per call, which cost the confirmation stage more than encoding the confirmations.
/// Here each proof is a copy of one sibling per level. The shape is RFC 6962's, built the same
/// way as rs_merkle's (pairs left to right, an unpaired last node carried up unchanged): tests
/// check roots and every proof against [`Tree`] and the RFC's recursion, and the confirmation
/// stage checks the root against the header's before it sends anything.
pub struct ProofTree {
    /// `levels[0]` the leaf hashes, each next level their parents, the last the root alone
    /// (no level at all for an empty tree).
    levels: Vec<Vec<Hash>>,
}

impl ProofTree {
    pub fn new(leaf_hashes: Vec<Hash>) -> ProofTree {
        u32::try_from(leaf_hashes.len()).expect("batch larger than u32::MAX leaves");
        let mut levels = Vec::new();
        if !leaf_hashes.is_empty() {
            levels.push(leaf_hashes);
        }
        while let Some(below) = levels.last().filter(|l| l.len() > 1) {
            let above = below
                .chunks(2)
                .map(|pair| match pair {
                    [left, right] => node_hash(left, right),
                    [odd] => *odd,
                    _ => unreachable!("chunks of two"),
                })
                .collect();
            levels.push(above);
        }
        ProofTree { levels }
    }

    pub fn size(&self) -> u32 {
        self.levels.first().map_or(0, |l| l.len() as u32)
    }

    pub fn root(&self) -> Hash {
        self.levels.last().map_or_else(empty_root, |top| top[0])
    }

    /// The same proof as [`Tree::proof`].
    pub fn proof(&self, index: u32) -> InclusionProof {
        let size = self.size();
        assert!(index < size, "leaf index {index} out of a tree of {size}");
        let mut path = Vec::with_capacity(self.levels.len());
        let mut at = index as usize;
        for level in &self.levels[..self.levels.len() - 1] {
            // An unpaired last node has no sibling on this level: it is carried up.
            if let Some(sibling) = level.get(at ^ 1) {
                path.push(*sibling);
            }
            at /= 2;
        }
        InclusionProof {
            leaf_index: index,
            tree_size: size,
            path,
        }
    }
}

impl ProofTree {
    /// The hash of the RFC 6962 subtree over leaves `lo..hi`, as the tree's recursion splits
    /// it: such a subtree is node `lo >> j` of level `j = ceil(log2(hi - lo))`, since every
    /// level pairs nodes left to right and carries an unpaired last one up unchanged.
    fn subtree(&self, lo: u32, hi: u32) -> Hash {
        let j = (hi - lo).next_power_of_two().trailing_zeros() as usize;
        debug_assert_eq!(lo % (1 << j), 0, "an RFC 6962 subtree is aligned");
        self.levels[j][(lo >> j) as usize]
    }

    /// Proof that leaves `first .. first + count` are in this tree (see [`verify_range`]).
    pub fn range_proof(&self, first: u32, count: u32) -> RangeProof {
        let size = self.size();
        assert!(count >= 1 && first.checked_add(count).is_some_and(|end| end <= size));
        let mut hashes = Vec::new();
        self.collect_range(0, size, first, first + count, &mut hashes);
        RangeProof {
            first,
            count,
            tree_size: size,
            hashes,
        }
    }

    /// Walks the RFC 6962 recursion over `lo..hi`: a subtree outside `a..b` goes into the
    /// proof whole, one inside it the verifier computes from the leaves.
    fn collect_range(&self, lo: u32, hi: u32, a: u32, b: u32, out: &mut Vec<Hash>) {
        if b <= lo || hi <= a {
            out.push(self.subtree(lo, hi));
        } else if !(a <= lo && hi <= b) {
            let k = split(hi - lo);
            self.collect_range(lo, lo + k, a, b, out);
            self.collect_range(lo + k, hi, a, b, out);
        }
    }
}

/// The RFC 6962 split of `n > 1` leaves: the largest power of two less than `n`.
fn split(n: u32) -> u32 {
    debug_assert!(n > 1);
    1 << (31 - (n - 1).leading_zeros())
}

/// RFC 6962 tree hash of already leaf-hashed `leaves`.
fn tree_hash(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = split(n as u32) as usize;
            node_hash(&tree_hash(&leaves[..k]), &tree_hash(&leaves[k..]))
        }
    }
}

/// Verifies a range proof: true iff `leaves` (leaf hashes) are leaves `proof.first ..` of a
/// tree of `proof.tree_size` leaves whose root is `root`, every proof hash used exactly once.
pub fn verify_range(leaves: &[Hash], proof: &RangeProof, root: &Hash) -> bool {
    let (a, n) = (proof.first, proof.tree_size);
    let Some(b) = a.checked_add(proof.count) else {
        return false;
    };
    if proof.count == 0 || leaves.len() != proof.count as usize || b > n {
        return false;
    }
    let mut hashes = proof.hashes.iter();
    let computed = range_root(0, n, a, b, leaves, &mut hashes);
    computed.as_ref() == Some(root) && hashes.next().is_none()
}

fn range_root<'h>(
    lo: u32,
    hi: u32,
    a: u32,
    b: u32,
    leaves: &[Hash],
    hashes: &mut impl Iterator<Item = &'h Hash>,
) -> Option<Hash> {
    if b <= lo || hi <= a {
        return hashes.next().copied();
    }
    if a <= lo && hi <= b {
        return Some(tree_hash(&leaves[(lo - a) as usize..(hi - a) as usize]));
    }
    let k = split(hi - lo);
    let left = range_root(lo, lo + k, a, b, leaves, hashes)?;
    let right = range_root(lo + k, hi, a, b, leaves, hashes)?;
    Some(node_hash(&left, &right))
}

/// Verifies an inclusion proof (RFC 9162, 2.1.3.2): true iff `leaf` is at `proof.leaf_index` of
/// a tree of `proof.tree_size` leaves whose root is `root`.
pub fn verify_inclusion(leaf: &Hash, proof: &InclusionProof, root: &Hash) -> bool {
    crate::tlog::verify_inclusion(
        proof.leaf_index as u64,
        proof.tree_size as u64,
        leaf,
        root,
        &proof.path,
    )
    .is_ok()
}
