//! Messages: the payloads of frames, one variant per message type.

use crate::history::read_history_limit;
pub use crate::history::{AccountReply, HistoryEntry, HistoryReply};
use crate::{
    encode_frame, put_string, AdminRequest, Confirmation, Envelope, EnvelopeConfirmation,
    EnvelopeFailed, ErrorCode, MembersReply, NonceHint, OperationConfirmation, PublicKey, RawFrame,
    Reader, Request, Retry, SignedHeader, WireError,
};

/// How many headers one `Headers` reply carries at most (keeps it far below any frame cap).
pub const HEADERS_PER_REPLY_MAX: u16 = 1024;

/// The largest reply payload a server sends: the confirmation of one operation of a full
/// envelope, which carries the envelope (a full envelope's confirmation, 657,714 bytes, and a
/// full `Headers` reply, 262,146 bytes, are next). Every other reply is smaller (strings are capped
/// at 65,535 bytes), so a client that accepts frames this large reads every answer.
pub const REPLY_PAYLOAD_BYTES_MAX: u32 = crate::OPERATION_CONFIRMATION_BYTES_MAX;
const _: () = assert!(REPLY_PAYLOAD_BYTES_MAX >= crate::ENVELOPE_CONFIRMATION_BYTES_MAX);
const _: () = assert!(REPLY_PAYLOAD_BYTES_MAX >= 2 + 256 * HEADERS_PER_REPLY_MAX as u32);

/// The payload of an `Info` reply, in bytes: the fields every server sends, then
/// [`ClientLimits`].
pub const INFO_BYTES: usize = INFO_BYTES_WITHOUT_CLIENT_LIMITS + CLIENT_LIMITS_BYTES;

/// The payload of an `Info` reply from a server that predates [`ClientLimits`].
pub const INFO_BYTES_WITHOUT_CLIENT_LIMITS: usize = 32 + 32 + 8 + 4 + 4 + 4 + 2;

/// The bytes [`ClientLimits`] appends to an `Info` reply.
pub const CLIENT_LIMITS_BYTES: usize = 6 * 4;

/// Message type bytes. Requests from clients are below 0x80, replies from servers at or above.
pub mod message_type {
    pub const SUBMIT: u8 = 0x01;
    pub const GET_BALANCE: u8 = 0x02;
    pub const GET_HEADERS: u8 = 0x03;
    pub const GET_STATUS: u8 = 0x04;
    pub const SUBMIT_HINTED: u8 = 0x05;
    pub const GET_INFO: u8 = 0x06;
    pub const ADMIN: u8 = 0x07;
    pub const SUBMIT_ENVELOPE: u8 = 0x08;
    pub const GET_CONFIRMATION: u8 = 0x09;
    pub const GET_SUPPLY: u8 = 0x0a;
    pub const GET_HISTORY: u8 = 0x0b;
    pub const GET_ACCOUNT: u8 = 0x0c;
    pub const GET_CONFIRMATION_BY_RECEIPT: u8 = 0x0d;
    pub const GET_CONSISTENCY: u8 = 0x0e;
    pub const GET_CHECKPOINT: u8 = 0x0f;
    pub const GET_BALANCE_PROOF: u8 = 0x10;
    pub const GET_KEY_CHAIN: u8 = 0x11;
    pub const CONFIRMED: u8 = 0x81;
    pub const ERROR: u8 = 0x82;
    pub const BALANCE: u8 = 0x83;
    pub const HEADERS: u8 = 0x84;
    pub const STATUS: u8 = 0x85;
    pub const INFO: u8 = 0x86;
    pub const MEMBERS: u8 = 0x87;
    pub const ENVELOPE_CONFIRMED: u8 = 0x88;
    pub const ENVELOPE_FAILED: u8 = 0x89;
    pub const OPERATION_CONFIRMED: u8 = 0x8a;
    pub const SUPPLY: u8 = 0x8b;
    pub const HISTORY: u8 = 0x8c;
    pub const ACCOUNT: u8 = 0x8d;
    pub const EXPIRY_CONFIRMED: u8 = 0x8e;
    pub const CONSISTENCY: u8 = 0x8f;
    pub const CHECKPOINT: u8 = 0x90;
    pub const BALANCE_PROOF: u8 = 0x91;
    pub const KEY_CHAIN: u8 = 0x92;

