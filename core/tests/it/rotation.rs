//! Operator key rotation in the core (PROTOCOL.md §4.14): the sequencer seals a rotation last
//! in its batch, a second replica replays it to the same bytes and signs the next header with
//! the new key, the links follow from the genesis key, and every tampered link, a skipped or
//! reordered one, a rotation that does not follow the state, and a replica without the new key
//! are refused.

use tally_core::batch::{prepare_apply, BatchBody, BatchItem};
use tally_core::crypto::OperatorKey;
use tally_core::key_chain::{link_of, links, KeySchedule, SigningKeys};
use tally_core::ports::LedgerStore;
use tally_core::Error;
use tally_wire::{ErrorCode, KeyLink, Op};

use crate::common::{clone_store, deposit, key, operator, Node};

fn next_key(seed: u8) -> OperatorKey {
    OperatorKey::new(key(seed))
}

/// Seals a batch with a deposit and a rotation to `new` on `node`, and applies it with `signer`.
fn rotate(node: &mut Node, id: u128, new: &OperatorKey, signer: &OperatorKey) -> BatchBody {
    node.seq
        .open_batch(node.time_ms, 1, &mut node.store)
        .unwrap();
    node.submit(deposit(id, 1, 10));
    node.seq.rotate(new.public()).expect("a fresh key");
    node.seal().expect("a batch");
    apply_with(node, signer)
}

/// Applies the next pending batch signing with `signer` (the key in effect for it).
fn apply_with(node: &mut Node, signer: &OperatorKey) -> BatchBody {
    let body = node.pending.pop_front().unwrap();
    let meta = node.store.meta().unwrap();
    let write = prepare_apply(&body, body.encode(), &meta, &mut node.store, signer).unwrap();
    node.store.apply(&write).unwrap();
    node.seq.applied(write.meta.height);
    body
}

fn chain(node: &mut Node) -> Vec<KeyLink> {
    let meta = node.store.meta().unwrap();
    links(&mut node.store, &meta).unwrap()
}

#[test]
fn a_rotation_ends_the_old_keys_headers_and_the_chain_proves_it() {
    let genesis = operator();
    let (k1, k2) = (next_key(31), next_key(32));
    let mut node = Node::new();
    node.submit(deposit(1, 1, 5));
    node.seal_and_apply_all();
    let first = rotate(&mut node, 2, &k1, &genesis);
    assert!(matches!(first.items.last(), Some(BatchItem::Rotate(_))));
    assert_eq!(
        first.header.operator_key_id,
        genesis.key_id(),
        "the old key signs its batch"
    );
    node.submit(deposit(3, 1, 5));
    node.seal();
    let after = apply_with(&mut node, &k1);
    assert_eq!(
        after.header.operator_key_id,
        k1.key_id(),
        "the new key signs after"
    );
    rotate(&mut node, 4, &k2, &k1);

    let chain = chain(&mut node);
    assert_eq!(chain.len(), 2);
    assert_eq!((chain[0].number, chain[1].number), (1, 2));
    assert_eq!(chain[1].previous, chain[0].header.header.height);
    let schedule = KeySchedule::follow(genesis.public(), &chain).unwrap();
    assert_eq!(schedule.current(), k2.public());
    assert_eq!(schedule.key_for(first.header.height), genesis.public());
    assert_eq!(schedule.key_for(first.header.height + 1), k1.public());
    for h in 1..=node.store.meta().unwrap().height {
        schedule
            .verify_header(&node.store.header(h).unwrap().unwrap())
            .unwrap();
    }
    assert_eq!(
        schedule.checkpoint_keys(first.header.height),
        vec![k1.public(), k2.public()]
    );
    let all = vec![genesis.public(), k1.public(), k2.public()];
    assert_eq!(schedule.keys(), all);
    // Another genesis key, a skipped or a reordered link: refused.
    assert!(KeySchedule::follow(k1.public(), &chain).is_err());
    assert!(KeySchedule::follow(genesis.public(), &chain[1..]).is_err());
    let reordered = [chain[1].clone(), chain[0].clone()];
    assert!(KeySchedule::follow(genesis.public(), &reordered).is_err());
}

