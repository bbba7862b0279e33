//! Data-driven validation cases: each config fragment, laid over a valid minimal config, must
//! produce errors naming exactly the expected keys.

use crate::{errors, minimal, threshold_with, valid_with, CHAIN_ID, DEPOSIT_KEY};

/// Parses and validates `text` and checks that the errors name exactly `expected_keys` (in any
/// order), and that each error's message starts with its key.
fn check(text: &str, expected_keys: &[&str]) {
    let errors = errors(text);
    let mut keys = errors.keys();
    keys.sort_unstable();
    let mut expected = expected_keys.to_vec();
    expected.sort_unstable();
    assert_eq!(keys, expected, "config:\n{text}\nerrors:\n{errors}");
    for error in &errors.0 {
        assert!(error.to_string().starts_with(&error.key), "{error}");
    }
}

/// (fragment laid over `minimal()`, keys of the expected errors)
const CASES: &[(&str, &[&str])] = &[
    // Valid variations.
    ("", &[]),
    ("[listen]\nclient = \"127.0.0.1:0\"\npeer = \"127.0.0.1:0\"\nmetrics = \"127.0.0.1:0\"", &[]),
    ("[listen]\nclient = \"0.0.0.0:7400\"\nmetrics = \"[::1]:7600\"", &[]),
    (
        "[node]\nid = 1\n\
         [[peers]]\nid = 2\naddress = \"127.0.0.1:7501\"\nclient_address = \"127.0.0.1:7401\"\n\
         [[peers]]\nid = 3\naddress = \"127.0.0.1:7502\"\nclient_address = \"127.0.0.1:7402\"",
        &[],
    ),
    // Ranges at their bounds are valid.
    (
        "[batch]\nbatch_window_ms = 10000\nbatch_requests_max = 65536\nbatch_in_flight_max = 64\n\
         [workers]\nstateless = 256\nsnapshot = 256\n\
         [limits]\nframe_bytes_max = 16777216\n\
         [raft]\nelection_ticks = 2\nheartbeat_ticks = 1\nsnapshot_chunk_bytes = 16777216\n\
         max_message_bytes = 40000000",
        &[],
    ),
    // The largest batch must fit in half a raft message.
    (
        "[batch]\nbatch_requests_max = 65536",
        &["raft.max_message_bytes"],
    ),
    // [node]
    ("[node]\nid = 0", &["node.id"]),
    ("[node]\ndata_dir = \"\"", &["node.data_dir"]),
    ("[node]\nchain_id = \"abcd\"", &["node.chain_id"]),
    ("[node]\nchain_id = \"zz112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\"", &["node.chain_id"]),
    ("[node]\nchain_id = 7", &["node.chain_id"]),
    ("[node]\nid = -1", &["node.id"]),
    ("[node]\nname = \"a\"", &["node.name"]),
    // [listen]
    ("[listen]\npeer = \"127.0.0.1:7400\"", &["listen.peer"]),
    ("[listen]\nmetrics = \"0.0.0.0:7400\"", &["listen.metrics"]),
    ("[listen]\nclient = \"[::]:7500\"", &["listen.peer"]),
    ("[listen]\nclient = \"localhost:7400\"", &["listen.client"]),
    ("[listen]\nclient = \"127.0.0.1\"", &["listen.client"]),
    // [tls] and [operator]
    ("[tls]\ncert = \"\"", &["tls.cert"]),
    ("[tls]\nca = \"ca.pem\"", &["tls.ca"]),
    ("[operator]\nsigning_key = \"\"", &["operator.signing_key"]),
    // A whole key and a share of one: which signs?
    ("[operator]\nsigning_key_share = \"node1.share\"", &["operator.signing_key_share"]),
    ("[operator]\ndeposit_keys = []", &["operator.deposit_keys"]),
    ("[operator]\ndeposit_keys = [\"abcd\"]", &["operator.deposit_keys[0]"]),
    ("[operator]\ndeposit_keys = [\"0x00112233445566778899aabbccddeeff00112233445566778899aabbccddee\"]", &["operator.deposit_keys[0]"]),
    ("[operator]\ndeposit_keys = \"abcd\"", &["operator.deposit_keys"]),
    ("[operator]\ndeposit_keys = [1]", &["operator.deposit_keys[0]"]),
    // [[peers]]
    ("[[peers]]\nid = 1\naddress = \"10.0.0.2:7500\"\nclient_address = \"10.0.0.2:7400\"", &["peers[0].id"]),
    ("[[peers]]\nid = 0\naddress = \"10.0.0.2:7500\"\nclient_address = \"10.0.0.2:7400\"", &["peers[0].id"]),
    (
        "[[peers]]\nid = 2\naddress = \"10.0.0.2:7500\"\nclient_address = \"10.0.0.2:7400\"\n\
         [[peers]]\nid = 2\naddress = \"10.0.0.3:7500\"\nclient_address = \"10.0.0.3:7400\"",
        &["peers[1].id"],
    ),
    ("[[peers]]\nid = 2\naddress = \"127.0.0.1:7500\"\nclient_address = \"10.0.0.2:7400\"", &["peers[0].address"]),
    ("[[peers]]\nid = 2\naddress = \"10.0.0.2:7400\"\nclient_address = \"10.0.0.2:7400\"", &["peers[0].client_address"]),
    (
        "[[peers]]\nid = 2\naddress = \"10.0.0.2:7500\"\nclient_address = \"10.0.0.2:7400\"\n\
         [[peers]]\nid = 3\naddress = \"10.0.0.2:7500\"\nclient_address = \"10.0.0.3:7400\"",
        &["peers[1].address"],
    ),
    ("[[peers]]\nid = 2\naddress = \"10.0.0.2:0\"\nclient_address = \"10.0.0.2:7400\"", &["peers[0].address"]),
    ("[[peers]]\nid = 2\naddress = \"10.0.0.2:7500\"", &["peers[0].client_address"]),
    ("[[peers]]\nid = 2\naddress = \"10.0.0.2:7500\"\nclient_address = \"10.0.0.2:7400\"\nname = \"b\"", &["peers[0].name"]),
    (
        "[[peers]]\nid = 2\naddress = \"10.0.0.2:7500\"\nclient_address = \"10.0.0.2:7400\"\n\
         [[peers]]\nid = -3\naddress = \"10.0.0.3:7500\"\nclient_address = \"10.0.0.3:7400\"",
        &["peers[1].id"],
    ),
    // [cluster]
    ("[cluster]\nadmin_keys = []", &[]),
    ("[cluster]\ninitial_voters = [1, 2, 3]", &[]),
    ("[cluster]\ninitial_voters = [2, 3]", &[]),
    ("[cluster]\ninitial_voters = []", &["cluster.initial_voters"]),
    ("[cluster]\ninitial_voters = [0, 2]", &["cluster.initial_voters[0]"]),
    ("[cluster]\ninitial_voters = [1, 2, 1]", &["cluster.initial_voters[2]"]),
    ("[cluster]\ninitial_voters = [-1]", &["cluster.initial_voters[0]"]),
    ("[cluster]\ninitial_voters = 3", &["cluster.initial_voters"]),
    ("[cluster]\nadmin_keys = [\"abcd\"]", &["cluster.admin_keys[0]"]),
    ("[cluster]\nadmin_keys = \"abcd\"", &["cluster.admin_keys"]),
    ("[cluster]\nadmin_key = []", &["cluster.admin_key"]),
    // The identity point (small order) and a non-canonical encoding (y >= p) cannot sign.
    ("[cluster]\nadmin_keys = [\"0100000000000000000000000000000000000000000000000000000000000000\"]", &["cluster.admin_keys[0]"]),
    ("[cluster]\nadmin_keys = [\"edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f\"]", &["cluster.admin_keys[0]"]),
    // [batch]
    ("[batch]\nbatch_window_ms = 0", &["batch.batch_window_ms"]),
    ("[batch]\nbatch_window_ms = 10001", &["batch.batch_window_ms"]),
    ("[batch]\nbatch_window_ms = \"100ms\"", &["batch.batch_window_ms"]),
    ("[batch]\nbatch_requests_max = 0", &["batch.batch_requests_max"]),
    (
        "[batch]\nbatch_requests_max = 65537\n[raft]\nmax_message_bytes = 40000000",
        &["batch.batch_requests_max"],
    ),
    ("[batch]\nbatch_in_flight_max = 0", &["batch.batch_in_flight_max"]),
    ("[batch]\nbatch_in_flight_max = 65", &["batch.batch_in_flight_max"]),
    ("[batch]\nbatch_windw_ms = 100", &["batch.batch_windw_ms"]),
    // [workers] and [cache]
    ("[workers]\nstateless = 0", &["workers.stateless"]),
    ("[workers]\nstateless = 257", &["workers.stateless"]),
    ("[workers]\nsnapshot = 0", &["workers.snapshot"]),
    ("[workers]\nsnapshot = 1000", &["workers.snapshot"]),
    ("[cache]\naccounts_max = 0", &["cache.accounts_max"]),
    // [limits]
    ("[limits]\nframe_bytes_max = 16777217", &["limits.frame_bytes_max"]),
    ("[limits]\nframe_bytes_max = 4294967296", &["limits.frame_bytes_max"]),
    // A frame cap under the default chunk size breaks the relation too.
    ("[limits]\nframe_bytes_max = 1023", &["limits.frame_bytes_max", "raft.snapshot_chunk_bytes"]),
    ("[limits]\nconnections_max = 0", &["limits.connections_max"]),
    ("[limits]\nrequests_in_flight_per_connection_max = 0", &["limits.requests_in_flight_per_connection_max"]),
    ("[limits]\nqueue_depth_max = 0", &["limits.queue_depth_max"]),
    ("[limits]\nhandshake_timeout_ms = 0", &["limits.handshake_timeout_ms"]),
    ("[limits]\nframe_timeout_ms = 0", &["limits.frame_timeout_ms"]),
    ("[limits]\nidle_timeout_ms = 0", &["limits.idle_timeout_ms"]),
    ("[limits]\nfirst_request_timeout_ms = 0", &["limits.first_request_timeout_ms"]),
    ("[limits]\nwrite_timeout_ms = 0", &["limits.write_timeout_ms"]),
    ("[limits]\nconnections_per_address_max = 0", &["limits.connections_per_address_max"]),
    ("[limits]\nconnections_max = 8\nconnections_per_address_max = 64", &[]),
    ("[limits]\npeer_connections_max = 0", &["limits.peer_connections_max"]),
    ("[limits]\nhandshakes_per_address_per_second = 0", &["limits.handshakes_per_address_per_second"]),
    // A connection's reply budget holds the largest reply (263 KiB); the server's holds one
    // connection's.
    ("[limits]\nreply_bytes_per_connection_max = 1048575", &["limits.reply_bytes_per_connection_max"]),
    ("[limits]\nreply_bytes_per_connection_max = 1048576\nreply_bytes_total_max = 1048596", &[]),
    ("[limits]\nreply_bytes_total_max = 16777215", &["limits.reply_bytes_total_max"]),
    // A large frame takes its bytes from the server's budget while it arrives.
    ("[limits]\nframe_bytes_max = 16777216\nreply_bytes_total_max = 16777216", &["limits.reply_bytes_total_max"]),
    // [raft]
    ("[raft]\ntick_ms = 0", &["raft.tick_ms"]),
    ("[raft]\nelection_ticks = 2", &["raft.election_ticks"]),
    ("[raft]\nelection_ticks = 1", &["raft.election_ticks"]),
    ("[raft]\nheartbeat_ticks = 10", &["raft.election_ticks"]),
    ("[raft]\nheartbeat_ticks = 0", &["raft.heartbeat_ticks"]),
    ("[raft]\ncompaction_entries = 0", &["raft.compaction_entries"]),
    ("[raft]\nsnapshot_chunk_bytes = 0", &["raft.snapshot_chunk_bytes"]),
    ("[raft]\nsnapshot_chunk_bytes = 1048577", &["raft.snapshot_chunk_bytes"]),
    ("[limits]\nframe_bytes_max = 4096\n[raft]\nsnapshot_chunk_bytes = 4096", &[]),
    ("[raft]\nmax_message_bytes = 0", &["raft.max_message_bytes"]),
    // [log] and unknown sections
    ("[log]\nlevel = \"\"", &["log.level"]),
    ("[log]\nlevel = \"  \"", &["log.level"]),
    ("[log]\nlevel = \"infoo\"", &["log.level"]),
    ("[log]\nlevel = \"tally_core=verbose,info\"", &["log.level"]),
    ("[log]\nlevel = \"tally_core=debug,WARN\"", &[]),
    ("[logging]\nlevel = \"info\"", &["logging"]),
    ("debug = true", &["debug"]),
    // Several problems are all reported.
    ("[node]\nid = 0\n[batch]\nbatch_window_ms = 0\n[raft]\nelection_ticks = 1", &["node.id", "batch.batch_window_ms", "raft.election_ticks"]),
    (
        "[node]\nchain_id = \"\"\n[operator]\ndeposit_keys = [\"\", \"x\"]\n\
         [listen]\nmetrics = \"127.0.0.1:7500\"\n[tls]\nkey = \"\"",
        &["node.chain_id", "listen.metrics", "tls.key", "operator.deposit_keys[0]", "operator.deposit_keys[1]"],
    ),
];

