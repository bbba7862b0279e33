//! Admin requests (`0x07`) and membership replies (`0x87`): layouts, strict decoding (every
//! field checked, caps judged before reading), and what the signature covers.

use tally_wire::*;

use crate::fixtures::*;

/// Decodes `payload` as `message_type`, expecting an error on `field` (an `Invalid` compares by
/// field only) or success.
fn check(message_type: u8, payload: &[u8], want: Result<(), WireError>) {
    let got = Message::decode(&frame(message_type, payload));
    match (&got, &want) {
        (Ok(m), Ok(())) => assert_eq!(&payload_of(m), payload, "re-encodes to itself"),
        (Err(e), Err(w)) if same_error(e, w) => {
            assert_eq!(e.code(), ErrorCode::MalformedMessage);
            assert!(!e.breaks_stream());
        }
        _ => panic!("type 0x{message_type:02x} {payload:02x?}: got {got:?}, want {want:?}"),
    }
}

fn payload_of(m: &Message) -> Vec<u8> {
    payload(m)
}

fn admin_payload(command: AdminCommand) -> Vec<u8> {
    payload(&Message::Admin(Box::new(admin(command))))
}

fn add(address: &str, client_address: &str) -> AdminCommand {
    AdminCommand::Add {
        id: 4,
        address: address.into(),
        client_address: client_address.into(),
        learner: true,
    }
}

/// A `string` field as the encoder writes it, without any check.
fn raw_string(text: &[u8]) -> Vec<u8> {
    let mut out = (text.len() as u16).to_le_bytes().to_vec();
    out.extend_from_slice(text);
    out
}

/// An `Add` payload with the two address fields given as raw bytes.
fn raw_add(address: &[u8], client_address: &[u8]) -> Vec<u8> {
    let mut p = admin_payload(AdminCommand::Members);
    p.truncate(ADMIN_FIXED_BYTES);
    p.push(admin_command::ADD);
    p.extend_from_slice(&4u64.to_le_bytes());
    p.push(1);
    p.extend_from_slice(&raw_string(address));
    p.extend_from_slice(&raw_string(client_address));
    p.extend_from_slice(&[0x5f; 64]);
    p
}

#[test]
fn admin_is_a_request_and_members_a_reply() {
    assert!(message_type::is_request(message_type::ADMIN));
    assert!(!message_type::is_request(message_type::MEMBERS));
    assert_eq!((message_type::ADMIN, message_type::MEMBERS), (0x07, 0x87));
    for command in every_admin_command() {
        let m = Message::Admin(Box::new(admin(command)));
        let p = payload(&m);
        assert_eq!(
            Message::decode_request(&frame(0x07, &p)).as_ref(),
            Ok(&m),
            "a server takes Admin as a request"
        );
    }
    let reply = Message::Members(Box::new(members()));
    assert_eq!(
        Message::decode_request(&frame(0x87, &payload(&reply))).unwrap_err(),
        WireError::UnknownMessageType { found: 0x87 }
    );
}

#[test]
fn the_signature_covers_every_byte_before_it() {
    for command in every_admin_command() {
        let request = admin(command);
        let p = payload(&Message::Admin(Box::new(request.clone())));
        let signed = request.signing_bytes();
        assert_eq!(signed.len() + 64, p.len());
        assert_eq!(&signed[..], &p[..p.len() - 64]);
        assert_eq!(&signed[..16], b"tally/admin/v1\0\0");
        assert_eq!(&p[p.len() - 64..], &request.signature[..]);
        // The signature is not part of what it signs.
        let mut other = request.clone();
        other.signature = [0; 64];
        assert_eq!(other.signing_bytes(), signed);
    }
    // Every field but the signature changes the signed bytes.
    let base = admin(AdminCommand::Remove { id: 2 });
    let variants = [
        AdminRequest {
            chain_id: [0xc5; 32],
            ..base.clone()
        },
        AdminRequest {
            issued_unix_ms: base.issued_unix_ms + 1,
            ..base.clone()
        },
        AdminRequest {
            nonce: base.nonce + 1,
            ..base.clone()
        },
        AdminRequest {
            admin_key: [0xae; 32],
            ..base.clone()
        },
        AdminRequest {
            command: AdminCommand::Remove { id: 3 },
            ..base.clone()
        },
        AdminRequest {
            command: AdminCommand::Promote { id: 2 },
            ..base.clone()
        },
    ];
    for v in variants {
        assert_ne!(v.signing_bytes(), base.signing_bytes(), "{v:?}");
    }
}