    /// Whether a server takes `message_type` as a request. Anything else (a reply type, an
    /// undefined one) is `unknown_message_type`, whatever its payload.
    pub fn is_request(message_type: u8) -> bool {
        matches!(
            message_type,
            SUBMIT
                | GET_BALANCE
                | GET_HEADERS
                | GET_STATUS
                | SUBMIT_HINTED
                | GET_INFO
                | ADMIN
                | SUBMIT_ENVELOPE
                | GET_CONFIRMATION
                | GET_SUPPLY
                | GET_HISTORY
                | GET_ACCOUNT
                | GET_CONFIRMATION_BY_RECEIPT
                | GET_CONSISTENCY
                | GET_CHECKPOINT
                | GET_BALANCE_PROOF
                | GET_KEY_CHAIN
        )
    }
}

/// How fresh a balance read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ReadMode {
    /// Reflects every request confirmed before the read was sent (served by the leader).
    Linearizable = 0,
    /// Whatever this replica has applied; may lag. Served in degraded mode too.
    Stale = 1,
}

/// An error answer. `code` is stable; `message` is for humans and may change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReply {
    pub code: ErrorCode,
    pub retry: Retry,
    /// A hint for `Retry::Later`: wait at least this long. 0 when there is no hint.
    pub retry_after_ms: u32,
    /// For `not_leader`: the leader's client address if known, else empty.
    pub leader_hint: String,
    pub message: String,
}

impl ErrorReply {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorReply {
        ErrorReply {
            code,
            retry: code.retry(),
            retry_after_ms: 0,
            leader_hint: String::new(),
            message: message.into(),
        }
    }
}

impl From<&WireError> for ErrorReply {
    fn from(e: &WireError) -> ErrorReply {
        ErrorReply::new(e.code(), e.to_string())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalanceReply {
    pub account: PublicKey,
    pub exists: bool,
    pub balance: u64,
    /// The applied height the balance was read at.
    pub height: u64,
    pub mode: ReadMode,
}

/// A replica's view of itself and the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusReply {
    pub node_id: u64,
    /// 0 follower, 1 candidate, 2 leader, 3 pre-candidate.
    pub role: u8,
    pub term: u64,
    /// 0 when no leader is known.
    pub leader_id: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    /// Height of the last applied batch.
    pub applied_height: u64,
    /// Whether this replica serves writes (it leads) or only stale reads (degraded).
    pub writable: bool,
    pub leader_client_address: String,
    pub latest_header: Option<SignedHeader>,
    /// Height the archive holds (its checkpoint's tree size) as this replica last saw it;
    /// `None` when no archive is configured.
    pub archive_height: Option<u64>,
}

/// What a replica tells a client about the ledger and its limits (PROTOCOL.md §3, `0x86`).
/// Fixed for the life of the process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoReply {
    /// The ledger's chain id: requests must be signed for it.
    pub chain_id: crate::Hash,
    /// The operator's Ed25519 public key. Informational: trust the key from the profile.
    pub operator_public_key: PublicKey,
    pub node_id: u64,
    /// The largest frame payload this server accepts (`limits.frame_bytes_max`).
    pub frame_bytes_max: u32,
    /// The largest reply payload this server sends ([`REPLY_PAYLOAD_BYTES_MAX`]).
    pub reply_payload_bytes_max: u32,
    /// Requests one connection may have unanswered before the server stops reading it
    /// (`limits.requests_in_flight_per_connection_max`).
    pub requests_in_flight_max: u32,
    /// The most headers one `Headers` reply holds ([`HEADERS_PER_REPLY_MAX`]).
    pub headers_per_reply_max: u16,
    /// The deadlines and the per-address limit a client must respect; `None` from a server
    /// that predates them (an 86-byte `Info`).
    pub client_limits: Option<ClientLimits>,
}

