//! Invalid input, tested as hard as valid input: every way a frame header or a payload can be
//! wrong, and exactly what the decoder answers.

use tally_wire::*;

use crate::fixtures::*;

// ---------------------------------------------------------------------------------------------
// Frame headers
// ---------------------------------------------------------------------------------------------

#[derive(Debug, PartialEq)]
enum Want {
    /// `Decoded::Incomplete { needed }`.
    Incomplete(usize),
    /// `Decoded::Complete` using this many bytes.
    Complete(usize),
    Err(WireError),
}

fn check_frame(bytes: &[u8], max: u32, want: Want) {
    let got = match decode_frame(bytes, max) {
        Ok(Decoded::Incomplete { needed }) => Want::Incomplete(needed),
        Ok(Decoded::Complete(frame, used)) => {
            assert_eq!(frame.payload.len(), used - FRAME_HEADER_BYTES);
            Want::Complete(used)
        }
        Err(e) => {
            // Every framing error desynchronizes the stream.
            assert!(e.breaks_stream(), "{e:?} should break the stream");
            Want::Err(e)
        }
    };
    assert_eq!(got, want, "decode_frame({bytes:02x?}, max {max})");
    // The header decoder alone agrees on errors and on a missing header.
    if let Want::Err(e) = &want {
        assert_eq!(FrameHeader::decode(bytes, max).unwrap_err(), *e);
    }
}

fn with_payload(mut header: Vec<u8>, payload_len: usize) -> Vec<u8> {
    header.resize(header.len() + payload_len, 0xab);
    header
}

#[test]
fn incomplete_header_asks_for_the_rest() {
    let whole = raw_header(VERSION, 0x01, 0, 7, 0);
    for n in 0..FRAME_HEADER_BYTES {
        check_frame(&whole[..n], MAX, Want::Incomplete(FRAME_HEADER_BYTES - n));
    }
    check_frame(&whole, MAX, Want::Complete(FRAME_HEADER_BYTES));
}

#[test]
fn bad_magic_is_seen_as_soon_as_its_byte_arrives() {
    let cases: &[(&[u8], [u8; 4])] = &[
        (b"X", *b"X\0\0\0"),
        (b"\0", [0; 4]),
        (b"TX", *b"TX\0\0"),
        (b"TLX", *b"TLX\0"),
        (b"TLLX", *b"TLLX"),
        (b"tlly", *b"tlly"),
        (b"GET / HTTP/1.1\r\n\r\n\r\n", *b"GET "),
        (&[0x16, 0x03, 0x01, 0x00, 0xc4], [0x16, 0x03, 0x01, 0x00]), // a TLS ClientHello
    ];
    for (bytes, found) in cases {
        check_frame(bytes, MAX, Want::Err(WireError::BadMagic { found: *found }));
    }
    let mut full = raw_header(VERSION, 0x01, 0, 7, 0);
    full[3] = b'Z';
    check_frame(
        &full,
        MAX,
        Want::Err(WireError::BadMagic { found: *b"TLLZ" }),
    );
}

#[test]
fn wrong_version_is_seen_at_byte_five() {
    for version in [0u8, 2, 0x7f, 0xff] {
        let want = || {
            Want::Err(WireError::UnsupportedVersion {
                found: version,
                supported: 1,
            })
        };
        let header = raw_header(version, 0x01, 0, 7, 0);
        check_frame(&header[..5], MAX, want());
        check_frame(&header, MAX, want());
    }
}

#[test]
fn non_zero_flags() {
    for flags in [1u16, 0x0100, 0x8000, 0xffff] {
        let header = raw_header(VERSION, 0x01, flags, 7, 0);
        // Flags are judged once the whole header is there.
        check_frame(&header[..19], MAX, Want::Incomplete(1));
        check_frame(
            &header,
            MAX,
            Want::Err(WireError::BadFlags { found: flags }),
        );
    }
}