#[test]
fn admin_fixed_fields() {
    let good = admin_payload(AdminCommand::Members);
    assert_eq!(good.len(), ADMIN_FIXED_BYTES + 1 + 64);
    check(0x07, &good, Ok(()));
    let mut bad_domain = good.clone();
    bad_domain[15] = 1;
    check(0x07, &bad_domain, Err(invalid("admin.domain")));
    let mut v2 = good.clone();
    v2[13] = b'2';
    check(0x07, &v2, Err(invalid("admin.domain")));
    for tag in [0u8, 7, 0x7f, 0xff] {
        let mut p = good.clone();
        p[ADMIN_FIXED_BYTES] = tag;
        check(0x07, &p, Err(invalid("admin.command")));
    }
    // Members has no body: one more byte is trailing, whatever its value.
    let mut longer = good.clone();
    longer.push(0);
    check(0x07, &longer, Err(WireError::TrailingBytes { count: 1 }));
    check(
        0x07,
        &good[..good.len() - 1],
        Err(WireError::Truncated {
            field: "admin.signature",
        }),
    );
    check(
        0x07,
        &[],
        Err(WireError::Truncated {
            field: "admin.domain",
        }),
    );
}

#[test]
fn admin_ids_are_never_zero() {
    for command in [
        AdminCommand::Promote { id: 0 },
        AdminCommand::Remove { id: 0 },
        AdminCommand::TransferLeader { id: 0 },
    ] {
        assert!(command.check().is_err(), "{command:?}");
        // Encode with id 1, then patch the id to 0.
        let one = match command {
            AdminCommand::Promote { .. } => AdminCommand::Promote { id: 1 },
            AdminCommand::Remove { .. } => AdminCommand::Remove { id: 1 },
            _ => AdminCommand::TransferLeader { id: 1 },
        };
        let mut p = admin_payload(one);
        p[ADMIN_FIXED_BYTES + 1] = 0;
        check(0x07, &p, Err(invalid("admin.id")));
    }
    let mut p = raw_add(b"h:1", b"");
    p[ADMIN_FIXED_BYTES + 1] = 0;
    check(0x07, &p, Err(invalid("admin.id")));
}

#[test]
fn admin_add_fields() {
    check(0x07, &raw_add(b"h:1", b""), Ok(()));
    check(0x07, &raw_add(b"[::1]:7500", b"127.0.0.1:7400"), Ok(()));
    let mut bad_bool = raw_add(b"h:1", b"");
    bad_bool[ADMIN_FIXED_BYTES + 9] = 2;
    check(0x07, &bad_bool, Err(invalid("admin.add.learner")));
    for bad in [
        &b""[..],
        b"host",
        b"host:0",
        b"host:99999",
        b":1",
        b"a b:1",
        b"\xff\xfe:1",
    ] {
        check(0x07, &raw_add(bad, b""), Err(invalid("admin.add.address")));
        if !bad.is_empty() {
            check(
                0x07,
                &raw_add(b"h:1", bad),
                Err(invalid("admin.add.client_address")),
            );
        }
    }
}

#[test]
fn oversize_addresses_are_refused_from_their_length() {
    let at_cap = format!("{}:1", "a".repeat(ADDRESS_BYTES_MAX - 2));
    assert_eq!(at_cap.len(), ADDRESS_BYTES_MAX);
    check(0x07, &raw_add(at_cap.as_bytes(), at_cap.as_bytes()), Ok(()));
    let over = format!("{}:1", "a".repeat(ADDRESS_BYTES_MAX - 1));
    check(
        0x07,
        &raw_add(over.as_bytes(), b""),
        Err(invalid("admin.add.address")),
    );
    check(
        0x07,
        &raw_add(b"h:1", over.as_bytes()),
        Err(invalid("admin.add.client_address")),
    );
    // A length prefix above the cap is refused before the bytes are looked for: the payload
    // ends right after the prefix and the answer is still "too long", not "truncated".
    let mut p = admin_payload(AdminCommand::Members);
    p.truncate(ADMIN_FIXED_BYTES);
    p.push(admin_command::ADD);
    p.extend_from_slice(&4u64.to_le_bytes());
    p.push(0);
    p.extend_from_slice(&u16::MAX.to_le_bytes());
    check(0x07, &p, Err(invalid("admin.add.address")));
    // The same cap holds in a Members reply.
    let mut m = members();
    m.members.truncate(1);
    let mut p = payload(&Message::Members(Box::new(m)));
    p.truncate(8 + 2 + 8 + 1);
    p.extend_from_slice(&256u16.to_le_bytes());
    check(0x87, &p, Err(invalid("members.address")));
}