#[test]
fn every_tampered_link_is_refused() {
    let genesis = operator();
    let k1 = next_key(33);
    let mut node = Node::new();
    let body = rotate(&mut node, 1, &k1, &genesis);
    let good = link_of(&body, &node.store.header(1).unwrap().unwrap()).unwrap();
    KeySchedule::follow(genesis.public(), std::slice::from_ref(&good)).unwrap();
    let mut edits: Vec<(&str, KeyLink)> = Vec::new();
    let mut l = good.clone();
    l.new_key = next_key(34).public();
    edits.push(("new key", l));
    let mut l = good.clone();
    l.previous = 1;
    edits.push(("previous", l));
    let mut l = good.clone();
    l.number = 2;
    edits.push(("number", l));
    let mut l = good.clone();
    l.receipt.index = 0;
    edits.push(("receipt index", l));
    let mut l = good.clone();
    l.receipt.op = Op::Expire;
    edits.push(("receipt op", l));
    let mut l = good.clone();
    l.header.signature[0] ^= 1;
    edits.push(("signature", l));
    let mut l = good.clone();
    l.header.header.merkle_root[0] ^= 1;
    edits.push(("merkle root", l));
    let mut l = good.clone();
    l.proof.path[0][0] ^= 1;
    edits.push(("proof", l));
    for (what, link) in edits {
        let refused = KeySchedule::follow(genesis.public(), &[link]);
        assert!(
            matches!(refused, Err(Error::Verify(_))),
            "{what}: {refused:?}"
        );
    }
}

#[test]
fn a_replica_replays_a_rotation_to_the_same_bytes_and_refuses_one_that_does_not_follow() {
    let genesis = operator();
    let k1 = next_key(35);
    let mut node = Node::new();
    node.submit(deposit(1, 1, 5));
    node.seal_and_apply_all();
    let before = clone_store(&node.store);
    node.seq
        .open_batch(node.time_ms, 1, &mut node.store)
        .unwrap();
    node.seq.rotate(k1.public()).unwrap();
    node.seal().unwrap();
    let body = node.pending.front().unwrap().clone();
    assert_eq!(body.items.len(), 1, "a rotation alone seals a batch");

    // A second replica: the same write, byte for byte, and the new key next.
    let mut other = clone_store(&before);
    let meta = other.meta().unwrap();
    let w2 = prepare_apply(&body, body.encode(), &meta, &mut other, &genesis).unwrap();
    let w1 = prepare_apply(
        &body,
        body.encode(),
        &meta,
        &mut clone_store(&before),
        &genesis,
    )
    .unwrap();
    assert_eq!(w1.signed_header, w2.signed_header);
    assert_eq!(w2.meta.operator.unwrap().key, k1.public());
    let keys = SigningKeys::new(genesis.clone(), Some(k1.clone()), genesis.public());
    assert_eq!(keys.for_meta(&w2.meta).unwrap().public(), k1.public());
    let lacking = SigningKeys::single(genesis.clone());
    assert!(matches!(lacking.for_meta(&w2.meta), Err(Error::Config(_))));
    // Configured with the new key alone, a replica cannot sign what came before the rotation;
    // with the old one as its next key, it can.
    let rotated_in = SigningKeys::new(k1.clone(), None, genesis.public());
    assert!(matches!(rotated_in.for_meta(&meta), Err(Error::Config(_))));
    let both = SigningKeys::new(k1.clone(), Some(genesis.clone()), genesis.public());
    assert_eq!(both.for_meta(&meta).unwrap().public(), genesis.public());
    assert_eq!(both.for_meta(&w2.meta).unwrap().public(), k1.public());

    // A body whose rotation does not follow the state diverges.
    for (number, previous) in [(2, 0), (1, 1)] {
        let mut b = body.clone();
        if let Some(BatchItem::Rotate(e)) = b.items.last_mut() {
            (e.number, e.previous) = (number, previous);
        }
        let meta = clone_store(&before).meta().unwrap();
        let replayed = prepare_apply(&b, b.encode(), &meta, &mut clone_store(&before), &genesis);
        assert!(
            matches!(replayed, Err(Error::Diverged(_))),
            "{number} {previous}"
        );
    }
}

