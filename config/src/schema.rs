//! The sections of the operator config, one struct each, and their defaults.
//!
//! Every default lives here, either in a section's `Default` impl (sections whose every key is
//! optional) or in a `default_*` function (the optional keys of [`NodeConfig`]). Ranges and
//! relations between keys are checked in `validate.rs`, not here: deserialization only checks
//! types, so that one run of `validate()` can report every problem at once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[node]`: who this replica is and where it keeps its data. The only required section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This replica's raft id. Must be at least 1 (raft reserves 0 for "no node") and differ
    /// from every `peers.id`. Default: `1`.
    #[serde(default = "default_node_id")]
    pub id: u64,
    /// Directory holding this replica's LevelDB store (and, in development mode, its generated
    /// keys and certificates). A relative path is taken relative to the config file's directory.
    /// Default: `./tally-data`.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Identity of this ledger: 32 bytes as 64 hex characters. It is signed into every request
    /// and every batch header, so a signature made for one ledger is worthless on another.
    /// Required: there is no default, because two ledgers sharing one would accept each other's
    /// requests.
    pub chain_id: String,
}

fn default_node_id() -> u64 {
    1
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./tally-data")
}

/// `[listen]`: the addresses this replica binds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// TLS listener for clients. Default: `127.0.0.1:7400`.
    pub client: SocketAddr,
    /// Mutual-TLS listener for the other replicas (raft replication). Default: `127.0.0.1:7500`.
    pub peer: SocketAddr,
    /// Plain-HTTP listener for `/metrics`, `/health` and `/ready`. Default: `127.0.0.1:7600`.
    pub metrics: SocketAddr,
}

impl Default for ListenConfig {
    fn default() -> Self {
        // Loopback by default: exposing a replica is a decision the operator makes explicitly.
        Self {
            client: SocketAddr::from(([127, 0, 0, 1], 7400)),
            peer: SocketAddr::from(([127, 0, 0, 1], 7500)),
            metrics: SocketAddr::from(([127, 0, 0, 1], 7600)),
        }
    }
}

/// `[tls]`: certificate paths, all PEM. Relative paths are taken relative to the config file's
/// directory. No defaults: `validate()` requires the section; only the development operator
/// (see [`crate::Config::dev_default`]) fills it in itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The CA that signs every node certificate. Peers verify each other against it and clients
    /// trust it.
    pub ca_cert: PathBuf,
    /// This node's certificate chain, presented to clients and to peers.
    pub cert: PathBuf,
    /// This node's private key.
    pub key: PathBuf,
}

/// `[operator]`: the operator's keys. Required by `validate()`, like `[tls]`.
///
/// The operator signs with a whole key (`signing_key`) or, in threshold mode, with this
/// replica's share of one (`signing_key_share`): `validate()` requires exactly one of them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorConfig {
    /// Path of the operator's Ed25519 private key (PKCS#8 PEM) that signs batch headers. Every
    /// replica holds the same key: Ed25519 signatures are deterministic, so all replicas produce
    /// the same signature for a header and none has to be replicated. A relative path is taken
    /// relative to the config file's directory. Unset when `signing_key_share` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key: Option<PathBuf>,
    /// Path of this replica's share of a threshold operator key (FROST, RFC 9591; issue 20):
    /// no replica holds the whole key, and any majority of the replicas signs together. The
    /// file is the one `tally-server init-cluster --threshold` writes for this replica
    /// (`node<id>.share`). A relative path is taken relative to the config file's directory.
    /// `validate()` refuses it together with `next_signing_key` (a threshold group rotates
    /// to another group: `next_signing_key_share`) and on a single node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key_share: Option<PathBuf>,
    /// Path of this replica's share of the *next* threshold group, held ahead of a rotation
    /// to it (`tally-server init-cluster --dir D --new-group` deals it, `tally cluster
    /// rotate-key` names its key; PROTOCOL.md §4.14): the group signs every header after the
    /// rotation's batch. Only with `signing_key_share`. A relative path is taken relative to
    /// the config file's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_signing_key_share: Option<PathBuf>,
    /// Path of the next operator key (PKCS#8 PEM), held ahead of a rotation (`tally cluster
    /// rotate-key`, PROTOCOL.md §4.14): every replica must hold it before the rotation is
    /// asked for, and signs with it from the height after the rotation's batch. A replica
    /// whose ledger rotated to a key it does not hold stops with an error naming the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_signing_key: Option<PathBuf>,
    /// The ledger's genesis operator public key (64 hex characters): where verifiers start
    /// the key chain. Defaults to `signing_key`'s public key (or `signing_key_share`'s group
    /// key); name it when that key is one a rotation introduced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub genesis_public_key: Option<String>,
    /// Ed25519 public keys (32 bytes as 64 hex characters each) allowed to authorize deposits.
    /// At least one is required. Defaults to empty at parse time only so that a missing list is
    /// reported by `validate()` together with every other problem.
    #[serde(default)]
    pub deposit_keys: Vec<String>,
}