#[test]
fn oversize_length_is_refused_with_only_the_header_present() {
    let cases = [(MAX, MAX + 1), (MAX, u32::MAX), (100, 101), (0, 1)];
    for (max, length) in cases {
        let header = raw_header(VERSION, 0x01, 0, 7, length);
        assert_eq!(header.len(), FRAME_HEADER_BYTES);
        check_frame(
            &header,
            max,
            Want::Err(WireError::FrameTooLarge { length, max }),
        );
    }
    // Exactly at the cap is allowed.
    check_frame(
        &raw_header(VERSION, 0x01, 0, 7, 100),
        100,
        Want::Incomplete(100),
    );
    check_frame(
        &raw_header(VERSION, 0x01, 0, 7, MAX),
        MAX,
        Want::Incomplete(MAX as usize),
    );
    check_frame(
        &raw_header(VERSION, 0x04, 0, 7, 0),
        0,
        Want::Complete(FRAME_HEADER_BYTES),
    );
}

#[test]
fn truncated_payload_asks_for_the_rest() {
    let header = raw_header(VERSION, 0x01, 0, 7, 10);
    let cases = [
        (0, Want::Incomplete(10)),
        (3, Want::Incomplete(7)),
        (9, Want::Incomplete(1)),
        (10, Want::Complete(30)),
        // Bytes after the frame belong to the next one and are left alone.
        (15, Want::Complete(30)),
    ];
    for (have, want) in cases {
        check_frame(&with_payload(header.clone(), have), MAX, want);
    }
}

#[test]
fn the_frame_layer_does_not_judge_message_types() {
    // An unknown type is a payload error (answered, stream kept), not a framing error.
    let bytes = with_payload(raw_header(VERSION, 0x66, 0, 7, 2), 2);
    let Decoded::Complete(frame, 22) = decode_frame(&bytes, MAX).unwrap() else {
        panic!()
    };
    assert_eq!((frame.message_type, frame.correlation_id), (0x66, 7));
}

// ---------------------------------------------------------------------------------------------
// Payloads inside well-formed frames
// ---------------------------------------------------------------------------------------------

/// Decodes `payload` as a message of `message_type`, expecting `want` (an `Invalid` compares by
/// field only). Payload errors never break the stream.
fn check(message_type: u8, payload: &[u8], want: Result<(), WireError>) {
    let got = Message::decode(&frame(message_type, payload));
    match (&got, &want) {
        (Ok(_), Ok(())) => {}
        (Err(e), Err(w)) if same_error(e, w) => {
            assert!(!e.breaks_stream(), "{e:?} must not break the stream");
            let code = if matches!(e, WireError::UnknownMessageType { .. }) {
                ErrorCode::UnknownMessageType
            } else {
                ErrorCode::MalformedMessage
            };
            assert_eq!(e.code(), code);
        }
        _ => panic!(
            "type 0x{message_type:02x}, {} bytes: got {got:?}, want {want:?}",
            payload.len()
        ),
    }
}

fn err(e: WireError) -> Result<(), WireError> {
    Err(e)
}

fn truncated(field: &'static str) -> Result<(), WireError> {
    Err(WireError::Truncated { field })
}

fn trailing(count: u64) -> Result<(), WireError> {
    Err(WireError::TrailingBytes { count })
}

/// `m`'s payload with the bytes at `at` overwritten by `bytes`.
fn patched(m: &Message, at: usize, bytes: &[u8]) -> Vec<u8> {
    let mut p = payload(m);
    p[at..at + bytes.len()].copy_from_slice(bytes);
    p
}

fn submit(op: Op) -> Message {
    Message::Submit(request(op))
}

#[test]
fn unknown_message_types() {
    for t in [0x00u8, 0x12, 0x7f, 0x80, 0x93, 0xff] {
        check(t, &[], err(WireError::UnknownMessageType { found: t }));
    }
}