/// What a client must do to keep a connection (`[limits]`, docs/CONFIG.md), appended to `Info`.
/// Each deadline is in milliseconds, cut to `u32::MAX` (about 49 days) if configured longer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientLimits {
    /// The TLS handshake must finish within this of the connection being accepted.
    pub handshake_timeout_ms: u32,
    /// The first whole request must arrive within this of the handshake.
    pub first_request_timeout_ms: u32,
    /// Every frame must arrive whole within this of its first byte.
    pub frame_timeout_ms: u32,
    /// A connection with no request for this long is closed.
    pub idle_timeout_ms: u32,
    /// A reply the client does not read within this closes the connection.
    pub write_timeout_ms: u32,
    /// Connections one IPv4 address or IPv6 /64 may hold at once (the limit in force, after
    /// the server fitted it under its descriptor limit).
    pub connections_per_address_max: u32,
}

impl ClientLimits {
    fn write(&self, out: &mut Vec<u8>) {
        for v in [
            self.handshake_timeout_ms,
            self.first_request_timeout_ms,
            self.frame_timeout_ms,
            self.idle_timeout_ms,
            self.write_timeout_ms,
            self.connections_per_address_max,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    fn read(r: &mut Reader<'_>) -> Result<ClientLimits, WireError> {
        Ok(ClientLimits {
            handshake_timeout_ms: r.u32("info.handshake_timeout_ms")?,
            first_request_timeout_ms: r.u32("info.first_request_timeout_ms")?,
            frame_timeout_ms: r.u32("info.frame_timeout_ms")?,
            idle_timeout_ms: r.u32("info.idle_timeout_ms")?,
            write_timeout_ms: r.u32("info.write_timeout_ms")?,
            connections_per_address_max: r.u32("info.connections_per_address_max")?,
        })
    }
}

impl InfoReply {
    fn write(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&self.chain_id);
        out.extend_from_slice(&self.operator_public_key);
        out.extend_from_slice(&self.node_id.to_le_bytes());
        out.extend_from_slice(&self.frame_bytes_max.to_le_bytes());
        out.extend_from_slice(&self.reply_payload_bytes_max.to_le_bytes());
        out.extend_from_slice(&self.requests_in_flight_max.to_le_bytes());
        out.extend_from_slice(&self.headers_per_reply_max.to_le_bytes());
        if let Some(limits) = &self.client_limits {
            limits.write(out);
        }
        let expected = match self.client_limits {
            Some(_) => INFO_BYTES,
            None => INFO_BYTES_WITHOUT_CLIENT_LIMITS,
        };
        assert_eq!(out.len() - start, expected);
    }

    fn read(r: &mut Reader<'_>) -> Result<InfoReply, WireError> {
        Ok(InfoReply {
            chain_id: r.array("info.chain_id")?,
            operator_public_key: r.array("info.operator_public_key")?,
            node_id: r.u64("info.node_id")?,
            frame_bytes_max: r.u32("info.frame_bytes_max")?,
            reply_payload_bytes_max: r.u32("info.reply_payload_bytes_max")?,
            requests_in_flight_max: r.u32("info.requests_in_flight_max")?,
            headers_per_reply_max: r.u16("info.headers_per_reply_max")?,
            // An older server's reply ends here; a newer one's holds exactly the limits.
            client_limits: if r.is_empty() {
                None
            } else {
                Some(ClientLimits::read(r)?)
            },
        })
    }
}

/// Every message, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Submit(Request),
    /// A Submit with the signer's [`NonceHint`], which lets the server verify the signature in
    /// a batch. Answered exactly as the same request sent as `Submit`.
    SubmitHinted(Request, NonceHint),
    GetBalance {
        account: PublicKey,
        mode: ReadMode,
    },
    GetHeaders {
        from_height: u64,
        limit: u16,
    },
    GetStatus,
    GetInfo,
    /// A membership command signed by an admin key, answered `Members` or `Error`.
    Admin(Box<AdminRequest>),
    Confirmed(Box<Confirmation>),
    Error(ErrorReply),
    Balance(BalanceReply),
    Headers(Vec<SignedHeader>),
    Status(Box<StatusReply>),
    Info(Box<InfoReply>),
    /// The membership after an admin command (or as `AdminCommand::Members` asked).
    Members(Box<MembersReply>),
    /// Many operations under one signature, answered `EnvelopeConfirmed`, `EnvelopeFailed`
    /// (an atomic envelope one of whose operations failed) or `Error`.
    SubmitEnvelope(Box<Envelope>),
    EnvelopeConfirmed(Box<EnvelopeConfirmation>),
    EnvelopeFailed(EnvelopeFailed),
    /// The original confirmation of the operation `(signer, id)`, without resubmitting it:
    /// answered `Confirmed` (a request; flag `replayed` set), `OperationConfirmed` (an
    /// operation of an envelope) or `Error` (`not_found`).
    GetConfirmation {
        signer: PublicKey,
        id: u128,
    },
    OperationConfirmed(Box<OperationConfirmation>),
    /// The receipt of a reserve's expiry with its proof (`GetConfirmationByReceipt` of an
    /// expiry's receipt).
    ExpiryConfirmed(Box<crate::ExpiryConfirmation>),
    /// The operator's totals, answered `Supply`.
    GetSupply,
    Supply(SupplyReply),
    /// Up to `limit` (1 to `HISTORY_ENTRIES_PER_REPLY_MAX`) history entries of `account` from
    /// `(from_height, from_index)` on, answered `History` or `Error` (`history_pruned`).
    GetHistory {
        account: PublicKey,
        from_height: u64,
        from_index: u32,
        limit: u16,
    },
    History(Box<HistoryReply>),
    /// An account's figures at the applied height (`at_height` 0) or as of `at_height`,
    /// answered `Account` or `Error` (`history_pruned`, `height_not_applied`).
    GetAccount {
        account: PublicKey,
        at_height: u64,
    },
    Account(Box<AccountReply>),
    /// The confirmation of the operation whose receipt has Merkle leaf hash `leaf_hash`,
    /// answered like `GetConfirmation`.
    GetConfirmationByReceipt {
        leaf_hash: crate::Hash,
    },
    /// Proof that the header log at `from_height` is a prefix of the log at `to_height` (0:
    /// the applied height), answered `Consistency` or `Error` (`height_not_applied`).
    /// `from_height` is at least 1 and at most `to_height` (when that is not 0).
    GetConsistency {
        from_height: u64,
        to_height: u64,
    },
    Consistency(Box<crate::ConsistencyReply>),
    /// The newest checkpoint the leader's witnesses cosigned, answered `Checkpoint` (the signed
    /// note with the operator's signature and the witnesses' cosignature lines) or `Error`
    /// (`not_found`: no witness has cosigned one yet, or this replica does not send them).
    GetCheckpoint,
    Checkpoint(String),
    /// Proof of `account`'s balance (or that it has none) against the header at the applied
    /// height, answered `BalanceProof` (PROTOCOL.md §4.13).
    GetBalanceProof {
        account: crate::PublicKey,
    },
    BalanceProof(Box<crate::BalanceProofReply>),
    /// Every operator key rotation the ledger applied, answered `KeyChain` (PROTOCOL.md §4.14).
    GetKeyChain,
    KeyChain(Box<crate::KeyChainReply>),
}