#[test]
fn the_sequencer_refuses_the_signing_key_and_a_rotation_that_does_not_fit() {
    let genesis = operator();
    let mut node = Node::new();
    node.seq
        .open_batch(node.time_ms, 1, &mut node.store)
        .unwrap();
    let same = node.seq.rotate(genesis.public()).unwrap_err();
    assert_eq!(same.code, ErrorCode::RotationRefused);
    let mut full = Node::with_config(|c| c.batch_requests_max = 1);
    full.submit(deposit(1, 1, 5));
    let busy = full.seq.rotate(next_key(36).public()).unwrap_err();
    assert_eq!(busy.code, ErrorCode::Busy);
    // A body with an item after its rotation does not decode.
    node.seq.rotate(next_key(37).public()).unwrap();
    node.seal().unwrap();
    let mut body = node.pending.pop_front().unwrap();
    let rotation = body.items.pop().unwrap();
    let mut other = Node::new();
    other.submit(deposit(9, 1, 5));
    other.seal().unwrap();
    body.items.push(rotation);
    body.items.extend(other.pending.pop_front().unwrap().items);
    assert!(BatchBody::decode(&body.encode()).is_err());
}

/// Random runs: deposits and rotations among a few keys (back and forth), sealed in pipelines
/// of up to three batches before they apply, up to the 64 rotations a chain holds; after every
/// apply the links read back from the store follow from the genesis key and every header
/// verifies under the key for its height; the 65th rotation is refused. Seeded (`TALLY_SEED`),
/// and the seed is printed on failure.
#[test]
fn random_rotations_keep_every_header_under_the_chain() {
    use rand::{Rng, SeedableRng};
    let seed = crate::common::seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let genesis = operator();
    let pool: Vec<OperatorKey> = std::iter::once(genesis.clone())
        .chain((40..43).map(next_key))
        .collect();
    let mut node = Node::new();
    let (mut id, mut rotations) = (0u128, 0usize);
    while rotations < tally_wire::KEY_LINKS_MAX {
        node.seq
            .open_batch(node.time_ms, 1, &mut node.store)
            .unwrap();
        id += 1;
        node.submit(deposit(id, 1, 1));
        if rng.gen_bool(0.5) {
            let key = &pool[rng.gen_range(0..pool.len())];
            if node.seq.rotate(key.public()).is_ok() {
                rotations += 1;
            }
        }
        node.seal().unwrap();
        if node.pending.len() >= rng.gen_range(1..=3) {
            apply_all(&mut node, &pool, seed);
        }
    }
    apply_all(&mut node, &pool, seed);
    node.seq
        .open_batch(node.time_ms, 1, &mut node.store)
        .unwrap();
    let signing = node.seq.meta().signing_key_id(&pool[0].key_id());
    let other = pool.iter().find(|k| k.key_id() != signing).unwrap();
    let refused = node.seq.rotate(other.public()).unwrap_err();
    assert_eq!(refused.code, ErrorCode::RotationRefused, "seed {seed}");
    assert!(
        refused.message.contains("64"),
        "seed {seed}: {}",
        refused.message
    );
}

/// Applies every pending batch with the key its header names (it must be one of `pool`), then
/// checks the chain read back from the store against every header.
fn apply_all(node: &mut Node, pool: &[OperatorKey], seed: u64) {
    while let Some(body) = node.pending.front() {
        let signer = pool
            .iter()
            .find(|k| k.key_id() == body.header.operator_key_id)
            .unwrap_or_else(|| panic!("seed {seed}: a header names a key outside the pool"))
            .clone();
        apply_with(node, &signer);
    }
    let chain = chain(node);
    let schedule = KeySchedule::follow(pool[0].public(), &chain)
        .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    for h in 1..=node.store.meta().unwrap().height {
        let header = node.store.header(h).unwrap().unwrap();
        schedule
            .verify_header(&header)
            .unwrap_or_else(|e| panic!("seed {seed}: height {h}: {e}"));
    }
}
