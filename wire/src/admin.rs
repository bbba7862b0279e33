//! Admin requests (membership commands signed by an admin key) and the membership reply
//! (PROTOCOL.md §3, `0x07 Admin` and `0x87 Members`).
//!
//! An [`AdminRequest`] is the one message whose signer is neither an account nor a deposit key:
//! the server accepts it only from an Ed25519 key its config lists (`[cluster] admin_keys`),
//! only when `issued_unix_ms` is close to its own clock, and only once per nonce. This module
//! checks the layout; the signature is checked in `tally_core::crypto::verify_admin`, freshness
//! and authorization by the server.

use crate::message::read_bool;
use crate::{put_string, Hash, PublicKey, Reader, Signature, WireError};

/// Domain tag that starts every admin request (and so its signed bytes).
pub const ADMIN_DOMAIN: [u8; 16] = *b"tally/admin/v1\0\0";

/// The longest address (`host:port`) an admin command or a membership reply carries, in bytes.
pub const ADDRESS_BYTES_MAX: usize = 255;

/// The most members one `Members` reply lists (raft groups are 3 or 5 voters, plus learners).
pub const MEMBERS_MAX: usize = 64;

/// Bytes of an admin request before its command: domain, chain id, issued time, nonce, key.
pub const ADMIN_FIXED_BYTES: usize = 16 + 32 + 8 + 8 + 32;

/// The command byte of each [`AdminCommand`].
pub mod admin_command {
    pub const MEMBERS: u8 = 1;
    pub const ADD: u8 = 2;
    pub const PROMOTE: u8 = 3;
    pub const REMOVE: u8 = 4;
    pub const TRANSFER_LEADER: u8 = 5;
    pub const ROTATE_KEY: u8 = 6;
}

/// A membership command signed by an admin key. The signature covers every byte before it
/// ([`AdminRequest::signing_bytes`]), starting with [`ADMIN_DOMAIN`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminRequest {
    pub chain_id: Hash,
    /// The client's wall clock when it signed; the server refuses requests too far from its own.
    pub issued_unix_ms: u64,
    /// Random; with issued_unix_ms it makes each request unique (the server refuses a replay).
    pub nonce: u64,
    pub command: AdminCommand,
    pub admin_key: PublicKey,
    pub signature: Signature,
}

/// What an admin asks for. Replica ids are never 0 (raft's "no replica").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminCommand {
    /// List the members and the leader; changes nothing.
    Members,
    /// Add replica `id`, reachable by peers at `address` (its peer listener) and by clients at
    /// `client_address` (may be empty), as a learner or directly as a voter.
    Add {
        id: u64,
        address: String,
        client_address: String,
        learner: bool,
    },
    /// Make learner `id` a voter.
    Promote { id: u64 },
    /// Remove member `id` (voter or learner).
    Remove { id: u64 },
    /// Ask the leader to hand leadership to voter `id`.
    TransferLeader { id: u64 },
    /// Make `new_key` the operator key: the next batch names it and is the last one the current
    /// key signs (PROTOCOL.md §4.14). Answered with the key chain once that batch is applied.
    RotateKey { new_key: PublicKey },
}

/// A member's part in the raft group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberRole {
    /// Votes and counts towards the quorum.
    Voter,
    /// Receives the log but neither votes nor counts towards the quorum.
    Learner,
}

/// One replica of the group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: u64,
    pub role: MemberRole,
    /// The replica's peer address, `host:port`.
    pub address: String,
    /// The replica's client (TLS) address, `host:port`, or empty if not known.
    pub client_address: String,
}

/// The membership as the answering replica knows it: the answer to every admin command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembersReply {
    /// The leader's id, 0 if none is known.
    pub leader_id: u64,
    /// In increasing id order, each id once (encoding asserts it; [`MembersReply::new`] sorts).
    pub members: Vec<Member>,
}

