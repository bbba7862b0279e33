//! `Config::validate`: ranges of single keys and relations between keys.
//!
//! Validation never stops at the first problem: an operator fixing a config should see every
//! mistake in one run, not one per restart. Each check pushes onto a [`Problems`] list.

use std::fmt::Display;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::Path;

use crate::{
    ClusterConfig, Config, ConfigError, ListenConfig, OperatorConfig, PeerConfig, TlsConfig,
};

// The allowed ranges, next to the checks that use them. Upper bounds are "put a limit on
// everything" caps: far above any sensible setting, low enough that a typo (an extra zero or
// three) is caught instead of silently allocating or waiting forever.
const BATCH_WINDOW_MS: RangeInclusive<u64> = 1..=10_000;
const BATCH_REQUESTS_MAX: RangeInclusive<u32> = 1..=65_536;
const BATCH_IN_FLIGHT_MAX: RangeInclusive<u32> = 1..=64;
const WORKERS: RangeInclusive<usize> = 1..=256;
const REQUEST_FILTER_BYTES: RangeInclusive<usize> = 0..=1 << 30;
const FRAME_BYTES_MAX: RangeInclusive<u32> = 1024..=16 * 1024 * 1024;
const REPLY_BYTES_PER_CONNECTION_MIN: u64 = 1 << 20;
/// A frame's header, before its payload (PROTOCOL.md §2; `tally_wire::FRAME_HEADER_BYTES`).
const FRAME_HEADER_BYTES: u64 = 20;

/// Length of an Ed25519 public key or a chain id, in bytes.
const KEY_BYTES: usize = 32;

/// Decodes a 32-byte value written as 64 hex characters (either case).
pub(crate) fn decode_hex32(text: &str) -> Result<[u8; KEY_BYTES], String> {
    if text.len() != 2 * KEY_BYTES {
        return Err(format!(
            "must be {} hex characters ({KEY_BYTES} bytes), found {}",
            2 * KEY_BYTES,
            text.chars().count()
        ));
    }
    let mut bytes = [0; KEY_BYTES];
    hex::decode_to_slice(text, &mut bytes)
        .map_err(|_| "must contain only hex digits (0-9, a-f)".to_owned())?;
    Ok(bytes)
}

pub(crate) fn validate(config: &Config) -> Vec<ConfigError> {
    let mut problems = Problems::default();
    node(&mut problems, config);
    listen(&mut problems, &config.listen);
    tls(&mut problems, config.tls.as_ref());
    operator(&mut problems, config.operator.as_ref());
    if let Some(operator) = &config.operator {
        threshold(&mut problems, config, operator);
    }
    peers(&mut problems, config);
    cluster(&mut problems, &config.cluster);
    addresses(&mut problems, config);
    sizes(&mut problems, config);
    raft(&mut problems, config);
    archive(&mut problems, config);
    witnesses(&mut problems, config);
    if let Err(problem) = crate::log::check_log_level(&config.log.level) {
        problems.push("log.level", quoted(&config.log.level), problem);
    }
    problems.0
}

fn node(problems: &mut Problems, config: &Config) {
    let node = &config.node;
    problems.at_least("node.id", node.id, 1);
    problems.path("node.data_dir", &node.data_dir);
    if let Err(problem) = decode_hex32(&node.chain_id) {
        problems.push("node.chain_id", quoted(&node.chain_id), problem);
    }
}

/// Two listeners conflict when they would bind the same port on a shared interface. Port 0
/// asks the OS for a free port, so it never conflicts (tests bind everything to port 0).
fn listen(problems: &mut Problems, listen: &ListenConfig) {
    let listeners = [
        ("listen.client", listen.client),
        ("listen.peer", listen.peer),
        ("listen.metrics", listen.metrics),
    ];
    for (i, &(key, address)) in listeners.iter().enumerate() {
        let earlier = listeners[..i].iter().find(|(_, other)| {
            address.port() != 0
                && address.port() == other.port()
                && (address.ip() == other.ip()
                    || address.ip().is_unspecified()
                    || other.ip().is_unspecified())
        });
        if let Some((other_key, other)) = earlier {
            problems.push(
                key,
                quoted(address),
                format!("conflicts with {other_key} ({})", quoted(other)),
            );
        }
    }
}