#[test]
fn every_strict_prefix_is_truncated_and_every_extension_is_trailing() {
    for m in every_message() {
        let p = payload(&m);
        let t = m.message_type();
        for cut in 0..p.len() {
            // The frame's length matches the cut payload, so the frame itself is complete.
            let mut bytes = Vec::new();
            encode_frame(&mut bytes, t, 1, &p[..cut]);
            let Decoded::Complete(f, _) = decode_frame(&bytes, MAX).unwrap() else {
                panic!()
            };
            match Message::decode(&f) {
                Err(WireError::Truncated { .. }) => {}
                // An Info cut before its client limits is an older server's Info.
                Ok(Message::Info(i)) if cut == INFO_BYTES_WITHOUT_CLIENT_LIMITS => {
                    assert_eq!(i.client_limits, None)
                }
                other => panic!("{m:?} cut at {cut}: {other:?}"),
            }
        }
        let older_info = matches!(&m, Message::Info(i) if i.client_limits.is_none());
        for extra in [1usize, 3, 256] {
            let mut longer = p.clone();
            longer.resize(p.len() + extra, 0);
            if !older_info {
                check(t, &longer, trailing(extra as u64));
            } else if extra < CLIENT_LIMITS_BYTES {
                // The bytes after an older Info are read as the start of the client limits.
                assert!(matches!(
                    Message::decode(&frame(t, &longer)),
                    Err(WireError::Truncated { .. })
                ));
            } else {
                check(t, &longer, trailing((extra - CLIENT_LIMITS_BYTES) as u64));
            }
        }
    }
}