/// Whether `text` is an address as admin messages carry it: 1 to [`ADDRESS_BYTES_MAX`] bytes,
/// `host:port` with a non-empty host, a port of 1 to 5 ASCII digits between 1 and 65535, and no
/// whitespace or control characters (an IPv6 host goes in brackets: `[::1]:7500`). The reason
/// otherwise.
pub fn check_host_port(text: &str) -> Result<(), &'static str> {
    if text.is_empty() {
        return Err("empty");
    }
    if text.len() > ADDRESS_BYTES_MAX {
        return Err("longer than 255 bytes");
    }
    if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("contains whitespace or control characters");
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err("not host:port");
    };
    if host.is_empty() {
        return Err("empty host");
    }
    let digits = !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit());
    match port.parse::<u32>() {
        Ok(p) if digits && (1..=65_535).contains(&p) => Ok(()),
        _ => Err("port is not a number from 1 to 65535"),
    }
}

impl AdminCommand {
    fn tag(&self) -> u8 {
        use admin_command::*;
        match self {
            AdminCommand::Members => MEMBERS,
            AdminCommand::Add { .. } => ADD,
            AdminCommand::Promote { .. } => PROMOTE,
            AdminCommand::Remove { .. } => REMOVE,
            AdminCommand::TransferLeader { .. } => TRANSFER_LEADER,
            AdminCommand::RotateKey { .. } => ROTATE_KEY,
        }
    }

    /// The stable name of the command (logs, metrics labels).
    pub fn name(&self) -> &'static str {
        match self {
            AdminCommand::Members => "members",
            AdminCommand::Add { .. } => "add",
            AdminCommand::Promote { .. } => "promote",
            AdminCommand::Remove { .. } => "remove",
            AdminCommand::TransferLeader { .. } => "transfer_leader",
            AdminCommand::RotateKey { .. } => "rotate_key",
        }
    }

    /// Whether the command changes the membership or the leader (everything but `Members`).
    pub fn changes_membership(&self) -> bool {
        !matches!(self, AdminCommand::Members)
    }

    /// Whether the command is one the decoder accepts: ids non-zero, `address` a
    /// [`check_host_port`] address, `client_address` empty or one. Encoding asserts it, so
    /// check operator input with this first.
    pub fn check(&self) -> Result<(), WireError> {
        let id = match self {
            AdminCommand::Members | AdminCommand::RotateKey { .. } => return Ok(()),
            AdminCommand::Add {
                id,
                address,
                client_address,
                ..
            } => {
                check_address(address, "admin.add.address")?;
                check_client_address(client_address, "admin.add.client_address")?;
                *id
            }
            AdminCommand::Promote { id }
            | AdminCommand::Remove { id }
            | AdminCommand::TransferLeader { id } => *id,
        };
        check_id(id, "admin.id")
    }

    fn write(&self, out: &mut Vec<u8>) {
        if let Err(e) = self.check() {
            panic!("encoding an invalid admin command {self:?}: {e}");
        }
        out.push(self.tag());
        match self {
            AdminCommand::Members => {}
            AdminCommand::Add {
                id,
                address,
                client_address,
                learner,
            } => {
                out.extend_from_slice(&id.to_le_bytes());
                out.push(*learner as u8);
                put_string(out, address);
                put_string(out, client_address);
            }
            AdminCommand::Promote { id }
            | AdminCommand::Remove { id }
            | AdminCommand::TransferLeader { id } => out.extend_from_slice(&id.to_le_bytes()),
            AdminCommand::RotateKey { new_key } => out.extend_from_slice(new_key),
        }
    }

    fn read(r: &mut Reader<'_>) -> Result<AdminCommand, WireError> {
        use admin_command::*;
        let command = match r.u8("admin.command")? {
            MEMBERS => AdminCommand::Members,
            ADD => AdminCommand::Add {
                id: read_id(r, "admin.id")?,
                learner: read_bool(r, "admin.add.learner")?,
                address: read_address(r, "admin.add.address")?,
                client_address: read_client_address(r, "admin.add.client_address")?,
            },
            PROMOTE => AdminCommand::Promote {
                id: read_id(r, "admin.id")?,
            },
            REMOVE => AdminCommand::Remove {
                id: read_id(r, "admin.id")?,
            },
            TRANSFER_LEADER => AdminCommand::TransferLeader {
                id: read_id(r, "admin.id")?,
            },
            ROTATE_KEY => AdminCommand::RotateKey {
                new_key: r.array("admin.rotate_key.new_key")?,
            },
            _ => {
                return Err(WireError::Invalid {
                    field: "admin.command",
                    reason: "unknown admin command",
                })
            }
        };
        Ok(command)
    }
}

