//! Operator key rotation (PROTOCOL.md §4.14) on a real server through the `tally` CLI: a
//! confirmation before and after `tally cluster rotate-key`, each verified under the key for
//! its height (the profile keeps the genesis key and learns the chain); the rotation's header
//! is the last the old key signs; the chain survives a restart; a rotation to a key the
//! replica does not hold, or to the key that signs already, is refused by code. Every proof
//! file made after the rotation (plain, envelope, balance, consistency) carries the chain
//! (`key_chain`, PROTOCOL.md §11): it verifies from a profile that has never seen the chain,
//! and fails with one digit of a link changed.

use std::path::Path;

use serde_json::Value;
use tally_client::{generate_key, public_key, write_key};

use crate::harness::{cli, Operator};

fn ok(profile: &Path, args: &[&str]) -> Value {
    let (code, out) = cli(profile, args);
    assert_eq!(code, 0, "tally {args:?}: {out}");
    out
}

fn refused(profile: &Path, args: &[&str], code: &str) {
    let (status, out) = cli(profile, args);
    assert_ne!(status, 0, "tally {args:?} succeeded: {out}");
    assert_eq!(out["code"], code, "tally {args:?}: {out}");
}

#[test]
fn a_rotated_key_signs_every_later_header_and_clients_follow_the_chain() {
    let next = generate_key();
    let operator = Operator::new(|_| {});
    let next_path = operator.data_dir().join("next-operator.key");
    tally_server::bootstrap::write_signing_key(&next_path, &next).unwrap();
    let config_path = operator.data_dir().join("config.toml");
    let text = std::fs::read_to_string(&config_path).unwrap();
    let mut config = tally_config::Config::from_toml_str(&text).unwrap();
    config.operator.as_mut().unwrap().next_signing_key = Some(next_path.clone());
    std::fs::write(&config_path, config.to_toml_string()).unwrap();

    let server = operator.start();
    let dir = operator.data_dir();
    let profile = dir.join("p.toml");
    std::fs::write(&profile, server.profile.to_toml_string().unwrap()).unwrap();
    let genesis = server.profile.operator_key().unwrap();
    let alice = hex::encode(public_key(&generate_key()));
    let (before, after) = (dir.join("before.json"), dir.join("after.json"));
    let file = |p: &Path| p.to_str().unwrap().to_string();
    ok(
        &profile,
        &[
            "deposit",
            "--to",
            &alice,
            "--amount",
            "5",
            "--out",
            &file(&before),
        ],
    );

    // Refused: a key no replica holds, and the key that signs already.
    let stranger = hex::encode(public_key(&generate_key()));
    refused(
        &profile,
        &["cluster", "rotate-key", "--new-public-key", &stranger],
        "rotation_refused",
    );
    let current = hex::encode(genesis);
    refused(
        &profile,
        &["cluster", "rotate-key", "--new-public-key", &current],
        "rotation_refused",
    );

    let new_key = hex::encode(public_key(&next));
    let rotated = ok(
        &profile,
        &["cluster", "rotate-key", "--new-public-key", &new_key],
    );
    assert_eq!(
        (&rotated["number"], &rotated["new_key"]),
        (&Value::from(1), &Value::from(new_key.clone()))
    );
    let rotation_height = rotated["height"].as_u64().unwrap();
    // The profile's directory now holds the chain.
    assert!(dir.join("key-chain.json").exists());

    let confirmed = ok(
        &profile,
        &[
            "deposit",
            "--to",
            &alice,
            "--amount",
            "7",
            "--out",
            &file(&after),
        ],
    );
    assert!(
        confirmed["header"]["height"].as_u64().unwrap() > rotation_height,
        "{confirmed}"
    );
    for f in [&before, &after] {
        let verified = ok(&profile, &["verify", &file(f)]);
        assert_eq!(verified["valid"], true, "{verified}");
    }
    // The later file names the new key, the earlier one the genesis key.
    let named = |p: &Path| -> Value { read(p)["operator_public_key"].clone() };
    assert_eq!(named(&after), Value::from(new_key.clone()));
    assert_eq!(named(&before), Value::from(current.clone()));
    // The later file carries the chain, the earlier one none (its bytes are as before).
    assert!(read(&before).get("key_chain").is_none());
    assert_eq!(read(&after)["key_chain"].as_array().map(Vec::len), Some(1));
    // Checked under the genesis key alone, the later file verifies through its own chain;
    // without it, it fails.
    ok(
        &profile,
        &["verify", &file(&after), "--operator-key", &current],
    );
    let bare = dir.join("after-bare.json");
    let mut stripped = read(&after);
    stripped.as_object_mut().unwrap().remove("key_chain");
    std::fs::write(&bare, stripped.to_string()).unwrap();
    let (code, _) = cli(
        &profile,
        &["verify", &file(&bare), "--operator-key", &current],
    );
    assert_ne!(code, 0);

    let made = files_after_rotation(&profile, dir, &alice, rotation_height);
    // A fresh profile (no chain saved) verifies every file by the chain it carries; the file
    // without one fails until the profile learns the chain from the cluster.
    let fresh_dir = tempfile::tempdir().unwrap();
    let fresh = fresh_dir.path().join("p.toml");
    std::fs::write(&fresh, server.profile.to_toml_string().unwrap()).unwrap();
    for f in made.iter().chain([&after]) {
        let verified = ok(&fresh, &["verify", &file(f)]);
        assert_eq!(verified["valid"], true, "{verified}");
        assert_one_changed_link_digit_fails(&fresh, f);
    }
    assert!(!fresh_dir.path().join("key-chain.json").exists());
    let (code, out) = cli(&fresh, &["verify", &file(&bare)]);
    assert_ne!(code, 0, "verified without the chain: {out}");
    let chain = ok(&fresh, &["key-chain"]);
    assert_eq!(chain["current"], Value::from(new_key.clone()), "{chain}");
    assert_eq!(chain["rotations"][0]["height"], rotation_height);
    ok(&fresh, &["verify", &file(&bare)]);

    // After a SIGKILL the replica signs with the new key still, and serves the same chain.
    server.kill();
    let server = operator.start();
    std::fs::write(&profile, server.profile.to_toml_string().unwrap()).unwrap();
    ok(&profile, &["deposit", "--to", &alice, "--amount", "1"]);
    let again = ok(&profile, &["key-chain"]);
    assert_eq!(again, chain);
    ok(
        &profile,
        &[
            "consistency",
            "--from",
            "1",
            "--to",
            &rotation_height.to_string(),
        ],
    );
    drop(server);
}

