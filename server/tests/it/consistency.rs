//! The header log's consistency against real servers: `tally consistency` and `tally verify`
//! on its file (a changed digit anywhere fails), the profile's held header moving forward, and
//! an operator that forks its ledger (two servers with one key and one chain, from one copied
//! data directory) caught as a split view with both headers saved.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use tally_client::{build_request, generate_key, public_key, ReplicaAddress};
use tally_wire::Op;

use crate::envelopes::tally_bin;
use crate::harness::{Operator, Server};

/// Runs `tally --json ARGS` with `profile`: (exit code, stdout as JSON or Null).
fn tally(profile: &Path, args: &[&str]) -> (i32, Value) {
    let out = Command::new(tally_bin())
        .arg("--profile")
        .arg(profile)
        .arg("--json")
        .args(args)
        .output()
        .expect("tally");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), json)
}

/// Writes a profile for `server` next to `base` (same directory, so the same trust store).
fn profile_for(base: &Path, server: &Server, name: &str) -> PathBuf {
    let mut profile = tally_client::Profile::load(base).unwrap();
    profile.replicas = vec![ReplicaAddress {
        id: 1,
        address: server.addr.clone(),
    }];
    let path = base.with_file_name(name);
    std::fs::write(&path, profile.to_toml_string().unwrap()).unwrap();
    path
}

fn deposit(profile: &Path, to: &str, amount: u64) -> (i32, Value) {
    tally(
        profile,
        &["deposit", "--to", to, "--amount", &amount.to_string()],
    )
}

/// Every position of every hex string in the file, changed one at a time, fails `verify`
/// (checked on a sample of positions: the first, a middle and the last digit of each).
fn edits_fail(profile: &Path, file: &Path) {
    let text = std::fs::read_to_string(file).unwrap();
    let json: Value = serde_json::from_str(&text).unwrap();
    let mut hexes: Vec<String> = Vec::new();
    for key in ["from_root", "to_root", "from_header_hex", "to_header_hex"] {
        hexes.push(json[key].as_str().unwrap().to_string());
    }
    for key in ["proof", "from_inclusion", "to_inclusion"] {
        for h in json[key].as_array().unwrap() {
            hexes.push(h.as_str().unwrap().to_string());
        }
    }
    assert!(!json["proof"].as_array().unwrap().is_empty(), "{json}");
    let edited = file.with_extension("edited.json");
    for h in &hexes {
        for at in [0, h.len() / 2, h.len() - 1] {
            let mut changed = h.clone().into_bytes();
            changed[at] = if changed[at] == b'0' { b'1' } else { b'0' };
            let changed = String::from_utf8(changed).unwrap();
            std::fs::write(&edited, text.replacen(h.as_str(), &changed, 1)).unwrap();
            let (code, out) = tally(profile, &["verify", edited.to_str().unwrap()]);
            assert_ne!(
                code, 0,
                "a digit changed at {at} of {h} still verifies: {out}"
            );
        }
    }
}

#[test]
fn consistency_proofs_verify_and_refuse_any_changed_digit() {
    let operator = Operator::new(|c| c.batch.batch_window_ms = 10);
    let server = operator.start();
    let profile = profile_for(&operator.data_dir().join("profile.toml"), &server, "p.toml");
    let alice = hex::encode(public_key(&generate_key()));
    for amount in 1..=6 {
        let (code, out) = deposit(&profile, &alice, amount);
        assert_eq!(code, 0, "{out}");
    }
    let held = operator
        .data_dir()
        .join("trust")
        .join(format!("{}.json", operator.profile.chain_id));
    let held: Value = serde_json::from_str(&std::fs::read_to_string(&held).unwrap()).unwrap();
    let top = held["height"].as_u64().unwrap();
    assert!(
        top >= 6,
        "the held header follows the confirmations: {held}"
    );
    let file = operator.data_dir().join("proof.json");
    let (code, out) = tally(
        &profile,
        &[
            "consistency",
            "--from",
            "3",
            "--to",
            &top.to_string(),
            "--out",
            file.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        (out["from_size"].as_u64(), out["to_size"].as_u64()),
        (Some(3), Some(top))
    );
    let (code, out) = tally(&profile, &["verify", file.to_str().unwrap()]);
    assert_eq!((code, &out["valid"]), (0, &Value::Bool(true)), "{out}");
    edits_fail(&profile, &file);
    let (code, out) = tally(&profile, &["consistency", "--from", "2", "--to", "999"]);
    assert_ne!(code, 0);
    assert_eq!(out["code"], "height_not_applied", "{out}");
}

#[test]
fn a_forked_ledger_is_a_split_view_with_both_headers_saved() {
    let operator = Operator::new(|c| c.batch.batch_window_ms = 10);
    let base = operator.data_dir().join("profile.toml");
    let alice = hex::encode(public_key(&generate_key()));
    let server = operator.start();
    let a = profile_for(&base, &server, "a.toml");
    assert_eq!(deposit(&a, &alice, 5).0, 0);
    server.terminate();
    // The operator copies its data directory and runs both copies: one key, one chain, two
    // histories from here on.
    let fork_dir = operator._dir.path().join("fork");
    copy_dir(operator.data_dir(), &fork_dir);
    let (server, forked) = (
        operator.start(),
        Server::start_replica(&fork_dir.join("config.toml"), &operator.profile, 1),
    );
    let a = profile_for(&base, &server, "a.toml");
    let b = profile_for(&base, &forked, "b.toml");
    assert_eq!(deposit(&a, &alice, 7).0, 0);
    // The fork's next header is at the height the profile holds from the original.
    let (code, out) = deposit(&b, &alice, 9);
    assert_eq!(code, 3, "a split view exits 3: {out}");
    assert_eq!(out["code"], "split_view", "{out}");
    let evidence = evidence_files(operator.data_dir());
    assert_eq!(evidence.len(), 1, "{evidence:?}");
    let saved: Value =
        serde_json::from_str(&std::fs::read_to_string(&evidence[0]).unwrap()).unwrap();
    let headers = saved["headers"].as_array().unwrap();
    assert_eq!(headers.len(), 2, "{saved}");
    assert_eq!(headers[0]["height"], headers[1]["height"], "{saved}");
    assert_ne!(
        headers[0]["signed_header_hex"],
        headers[1]["signed_header_hex"]
    );

    // A newer header of the fork is caught through the consistency proof.
    let rt = crate::harness::runtime();
    rt.block_on(async {
        let client = forked.client().await;
        let key = operator.profile.load_deposit_key().unwrap();
        let chain = operator.profile.chain_id_bytes().unwrap();
        let to = public_key(&generate_key());
        client
            .submit(build_request(&key, chain, Op::Deposit, 77, to, 1))
            .await
            .unwrap();
    });
    let (code, out) = deposit(&b, &alice, 11);
    assert_eq!(
        (code, &out["code"]),
        (3, &Value::from("split_view")),
        "{out}"
    );
    assert_eq!(evidence_files(operator.data_dir()).len(), 2);
    // The original's own next header is still consistent.
    assert_eq!(deposit(&a, &alice, 13).0, 0);
}

fn evidence_files(data: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(data.join("evidence")) {
        Ok(dir) => dir.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}
