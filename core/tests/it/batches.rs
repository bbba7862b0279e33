//! Batches end to end: seal, encode, decode, replay, apply, chain, and the confirmations that come
//! out of them, which must verify offline and must stop verifying when anything in them changes.

use tally_core::batch::BatchBody;
use tally_core::crypto::{header_hash, OperatorKey};
use tally_core::ports::LedgerStore;
use tally_core::verify::verify_confirmation;
use tally_core::Error;
use tally_wire::{Confirmation, Op, HEADER_BYTES, RECEIPT_BYTES, REQUEST_BYTES};

use crate::common::{deposit, key, request_confirmations, total_balance, transfer, withdraw, Node};

/// Fills batches 1..=5 with a mix of operations (some of them rejected).
fn submit_batch(node: &mut Node, h: u64) {
    let h8 = h as u8;
    let id = h as u128 * 100;
    node.submit(deposit(id, 1, 1_000));
    node.submit(deposit(id + 1, h8 + 1, 50));
    for i in 0..h8 {
        node.submit(transfer(id + i as u128, 1, 10 + i, 7));
    }
    node.submit(withdraw(id + 50, 1, 3));
    node.submit(transfer(id + 51, 99, 1, 1)); // unknown account: rejected, not in the batch
    node.submit(withdraw(id + 52, 1, u64::MAX)); // insufficient: rejected
}

#[test]
fn batches_chain_replay_and_confirm() {
    let mut node = Node::new();
    let mut last_hash = [0u8; 32];
    for h in 1..=5u64 {
        submit_batch(&mut node, h);
        let (body, write) = node.seal_and_apply_all().pop().expect("one batch");
        let what = format!("batch {h}");
        let header = &body.header;
        assert_eq!(header.height, h, "{what}");
        assert_eq!(
            header.prev_hash, last_hash,
            "{what}: chains to the previous header"
        );
        assert_eq!(header.request_count as usize, body.items.len(), "{what}");
        assert_eq!(
            body.items.len(),
            3 + h as usize,
            "{what}: rejected requests stay out"
        );
        assert_eq!(write.header_hash, header_hash(header), "{what}");
        assert_eq!(write.meta.height, h, "{what}");
        assert_eq!(write.meta.last_header_hash, write.header_hash, "{what}");
        assert_eq!(
            header.state_digest,
            write.meta.state_digest(),
            "{what}: digest of the replayed state"
        );
        assert_eq!(write.signed_header.header, *header, "{what}");
        assert_eq!(write.body, body.encode(), "{what}");
        assert_eq!(write.requests.len(), body.items.len(), "{what}");

        let meta = node.store.meta().expect("mem store");
        assert_eq!(meta, write.meta, "{what}: the store holds the new meta");
        assert_eq!(
            *node.seq.meta(),
            meta,
            "{what}: the sequencer agrees with the store"
        );
        assert_eq!(
            total_balance(&node.store),
            meta.expected_total(),
            "{what}: conservation"
        );
        assert_eq!(
            node.store.header(h).expect("mem"),
            Some(write.signed_header.clone())
        );
        assert_eq!(node.store.body(h).expect("mem"), Some(write.body.clone()));
        last_hash = write.header_hash;

        let confirmations = request_confirmations(&body, &write.signed_header);
        assert_eq!(confirmations.len(), body.items.len());
        for (i, c) in confirmations.iter().enumerate() {
            check_confirmation(
                c,
                &confirmations,
                &node.operator,
                &format!("{what}, entry {i}"),
            );
        }
    }
}