#[test]
fn cases() {
    for (fragment, expected_keys) in CASES {
        check(&valid_with(fragment), expected_keys);
    }
}

/// (fragment laid over `threshold_minimal()`, keys of the expected errors): what threshold
/// mode refuses until it signs more than headers.
const THRESHOLD_CASES: &[(&str, &[&str])] = &[
    ("", &[]),
    ("[explorer]\nenabled = false\n[archive]\nurl = \"\"", &[]),
    ("[operator]\nsigning_key_share = \"\"", &["operator.signing_key_share"]),
    ("[operator]\nsigning_key = \"operator.key\"", &["operator.signing_key_share"]),
    ("[operator]\nnext_signing_key = \"next.key\"", &["operator.next_signing_key"]),
    (
        "[operator]\ngenesis_public_key = \"d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a\"",
        &[],
    ),
    // A threshold operator archives too (PROTOCOL.md §15.10).
    ("[archive]\nurl = \"archive\"", &[]),
    ("[archive]\nurl = \"s3://bucket/prefix\"", &[]),
    // Checkpoints are threshold-signed: witnesses and the explorer work.
    (
        "[[witnesses]]\nurl = \"http://127.0.0.1:7700\"\npublic_key = \"d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a\"",
        &[],
    ),
    ("[explorer]\nenabled = true", &[]),
    ("peers = []", &["operator.signing_key_share"]),
    // Every refusal at once.
    (
        "peers = []\n[explorer]\nenabled = true\n[archive]\nurl = \"archive\"\n\
         [operator]\nnext_signing_key = \"next.key\"",
        &["operator.signing_key_share", "operator.next_signing_key"],
    ),
];