fn read(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// After the rotation at `rotation_height`: an envelope's confirmation file, a balance proof
/// file and a consistency proof file across the rotation, each carrying the one link.
fn files_after_rotation(
    profile: &Path,
    dir: &Path,
    alice: &str,
    rotation_height: u64,
) -> [std::path::PathBuf; 3] {
    let bob = generate_key();
    let bob_path = dir.join("bob.key");
    write_key(&bob_path, &bob).unwrap();
    let bob_hex = hex::encode(public_key(&bob));
    ok(profile, &["deposit", "--to", &bob_hex, "--amount", "50"]);
    let ops = dir.join("ops.jsonl");
    std::fs::write(
        &ops,
        format!("{{\"op\": \"transfer\", \"to\": \"{alice}\", \"amount\": 3, \"id\": 1}}\n"),
    )
    .unwrap();
    let made = [
        dir.join("envelope.json"),
        dir.join("balance.json"),
        dir.join("consistency.json"),
    ];
    let out = |i: usize| made[i].to_str().unwrap().to_string();
    let key = bob_path.to_str().unwrap();
    let ops = ops.to_str().unwrap();
    ok(
        profile,
        &["envelope", "--key", key, "--file", ops, "--out", &out(0)],
    );
    ok(profile, &["prove", alice, "--out", &out(1)]);
    let to = (rotation_height + 1).to_string();
    ok(
        profile,
        &["consistency", "--from", "1", "--to", &to, "--out", &out(2)],
    );
    for f in &made {
        let chain = read(f)["key_chain"].clone();
        assert_eq!(chain.as_array().map(Vec::len), Some(1), "{}", f.display());
    }
    made
}

/// `tally verify` of `path` with one hex digit of its first link changed fails.
fn assert_one_changed_link_digit_fails(profile: &Path, path: &Path) {
    let text = std::fs::read_to_string(path).unwrap();
    let link = read(path)["key_chain"][0].as_str().unwrap().to_string();
    for at in [0, 300, link.len() / 2, link.len() - 1] {
        let mut digits = link.clone().into_bytes();
        digits[at] = if digits[at] == b'0' { b'1' } else { b'0' };
        let changed = text.replacen(&link, std::str::from_utf8(&digits).unwrap(), 1);
        let edited = path.with_extension(format!("edited-{at}.json"));
        std::fs::write(&edited, changed).unwrap();
        let (code, out) = cli(profile, &["verify", edited.to_str().unwrap()]);
        assert_ne!(code, 0, "{} with digit {at} changed: {out}", path.display());
    }
}