#[test]
#[should_panic(expected = "invalid admin command")]
fn encoding_an_invalid_command_is_a_programmer_error() {
    admin(add("no port", "")).signing_bytes();
}

#[test]
fn members_reply_layout_rules() {
    let good = payload(&Message::Members(Box::new(members())));
    check(0x87, &good, Ok(()));
    // Roles: 0 voter, 1 learner, nothing else.
    let role_at = 8 + 2 + 8;
    let mut bad_role = good.clone();
    bad_role[role_at] = 2;
    check(0x87, &bad_role, Err(invalid("members.role")));
    // Ids: non-zero, strictly increasing.
    let mut zero = good.clone();
    zero[10..18].copy_from_slice(&0u64.to_le_bytes());
    check(0x87, &zero, Err(invalid("members.id")));
    let mut reordered = members();
    reordered.members.swap(0, 1);
    let mut p = payload(&Message::Members(Box::new(MembersReply {
        members: vec![members().members[0].clone()],
        ..members()
    })));
    // Two members with the same id: the second is refused.
    let first = p[10..].to_vec();
    p[8..10].copy_from_slice(&2u16.to_le_bytes());
    p.extend_from_slice(&first);
    check(0x87, &p, Err(invalid("members.id")));
    // MembersReply::new puts members in id order.
    assert_eq!(MembersReply::new(1, reordered.members), members());
    // The count is capped before anything is allocated or read.
    let mut many = 1u64.to_le_bytes().to_vec();
    many.extend_from_slice(&(MEMBERS_MAX as u16 + 1).to_le_bytes());
    check(0x87, &many, Err(invalid("members.count")));
    many[8..10].copy_from_slice(&u16::MAX.to_le_bytes());
    check(0x87, &many, Err(invalid("members.count")));
    many[8..10].copy_from_slice(&(MEMBERS_MAX as u16).to_le_bytes());
    check(
        0x87,
        &many,
        Err(WireError::Truncated {
            field: "members.id",
        }),
    );
}

#[test]
fn a_full_members_reply_fits_every_cap() {
    let long = |i: u64| format!("{}:{}", "h".repeat(ADDRESS_BYTES_MAX - 6), 10_000 + i);
    let full = MembersReply {
        leader_id: 7,
        members: (1..=MEMBERS_MAX as u64)
            .map(|id| Member {
                id,
                role: if id % 2 == 0 {
                    MemberRole::Learner
                } else {
                    MemberRole::Voter
                },
                address: long(id),
                client_address: long(id + 100),
            })
            .collect(),
    };
    let m = Message::Members(Box::new(full));
    let p = payload(&m);
    assert_eq!(
        p.len(),
        10 + MEMBERS_MAX * (8 + 1 + 2 * (2 + ADDRESS_BYTES_MAX))
    );
    assert!(p.len() <= REPLY_PAYLOAD_BYTES_MAX as usize);
    check(0x87, &p, Ok(()));
    // The largest admin request fits the smallest frame cap a server may configure (1 KiB).
    let big = admin(AdminCommand::Add {
        id: u64::MAX,
        address: long(1),
        client_address: long(2),
        learner: false,
    });
    let p = payload(&Message::Admin(Box::new(big)));
    assert_eq!(p.len(), ADMIN_FIXED_BYTES + 1 + 8 + 1 + 2 * (2 + 255) + 64);
    assert!(p.len() <= 1024);
}

#[test]
#[should_panic(expected = "increasing id order")]
fn encoding_unordered_members_is_a_programmer_error() {
    let mut m = members();
    m.members.swap(0, 1);
    payload(&Message::Members(Box::new(m)));
}

#[test]
fn role_and_command_names() {
    assert_eq!(
        (MemberRole::Voter.name(), MemberRole::Learner.name()),
        ("voter", "learner")
    );
    let names: Vec<_> = every_admin_command()
        .iter()
        .map(|c| (c.name(), c.changes_membership()))
        .collect();
    assert_eq!(
        names,
        [
            ("members", false),
            ("add", true),
            ("add", true),
            ("promote", true),
            ("remove", true),
            ("transfer_leader", true),
            ("rotate_key", true)
        ]
    );
}
