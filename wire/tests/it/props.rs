//! Randomized tests (proptest). On failure proptest prints the minimal failing input and writes
//! the failing case's seed to `proptest-regressions/`, which later runs replay first; set
//! `PROPTEST_RNG_SEED=<u64>` to fix the whole run's seed, `PROPTEST_CASES` to run more cases.

use proptest::prelude::*;
use tally_wire::*;

use crate::fixtures::MAX;

fn bytes32() -> impl Strategy<Value = [u8; 32]> {
    prop::array::uniform32(any::<u8>())
}

fn bytes64() -> impl Strategy<Value = [u8; 64]> {
    (bytes32(), bytes32()).prop_map(|(a, b)| {
        let mut out = [0u8; 64];
        out[..32].copy_from_slice(&a);
        out[32..].copy_from_slice(&b);
        out
    })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![Just(Op::Deposit), Just(Op::Transfer), Just(Op::Withdraw)]
}

/// Any request the layout rules accept: amount > 0, `to` zero for a withdrawal, a transfer not
/// to its own signer.
fn request() -> impl Strategy<Value = Request> {
    (
        bytes32(),
        op(),
        any::<u128>(),
        bytes32(),
        bytes32(),
        1..=u64::MAX,
        bytes64(),
    )
        .prop_map(|(chain_id, op, id, signer, to, amount, signature)| {
            let to = match op {
                Op::Withdraw => [0; 32],
                Op::Transfer if to == signer => {
                    let mut to = to;
                    to[0] ^= 1;
                    to
                }
                _ => to,
            };
            Request {
                chain_id,
                op,
                id,
                signer,
                to,
                amount,
                signature,
            }
        })
}

fn receipt() -> impl Strategy<Value = Receipt> {
    (
        bytes32(),
        any::<u64>(),
        any::<u32>(),
        op(),
        any::<u64>(),
        any::<u64>(),
        (
            proptest::option::of(proptest::sample::select(ErrorCode::ALL)),
            any::<u16>(),
        ),
    )
        .prop_map(
            |(request_hash, height, index, op, signer_balance, to_balance, (failed, op_index))| {
                Receipt {
                    request_hash,
                    height,
                    index,
                    op,
                    failed,
                    op_index,
                    signer_balance,
                    to_balance,
                }
            },
        )
}

fn header() -> impl Strategy<Value = Header> {
    (
        bytes32(),
        any::<(u64, u64, u64, u32)>(),
        bytes32(),
        bytes32(),
        bytes32(),
        any::<[u8; 8]>(),
    )
        .prop_map(
            |(
                chain_id,
                (height, term, time_unix_ms, request_count),
                prev_hash,
                merkle_root,
                state_digest,
                operator_key_id,
            )| {
                Header {
                    chain_id,
                    height,
                    term,
                    time_unix_ms,
                    request_count,
                    prev_hash,
                    merkle_root,
                    state_digest,
                    operator_key_id,
                }
            },
        )
}

fn signed_header() -> impl Strategy<Value = SignedHeader> {
    (header(), bytes64()).prop_map(|(header, signature)| SignedHeader { header, signature })
}

fn confirmation() -> impl Strategy<Value = Confirmation> {
    (
        any::<bool>(),
        request(),
        receipt(),
        signed_header(),
        any::<(u32, u32)>(),
        prop::collection::vec(bytes32(), 0..=PROOF_HASHES_MAX),
    )
        .prop_map(
            |(replayed, request, receipt, header, (leaf_index, tree_size), path)| Confirmation {
                replayed,
                request,
                receipt,
                header,
                proof: InclusionProof {
                    leaf_index,
                    tree_size,
                    path,
                },
            },
        )
}

/// A message through a whole frame and back.
fn frame_round_trip(m: &Message, correlation_id: u64) -> Result<(), TestCaseError> {
    let bytes = m.encode_frame(correlation_id);
    let Decoded::Complete(frame, used) = decode_frame(&bytes, MAX).unwrap() else {
        return Err(TestCaseError::fail("whole frame decoded as incomplete"));
    };
    prop_assert_eq!(used, bytes.len());
    prop_assert_eq!(frame.correlation_id, correlation_id);
    prop_assert_eq!(&Message::decode(&frame).unwrap(), m);
    Ok(())
}

