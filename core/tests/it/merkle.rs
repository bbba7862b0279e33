//! RFC 6962 Merkle trees: the Certificate Transparency reference vectors, then every leaf of every
//! tree up to 70 leaves against an independent recursive implementation written here.

use sha2::{Digest, Sha256};
use tally_core::merkle::{empty_root, leaf_hash, node_hash, verify_inclusion, ProofTree, Tree};
use tally_wire::{Hash, InclusionProof};

/// The leaves of the CT reference tests (certificate-transparency, trillian, transparency-dev).
const CT_LEAVES: [&str; 8] = [
    "",
    "00",
    "10",
    "2021",
    "3031",
    "40414243",
    "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
];

/// The tree head over the first `n` of [`CT_LEAVES`], for n = 0..=8.
const CT_ROOTS: [&str; 9] = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
];

/// Known audit paths from the same test suites: (leaf index, tree size, path).
const CT_PROOFS: &[(u32, u32, &[&str])] = &[
    (0, 1, &[]),
    (
        0,
        8,
        &[
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        5,
        8,
        &[
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        2,
        3,
        &["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
    ),
    (
        1,
        5,
        &[
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
];

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s).expect("test vector is hex")
}

fn unhex32(s: &str) -> Hash {
    unhex(s).try_into().expect("test vector is 32 bytes")
}

// An independent RFC 6962 implementation, straight from section 2.1 of the RFC, sharing no code
// with tally-core.

fn sha(parts: &[&[u8]]) -> Hash {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

fn ref_leaf(data: &[u8]) -> Hash {
    sha(&[&[0x00], data])
}

fn ref_node(left: &Hash, right: &Hash) -> Hash {
    sha(&[&[0x01], left, right])
}

/// The largest power of two smaller than `n` (n >= 2).
fn split(n: usize) -> usize {
    let mut k = 1;
    while k * 2 < n {
        k *= 2;
    }
    k
}

/// MTH(D[n]) over already leaf-hashed entries.
fn mth(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => sha(&[]),
        1 => leaves[0],
        n => {
            let k = split(n);
            ref_node(&mth(&leaves[..k]), &mth(&leaves[k..]))
        }
    }
}

/// PATH(m, D[n]): the audit path, bottom up.
fn ref_path(m: usize, leaves: &[Hash]) -> Vec<Hash> {
    let n = leaves.len();
    if n == 1 {
        return Vec::new();
    }
    let k = split(n);
    let (mut path, sibling) = if m < k {
        (ref_path(m, &leaves[..k]), mth(&leaves[k..]))
    } else {
        (ref_path(m - k, &leaves[k..]), mth(&leaves[..k]))
    };
    path.push(sibling);
    path
}

/// Every leaf's PATH at once, with the root: the same recursion as [`ref_path`], without
/// hashing each subtree once per leaf.
fn ref_paths(leaves: &[Hash]) -> (Vec<Vec<Hash>>, Hash) {
    let n = leaves.len();
    if n == 1 {
        return (vec![Vec::new()], leaves[0]);
    }
    let k = split(n);
    let (mut left, left_root) = ref_paths(&leaves[..k]);
    let (mut right, right_root) = ref_paths(&leaves[k..]);
    left.iter_mut().for_each(|p| p.push(right_root));
    right.iter_mut().for_each(|p| p.push(left_root));
    left.append(&mut right);
    (left, ref_node(&left_root, &right_root))
}

/// The shape of leaf `m`'s audit path in a tree of `n` leaves: for each level, bottom up, whether
/// the sibling is on the right. Two (index, size) pairs with the same shape fold the same path into
/// the same root, so a verifier cannot tell them apart from the path alone.
fn shape(m: usize, n: usize) -> Vec<bool> {
    if n == 1 {
        return Vec::new();
    }
    let k = split(n);
    let (mut s, right) = if m < k {
        (shape(m, k), true)
    } else {
        (shape(m - k, n - k), false)
    };
    s.push(right);
    s
}

#[test]
fn hashing_is_rfc6962() {
    for data in CT_LEAVES {
        let data = unhex(data);
        assert_eq!(
            leaf_hash(&data),
            ref_leaf(&data),
            "leaf hash of {data:02x?}"
        );
    }
    let (a, b) = (ref_leaf(b"a"), ref_leaf(b"b"));
    assert_eq!(node_hash(&a, &b), ref_node(&a, &b));
    assert_eq!(empty_root(), unhex32(CT_ROOTS[0]));
}

#[test]
fn ct_reference_roots() {
    let leaves: Vec<Hash> = CT_LEAVES.iter().map(|d| leaf_hash(&unhex(d))).collect();
    let check = |n: usize, expected: &str| {
        let expected = unhex32(expected);
        assert_eq!(
            mth(&leaves[..n]),
            expected,
            "reference MTH of the first {n} CT leaves"
        );
        assert_eq!(
            Tree::new(&leaves[..n]).root(),
            expected,
            "Tree root of the first {n} CT leaves"
        );
    };
    for (n, root) in CT_ROOTS.iter().enumerate() {
        check(n, root);
    }
}

#[test]
fn ct_reference_proofs() {
    let leaves: Vec<Hash> = CT_LEAVES.iter().map(|d| leaf_hash(&unhex(d))).collect();
    let check = |index: u32, size: u32, expected: &[&str]| {
        let expected: Vec<Hash> = expected.iter().map(|h| unhex32(h)).collect();
        let tree_leaves = &leaves[..size as usize];
        let proof = Tree::new(tree_leaves).proof(index);
        let what = format!("leaf {index} of {size}");
        assert_eq!(
            ProofTree::new(tree_leaves.to_vec()).proof(index),
            proof,
            "ProofTree, {what}"
        );
        assert_eq!(
            proof,
            InclusionProof {
                leaf_index: index,
                tree_size: size,
                path: expected.clone()
            },
            "{what}"
        );
        assert_eq!(
            ref_path(index as usize, tree_leaves),
            expected,
            "reference path, {what}"
        );
        let root = unhex32(CT_ROOTS[size as usize]);
        assert!(
            verify_inclusion(&leaves[index as usize], &proof, &root),
            "{what} verifies"
        );
    };
    for (index, size, path) in CT_PROOFS {
        check(*index, *size, path);
    }
}

/// A good proof verifies, and every way of spoiling it that a verifier must notice is refused.
/// Each verification costs some 10 µs in a debug build, so the spoilers are the Certificate
/// Transparency test suite's (neighbouring indices and sizes, doubled and halved sizes) rather
/// than every possible value.
fn check_proof(tree: &Tree, leaves: &[Hash], i: usize, expected_path: &[Hash], root: &Hash) {
    let n = leaves.len();
    let what = format!("leaf {i} of {n}");
    let proof = tree.proof(i as u32);
    assert_eq!(
        (proof.leaf_index, proof.tree_size),
        (i as u32, n as u32),
        "{what}"
    );
    assert_eq!(proof.path, expected_path, "{what}: audit path");
    let leaf = leaves[i];
    assert!(verify_inclusion(&leaf, &proof, root), "{what}: good proof");

    // `how` is only formatted on failure.
    let rejects = |p: &InclusionProof, leaf: &Hash, root: &Hash, how: std::fmt::Arguments| {
        assert!(
            !verify_inclusion(leaf, p, root),
            "{what}: accepted with {how}"
        );
    };
    let with_path = |path: Vec<Hash>| InclusionProof {
        path,
        ..proof.clone()
    };

    for k in 0..proof.path.len() {
        let mut path = proof.path.clone();
        path[k][0] ^= 0x08;
        rejects(
            &with_path(path),
            &leaf,
            root,
            format_args!("path[{k}] flipped"),
        );
        let mut path = proof.path.clone();
        path.remove(k);
        rejects(
            &with_path(path),
            &leaf,
            root,
            format_args!("path[{k}] dropped"),
        );
    }
    let mut path = proof.path.clone();
    path.push(*root);
    rejects(
        &with_path(path),
        &leaf,
        root,
        format_args!("the root appended"),
    );
    let mut path = proof.path.clone();
    path.insert(0, [0; 32]);
    rejects(
        &with_path(path),
        &leaf,
        root,
        format_args!("a zero hash prepended"),
    );

    let others = |x: usize| {
        let mut v: Vec<usize> = [
            x.wrapping_sub(1),
            x + 1,
            x + 2,
            x ^ 1,
            x ^ 2,
            2 * x,
            x / 2,
            0,
            n - 1,
            n,
            u32::MAX as usize,
        ]
        .into();
        v.retain(|y| *y <= u32::MAX as usize);
        v.sort_unstable();
        v.dedup();
        v
    };
    for j in others(i).into_iter().filter(|j| *j != i) {
        let p = InclusionProof {
            leaf_index: j as u32,
            ..proof.clone()
        };
        rejects(&p, &leaf, root, format_args!("leaf index {j}"));
    }
    // A different tree size is refused unless it gives this leaf the very same path shape (e.g.
    // leaf 0 of 5 and of 6): then only the root tells the sizes apart, which is why a
    // confirmation's proof must name the header's own request count (see `verify_confirmation`).
    for m in others(n).into_iter().chain([i, i + 1]).filter(|m| *m != n) {
        let p = InclusionProof {
            tree_size: m as u32,
            ..proof.clone()
        };
        let aliases = i < m && shape(i, m) == shape(i, n);
        assert_eq!(
            verify_inclusion(&leaf, &p, root),
            aliases,
            "{what}: tree size {m}"
        );
    }

    let mut other = leaf;
    other[7] ^= 1;
    rejects(&proof, &other, root, format_args!("a modified leaf"));
    if n > 1 {
        let j = if i + 1 < n { i + 1 } else { i - 1 };
        rejects(
            &proof,
            &leaves[j],
            root,
            format_args!("leaf {j} in place of leaf {i}"),
        );
    }
    let mut bad_root = *root;
    bad_root[31] ^= 1;
    rejects(&proof, &leaf, &bad_root, format_args!("a modified root"));
    rejects(&proof, &leaf, &empty_root(), format_args!("the empty root"));
}

#[test]
fn every_leaf_of_every_tree_up_to_70() {
    let all: Vec<Hash> = (0..70u32).map(|i| leaf_hash(&i.to_le_bytes())).collect();
    for n in 1..=all.len() {
        let leaves = &all[..n];
        let tree = Tree::new(leaves);
        let (paths, root) = ref_paths(leaves);
        assert_eq!(tree.root(), root, "root of a tree of {n} leaves");
        assert_eq!(
            root,
            mth(leaves),
            "the two reference recursions, {n} leaves"
        );
        for i in [0, n / 2, n - 1] {
            assert_eq!(
                paths[i],
                ref_path(i, leaves),
                "the two reference recursions, leaf {i} of {n}"
            );
        }
        for (i, path) in paths.iter().enumerate() {
            check_proof(&tree, leaves, i, path, &root);
        }
        let levels = ProofTree::new(leaves.to_vec());
        assert_eq!(
            (levels.root(), levels.size()),
            (root, n as u32),
            "ProofTree of {n}"
        );
        for (i, path) in paths.iter().enumerate() {
            let proof = levels.proof(i as u32);
            assert_eq!(proof, tree.proof(i as u32), "ProofTree, leaf {i} of {n}");
            assert_eq!(
                &proof.path, path,
                "ProofTree, leaf {i} of {n}: reference path"
            );
        }
    }
}

#[test]
fn tree_size_aliasing_exists_and_is_what_the_oracle_says() {
    // Makes sure the exception in `check_proof` is real and narrow: leaf 0 of 5 has the path
    // shape of leaf 0 of 6, 7 and 8, so its proof verifies for those sizes against the 5-root.
    assert_eq!(shape(0, 5), shape(0, 6));
    assert_ne!(shape(4, 5), shape(4, 6));
    let leaves: Vec<Hash> = (0..5u32).map(|i| leaf_hash(&i.to_le_bytes())).collect();
    let tree = Tree::new(&leaves);
    let proof = InclusionProof {
        tree_size: 6,
        ..tree.proof(0)
    };
    assert!(verify_inclusion(&leaves[0], &proof, &tree.root()));
    let proof = InclusionProof {
        tree_size: 6,
        ..tree.proof(4)
    };
    assert!(!verify_inclusion(&leaves[4], &proof, &tree.root()));
}

#[test]
fn degenerate_proofs_are_refused() {
    let leaf = leaf_hash(b"x");
    let check = |index: u32, size: u32, path: Vec<Hash>, root: Hash| {
        let p = InclusionProof {
            leaf_index: index,
            tree_size: size,
            path,
        };
        assert!(
            !verify_inclusion(&leaf, &p, &root),
            "index {index} of {size}"
        );
    };
    check(0, 0, vec![], leaf);
    check(0, 0, vec![], empty_root());
    check(1, 1, vec![], leaf);
    check(2, 1, vec![], leaf);
    check(0, 1, vec![leaf], node_hash(&leaf, &leaf));
    check(0, 2, vec![], leaf);
}

#[test]
#[should_panic(expected = "out of a tree")]
fn proof_of_a_leaf_past_the_end_is_a_programmer_error() {
    Tree::new(&[leaf_hash(b"a")]).proof(1);
}

#[test]
#[should_panic(expected = "out of a tree")]
fn proof_tree_refuses_a_leaf_past_the_end() {
    ProofTree::new(vec![leaf_hash(b"a"), leaf_hash(b"b")]).proof(2);
}

#[test]
fn empty_proof_tree_has_the_empty_root() {
    let tree = ProofTree::new(Vec::new());
    assert_eq!((tree.root(), tree.size()), (empty_root(), 0));
    assert_eq!(Tree::new(&[]).root(), empty_root());
}

#[test]
fn proof_tree_matches_rs_merkle_on_batch_sized_trees() {
    // Sizes around the batch cap and powers of two, where an unpaired node is carried up
    // through many levels.
    for n in [255usize, 256, 257, 1023, 4095, 4096, 4097, 8191] {
        let leaves: Vec<Hash> = (0..n as u32).map(|i| leaf_hash(&i.to_le_bytes())).collect();
        let tree = Tree::new(&leaves);
        let levels = ProofTree::new(leaves.clone());
        assert_eq!(levels.root(), tree.root(), "root of {n}");
        for i in [0, 1, n / 2, n - 2, n - 1] {
            let proof = levels.proof(i as u32);
            assert_eq!(proof, tree.proof(i as u32), "leaf {i} of {n}");
            assert!(
                verify_inclusion(&leaves[i], &proof, &tree.root()),
                "leaf {i} of {n}"
            );
        }
    }
}
