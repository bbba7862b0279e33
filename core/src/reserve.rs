//! Reserves: the state of two-phase transfers (PROTOCOL.md §4.10).
//!
//! A `reserve` operation by its owner holds part of the owner's balance for a receiver until a
//! deadline: the batch's time plus the operation's timeout. The held amount leaves the owner's
//! available balance at once; `post` moves all or part of it to the receiver (the rest back to
//! the owner), `void` returns it, `renew` moves the deadline, and once the deadline passes the
//! reserve can only expire: the leader adds an expiry to a batch whose time is at or after the
//! deadline, and the amount returns to the owner. A closed reserve stays as a tombstone that says
//! how it closed, so that every later attempt gets the same stable error code.
//!
//! Time is the batch header's: the leader fixes it when the batch opens, never earlier than the
//! previous batch's, and every replica judges by it. A new leader's clock therefore never moves a
//! deadline; it can only decide sooner or later when the next batch's time reaches it.

use tally_wire::{Hash, PublicKey};

use crate::crypto::sha256;
use crate::{Error, Result};

/// Domain of an expiry's receipt hash.
pub const EXPIRE_DOMAIN: &[u8; 16] = b"tally/expire/v1\0";
/// Bytes of an open reserve's record.
pub const HELD_BYTES: usize = 32 + 32 + 8 + 8;
/// Most expiries one batch carries (their leaves count against `batch_requests_max` too): the
/// rest wait for the next batch, in deadline order.
pub const EXPIRIES_PER_BATCH_MAX: usize = 1024;

/// What an open reserve holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// Who receives what is posted.
    pub to: PublicKey,
    /// Who may post, void or renew besides the owner (all zero: nobody).
    pub party: PublicKey,
    pub amount: u64,
    /// Batch time (unix ms) from which the reserve can no longer be posted, voided or renewed.
    pub expires_at_ms: u64,
}

impl Held {
    /// to 32 ‖ party 32 ‖ amount u64 LE ‖ expires_at_ms u64 LE.
    pub fn encode(&self) -> [u8; HELD_BYTES] {
        let mut out = [0u8; HELD_BYTES];
        out[..32].copy_from_slice(&self.to);
        out[32..64].copy_from_slice(&self.party);
        out[64..72].copy_from_slice(&self.amount.to_le_bytes());
        out[72..80].copy_from_slice(&self.expires_at_ms.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Held> {
        if bytes.len() != HELD_BYTES {
            return Err(Error::corrupt(format_args!(
                "a reserve record has {} bytes, expected {HELD_BYTES}",
                bytes.len()
            )));
        }
        Ok(Held {
            to: bytes[..32].try_into().expect("32"),
            party: bytes[32..64].try_into().expect("32"),
            amount: u64::from_le_bytes(bytes[64..72].try_into().expect("8")),
            expires_at_ms: u64::from_le_bytes(bytes[72..80].try_into().expect("8")),
        })
    }
}

/// A reserve's state: open, or how it closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserve {
    Open(Held),
    Posted,
    Voided,
    Expired,
}

impl Reserve {
    const OPEN: u8 = 1;
    const POSTED: u8 = 2;
    const VOIDED: u8 = 3;
    const EXPIRED: u8 = 4;

    /// The amount it holds (0 once closed).
    pub fn held(&self) -> u64 {
        match self {
            Reserve::Open(h) => h.amount,
            _ => 0,
        }
    }

    pub fn open(&self) -> Option<&Held> {
        match self {
            Reserve::Open(h) => Some(h),
            _ => None,
        }
    }

    /// state u8 (1 open, 2 posted, 3 voided, 4 expired), then for an open one its [`Held`].
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Reserve::Open(h) => [&[Self::OPEN][..], &h.encode()].concat(),
            Reserve::Posted => vec![Self::POSTED],
            Reserve::Voided => vec![Self::VOIDED],
            Reserve::Expired => vec![Self::EXPIRED],
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<Reserve> {
        match (bytes.first(), bytes.len()) {
            (Some(&Self::OPEN), n) if n == 1 + HELD_BYTES => {
                Ok(Reserve::Open(Held::decode(&bytes[1..])?))
            }
            (Some(&Self::POSTED), 1) => Ok(Reserve::Posted),
            (Some(&Self::VOIDED), 1) => Ok(Reserve::Voided),
            (Some(&Self::EXPIRED), 1) => Ok(Reserve::Expired),
            _ => Err(Error::corrupt(format_args!(
                "a reserve record of {} bytes with state {:?}",
                bytes.len(),
                bytes.first()
            ))),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Reserve::Open(_) => "open",
            Reserve::Posted => "posted",
            Reserve::Voided => "voided",
            Reserve::Expired => "expired",
        }
    }
}

/// An open reserve's place in deadline order: the order expiries are taken in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Expiry {
    pub at_ms: u64,
    pub owner: PublicKey,
    pub id: u128,
}

/// One reserve's change by an operation or a batch: state before (None: did not exist) and after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReserveChange {
    pub owner: PublicKey,
    pub id: u128,
    pub before: Option<Reserve>,
    pub after: Reserve,
}

impl ReserveChange {
    /// How much more the reserve holds after than before.
    pub fn held_change(&self) -> i128 {
        self.after.held() as i128 - self.before.map_or(0, |r| r.held()) as i128
    }
}

/// The first `limit` open reserves of `reserves` in [`Expiry`] order: a scan, for in-memory
/// stores (a store on disk keeps the expiry index instead).
pub fn earliest<'a>(
    reserves: impl IntoIterator<Item = (&'a (PublicKey, u128), &'a Reserve)>,
    limit: usize,
) -> Vec<Expiry> {
    let mut open: Vec<Expiry> = reserves
        .into_iter()
        .filter_map(|(&(owner, id), r)| {
            r.open().map(|h| Expiry {
                at_ms: h.expires_at_ms,
                owner,
                id,
            })
        })
        .collect();
    open.sort_unstable();
    open.truncate(limit);
    open
}

/// SHA-256(EXPIRE_DOMAIN ‖ owner ‖ id u128 LE): what an expiry's receipt names where a request's
/// names the request's hash.
pub fn expire_hash(owner: &PublicKey, id: u128) -> Hash {
    sha256(&[EXPIRE_DOMAIN, owner, &id.to_le_bytes()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_refuse_bad_lengths() {
        let held = Held {
            to: [1; 32],
            party: [2; 32],
            amount: 7,
            expires_at_ms: 9,
        };
        for r in [
            Reserve::Open(held),
            Reserve::Posted,
            Reserve::Voided,
            Reserve::Expired,
        ] {
            assert_eq!(Reserve::decode(&r.encode()).unwrap(), r);
        }
        assert!(Reserve::decode(&[1]).is_err());
        assert!(Reserve::decode(&[2, 0]).is_err());
        assert!(Reserve::decode(&[5]).is_err());
        assert!(Reserve::decode(&[]).is_err());
    }

    #[test]
    fn expiries_order_by_deadline_first() {
        let a = Expiry {
            at_ms: 1,
            owner: [9; 32],
            id: 9,
        };
        let b = Expiry {
            at_ms: 2,
            owner: [0; 32],
            id: 0,
        };
        assert!(a < b);
    }
}
