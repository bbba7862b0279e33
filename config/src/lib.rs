//! The typed schema of tally's operator config (TOML), its defaults and its validation.
//!
//! A replica is configured by one TOML file: who it is (`[node]`), where it listens
//! (`[listen]`), its certificates (`[tls]`), the operator's keys (`[operator]`), the other
//! replicas (`[[peers]]`), who may change them and whom the cluster started with (`[cluster]`),
//! and tuning sections (`[batch]`, `[workers]`, `[cache]`, `[limits]`,
//! `[raft]`, `[log]`). `docs/CONFIG.md` at the workspace root is the reference for every key,
//! and `config/examples/single-node.toml` is a commented example; a test keeps both in step
//! with the structs here.
//!
//! This crate does no IO: the server reads the file and hands over its text. Loading goes in
//! three steps, because the development operator fills in keys between parsing and validation:
//!
//! ```
//! # use std::path::Path;
//! # let text = tally_config::Config::dev_default("data".into(), [7; 32]).to_toml_string();
//! let mut config = tally_config::Config::from_toml_str(&text)?; // syntax, types, unknown keys
//! config.resolve_paths(Path::new("/etc/tally"));               // relative to the file's dir
//! # config.operator.as_mut().unwrap().deposit_keys.push("11".repeat(32));
//! config.validate()?;                                          // ranges and relations
//! # Ok::<(), tally_config::ConfigErrors>(())
//! ```
//!
//! Every problem is a [`ConfigError`] naming the dotted key (`raft.election_ticks`,
//! `peers[1].id`), the value found and what is wrong. [`Config::validate`] reports every problem
//! at once, in a [`ConfigErrors`]. Defaults live in one place, `schema.rs`.
//!
//! # Known caveats
//!
//! - Parsing stops at the first syntax or type error (serde deserializes until it fails); only
//!   `validate()` collects every problem.
//! - Addresses are `ip:port` socket addresses; host names are not accepted, because resolving
//!   them is IO and the answer could change under a running cluster.
//! - `node.chain_id` and `operator.deposit_keys` are checked for shape (32 bytes as hex) only;
//!   whether a deposit key is a valid Ed25519 point is checked by the server when it loads the
//!   keys. `cluster.admin_keys` are checked here as curve points as well (pure arithmetic on
//!   the bytes, with curve25519-dalek).
//! - Threshold mode (`operator.signing_key_share`) is refused on a single node and with a
//!   whole next key (`next_signing_key`: a group rotates to a group, `next_signing_key_share`).
//! - Paths are not checked for existence. `log.level` is checked for what an operator gets
//!   wrong (an unknown level name), not for every corner of `tracing-subscriber`'s syntax.
//! - TOML integers are signed 64-bit, so a `u64` or `usize` above `i64::MAX` cannot be written;
//!   [`Config::to_toml_string`] panics on such a value, or on a path that is not UTF-8. Neither
//!   can come from parsing, only from a `Config` built in code.

mod archive;
mod error;
mod log;
mod schema;
mod validate;

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::archive::ArchiveUrl;
pub use crate::error::{ConfigError, ConfigErrors};
pub use crate::schema::{
    ArchiveConfig, BatchConfig, CacheConfig, ClusterConfig, ExplorerConfig, LimitsConfig,
    ListenConfig, LogConfig, NodeConfig, OperatorConfig, PeerConfig, RaftConfig, TlsConfig,
    WitnessConfig, WorkersConfig,
};

