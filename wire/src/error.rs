//! Decoding errors and the stable error codes carried by an `Error` reply.

/// Why a byte sequence is not a valid frame or message. Each maps to a stable [`ErrorCode`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("bad magic {found:02x?}: not a tally frame")]
    BadMagic { found: [u8; 4] },
    #[error("unsupported protocol version {found} (this build speaks {supported})")]
    UnsupportedVersion { found: u8, supported: u8 },
    #[error("unknown message type 0x{found:02x}")]
    UnknownMessageType { found: u8 },
    #[error("frame payload of {length} bytes exceeds the cap of {max} bytes")]
    FrameTooLarge { length: u32, max: u32 },
    #[error("non-zero flags 0x{found:04x}: no flags are defined in this version")]
    BadFlags { found: u16 },
    #[error("payload truncated while reading {field}")]
    Truncated { field: &'static str },
    #[error("{count} unexpected bytes after the end of the message")]
    TrailingBytes { count: u64 },
    #[error("invalid {field}: {reason}")]
    Invalid {
        field: &'static str,
        reason: &'static str,
    },
}

impl WireError {
    pub fn code(&self) -> ErrorCode {
        match self {
            WireError::BadMagic { .. } | WireError::BadFlags { .. } => ErrorCode::MalformedFrame,
            WireError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            WireError::UnknownMessageType { .. } => ErrorCode::UnknownMessageType,
            WireError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            WireError::Truncated { .. }
            | WireError::TrailingBytes { .. }
            | WireError::Invalid { .. } => ErrorCode::MalformedMessage,
        }
    }

    /// Framing errors leave the byte stream at an unknown position: the connection must be closed
    /// after answering. A malformed *payload* inside a well-formed frame does not desynchronize the
    /// stream, so the connection keeps serving.
    pub fn breaks_stream(&self) -> bool {
        matches!(
            self,
            WireError::BadMagic { .. }
                | WireError::UnsupportedVersion { .. }
                | WireError::FrameTooLarge { .. }
                | WireError::BadFlags { .. }
        )
    }
}

/// Whether retrying the same request (same id, same bytes) can succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Retry {
    /// The request is wrong and always will be (bad signature, malformed).
    Never = 0,
    /// The request may succeed later at the same replica (busy; insufficient funds as of now).
    Later = 1,
    /// The request should go to another replica (this one is not the leader).
    Elsewhere = 2,
}

impl Retry {
    pub fn from_u8(v: u8) -> Option<Retry> {
        match v {
            0 => Some(Retry::Never),
            1 => Some(Retry::Later),
            2 => Some(Retry::Elsewhere),
            _ => None,
        }
    }
}

macro_rules! error_codes {
    ($($name:ident = $value:literal, $text:literal, $retry:ident;)*) => {
        /// Stable error codes. The numbers never change meaning; new codes are only added.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u16)]
        pub enum ErrorCode {
            $($name = $value,)*
        }

        impl ErrorCode {
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name,)*];

            pub fn from_u16(v: u16) -> Option<ErrorCode> {
                match v {
                    $($value => Some(ErrorCode::$name),)*
                    _ => None,
                }
            }

            /// The stable, machine-readable name (used in logs, metrics labels and CLI JSON).
            pub fn name(self) -> &'static str {
                match self {
                    $(ErrorCode::$name => $text,)*
                }
            }

            /// Whether a retry of the same request can succeed, by default for this code.
            pub fn retry(self) -> Retry {
                match self {
                    $(ErrorCode::$name => Retry::$retry,)*
                }
            }
        }
    };
}

error_codes! {
    MalformedFrame = 1, "malformed_frame", Never;
    UnsupportedVersion = 2, "unsupported_version", Never;
    UnknownMessageType = 3, "unknown_message_type", Never;
    FrameTooLarge = 4, "frame_too_large", Never;
    MalformedMessage = 5, "malformed_message", Never;
    MalformedRequest = 10, "malformed_request", Never;
    BadSignature = 11, "bad_signature", Never;
    WrongChain = 12, "wrong_chain", Never;
    UnknownDepositKey = 13, "unknown_deposit_key", Never;
    Unauthorized = 14, "unauthorized", Never;
    StaleRequest = 15, "stale_request", Never;
    UnknownAccount = 20, "unknown_account", Later;
    InsufficientFunds = 21, "insufficient_funds", Later;
    AmountOverflow = 22, "amount_overflow", Never;
    IdConflict = 23, "id_conflict", Never;
    ReserveNotFound = 24, "reserve_not_found", Never;
    ReserveClosed = 25, "reserve_closed", Never;
    ReserveExpired = 26, "reserve_expired", Never;
    PostExceedsReserve = 27, "post_exceeds_reserve", Never;
    NotAReserveParty = 28, "not_a_reserve_party", Never;
    Busy = 30, "busy", Later;
    NotLeader = 31, "not_leader", Elsewhere;
    Unavailable = 32, "unavailable", Later;
    ShuttingDown = 33, "shutting_down", Elsewhere;
    TooManyInFlight = 34, "too_many_in_flight", Later;
    ArchiveBehind = 35, "archive_behind", Later;
    Recovering = 36, "recovering", Elsewhere;
    MembershipRefused = 37, "membership_refused", Later;
    RotationRefused = 38, "rotation_refused", Never;
    NotFound = 40, "not_found", Never;
    HistoryPruned = 41, "history_pruned", Never;
    HeightNotApplied = 42, "height_not_applied", Never;
    Internal = 50, "internal", Later;
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), *self as u16)
    }
}