fn tls(problems: &mut Problems, tls: Option<&TlsConfig>) {
    let Some(tls) = tls else {
        problems.push("tls", "", SECTION_REQUIRED);
        return;
    };
    problems.path("tls.ca_cert", &tls.ca_cert);
    problems.path("tls.cert", &tls.cert);
    problems.path("tls.key", &tls.key);
}

fn operator(problems: &mut Problems, operator: Option<&OperatorConfig>) {
    let Some(operator) = operator else {
        problems.push("operator", "", SECTION_REQUIRED);
        return;
    };
    signing_key(problems, operator);
    if let Some(next) = &operator.next_signing_key {
        problems.path("operator.next_signing_key", next);
    }
    if let Some(next) = &operator.next_signing_key_share {
        problems.path("operator.next_signing_key_share", next);
    }
    if let Some(genesis) = &operator.genesis_public_key {
        public_keys(
            problems,
            "operator.genesis_public_key",
            std::slice::from_ref(genesis),
        );
    }
    if operator.deposit_keys.is_empty() {
        problems.push(
            "operator.deposit_keys",
            "[]",
            "must list at least one Ed25519 public key, or no deposit can ever be made",
        );
    }
    public_keys(problems, "operator.deposit_keys", &operator.deposit_keys);
}

/// Exactly one of `signing_key` (a whole key) and `signing_key_share` (a share of one), and
/// not an empty path.
fn signing_key(problems: &mut Problems, operator: &OperatorConfig) {
    match (&operator.signing_key, &operator.signing_key_share) {
        (Some(key), None) => problems.path("operator.signing_key", key),
        (None, Some(share)) => problems.path("operator.signing_key_share", share),
        (None, None) => problems.push(
            "operator.signing_key",
            "",
            format!("{EXACTLY_ONE_KEY}; neither is set"),
        ),
        (Some(_), Some(share)) => problems.push(
            "operator.signing_key_share",
            quoted(share.display()),
            format!("{EXACTLY_ONE_KEY}; operator.signing_key is set too"),
        ),
    }
}

const EXACTLY_ONE_KEY: &str = "set exactly one of operator.signing_key (the whole operator key) \
     and operator.signing_key_share (this replica's share of a threshold key)";

/// Threshold mode (`operator.signing_key_share`) rotates to another group's share
/// (`next_signing_key_share`), never to a whole key; a single node has no one to share a key
/// with. (With both keys set, [`signing_key`] reports that alone.)
fn threshold(problems: &mut Problems, config: &Config, operator: &OperatorConfig) {
    if let (None, Some(next)) = (
        &operator.signing_key_share,
        &operator.next_signing_key_share,
    ) {
        problems.push(
            "operator.next_signing_key_share",
            quoted(next.display()),
            "only with operator.signing_key_share: a whole key rotates to a whole key \
             (operator.next_signing_key)",
        );
    }
    let (None, Some(share)) = (&operator.signing_key, &operator.signing_key_share) else {
        return;
    };
    if let Some(next) = &operator.next_signing_key {
        problems.push(
            "operator.next_signing_key",
            quoted(next.display()),
            format!(
                "{NOT_WITH_SHARE}: a threshold group rotates to another group \
                 (operator.next_signing_key_share)"
            ),
        );
    }
    if config.peers.is_empty() {
        problems.push(
            "operator.signing_key_share",
            quoted(share.display()),
            "needs [[peers]]: a single-node operator keeps a plain key (operator.signing_key)",
        );
    }
}

const NOT_WITH_SHARE: &str = "not with operator.signing_key_share";