/// A replica's whole configuration, one field per TOML section.
///
/// Only `[node]` (with its `chain_id`) is required to parse; every other section has defaults.
/// `[tls]` and `[operator]` parse as optional because the development operator generates them,
/// but [`Config::validate`] reports them missing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[node]`: this replica's identity and data directory.
    pub node: NodeConfig,
    /// `[listen]`: the addresses this replica binds.
    #[serde(default)]
    pub listen: ListenConfig,
    /// `[tls]`: certificate and key paths. Required by `validate()`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// `[operator]`: the signing key (or key share) path and the deposit keys. Required by
    /// `validate()`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<OperatorConfig>,
    /// `[batch]`: batch window and caps.
    #[serde(default)]
    pub batch: BatchConfig,
    /// `[workers]`: validation thread pool sizes.
    #[serde(default)]
    pub workers: WorkersConfig,
    /// `[cache]`: cache bounds.
    #[serde(default)]
    pub cache: CacheConfig,
    /// `[limits]`: connection, frame and queue caps and timeouts.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// `[raft]`: consensus timing and sizes.
    #[serde(default)]
    pub raft: RaftConfig,
    /// `[log]`: diagnostics.
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub archive: ArchiveConfig,
    /// `[cluster]`: admin keys and the initial voters.
    #[serde(default)]
    pub cluster: ClusterConfig,
    /// `[explorer]`: the public read-only explorer; off by default.
    #[serde(default)]
    pub explorer: ExplorerConfig,
    /// `[[witnesses]]`: witnesses that cosign the ledger's checkpoints; none by default.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub witnesses: Vec<WitnessConfig>,
    /// `[[peers]]`: the other replicas; empty for a single node. Last, so that serialized
    /// configs end with the array of tables rather than interleave it with the sections.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerConfig>,
}

impl Config {
    /// The configuration of the single-node development operator: node 1, default addresses and
    /// tuning, TLS material and the operator key inside `data_dir` (`ca.pem`, `node.pem`,
    /// `node.key`, `operator.key`), and no deposit keys yet. The server generates those files
    /// and pushes the deposit key it generated before it validates.
    pub fn dev_default(data_dir: PathBuf, chain_id: [u8; 32]) -> Config {
        Config {
            node: NodeConfig {
                id: 1,
                chain_id: hex::encode(chain_id),
                data_dir: data_dir.clone(),
            },
            listen: ListenConfig::default(),
            tls: Some(TlsConfig {
                ca_cert: data_dir.join("ca.pem"),
                cert: data_dir.join("node.pem"),
                key: data_dir.join("node.key"),
            }),
            operator: Some(OperatorConfig {
                signing_key: Some(data_dir.join("operator.key")),
                signing_key_share: None,
                next_signing_key: None,
                next_signing_key_share: None,
                genesis_public_key: None,
                deposit_keys: Vec::new(),
            }),
            batch: BatchConfig::default(),
            workers: WorkersConfig::default(),
            cache: CacheConfig::default(),
            limits: LimitsConfig::default(),
            raft: RaftConfig::default(),
            log: LogConfig::default(),
            archive: ArchiveConfig {
                url: "archive".to_owned(),
                ..ArchiveConfig::default()
            },
            cluster: ClusterConfig::default(),
            explorer: ExplorerConfig::default(),
            witnesses: Vec::new(),
            peers: Vec::new(),
        }
    }

