//! The archive's transparency log (`tally_core::tlog`): tile paths against the tlog-tiles spec,
//! entry bundles valid and broken, the incremental [`TileLog`] against [`all_tiles`] and the
//! RFC 6962 recursion, resuming from stored tiles (and refusing corrupt ones), RFC 9162 proofs
//! against the Certificate Transparency vectors and exhaustively, checkpoints, and signed notes
//! against the vectors of the signed-note spec and Go's `golang.org/x/mod/sumdb/note` tests.
//!
//! Randomized: replay a failure with `TALLY_SEED=<seed> cargo test -p tally-core --test it
//! tlog`.

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ed25519_dalek::{SigningKey, VerifyingKey};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tally_core::tlog::{
    all_tiles, completed_at, consistency_proof, consistency_proof_by, decode_entry_bundle,
    encode_entry_bundle, entries_path, inclusion_proof, inclusion_proof_by, leaf_hash,
    nodes_completed, note_key_id, note_verifier_key, open_note, origin_for, root_by, root_of,
    sign_note, tile_path, verify_consistency, verify_inclusion, Checkpoint, TileLog, TlogError,
    TreeEdge,
};
use tally_wire::Hash;

use crate::common::seed;

/// Cheap, distinct leaves of varying length.
fn leaves(n: u64) -> Vec<Vec<u8>> {
    (0..n).map(|i| format!("header {i}").into_bytes()).collect()
}

fn refs(leaves: &[Vec<u8>]) -> Vec<&[u8]> {
    leaves.iter().map(Vec::as_slice).collect()
}

fn hashes(leaves: &[Vec<u8>]) -> Vec<Hash> {
    leaves.iter().map(|l| leaf_hash(l)).collect()
}

fn unhex32(s: &str) -> Hash {
    hex::decode(s).expect("hex").try_into().expect("32 bytes")
}

type Tiles = BTreeMap<String, Vec<u8>>;

// ---------------------------------------------------------------------------------------------
// Paths and bundles.

#[test]
fn tile_paths() {
    fn check(level: u8, index: u64, width: u64, expected: &str) {
        assert_eq!(tile_path(level, index, width), expected);
    }
    check(0, 0, 256, "tile/0/000");
    check(0, 1234067, 256, "tile/0/x001/x234/067"); // The spec's example.
    check(3, 1234067, 256, "tile/3/x001/x234/067");
    check(1, 5, 17, "tile/1/005.p/17");
    check(0, 999, 255, "tile/0/999.p/255");
    check(2, 1000, 1, "tile/2/x001/000.p/1");
    check(0, 1_000_000, 256, "tile/0/x001/x000/000");
    check(
        63,
        u64::MAX,
        256,
        "tile/63/x018/x446/x744/x073/x709/x551/615",
    );
    assert_eq!(entries_path(1234067, 256), "tile/entries/x001/x234/067");
    assert_eq!(entries_path(0, 7), "tile/entries/000.p/7");
    assert_eq!(entries_path(12, 255), "tile/entries/012.p/255");
}

#[test]
#[should_panic(expected = "tile width 0")]
fn empty_tiles_have_no_path() {
    tile_path(0, 0, 0);
}

#[test]
#[should_panic(expected = "tile width 257")]
fn tiles_are_at_most_256_wide() {
    entries_path(0, 257);
}

/// The spec's examples: 70,000 leaves are 273 full level-0 tiles, one partial of width 112, one
/// full level-1 tile, one partial of width 17 and a level-2 partial of width 1; 256 leaves are a
/// full level-0 tile and a level-1 partial of width 1.
#[test]
fn tile_sets_of_the_spec_examples() {
    let all = leaves(70_000);
    let (tiles, _) = all_tiles(&refs(&all));
    let paths: Vec<&str> = tiles.iter().map(|(p, _)| p.as_str()).collect();
    let full0 = paths
        .iter()
        .filter(|p| p.starts_with("tile/0/") && !p.contains(".p/"))
        .count();
    assert_eq!(full0, 273);
    let rest: Vec<&str> = paths
        .iter()
        .copied()
        .filter(|p| !p.starts_with("tile/0/") || p.contains(".p/"))
        .filter(|p| !p.starts_with("tile/entries/") || p.contains(".p/"))
        .collect();
    assert_eq!(
        rest,
        [
            "tile/entries/273.p/112",
            "tile/0/273.p/112",
            "tile/1/000",
            "tile/1/001.p/17",
            "tile/2/000.p/1"
        ]
    );
    let (tiles, _) = all_tiles(&refs(&all[..256]));
    let paths: Vec<&str> = tiles.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(paths, ["tile/entries/000", "tile/0/000", "tile/1/000.p/1"]);
}