#[test]
fn threshold_cases() {
    for (fragment, expected_keys) in THRESHOLD_CASES {
        check(&threshold_with(fragment), expected_keys);
    }
}

/// The first error of `text`, displayed.
fn first_error(text: &str) -> String {
    let errors = errors(text);
    assert_eq!(errors.0.len(), 1, "{errors}");
    errors.0[0].to_string()
}

#[test]
fn signing_key_and_its_share_are_one_or_the_other() {
    let neither = minimal().replace("signing_key = \"operator.key\"\n", "");
    assert!(!neither.contains("signing_key"));
    let message = first_error(&neither);
    assert!(
        message.starts_with("operator.signing_key: set exactly one of operator.signing_key"),
        "{message}"
    );
    assert!(message.contains("operator.signing_key_share"), "{message}");
    let both = first_error(&valid_with(
        "[operator]\nsigning_key_share = \"node1.share\"",
    ));
    assert!(
        both.starts_with("operator.signing_key_share = \"node1.share\": set exactly one of"),
        "{both}"
    );
    assert!(both.contains("operator.signing_key is set too"), "{both}");
}

#[test]
fn threshold_refusals_say_why() {
    for (fragment, why) in [
        (
            "[operator]\nnext_signing_key = \"n.key\"",
            "a threshold group rotates to another group",
        ),
        ("peers = []", "a single-node operator keeps a plain key"),
    ] {
        let message = first_error(&threshold_with(fragment));
        assert!(message.contains(why), "{fragment}: {message}");
        if fragment != "peers = []" {
            assert!(
                message.contains("not with operator.signing_key_share"),
                "{message}"
            );
        }
    }
}