/// The operator's totals at one applied height: what was deposited and withdrawn, and the sum
/// of every balance, which must equal their difference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupplyReply {
    pub height: u64,
    pub total_deposited: u128,
    pub total_withdrawn: u128,
    pub sum_of_balances: u128,
    pub accounts: u64,
}

impl Message {
    pub fn message_type(&self) -> u8 {
        use message_type::*;
        match self {
            Message::Submit(_) => SUBMIT,
            Message::SubmitHinted(..) => SUBMIT_HINTED,
            Message::GetBalance { .. } => GET_BALANCE,
            Message::GetHeaders { .. } => GET_HEADERS,
            Message::GetStatus => GET_STATUS,
            Message::GetInfo => GET_INFO,
            Message::Admin(_) => ADMIN,
            Message::Confirmed(_) => CONFIRMED,
            Message::Error(_) => ERROR,
            Message::Balance(_) => BALANCE,
            Message::Headers(_) => HEADERS,
            Message::Status(_) => STATUS,
            Message::Info(_) => INFO,
            Message::Members(_) => MEMBERS,
            Message::SubmitEnvelope(_) => SUBMIT_ENVELOPE,
            Message::EnvelopeConfirmed(_) => ENVELOPE_CONFIRMED,
            Message::EnvelopeFailed(_) => ENVELOPE_FAILED,
            Message::GetConfirmation { .. } => GET_CONFIRMATION,
            Message::OperationConfirmed(_) => OPERATION_CONFIRMED,
            Message::ExpiryConfirmed(_) => EXPIRY_CONFIRMED,
            Message::GetSupply => GET_SUPPLY,
            Message::Supply(_) => SUPPLY,
            Message::GetHistory { .. } => GET_HISTORY,
            Message::History(_) => HISTORY,
            Message::GetAccount { .. } => GET_ACCOUNT,
            Message::Account(_) => ACCOUNT,
            Message::GetConfirmationByReceipt { .. } => GET_CONFIRMATION_BY_RECEIPT,
            Message::GetConsistency { .. } => GET_CONSISTENCY,
            Message::Consistency(_) => CONSISTENCY,
            Message::GetCheckpoint => GET_CHECKPOINT,
            Message::Checkpoint(_) => CHECKPOINT,
            Message::GetBalanceProof { .. } => GET_BALANCE_PROOF,
            Message::BalanceProof(_) => BALANCE_PROOF,
            Message::GetKeyChain => GET_KEY_CHAIN,
            Message::KeyChain(_) => KEY_CHAIN,
        }
    }