#[test]
fn requests() {
    use message_type::SUBMIT;
    let transfer = submit(Op::Transfer);
    let mut cases = vec![
        (payload(&transfer), Ok(())),
        (payload(&submit(Op::Deposit)), Ok(())),
        (payload(&submit(Op::Withdraw)), Ok(())),
        (vec![], truncated("request.domain")),
        (
            payload(&transfer)[..207].to_vec(),
            truncated("request.signature"),
        ),
        (patched(&transfer, 0, b"x"), err(invalid("request.domain"))),
        (
            patched(&transfer, 14, b"v2"),
            err(invalid("request.domain")),
        ),
        (patched(&transfer, 48, &[0]), err(invalid("request.op"))),
        (patched(&transfer, 48, &[4]), err(invalid("request.op"))),
        (patched(&transfer, 48, &[0xff]), err(invalid("request.op"))),
        (
            patched(&transfer, 136, &[0; 8]),
            err(invalid("request.amount")),
        ),
        (
            patched(&submit(Op::Withdraw), 104, &[1]),
            err(invalid("request.to")),
        ),
        (
            patched(&submit(Op::Withdraw), 135, &[0x80]),
            err(invalid("request.to")),
        ),
        (
            patched(&transfer, 104, &[0x11; 32]),
            err(invalid("request.to")),
        ),
        // Nobody holds the all-zero key: crediting it would burn the funds.
        (
            patched(&transfer, 104, &[0; 32]),
            err(invalid("request.to")),
        ),
        (
            patched(&submit(Op::Deposit), 104, &[0; 32]),
            err(invalid("request.to")),
        ),
        // A deposit may credit the key that signs it: deposit keys hold no balance, core decides.
        (patched(&submit(Op::Deposit), 104, &[0x11; 32]), Ok(())),
        // Changing op alone keeps a valid layout when `to` fits the new op.
        (patched(&transfer, 48, &[1]), Ok(())),
        (patched(&transfer, 48, &[3]), err(invalid("request.to"))),
    ];
    for at in 49..56 {
        cases.push((
            patched(&transfer, at, &[1]),
            err(invalid("request.reserved")),
        ));
    }
    for (bytes, want) in cases {
        check(SUBMIT, &bytes, want.clone());
        // The standalone decoder agrees.
        match (Request::decode(&bytes), want) {
            (Ok(_), Ok(())) => {}
            (Err(e), Err(w)) => assert!(same_error(&e, &w), "{e:?} vs {w:?}"),
            (got, want) => panic!("Request::decode: {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn error_replies() {
    use message_type::ERROR;
    let e = Message::Error(ErrorReply {
        code: ErrorCode::NotLeader,
        retry: Retry::Elsewhere,
        retry_after_ms: 0,
        leader_hint: "ab".into(),
        message: "xyz".into(),
    });
    // Layout: code 0..2, retry 2, retry_after_ms 3..7, hint len 7..9, hint 9..11, msg len 11..13.
    let mut cases = vec![
        (payload(&e), Ok(())),
        (patched(&e, 7, &[3, 0]), truncated("error.message")),
        (
            patched(&e, 7, &[0xff, 0xff]),
            truncated("error.leader_hint"),
        ),
        (patched(&e, 11, &[2, 0]), trailing(1)),
        (patched(&e, 11, &[4, 0]), truncated("error.message")),
        (patched(&e, 13, &[0xc3]), err(invalid("error.message"))),
        (patched(&e, 9, &[0xff]), err(invalid("error.leader_hint"))),
        // The retry class need not be the code's default: the server may say better.
        (patched(&e, 2, &[0]), Ok(())),
    ];
    for code in [0u16, 6, 9, 16, 29, 39, 99, 0xffff] {
        cases.push((
            patched(&e, 0, &code.to_le_bytes()),
            err(invalid("error.code")),
        ));
    }
    for retry in [3u8, 0x80, 0xff] {
        cases.push((patched(&e, 2, &[retry]), err(invalid("error.retry"))));
    }
    for (bytes, want) in cases {
        check(ERROR, &bytes, want);
    }
}

#[test]
fn bools_and_read_modes() {
    use message_type::*;
    let balance = Message::Balance(BalanceReply {
        account: [1; 32],
        exists: true,
        balance: 5,
        height: 6,
        mode: ReadMode::Stale,
    });
    let get_balance = Message::GetBalance {
        account: [1; 32],
        mode: ReadMode::Stale,
    };
    let status_bare = Message::Status(Box::new(status(None)));
    // Status: node_id 0..8, role 8, term 9..17, leader 17..25, commit 25..33, applied 33..41,
    // applied_height 41..49, writable 49, address len 50..52, address 52..66, has_header 66,
    // (header 256,) has_archive, archive_height 8.
    let has_header = 52 + "127.0.0.1:7100".len();
    let with_header = payload(&Message::Status(Box::new(status(Some(signed_header(1))))));
    assert_eq!(with_header[has_header], 1);
    let bare = payload(&status_bare);
    let mut cases = vec![];
    for bad in [2u8, 0x80, 0xff] {
        cases.extend([
            (
                BALANCE,
                patched(&balance, 32, &[bad]),
                err(invalid("balance.exists")),
            ),
            (
                BALANCE,
                patched(&balance, 32 + 1 + 16, &[bad]),
                err(invalid("read_mode")),
            ),
            (
                GET_BALANCE,
                patched(&get_balance, 32, &[bad]),
                err(invalid("read_mode")),
            ),
            (
                STATUS,
                patched(&status_bare, 49, &[bad]),
                err(invalid("status.writable")),
            ),
            (
                STATUS,
                patched(&status_bare, has_header, &[bad]),
                err(invalid("status.has_header")),
            ),
            (
                STATUS,
                patched(&status_bare, has_header + 1, &[bad]),
                err(invalid("status.has_archive")),
            ),
        ]);
    }
    cases.extend([
        (STATUS, with_header.clone(), Ok(())),
        (
            STATUS,
            patched(&status_bare, has_header, &[1]),
            truncated("header.domain"),
        ),
        (
            STATUS,
            {
                // No header said, but one sent: its first byte is read as has_archive.
                let mut p = with_header.clone();
                p[has_header] = 0;
                p
            },
            err(invalid("status.has_archive")),
        ),
        (
            STATUS,
            bare[..bare.len() - 3].to_vec(),
            truncated("status.archive_height"),
        ),
        (STATUS, [&bare[..], &[0][..]].concat(), trailing(1)),
        (
            GET_HEADERS,
            payload(&Message::GetHeaders {
                from_height: 1,
                limit: 2,
            })[..9]
                .to_vec(),
            truncated("get_headers.limit"),
        ),
        (GET_STATUS, vec![0], trailing(1)),
    ]);
    for (t, bytes, want) in cases {
        check(t, &bytes, want);
    }
}

#[test]
fn headers_replies() {
    use message_type::HEADERS;
    let one = signed_header(1).encode();
    let headers = |count: u16, present: usize| {
        let mut p = count.to_le_bytes().to_vec();
        for _ in 0..present {
            p.extend_from_slice(&one);
        }
        p
    };
    let cases = vec![
        (headers(0, 0), Ok(())),
        (headers(2, 2), Ok(())),
        // The count is judged before any header is read.
        (headers(1025, 0), err(invalid("headers.count"))),
        (headers(0xffff, 0), err(invalid("headers.count"))),
        (headers(2, 1), truncated("header.domain")),
        (headers(1, 2), trailing(256)),
        (vec![1], truncated("headers.count")),
    ];
    for (bytes, want) in cases {
        check(HEADERS, &bytes, want);
    }
}

#[test]
fn confirmations() {
    use message_type::CONFIRMED;
    let c = Message::Confirmed(Box::new(confirmation(3, false)));
    // Layout: flags 0, request 1..209, receipt 209..289, signed header 289..545,
    // proof: leaf_index 545..549, tree_size 549..553, path_len 553, path 554..
    let (request, receipt, header, path_len) = (1, 209, 289, 553);
    let mut cases = vec![
        (payload(&c), Ok(())),
        (patched(&c, 0, &[1]), Ok(())),
        (patched(&c, path_len, &[4]), truncated("proof.path")),
        (patched(&c, path_len, &[2]), trailing(32)),
        (patched(&c, path_len, &[0]), trailing(96)),
        (patched(&c, path_len, &[33]), err(invalid("proof.path_len"))),
        (
            patched(&c, path_len, &[0xff]),
            err(invalid("proof.path_len")),
        ),
        (patched(&c, request + 48, &[9]), err(invalid("request.op"))),
        (patched(&c, receipt, b"T"), err(invalid("receipt.domain"))),
        (patched(&c, receipt + 60, &[0]), err(invalid("receipt.op"))),
        (patched(&c, header, b"T"), err(invalid("header.domain"))),
        // Version 1 headers (state digest v1, before the state map) are no longer read.
        (
            patched(&c, header + 16, &[1]),
            err(invalid("header.version")),
        ),
        (
            patched(&c, header + 16, &[3]),
            err(invalid("header.version")),
        ),
    ];
    for flags in [2u8, 3, 0x80, 0xff] {
        cases.push((patched(&c, 0, &[flags]), err(invalid("confirmation.flags"))));
    }
    // Byte 61 names why an operation failed: a byte that is no error code is refused.
    for code in [6u8, 9, 0xff] {
        cases.push((
            patched(&c, receipt + 61, &[code]),
            err(invalid("receipt.failed")),
        ));
    }
    for at in (header + 17..header + 24).chain(header + 84..header + 88) {
        cases.push((patched(&c, at, &[1]), err(invalid("header.reserved"))));
    }
    // A path of 33 hashes is refused even when all 33 are present.
    let mut long = payload(&Message::Confirmed(Box::new(confirmation(32, false))));
    long[path_len] = 33;
    long.extend_from_slice(&[9; 32]);
    cases.push((long, err(invalid("proof.path_len"))));
    for (bytes, want) in cases {
        check(CONFIRMED, &bytes, want.clone());
        match (Confirmation::decode(&bytes), want) {
            (Ok(_), Ok(())) => {}
            (Err(e), Err(w)) => assert!(same_error(&e, &w), "{e:?} vs {w:?}"),
            (got, want) => panic!("Confirmation::decode: {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn standalone_canonical_decoders_want_exact_lengths() {
    let r = request(Op::Transfer).encode();
    assert_eq!(
        Request::decode(&r[..207]).unwrap_err(),
        WireError::Truncated {
            field: "request.signature"
        }
    );
    let mut longer = r.to_vec();
    longer.push(0);
    assert_eq!(
        Request::decode(&longer).unwrap_err(),
        WireError::TrailingBytes { count: 1 }
    );

    let rc = receipt().encode();
    assert_eq!(
        Receipt::decode(&rc[..79]).unwrap_err(),
        WireError::Truncated {
            field: "receipt.to_balance"
        }
    );
    let h = header(1).encode();
    assert_eq!(
        Header::decode(&h[..191]).unwrap_err(),
        WireError::Truncated {
            field: "header.operator_key_id"
        }
    );
    let sh = signed_header(1).encode();
    assert_eq!(
        SignedHeader::decode(&sh[..255]).unwrap_err(),
        WireError::Truncated {
            field: "header.signature"
        }
    );
    assert_eq!(
        SignedHeader::decode(&h).unwrap_err(),
        WireError::Truncated {
            field: "header.signature"
        }
    );
}