#[test]
fn entry_bundles() {
    assert_eq!(encode_entry_bundle(&[b"a", b""]), [0, 1, b'a', 0, 0]);
    let long = vec![0xab; 65_535];
    let many: Vec<Vec<u8>> = (0..256u32).map(|i| i.to_be_bytes().to_vec()).collect();
    let cases: Vec<Vec<&[u8]>> = vec![
        vec![],
        vec![b""],
        vec![b"a", b"", b"bc"],
        vec![&long, b"x"],
        refs(&many),
    ];
    for entries in cases {
        let bytes = encode_entry_bundle(&entries);
        let decoded = decode_entry_bundle(&bytes).expect("round trip");
        assert_eq!(refs(&decoded), entries);
        // Every cut inside an entry or its length prefix is malformed; cuts between entries
        // decode to the entries before them.
        let mut boundaries = vec![0];
        for e in &entries {
            boundaries.push(boundaries.last().unwrap() + 2 + e.len());
        }
        for cut in (0..bytes.len()).step_by(1 + bytes.len() / 4096) {
            let result = decode_entry_bundle(&bytes[..cut]);
            match boundaries.iter().position(|b| *b == cut) {
                Some(n) => assert_eq!(refs(&result.expect("boundary")), entries[..n]),
                None => assert!(
                    matches!(result, Err(TlogError::BundleMalformed { .. })),
                    "cut at {cut} of {} accepted",
                    bytes.len()
                ),
            }
        }
    }
    let mut over = encode_entry_bundle(&refs(&many));
    over.extend_from_slice(&[0, 0]);
    assert!(matches!(
        decode_entry_bundle(&over),
        Err(TlogError::BundleMalformed { .. })
    ));
}

#[test]
#[should_panic(expected = "ENTRY_BYTES_MAX")]
fn oversized_entries_do_not_encode() {
    encode_entry_bundle(&[&vec![0; 65_536]]);
}

// ---------------------------------------------------------------------------------------------
// The tiled log.

/// The leaves of the CT reference tests and the tree head over the first n of them.
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

fn ct_leaves() -> Vec<Vec<u8>> {
    CT_LEAVES.iter().map(|l| hex::decode(l).unwrap()).collect()
}

#[test]
fn roots_match_the_ct_vectors() {
    let leaves = ct_leaves();
    let mut log = TileLog::empty();
    for (n, expected) in CT_ROOTS.iter().enumerate() {
        assert_eq!(
            root_of(&hashes(&leaves[..n])),
            unhex32(expected),
            "root_of {n}"
        );
        assert_eq!(log.root(), unhex32(expected), "TileLog of {n}");
        if n < leaves.len() {
            log.append(&leaves[n]);
        }
    }
}

/// Sizes around every tile boundary up to level 2.
const SIZES: &[u64] = &[
    0, 1, 2, 3, 7, 8, 9, 255, 256, 257, 300, 511, 512, 513, 767, 768, 4096, 65_535, 65_536, 65_537,
    70_000,
];

/// Appending one leaf at a time, the root and the tiles at each size in [`SIZES`] equal the
/// reference recursion's root and [`all_tiles`], path for path and in the same order.
#[test]
fn appends_match_the_reference() {
    let all = leaves(*SIZES.last().unwrap());
    let mut log = TileLog::empty();
    for &n in SIZES {
        while log.size() < n {
            log.append(&all[log.size() as usize]);
        }
        let (tiles, root) = all_tiles(&refs(&all[..n as usize]));
        assert_eq!(log.root(), root, "root at {n}");
        assert_eq!(log.tiles_since(0), tiles, "tiles at {n}");
    }
}

/// Tiles are written in an order that never publishes a tile before the ones below it.
fn assert_write_order(tiles: &[(String, Vec<u8>)], context: &str) {
    let rank = |path: &str| match path.strip_prefix("tile/entries/") {
        Some(_) => 0,
        None => 1 + path.split('/').nth(1).unwrap().parse::<u32>().unwrap(),
    };
    let ranks: Vec<u32> = tiles.iter().map(|(p, _)| rank(p)).collect();
    assert!(
        ranks.windows(2).all(|w| w[0] <= w[1]),
        "{context}: {ranks:?}"
    );
}

/// A store written by successive `tiles_since` holds every tile of [`all_tiles`], and besides
/// them only older partial tiles, each a prefix of its tile now. Returns the root of `leaves`.
fn assert_store_holds(store: &Tiles, leaves: &[Vec<u8>], context: &str) -> Hash {
    let (tiles, root) = all_tiles(&refs(leaves));
    let expected: Tiles = tiles.into_iter().collect();
    for (path, bytes) in &expected {
        assert_eq!(store.get(path), Some(bytes), "{context}: {path}");
    }
    for (path, bytes) in store.iter().filter(|(p, _)| !expected.contains_key(*p)) {
        let (tile, _) = path
            .split_once(".p/")
            .unwrap_or_else(|| panic!("{context}: stray full tile {path}"));
        let now = expected
            .iter()
            .find(|(p, _)| p.split(".p/").next() == Some(tile))
            .unwrap_or_else(|| panic!("{context}: stray tile {path}"));
        assert!(now.1.starts_with(bytes), "{context}: stale {path}");
    }
    root
}

