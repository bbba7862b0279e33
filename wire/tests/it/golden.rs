//! Golden bytes, written by hand from the offset tables in PROTOCOL.md (not captured from the
//! encoder). Each layout is a list of (offset, field, hex); the helper checks that the offsets
//! follow one another, so a wrong table here fails loudly instead of pinning a mistake.
//! If one of these tests fails, the wire format changed: that breaks every client and every
//! stored signature, and needs a new version, not a new golden string.

use tally_wire::*;

use crate::fixtures::unhex;

/// Concatenates `fields` after checking each starts where the previous ended, and the total.
fn layout(fields: &[(usize, &str, &str)], total: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for &(at, name, hex) in fields {
        assert_eq!(
            out.len(),
            at,
            "field {name} starts at {at}, but the fields before end at {}",
            out.len()
        );
        out.extend_from_slice(&unhex(hex));
    }
    assert_eq!(out.len(), total, "layout total");
    out
}

fn check(encoded: &[u8], fields: &[(usize, &str, &str)], total: usize) {
    let want = layout(fields, total);
    for &(at, name, hex) in fields {
        let n = hex.len() / 2;
        assert_eq!(
            encoded.get(at..at + n),
            Some(&want[at..at + n]),
            "field {name} at offset {at}"
        );
    }
    assert_eq!(encoded, want.as_slice());
}

const CHAIN_ID: &str = "a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf";

fn chain_id() -> Hash {
    std::array::from_fn(|i| 0xa0 + i as u8)
}

fn golden_request() -> Request {
    Request {
        chain_id: chain_id(),
        op: Op::Transfer,
        id: 0x0f0e_0d0c_0b0a_0908_0706_0504_0302_0100,
        signer: [0x11; 32],
        to: [0x22; 32],
        amount: 1_000_000,
        signature: std::array::from_fn(|i| 0x40 + i as u8),
    }
}

const REQUEST: &[(usize, &str, &str)] = &[
    (
        0,
        "domain \"tally/request/v1\"",
        "74616c6c792f726571756573742f7631",
    ),
    (16, "chain_id", CHAIN_ID),
    (48, "op = 2 (transfer)", "02"),
    (49, "reserved", "00000000000000"),
    (56, "id u128 LE", "000102030405060708090a0b0c0d0e0f"),
    (
        72,
        "signer",
        "1111111111111111111111111111111111111111111111111111111111111111",
    ),
    (
        104,
        "to",
        "2222222222222222222222222222222222222222222222222222222222222222",
    ),
    (136, "amount u64 LE = 1_000_000", "40420f0000000000"),
    (
        144,
        "signature",
        "404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f\
         606162636465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f",
    ),
];

const FRAME_HEADER: &[(usize, &str, &str)] = &[
    (0, "magic \"TLLY\"", "544c4c59"),
    (4, "version", "01"),
    (5, "message type = 0x01 (submit)", "01"),
    (6, "flags", "0000"),
    (8, "correlation id u64 LE", "0807060504030201"),
    (16, "payload length u32 LE = 208", "d0000000"),
];

#[test]
fn request() {
    let r = golden_request();
    check(&r.encode(), REQUEST, 208);
    check(&r.signed_bytes(), &REQUEST[..REQUEST.len() - 1], 144);
    assert_eq!(Request::decode(&layout(REQUEST, 208)).unwrap(), r);
}

#[test]
fn frame_header() {
    let h = FrameHeader {
        message_type: 0x01,
        correlation_id: 0x0102_0304_0506_0708,
        payload_len: 208,
    };
    check(&h.encode(), FRAME_HEADER, 20);
    assert_eq!(
        FrameHeader::decode(&layout(FRAME_HEADER, 20), 208).unwrap(),
        Decoded::Complete(h, 20)
    );
}

#[test]
fn submit_frame_is_header_then_request() {
    let mut want = layout(FRAME_HEADER, 20);
    want.extend_from_slice(&layout(REQUEST, 208));
    assert_eq!(
        Message::Submit(golden_request()).encode_frame(0x0102_0304_0506_0708),
        want
    );
}

