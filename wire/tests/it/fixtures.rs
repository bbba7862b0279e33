//! Sample values and small helpers shared by the test modules.

use tally_wire::*;

/// The default payload cap, as a server without configuration uses it.
pub const MAX: u32 = FRAME_PAYLOAD_BYTES_MAX_DEFAULT;

pub fn request(op: Op) -> Request {
    Request {
        chain_id: [0xc4; 32],
        op,
        id: 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210,
        signer: [0x11; 32],
        to: if op == Op::Withdraw {
            [0; 32]
        } else {
            [0x22; 32]
        },
        amount: 1_000,
        signature: [0x5e; 64],
    }
}

pub fn receipt() -> Receipt {
    Receipt {
        request_hash: [0x33; 32],
        height: 9,
        index: 2,
        op: Op::Transfer,
        failed: None,
        op_index: 0,
        signer_balance: 4_000,
        to_balance: 1_000,
    }
}

pub fn header(height: u64) -> Header {
    Header {
        chain_id: [0xc4; 32],
        height,
        term: 2,
        time_unix_ms: 1_700_000_000_000,
        request_count: 5,
        prev_hash: [0x44; 32],
        merkle_root: [0x55; 32],
        state_digest: [0x66; 32],
        operator_key_id: [1, 2, 3, 4, 5, 6, 7, 8],
    }
}

pub fn signed_header(height: u64) -> SignedHeader {
    SignedHeader {
        header: header(height),
        signature: [0x77; 64],
    }
}

/// A confirmation whose proof has `path_len` hashes (distinct, so a reordering shows).
pub fn confirmation(path_len: usize, replayed: bool) -> Confirmation {
    Confirmation {
        replayed,
        request: request(Op::Transfer),
        receipt: receipt(),
        header: signed_header(9),
        proof: InclusionProof {
            leaf_index: 2,
            tree_size: 5,
            path: (0..path_len).map(|i| [i as u8 + 1; 32]).collect(),
        },
    }
}

pub fn status(latest_header: Option<SignedHeader>) -> StatusReply {
    StatusReply {
        node_id: 3,
        role: 2,
        term: 7,
        leader_id: 3,
        commit_index: 120,
        applied_index: 119,
        applied_height: 40,
        writable: true,
        leader_client_address: "127.0.0.1:7100".into(),
        latest_header,
        archive_height: None,
    }
}

/// An admin request carrying `command`, with made-up key and signature (layout only).
pub fn admin(command: AdminCommand) -> AdminRequest {
    AdminRequest {
        chain_id: [0xc4; 32],
        issued_unix_ms: 1_700_000_000_000,
        nonce: 0x0102_0304_0506_0708,
        command,
        admin_key: [0xad; 32],
        signature: [0x5f; 64],
    }
}

/// One admin request of every command, the `Add` ones with and without a client address.
pub fn every_admin_command() -> Vec<AdminCommand> {
    vec![
        AdminCommand::Members,
        AdminCommand::Add {
            id: 4,
            address: "127.0.0.1:7503".into(),
            client_address: "127.0.0.1:7403".into(),
            learner: true,
        },
        AdminCommand::Add {
            id: u64::MAX,
            address: "node-5.tally:7500".into(),
            client_address: String::new(),
            learner: false,
        },
        AdminCommand::Promote { id: 4 },
        AdminCommand::Remove { id: 2 },
        AdminCommand::TransferLeader { id: 1 },
        AdminCommand::RotateKey {
            new_key: [0x44; 32],
        },
    ]
}

pub fn members() -> MembersReply {
    MembersReply {
        leader_id: 1,
        members: vec![
            Member {
                id: 1,
                role: MemberRole::Voter,
                address: "127.0.0.1:7500".into(),
                client_address: "127.0.0.1:7400".into(),
            },
            Member {
                id: 2,
                role: MemberRole::Voter,
                address: "[::1]:7501".into(),
                client_address: String::new(),
            },
            Member {
                id: 4,
                role: MemberRole::Learner,
                address: "node-4.tally:7503".into(),
                client_address: "node-4.tally:7403".into(),
            },
        ],
    }
}

/// One sample of every message variant.
fn balance_proof(
    balance: Option<u64>,
    siblings: usize,
    neighbor: Option<(Hash, Hash)>,
) -> tally_wire::BalanceProofReply {
    tally_wire::BalanceProofReply {
        header: signed_header(9),
        map_root: [0x31; 32],
        account_count: 3,
        total_deposited: u128::MAX,
        total_withdrawn: 1,
        account: [0x23; 32],
        balance,
        siblings: (0..siblings).map(|i| [i as u8; 32]).collect(),
        neighbor,
    }
}