/// One `[[peers]]` entry: another replica of this ledger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// That replica's raft id: at least 1, unique among peers, and different from `node.id`.
    pub id: u64,
    /// That replica's peer (replication) address, i.e. its `listen.peer`.
    pub address: SocketAddr,
    /// That replica's client address, i.e. its `listen.client`; sent to clients in "not leader"
    /// redirects.
    pub client_address: SocketAddr,
}

/// `[explorer]`: the public read-only explorer on the HTTP port (`listen.metrics`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExplorerConfig {
    /// Serve `/explorer/` (pages and their JSON). Default: false.
    pub enabled: bool,
}

/// One `[[witnesses]]` entry: a C2SP tlog-witness the leader sends each new checkpoint to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WitnessConfig {
    /// The witness's submission prefix, plain HTTP: checkpoints go to `<url>/add-checkpoint`.
    pub url: String,
    /// The witness's Ed25519 public key, 64 hex: cosignatures by any other key are dropped.
    pub public_key: String,
}

/// `[cluster]`: who may change the replica set, and the replica set a new raft log starts from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Ed25519 public keys (32 bytes as 64 hex characters each) allowed to send admin
    /// (membership) requests: add, promote, remove a replica, transfer leadership. Each must be
    /// a key that can sign. Default: empty, so every admin request is refused `unauthorized`.
    pub admin_keys: Vec<String>,
    /// Raft ids of the replicas the cluster was created with: the voters a new raft log starts
    /// from (an existing log keeps the membership it has). Non-empty, each at least 1, no
    /// duplicates. Default (absent): `node.id` and every `peers.id`; read it through
    /// [`crate::Config::initial_voters`]. A replica added later lists the cluster's original
    /// voters, which do not include itself: it starts as a non-member and joins when the
    /// cluster adds it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initial_voters: Option<Vec<u64>>,
}

/// `[batch]`: how requests are grouped into batches, each one raft entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Milliseconds: a batch closes this long after its first request arrived. Range
    /// `1..=10000`. Default: `100`.
    pub batch_window_ms: u64,
    /// A batch also closes as soon as it holds this many requests. Range `1..=65536`.
    /// Default: `8192`.
    pub batch_requests_max: u32,
    /// Batches proposed to raft but not yet applied; sequencing waits when this many are out.
    /// Range `1..=64`. Default: `4`.
    pub batch_in_flight_max: u32,
    /// Close a batch early as soon as no batch is replicating or being applied (group commit),
    /// so a lone request on an idle operator is not held for the whole window, and under load
    /// each batch takes what arrived while the one before it committed. Default: `true`.
    pub batch_close_idle: bool,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            batch_window_ms: 100,
            batch_requests_max: 8192,
            batch_in_flight_max: 4,
            batch_close_idle: true,
        }
    }
}

impl BatchConfig {
    /// `batch_window_ms` as a [`Duration`].
    pub fn batch_window(&self) -> Duration {
        Duration::from_millis(self.batch_window_ms)
    }
}

/// `[workers]`: sizes of the validation thread pools.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkersConfig {
    /// Threads doing stateless validation (bounds, well-formedness, signatures). Range `1..=256`.
    /// Default: `2`.
    pub stateless: usize,
    /// Threads validating requests against a committed snapshot. Range `1..=256`. Default: `1`.
    pub snapshot: usize,
}

impl Default for WorkersConfig {
    fn default() -> Self {
        Self {
            stateless: 2,
            snapshot: 1,
        }
    }
}

/// `[cache]`: in-memory caches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Entries in the bounded account cache; accounts beyond it are read from storage on
    /// demand. At least `1`. Default: `100000`.
    pub accounts_max: usize,
    /// Bytes of the in-memory filter over applied request ids, which answers "this id is new"
    /// without reading LevelDB; loaded at start from the file a clean stop saved, else rebuilt by
    /// scanning the request table. Rounded down to
    /// a power of two; about 10 bits per applied request keep false positives near 1%, beyond
    /// that more lookups read LevelDB. `0` turns it off. Range `0..=1073741824`. Default:
    /// `16777216` (16 MiB, about 13 million requests).
    pub request_filter_bytes: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            accounts_max: 100_000,
            request_filter_bytes: 16 << 20,
        }
    }
}