impl AdminRequest {
    /// The bytes the admin key signs: every byte of the request before the signature, starting
    /// with [`ADMIN_DOMAIN`] (PROTOCOL.md §3, `0x07 Admin`).
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ADMIN_FIXED_BYTES + 1 + 8 + 1 + 2 * (2 + 255));
        out.extend_from_slice(&ADMIN_DOMAIN);
        out.extend_from_slice(&self.chain_id);
        out.extend_from_slice(&self.issued_unix_ms.to_le_bytes());
        out.extend_from_slice(&self.nonce.to_le_bytes());
        out.extend_from_slice(&self.admin_key);
        self.command.write(&mut out);
        out
    }

    pub(crate) fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.signing_bytes());
        out.extend_from_slice(&self.signature);
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<AdminRequest, WireError> {
        let domain: [u8; 16] = r.array("admin.domain")?;
        if domain != ADMIN_DOMAIN {
            return Err(WireError::Invalid {
                field: "admin.domain",
                reason: "not \"tally/admin/v1\" and two zero bytes",
            });
        }
        let chain_id = r.array("admin.chain_id")?;
        let issued_unix_ms = r.u64("admin.issued_unix_ms")?;
        let nonce = r.u64("admin.nonce")?;
        let admin_key = r.array("admin.admin_key")?;
        let command = AdminCommand::read(r)?;
        Ok(AdminRequest {
            chain_id,
            issued_unix_ms,
            nonce,
            command,
            admin_key,
            signature: r.array("admin.signature")?,
        })
    }
}

impl MemberRole {
    pub fn from_u8(v: u8) -> Option<MemberRole> {
        match v {
            0 => Some(MemberRole::Voter),
            1 => Some(MemberRole::Learner),
            _ => None,
        }
    }

    /// `"voter"` or `"learner"`, as the CLI prints it.
    pub fn name(self) -> &'static str {
        match self {
            MemberRole::Voter => "voter",
            MemberRole::Learner => "learner",
        }
    }
}

impl MembersReply {
    /// A reply with `members` put in id order.
    pub fn new(leader_id: u64, mut members: Vec<Member>) -> MembersReply {
        members.sort_by_key(|m| m.id);
        MembersReply { leader_id, members }
    }

    /// The member with this id, if any.
    pub fn member(&self, id: u64) -> Option<&Member> {
        self.members.iter().find(|m| m.id == id)
    }