    /// Parses a config from TOML text. Checks syntax, types and key names (an unknown key is an
    /// error naming it), not ranges or relations: call [`Config::validate`] for those.
    ///
    /// On failure the one error names the dotted key where it could be determined, and its
    /// problem ends with the line and column in `text`.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigErrors> {
        serde_path_to_error::deserialize(toml::Deserializer::new(text))
            .map_err(|error| parse_error(text, &error).into())
    }

    /// Serializes the config back to TOML; `from_toml_str` of the result gives an equal
    /// `Config`. Used by the server's `init-cluster` to write configs.
    ///
    /// # Panics
    ///
    /// If a path is not valid UTF-8 or an integer exceeds `i64::MAX`: TOML can represent
    /// neither, and neither can come from a parsed config.
    pub fn to_toml_string(&self) -> String {
        toml::to_string_pretty(self).expect("config has a non-UTF-8 path or an integer > i64::MAX")
    }

    /// Checks every range and every relation between keys, and returns every problem found.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let problems = validate::validate(self);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(problems))
        }
    }

    /// Makes the relative paths (`node.data_dir`, `tls.*`, `operator.signing_key`,
    /// `operator.signing_key_share`, `operator.next_signing_key`) relative to `base_dir`, the directory of the config file, so that a replica started from another
    /// working directory finds the same files. Pure path arithmetic: nothing is read. Absolute
    /// and empty paths are left alone (an empty one is for `validate()` to report).
    pub fn resolve_paths(&mut self, base_dir: &Path) {
        let resolve = |path: &mut PathBuf| {
            if path.is_relative() && !path.as_os_str().is_empty() {
                *path = join_relative(base_dir, path);
            }
        };
        resolve(&mut self.node.data_dir);
        if let Some(tls) = &mut self.tls {
            resolve(&mut tls.ca_cert);
            resolve(&mut tls.cert);
            resolve(&mut tls.key);
        }
        if let Some(operator) = &mut self.operator {
            let paths = [
                &mut operator.signing_key,
                &mut operator.signing_key_share,
                &mut operator.next_signing_key,
                &mut operator.next_signing_key_share,
            ];
            for path in paths.into_iter().flatten() {
                resolve(path);
            }
        }
        // A plain relative archive path, like every other path, is relative to the config.
        if let Ok(ArchiveUrl::File(path)) = ArchiveUrl::parse(&self.archive.url) {
            if path.is_relative() {
                self.archive.url = join_relative(base_dir, &path).display().to_string();
            }
        }
    }

    /// `node.chain_id` as bytes.
    ///
    /// # Panics
    ///
    /// If the chain id is not 64 hex characters, which `validate()` rejects: call it first.
    pub fn chain_id_bytes(&self) -> [u8; 32] {
        validate::decode_hex32(&self.node.chain_id)
            .expect("node.chain_id is valid hex: call Config::validate first")
    }

    /// `operator.genesis_public_key` decoded, if the config names one.
    ///
    /// # Panics
    ///
    /// If `[operator]` is absent or the key is not 64 hex characters, which `validate()`
    /// rejects: call it first.
    pub fn genesis_public_key_bytes(&self) -> Option<[u8; 32]> {
        let operator = self
            .operator
            .as_ref()
            .expect("[operator] is present: call Config::validate first");
        operator.genesis_public_key.as_ref().map(|key| {
            validate::decode_hex32(key)
                .expect("the genesis key is valid hex: call Config::validate first")
        })
    }

    /// `operator.deposit_keys` as bytes, in config order.
    ///
    /// # Panics
    ///
    /// If `[operator]` is absent or a key is not 64 hex characters, which `validate()` rejects:
    /// call it first.
    pub fn deposit_keys_bytes(&self) -> Vec<[u8; 32]> {
        let operator = self
            .operator
            .as_ref()
            .expect("[operator] is present: call Config::validate first");
        operator
            .deposit_keys
            .iter()
            .map(|key| {
                validate::decode_hex32(key)
                    .expect("deposit keys are valid hex: call Config::validate first")
            })
            .collect()
    }

    /// `cluster.admin_keys` as bytes, in config order.
    ///
    /// # Panics
    ///
    /// If a key is not 64 hex characters, which `validate()` rejects: call it first.
    pub fn admin_keys_bytes(&self) -> Vec<[u8; 32]> {
        self.cluster
            .admin_keys
            .iter()
            .map(|key| {
                validate::decode_hex32(key)
                    .expect("admin keys are valid hex: call Config::validate first")
            })
            .collect()
    }

    /// The voters a new raft log starts from: `cluster.initial_voters` as written, or by default
    /// this replica and every peer ([`Config::replica_ids`]). Ascending, no duplicates.
    pub fn initial_voters(&self) -> Vec<u64> {
        match &self.cluster.initial_voters {
            Some(voters) => {
                let mut voters = voters.clone();
                voters.sort_unstable();
                voters.dedup();
                voters
            }
            None => self.replica_ids(),
        }
    }

    /// The archive's location, when one is configured.
    pub fn archive_url(&self) -> Option<ArchiveUrl> {
        if !self.archive.enabled() {
            return None;
        }
        Some(
            ArchiveUrl::parse(&self.archive.url)
                .expect("archive.url is valid: call Config::validate first"),
        )
    }

    /// The raft ids of every replica this config names, this one included, in ascending order.
    pub fn replica_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = std::iter::once(self.node.id)
            .chain(self.peers.iter().map(|peer| peer.id))
            .collect();
        ids.sort_unstable();
        ids
    }
}