/// `[limits]`: caps that keep one client or one connection from exhausting the replica.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Bytes: the largest payload one frame may carry; a larger length prefix is rejected
    /// before anything is allocated. Range `1024..=16777216`. Default: `1048576` (1 MiB).
    pub frame_bytes_max: u32,
    /// Open client connections; a connection beyond it is closed at once. At least `1`.
    /// Default: `1024`.
    pub connections_max: u32,
    /// Requests one connection may have unanswered at once. At least `1`. Default: `4096`.
    pub requests_in_flight_per_connection_max: u32,
    /// Bound of each pipeline queue; a request meeting a full queue is answered "busy".
    /// At least `1`. Default: `65536`.
    pub queue_depth_max: u32,
    /// Milliseconds a TLS handshake may take, on the client port and on the peer port (the
    /// peer's hello included). At least `1`. Default: `5000`.
    pub handshake_timeout_ms: u64,
    /// Milliseconds after the TLS handshake within which the first whole request must have
    /// arrived; a connection that sends none is closed. At least `1`. Default: `10000`.
    pub first_request_timeout_ms: u64,
    /// Milliseconds within which a whole frame must arrive, counted from its first byte (a
    /// deadline for the frame, not for each read). At least `1`. Default: `10000`.
    pub frame_timeout_ms: u64,
    /// Milliseconds after which a connection with no bytes arriving and no frame under way is
    /// closed. At least `1`. Default: `300000` (5 minutes).
    pub idle_timeout_ms: u64,
    /// Milliseconds one reply may take to be written to the socket; a client that does not
    /// read for this long is closed. On the peer port, the same for a batch of raft messages or
    /// a snapshot chunk. At least `1`. Default: `10000`.
    pub write_timeout_ms: u64,
    /// Bytes of replies one connection may have reserved and not yet written (each request
    /// reserves its largest possible reply before it is handled). Over it the connection reads
    /// no further request until the client reads. At least `1048576`. Default: `16777216`
    /// (16 MiB).
    pub reply_bytes_per_connection_max: u64,
    /// Bytes of replies all connections together may have reserved and not yet written. A
    /// request that would pass it is answered `busy`. A request frame larger than 64 KiB takes
    /// its bytes from it while it arrives. At least `reply_bytes_per_connection_max` and
    /// `frame_bytes_max + 20`. Default: `268435456` (256 MiB).
    pub reply_bytes_total_max: u64,
    /// Open client connections from one IPv4 address (or one IPv6 /64). At least `1`.
    /// Default: `64`.
    pub connections_per_address_max: u32,
    /// Open connections on the peer port, authenticated or not. At least `1`. Default: `64`.
    pub peer_connections_max: u32,
    /// New client connections one IPv4 address (or one IPv6 /64) may open per second, with a
    /// burst of as many at once; one more is closed before its TLS handshake. At least `1`.
    /// Default: `64`.
    pub handshakes_per_address_per_second: u32,
    /// Envelopes (`SubmitEnvelope`) the whole server holds between their arrival and their
    /// sequencing, each up to a frame of memory twice over (its bytes and their decoding); one
    /// more is answered `busy`. At least `1`. Default: `64`.
    pub envelopes_in_flight_max: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            frame_bytes_max: 1024 * 1024,
            connections_max: 1024,
            requests_in_flight_per_connection_max: 4096,
            queue_depth_max: 65_536,
            handshake_timeout_ms: 5_000,
            first_request_timeout_ms: 10_000,
            frame_timeout_ms: 10_000,
            idle_timeout_ms: 300_000,
            write_timeout_ms: 10_000,
            reply_bytes_per_connection_max: 16 << 20,
            reply_bytes_total_max: 256 << 20,
            connections_per_address_max: 64,
            peer_connections_max: 64,
            handshakes_per_address_per_second: 64,
            envelopes_in_flight_max: 64,
        }
    }
}

impl LimitsConfig {
    /// `handshake_timeout_ms` as a [`Duration`].
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    /// `frame_timeout_ms` as a [`Duration`].
    pub fn frame_timeout(&self) -> Duration {
        Duration::from_millis(self.frame_timeout_ms)
    }

    /// `idle_timeout_ms` as a [`Duration`].
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    /// `first_request_timeout_ms` as a [`Duration`].
    pub fn first_request_timeout(&self) -> Duration {
        Duration::from_millis(self.first_request_timeout_ms)
    }

