//! A threshold operator's apply (`engine::apply`, `signing`): batches are written with their
//! headers unsigned and confirmed only once the signature entries of their header and then of
//! the header log's checkpoint of that size apply, each kind in height order, under the group
//! key; a signature out of order, before its header or that does not verify is skipped alike
//! by every replica, and resubmissions wait for the signatures too.

use std::collections::BTreeMap;

use rand::rngs::OsRng;
use tally_core::engine::apply::{
    checkpoint_text, Applied, Applier, ApplierConfig, ApplyOut, Committed,
};
use tally_core::engine::Waiter;
use tally_core::key_chain::SigningKeys;
use tally_core::ports::{LedgerStore, MemStore};
use tally_core::signing::{Item, Kind};
use tally_core::state::LedgerMeta;
use tally_core::threshold::{aggregate, deal, Dealt, Share};
use tally_wire::Signature;

use crate::common::{deposit, Node};

fn sign(dealt: &Dealt, message: &[u8]) -> Signature {
    let shares: BTreeMap<u16, Share> = [1u16, 3]
        .iter()
        .map(|i| (*i, Share::decode(&dealt.shares[i]).unwrap()))
        .collect();
    let (mut nonces, mut commitments) = (BTreeMap::new(), BTreeMap::new());
    for (id, s) in &shares {
        let (n, c) = s.commit(&mut OsRng).unwrap();
        nonces.insert(*id, n);
        commitments.insert(*id, c);
    }
    let signed = shares
        .iter()
        .map(|(id, s)| {
            let n = nonces.remove(id).unwrap();
            (*id, s.sign(message, &commitments, n).unwrap())
        })
        .collect();
    aggregate(message, &commitments, &signed, &dealt.public).unwrap()
}

struct Replica {
    store: MemStore,
    applier: Applier<u32>,
}

impl Replica {
    fn new(dealt: &Dealt) -> Replica {
        let cfg = ApplierConfig {
            parked_max: 8,
            accounts_cached_max: 8,
        };
        let keys = SigningKeys::threshold(dealt.group_key, vec![dealt.group_key]);
        Replica {
            store: MemStore::default(),
            applier: Applier::new(cfg, keys, LedgerMeta::genesis()),
        }
    }

    fn commit(&mut self, entry: Committed<u32>) -> (Applied, Vec<ApplyOut<u32>>) {
        let mut out = Vec::new();
        let applied = self
            .applier
            .committed(&mut self.store, entry, &mut out)
            .unwrap();
        (applied, out)
    }

    fn signature(&mut self, height: u64, signature: Signature) -> (Applied, Vec<ApplyOut<u32>>) {
        let kind = Kind::Header;
        self.signed(Item { height, kind }, signature)
    }

    fn checkpoint(&mut self, height: u64, signature: Signature) -> (Applied, Vec<ApplyOut<u32>>) {
        let kind = Kind::Checkpoint;
        self.signed(Item { height, kind }, signature)
    }

    fn signed(&mut self, item: Item, signature: Signature) -> (Applied, Vec<ApplyOut<u32>>) {
        self.commit(Committed::Signature {
            item,
            signature,
            raft_index: 100 + item.height,
        })
    }
}

fn batch(body: &tally_core::batch::BatchBody, waiter: Option<u32>) -> Committed<u32> {
    Committed::Batch {
        encoded: body.encode(),
        sealed: None,
        body: body.clone(),
        waiters: waiter
            .map(|reply| Waiter {
                index: 0,
                reply,
                replayed: false,
            })
            .into_iter()
            .collect(),
        raft_index: body.header.height,
    }
}

fn confirmed(out: &[ApplyOut<u32>]) -> Vec<u32> {
    out.iter()
        .flat_map(|o| match o {
            ApplyOut::Confirm { waiters, .. } => waiters.iter().map(|w| w.reply).collect(),
            ApplyOut::Replayed(r, _) => vec![*r],
            _ => vec![],
        })
        .collect()
}