#[test]
fn a_next_group_share_is_only_for_a_threshold_replica() {
    let whole = first_error(&valid_with(
        "[operator]\nnext_signing_key_share = \"next1.share\"",
    ));
    assert!(
        whole.starts_with("operator.next_signing_key_share = \"next1.share\": only with"),
        "{whole}"
    );
    // A threshold replica ahead of a rotation, or one whose share a rotation introduced.
    let text = threshold_with(
        "[operator]\nnext_signing_key_share = \"next1.share\"\n\
         genesis_public_key = \"d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a\"",
    );
    let config: tally_config::Config = toml::from_str(&text).unwrap();
    config.validate().unwrap();
}

#[test]
fn an_unknown_log_level_names_the_key_and_the_levels() {
    let errors = errors(&valid_with("[log]\nlevel = \"verbose\""));
    assert_eq!(
        errors.to_string(),
        "log.level = \"verbose\": unknown level `verbose` in `verbose`: use one of trace, \
         debug, info, warn, error, off, or TARGET=LEVEL"
    );
}

#[test]
fn duplicate_deposit_keys_are_rejected_whatever_their_case() {
    let upper = DEPOSIT_KEY.to_uppercase();
    let fragment = format!("[operator]\ndeposit_keys = [\"{DEPOSIT_KEY}\", \"{upper}\"]");
    check(&valid_with(&fragment), &["operator.deposit_keys[1]"]);
}

