//! Parsing, serializing, paths and accessors.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tally_config::{Config, PeerConfig};

use crate::{errors, minimal, valid_with, CHAIN_ID, DEPOSIT_KEY};

#[test]
fn minimal_config_takes_every_default() {
    let config = Config::from_toml_str(&minimal()).unwrap();
    let mut expected = Config::dev_default(PathBuf::from("./tally-data"), [0; 32]);
    expected.node.chain_id = CHAIN_ID.to_owned();
    expected.tls.as_mut().unwrap().ca_cert = "ca.pem".into();
    expected.tls.as_mut().unwrap().cert = "node.pem".into();
    expected.tls.as_mut().unwrap().key = "node.key".into();
    let operator = expected.operator.as_mut().unwrap();
    operator.signing_key = Some("operator.key".into());
    operator.deposit_keys = vec![DEPOSIT_KEY.to_owned()];
    // Only the development operator archives by default; a written config says where.
    expected.archive = tally_config::ArchiveConfig::default();
    assert!(!config.archive.enabled());
    assert_eq!(config, expected);
    config.validate().unwrap();
}

#[test]
fn round_trip_gives_an_equal_config() {
    let mut config = Config::dev_default(PathBuf::from("/var/lib/tally"), [9; 32]);
    config.operator.as_mut().unwrap().deposit_keys = vec![DEPOSIT_KEY.to_owned(), "ab".repeat(32)];
    config.peers = vec![
        PeerConfig {
            id: 2,
            address: "10.0.0.2:7500".parse().unwrap(),
            client_address: "10.0.0.2:7400".parse().unwrap(),
        },
        PeerConfig {
            id: 3,
            address: "[fd00::3]:7500".parse().unwrap(),
            client_address: "[fd00::3]:7400".parse().unwrap(),
        },
    ];
    config.batch.batch_window_ms = 25;
    config.raft.election_ticks = 20;
    config.log.level = "tally_core=debug,info".to_owned();
    config.cluster.admin_keys = vec![DEPOSIT_KEY.to_owned()];
    config.cluster.initial_voters = Some(vec![1, 2, 3]);
    config.validate().unwrap();

    let text = config.to_toml_string();
    assert_eq!(Config::from_toml_str(&text).unwrap(), config, "{text}");
}

#[test]
fn round_trip_keeps_absent_optional_sections_absent() {
    let mut config = Config::from_toml_str(&minimal()).unwrap();
    config.tls = None;
    config.operator = None;
    let text = config.to_toml_string();
    assert_eq!(Config::from_toml_str(&text).unwrap(), config, "{text}");
}

#[test]
fn parse_errors_name_the_key_and_keep_line_and_column() {
    let text = "[node]\nchain_id = \"x\"\n\n[batch]\nbatch_window_ms = \"soon\"\n";
    let errors = Config::from_toml_str(text).unwrap_err();
    assert_eq!(errors.0.len(), 1);
    let error = &errors.0[0];
    assert_eq!(error.key, "batch.batch_window_ms");
    assert_eq!(error.value, "\"soon\"");
    assert!(error.problem.contains("line 5, column 19"), "{error}");
    assert!(error
        .to_string()
        .starts_with("batch.batch_window_ms = \"soon\": "));
}

#[test]
fn unknown_key_is_named_with_its_section() {
    let errors = errors(&valid_with("[limits]\nframe_byte_max = 10"));
    assert_eq!(errors.keys(), ["limits.frame_byte_max"]);
    let message = errors.to_string();
    assert!(
        message.starts_with("limits.frame_byte_max: unknown field"),
        "{message}"
    );
    assert!(
        message.contains("`frame_bytes_max`"),
        "suggests the known keys: {message}"
    );
}

#[test]
fn missing_key_is_named_in_full() {
    let errors = Config::from_toml_str("[node]\nid = 1\n").unwrap_err();
    assert_eq!(errors.keys(), ["node.chain_id"]);
    assert!(
        errors.to_string().contains("missing field `chain_id`"),
        "{errors}"
    );
}