#[test]
fn submit_hinted_frame_is_header_then_request_then_hint() {
    const HINTED_HEADER: &[(usize, &str, &str)] = &[
        (0, "magic \"TLLY\"", "544c4c59"),
        (4, "version", "01"),
        (5, "message type = 0x05 (submit hinted)", "05"),
        (6, "flags", "0000"),
        (8, "correlation id u64 LE", "0807060504030201"),
        (16, "payload length u32 LE = 240", "f0000000"),
    ];
    let hint = [0xab; 32];
    let mut want = layout(HINTED_HEADER, 20);
    want.extend_from_slice(&layout(REQUEST, 208));
    want.extend_from_slice(&hint);
    let frame = Message::SubmitHinted(golden_request(), hint).encode_frame(0x0102_0304_0506_0708);
    assert_eq!(frame, want);
    // The same request bytes as a plain Submit: the hint only follows them.
    let plain = Message::Submit(golden_request()).encode_frame(0x0102_0304_0506_0708);
    assert_eq!(frame[20..228], plain[20..228]);
}

const RECEIPT: &[(usize, &str, &str)] = &[
    (
        0,
        "domain \"tally/receipt/v1\"",
        "74616c6c792f726563656970742f7631",
    ),
    (
        16,
        "request_hash",
        "3333333333333333333333333333333333333333333333333333333333333333",
    ),
    (48, "height u64 LE = 258", "0201000000000000"),
    (56, "index u32 LE = 7", "07000000"),
    (60, "op = 3 (withdraw)", "03"),
    (61, "reserved", "000000"),
    (64, "signer_balance u64 LE", "8877665544332211"),
    (72, "to_balance u64 LE = 0", "0000000000000000"),
];

fn golden_receipt() -> Receipt {
    Receipt {
        request_hash: [0x33; 32],
        height: 258,
        index: 7,
        op: Op::Withdraw,
        failed: None,
        op_index: 0,
        signer_balance: 0x1122_3344_5566_7788,
        to_balance: 0,
    }
}

#[test]
fn receipt() {
    check(&golden_receipt().encode(), RECEIPT, 80);
    assert_eq!(
        Receipt::decode(&layout(RECEIPT, 80)).unwrap(),
        golden_receipt()
    );
}

const HEADER: &[(usize, &str, &str)] = &[
    (
        0,
        "domain \"tally/header/v1\\0\"",
        "74616c6c792f6865616465722f763100",
    ),
    (16, "header version", "02"),
    (17, "reserved", "00000000000000"),
    (24, "chain_id", CHAIN_ID),
    (56, "height u64 LE = 5", "0500000000000000"),
    (64, "term u64 LE = 3", "0300000000000000"),
    (
        72,
        "time_unix_ms u64 LE = 1_700_000_000_000 = 0x18b_cfe5_6800",
        "0068e5cf8b010000",
    ),
    (80, "request_count u32 LE = 2", "02000000"),
    (84, "reserved", "00000000"),
    (
        88,
        "prev_hash",
        "4444444444444444444444444444444444444444444444444444444444444444",
    ),
    (
        120,
        "merkle_root",
        "5555555555555555555555555555555555555555555555555555555555555555",
    ),
    (
        152,
        "state_digest",
        "6666666666666666666666666666666666666666666666666666666666666666",
    ),
    (184, "operator_key_id", "0102030405060708"),
];

fn golden_header() -> Header {
    Header {
        chain_id: chain_id(),
        height: 5,
        term: 3,
        time_unix_ms: 1_700_000_000_000,
        request_count: 2,
        prev_hash: [0x44; 32],
        merkle_root: [0x55; 32],
        state_digest: [0x66; 32],
        operator_key_id: [1, 2, 3, 4, 5, 6, 7, 8],
    }
}

#[test]
fn header_and_signed_header() {
    check(&golden_header().encode(), HEADER, 192);
    assert_eq!(
        Header::decode(&layout(HEADER, 192)).unwrap(),
        golden_header()
    );
    let signed = SignedHeader {
        header: golden_header(),
        signature: [0x77; 64],
    };
    let mut fields = HEADER.to_vec();
    fields.push((
        192,
        "operator signature",
        "77777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777",
    ));
    check(&signed.encode(), &fields, 256);
}

