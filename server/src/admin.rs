//! Admin requests: membership commands from an operator (`tally cluster ...`), signed by an
//! admin key the config lists (`[cluster] admin_keys`). Checked here before anything reaches
//! the raft thread: the signature (strict Ed25519), the key's authorization, the chain id, and
//! freshness (issued within `ADMIN_CLOCK_SKEW_MS` of this replica's clock; a nonce seen in that
//! window is a replay).

use crossbeam_channel::Sender;
use tally_core::engine::members::{MemberAddress, MemberChange};
use tally_wire::{AdminCommand, AdminRequest, ErrorCode};

use crate::channels::{RaftEvent, ReplyTo};

/// How far an admin request's `issued_unix_ms` may be from this replica's clock.
pub const ADMIN_CLOCK_SKEW_MS: u64 = 120_000;
/// Nonces remembered to refuse replays (within the skew window); beyond, the oldest go.
const NONCES_MAX: usize = 4096;

/// Who may send admin requests, and the nonces recently seen.
pub struct AdminGate {
    chain_id: tally_wire::Hash,
    keys: Vec<tally_wire::PublicKey>,
    /// The operator public keys whose private keys this replica holds: a rotation to any
    /// other is refused here, before the leader would sign a batch it cannot follow.
    operator_keys: Vec<tally_wire::PublicKey>,
    /// (issued_unix_ms, nonce, key) of requests accepted within the skew window.
    seen: std::sync::Mutex<std::collections::BTreeSet<(u64, u64, tally_wire::PublicKey)>>,
}

impl AdminGate {
    pub fn new(chain_id: tally_wire::Hash, keys: Vec<tally_wire::PublicKey>) -> AdminGate {
        AdminGate {
            chain_id,
            keys,
            operator_keys: Vec::new(),
            seen: std::sync::Mutex::new(std::collections::BTreeSet::new()),
        }
    }

    /// The same gate, for a replica that holds the private keys of `operator_keys`.
    pub fn holding(self, operator_keys: Vec<tally_wire::PublicKey>) -> AdminGate {
        AdminGate {
            operator_keys,
            ..self
        }
    }

    /// Why `req` must be refused, if it must, in PROTOCOL.md's order: another chain
    /// (`wrong_chain`), an unlisted key or a bad signature (`unauthorized`), a request too old,
    /// too new or seen before (`stale_request`).
    pub fn check(&self, req: &AdminRequest, now_ms: u64) -> Result<(), (ErrorCode, String)> {
        if req.chain_id != self.chain_id {
            return Err((
                ErrorCode::WrongChain,
                "another ledger's admin request".into(),
            ));
        }
        if !self.keys.contains(&req.admin_key) {
            let why = "this admin key is not in the replica's [cluster] admin_keys";
            return Err((ErrorCode::Unauthorized, why.into()));
        }
        if tally_core::crypto::verify_admin(req).is_err() {
            let why = "the admin signature does not verify";
            return Err((ErrorCode::Unauthorized, why.into()));
        }
        if req.issued_unix_ms.abs_diff(now_ms) > ADMIN_CLOCK_SKEW_MS {
            let why = format!(
                "issued {} ms from this replica's clock (at most {ADMIN_CLOCK_SKEW_MS})",
                req.issued_unix_ms.abs_diff(now_ms)
            );
            return Err((ErrorCode::StaleRequest, why));
        }
        self.remember(req, now_ms)
    }

    /// Records the request's nonce; a second sight of it is a replay.
    fn remember(&self, req: &AdminRequest, now_ms: u64) -> Result<(), (ErrorCode, String)> {
        let mut seen = self.seen.lock().expect("admin nonces");
        let horizon = now_ms.saturating_sub(ADMIN_CLOCK_SKEW_MS);
        while seen
            .first()
            .is_some_and(|(t, ..)| *t < horizon || seen.len() > NONCES_MAX)
        {
            seen.pop_first();
        }
        if !seen.insert((req.issued_unix_ms, req.nonce, req.admin_key)) {
            let why = "this admin request was seen before (a replay)";
            return Err((ErrorCode::StaleRequest, why.into()));
        }
        Ok(())
    }
}