/// Writes the leaves in random steps, merging each step's tiles into a store, now and then
/// trimming the log: the store ends up as the whole archive.
#[test]
fn incremental_writes_make_the_archive() {
    let seed = seed();
    println!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let all = leaves(70_000);
    for round in 0..4 {
        let total = if round == 0 {
            all.len()
        } else {
            rng.gen_range(0..3_000)
        };
        let context = format!("seed {seed}, round {round}, {total} leaves");
        let mut log = TileLog::empty();
        let mut store = Tiles::new();
        let mut written = 0;
        while written < total as u64 {
            let step = match rng.gen_range(0..4) {
                0 => 1,
                1 => rng.gen_range(1..300),
                _ => rng.gen_range(1..3_000),
            };
            for leaf in &all[written as usize..(written as usize + step).min(total)] {
                log.append(leaf);
            }
            let tiles = log.tiles_since(written);
            assert_write_order(&tiles, &context);
            store.extend(tiles);
            written = log.size();
            if rng.gen_bool(0.5) {
                log.trim();
            }
        }
        let root = assert_store_holds(&store, &all[..total], &context);
        assert_eq!(log.root(), root, "{context}");
    }
}

/// The right-edge tiles a log of `size` leaves is resumed from, worked out from the spec.
fn right_edge(size: u64) -> Vec<String> {
    let mut paths = Vec::new();
    if size % 256 > 0 {
        paths.push(entries_path(size / 256, size % 256));
    }
    for level in 0..8u8 {
        let count = size >> (8 * level as u32);
        if count % 256 > 0 {
            paths.push(tile_path(level, count / 256, count % 256));
        }
    }
    paths.sort();
    paths
}

fn fetcher<'a>(
    store: &'a Tiles,
    fetched: &'a mut Vec<String>,
) -> impl FnMut(&str) -> Result<Vec<u8>, TlogError> + 'a {
    move |path: &str| {
        fetched.push(path.to_owned());
        store.get(path).cloned().ok_or(TlogError::Missing {
            path: path.to_owned(),
        })
    }
}

/// Resuming from the stored tiles at a size and appending the rest gives the same archive and
/// root as never stopping, and reads exactly the right edge.
#[test]
fn resume_then_append() {
    let seed = seed();
    println!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let all = leaves(66_000);
    let mut sizes: Vec<u64> = vec![0, 1, 255, 256, 257, 65_535, 65_536, 65_537];
    sizes.extend((0..3).map(|_| rng.gen_range(0..66_000)));
    for size in sizes {
        let context = format!("seed {seed}, resumed at {size}");
        let (tiles, root) = all_tiles(&refs(&all[..size as usize]));
        let mut store: Tiles = tiles.into_iter().collect();
        let mut fetched = Vec::new();
        let mut log = TileLog::resume(size, &root, &mut fetcher(&store, &mut fetched))
            .unwrap_or_else(|e| panic!("{context}: {e}"));
        fetched.sort();
        assert_eq!(fetched, right_edge(size), "{context}");
        assert_eq!(log.size(), size);
        assert_eq!(log.root(), root, "{context}");
        let end = (size + rng.gen_range(0..1_000)).min(all.len() as u64);
        let mut written = size;
        while log.size() < end {
            let step = rng.gen_range(1..400).min(end - log.size());
            for leaf in &all[log.size() as usize..(log.size() + step) as usize] {
                log.append(leaf);
            }
            store.extend(log.tiles_since(written));
            written = log.size();
        }
        let root = assert_store_holds(&store, &all[..end as usize], &context);
        assert_eq!(log.root(), root, "{context}");
    }
}

/// Every way the right edge can be broken is refused: a flipped byte, a byte short, a missing
/// tile, a checkpoint root that is not the tiles'.
#[test]
fn resume_refuses_corrupt_tiles() {
    let size = 70_000;
    let all = leaves(size);
    let (tiles, root) = all_tiles(&refs(&all));
    let store: Tiles = tiles.into_iter().collect();
    let resume = |store: &Tiles, root: &Hash| {
        TileLog::resume(size, root, &mut fetcher(store, &mut Vec::new()))
    };
    resume(&store, &root).expect("intact store");
    let edge = right_edge(size);
    assert_eq!(edge.len(), 4);
    for path in &edge {
        let original = &store[path];
        for at in [0, original.len() / 2, original.len() - 1] {
            let mut broken = store.clone();
            broken.get_mut(path).unwrap()[at] ^= 1;
            let e = resume(&broken, &root).expect_err("flipped byte");
            assert!(
                matches!(
                    e,
                    TlogError::RootMismatch { .. } | TlogError::Corrupt { .. }
                ),
                "{path}@{at}: {e}"
            );
        }
        let mut broken = store.clone();
        broken.get_mut(path).unwrap().pop();
        let e = resume(&broken, &root).expect_err("short tile");
        assert!(matches!(e, TlogError::Corrupt { .. }), "{path}: {e}");
        let mut broken = store.clone();
        broken.remove(path);
        let e = resume(&broken, &root).expect_err("missing tile");
        assert!(
            matches!(e, TlogError::Missing { path: ref p } if p == path),
            "{e}"
        );
    }
    let mut other = root;
    other[31] ^= 1;
    let e = resume(&store, &other).expect_err("other root");
    assert!(
        matches!(e, TlogError::RootMismatch { size: 70_000, .. }),
        "{e}"
    );
}

#[test]
#[should_panic(expected = "tiles since 99")]
fn tiles_since_cannot_look_before_a_trim() {
    let mut log = TileLog::empty();
    for leaf in leaves(300) {
        log.append(&leaf);
    }
    log.trim();
    log.append(b"more");
    log.tiles_since(99);
}