#[test]
fn confirmation_payload() {
    let c = Confirmation {
        replayed: true,
        request: golden_request(),
        receipt: golden_receipt(),
        header: SignedHeader {
            header: golden_header(),
            signature: [0x77; 64],
        },
        proof: InclusionProof {
            leaf_index: 1,
            tree_size: 3,
            path: vec![[0x44; 32], [0x55; 32]],
        },
    };
    let mut want = unhex("01"); // flags: replayed
    want.extend_from_slice(&layout(REQUEST, 208));
    want.extend_from_slice(&layout(RECEIPT, 80));
    want.extend_from_slice(&layout(HEADER, 192));
    want.extend_from_slice(&[0x77; 64]);
    let proof = [
        (0, "leaf_index u32 LE = 1", "01000000"),
        (4, "tree_size u32 LE = 3", "03000000"),
        (8, "path_len u8 = 2", "02"),
        (
            9,
            "path[0]",
            "4444444444444444444444444444444444444444444444444444444444444444",
        ),
        (
            41,
            "path[1]",
            "5555555555555555555555555555555555555555555555555555555555555555",
        ),
    ];
    want.extend_from_slice(&layout(&proof, 73));
    assert_eq!(want.len(), 1 + 208 + 80 + 256 + 73);
    assert_eq!(c.encode(), want);
    let mut payload = Vec::new();
    Message::Confirmed(Box::new(c.clone())).encode_payload(&mut payload);
    assert_eq!(payload, want);
    assert_eq!(Confirmation::decode(&want).unwrap(), c);
}

/// Small messages: (message, payload hex by hand).
#[test]
fn small_message_payloads() {
    let cases: Vec<(Message, String)> = vec![
        (Message::GetStatus, String::new()),
        (
            Message::GetBalance {
                account: [0x11; 32],
                mode: ReadMode::Stale,
            },
            format!("{}01", "11".repeat(32)),
        ),
        (
            Message::GetHeaders {
                from_height: 258,
                limit: 1024,
            },
            "0201000000000000".to_owned() + "0004",
        ),
        (
            Message::Balance(BalanceReply {
                account: [0x22; 32],
                exists: true,
                balance: 5,
                height: 16,
                mode: ReadMode::Linearizable,
            }),
            format!(
                "{}01{}{}00",
                "22".repeat(32),
                "0500000000000000",
                "1000000000000000"
            ),
        ),
        (
            Message::Error(ErrorReply {
                code: ErrorCode::NotLeader,
                retry: Retry::Elsewhere,
                retry_after_ms: 250,
                leader_hint: "127.0.0.1:7000".into(),
                message: "é".into(),
            }),
            // code 31, retry 2, 250 ms, hint (len 14) "127.0.0.1:7000", message (len 2) "é".
            "1f00".to_owned()
                + "02"
                + "fa000000"
                + "0e00"
                + "3132372e302e302e313a37303030"
                + "0200"
                + "c3a9",
        ),
        (Message::Headers(vec![]), "0000".to_owned()),
        (Message::GetInfo, String::new()),
        (
            Message::Info(Box::new(InfoReply {
                chain_id: [0xa0; 32],
                operator_public_key: [0x0b; 32],
                node_id: 3,
                frame_bytes_max: 1 << 20,
                reply_payload_bytes_max: REPLY_PAYLOAD_BYTES_MAX,
                requests_in_flight_max: 4096,
                headers_per_reply_max: HEADERS_PER_REPLY_MAX,
                client_limits: None,
            })),
            "a0".repeat(32)
                + &"0b".repeat(32)
                + "0300000000000000"
                + "00001000"
                + "f5050f00"
                + "00100000"
                + "0004",
        ),
        (
            Message::Info(Box::new(InfoReply {
                chain_id: [0xa0; 32],
                operator_public_key: [0x0b; 32],
                node_id: 3,
                frame_bytes_max: 1 << 20,
                reply_payload_bytes_max: REPLY_PAYLOAD_BYTES_MAX,
                requests_in_flight_max: 4096,
                headers_per_reply_max: HEADERS_PER_REPLY_MAX,
                client_limits: Some(ClientLimits {
                    handshake_timeout_ms: 5_000,
                    first_request_timeout_ms: 10_000,
                    frame_timeout_ms: 10_000,
                    idle_timeout_ms: 300_000,
                    write_timeout_ms: 10_000,
                    connections_per_address_max: 64,
                }),
            })),
            "a0".repeat(32)
                + &"0b".repeat(32)
                + "0300000000000000"
                + "00001000"
                + "f5050f00"
                + "00100000"
                + "0004"
                + "88130000"
                + "10270000"
                + "10270000"
                + "e0930400"
                + "10270000"
                + "40000000",
        ),
        (
            Message::Status(Box::new(StatusReply {
                node_id: 1,
                role: 4,
                term: 2,
                leader_id: 1,
                commit_index: 3,
                applied_index: 3,
                applied_height: 2,
                writable: true,
                leader_client_address: String::new(),
                latest_header: None,
                archive_height: Some(2),
            })),
            "0100000000000000".to_owned()
                + "04"
                + "0200000000000000"
                + "0100000000000000"
                + "0300000000000000"
                + "0300000000000000"
                + "0200000000000000"
                + "01"
                + "0000"
                + "00"
                + "01"
                + "0200000000000000",
        ),
    ];
    for (m, hex) in cases {
        let want = unhex(&hex);
        let mut got = Vec::new();
        m.encode_payload(&mut got);
        assert_eq!(got, want, "{m:?}");
        assert_eq!(
            Message::decode(&crate::fixtures::frame(m.message_type(), &want)).unwrap(),
            m
        );
    }
}