#[test]
fn headers_then_checkpoints_are_signed_in_order_under_the_group_key_before_confirming() {
    let dealt = deal(3, 2, &mut OsRng).unwrap();
    let group_id = tally_core::crypto::key_id(&dealt.group_key);
    let mut node = Node::with_config(|c| c.operator_key_id = group_id);
    let (mut leader, mut follower) = (Replica::new(&dealt), Replica::new(&dealt));
    let mut bodies = Vec::new();
    for h in 1..=3u8 {
        node.submit(deposit(h as u128, h, 10));
        node.seal();
        let body = node.pending.pop_front().unwrap();
        let (_, out) = leader.commit(batch(&body, Some(h as u32)));
        assert!(
            confirmed(&out).is_empty(),
            "no confirmation before the signature"
        );
        assert!(matches!(&out[..], [ApplyOut::Unsigned(hd)] if *hd == body.header));
        follower.commit(batch(&body, None));
        node.seq.applied(h as u64);
        bodies.push(body);
    }
    for r in [&mut leader, &mut follower] {
        assert_eq!(r.applier.signed_through(), (0, 0));
        assert_eq!(r.store.signed_through().unwrap(), 0);
        assert!(
            r.store.header(1).unwrap().is_none(),
            "unsigned headers are not served"
        );
    }
    // A resubmission of batch 2's request waits for its signature.
    let mut out = Vec::new();
    let item = bodies[1].items[0].hash();
    leader
        .applier
        .replay(&mut leader.store, 2, 0, item, 77, &mut out)
        .unwrap();
    assert!(out.is_empty());

    let s1 = sign(&dealt, &bodies[0].header.encode());
    let s2 = sign(&dealt, &bodies[1].header.encode());
    for r in [&mut leader, &mut follower] {
        let (a, out) = r.signature(2, s2);
        assert!(
            matches!(a, Applied::Skipped) && out.is_empty(),
            "2 before 1 is skipped"
        );
        let (a, _) = r.signature(1, s2);
        assert!(
            matches!(a, Applied::Skipped),
            "a signature of another header is skipped"
        );
        let mut bad = s1;
        bad[5] ^= 1;
        assert!(matches!(r.signature(1, bad).0, Applied::Skipped));
        let early = r.checkpoint(1, s1).0;
        assert!(
            matches!(early, Applied::Skipped),
            "a checkpoint before its header"
        );
        assert_eq!(r.applier.signed_through(), (0, 0));
    }
    let (a, out) = leader.signature(1, s1);
    assert!(matches!(a, Applied::Signed(i) if i == Item { height: 1, kind: Kind::Header }));
    assert!(
        confirmed(&out).is_empty(),
        "confirmed after the checkpoint, not the header"
    );
    let text = match &out[..] {
        [ApplyOut::HeaderSigned {
            height: 1,
            checkpoint,
            key,
        }] if *key == dealt.group_key => checkpoint.clone(),
        o => panic!("{o:?}"),
    };
    let chain = bodies[0].header.chain_id;
    assert_eq!(text, checkpoint_text(&mut leader.store, &chain, 1).unwrap());
    let c1 = sign(&dealt, &text);
    let wrong = leader.checkpoint(1, s1).0;
    assert!(matches!(wrong, Applied::Skipped), "a header's signature");
    let (_, out) = leader.checkpoint(1, c1);
    assert_eq!(confirmed(&out), vec![1]);
    assert!(out
        .iter()
        .any(|o| matches!(o, ApplyOut::CheckpointSigned(1))));
    leader.signature(2, s2);
    let c2 = sign(
        &dealt,
        &checkpoint_text(&mut leader.store, &chain, 2).unwrap(),
    );
    let (_, out) = leader.checkpoint(2, c2);
    assert_eq!(
        confirmed(&out),
        vec![2, 77],
        "batch 2's waiter and the resubmission"
    );
    let (a, _) = leader.signature(2, s2);
    assert!(
        matches!(a, Applied::Skipped),
        "a signature applied twice is skipped"
    );
    for (h, s, c) in [(1, s1, c1), (2, s2, c2)] {
        follower.signature(h, s);
        follower.checkpoint(h, c);
    }
    for h in 1..=2 {
        let (l, f) = (
            leader.store.header(h).unwrap(),
            follower.store.header(h).unwrap(),
        );
        assert_eq!(l, f);
        let l = l.unwrap();
        let key = &dealt.group_key;
        assert!(tally_core::crypto::verify_strict(
            key,
            &l.header.encode(),
            &l.signature
        ));
        assert_eq!(
            leader.store.checkpoint_signature(h).unwrap(),
            follower.store.checkpoint_signature(h).unwrap()
        );
    }
    assert!(leader.store.header(3).unwrap().is_none());
    assert_eq!(leader.store.signed_through().unwrap(), 2);
    assert_eq!(leader.store.checkpointed_through().unwrap(), 2);
}