#[test]
#[should_panic(expected = "tiles since 4")]
fn tiles_since_cannot_look_ahead() {
    let mut log = TileLog::empty();
    log.append(b"one");
    log.tiles_since(4);
}

// ---------------------------------------------------------------------------------------------
// Proofs.

/// Known audit paths (index, size, path) and consistency proofs (old, new, proof) from the CT
/// reference tests (certificate-transparency, trillian, transparency-dev/merkle).
const CT_INCLUSION: &[(u64, u64, &[&str])] = &[
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
];
const CT_CONSISTENCY: &[(u64, u64, &[&str])] = &[
    (1, 1, &[]),
    (
        1,
        8,
        &[
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        &[
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        2,
        5,
        &[
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
];

#[test]
fn proofs_match_the_ct_vectors() {
    let leaves = hashes(&ct_leaves());
    for &(index, size, path) in CT_INCLUSION {
        let expected: Vec<Hash> = path.iter().map(|h| unhex32(h)).collect();
        let tree = &leaves[..size as usize];
        assert_eq!(inclusion_proof(tree, index), expected, "{index} in {size}");
        let root = root_of(tree);
        verify_inclusion(index, size, &leaves[index as usize], &root, &expected).unwrap();
    }
    for &(old, new, path) in CT_CONSISTENCY {
        let expected: Vec<Hash> = path.iter().map(|h| unhex32(h)).collect();
        assert_eq!(consistency_proof(&leaves[..new as usize], old), expected);
        let (old_root, new_root) = (
            unhex32(CT_ROOTS[old as usize]),
            unhex32(CT_ROOTS[new as usize]),
        );
        verify_consistency(old, new, &old_root, &new_root, &expected).unwrap();
    }
}

/// Every proof whose hashes or sizes are tampered with is refused.
fn check_consistency(leaves: &[Hash], old: u64) {
    let new = leaves.len() as u64;
    let (old_root, new_root) = (root_of(&leaves[..old as usize]), root_of(leaves));
    let proof = consistency_proof(leaves, old);
    let verify = |o, n, p: &[Hash]| verify_consistency(o, n, &old_root, &new_root, p);
    verify(old, new, &proof).unwrap_or_else(|e| panic!("{old} -> {new}: {e}"));
    for i in 0..proof.len() {
        let mut bad = proof.clone();
        bad[i][0] ^= 1;
        assert!(
            verify(old, new, &bad).is_err(),
            "{old} -> {new}: hash {i} flipped"
        );
    }
    if !proof.is_empty() {
        assert!(
            verify(old, new, &proof[1..]).is_err(),
            "{old} -> {new} shortened"
        );
    }
    let mut longer = proof.clone();
    longer.push([0; 32]);
    assert!(
        verify(old, new, &longer).is_err(),
        "{old} -> {new} extended"
    );
    // (Sizes are not checked by tampering: proofs of different size pairs can share a shape,
    // and then a proof checks out for whichever tree the roots claim.)
}

fn check_inclusion(leaves: &[Hash], index: u64) {
    let size = leaves.len() as u64;
    let root = root_of(leaves);
    let leaf = leaves[index as usize];
    let proof = inclusion_proof(leaves, index);
    verify_inclusion(index, size, &leaf, &root, &proof)
        .unwrap_or_else(|e| panic!("{index} in {size}: {e}"));
    for i in 0..proof.len() {
        let mut bad = proof.clone();
        bad[i][31] ^= 1;
        assert!(verify_inclusion(index, size, &leaf, &root, &bad).is_err());
    }
    let mut other = leaf;
    other[0] ^= 1;
    assert!(verify_inclusion(index, size, &other, &root, &proof).is_err());
    assert!(verify_inclusion(size, size, &leaf, &root, &proof).is_err());
    if size > 1 {
        let wrong = (index + 1) % size;
        assert!(verify_inclusion(wrong, size, &leaf, &root, &proof).is_err());
    }
}

#[test]
fn proofs_verify_for_every_small_tree() {
    let all = hashes(&leaves(70));
    for new in 0..=all.len() {
        for old in 0..=new {
            check_consistency(&all[..new], old as u64);
        }
        for index in 0..new {
            check_inclusion(&all[..new], index as u64);
        }
    }
}

#[test]
fn proofs_verify_on_a_large_tree_against_the_tile_log() {
    let seed = seed();
    println!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let all = leaves(65_600);
    let all_hashes = hashes(&all);
    let mut log = TileLog::empty();
    for leaf in &all {
        log.append(leaf);
    }
    let new = all.len() as u64;
    for old in [1, 257, 65_536, 65_537, rng.gen_range(1..new)] {
        let proof = consistency_proof(&all_hashes, old);
        let old_root = root_of(&all_hashes[..old as usize]);
        verify_consistency(old, new, &old_root, &log.root(), &proof)
            .unwrap_or_else(|e| panic!("seed {seed}: {old} -> {new}: {e}"));
        let index = rng.gen_range(0..new);
        let proof = inclusion_proof(&all_hashes, index);
        verify_inclusion(index, new, &all_hashes[index as usize], &log.root(), &proof)
            .unwrap_or_else(|e| panic!("seed {seed}: leaf {index}: {e}"));
    }
}

#[test]
fn consistency_edge_cases() {
    let all = hashes(&leaves(5));
    let (empty, root) = (root_of(&[]), root_of(&all));
    verify_consistency(0, 5, &empty, &root, &[]).unwrap();
    verify_consistency(0, 0, &empty, &empty, &[]).unwrap();
    verify_consistency(5, 5, &root, &root, &[]).unwrap();
    assert!(verify_consistency(0, 5, &root, &root, &[]).is_err());
    assert!(verify_consistency(5, 5, &root, &empty, &[]).is_err());
    assert!(verify_consistency(6, 5, &root, &root, &[]).is_err());
    assert!(verify_consistency(3, 5, &root, &root, &[]).is_err());
}

// ---------------------------------------------------------------------------------------------
// Checkpoints and signed notes.

#[test]
fn checkpoint_bodies() {
    let cases = [
        Checkpoint {
            origin: origin_for(&[7; 32]),
            size: 0,
            root: root_of(&[]),
        },
        Checkpoint {
            origin: "example.com/log42".into(),
            size: u64::MAX,
            root: [0xff; 32],
        },
    ];
    for c in cases {
        let body = c.body();
        assert_eq!(Checkpoint::parse_body(&body).unwrap(), c);
        assert_eq!(body.lines().count(), 3);
    }
    assert_eq!(
        origin_for(&[0xab; 32]),
        format!("tally.ledger/{}", "ab".repeat(32))
    );
    // The spec's example, with an extension line added.
    let text =
        "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n";
    let c = Checkpoint::parse_body(text).unwrap();
    assert_eq!(
        (c.origin.as_str(), c.size),
        ("example.com/behind-the-sofa", 20852163)
    );
    assert_eq!(
        BASE64.encode(c.root),
        "CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I="
    );
    assert_eq!(c.body(), text);
    let (d, ext) = Checkpoint::parse_body_with_extensions(&format!("{text}ext one\n")).unwrap();
    assert_eq!((d, ext), (c, vec!["ext one".to_owned()]));
}

#[test]
fn malformed_checkpoints() {
    let root = BASE64.encode([1; 32]);
    let bad = [
        String::new(),
        "origin\n1\n".into(),
        format!("origin\n1\n{root}"),
        format!("\n1\n{root}\n"),
        format!("origin\n\n{root}\n"),
        format!("origin\n01\n{root}\n"),
        format!("origin\n+1\n{root}\n"),
        format!("origin\n-1\n{root}\n"),
        format!("origin\n 1\n{root}\n"),
        format!("origin\n18446744073709551616\n{root}\n"),
        format!("origin\n1\n{}\n", BASE64.encode([1; 31])),
        format!("origin\n1\n{}\n", BASE64.encode([1; 33])),
        format!("origin\n1\n{}\n", root.trim_end_matches('=')),
        "origin\n1\nAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQF=\n".into(), // non-zero pad bits
        format!("origin\n1\n{root}\n\n"),
        format!("origin\n1\n{root}\next\n\n"),
        format!("ori\tgin\n1\n{root}\n"),
    ];
    for text in bad {
        assert!(
            matches!(
                Checkpoint::parse_body(&text),
                Err(TlogError::CheckpointMalformed { .. })
            ),
            "accepted {text:?}"
        );
    }
}

/// The example key and note of Go's `golang.org/x/mod/sumdb/note` tests (`note_test.go`).
const PETER_SKEY: &str =
    "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
const PETER_VKEY: &str = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
const ENOCH_VKEY: &str = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop";
const GO_TEXT: &str = "If you think cryptography is the answer to your problem,\n\
                       then you don't know what your problem is.\n";
const PETER_SIG: &str = "— PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n";
const ENOCH_SIG: &str = "— EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+QQ=\n";

/// A verifier key string: (name, key), checking the type byte and the key id it carries.
fn parse_vkey(vkey: &str) -> (String, VerifyingKey) {
    let mut parts = vkey.splitn(3, '+');
    let (name, id, material) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let material = BASE64.decode(material).unwrap();
    assert_eq!(material[0], 0x01, "Ed25519 type byte");
    let key = VerifyingKey::from_bytes(&material[1..].try_into().unwrap()).unwrap();
    assert_eq!(hex::encode(note_key_id(name, &key)), id, "key id of {vkey}");
    (name.to_owned(), key)
}

fn peter() -> SigningKey {
    let material = BASE64
        .decode(PETER_SKEY.splitn(5, '+').nth(4).unwrap())
        .unwrap();
    assert_eq!(material[0], 0x01);
    SigningKey::from_bytes(&material[1..].try_into().unwrap())
}

#[test]
fn notes_match_the_go_vectors() {
    let key = peter();
    assert_eq!(
        note_key_id("PeterNeumann", &key.verifying_key()),
        [0xc7, 0x4f, 0x20, 0xa3]
    );
    assert_eq!(
        note_verifier_key("PeterNeumann", &key.verifying_key()),
        PETER_VKEY
    );
    let note = sign_note(GO_TEXT, "PeterNeumann", &key);
    assert_eq!(note, format!("{GO_TEXT}\n{PETER_SIG}"));

    let (peter_name, peter_key) = parse_vkey(PETER_VKEY);
    let (enoch_name, enoch_key) = parse_vkey(ENOCH_VKEY);
    assert_eq!(note_verifier_key(&enoch_name, &enoch_key), ENOCH_VKEY);
    let both = format!("{GO_TEXT}\n{PETER_SIG}{ENOCH_SIG}");
    assert_eq!(open_note(&both, &peter_name, &peter_key).unwrap(), GO_TEXT);
    assert_eq!(open_note(&both, &enoch_name, &enoch_key).unwrap(), GO_TEXT);
    let enoch_only = format!("{GO_TEXT}\n{ENOCH_SIG}");
    let e = open_note(&enoch_only, &peter_name, &peter_key).unwrap_err();
    assert!(matches!(e, TlogError::NoteUnsigned { .. }), "{e}");
    // Repeated identical signatures are fine.
    let twice = format!("{GO_TEXT}\n{PETER_SIG}{PETER_SIG}{ENOCH_SIG}{ENOCH_SIG}");
    assert_eq!(open_note(&twice, &peter_name, &peter_key).unwrap(), GO_TEXT);
}

/// The example of the signed-note spec.
#[test]
fn note_matches_the_spec_example() {
    let vkey = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k";
    let note = "This is an example message.\n\n— example.com/foo Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n";
    let (name, key) = parse_vkey(vkey);
    assert_eq!(note_verifier_key(&name, &key), vkey);
    assert_eq!(
        open_note(note, &name, &key).unwrap(),
        "This is an example message.\n"
    );
}

#[test]
fn notes_refused() {
    let (name, key) = parse_vkey(PETER_VKEY);
    let good = format!("{GO_TEXT}\n{PETER_SIG}");
    let bad_sig = |e: TlogError| matches!(e, TlogError::NoteBadSignature { .. });
    let malformed = |e: TlogError| matches!(e, TlogError::NoteMalformed { .. });
    let unsigned = |e: TlogError| matches!(e, TlogError::NoteUnsigned { .. });
    let cases: Vec<(String, &dyn Fn(TlogError) -> bool)> = vec![
        (good.replace("cryptography", "cryptographY"), &bad_sig),
        (format!("{GO_TEXT}\n{}ABCD{}", &PETER_SIG[..60], &PETER_SIG[60..]), &bad_sig),
        // A good signature does not excuse a bad one by the same key.
        (format!("{good}{}", PETER_SIG.replace("kuBS9", "kuBT9")), &bad_sig),
        // Go's malformed-message table.
        (GO_TEXT.to_owned(), &malformed),
        (format!("{GO_TEXT}\n"), &malformed),
        (format!("{GO_TEXT}\n{}", PETER_SIG.trim_end()), &malformed),
        (format!("\x01{good}"), &malformed),
        (format!("{GO_TEXT}\n— Bad Name x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"), &malformed),
        (format!("{good}Unexpected line.\n"), &malformed),
        (format!("{GO_TEXT}\n{}", PETER_SIG.repeat(101)), &malformed),
        (format!("{GO_TEXT}\n— PeterNeumann AAAA\n"), &malformed),
        (format!("{GO_TEXT}\n— Peter+Neumann {}", &PETER_SIG[17..]), &malformed),
        (format!("{GO_TEXT}\n- PeterNeumann {}", &PETER_SIG[17..]), &malformed),
        (format!("{GO_TEXT}\n— PeterNeumann x08go/ZJ!\n"), &malformed),
        // A key id of another key under the same name is someone else's signature.
        (format!("{GO_TEXT}\n— PeterNeumann AAAAAA{}", &PETER_SIG[23..]), &unsigned),
    ];
    for (note, expected) in cases {
        let e = open_note(&note, &name, &key).expect_err(&note);
        assert!(expected(e), "{note:?}");
    }
    // Another key under the same name: its key id differs, so the signature is not its.
    let impostor = SigningKey::from_bytes(&[9; 32]).verifying_key();
    let e = open_note(&good, &name, &impostor).unwrap_err();
    assert!(matches!(e, TlogError::NoteUnsigned { .. }), "{e}");
}

/// What the archiver publishes: a checkpoint signed with the operator's key, opened and parsed
/// back by an auditor that knows only the verifier key.
#[test]
fn signed_checkpoints_round_trip() {
    let operator = SigningKey::from_bytes(&[250; 32]);
    let chain = [7; 32];
    let origin = origin_for(&chain);
    let all = leaves(300);
    let (_, root) = all_tiles(&refs(&all));
    let checkpoint = Checkpoint {
        origin: origin.clone(),
        size: 300,
        root,
    };
    let note = sign_note(&checkpoint.body(), &origin, &operator);
    let (name, key) = parse_vkey(&note_verifier_key(&origin, &operator.verifying_key()));
    let text = open_note(&note, &name, &key).unwrap();
    assert_eq!(Checkpoint::parse_body(&text).unwrap(), checkpoint);
    // Witness cosignatures appended later are ignored.
    let cosigned = format!("{note}{ENOCH_SIG}");
    assert_eq!(open_note(&cosigned, &name, &key).unwrap(), text);
    // Another chain's key, or the text of another size, does not pass.
    let other = SigningKey::from_bytes(&[251; 32]).verifying_key();
    assert!(open_note(&note, &name, &other).is_err());
    let forged = note.replace("\n300\n", "\n301\n");
    assert!(open_note(&forged, &name, &key).is_err());
}

/// Stored nodes as a store keeps them: the nodes each append completes, by height.
fn stored_nodes(leaves: &[Hash]) -> (BTreeMap<u64, Vec<Hash>>, TreeEdge) {
    let mut edge = TreeEdge::new();
    let mut rows = BTreeMap::new();
    for (i, leaf) in leaves.iter().enumerate() {
        let completed = edge.append(*leaf);
        assert_eq!(completed.len(), nodes_completed(i as u64 + 1));
        rows.insert(i as u64 + 1, completed);
    }
    (rows, edge)
}

/// Roots and proofs read from stored nodes are those of the in-memory recursion, for every
/// pair of sizes up to 70 and random pairs up to 5,000; the edge reloaded from the nodes is
/// the edge that appended them.
#[test]
fn proofs_from_stored_nodes_match_the_recursion() {
    let all = hashes(&leaves(5000));
    let (rows, edge) = stored_nodes(&all);
    let reads = std::cell::Cell::new(0);
    let mut node = |level: u8, index: u64| -> Result<Hash, ()> {
        reads.set(reads.get() + 1);
        rows.get(&completed_at(level, index))
            .and_then(|r| r.get(level as usize))
            .copied()
            .ok_or(())
    };
    assert_eq!(edge.root(), root_of(&all));
    assert_eq!(TreeEdge::load(5000, &mut node), Ok(edge));
    let mut check = |old: u64, new: u64| {
        let tree = &all[..new as usize];
        assert_eq!(root_by(new, &mut node), Ok(root_of(tree)), "root {new}");
        assert_eq!(
            consistency_proof_by(old, new, &mut node),
            Ok(consistency_proof(tree, old)),
            "{old} -> {new}"
        );
        if old < new {
            assert_eq!(
                inclusion_proof_by(old, new, &mut node),
                Ok(inclusion_proof(tree, old)),
                "leaf {old} in {new}"
            );
        }
    };
    for new in 0..=70 {
        for old in 0..=new {
            check(old, new);
        }
    }
    let seed = seed();
    eprintln!("proofs_from_stored_nodes: TALLY_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    for _ in 0..300 {
        let new = rng.gen_range(1..=5000u64);
        let old = rng.gen_range(0..=new);
        check(old, new);
    }
    let before = reads.get();
    consistency_proof_by(1234, 4999, &mut node).unwrap();
    assert!(
        reads.get() - before <= 64,
        "a proof reads O(log n) nodes, seed {seed}"
    );
}

/// A chain of `n` signed headers (only the fields the log reads matter), varied by `fork`.
fn header_chain(
    operator: &tally_core::crypto::OperatorKey,
    n: u64,
    fork: u8,
) -> Vec<tally_wire::SignedHeader> {
    (1..=n)
        .map(|height| {
            operator.sign_header(tally_wire::Header {
                chain_id: [7; 32],
                height,
                term: 1,
                time_unix_ms: 1_700_000_000_000 + height,
                request_count: 1,
                prev_hash: [0; 32],
                merkle_root: [fork; 32],
                state_digest: [height as u8; 32],
                operator_key_id: operator.key_id(),
            })
        })
        .collect()
}

/// A consistency reply built from stored nodes verifies; changing any hash, the checkpoint,
/// the other chain's key or the order fails; two headers of one height are a split view.
#[test]
fn consistency_replies_verify_and_refuse_tampering() {
    use tally_core::header_log::{consistency_reply, split_view, verify_consistency_reply};
    let operator = crate::common::operator();
    let public = operator.public();
    let headers = header_chain(&operator, 40, 0);
    let leaves: Vec<Hash> = headers.iter().map(|h| leaf_hash(&h.encode())).collect();
    let (rows, _) = stored_nodes(&leaves);
    let mut node = |level: u8, index: u64| -> Result<Hash, ()> {
        Ok(rows[&completed_at(level, index)][level as usize])
    };
    for (m, n) in [(1, 1), (1, 40), (7, 7), (7, 32), (13, 40), (32, 40)] {
        let reply = consistency_reply(
            headers[m - 1].clone(),
            headers[n - 1].clone(),
            &operator,
            &mut node,
        )
        .unwrap();
        let (a, b) = verify_consistency_reply(&reply, &public, &[7; 32]).unwrap();
        assert_eq!((a.size, b.size), (m as u64, n as u64));
        assert_eq!(b.root, root_of(&leaves[..n]));
        assert!(verify_consistency_reply(&reply, &public, &[8; 32]).is_err());
        let mut bad = Vec::new();
        for i in 0..reply.proof.len() {
            let mut r = reply.clone();
            r.proof[i][5] ^= 1;
            bad.push(r);
        }
        for i in 0..reply.to.inclusion.len() {
            let mut r = reply.clone();
            r.to.inclusion[i][0] ^= 0x10;
            bad.push(r);
        }
        let mut r = reply.clone();
        r.from.checkpoint = r.from.checkpoint.replacen('\n', "\n1", 1);
        bad.push(r);
        let mut r = reply.clone();
        r.to.header.signature[0] ^= 1;
        bad.push(r);
        if m != n {
            let mut r = reply.clone();
            std::mem::swap(&mut r.from, &mut r.to);
            bad.push(r);
        }
        for (i, r) in bad.iter().enumerate() {
            assert!(
                verify_consistency_reply(r, &public, &[7; 32]).is_err(),
                "{m} -> {n}: tampered reply {i} verified"
            );
        }
    }
    let fork = header_chain(&operator, 40, 1);
    assert!(split_view(&headers[9], &fork[9]));
    assert!(!split_view(&headers[9], &headers[9]));
    assert!(!split_view(&headers[9], &fork[10]));
}

/// A witness cosigns checkpoints that extend the last one it cosigned, and refuses a fork
/// (another root at a size it cosigned, or a proof to a tree that does not extend it) with the
/// statuses tlog-witness names.
#[test]
fn a_witness_cosigns_consistent_checkpoints_and_refuses_a_fork() {
    use tally_core::witness::{cosign, cosigned_at, judge, AddCheckpoint, Cosigned, Refusal};
    let log_key = SigningKey::from_bytes(&[3; 32]);
    let origin = "tally.ledger/example";
    let honest = hashes(&leaves(12));
    let mut forked = honest.clone();
    for leaf in &mut forked[6..] {
        leaf[0] ^= 0xff;
    }
    let note = |leaves: &[Hash], key: &SigningKey| {
        let cp = Checkpoint {
            origin: origin.into(),
            size: leaves.len() as u64,
            root: root_of(leaves),
        };
        sign_note(&cp.body(), origin, key)
    };
    let request = |old: u64, to: &[Hash], key: &SigningKey| AddCheckpoint {
        old_size: old,
        proof: consistency_proof(to, old.min(to.len() as u64)),
        note: note(to, key),
    };
    let mut state: Option<Cosigned> = None;
    let logs = |o: &str| (o == origin).then(|| vec![log_key.verifying_key()]);
    let add = |r: &AddCheckpoint, state: &mut Option<Cosigned>| {
        let parsed = AddCheckpoint::parse(&r.encode()).expect("round trip");
        assert_eq!(&parsed, r);
        let last = *state;
        let (_, new) = judge(&parsed, &logs, &|_| last)?;
        *state = Some(new);
        Ok::<_, Refusal>(())
    };
    let mut first = request(0, &honest[..5], &log_key);
    first.proof.clear();
    add(&first, &mut state).unwrap();
    add(&request(5, &honest[..9], &log_key), &mut state).unwrap();
    assert_eq!(state.unwrap().size, 9);
    // The fork: a proof from 9 to the forked 12 cannot verify; the forked 9 conflicts.
    let fork12 = request(9, &forked, &log_key);
    assert!(matches!(
        add(&fork12, &mut state),
        Err(Refusal::Unprocessable(_))
    ));
    let fork9 = AddCheckpoint {
        old_size: 9,
        proof: vec![],
        note: note(&forked[..9], &log_key),
    };
    let refused = add(&fork9, &mut state).unwrap_err();
    assert_eq!(
        (refused.status(), &refused),
        (
            409,
            &Refusal::Conflict {
                size: 9,
                same_size_fork: true
            }
        )
    );
    assert_eq!(
        add(&request(5, &honest, &log_key), &mut state)
            .unwrap_err()
            .status(),
        409
    );
    let other_key = SigningKey::from_bytes(&[4; 32]);
    assert_eq!(
        add(&request(9, &honest, &other_key), &mut state)
            .unwrap_err()
            .status(),
        403
    );
    let mut elsewhere = request(9, &honest, &log_key);
    elsewhere.note = elsewhere.note.replace(origin, "other.log/x");
    assert_eq!(add(&elsewhere, &mut state).unwrap_err().status(), 404);
    assert_eq!(
        AddCheckpoint::parse("old 01\n\nx").unwrap_err().status(),
        400
    );
    assert_eq!(state.unwrap().size, 9, "nothing refused moved the state");
    add(&request(9, &honest, &log_key), &mut state).unwrap();

    // Cosignatures verify under the witness key and name only.
    let witness = SigningKey::from_bytes(&[5; 32]);
    let body = Checkpoint {
        origin: origin.into(),
        size: 12,
        root: root_of(&honest),
    }
    .body();
    let cosigned = format!(
        "{}{}",
        note(&honest, &log_key),
        cosign(&body, 1_700_000_000, "w.example/1", &witness)
    );
    assert_eq!(
        cosigned_at(&cosigned, "w.example/1", &witness.verifying_key()).unwrap(),
        Some(1_700_000_000)
    );
    assert_eq!(
        cosigned_at(&cosigned, "w.example/2", &witness.verifying_key()).unwrap(),
        None
    );
    let forged = cosigned.replace(
        &BASE64.encode(root_of(&honest)),
        &BASE64.encode(root_of(&forked)),
    );
    assert!(cosigned_at(&forged, "w.example/1", &witness.verifying_key()).is_err());
}