/// PROTOCOL.md §3, `0x07 Admin`: an `add` of node 4 as a learner, without a client address.
#[test]
fn admin_add_payload() {
    let request = AdminRequest {
        chain_id: chain_id(),
        issued_unix_ms: 1_700_000_000_000,
        nonce: 0x0102_0304_0506_0708,
        command: AdminCommand::Add {
            id: 4,
            address: "127.0.0.1:7503".into(),
            client_address: String::new(),
            learner: true,
        },
        admin_key: [0xad; 32],
        signature: std::array::from_fn(|i| 0x40 + i as u8),
    };
    let sig = "404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f\
               606162636465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f";
    let key = "ad".repeat(32);
    let fields = [
        (0, "domain", "74616c6c792f61646d696e2f76310000"),
        (16, "chain_id", CHAIN_ID),
        (48, "issued_unix_ms", "0068e5cf8b010000"),
        (56, "nonce", "0807060504030201"),
        (64, "admin_key", key.as_str()),
        (96, "command", "02"),
        (97, "id", "0400000000000000"),
        (105, "learner", "01"),
        (106, "address", "0e00"),
        (108, "address bytes", "3132372e302e302e313a37353033"),
        (122, "client_address", "0000"),
        (124, "signature", sig),
    ];
    let mut p = Vec::new();
    Message::Admin(Box::new(request.clone())).encode_payload(&mut p);
    check(&p, &fields, 188);
    assert_eq!(request.signing_bytes(), p[..124].to_vec());
    let decoded = Message::decode(&RawFrame {
        message_type: 0x07,
        correlation_id: 1,
        payload: p,
    });
    assert_eq!(decoded, Ok(Message::Admin(Box::new(request))));
}

/// PROTOCOL.md §3, `0x87 Members`: a leader and a learner.
#[test]
fn members_payload() {
    let reply = MembersReply {
        leader_id: 1,
        members: vec![
            Member {
                id: 1,
                role: MemberRole::Voter,
                address: "127.0.0.1:7500".into(),
                client_address: "127.0.0.1:7400".into(),
            },
            Member {
                id: 4,
                role: MemberRole::Learner,
                address: "h:1".into(),
                client_address: String::new(),
            },
        ],
    };
    let fields = [
        (0, "leader_id", "0100000000000000"),
        (8, "count", "0200"),
        (10, "[0].id", "0100000000000000"),
        (18, "[0].role", "00"),
        (19, "[0].address", "0e003132372e302e302e313a37353030"),
        (35, "[0].client_address", "0e003132372e302e302e313a37343030"),
        (51, "[1].id", "0400000000000000"),
        (59, "[1].role", "01"),
        (60, "[1].address", "0300683a31"),
        (65, "[1].client_address", "0000"),
    ];
    let mut p = Vec::new();
    Message::Members(Box::new(reply.clone())).encode_payload(&mut p);
    check(&p, &fields, 67);
    let decoded = Message::decode(&RawFrame {
        message_type: 0x87,
        correlation_id: 1,
        payload: p,
    });
    assert_eq!(decoded, Ok(Message::Members(Box::new(reply))));
}