proptest! {
    #[test]
    fn request_round_trip(r in request(), cid in any::<u64>()) {
        let bytes = r.encode();
        prop_assert_eq!(&bytes[..REQUEST_SIGNED_BYTES], &r.signed_bytes()[..]);
        prop_assert_eq!(Request::decode(&bytes).unwrap(), r.clone());
        frame_round_trip(&Message::Submit(r.clone()), cid)?;
        frame_round_trip(&Message::SubmitHinted(r, [cid as u8; 32]), cid)?;
    }

    #[test]
    fn receipt_round_trip(r in receipt()) {
        prop_assert_eq!(Receipt::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn header_round_trip(h in header()) {
        prop_assert_eq!(Header::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn signed_header_round_trip(h in signed_header(), cid in any::<u64>()) {
        prop_assert_eq!(SignedHeader::decode(&h.encode()).unwrap(), h.clone());
        frame_round_trip(&Message::Headers(vec![h.clone(), h]), cid)?;
    }

    #[test]
    fn confirmation_round_trip(c in confirmation(), cid in any::<u64>()) {
        prop_assert_eq!(Confirmation::decode(&c.encode()).unwrap(), c.clone());
        frame_round_trip(&Message::Confirmed(Box::new(c)), cid)?;
    }

    /// Canonical layouts have one encoding: whatever bytes decode, re-encode to the same bytes
    /// (no malleability: no ignored bits, so a signature or hash covers exactly one value).
    #[test]
    fn accepted_bytes_are_canonical(
        r in request(), rc in receipt(), h in header(),
        at in 0usize..208, byte in any::<u8>(),
    ) {
        let mut bytes = r.encode();
        bytes[at] = byte;
        if let Ok(d) = Request::decode(&bytes) {
            prop_assert_eq!(d.encode(), bytes);
        }
        let mut bytes = rc.encode();
        bytes[at % RECEIPT_BYTES] = byte;
        if let Ok(d) = Receipt::decode(&bytes) {
            prop_assert_eq!(d.encode(), bytes);
        }
        let mut bytes = h.encode();
        bytes[at % HEADER_BYTES] = byte;
        if let Ok(d) = Header::decode(&bytes) {
            prop_assert_eq!(d.encode(), bytes);
        }
    }

    /// Garbage never panics, and whatever decodes re-encodes to the same payload.
    #[test]
    fn arbitrary_payloads_never_panic(message_type in any::<u8>(), payload in prop::collection::vec(any::<u8>(), 0..700)) {
        let frame = RawFrame { message_type, correlation_id: 1, payload: payload.clone() };
        if let Ok(m) = Message::decode(&frame) {
            let mut out = Vec::new();
            m.encode_payload(&mut out);
            prop_assert_eq!(out, payload);
        }
    }

    /// A valid payload with one byte changed either decodes (and re-encodes to itself) or errors.
    #[test]
    fn mutated_payloads_never_panic(c in confirmation(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let m = Message::Confirmed(Box::new(c));
        let mut payload = Vec::new();
        m.encode_payload(&mut payload);
        let i = at.index(payload.len());
        payload[i] = byte;
        let frame = RawFrame { message_type: m.message_type(), correlation_id: 1, payload: payload.clone() };
        if let Ok(m) = Message::decode(&frame) {
            let mut out = Vec::new();
            m.encode_payload(&mut out);
            prop_assert_eq!(out, payload);
        }
    }

    /// The same for admin requests and membership replies: a changed byte either decodes to a
    /// message that re-encodes to exactly these bytes, or is refused (never a panic).
    #[test]
    fn mutated_admin_payloads_never_panic(which in 0usize..8, at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let commands = crate::fixtures::every_admin_command();
        let m = match commands.get(which) {
            Some(c) => Message::Admin(Box::new(crate::fixtures::admin(c.clone()))),
            None => Message::Members(Box::new(crate::fixtures::members())),
        };
        let mut payload = Vec::new();
        m.encode_payload(&mut payload);
        let i = at.index(payload.len());
        payload[i] = byte;
        let frame = RawFrame { message_type: m.message_type(), correlation_id: 1, payload: payload.clone() };
        if let Ok(m) = Message::decode(&frame) {
            let mut out = Vec::new();
            m.encode_payload(&mut out);
            prop_assert_eq!(out, payload);
        }
    }

    #[test]
    fn arbitrary_streams_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64), max in any::<u32>()) {
        let mut stream = MAGIC.to_vec();
        stream.extend_from_slice(&bytes);
        for input in [&bytes[..], &stream[..]] {
            match decode_frame(input, max) {
                Ok(Decoded::Complete(f, used)) => prop_assert_eq!(used, FRAME_HEADER_BYTES + f.payload.len()),
                Ok(Decoded::Incomplete { needed }) => prop_assert!(needed > 0),
                Err(e) => prop_assert!(e.breaks_stream()),
            }
        }
    }
}
