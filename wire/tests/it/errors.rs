//! Error mapping and the stable error-code table.

use std::collections::HashSet;

use tally_wire::*;

fn check(e: WireError, code: ErrorCode, breaks_stream: bool) {
    assert_eq!(
        (e.code(), e.breaks_stream()),
        (code, breaks_stream),
        "{e:?}"
    );
}

#[test]
fn wire_errors_map_to_codes() {
    use ErrorCode::*;
    check(
        WireError::BadMagic { found: *b"GET " },
        MalformedFrame,
        true,
    );
    check(WireError::BadFlags { found: 1 }, MalformedFrame, true);
    check(
        WireError::UnsupportedVersion {
            found: 2,
            supported: 1,
        },
        UnsupportedVersion,
        true,
    );
    check(
        WireError::FrameTooLarge { length: 2, max: 1 },
        FrameTooLarge,
        true,
    );
    check(
        WireError::UnknownMessageType { found: 0x66 },
        UnknownMessageType,
        false,
    );
    check(
        WireError::Truncated {
            field: "request.id",
        },
        MalformedMessage,
        false,
    );
    check(
        WireError::TrailingBytes { count: 1 },
        MalformedMessage,
        false,
    );
    check(
        WireError::Invalid {
            field: "request.op",
            reason: "r",
        },
        MalformedMessage,
        false,
    );
}

/// The whole table as PROTOCOL.md documents it: numbers and names are stable forever.
const TABLE: &[(u16, &str, Retry)] = &[
    (1, "malformed_frame", Retry::Never),
    (2, "unsupported_version", Retry::Never),
    (3, "unknown_message_type", Retry::Never),
    (4, "frame_too_large", Retry::Never),
    (5, "malformed_message", Retry::Never),
    (10, "malformed_request", Retry::Never),
    (11, "bad_signature", Retry::Never),
    (12, "wrong_chain", Retry::Never),
    (13, "unknown_deposit_key", Retry::Never),
    (14, "unauthorized", Retry::Never),
    (15, "stale_request", Retry::Never),
    (20, "unknown_account", Retry::Later),
    (21, "insufficient_funds", Retry::Later),
    (22, "amount_overflow", Retry::Never),
    (23, "id_conflict", Retry::Never),
    (24, "reserve_not_found", Retry::Never),
    (25, "reserve_closed", Retry::Never),
    (26, "reserve_expired", Retry::Never),
    (27, "post_exceeds_reserve", Retry::Never),
    (28, "not_a_reserve_party", Retry::Never),
    (30, "busy", Retry::Later),
    (31, "not_leader", Retry::Elsewhere),
    (32, "unavailable", Retry::Later),
    (33, "shutting_down", Retry::Elsewhere),
    (34, "too_many_in_flight", Retry::Later),
    (35, "archive_behind", Retry::Later),
    (36, "recovering", Retry::Elsewhere),
    (37, "membership_refused", Retry::Later),
    (38, "rotation_refused", Retry::Never),
    (40, "not_found", Retry::Never),
    (41, "history_pruned", Retry::Never),
    (42, "height_not_applied", Retry::Never),
    (50, "internal", Retry::Later),
];

#[test]
fn error_code_table_is_pinned() {
    assert_eq!(ErrorCode::ALL.len(), TABLE.len());
    for (&code, &(number, name, retry)) in ErrorCode::ALL.iter().zip(TABLE) {
        assert_eq!(
            (code as u16, code.name(), code.retry()),
            (number, name, retry)
        );
        assert_eq!(code.to_string(), format!("{name} ({number})"));
    }
}

#[test]
fn error_codes_round_trip_and_are_unique() {
    let mut names = HashSet::new();
    let mut numbers = HashSet::new();
    for &c in ErrorCode::ALL {
        assert_eq!(ErrorCode::from_u16(c as u16), Some(c));
        assert!(names.insert(c.name()), "duplicate name {}", c.name());
        assert!(numbers.insert(c as u16), "duplicate number {}", c as u16);
        assert!(
            c.name()
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_'),
            "{}",
            c.name()
        );
    }
    // Every number outside the table is unknown.
    for v in 0..=u16::MAX {
        assert_eq!(
            ErrorCode::from_u16(v).is_some(),
            numbers.contains(&v),
            "{v}"
        );
    }
}

#[test]
fn retry_classes() {
    for r in [Retry::Never, Retry::Later, Retry::Elsewhere] {
        assert_eq!(Retry::from_u8(r as u8), Some(r));
    }
    assert_eq!(
        [
            Retry::Never as u8,
            Retry::Later as u8,
            Retry::Elsewhere as u8
        ],
        [0, 1, 2]
    );
    for v in 3..=u8::MAX {
        assert_eq!(Retry::from_u8(v), None);
    }
}

#[test]
fn ops_and_read_modes() {
    for (v, op, name) in [
        (1, Op::Deposit, "deposit"),
        (2, Op::Transfer, "transfer"),
        (3, Op::Withdraw, "withdraw"),
        (4, Op::Reserve, "reserve"),
        (5, Op::Post, "post"),
        (6, Op::Void, "void"),
        (7, Op::Renew, "renew"),
        (8, Op::Expire, "expire"),
        (9, Op::Rotate, "rotate"),
    ] {
        assert_eq!((Op::from_u8(v), op as u8, op.name()), (Some(op), v, name));
    }
    for v in [0u8, 10, 0xff] {
        assert_eq!(Op::from_u8(v), None);
    }
    assert_eq!(
        (ReadMode::Linearizable as u8, ReadMode::Stale as u8),
        (0, 1)
    );
}