    pub fn encode_payload(&self, out: &mut Vec<u8>) {
        match self {
            Message::Submit(request) => out.extend_from_slice(&request.encode()),
            Message::SubmitHinted(request, hint) => {
                out.extend_from_slice(&request.encode());
                out.extend_from_slice(hint);
            }
            Message::GetBalance { account, mode } => {
                out.extend_from_slice(account);
                out.push(*mode as u8);
            }
            Message::GetHeaders { from_height, limit } => {
                out.extend_from_slice(&from_height.to_le_bytes());
                out.extend_from_slice(&limit.to_le_bytes());
            }
            Message::GetStatus | Message::GetInfo => {}
            Message::Admin(a) => a.write(out),
            Message::Confirmed(c) => c.write(out),
            Message::Error(e) => {
                out.extend_from_slice(&(e.code as u16).to_le_bytes());
                out.push(e.retry as u8);
                out.extend_from_slice(&e.retry_after_ms.to_le_bytes());
                put_string(out, &e.leader_hint);
                put_string(out, &e.message);
            }
            Message::Balance(b) => {
                out.extend_from_slice(&b.account);
                out.push(b.exists as u8);
                out.extend_from_slice(&b.balance.to_le_bytes());
                out.extend_from_slice(&b.height.to_le_bytes());
                out.push(b.mode as u8);
            }
            Message::Headers(headers) => {
                assert!(headers.len() <= HEADERS_PER_REPLY_MAX as usize);
                out.extend_from_slice(&(headers.len() as u16).to_le_bytes());
                for h in headers {
                    out.extend_from_slice(&h.encode());
                }
            }
            Message::Status(s) => {
                out.extend_from_slice(&s.node_id.to_le_bytes());
                out.push(s.role);
                out.extend_from_slice(&s.term.to_le_bytes());
                out.extend_from_slice(&s.leader_id.to_le_bytes());
                out.extend_from_slice(&s.commit_index.to_le_bytes());
                out.extend_from_slice(&s.applied_index.to_le_bytes());
                out.extend_from_slice(&s.applied_height.to_le_bytes());
                out.push(s.writable as u8);
                put_string(out, &s.leader_client_address);
                match &s.latest_header {
                    None => out.push(0),
                    Some(h) => {
                        out.push(1);
                        out.extend_from_slice(&h.encode());
                    }
                }
                out.push(s.archive_height.is_some() as u8);
                out.extend_from_slice(&s.archive_height.unwrap_or(0).to_le_bytes());
            }
            Message::Info(i) => i.write(out),
            Message::Members(m) => m.write(out),
            Message::SubmitEnvelope(e) => out.extend_from_slice(&e.encode()),
            Message::EnvelopeConfirmed(c) => c.write(out),
            Message::EnvelopeFailed(f) => f.write(out),
            Message::GetConfirmation { signer, id } => {
                out.extend_from_slice(signer);
                out.extend_from_slice(&id.to_le_bytes());
            }
            Message::OperationConfirmed(c) => c.write(out),
            Message::ExpiryConfirmed(c) => c.write(out),
            Message::GetSupply => {}
            Message::Supply(s) => {
                out.extend_from_slice(&s.height.to_le_bytes());
                out.extend_from_slice(&s.total_deposited.to_le_bytes());
                out.extend_from_slice(&s.total_withdrawn.to_le_bytes());
                out.extend_from_slice(&s.sum_of_balances.to_le_bytes());
                out.extend_from_slice(&s.accounts.to_le_bytes());
            }
            Message::GetHistory {
                account,
                from_height,
                from_index,
                limit,
            } => {
                out.extend_from_slice(account);
                out.extend_from_slice(&from_height.to_le_bytes());
                out.extend_from_slice(&from_index.to_le_bytes());
                out.extend_from_slice(&limit.to_le_bytes());
            }
            Message::History(h) => h.write(out),
            Message::GetAccount { account, at_height } => {
                out.extend_from_slice(account);
                out.extend_from_slice(&at_height.to_le_bytes());
            }
            Message::Account(a) => a.write(out),
            Message::GetConfirmationByReceipt { leaf_hash } => out.extend_from_slice(leaf_hash),
            Message::GetConsistency {
                from_height,
                to_height,
            } => {
                out.extend_from_slice(&from_height.to_le_bytes());
                out.extend_from_slice(&to_height.to_le_bytes());
            }
            Message::Consistency(reply) => reply.write(out),
            Message::GetBalanceProof { account } => out.extend_from_slice(account),
            Message::BalanceProof(reply) => reply.write(out),
            Message::GetKeyChain => {}
            Message::KeyChain(reply) => reply.write(out),
            Message::GetCheckpoint => {}
            Message::Checkpoint(note) => {
                assert!(note.len() <= crate::CHECKPOINT_NOTE_BYTES_MAX);
                crate::put_string(out, note)
            }
        }
    }