/// Each key of the list `name` is 64 hex characters, and no two are the same key (compared as
/// bytes, so that upper- and lower-case spellings count as equal). Returns each key's bytes,
/// or `None` where it has none.
fn public_keys(problems: &mut Problems, name: &str, keys: &[String]) -> Vec<Option<[u8; 32]>> {
    let mut decoded: Vec<Option<[u8; KEY_BYTES]>> = Vec::with_capacity(keys.len());
    for (i, key) in keys.iter().enumerate() {
        let item = format!("{name}[{i}]");
        match decode_hex32(key) {
            Err(problem) => {
                problems.push(item, quoted(key), problem);
                decoded.push(None);
            }
            Ok(bytes) => {
                if let Some(j) = decoded.iter().position(|other| *other == Some(bytes)) {
                    problems.push(item, quoted(key), format!("duplicates {name}[{j}]"));
                }
                decoded.push(Some(bytes));
            }
        }
    }
    decoded
}

/// Whether `key` is a public key a signer can have: the canonical encoding of a curve point
/// that is not of small order (the rule of `tally_core::validate::is_account_key`; this crate
/// does not depend on core). Any other 32 bytes would authorize nothing, or anything signed
/// by a forger for a small-order key.
fn is_signing_public_key(key: &[u8; KEY_BYTES]) -> bool {
    let Some(point) = curve25519_dalek::edwards::CompressedEdwardsY(*key).decompress() else {
        return false;
    };
    point.compress().to_bytes() == *key && !point.is_small_order()
}

fn cluster(problems: &mut Problems, cluster: &ClusterConfig) {
    let keys = public_keys(problems, "cluster.admin_keys", &cluster.admin_keys);
    for (i, bytes) in keys.iter().enumerate() {
        if bytes.is_some_and(|bytes| !is_signing_public_key(&bytes)) {
            problems.push(
                format!("cluster.admin_keys[{i}]"),
                quoted(&cluster.admin_keys[i]),
                "not an Ed25519 public key that can sign (not a canonical curve point, or of \
                 small order)",
            );
        }
    }
    let Some(voters) = &cluster.initial_voters else {
        return;
    };
    if voters.is_empty() {
        problems.push(
            "cluster.initial_voters",
            "[]",
            "must list at least one raft id (leave the key out for node.id and every peers.id)",
        );
    }
    for (i, &id) in voters.iter().enumerate() {
        let key = format!("cluster.initial_voters[{i}]");
        if id == 0 {
            problems.push(key, id, "must be at least 1 (raft reserves 0)");
        } else if let Some(j) = voters[..i].iter().position(|&other| other == id) {
            problems.push(key, id, format!("duplicates cluster.initial_voters[{j}]"));
        }
    }
}

fn witnesses(problems: &mut Problems, config: &Config) {
    for (i, w) in config.witnesses.iter().enumerate() {
        let rest = w.url.strip_prefix("http://").unwrap_or_default();
        if rest.is_empty() || rest.starts_with('/') {
            problems.push(
                format!("witnesses[{i}].url"),
                quoted(&w.url),
                "must be http://HOST:PORT[/PREFIX] (plain HTTP; put a TLS bastion in front)",
            );
        }
        if let Err(problem) = decode_hex32(&w.public_key) {
            problems.push(
                format!("witnesses[{i}].public_key"),
                quoted(&w.public_key),
                problem,
            );
        }
    }
}

fn peers(problems: &mut Problems, config: &Config) {
    for (i, peer) in config.peers.iter().enumerate() {
        let key = format!("peers[{i}].id");
        if peer.id == 0 {
            problems.push(key, peer.id, "must be at least 1 (raft reserves 0)");
        } else if peer.id == config.node.id {
            problems.push(
                key,
                peer.id,
                "must differ from node.id, this replica's own id",
            );
        } else if let Some(j) = config.peers[..i].iter().position(|p| p.id == peer.id) {
            problems.push(key, peer.id, format!("duplicates peers[{j}].id"));
        }
    }
}