/// `c` verifies, and each tampered copy of it does not.
fn check_confirmation(
    c: &Confirmation,
    siblings: &[Confirmation],
    operator: &OperatorKey,
    what: &str,
) {
    let public = operator.public();
    verify_confirmation(c, &public)
        .unwrap_or_else(|e| panic!("{what}: a good confirmation fails: {e}"));
    let decoded = Confirmation::decode(&c.encode()).expect("confirmation decodes");
    assert_eq!(decoded, *c, "{what}: confirmation round trip");

    let rejects = |how: &str, change: &dyn Fn(&mut Confirmation), reason: &str| {
        let mut bad = c.clone();
        change(&mut bad);
        match verify_confirmation(&bad, &public) {
            Err(Error::Verify(m)) => assert!(
                m.contains(reason),
                "{what}, {how}: failed for another reason: {m}"
            ),
            other => panic!("{what}, {how}: expected a verification failure, got {other:?}"),
        }
    };
    let other_operator = OperatorKey::new(key(251)).public();
    match verify_confirmation(c, &other_operator) {
        Err(Error::Verify(_)) => {}
        other => panic!("{what}: verified under another operator key: {other:?}"),
    }
    for byte in [0, 31, 32, 63] {
        rejects(
            "a flipped signature byte",
            &|b| b.header.signature[byte] ^= 0x01,
            "operator signature",
        );
    }
    rejects(
        "a modified signer balance",
        &|b| b.receipt.signer_balance ^= 1,
        "inclusion proof",
    );
    rejects(
        "a modified recipient balance",
        &|b| b.receipt.to_balance += 1,
        "inclusion proof",
    );
    rejects(
        "a modified request amount",
        &|b| b.request.amount += 1,
        "signature",
    );
    rejects("a modified request id", &|b| b.request.id += 1, "signature");
    rejects(
        "a modified request signature",
        &|b| b.request.signature[5] ^= 4,
        "signature",
    );
    rejects(
        "a modified header root",
        &|b| b.header.header.merkle_root[0] ^= 1,
        "inclusion proof",
    );
    rejects(
        "a modified header digest",
        &|b| b.header.header.state_digest[0] ^= 1,
        "operator signature",
    );
    rejects(
        "a modified header time",
        &|b| b.header.header.time_unix_ms += 1,
        "operator signature",
    );
    rejects(
        "a modified header height",
        &|b| b.header.header.height += 1,
        "height",
    );
    rejects(
        "a modified receipt height",
        &|b| b.receipt.height += 1,
        "height",
    );
    rejects(
        "a modified request count",
        &|b| b.header.header.request_count += 1,
        "position",
    );
    rejects(
        "a modified proof size",
        &|b| b.proof.tree_size += 1,
        "position",
    );
    rejects(
        "a modified chain id",
        &|b| b.header.header.chain_id[0] ^= 1,
        "chains",
    );
    if !c.proof.path.is_empty() {
        rejects(
            "a modified proof hash",
            &|b| b.proof.path[0][0] ^= 1,
            "inclusion proof",
        );
        rejects(
            "a dropped proof hash",
            &|b| {
                b.proof.path.pop();
            },
            "inclusion proof",
        );
    }
    rejects(
        "an extra proof hash",
        &|b| b.proof.path.push([0; 32]),
        "inclusion proof",
    );
    for other in siblings
        .iter()
        .filter(|o| o.receipt.index != c.receipt.index)
    {
        rejects(
            "another entry's proof",
            &|b| b.proof = other.proof.clone(),
            "position",
        );
        rejects(
            "another entry's proof, index relabelled",
            &|b| {
                b.proof = tally_wire::InclusionProof {
                    leaf_index: c.proof.leaf_index,
                    ..other.proof.clone()
                }
            },
            "inclusion proof",
        );
        rejects(
            "another entry's request",
            &|b| b.request = other.request.clone(),
            "different request",
        );
    }
    if c.request.op == Op::Transfer {
        rejects(
            "a receipt with another operation",
            &|b| b.receipt.op = Op::Withdraw,
            "operation",
        );
    }
}

#[test]
fn pipelined_batches_chain_too() {
    // Three batches sealed before the first is applied, as while batch N replicates.
    let mut node = Node::new();
    let mut sealed = Vec::new();
    for h in 1..=3u64 {
        submit_batch(&mut node, h);
        node.seal();
        sealed.push(node.pending.back().expect("sealed").header.clone());
    }
    assert_eq!(node.seq.applied_height(), 0);
    let mut prev = [0u8; 32];
    for header in &sealed {
        assert_eq!(header.prev_hash, prev, "height {}", header.height);
        prev = header_hash(header);
    }
    let writes: Vec<_> = std::iter::from_fn(|| node.apply_next()).collect();
    assert_eq!(writes.len(), 3);
    for ((body, write), header) in writes.iter().zip(&sealed) {
        assert_eq!(body.header, *header);
        assert_eq!(write.meta.state_digest(), header.state_digest);
    }
    // A confirmation from batch 2 under batch 3's header does not verify.
    let (body2, write2) = &writes[1];
    let (_, write3) = &writes[2];
    let mut c = request_confirmations(body2, &write2.signed_header).remove(0);
    verify_confirmation(&c, &node.operator.public()).expect("good");
    c.header = write3.signed_header.clone();
    assert!(verify_confirmation(&c, &node.operator.public()).is_err());
}

#[test]
fn body_decoding_refuses_bad_lengths() {
    let mut node = Node::new();
    submit_batch(&mut node, 2);
    node.seal();
    let body = node.pending.pop_front().expect("sealed");
    let bytes = body.encode();
    let entry = REQUEST_BYTES + RECEIPT_BYTES;
    assert_eq!(bytes.len(), HEADER_BYTES + 4 + body.items.len() * entry);
    assert_eq!(BatchBody::decode(&bytes).expect("good"), body);

    let check = |how: &str, bad: Vec<u8>| {
        assert!(
            BatchBody::decode(&bad).is_err(),
            "decoded a body with {how}"
        );
    };
    check("nothing", Vec::new());
    check("a truncated header", bytes[..HEADER_BYTES - 1].to_vec());
    check("no count", bytes[..HEADER_BYTES].to_vec());
    check("one byte less", bytes[..bytes.len() - 1].to_vec());
    check("one entry less", bytes[..bytes.len() - entry].to_vec());
    check("a trailing byte", [&bytes[..], &[0u8][..]].concat());
    check(
        "an extra entry's worth of zeros",
        [&bytes[..], &vec![0u8; entry][..]].concat(),
    );
    let mut bad = bytes.clone();
    bad[HEADER_BYTES] += 1;
    check("a count one too high", bad);
    let mut bad = bytes.clone();
    bad[HEADER_BYTES..HEADER_BYTES + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    check("a huge count", bad);
    let mut bad = bytes.clone();
    bad[0] ^= 1;
    check("a bad header domain", bad);
    let mut bad = bytes.clone();
    bad[HEADER_BYTES + 4] ^= 1;
    check("a bad request domain", bad);
    let mut bad = bytes.clone();
    bad[HEADER_BYTES + 4 + REQUEST_BYTES] ^= 1;
    check("a bad receipt domain", bad);

    // An empty body (no entries) round-trips, though the sequencer never seals one.
    let empty = BatchBody {
        header: body.header.clone(),
        items: Vec::new(),
    };
    assert_eq!(BatchBody::decode(&empty.encode()).expect("empty"), empty);
}