pub fn every_message() -> Vec<Message> {
    let mut messages = vec![
        Message::Submit(request(Op::Deposit)),
        Message::Submit(request(Op::Transfer)),
        Message::Submit(request(Op::Withdraw)),
        Message::SubmitHinted(request(Op::Transfer), [0x5a; 32]),
        Message::GetBalance {
            account: [0x11; 32],
            mode: ReadMode::Linearizable,
        },
        Message::GetBalance {
            account: [0x11; 32],
            mode: ReadMode::Stale,
        },
        Message::GetHeaders {
            from_height: 17,
            limit: 1024,
        },
        Message::GetStatus,
        Message::GetInfo,
        Message::Info(Box::new(InfoReply {
            chain_id: [0xc1; 32],
            operator_public_key: [0xc2; 32],
            node_id: u64::MAX,
            frame_bytes_max: 1024,
            reply_payload_bytes_max: REPLY_PAYLOAD_BYTES_MAX,
            requests_in_flight_max: u32::MAX,
            headers_per_reply_max: 1,
            client_limits: None,
        })),
        Message::Info(Box::new(InfoReply {
            chain_id: [0xc3; 32],
            operator_public_key: [0xc4; 32],
            node_id: 1,
            frame_bytes_max: 1 << 20,
            reply_payload_bytes_max: REPLY_PAYLOAD_BYTES_MAX,
            requests_in_flight_max: 4096,
            headers_per_reply_max: HEADERS_PER_REPLY_MAX,
            client_limits: Some(ClientLimits {
                handshake_timeout_ms: 1,
                first_request_timeout_ms: 2,
                frame_timeout_ms: 3,
                idle_timeout_ms: u32::MAX,
                write_timeout_ms: 5,
                connections_per_address_max: 6,
            }),
        })),
        Message::Confirmed(Box::new(confirmation(3, false))),
        Message::Confirmed(Box::new(confirmation(0, true))),
        Message::Error(ErrorReply::new(ErrorCode::InsufficientFunds, "short by 3")),
        Message::Error(ErrorReply {
            code: ErrorCode::NotLeader,
            retry: Retry::Elsewhere,
            retry_after_ms: 250,
            leader_hint: "127.0.0.1:7100".into(),
            message: "ask the leader".into(),
        }),
        Message::Balance(BalanceReply {
            account: [0x11; 32],
            exists: true,
            balance: u64::MAX,
            height: 40,
            mode: ReadMode::Stale,
        }),
        Message::Balance(BalanceReply {
            account: [0x12; 32],
            exists: false,
            balance: 0,
            height: 0,
            mode: ReadMode::Linearizable,
        }),
        Message::Headers(vec![signed_header(1), signed_header(2)]),
        Message::Headers(vec![]),
        Message::Status(Box::new(status(Some(signed_header(40))))),
        Message::Status(Box::new(status(None))),
        Message::Members(Box::new(members())),
        Message::Members(Box::new(MembersReply {
            leader_id: 0,
            members: vec![],
        })),
    ];
    messages.extend(envelope_messages());
    for command in every_admin_command() {
        messages.push(Message::Admin(Box::new(admin(command))));
    }
    messages
}

pub fn payload(m: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    m.encode_payload(&mut out);
    out
}

pub fn frame(message_type: u8, payload: &[u8]) -> RawFrame {
    RawFrame {
        message_type,
        correlation_id: 1,
        payload: payload.to_vec(),
    }
}

/// A frame header's 20 bytes with every field chosen by the caller (flags and version included).
pub fn raw_header(
    version: u8,
    message_type: u8,
    flags: u16,
    correlation_id: u64,
    len: u32,
) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.push(version);
    out.push(message_type);
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&correlation_id.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out
}

pub fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len() % 2 == 0, "odd-length hex");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit"))
        .collect()
}

/// `Invalid` errors compare by field only: the reason is prose and may be reworded.
pub fn same_error(got: &WireError, want: &WireError) -> bool {
    match (got, want) {
        (WireError::Invalid { field: a, .. }, WireError::Invalid { field: b, .. }) => a == b,
        _ => got == want,
    }
}

pub fn invalid(field: &'static str) -> WireError {
    WireError::Invalid { field, reason: "" }
}

