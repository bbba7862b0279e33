//! Every message survives encode_frame → decode_frame → Message::decode unchanged.

use tally_wire::*;

use crate::fixtures::{self, *};

/// Encodes `m` in a frame with `correlation_id`, decodes it back and compares everything.
fn check(m: &Message, correlation_id: u64) {
    let bytes = m.encode_frame(correlation_id);
    let Decoded::Complete(frame, used) = decode_frame(&bytes, MAX).expect("frame decodes") else {
        panic!("a whole frame decoded as incomplete: {m:?}");
    };
    assert_eq!(used, bytes.len(), "frame length for {m:?}");
    assert_eq!(frame.message_type, m.message_type());
    assert_eq!(frame.correlation_id, correlation_id);
    assert_eq!(frame.payload.len(), bytes.len() - FRAME_HEADER_BYTES);
    assert_eq!(&Message::decode(&frame).expect("payload decodes"), m);
}

#[test]
fn every_variant() {
    for m in every_message() {
        for correlation_id in [0, 1, 0x0102_0304_0506_0708, u64::MAX] {
            check(&m, correlation_id);
        }
    }
}

#[test]
fn message_types_are_the_documented_bytes() {
    let types: Vec<u8> = every_message().iter().map(Message::message_type).collect();
    for t in [
        0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87,
    ] {
        assert!(types.contains(&t), "no sample of type 0x{t:02x}");
    }
    // Requests from clients are below 0x80, replies at or above.
    for m in every_message() {
        let is_reply = matches!(
            m,
            Message::Confirmed(_)
                | Message::Error(_)
                | Message::Balance(_)
                | Message::Headers(_)
                | Message::Status(_)
                | Message::Info(_)
                | Message::Members(_)
                | Message::EnvelopeConfirmed(_)
                | Message::EnvelopeFailed(_)
                | Message::OperationConfirmed(_)
                | Message::ExpiryConfirmed(_)
                | Message::Consistency(_)
                | Message::Checkpoint(_)
                | Message::BalanceProof(_)
                | Message::KeyChain(_)
                | Message::Supply(_)
                | Message::History(_)
                | Message::Account(_)
        );
        assert_eq!(m.message_type() >= 0x80, is_reply, "{m:?}");
        assert_eq!(
            message_type::is_request(m.message_type()),
            !is_reply,
            "{m:?}"
        );
    }
    for t in (0x12..=0xff).filter(|t| !(0x80..=0x92).contains(t)) {
        assert!(!message_type::is_request(t), "0x{t:02x}");
    }
}

#[test]
fn confirmation_with_every_proof_length() {
    for path_len in 0..=PROOF_HASHES_MAX {
        for replayed in [false, true] {
            let c = confirmation(path_len, replayed);
            let m = Message::Confirmed(Box::new(c.clone()));
            check(&m, 5);
            let bytes = c.encode();
            assert_eq!(bytes.len(), 1 + 208 + 80 + 256 + 9 + 32 * path_len);
            assert_eq!(Confirmation::decode(&bytes).unwrap(), c);
        }
    }
}

#[test]
fn headers_empty_and_full() {
    check(&Message::Headers(vec![]), 1);
    let full: Vec<SignedHeader> = (1..=HEADERS_PER_REPLY_MAX as u64)
        .map(signed_header)
        .collect();
    let m = Message::Headers(full);
    assert_eq!(payload(&m).len(), 2 + 1024 * 256);
    check(&m, 2);
}

#[test]
fn status_with_and_without_header() {
    check(&Message::Status(Box::new(status(None))), 1);
    check(
        &Message::Status(Box::new(status(Some(signed_header(1))))),
        1,
    );
    let mut s = status(None);
    s.writable = false;
    s.leader_client_address.clear();
    check(&Message::Status(Box::new(s)), 1);
}