    pub(crate) fn write(&self, out: &mut Vec<u8>) {
        assert!(
            self.members.len() <= MEMBERS_MAX,
            "{} members, more than {MEMBERS_MAX}",
            self.members.len()
        );
        assert!(
            self.members.windows(2).all(|w| w[0].id < w[1].id),
            "members must be in increasing id order, each id once"
        );
        out.extend_from_slice(&self.leader_id.to_le_bytes());
        out.extend_from_slice(&(self.members.len() as u16).to_le_bytes());
        for m in &self.members {
            let checked = check_id(m.id, "members.id")
                .and(check_address(&m.address, "members.address"))
                .and(check_client_address(
                    &m.client_address,
                    "members.client_address",
                ));
            if let Err(e) = checked {
                panic!("encoding an invalid member {m:?}: {e}");
            }
            out.extend_from_slice(&m.id.to_le_bytes());
            out.push(match m.role {
                MemberRole::Voter => 0,
                MemberRole::Learner => 1,
            });
            put_string(out, &m.address);
            put_string(out, &m.client_address);
        }
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<MembersReply, WireError> {
        let leader_id = r.u64("members.leader_id")?;
        let count = r.u16("members.count")? as usize;
        if count > MEMBERS_MAX {
            return Err(WireError::Invalid {
                field: "members.count",
                reason: "more than 64 members",
            });
        }
        let mut members: Vec<Member> = Vec::with_capacity(count);
        for _ in 0..count {
            let id = read_id(r, "members.id")?;
            if members.last().is_some_and(|last| last.id >= id) {
                return Err(WireError::Invalid {
                    field: "members.id",
                    reason: "not in increasing order (or repeated)",
                });
            }
            let role = MemberRole::from_u8(r.u8("members.role")?).ok_or(WireError::Invalid {
                field: "members.role",
                reason: "must be 0 (voter) or 1 (learner)",
            })?;
            members.push(Member {
                id,
                role,
                address: read_address(r, "members.address")?,
                client_address: read_client_address(r, "members.client_address")?,
            });
        }
        Ok(MembersReply { leader_id, members })
    }
}

fn check_id(id: u64, field: &'static str) -> Result<(), WireError> {
    if id == 0 {
        return Err(WireError::Invalid {
            field,
            reason: "0 is no replica id",
        });
    }
    Ok(())
}

fn check_address(address: &str, field: &'static str) -> Result<(), WireError> {
    check_host_port(address).map_err(|reason| WireError::Invalid { field, reason })
}

fn check_client_address(address: &str, field: &'static str) -> Result<(), WireError> {
    if address.is_empty() {
        return Ok(());
    }
    check_address(address, field)
}

fn read_id(r: &mut Reader<'_>, field: &'static str) -> Result<u64, WireError> {
    let id = r.u64(field)?;
    check_id(id, field)?;
    Ok(id)
}

/// A `string` of at most [`ADDRESS_BYTES_MAX`] bytes; the cap is judged from the length prefix,
/// before the bytes are read.
fn read_capped(r: &mut Reader<'_>, field: &'static str) -> Result<String, WireError> {
    let len = r.u16(field)? as usize;
    if len > ADDRESS_BYTES_MAX {
        return Err(WireError::Invalid {
            field,
            reason: "longer than 255 bytes",
        });
    }
    let bytes = r.take(len, field)?;
    String::from_utf8(bytes.to_vec()).map_err(|_| WireError::Invalid {
        field,
        reason: "not UTF-8",
    })
}

fn read_address(r: &mut Reader<'_>, field: &'static str) -> Result<String, WireError> {
    let address = read_capped(r, field)?;
    check_address(&address, field)?;
    Ok(address)
}

fn read_client_address(r: &mut Reader<'_>, field: &'static str) -> Result<String, WireError> {
    let address = read_capped(r, field)?;
    check_client_address(&address, field)?;
    Ok(address)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        for good in [
            "127.0.0.1:7500",
            "node-4.tally:1",
            "[::1]:65535",
            "h:7",
            "ä:1",
        ] {
            assert_eq!(check_host_port(good), Ok(()), "{good}");
        }
        let long = format!("{}:1", "a".repeat(254));
        assert_eq!(long.len(), 256);
        for bad in [
            "",
            "host",
            ":7500",
            "host:",
            "host:0",
            "host:65536",
            "host:+80",
            "host:007500",
            "a b:1",
            "a\u{7}:1",
            long.as_str(),
        ] {
            assert!(check_host_port(bad).is_err(), "{bad:?}");
        }
        assert_eq!(check_host_port(&long[1..]), Ok(()), "255 bytes is allowed");
    }
}