/// Serves an admin request: checked here, then handed to the raft thread (which answers with
/// the members, or refuses a change it cannot make).
pub fn dispatch(gate: &AdminGate, raft: &Sender<RaftEvent>, req: AdminRequest, reply: ReplyTo) {
    let now = crate::fail::unix_ms();
    if let Err((code, why)) = gate.check(&req, now) {
        tracing::info!(code = code.name(), "admin request refused: {why}");
        reply.error(code, why);
        return;
    }
    tracing::info!(command = ?req.command, "admin request");
    let event = match req.command {
        AdminCommand::Members => RaftEvent::Members { reply },
        AdminCommand::TransferLeader { id } => {
            let _ = raft.try_send(RaftEvent::TransferLeader(id));
            RaftEvent::Members { reply }
        }
        AdminCommand::Add {
            id,
            address,
            client_address,
            learner,
        } => {
            let address = MemberAddress {
                peer: address,
                client: client_address,
            };
            let change = MemberChange::Add {
                id,
                address,
                learner,
            };
            RaftEvent::ChangeMembers { change, reply }
        }
        AdminCommand::Promote { id } => RaftEvent::ChangeMembers {
            change: MemberChange::Promote { id },
            reply,
        },
        AdminCommand::Remove { id } => RaftEvent::ChangeMembers {
            change: MemberChange::Remove { id },
            reply,
        },
        AdminCommand::RotateKey { new_key } => {
            if !gate.operator_keys.contains(&new_key) {
                let why = "this replica holds no private key for the new operator key: name it \
                           as operator.next_signing_key on every replica and restart them first";
                reply.error(ErrorCode::RotationRefused, why);
                return;
            }
            RaftEvent::RotateKey { new_key, reply }
        }
    };
    if let Err(e) = raft.try_send(event) {
        if let Some(reply) = e.into_inner().into_cmd_reply() {
            reply.busy("the raft queue", 20);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    const CHAIN: tally_wire::Hash = [7; 32];

    fn request(key: &SigningKey, issued: u64, nonce: u64) -> AdminRequest {
        let mut req = AdminRequest {
            chain_id: CHAIN,
            issued_unix_ms: issued,
            nonce,
            command: AdminCommand::Members,
            admin_key: [0; 32],
            signature: [0; 64],
        };
        tally_core::crypto::sign_admin(key, &mut req);
        req
    }

    #[test]
    fn the_gate_checks_chain_key_signature_freshness_and_replays_in_order() {
        let admin = SigningKey::from_bytes(&[1; 32]);
        let other = SigningKey::from_bytes(&[2; 32]);
        let gate = AdminGate::new(CHAIN, vec![admin.verifying_key().to_bytes()]);
        let now = 1_800_000_000_000;
        let code = |r: Result<(), (ErrorCode, String)>| r.err().map(|(c, _)| c);

        assert_eq!(code(gate.check(&request(&admin, now, 1), now)), None);
        // The same bytes again: a replay.
        let again = gate.check(&request(&admin, now, 1), now);
        assert_eq!(code(again), Some(ErrorCode::StaleRequest));
        let mut foreign = request(&admin, now, 2);
        foreign.chain_id = [8; 32];
        assert_eq!(code(gate.check(&foreign, now)), Some(ErrorCode::WrongChain));
        let unlisted = gate.check(&request(&other, now, 3), now);
        assert_eq!(code(unlisted), Some(ErrorCode::Unauthorized));
        // A tampered nonce breaks the signature; checked before freshness.
        let mut tampered = request(&admin, now - 10 * ADMIN_CLOCK_SKEW_MS, 4);
        tampered.nonce = 5;
        assert_eq!(
            code(gate.check(&tampered, now)),
            Some(ErrorCode::Unauthorized)
        );
        let old = request(&admin, now - ADMIN_CLOCK_SKEW_MS - 1, 6);
        assert_eq!(code(gate.check(&old, now)), Some(ErrorCode::StaleRequest));
        let early = request(&admin, now + ADMIN_CLOCK_SKEW_MS + 1, 7);
        assert_eq!(code(gate.check(&early, now)), Some(ErrorCode::StaleRequest));
        // At the edge of the window it is still fresh; a replay of it later is refused as
        // long as it could be fresh, and forgotten afterwards.
        let edge = request(&admin, now - ADMIN_CLOCK_SKEW_MS, 8);
        assert_eq!(code(gate.check(&edge, now)), None);
        assert_eq!(code(gate.check(&edge, now)), Some(ErrorCode::StaleRequest));
    }
}