#[test]
fn error_with_unicode_and_every_code() {
    let unicode = ErrorReply {
        code: ErrorCode::Busy,
        retry: Retry::Later,
        retry_after_ms: u32::MAX,
        leader_hint: "réplica-2:7100".into(),
        message: "Überlastet — 忙しい, retry 🙏".into(),
    };
    check(&Message::Error(unicode), 9);
    for &code in ErrorCode::ALL {
        check(&Message::Error(ErrorReply::new(code, code.name())), 9);
    }
}

#[test]
fn overlong_strings_are_cut_at_a_char_boundary() {
    // put_string cuts to u16::MAX bytes; with 2-byte chars the cut lands one byte earlier.
    let message = "é".repeat(40_000);
    let m = Message::Error(ErrorReply::new(ErrorCode::Internal, message.clone()));
    let bytes = m.encode_frame(1);
    let Decoded::Complete(frame, _) = decode_frame(&bytes, MAX).unwrap() else {
        panic!()
    };
    let Message::Error(e) = Message::decode(&frame).unwrap() else {
        panic!()
    };
    assert_eq!(e.message.len(), 65_534);
    assert!(message.starts_with(&e.message));
}

#[test]
fn canonical_layouts_decode_their_own_encoding() {
    for op in [Op::Deposit, Op::Transfer, Op::Withdraw] {
        let r = fixtures::request(op);
        let bytes = r.encode();
        assert_eq!(bytes.len(), REQUEST_BYTES);
        assert_eq!(bytes[..REQUEST_SIGNED_BYTES], r.signed_bytes());
        assert_eq!(bytes[REQUEST_SIGNED_BYTES..], r.signature);
        assert_eq!(Request::decode(&bytes).unwrap(), r);
    }
    let rc = receipt();
    assert_eq!(Receipt::decode(&rc.encode()).unwrap(), rc);
    let h = header(3);
    assert_eq!(Header::decode(&h.encode()).unwrap(), h);
    let sh = signed_header(3);
    let bytes = sh.encode();
    assert_eq!(bytes[..HEADER_BYTES], sh.header.encode());
    assert_eq!(SignedHeader::decode(&bytes).unwrap(), sh);
}

#[test]
fn error_reply_helpers() {
    for &code in ErrorCode::ALL {
        let e = ErrorReply::new(code, "m");
        assert_eq!(
            (e.retry, e.retry_after_ms, e.leader_hint.as_str()),
            (code.retry(), 0, "")
        );
    }
    let w = WireError::FrameTooLarge { length: 9, max: 8 };
    let e = ErrorReply::from(&w);
    assert_eq!(e.code, ErrorCode::FrameTooLarge);
    assert_eq!(e.message, w.to_string());
}

/// A server judges the type before the payload: any non-request type is
/// `unknown_message_type`, an empty `Confirmed` included (PROTOCOL.md §3).
#[test]
fn servers_refuse_reply_types_before_reading_them() {
    for m in every_message() {
        let t = m.message_type();
        let mut payload = Vec::new();
        m.encode_payload(&mut payload);
        for body in [payload.clone(), Vec::new(), vec![0xff; 3]] {
            let frame = fixtures::frame(t, &body);
            let decoded = Message::decode_request(&frame);
            if message_type::is_request(t) {
                if body == payload {
                    assert_eq!(decoded.as_ref(), Ok(&m));
                }
            } else {
                let e = decoded.unwrap_err();
                assert_eq!(
                    e.code(),
                    ErrorCode::UnknownMessageType,
                    "0x{t:02x} {body:?}"
                );
            }
        }
    }
    let empty_confirmed = fixtures::frame(message_type::CONFIRMED, &[]);
    assert_eq!(
        Message::decode_request(&empty_confirmed)
            .unwrap_err()
            .code() as u16,
        3
    );
    // A client decoding the same frame as a reply finds it malformed.
    assert_eq!(
        Message::decode(&empty_confirmed).unwrap_err().code(),
        ErrorCode::MalformedMessage
    );
}
