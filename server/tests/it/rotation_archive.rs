//! Operator key rotation and the archive (PROTOCOL.md §4.14, §15): the writer publishes each
//! rotation's link as `keychain/<n>` and signs checkpoints and snapshot manifests with the key
//! the chain leads to; `tally audit` follows the chain from the genesis key; a replica whose
//! data is lost is restored from the archive (from a snapshot taken after the rotation) and
//! signs with the new key.

use std::path::Path;

use serde_json::Value;
use tally_client::{generate_key, public_key};

use crate::harness::{cli, Operator};

fn ok(profile: &Path, args: &[&str]) -> Value {
    let (code, out) = cli(profile, args);
    assert_eq!(code, 0, "tally {args:?}: {out}");
    out
}

#[test]
fn the_archive_follows_a_rotation_through_audit_and_restore() {
    let next = generate_key();
    let operator = Operator::new(|c| c.archive.snapshot_every_batches = 2);
    let dir = operator.data_dir().to_path_buf();
    let next_path = dir.join("next-operator.key");
    tally_server::bootstrap::write_signing_key(&next_path, &next).unwrap();
    let config_path = dir.join("config.toml");
    let text = std::fs::read_to_string(&config_path).unwrap();
    let mut config = tally_config::Config::from_toml_str(&text).unwrap();
    config.operator.as_mut().unwrap().next_signing_key = Some(next_path);
    std::fs::write(&config_path, config.to_toml_string()).unwrap();

    let server = operator.start();
    let profile = dir.join("p.toml");
    std::fs::write(&profile, server.profile.to_toml_string().unwrap()).unwrap();
    let alice = hex::encode(public_key(&generate_key()));
    for amount in ["1", "2", "3"] {
        ok(&profile, &["deposit", "--to", &alice, "--amount", amount]);
    }
    let new_key = hex::encode(public_key(&next));
    ok(
        &profile,
        &["cluster", "rotate-key", "--new-public-key", &new_key],
    );
    let mut height = 0;
    for amount in ["4", "5", "6"] {
        let c = ok(&profile, &["deposit", "--to", &alice, "--amount", amount]);
        height = c["header"]["height"].as_u64().unwrap();
    }
    let chain = ok(&profile, &["key-chain"]);

    let archive = dir.join("archive");
    let report = audit_at(&profile, &archive, height);
    assert!(archive.join("keychain").join(format!("{:020}", 1)).exists());
    assert!(report["state_map_root"].is_string(), "{report}");

    server.kill();
    for d in ["ledger", "raft"] {
        std::fs::remove_dir_all(dir.join(d)).unwrap();
    }
    let restored = std::process::Command::new(env!("CARGO_BIN_EXE_tally-server"))
        .args(["restore", "--config", config_path.to_str().unwrap()])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&restored.stdout).to_string()
        + &String::from_utf8_lossy(&restored.stderr);
    assert!(restored.status.success(), "{said}");
    assert!(
        said.contains(&format!("restored height {height}")),
        "{said}"
    );
    assert!(said.contains("snapshot"), "{said}");
    let server = operator.start();
    std::fs::write(&profile, server.profile.to_toml_string().unwrap()).unwrap();
    let c = ok(&profile, &["deposit", "--to", &alice, "--amount", "7"]);
    assert_eq!(c["operator_public_key"], Value::from(new_key), "{c}");
    assert_eq!(ok(&profile, &["key-chain"]), chain);
    drop(server);
}

/// `tally audit` of the archive once it holds `height`: it must pass.
pub fn audit_at(profile: &Path, archive: &Path, height: u64) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (code, report) = cli(profile, &["audit", "--archive", archive.to_str().unwrap()]);
        let size = report["checkpoint_size"].as_u64().unwrap_or(0);
        if size >= height {
            assert_eq!(code, 0, "{report}");
            assert_eq!(report["ok"], true, "{report}");
            return report;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the archive stays at {size}: {report}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