#[test]
fn integers_beyond_64_bits_name_their_key() {
    let check = |fragment: &str, key: &str, value: &str| {
        let text = format!("{}\n{fragment}\n", minimal());
        let errors = Config::from_toml_str(&text).unwrap_err();
        assert_eq!(errors.keys(), [key], "{errors}");
        let message = errors.to_string();
        assert!(
            message.starts_with(&format!("{key} = {value}: ")),
            "{message}"
        );
        assert!(message.contains("at most 9223372036854775807"), "{message}");
        assert!(message.contains("line "), "{message}");
    };
    check(
        "[raft]\ntick_ms = 99999999999999999999",
        "raft.tick_ms",
        "99999999999999999999",
    );
    check(
        "[batch]\nbatch_window_ms = 5\nbatch_requests_max = 18446744073709551616 # comment",
        "batch.batch_requests_max",
        "18446744073709551616",
    );
    check(
        "[[peers]]\nid = 2\naddress = \"127.0.0.1:1\"\nclient_address = \"127.0.0.1:2\"\n\
         [[peers]]\nid = 99999999999999999999",
        "peers[1].id",
        "99999999999999999999",
    );
}

#[test]
fn syntax_errors_have_a_location_but_no_key() {
    let errors = Config::from_toml_str("[node\nid = 1\n").unwrap_err();
    assert_eq!(errors.keys(), [""]);
    let message = errors.to_string();
    assert!(message.contains("line 1, column 6"), "{message}");
    assert!(!message.contains('\n'), "one error, one line: {message}");
}

#[test]
fn display_is_key_value_problem() {
    let errors = errors(&valid_with("[raft]\nelection_ticks = 2"));
    assert_eq!(
        errors.to_string(),
        "raft.election_ticks = 2: must be greater than raft.heartbeat_ticks (2)"
    );
}

#[test]
fn display_lists_one_error_per_line() {
    let errors = errors(&valid_with("[node]\nid = 0\n[workers]\nstateless = 0"));
    let message = errors.to_string();
    let lines: Vec<&str> = message.lines().collect();
    assert_eq!(
        lines,
        [
            "node.id = 0: must be at least 1",
            "workers.stateless = 0: must be in 1..=256"
        ]
    );
}

#[test]
fn resolve_paths_anchors_relative_paths_at_the_config_dir() {
    let text = valid_with(
        "[node]\ndata_dir = \"./tally-data\"\n\
         [tls]\nca_cert = \"/etc/ssl/ca.pem\"\ncert = \"certs/node.pem\"\n\
         [operator]\nsigning_key = \"../keys/operator.key\"\n\
         next_signing_key = \"next.key\"",
    );
    let mut config = Config::from_toml_str(&text).unwrap();
    config.resolve_paths(Path::new("/etc/tally"));
    assert_eq!(config.node.data_dir, Path::new("/etc/tally/tally-data"));
    let tls = config.tls.as_ref().unwrap();
    assert_eq!(
        tls.ca_cert,
        Path::new("/etc/ssl/ca.pem"),
        "absolute paths stay"
    );
    assert_eq!(tls.cert, Path::new("/etc/tally/certs/node.pem"));
    assert_eq!(tls.key, Path::new("/etc/tally/node.key"));
    let operator = config.operator.as_ref().unwrap();
    let signing_key = operator.signing_key.as_deref();
    assert_eq!(
        signing_key,
        Some(Path::new("/etc/tally/../keys/operator.key"))
    );
    let next = operator.next_signing_key.as_deref();
    assert_eq!(next, Some(Path::new("/etc/tally/next.key")));

    // A key share, like the whole key it stands for.
    let mut config = Config::from_toml_str(&crate::threshold_minimal()).unwrap();
    config.resolve_paths(Path::new("/etc/tally"));
    let operator = config.operator.as_ref().unwrap();
    assert_eq!(operator.signing_key, None);
    let share = operator.signing_key_share.as_deref();
    assert_eq!(share, Some(Path::new("/etc/tally/node1.share")));
    config.validate().unwrap();
}

#[test]
fn a_key_share_round_trips_without_a_signing_key() {
    let config = Config::from_toml_str(&crate::threshold_minimal()).unwrap();
    let text = config.to_toml_string();
    assert!(
        text.contains("signing_key_share = \"node1.share\""),
        "{text}"
    );
    assert!(!text.contains("signing_key ="), "{text}");
    assert_eq!(Config::from_toml_str(&text).unwrap(), config, "{text}");
}

#[test]
fn resolve_paths_leaves_empty_paths_for_validate_to_report() {
    let mut config = Config::from_toml_str(&valid_with("[tls]\nkey = \"\"")).unwrap();
    config.resolve_paths(Path::new("/etc/tally"));
    assert_eq!(config.validate().unwrap_err().keys(), ["tls.key"]);
}