    /// Encodes a whole frame carrying this message.
    pub fn encode_frame(&self, correlation_id: u64) -> Vec<u8> {
        let mut payload = Vec::new();
        self.encode_payload(&mut payload);
        let mut out = Vec::with_capacity(crate::FRAME_HEADER_BYTES + payload.len());
        encode_frame(&mut out, self.message_type(), correlation_id, &payload);
        out
    }

    /// Decodes a frame a server received: a type that is not a request is
    /// `unknown_message_type` before its payload is looked at (a reply type sent to a server is
    /// not a malformed reply, it is no request at all).
    pub fn decode_request(frame: &RawFrame) -> Result<Message, WireError> {
        if !message_type::is_request(frame.message_type) {
            return Err(WireError::UnknownMessageType {
                found: frame.message_type,
            });
        }
        Message::decode(frame)
    }

    /// Decodes the payload of a frame whose header was already checked.
    pub fn decode(frame: &RawFrame) -> Result<Message, WireError> {
        use message_type::*;
        let mut r = Reader::new(&frame.payload);
        let message = match frame.message_type {
            SUBMIT => Message::Submit(Request::read(&mut r)?),
            SUBMIT_HINTED => {
                Message::SubmitHinted(Request::read(&mut r)?, r.array("submit_hinted.hint")?)
            }
            GET_BALANCE => Message::GetBalance {
                account: r.array("get_balance.account")?,
                mode: read_mode(&mut r)?,
            },
            GET_HEADERS => Message::GetHeaders {
                from_height: r.u64("get_headers.from_height")?,
                limit: r.u16("get_headers.limit")?,
            },
            GET_STATUS => Message::GetStatus,
            GET_INFO => Message::GetInfo,
            ADMIN => Message::Admin(Box::new(AdminRequest::read(&mut r)?)),
            CONFIRMED => Message::Confirmed(Box::new(Confirmation::read(&mut r)?)),
            ERROR => {
                let raw = r.u16("error.code")?;
                let code = ErrorCode::from_u16(raw).ok_or(WireError::Invalid {
                    field: "error.code",
                    reason: "unknown error code",
                })?;
                let retry = Retry::from_u8(r.u8("error.retry")?).ok_or(WireError::Invalid {
                    field: "error.retry",
                    reason: "unknown retry class",
                })?;
                Message::Error(ErrorReply {
                    code,
                    retry,
                    retry_after_ms: r.u32("error.retry_after_ms")?,
                    leader_hint: r.string("error.leader_hint")?,
                    message: r.string("error.message")?,
                })
            }
            BALANCE => Message::Balance(BalanceReply {
                account: r.array("balance.account")?,
                exists: read_bool(&mut r, "balance.exists")?,
                balance: r.u64("balance.balance")?,
                height: r.u64("balance.height")?,
                mode: read_mode(&mut r)?,
            }),
            HEADERS => {
                let count = r.u16("headers.count")?;
                if count > HEADERS_PER_REPLY_MAX {
                    return Err(WireError::Invalid {
                        field: "headers.count",
                        reason: "more than 1024 headers",
                    });
                }
                let mut headers = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    headers.push(SignedHeader::read(&mut r)?);
                }
                Message::Headers(headers)
            }
            STATUS => Message::Status(Box::new(read_status(&mut r)?)),
            INFO => Message::Info(Box::new(InfoReply::read(&mut r)?)),
            MEMBERS => Message::Members(Box::new(MembersReply::read(&mut r)?)),
            SUBMIT_ENVELOPE => Message::SubmitEnvelope(Box::new(Envelope::read(&mut r)?)),
            ENVELOPE_CONFIRMED => {
                Message::EnvelopeConfirmed(Box::new(EnvelopeConfirmation::read(&mut r)?))
            }
            ENVELOPE_FAILED => Message::EnvelopeFailed(EnvelopeFailed::read(&mut r)?),
            GET_CONFIRMATION => Message::GetConfirmation {
                signer: r.array("get_confirmation.signer")?,
                id: u128::from_le_bytes(r.array("get_confirmation.id")?),
            },
            GET_SUPPLY => Message::GetSupply,
            SUPPLY => Message::Supply(SupplyReply {
                height: r.u64("supply.height")?,
                total_deposited: u128::from_le_bytes(r.array("supply.total_deposited")?),
                total_withdrawn: u128::from_le_bytes(r.array("supply.total_withdrawn")?),
                sum_of_balances: u128::from_le_bytes(r.array("supply.sum_of_balances")?),
                accounts: r.u64("supply.accounts")?,
            }),
            GET_HISTORY => Message::GetHistory {
                account: r.array("get_history.account")?,
                from_height: r.u64("get_history.from_height")?,
                from_index: r.u32("get_history.from_index")?,
                limit: read_history_limit(&mut r)?,
            },
            HISTORY => Message::History(Box::new(HistoryReply::read(&mut r)?)),
            GET_ACCOUNT => Message::GetAccount {
                account: r.array("get_account.account")?,
                at_height: r.u64("get_account.at_height")?,
            },
            ACCOUNT => Message::Account(Box::new(AccountReply::read(&mut r)?)),
            GET_CONFIRMATION_BY_RECEIPT => Message::GetConfirmationByReceipt {
                leaf_hash: r.array("get_confirmation_by_receipt.leaf_hash")?,
            },
            OPERATION_CONFIRMED => {
                Message::OperationConfirmed(Box::new(OperationConfirmation::read(&mut r)?))
            }
            EXPIRY_CONFIRMED => {
                Message::ExpiryConfirmed(Box::new(crate::ExpiryConfirmation::read(&mut r)?))
            }
            GET_CONSISTENCY => read_get_consistency(&mut r)?,
            CONSISTENCY => Message::Consistency(Box::new(crate::ConsistencyReply::read(&mut r)?)),
            GET_BALANCE_PROOF => Message::GetBalanceProof {
                account: r.array("get_balance_proof.account")?,
            },
            BALANCE_PROOF => {
                Message::BalanceProof(Box::new(crate::BalanceProofReply::read(&mut r)?))
            }
            GET_KEY_CHAIN => Message::GetKeyChain,
            KEY_CHAIN => Message::KeyChain(Box::new(crate::KeyChainReply::read(&mut r)?)),
            GET_CHECKPOINT => Message::GetCheckpoint,
            CHECKPOINT => {
                let note = r.string("checkpoint.note")?;
                if note.len() > crate::CHECKPOINT_NOTE_BYTES_MAX {
                    return Err(WireError::Invalid {
                        field: "checkpoint.note",
                        reason: "longer than 4096 bytes",
                    });
                }
                Message::Checkpoint(note)
            }
            other => return Err(WireError::UnknownMessageType { found: other }),
        };
        r.finish()?;
        Ok(message)
    }
}

