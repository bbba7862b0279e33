//! tally-client: the client library of tally, and the `tally` CLI (`src/bin/tally.rs`) over it.
//! The bench and chaos harnesses use it too.
//!
//! - [`Profile`]: which ledger (chain id), which operator key, which CA and replicas; read from
//!   the `profile.toml` the server writes.
//! - [`Client`]: one TLS connection (tokio-rustls, ring) to a replica carrying many requests in
//!   flight, matched to answers by correlation id; every call has a timeout.
//! - [`ClusterClient`]: what applications use against a replicated operator. It keeps one
//!   [`Client`] to the replica it believes leads, follows `not_leader` hints, fails over and
//!   reconnects with bounded backoff, bounds how many operations wait while disconnected, and
//!   resubmits the same request, so a failover never applies it twice (behaviour table in
//!   [`cluster`]).
//! - [`build_request`], [`random_id`]: signed requests. [`ClusterClient::admin`] and
//!   [`signed_admin`]: membership commands signed by an admin key ([`Profile::load_admin_key`]);
//!   [`members_json`]: the membership as `tally cluster members --json` prints it.
//! - [`load_key`], [`write_key`]: Ed25519 keys as PKCS#8 PEM files; public keys as 64 hex.
//! - [`ConfirmationFile`], [`verify_confirmation_file`]: confirmations as JSON files that anyone
//!   holding the operator's public key can check offline (format in [`confirmation`]).
//!
//! Safety of retries: a request is identified by `(signer, id)`, and the server never applies
//! one twice. After [`Error::Timeout`], [`Error::Disconnected`] or [`Error::Indeterminate`] the
//! outcome is unknown ([`Error::outcome_unknown`]); submit the *same* request again (same id) and
//! the answer is the original confirmation.
//!
//! Caveats:
//! - A [`Client`] talks to one replica and does not reconnect or follow the leader by itself; on
//!   `not_leader` the [`Error::Rejected`] reply carries a leader hint. [`ClusterClient`] does
//!   both.
//! - [`Client::submit`] checks that a confirmation is for the submitted request but does not
//!   verify it; call [`tally_core::verify::verify_confirmation`] with a trusted operator key.
//! - The CA certificate is read with blocking IO when connecting (a small file, once per
//!   connection).
//! - A confirmation file's `replayed` flag is cleared in its bytes: it describes how the answer
//!   was delivered, not what was applied.

mod admin;
pub mod balance_proof;
pub mod cluster;
pub mod confirmation;
mod connection;
pub mod consistency;
pub mod envelope;
mod error;
pub mod key_chain;
mod keys;
mod profile;
pub mod trust;
pub mod witness;

use ed25519_dalek::SigningKey;
use tally_wire::{Hash, Op, PublicKey, Request};

pub use admin::{members_json, members_table, MemberJson, MembersJson};
pub use cluster::{
    signed_admin, ClusterClient, ClusterOptions, ClusterStats, ConnectFuture, Connector,
    ProfileConnector,
};
pub use confirmation::{
    confirmation_to_json, verify_confirmation_file, verify_confirmation_json,
    verify_confirmation_json_under, write_confirmation_file, ConfirmationFile, CONFIRMATION_FORMAT,
};
pub use connection::{tls_connect, Client, DEFAULT_TIMEOUT, OUTGOING_FRAMES_MAX};
pub use error::{retry_name, Error, Result};
pub use keys::{
    check_private_file, generate_key, key_pem, load_key, parse_hash, parse_public_key, public_key,
    to_hex, write_key,
};
pub use profile::{Profile, ProfileWitness, ReplicaAddress};

/// Builds and signs a request. For a withdrawal `to` must be all zero; for a deposit `key` is a
/// deposit key and `to` the credited account.
pub fn build_request(
    key: &SigningKey,
    chain_id: Hash,
    op: Op,
    id: u128,
    to: PublicKey,
    amount: u64,
) -> Request {
    let mut request = unsigned(key, chain_id, op, id, to, amount);
    tally_core::crypto::sign_request(key, &mut request);
    request
}

/// [`build_request`], also returning the request's nonce hint for
/// [`Client::submit_hinted`] (signed once, by `sign_request_with_hint`).
pub fn build_request_hinted(
    key: &SigningKey,
    chain_id: Hash,
    op: Op,
    id: u128,
    to: PublicKey,
    amount: u64,
) -> (Request, tally_wire::NonceHint) {
    let mut request = unsigned(key, chain_id, op, id, to, amount);
    let hint = tally_core::crypto::sign_request_with_hint(key, &mut request);
    (request, hint)
}

fn unsigned(
    key: &SigningKey,
    chain_id: Hash,
    op: Op,
    id: u128,
    to: PublicKey,
    amount: u64,
) -> Request {
    Request {
        chain_id,
        op,
        id,
        signer: public_key(key),
        to,
        amount,
        signature: [0; 64],
    }
}

/// A random request id. 128 random bits never collide in practice, so every call is a new
/// request; reuse an id only to retry the same request.
pub fn random_id() -> u128 {
    rand::random()
}

/// The name of a role number in a status reply.
pub fn role_name(role: u8) -> &'static str {
    match role {
        0 => "follower",
        1 => "candidate",
        2 => "leader",
        3 => "pre-candidate",
        4 => "single",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_requests_verify_and_ids_differ() {
        let key = generate_key();
        let request = build_request(&key, [3; 32], Op::Transfer, 9, [5; 32], 12);
        assert!(tally_core::crypto::verify_request(&request));
        assert_eq!(Request::decode(&request.encode()).unwrap(), request);
        assert_ne!(random_id(), random_id());
    }
}