#[test]
fn dev_default_lives_in_its_data_dir_and_needs_a_deposit_key() {
    let mut config = Config::dev_default(PathBuf::from("data"), [0xab; 32]);
    let tls = config.tls.as_ref().unwrap();
    assert_eq!(tls.ca_cert, Path::new("data/ca.pem"));
    assert_eq!(tls.cert, Path::new("data/node.pem"));
    assert_eq!(tls.key, Path::new("data/node.key"));
    let operator = config.operator.as_mut().unwrap();
    assert_eq!(
        operator.signing_key.as_deref(),
        Some(Path::new("data/operator.key"))
    );
    assert_eq!(operator.signing_key_share, None);
    assert!(operator.deposit_keys.is_empty());
    assert_eq!(
        config.validate().unwrap_err().keys(),
        ["operator.deposit_keys"]
    );

    config
        .operator
        .as_mut()
        .unwrap()
        .deposit_keys
        .push(DEPOSIT_KEY.to_owned());
    config.validate().unwrap();
    assert_eq!(config.chain_id_bytes(), [0xab; 32]);
}

#[test]
fn typed_accessors() {
    let text = valid_with(
        "[operator]\ndeposit_keys = [\"01\", \"02\"]\n\
         [batch]\nbatch_window_ms = 250\n\
         [limits]\nhandshake_timeout_ms = 1\nframe_timeout_ms = 2\nidle_timeout_ms = 3\n\
         [raft]\ntick_ms = 50\n\
         [[peers]]\nid = 7\naddress = \"10.0.0.7:7500\"\nclient_address = \"10.0.0.7:7400\"\n\
         [[peers]]\nid = 3\naddress = \"10.0.0.3:7500\"\nclient_address = \"10.0.0.3:7400\"",
    )
    .replace("\"01\"", &format!("\"{}\"", "01".repeat(32)))
    .replace("\"02\"", &format!("\"{}\"", "02".repeat(32)));
    let config = Config::from_toml_str(&text).unwrap();
    config.validate().unwrap();

    let mut chain_id = [0; 32];
    hex::decode_to_slice(CHAIN_ID, &mut chain_id).unwrap();
    assert_eq!(config.chain_id_bytes(), chain_id);
    assert_eq!(config.deposit_keys_bytes(), [[1; 32], [2; 32]]);
    assert_eq!(config.batch.batch_window(), Duration::from_millis(250));
    assert_eq!(config.limits.handshake_timeout(), Duration::from_millis(1));
    assert_eq!(config.limits.frame_timeout(), Duration::from_millis(2));
    assert_eq!(config.limits.idle_timeout(), Duration::from_millis(3));
    assert_eq!(config.raft.tick(), Duration::from_millis(50));
    assert_eq!(config.replica_ids(), [1, 3, 7]);
}

#[test]
fn initial_voters_default_to_this_replica_and_its_peers() {
    let peers = "[[peers]]\nid = 7\naddress = \"10.0.0.7:7500\"\nclient_address = \"10.0.0.7:7400\"\n\
                 [[peers]]\nid = 3\naddress = \"10.0.0.3:7500\"\nclient_address = \"10.0.0.3:7400\"";
    let config = Config::from_toml_str(&valid_with(peers)).unwrap();
    config.validate().unwrap();
    assert_eq!(config.cluster.initial_voters, None);
    assert!(config.cluster.admin_keys.is_empty());
    assert!(config.admin_keys_bytes().is_empty());
    assert_eq!(config.initial_voters(), [1, 3, 7]);
    // Absent stays absent when written back, so the default keeps following the peers.
    assert!(!config.to_toml_string().contains("initial_voters"));

    // A replica added later: its voters are the cluster's original ones, not itself.
    let added = valid_with(&format!(
        "[node]\nid = 4\n[cluster]\ninitial_voters = [3, 1, 7]\nadmin_keys = [\"{DEPOSIT_KEY}\"]\n{}",
        peers.replace("id = 7", "id = 1")
    ));
    let config = Config::from_toml_str(&added).unwrap();
    config.validate().unwrap();
    assert_eq!(config.initial_voters(), [1, 3, 7]);
    assert_eq!(config.replica_ids(), [1, 3, 4]);
    let mut key = [0; 32];
    hex::decode_to_slice(DEPOSIT_KEY, &mut key).unwrap();
    assert_eq!(config.admin_keys_bytes(), [key]);
}
