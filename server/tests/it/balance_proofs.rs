//! Balance proofs against a real server through the `tally` CLI: `tally prove` of an account
//! with a balance, of one whose funds are held by an open reserve, and of one that does not
//! exist; `tally verify` of each file (a changed digit or figure fails); and the same state map
//! root after a SIGKILL and restart, when the map is rebuilt from the rows on disk.

use std::path::Path;

use serde_json::Value;
use tally_client::{generate_key, public_key, write_key};

use crate::harness::{cli, Operator};

fn ok(profile: &Path, args: &[&str]) -> Value {
    let (code, out) = cli(profile, args);
    assert_eq!(code, 0, "tally {args:?}: {out}");
    out
}

/// `tally prove PK --out FILE`, then `tally verify FILE`: both succeed and agree.
fn prove(profile: &Path, account: &str, file: &Path) -> Value {
    let proved = ok(
        profile,
        &["prove", account, "--out", file.to_str().unwrap()],
    );
    let verified = ok(profile, &["verify", file.to_str().unwrap()]);
    assert_eq!(verified["kind"], "balance", "{verified}");
    for key in ["account", "exists", "balance", "height"] {
        assert_eq!(proved[key], verified[key], "{key}: {proved} / {verified}");
    }
    proved
}

/// One digit of every hash (first, middle, last) and each figure, changed one at a time: every
/// edited copy fails `tally verify`.
fn edits_fail(profile: &Path, file: &Path) {
    let text = std::fs::read_to_string(file).unwrap();
    let json: Value = serde_json::from_str(&text).unwrap();
    let mut hexes: Vec<String> = ["map_root", "header_hex", "account"]
        .iter()
        .map(|k| json[k].as_str().unwrap().to_string())
        .collect();
    for s in json["siblings"].as_array().unwrap() {
        hexes.push(s.as_str().unwrap().to_string());
    }
    if let Some(n) = json["neighbor"].as_object() {
        hexes.push(n["path"].as_str().unwrap().to_string());
        hexes.push(n["value_hash"].as_str().unwrap().to_string());
    }
    let edited = file.with_extension("edited.json");
    let refused = |edited_text: String, what: &str| {
        std::fs::write(&edited, edited_text).unwrap();
        let (code, out) = cli(profile, &["verify", edited.to_str().unwrap()]);
        assert_ne!(code, 0, "{what} still verifies: {out}");
    };
    for h in &hexes {
        for at in [0, h.len() / 2, h.len() - 1] {
            let mut changed = h.clone().into_bytes();
            changed[at] = if changed[at] == b'0' { b'1' } else { b'0' };
            let changed = String::from_utf8(changed).unwrap();
            refused(text.replacen(h.as_str(), &changed, 1), "a changed digit");
        }
    }
    for key in ["balance", "height", "account_count", "total_deposited"] {
        let mut j = json.clone();
        j[key] = Value::from(j[key].as_u64().unwrap() + 1);
        refused(serde_json::to_string_pretty(&j).unwrap(), key);
    }
    let mut j = json.clone();
    j["exists"] = Value::Bool(!j["exists"].as_bool().unwrap());
    refused(serde_json::to_string_pretty(&j).unwrap(), "exists");
}

#[test]
fn balances_are_proved_against_the_signed_header_and_survive_a_restart() {
    let operator = Operator::new(|c| c.batch.batch_window_ms = 10);
    let server = operator.start();
    let dir = operator.data_dir();
    let profile = dir.join("p.toml");
    let write_profile = |server: &crate::harness::Server| {
        std::fs::write(&profile, server.profile.to_toml_string().unwrap()).unwrap()
    };
    write_profile(&server);
    let alice_key = generate_key();
    let key_path = dir.join("alice.key");
    write_key(&key_path, &alice_key).unwrap();
    let alice = hex::encode(public_key(&alice_key));
    let bob = hex::encode(public_key(&generate_key()));
    let nobody = hex::encode(public_key(&generate_key()));
    let key = key_path.to_str().unwrap();
    ok(&profile, &["deposit", "--to", &alice, "--amount", "1000"]);
    ok(
        &profile,
        &["transfer", "--key", key, "--to", &bob, "--amount", "250"],
    );
    let reserve = [
        "reserve",
        "--key",
        key,
        "--to",
        &bob,
        "--amount",
        "100",
        "--expires-in-ms",
        "3600000",
        "--id",
        "77",
    ];
    ok(&profile, &reserve);

    let (a, b, n) = (dir.join("a.json"), dir.join("b.json"), dir.join("n.json"));
    let pa = prove(&profile, &alice, &a);
    assert_eq!(
        (&pa["exists"], &pa["balance"]),
        (&Value::Bool(true), &Value::from(650))
    );
    let pb = prove(&profile, &bob, &b);
    assert_eq!(pb["balance"], 250, "{pb}");
    let pn = prove(&profile, &nobody, &n);
    assert_eq!(
        (&pn["exists"], &pn["balance"]),
        (&Value::Bool(false), &Value::from(0))
    );
    let account = ok(&profile, &["account", &alice]);
    assert_eq!(account["balance"], pa["balance"], "{account}");
    assert_eq!(pa["map_root"], pn["map_root"]);
    edits_fail(&profile, &a);
    edits_fail(&profile, &n);

    // Restarted after a SIGKILL, the server rebuilds the map from its rows: same root.
    server.kill();
    let server = operator.start();
    write_profile(&server);
    let again = prove(&profile, &alice, &dir.join("a2.json"));
    assert_eq!(
        (&again["map_root"], &again["height"]),
        (&pa["map_root"], &pa["height"]),
        "{again}"
    );
    // A later batch changes the root, and the proof follows it.
    ok(&profile, &["deposit", "--to", &nobody, "--amount", "5"]);
    let later = prove(&profile, &nobody, &n);
    assert_eq!(
        (&later["exists"], &later["balance"]),
        (&Value::Bool(true), &Value::from(5))
    );
    assert_ne!(later["map_root"], pa["map_root"]);
}