#[test]
fn missing_chain_id_is_rejected() {
    let text = minimal().replace(&format!("chain_id = \"{CHAIN_ID}\""), "");
    assert!(!text.contains("chain_id"));
    check(&text, &["node.chain_id"]);
}

#[test]
fn missing_node_section_is_rejected() {
    let text = minimal().replace(&format!("[node]\nchain_id = \"{CHAIN_ID}\""), "");
    check(&text, &["node"]);
}

#[test]
fn missing_tls_and_operator_sections_are_reported_by_validate() {
    let text = format!("[node]\nchain_id = \"{CHAIN_ID}\"\n");
    check(&text, &["tls", "operator"]);
}

#[test]
fn operator_without_deposit_keys_is_reported_by_validate() {
    let text = format!("[node]\nchain_id = \"{CHAIN_ID}\"\n[operator]\nsigning_key = \"k\"\n");
    check(&text, &["tls", "operator.deposit_keys"]);
}

/// RFC 8032's test keys 2 and 3: public keys that can sign.
const ADMIN_KEY_2: &str = "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c";
const ADMIN_KEY_3: &str = "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025";

#[test]
fn admin_keys_are_signing_keys_without_duplicates() {
    check(
        &valid_with(&format!(
            "[cluster]\nadmin_keys = [\"{ADMIN_KEY_2}\", \"{ADMIN_KEY_3}\", \"{DEPOSIT_KEY}\"]"
        )),
        &[],
    );
    let upper = ADMIN_KEY_2.to_uppercase();
    check(
        &valid_with(&format!(
            "[cluster]\nadmin_keys = [\"{ADMIN_KEY_2}\", \"{ADMIN_KEY_3}\", \"{upper}\"]"
        )),
        &["cluster.admin_keys[2]"],
    );
    let errors = errors(&valid_with(
        "[cluster]\nadmin_keys = [\"0100000000000000000000000000000000000000000000000000000000000000\"]",
    ));
    assert!(
        errors
            .to_string()
            .contains("not an Ed25519 public key that can sign"),
        "{errors}"
    );
}