/// Every address in the config must be distinct: a peer entry pointing at this replica's own
/// listener, or two peers sharing an address, is a copy-paste mistake that would make this
/// replica talk to itself or to the wrong node. (Listener pairs are checked in [`listen`].)
fn addresses(problems: &mut Problems, config: &Config) {
    let listen = &config.listen;
    let mut seen: Vec<(String, SocketAddr)> = vec![
        ("listen.client".to_owned(), listen.client),
        ("listen.peer".to_owned(), listen.peer),
        ("listen.metrics".to_owned(), listen.metrics),
    ];
    for (i, peer) in config.peers.iter().enumerate() {
        let PeerConfig {
            address,
            client_address,
            ..
        } = peer;
        for (field, address) in [("address", *address), ("client_address", *client_address)] {
            let key = format!("peers[{i}].{field}");
            if address.port() == 0 {
                problems.push(key, quoted(address), "port 0 cannot be dialled");
            } else if let Some((other_key, _)) = seen.iter().find(|(_, seen)| *seen == address) {
                problems.push(key, quoted(address), format!("same address as {other_key}"));
            } else {
                seen.push((key, address));
            }
        }
    }
}

fn sizes(problems: &mut Problems, config: &Config) {
    let batch = &config.batch;
    problems.within(
        "batch.batch_window_ms",
        batch.batch_window_ms,
        BATCH_WINDOW_MS,
    );
    problems.within(
        "batch.batch_requests_max",
        batch.batch_requests_max,
        BATCH_REQUESTS_MAX,
    );
    problems.within(
        "batch.batch_in_flight_max",
        batch.batch_in_flight_max,
        BATCH_IN_FLIGHT_MAX,
    );

    problems.within("workers.stateless", config.workers.stateless, WORKERS);
    problems.within("workers.snapshot", config.workers.snapshot, WORKERS);
    problems.at_least("cache.accounts_max", config.cache.accounts_max, 1);
    problems.within(
        "cache.request_filter_bytes",
        config.cache.request_filter_bytes,
        REQUEST_FILTER_BYTES,
    );

    let limits = &config.limits;
    problems.within(
        "limits.frame_bytes_max",
        limits.frame_bytes_max,
        FRAME_BYTES_MAX,
    );
    problems.at_least("limits.connections_max", limits.connections_max, 1);
    problems.at_least(
        "limits.requests_in_flight_per_connection_max",
        limits.requests_in_flight_per_connection_max,
        1,
    );
    problems.at_least("limits.queue_depth_max", limits.queue_depth_max, 1);
    problems.at_least(
        "limits.handshake_timeout_ms",
        limits.handshake_timeout_ms,
        1,
    );
    problems.at_least("limits.frame_timeout_ms", limits.frame_timeout_ms, 1);
    problems.at_least("limits.idle_timeout_ms", limits.idle_timeout_ms, 1);
    connection_limits(problems, limits);
}

/// The per-connection, per-address and peer-port limits of issue 17.
fn connection_limits(problems: &mut Problems, limits: &crate::LimitsConfig) {
    problems.at_least(
        "limits.first_request_timeout_ms",
        limits.first_request_timeout_ms,
        1,
    );
    problems.at_least("limits.write_timeout_ms", limits.write_timeout_ms, 1);
    // The largest reply (1,024 signed headers) is about 263 KiB: a connection's budget must
    // hold one, or a request for it could never be handled.
    problems.at_least(
        "limits.reply_bytes_per_connection_max",
        limits.reply_bytes_per_connection_max,
        REPLY_BYTES_PER_CONNECTION_MIN,
    );
    // A frame larger than 64 KiB takes its bytes from the server's budget while it arrives.
    problems.at_least(
        "limits.reply_bytes_total_max",
        limits.reply_bytes_total_max,
        limits
            .reply_bytes_per_connection_max
            .max(u64::from(limits.frame_bytes_max) + FRAME_HEADER_BYTES),
    );
    // Above `connections_max` it is simply never reached: not an error.
    problems.at_least(
        "limits.connections_per_address_max",
        limits.connections_per_address_max,
        1,
    );
    problems.at_least(
        "limits.peer_connections_max",
        limits.peer_connections_max,
        1,
    );
    problems.at_least(
        "limits.handshakes_per_address_per_second",
        limits.handshakes_per_address_per_second,
        1,
    );
    problems.at_least(
        "limits.envelopes_in_flight_max",
        limits.envelopes_in_flight_max,
        1,
    );
}

