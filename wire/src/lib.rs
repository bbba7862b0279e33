//! tally's wire format: pure codecs, no IO.
//!
//! Everything a client and a replica exchange is a *frame*: a fixed 20-byte header (magic, version,
//! message type, flags, correlation id, payload length) followed by a payload whose layout depends on
//! the message type. The byte-exact layouts are specified in `PROTOCOL.md` at the repository root;
//! this crate is the reference implementation of that document.
//!
//! Three layouts are *canonical* because they are hashed or signed, and have one fixed size each:
//! [`Request`] (what a client signs), [`Receipt`] (a Merkle leaf) and [`Header`] (what the operator
//! signs). They live here so that signing, verifying and storing all see the same bytes.
//!
//! All integers are little-endian with an explicit width; `usize` never appears on the wire.
//! Decoding distinguishes "need more bytes" ([`Decoded::Incomplete`]) from "malformed"
//! ([`WireError`]), and checks the length cap *before* allocating anything for a payload.
//!
//! Caveats: this crate checks layout only. Whether a signature verifies, a chain id matches or an
//! amount is affordable is decided in `tally-core`.

mod admin;
mod balance_proof;
mod canonical;
mod consistency;
mod envelope;
mod error;
mod expiry;
mod frame;
mod history;
mod key_chain;
mod message;

pub use admin::*;
pub use balance_proof::{
    BalanceProofReply, BALANCE_PROOF_DEPTH_MAX, BALANCE_PROOF_REPLY_BYTES_MAX,
};
pub use canonical::*;
pub use consistency::{
    ConsistencyReply, LogPoint, CHECKPOINT_NOTE_BYTES_MAX, CONSISTENCY_REPLY_BYTES_MAX,
    LOG_PROOF_HASHES_MAX,
};
pub use envelope::*;
pub use error::{ErrorCode, Retry, WireError};
pub use expiry::ExpiryConfirmation;
pub use frame::*;
pub use history::{
    ACCOUNT_REPLY_BYTES, HISTORY_BYTES_MAX, HISTORY_ENTRIES_PER_REPLY_MAX, HISTORY_ENTRY_BYTES,
    HISTORY_FIXED_BYTES,
};
pub use key_chain::{
    KeyChainReply, KeyLink, KEY_CHAIN_REPLY_BYTES_MAX, KEY_LINKS_MAX, KEY_LINK_BYTES_MAX,
    ROTATE_DOMAIN,
};
pub use message::*;

/// An Ed25519 public key: the identity of an account, a deposit key or the operator.
pub type PublicKey = [u8; 32];
/// A SHA-256 digest.
pub type Hash = [u8; 32];
/// A detached Ed25519 signature.
pub type Signature = [u8; 64];
/// A signer's aid to batch verification, sent beside a signature (`SubmitHinted`): the
/// compressed point H with [8]H = R, where R is the signature's first half. Not signed.
pub type NonceHint = [u8; 32];

/// A little cursor over a byte slice that never panics: every read checks the bounds and reports
/// [`WireError::Truncated`] with the field's name.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, at: 0 }
    }

    pub(crate) fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], WireError> {
        let end = self
            .at
            .checked_add(n)
            .ok_or(WireError::Truncated { field })?;
        let out = self
            .bytes
            .get(self.at..end)
            .ok_or(WireError::Truncated { field })?;
        self.at = end;
        Ok(out)
    }

    pub(crate) fn array<const N: usize>(
        &mut self,
        field: &'static str,
    ) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, WireError> {
        Ok(self.take(1, field)?[0])
    }

    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn u64(&mut self, field: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn u128(&mut self, field: &'static str) -> Result<u128, WireError> {
        Ok(u128::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn string(&mut self, field: &'static str) -> Result<String, WireError> {
        let len = self.u16(field)? as usize;
        let bytes = self.take(len, field)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| WireError::Invalid {
            field,
            reason: "not UTF-8",
        })
    }

    /// Whether every byte was read.
    /// Fails unless at least `n` more bytes are there: a count read from the wire is checked
    /// against the bytes that back it before anything is allocated for it.
    pub(crate) fn ensure(&self, n: usize, field: &'static str) -> Result<(), WireError> {
        if self.bytes.len() - self.at < n {
            return Err(WireError::Truncated { field });
        }
        Ok(())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.at == self.bytes.len()
    }

    /// Every message must be consumed exactly: trailing bytes are a framing bug or an attack.
    pub(crate) fn finish(&self) -> Result<(), WireError> {
        if self.at == self.bytes.len() {
            Ok(())
        } else {
            Err(WireError::TrailingBytes {
                count: (self.bytes.len() - self.at) as u64,
            })
        }
    }
}

pub(crate) fn put_string(out: &mut Vec<u8>, s: &str) {
    // Strings are diagnostic (error messages, addresses); cut rather than fail on absurd lengths.
    let bytes = s.as_bytes();
    let len = bytes.len().min(u16::MAX as usize);
    let mut cut = len;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    out.extend_from_slice(&(cut as u16).to_le_bytes());
    out.extend_from_slice(&bytes[..cut]);
}