    /// `write_timeout_ms` as a [`Duration`].
    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }
}

/// `[raft]`: consensus timing, log compaction and message sizes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    /// Milliseconds per raft logical clock tick. At least `1`. Default: `100`.
    pub tick_ms: u64,
    /// Ticks without hearing from a leader before a follower starts an election. Must be
    /// greater than `heartbeat_ticks`, or followers would call elections between heartbeats of
    /// a healthy leader. Default: `10`.
    pub election_ticks: usize,
    /// Ticks between the leader's heartbeats. At least `1`. Default: `2`.
    pub heartbeat_ticks: usize,
    /// Compact the raft log after this many applied entries. At least `1`. Default: `10000`.
    pub compaction_entries: u64,
    /// Bytes: also compact the raft log once the entries committed since the last compaction
    /// carry this much (at full load 10,000 entries would be gigabytes). A replica further
    /// behind than the log reaches is sent a snapshot. At least `1`. Default: `268435456`
    /// (256 MiB).
    pub compaction_bytes: u64,
    /// Bytes per chunk when a snapshot is streamed to a lagging replica. At least `1` and at
    /// most `limits.frame_bytes_max`, so that a chunk fits in one frame. Default: `1048576`.
    pub snapshot_chunk_bytes: u32,
    /// Bytes: cap on one raft message between peers; the sender puts at most a quarter of it in
    /// one append, plus one whole batch, so it must be at least twice the largest batch entry
    /// (`1220 + 288 × batch.batch_requests_max`). Default: `8388608` (8 MiB).
    pub max_message_bytes: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        Self {
            tick_ms: 100,
            election_ticks: 10,
            heartbeat_ticks: 2,
            compaction_entries: 10_000,
            compaction_bytes: 256 << 20,
            snapshot_chunk_bytes: 1024 * 1024,
            max_message_bytes: 8 * 1024 * 1024,
        }
    }
}

impl RaftConfig {
    /// `tick_ms` as a [`Duration`].
    pub fn tick(&self) -> Duration {
        Duration::from_millis(self.tick_ms)
    }
}

/// `[log]`: diagnostics output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter directive such as `info` or `tally_core=debug,info`. The `RUST_LOG`
    /// environment variable, when set, overrides it. Default: `info`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
        }
    }
}

/// `[archive]`: the continuous archive in object storage (see docs/OPERATING.md, "Backup and
/// restore", and PROTOCOL.md, "The archive"). The leader writes every committed batch, a C2SP
/// tlog-tiles log of the signed headers and a signed checkpoint there; `tally-server restore`
/// and `tally audit` read it back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiveConfig {
    /// Where the archive lives: `s3://bucket/prefix` for any S3-compatible store,
    /// `file:///absolute/path` or a plain path (relative to the config file's directory) for a
    /// local directory. Empty: no archive. Default: empty (the development operator writes
    /// `archive` in its data directory). `tally-server --archive URL` overrides it.
    pub url: String,
    /// S3 endpoint, e.g. `http://127.0.0.1:8333` for a local SeaweedFS or MinIO. Empty: the
    /// `AWS_ENDPOINT_URL` variable, else AWS itself. Credentials come only from the standard AWS
    /// variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`), never
    /// from this file. Default: empty.
    pub endpoint: String,
    /// S3 region. Empty: the `AWS_REGION` variable, else `us-east-1`. Default: empty.
    pub region: String,
    /// Allow a plain-HTTP endpoint (tests, a store on the same host). Default: `false`.
    pub allow_http: bool,
    /// Batches between two state snapshots in the archive (PROTOCOL.md §15.9). At least `1`.
    /// Default: `1000`.
    pub snapshot_every_batches: u64,
    /// Committed batches that may wait for the archive. Past it the replica refuses new
    /// requests with `archive_behind` (retry later) until the archive catches up, instead of
    /// letting an ever larger window of history live only on the replicas' disks. At least `1`.
    /// Default: `10000`.
    pub max_lag_batches: u64,
    /// Send a batch's confirmations only once the batch is in the archive (its checkpoint
    /// written): no confirmed request can be lost even if every replica's disk is. Costs a round
    /// trip to the store per batch. Default: `false`.
    pub confirm_after_archive: bool,
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            endpoint: String::new(),
            region: String::new(),
            allow_http: false,
            snapshot_every_batches: 1000,
            max_lag_batches: 10_000,
            confirm_after_archive: false,
        }
    }
}

impl ArchiveConfig {
    /// Whether an archive is configured.
    pub fn enabled(&self) -> bool {
        !self.url.is_empty()
    }
}