/// `base_dir.join(path)` without the `./` that config files like to start paths with, so that
/// logged paths read `/etc/tally/tally-data`, not `/etc/tally/./tally-data`.
fn join_relative(base_dir: &Path, path: &Path) -> PathBuf {
    let rest: PathBuf = path
        .components()
        .filter(|component| *component != Component::CurDir)
        .collect();
    if rest.as_os_str().is_empty() {
        base_dir.to_path_buf()
    } else {
        base_dir.join(rest)
    }
}

/// Turns a deserialization failure into a [`ConfigError`] naming the dotted key.
///
/// serde_path_to_error tracks the path serde was at (`peers[1].id`); toml supplies the message
/// and the byte span, which becomes a line and column.
fn parse_error(text: &str, error: &serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
    let inner = error.inner();
    // The root path displays as "."; syntax errors happen there, before any key is known.
    let mut key = error.path().to_string();
    if key == "." {
        key.clear();
    }
    // Multi-line messages (syntax errors add what was expected) go on one line, so that
    // `ConfigErrors` stays one error per line.
    let mut message = inner.message().lines().collect::<Vec<_>>().join("; ");
    let mut value = String::new();
    if key.is_empty() {
        // The TOML parser itself fails on a value it cannot represent (an integer beyond
        // 64 bits), before serde knows the key: find the key from the text.
        if let Some((found, written)) = inner.span().and_then(|span| key_at(text, span.start)) {
            key = found;
            value = written;
            if message.starts_with("number too large") {
                message.push_str(" (TOML integers are signed 64-bit: at most 9223372036854775807)");
            }
        }
    }
    if let Some(field) = backticked(&message, "missing field `") {
        // serde reports a missing field at the enclosing table; name the field itself.
        key = if key.is_empty() {
            field.to_owned()
        } else {
            format!("{key}.{field}")
        };
    } else if !key.is_empty() && value.is_empty() && !message.starts_with("unknown field") {
        // A wrong type or value: show what was written, when it is short enough to read.
        if let Some(written) = inner.span().and_then(|span| text.get(span)) {
            if !written.contains('\n') && written.len() <= 80 {
                value = written.to_owned();
            }
        }
    }
    let problem = match inner.span() {
        Some(span) => {
            let (line, column) = line_column(text, span.start);
            format!("{message} (line {line}, column {column})")
        }
        None => message,
    };
    ConfigError::new(key, value, problem)
}

/// The dotted key whose value starts at or spans byte `offset` of `text`, and the value as
/// written (when it is short), if `offset` is in the value of a `key = value` line. The table
/// is the last `[header]` above it; in the `n`-th `[[array]]` table it is `array[n]`.
fn key_at(text: &str, offset: usize) -> Option<(String, String)> {
    let before = text.get(..offset)?;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[line_start..]
        .find('\n')
        .map_or(text.len(), |i| line_start + i);
    let line = &text[line_start..line_end];
    let (name, written) = line.split_once('=')?;
    if line_start + name.len() >= offset {
        return None; // the error is in the key or before the `=`, not in the value
    }
    let name = name.trim();
    if name.is_empty() || name.starts_with('[') || name.starts_with('#') {
        return None;
    }
    let mut table = String::new();
    let mut arrays: std::collections::HashMap<String, usize> = Default::default();
    for header in text[..line_start].lines().map(str::trim) {
        if let Some(array) = header.strip_prefix("[[").and_then(|h| h.split("]]").next()) {
            let array = array.trim().to_owned();
            let n = arrays.entry(array.clone()).or_insert(0);
            table = format!("{array}[{n}]");
            *n += 1;
        } else if let Some(name) = header.strip_prefix('[').and_then(|h| h.split(']').next()) {
            table = name.trim().to_owned();
        }
    }
    let key = if table.is_empty() {
        name.to_owned()
    } else {
        format!("{table}.{name}")
    };
    let written = written.split('#').next().unwrap_or_default().trim();
    let written = if written.len() <= 80 { written } else { "" };
    Some((key, written.to_owned()))
}

/// The text between `prefix` and the next backtick, e.g. the field of "missing field `x`".
fn backticked<'a>(message: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = message.strip_prefix(prefix)?;
    rest.split('`').next()
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}
