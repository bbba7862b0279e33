//! Envelopes: layout, round trips, and every way the decoder refuses one.

use tally_wire::*;

use crate::fixtures::{header, receipt};

fn operation(id: u128, op: Op) -> Operation {
    Operation {
        op,
        id,
        to: if op == Op::Withdraw {
            [0; 32]
        } else {
            [0x22; 32]
        },
        amount: 10 + id as u64,
        timeout_ms: 0,
        reserve_id: 0,
        party: [0; 32],
    }
}

fn envelope(count: u32, atomic: bool) -> Envelope {
    let kinds = [Op::Transfer, Op::Withdraw, Op::Deposit];
    Envelope {
        chain_id: [0xc4; 32],
        signer: [0x11; 32],
        atomic,
        ops: (0..count)
            .map(|i| operation(i as u128 + 1, kinds[i as usize % 3]))
            .collect(),
        signature: [0x5e; 64],
    }
}

fn refused(bytes: &[u8]) -> WireError {
    Envelope::decode(bytes).expect_err("the decoder must refuse this envelope")
}

#[test]
fn the_layout_is_the_documented_one() {
    let e = envelope(2, true);
    let bytes = e.encode();
    assert_eq!(
        bytes.len(),
        ENVELOPE_PREFIX_BYTES + 2 * OPERATION_BYTES + 64
    );
    assert_eq!(&bytes[0..16], b"tally/envelope/1");
    assert_eq!(&bytes[16..48], &[0xc4; 32]);
    assert_eq!(&bytes[48..80], &[0x11; 32]);
    assert_eq!(bytes[80], ENVELOPE_FLAG_ATOMIC);
    assert_eq!(&bytes[84..88], &2u32.to_le_bytes());
    let op1 = &bytes[88 + OPERATION_BYTES..88 + 2 * OPERATION_BYTES];
    assert_eq!(op1[0], Op::Withdraw as u8);
    assert_eq!(&op1[8..24], &2u128.to_le_bytes());
    assert_eq!(&op1[24..56], &[0; 32]);
    assert_eq!(&op1[56..64], &12u64.to_le_bytes());
    assert!(
        op1[64..].iter().all(|b| *b == 0),
        "two-phase fields are zero"
    );
    assert_eq!(&bytes[bytes.len() - 64..], &[0x5e; 64]);
    assert_eq!(e.signed_bytes(), bytes[..bytes.len() - 64]);
}

#[test]
fn envelopes_round_trip_up_to_the_limit_inside_a_default_frame() {
    for (count, atomic) in [(1, false), (3, true), (ENVELOPE_OPS_MAX, false)] {
        let e = envelope(count, atomic);
        assert_eq!(Envelope::decode(&e.encode()).expect("valid"), e);
        let m = Message::SubmitEnvelope(Box::new(e));
        let frame = m.encode_frame(7);
        let payload = (frame.len() - FRAME_HEADER_BYTES) as u32;
        assert!(
            payload <= FRAME_PAYLOAD_BYTES_MAX_DEFAULT,
            "{count} ops: {payload} bytes"
        );
        let raw = RawFrame {
            message_type: m.message_type(),
            correlation_id: 7,
            payload: frame[FRAME_HEADER_BYTES..].to_vec(),
        };
        assert_eq!(Message::decode_request(&raw).expect("decodes"), m);
    }
}

