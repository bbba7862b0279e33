//! Keeps docs/CONFIG.md and examples/single-node.toml in step with the schema.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use tally_config::{
    BatchConfig, CacheConfig, Config, LimitsConfig, ListenConfig, LogConfig, PeerConfig,
    RaftConfig, WorkersConfig,
};

const CONFIG_MD: &str = include_str!("../../../docs/CONFIG.md");
const SINGLE_NODE: &str = include_str!("../../examples/single-node.toml");

/// Every key of the schema, dotted (`batch.batch_window_ms`, `peers.address`), taken from the
/// schema itself: a config with every optional part filled in, serialized and walked.
fn schema_keys() -> BTreeSet<String> {
    let mut config = Config::dev_default(PathBuf::from("data"), [0; 32]);
    config
        .operator
        .as_mut()
        .unwrap()
        .deposit_keys
        .push("00".repeat(32));
    // Optional keys are left out of the TOML when unset: set them so the walk sees them.
    let operator = config.operator.as_mut().unwrap();
    operator.next_signing_key = Some(PathBuf::from("next.key"));
    operator.signing_key_share = Some(PathBuf::from("node1.share"));
    operator.next_signing_key_share = Some(PathBuf::from("node1-next.share"));
    operator.genesis_public_key = Some("00".repeat(32));
    config.cluster.admin_keys.push("00".repeat(32));
    config.cluster.initial_voters = Some(vec![1, 2]);
    config.witnesses.push(tally_config::WitnessConfig {
        url: "http://127.0.0.1:7700".into(),
        public_key: "00".repeat(32),
    });
    config.peers.push(PeerConfig {
        id: 2,
        address: "127.0.0.1:7501".parse().unwrap(),
        client_address: "127.0.0.1:7401".parse().unwrap(),
    });
    let value = toml::Value::try_from(&config).unwrap();
    dotted_keys(&value)
}

/// The dotted keys of the leaves of a TOML document. An array of tables contributes the keys
/// of its tables without an index (`peers.id`); any other array is a leaf.
fn dotted_keys(value: &toml::Value) -> BTreeSet<String> {
    fn walk(prefix: &str, value: &toml::Value, keys: &mut BTreeSet<String>) {
        let join = |key: &str| {
            if prefix.is_empty() {
                key.to_owned()
            } else {
                format!("{prefix}.{key}")
            }
        };
        match value {
            toml::Value::Table(table) => {
                for (key, value) in table {
                    walk(&join(key), value, keys);
                }
            }
            toml::Value::Array(items)
                if items.iter().all(toml::Value::is_table) && !items.is_empty() =>
            {
                for item in items {
                    walk(prefix, item, keys);
                }
            }
            _ => {
                keys.insert(prefix.to_owned());
            }
        }
    }
    let mut keys = BTreeSet::new();
    walk("", value, &mut keys);
    keys
}

/// The first code span of each row of the doc's key tables (those headed `| Key |`).
fn documented_keys() -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut in_key_table = false;
    for line in CONFIG_MD.lines() {
        if line.starts_with("| Key |") {
            in_key_table = true;
        } else if !line.starts_with('|') {
            in_key_table = false;
        } else if in_key_table {
            if let Some(key) = line.split('`').nth(1) {
                keys.insert(key.to_owned());
            }
        }
    }
    keys
}

#[test]
fn schema_keys_are_found() {
    let keys = schema_keys();
    // Guards the walk itself: a broken walk finding nothing would make the tests below vacuous.
    for key in [
        "node.chain_id",
        "tls.key",
        "operator.deposit_keys",
        "peers.address",
        "batch.batch_window_ms",
        "log.level",
        "cluster.admin_keys",
        "cluster.initial_voters",
    ] {
        assert!(keys.contains(key), "{key} missing from {keys:?}");
    }
}

#[test]
fn every_schema_key_is_documented() {
    let missing: Vec<String> = schema_keys()
        .into_iter()
        .filter(|key| !CONFIG_MD.contains(&format!("`{key}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/CONFIG.md does not document: {missing:?}"
    );
}

#[test]
fn every_documented_key_exists() {
    let schema = schema_keys();
    let documented = documented_keys();
    assert_eq!(
        documented, schema,
        "docs/CONFIG.md key tables differ from the schema"
    );
}

#[test]
fn example_parses_and_validates() {
    let mut config = Config::from_toml_str(SINGLE_NODE).unwrap();
    config.resolve_paths(&Path::new(env!("CARGO_MANIFEST_DIR")).join("examples"));
    config.validate().unwrap();
    assert!(config.peers.is_empty(), "the example is a single node");
    let text = config.to_toml_string();
    assert_eq!(
        Config::from_toml_str(&text).unwrap(),
        config,
        "round trip:\n{text}"
    );
}

/// `[operator]` keys unset by default: TOML has no null, so the example names them in a comment.
const OPTIONAL_OPERATOR_KEYS: [&str; 4] = [
    "operator.signing_key_share",
    "operator.next_signing_key",
    "operator.next_signing_key_share",
    "operator.genesis_public_key",
];

#[test]
fn example_shows_every_key_at_its_default() {
    let written = dotted_keys(&SINGLE_NODE.parse::<toml::Value>().unwrap());
    let expected: BTreeSet<String> = schema_keys()
        .into_iter()
        .filter(|key| !key.starts_with("peers.") && !key.starts_with("witnesses."))
        .filter(|key| !OPTIONAL_OPERATOR_KEYS.contains(&key.as_str()))
        .collect();
    assert_eq!(written, expected);
    for optional in OPTIONAL_OPERATOR_KEYS {
        let optional = optional.trim_start_matches("operator.");
        assert!(
            SINGLE_NODE.contains(&format!("# {optional} = ")),
            "{optional}"
        );
    }

    let config = Config::from_toml_str(SINGLE_NODE).unwrap();
    let defaults = Config::dev_default(PathBuf::from("./tally-data"), [0; 32]);
    assert_eq!(config.node.id, defaults.node.id);
    assert_eq!(config.node.data_dir, defaults.node.data_dir);
    assert_eq!(config.listen, ListenConfig::default());
    assert_eq!(config.batch, BatchConfig::default());
    assert_eq!(config.workers, WorkersConfig::default());
    assert_eq!(config.cache, CacheConfig::default());
    assert_eq!(config.limits, LimitsConfig::default());
    assert_eq!(config.raft, RaftConfig::default());
    assert_eq!(config.log, LogConfig::default());
    assert_eq!(config.archive, defaults.archive);
    assert_eq!(config.cluster.admin_keys, defaults.cluster.admin_keys);
    assert_eq!(config.initial_voters(), defaults.initial_voters());
}