fn read_get_consistency(r: &mut Reader<'_>) -> Result<Message, WireError> {
    let from_height = r.u64("get_consistency.from_height")?;
    let to_height = r.u64("get_consistency.to_height")?;
    if from_height == 0 || (to_height != 0 && to_height < from_height) {
        return Err(WireError::Invalid {
            field: "get_consistency.from_height",
            reason: "must be at least 1 and at most to_height",
        });
    }
    Ok(Message::GetConsistency {
        from_height,
        to_height,
    })
}

fn read_status(r: &mut Reader<'_>) -> Result<StatusReply, WireError> {
    Ok(StatusReply {
        node_id: r.u64("status.node_id")?,
        role: r.u8("status.role")?,
        term: r.u64("status.term")?,
        leader_id: r.u64("status.leader_id")?,
        commit_index: r.u64("status.commit_index")?,
        applied_index: r.u64("status.applied_index")?,
        applied_height: r.u64("status.applied_height")?,
        writable: read_bool(r, "status.writable")?,
        leader_client_address: r.string("status.leader_client_address")?,
        latest_header: if read_bool(r, "status.has_header")? {
            Some(SignedHeader::read(r)?)
        } else {
            None
        },
        archive_height: {
            let present = read_bool(r, "status.has_archive")?;
            let height = r.u64("status.archive_height")?;
            present.then_some(height)
        },
    })
}

pub(crate) fn read_bool(r: &mut Reader<'_>, field: &'static str) -> Result<bool, WireError> {
    match r.u8(field)? {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(WireError::Invalid {
            field,
            reason: "must be 0 or 1",
        }),
    }
}

fn read_mode(r: &mut Reader<'_>) -> Result<ReadMode, WireError> {
    match r.u8("read_mode")? {
        0 => Ok(ReadMode::Linearizable),
        1 => Ok(ReadMode::Stale),
        _ => Err(WireError::Invalid {
            field: "read_mode",
            reason: "must be 0 (linearizable) or 1 (stale)",
        }),
    }
}