fn raft(problems: &mut Problems, config: &Config) {
    let raft = &config.raft;
    problems.at_least("raft.tick_ms", raft.tick_ms, 1);
    problems.at_least("raft.heartbeat_ticks", raft.heartbeat_ticks, 1);
    if raft.election_ticks <= raft.heartbeat_ticks {
        problems.push(
            "raft.election_ticks",
            raft.election_ticks,
            format!(
                "must be greater than raft.heartbeat_ticks ({})",
                raft.heartbeat_ticks
            ),
        );
    }
    problems.at_least("raft.compaction_entries", raft.compaction_entries, 1);
    problems.at_least("raft.compaction_bytes", raft.compaction_bytes, 1);
    let frame_bytes_max = config.limits.frame_bytes_max;
    if raft.snapshot_chunk_bytes == 0 {
        problems.push("raft.snapshot_chunk_bytes", 0, "must be at least 1");
    } else if raft.snapshot_chunk_bytes > frame_bytes_max {
        problems.push(
            "raft.snapshot_chunk_bytes",
            raft.snapshot_chunk_bytes,
            format!("must be at most limits.frame_bytes_max ({frame_bytes_max})"),
        );
    }
    // A raft message carries entries up to a quarter of the cap plus one more entry; a whole
    // batch (header, count, 288 bytes per request) must fit in half, or it never replicates.
    let batch_bytes_max =
        BATCH_FIXED_BYTES + BATCH_ENTRY_BYTES * config.batch.batch_requests_max as u64;
    if raft.max_message_bytes < 2 * batch_bytes_max {
        problems.push(
            "raft.max_message_bytes",
            raft.max_message_bytes,
            format!(
                "must be at least twice the largest batch ({batch_bytes_max} bytes for \
                 batch.batch_requests_max = {})",
                config.batch.batch_requests_max
            ),
        );
    }
}

fn archive(problems: &mut Problems, config: &Config) {
    let archive = &config.archive;
    problems.at_least(
        "archive.snapshot_every_batches",
        archive.snapshot_every_batches,
        1,
    );
    problems.at_least("archive.max_lag_batches", archive.max_lag_batches, 1);
    if archive.enabled() {
        if let Err(problem) = crate::ArchiveUrl::parse(&archive.url) {
            problems.push("archive.url", quoted(&archive.url), problem);
        }
    } else if archive.confirm_after_archive {
        problems.push(
            "archive.confirm_after_archive",
            true,
            "needs archive.url: there is no archive to wait for",
        );
    }
    let endpoint = &archive.endpoint;
    if !endpoint.is_empty() && !endpoint.starts_with("http://") && !endpoint.starts_with("https://")
    {
        problems.push(
            "archive.endpoint",
            quoted(endpoint),
            "must be an http:// or https:// URL",
        );
    }
}

/// A batch body's fixed part (header 192, count 4) plus room for protobuf framing.
const BATCH_FIXED_BYTES: u64 = 192 + 4 + 1024;
/// Bytes per request in a batch body (request 208, receipt 80).
const BATCH_ENTRY_BYTES: u64 = 208 + 80;

const SECTION_REQUIRED: &str =
    "section is required (only the development operator, run without a config, makes its own)";

/// The problems found so far.
#[derive(Default)]
struct Problems(Vec<ConfigError>);

impl Problems {
    fn push(&mut self, key: impl Into<String>, value: impl Display, problem: impl Into<String>) {
        self.0
            .push(ConfigError::new(key, value.to_string(), problem));
    }

    fn at_least<T: PartialOrd + Display>(&mut self, key: &str, value: T, min: T) {
        if value < min {
            self.push(key, &value, format!("must be at least {min}"));
        }
    }

    fn within<T: PartialOrd + Display>(&mut self, key: &str, value: T, range: RangeInclusive<T>) {
        if !range.contains(&value) {
            let (min, max) = range.into_inner();
            self.push(key, &value, format!("must be in {min}..={max}"));
        }
    }

    /// An empty path would silently mean "the current directory", never what was intended.
    fn path(&mut self, key: &str, path: &Path) {
        if path.as_os_str().is_empty() {
            self.push(key, "\"\"", "must not be empty");
        }
    }
}

/// Renders a string-like value the way it is written in TOML, quoted.
fn quoted(value: impl Display) -> String {
    format!("{:?}", value.to_string())
}