/// One sample of each envelope message: an envelope, its confirmation, an atomic failure.
pub fn envelope_messages() -> Vec<Message> {
    let ops = vec![
        Operation {
            op: Op::Transfer,
            id: 1,
            to: [0x22; 32],
            amount: 5,
            timeout_ms: 0,
            reserve_id: 0,
            party: [0; 32],
        },
        Operation {
            op: Op::Withdraw,
            id: 2,
            to: [0; 32],
            amount: 7,
            timeout_ms: 0,
            reserve_id: 0,
            party: [0; 32],
        },
    ];
    let mut second = receipt();
    second.op_index = 1;
    second.failed = Some(ErrorCode::InsufficientFunds);
    vec![
        Message::SubmitEnvelope(Box::new(Envelope {
            chain_id: [0xc4; 32],
            signer: [0x11; 32],
            atomic: true,
            ops,
            signature: [0x5e; 64],
        })),
        Message::EnvelopeConfirmed(Box::new(EnvelopeConfirmation {
            replayed: false,
            envelope_hash: [0x45; 32],
            header: signed_header(9),
            receipts: vec![receipt(), second],
            proof: RangeProof {
                first: 2,
                count: 2,
                tree_size: 5,
                hashes: vec![[1; 32], [2; 32]],
            },
        })),
        Message::EnvelopeFailed(EnvelopeFailed {
            code: ErrorCode::InsufficientFunds,
            failed_index: 1,
            message: "balance 3 is less than 7".into(),
        }),
        Message::GetConfirmation {
            signer: [0x11; 32],
            id: u128::MAX - 1,
        },
        Message::GetSupply,
        Message::GetHistory {
            account: [0x22; 32],
            from_height: 7,
            from_index: 3,
            limit: HISTORY_ENTRIES_PER_REPLY_MAX,
        },
        Message::History(Box::new(history_reply(2, true))),
        Message::History(Box::new(history_reply(0, false))),
        Message::GetAccount {
            account: [0x22; 32],
            at_height: 0,
        },
        Message::Account(Box::new(account_reply())),
        Message::GetConfirmationByReceipt {
            leaf_hash: [0x4c; 32],
        },
        Message::GetConsistency {
            from_height: 3,
            to_height: 0,
        },
        Message::GetCheckpoint,
        Message::Checkpoint("tally.ledger/00\n3\nAAAA\n\n\u{2014} a b\n\u{2014} c d\n".into()),
        Message::GetBalanceProof {
            account: [0x23; 32],
        },
        Message::BalanceProof(Box::new(balance_proof(Some(u64::MAX), 0, None))),
        Message::BalanceProof(Box::new(balance_proof(
            None,
            tally_wire::BALANCE_PROOF_DEPTH_MAX,
            Some(([8; 32], [9; 32])),
        ))),
        Message::GetKeyChain,
        Message::KeyChain(Box::default()),
        Message::KeyChain(Box::new(tally_wire::KeyChainReply {
            links: vec![tally_wire::KeyLink {
                header: signed_header(9),
                new_key: [0x45; 32],
                previous: 0,
                number: 1,
                receipt: Receipt {
                    op: Op::Rotate,
                    ..receipt()
                },
                proof: tally_wire::InclusionProof {
                    leaf_index: 1,
                    tree_size: 2,
                    path: vec![[0x46; 32]],
                },
            }],
        })),
        Message::GetConsistency {
            from_height: 1,
            to_height: u64::MAX,
        },
        Message::Consistency(Box::new(tally_wire::ConsistencyReply {
            from: tally_wire::LogPoint {
                header: signed_header(3),
                checkpoint: "tally.ledger/00\n3\nAAAA\n\n\u{2014} sig\n".into(),
                inclusion: vec![[5; 32], [6; 32]],
            },
            to: tally_wire::LogPoint {
                header: signed_header(12),
                checkpoint: String::new(),
                inclusion: vec![[7; 32]; tally_wire::LOG_PROOF_HASHES_MAX],
            },
            proof: vec![],
        })),
        Message::Supply(SupplyReply {
            height: 7,
            total_deposited: u128::MAX,
            total_withdrawn: 3,
            sum_of_balances: u128::MAX - 3,
            accounts: 2,
        }),
        Message::ExpiryConfirmed(Box::new(tally_wire::ExpiryConfirmation {
            owner: [0x31; 32],
            id: u128::MAX - 5,
            receipt: receipt(),
            header: signed_header(11),
            proof: InclusionProof {
                leaf_index: 0,
                tree_size: 3,
                path: vec![[8; 32], [9; 32]],
            },
        })),
        Message::OperationConfirmed(Box::new(OperationConfirmation {
            envelope: Envelope {
                chain_id: [0xc4; 32],
                signer: [0x11; 32],
                atomic: false,
                ops: vec![Operation {
                    op: Op::Deposit,
                    id: 3,
                    to: [0x22; 32],
                    amount: 9,
                    timeout_ms: 0,
                    reserve_id: 0,
                    party: [0; 32],
                }],
                signature: [0x5e; 64],
            },
            receipt: receipt(),
            header: signed_header(9),
            proof: InclusionProof {
                leaf_index: 2,
                tree_size: 5,
                path: vec![[7; 32]],
            },
        })),
    ]
}

/// A history page of `n` entries (at heights 9, 10, ...), with their headers.
pub fn history_reply(n: u16, more: bool) -> HistoryReply {
    let entries: Vec<HistoryEntry> = (0..n)
        .map(|i| HistoryEntry {
            height: 9 + u64::from(i),
            index: u32::from(i),
            op: if i % 2 == 0 {
                Op::Transfer
            } else {
                Op::Deposit
            },
            debit: i % 2 == 0,
            counterparty: [0x33; 32],
            amount: u64::MAX - u64::from(i),
            balance: 5,
            request_hash: [0x44; 32],
            receipt_hash: [0x55; 32],
        })
        .collect();
    HistoryReply {
        account: [0x22; 32],
        height: 12,
        held_from: 1,
        headers: entries.iter().map(|e| signed_header(e.height)).collect(),
        entries,
        next: more.then_some((12, 4)),
    }
}

pub fn account_reply() -> AccountReply {
    AccountReply {
        account: [0x22; 32],
        height: 12,
        exists: true,
        pending_known: true,
        balance: 40,
        pending_debits: 1,
        pending_credits: 2,
        total_debited: u128::MAX,
        total_credited: 3,
        operation_count: 4,
        last_height: 11,
    }
}