#[test]
fn the_decoder_refuses_counts_flags_and_reserved_bytes() {
    let good = envelope(2, false).encode();
    let mut zero_count = good.clone();
    zero_count[84..88].copy_from_slice(&0u32.to_le_bytes());
    assert!(matches!(
        refused(&zero_count),
        WireError::Invalid {
            field: "envelope.count",
            ..
        }
    ));
    let mut over = good.clone();
    over[84..88].copy_from_slice(&(ENVELOPE_OPS_MAX + 1).to_le_bytes());
    assert!(matches!(
        refused(&over),
        WireError::Invalid {
            field: "envelope.count",
            ..
        }
    ));
    // A count the bytes do not back is refused before anything is allocated for it.
    let mut short = good.clone();
    short[84..88].copy_from_slice(&ENVELOPE_OPS_MAX.to_le_bytes());
    assert!(matches!(
        refused(&short),
        WireError::Truncated {
            field: "envelope.operations"
        }
    ));
    let mut flags = good.clone();
    flags[80] = 2;
    assert!(matches!(
        refused(&flags),
        WireError::Invalid {
            field: "envelope.flags",
            ..
        }
    ));
    let mut reserved = good.clone();
    reserved[82] = 1;
    assert!(matches!(
        refused(&reserved),
        WireError::Invalid {
            field: "envelope.reserved",
            ..
        }
    ));
    let mut two_phase = good.clone();
    two_phase[88 + 100] = 1;
    assert!(matches!(
        refused(&two_phase),
        WireError::Invalid {
            field: "operation.two_phase",
            ..
        }
    ));
    let mut kind = good;
    kind[88] = 99;
    assert!(matches!(
        refused(&kind),
        WireError::Invalid {
            field: "operation.kind",
            ..
        }
    ));
}

#[test]
fn each_operation_obeys_the_rules_of_a_request() {
    let mut e = envelope(3, true);
    e.ops[1].amount = 0;
    assert!(matches!(
        refused(&e.encode()),
        WireError::Invalid {
            field: "request.amount",
            ..
        }
    ));
    let mut e = envelope(3, true);
    e.ops[0].to = e.signer;
    assert!(matches!(
        refused(&e.encode()),
        WireError::Invalid {
            field: "request.to",
            ..
        }
    ));
    let mut e = envelope(3, true);
    e.ops[2].to = [0; 32];
    assert!(matches!(
        refused(&e.encode()),
        WireError::Invalid {
            field: "request.to",
            ..
        }
    ));
    let mut e = envelope(3, true);
    e.ops[2].id = e.ops[0].id;
    assert!(matches!(
        refused(&e.encode()),
        WireError::Invalid {
            field: "operation.id",
            ..
        }
    ));
}

#[test]
fn confirmations_and_failures_round_trip() {
    let mut failed = receipt();
    failed.failed = Some(ErrorCode::InsufficientFunds);
    failed.op_index = 1;
    failed.signer_balance = 0;
    failed.to_balance = 0;
    let c = EnvelopeConfirmation {
        replayed: true,
        envelope_hash: [0x44; 32],
        header: SignedHeader {
            header: header(9),
            signature: [0x77; 64],
        },
        receipts: vec![receipt(), failed.clone()],
        proof: RangeProof {
            first: 2,
            count: 2,
            tree_size: 9,
            hashes: vec![[1; 32], [2; 32], [3; 32]],
        },
    };
    assert_eq!(EnvelopeConfirmation::decode(&c.encode()).expect("valid"), c);
    assert_eq!(Receipt::decode(&failed.encode()).expect("valid"), failed);
    assert_eq!(failed.encode()[61], ErrorCode::InsufficientFunds as u8);
    assert_eq!(&failed.encode()[62..64], &1u16.to_le_bytes());
    for m in [
        Message::EnvelopeConfirmed(Box::new(c)),
        Message::EnvelopeFailed(EnvelopeFailed {
            code: ErrorCode::InsufficientFunds,
            failed_index: 4711,
            message: "balance 3 is less than 5".into(),
        }),
    ] {
        let mut payload = Vec::new();
        m.encode_payload(&mut payload);
        let raw = RawFrame {
            message_type: m.message_type(),
            correlation_id: 1,
            payload,
        };
        assert_eq!(Message::decode(&raw).expect("decodes"), m);
    }
}

/// A two-phase operation of `kind` with every field as its kind wants it.
fn two_phase(kind: Op) -> Operation {
    let mut o = Operation::single(kind, 9, [0; 32], 0);
    match kind {
        Op::Reserve => {
            (o.to, o.amount, o.timeout_ms, o.party) = ([0x22; 32], 5, 1_000, [0x33; 32]);
        }
        Op::Post => (o.reserve_id, o.amount) = (4, 3),
        Op::Void => o.reserve_id = 4,
        _ => (o.reserve_id, o.timeout_ms) = (4, 1_000),
    }
    o
}

fn with_op(o: Operation) -> Result<Envelope, WireError> {
    let mut e = envelope(1, true);
    e.ops[0] = o;
    Envelope::decode(&e.encode())
}

#[test]
fn two_phase_operations_round_trip_with_their_fields() {
    for kind in [Op::Reserve, Op::Post, Op::Void, Op::Renew] {
        let o = two_phase(kind);
        let e = with_op(o).unwrap_or_else(|err| panic!("{kind:?}: {err}"));
        assert_eq!(e.ops[0], o);
        let bytes = {
            let mut out = Vec::new();
            o.write(&mut out);
            out
        };
        assert_eq!(bytes.len(), OPERATION_BYTES);
        assert_eq!(&bytes[64..72], &o.timeout_ms.to_le_bytes());
        assert_eq!(&bytes[72..88], &o.reserve_id.to_le_bytes());
        assert_eq!(&bytes[88..120], &o.party);
    }
    // A post of 0 captures the whole reserve: allowed.
    let mut whole = two_phase(Op::Post);
    whole.amount = 0;
    assert!(with_op(whole).is_ok());
}

#[test]
fn two_phase_fields_out_of_place_are_refused() {
    let field = |o: Operation| match with_op(o) {
        Err(WireError::Invalid { field, .. }) => field,
        other => panic!("{o:?} must be refused, got {other:?}"),
    };
    let cases: Vec<(Operation, &str)> = vec![
        (
            Operation {
                timeout_ms: 0,
                ..two_phase(Op::Reserve)
            },
            "operation.timeout_ms",
        ),
        (
            Operation {
                timeout_ms: RESERVE_TIMEOUT_MS_MAX + 1,
                ..two_phase(Op::Reserve)
            },
            "operation.timeout_ms",
        ),
        (
            Operation {
                amount: 0,
                ..two_phase(Op::Reserve)
            },
            "operation.amount",
        ),
        (
            Operation {
                to: [0; 32],
                ..two_phase(Op::Reserve)
            },
            "operation.to",
        ),
        (
            Operation {
                to: [0x11; 32],
                ..two_phase(Op::Reserve)
            },
            "operation.to",
        ),
        (
            Operation {
                reserve_id: 1,
                ..two_phase(Op::Reserve)
            },
            "operation.reserve_id",
        ),
        (
            Operation {
                to: [0x22; 32],
                ..two_phase(Op::Post)
            },
            "operation.to",
        ),
        (
            Operation {
                timeout_ms: 5,
                ..two_phase(Op::Void)
            },
            "operation.timeout_ms",
        ),
        (
            Operation {
                amount: 5,
                ..two_phase(Op::Void)
            },
            "operation.amount",
        ),
        (
            Operation {
                timeout_ms: 0,
                ..two_phase(Op::Renew)
            },
            "operation.timeout_ms",
        ),
        (
            Operation {
                amount: 1,
                ..two_phase(Op::Renew)
            },
            "operation.amount",
        ),
        (
            Operation {
                party: [1; 32],
                ..operation(1, Op::Transfer)
            },
            "operation.two_phase",
        ),
        (
            Operation {
                reserve_id: 1,
                ..operation(1, Op::Withdraw)
            },
            "operation.two_phase",
        ),
    ];
    for (o, want) in cases {
        assert_eq!(field(o), want, "{o:?}");
    }
    // Kind 8 (an expiry) is the leader's, never a signer's.
    let mut bytes = envelope(1, true).encode();
    bytes[88] = Op::Expire as u8;
    assert!(matches!(
        refused(&bytes),
        WireError::Invalid {
            field: "operation.kind",
            ..
        }
    ));
}

#[test]
fn requests_carry_only_the_single_kinds_and_receipts_every_kind() {
    let r = crate::fixtures::request(Op::Transfer);
    let mut bytes = r.encode().to_vec();
    for kind in [Op::Reserve, Op::Post, Op::Void, Op::Renew, Op::Expire] {
        bytes[48] = kind as u8;
        assert!(matches!(
            Request::decode(&bytes),
            Err(WireError::Invalid {
                field: "request.op",
                ..
            })
        ));
    }
    let mut rc = receipt();
    rc.op = Op::Expire;
    assert_eq!(Receipt::decode(&rc.encode()).unwrap(), rc);
}
