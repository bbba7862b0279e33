//! Accounting reads against a real server through the `tally` CLI: an account's history in
//! order with balances after each operation (requests and an envelope, a failed operation
//! leaving no entry), paging, `tally account` against `tally balance`, as-of-height answers,
//! lookup by receipt hash (verified offline, a tampered hash not found), and all of it again
//! after a SIGKILL and restart, with running counters that go on from what was stored.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use tally_client::{generate_key, public_key, to_hex, write_key};

use crate::envelopes::tally_bin;
use crate::harness::Operator;

struct Cli {
    profile: PathBuf,
}

impl Cli {
    /// Runs `tally --json ARGS`: success, and stdout as JSON.
    fn run(&self, args: &[&str]) -> (bool, Value) {
        let out = Command::new(tally_bin())
            .arg("--profile")
            .arg(&self.profile)
            .arg("--json")
            .args(args)
            .output()
            .expect("tally");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let json = serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!(
                "tally {args:?}: {e}: {stdout} / {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.success(), json)
    }

    fn ok(&self, args: &[&str]) -> Value {
        let (ok, json) = self.run(args);
        assert!(ok, "tally {args:?}: {json}");
        json
    }
}

/// (op, direction, amount, balance) of each entry.
fn summary(history: &Value) -> Vec<(String, String, u64, u64)> {
    let entries = history["entries"].as_array().expect("entries");
    entries
        .iter()
        .map(|e| {
            (
                e["op"].as_str().unwrap().to_string(),
                e["direction"].as_str().unwrap().to_string(),
                e["amount"].as_u64().unwrap(),
                e["balance"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn entry(op: &str, direction: &str, amount: u64, balance: u64) -> (String, String, u64, u64) {
    (op.into(), direction.into(), amount, balance)
}

fn heights(history: &Value) -> Vec<u64> {
    let entries = history["entries"].as_array().expect("entries");
    entries
        .iter()
        .map(|e| e["height"].as_u64().unwrap())
        .collect()
}

/// Alice: deposit 1,000; transfer 300 to bob; an independent envelope (100 to bob, 5,000 to
/// bob which fails, withdraw 20). Bob: withdraw 50.
fn submit_workload(cli: &Cli, dir: &Path, alice: &str, bob: &str) {
    let (a_key, b_key) = (dir.join("alice.key"), dir.join("bob.key"));
    let (a_key, b_key) = (a_key.to_str().unwrap(), b_key.to_str().unwrap());
    cli.ok(&["deposit", "--to", alice, "--amount", "1000", "--id", "1"]);
    cli.ok(&[
        "transfer", "--key", a_key, "--to", bob, "--amount", "300", "--id", "2",
    ]);
    cli.ok(&["withdraw", "--key", b_key, "--amount", "50", "--id", "3"]);
    let ops = dir.join("ops.jsonl");
    let lines = [
        format!(r#"{{"op": "transfer", "to": "{bob}", "amount": 100, "id": 10}}"#),
        format!(r#"{{"op": "transfer", "to": "{bob}", "amount": 5000, "id": 11}}"#),
        r#"{"op": "withdraw", "amount": 20, "id": 12}"#.to_string(),
    ];
    std::fs::write(&ops, lines.join("\n")).unwrap();
    cli.ok(&["envelope", "--key", a_key, "--file", ops.to_str().unwrap()]);
}

fn check_alice(cli: &Cli, alice: &str) -> Value {
    let history = cli.ok(&["history", alice]);
    assert_eq!(history["account"], alice);
    assert_eq!(
        summary(&history),
        vec![
            entry("deposit", "credit", 1000, 1000),
            entry("transfer", "debit", 300, 700),
            entry("transfer", "debit", 100, 600),
            entry("withdraw", "debit", 20, 580),
        ]
    );
    let h = heights(&history);
    assert!(h[0] < h[1] && h[1] < h[2] && h[2] == h[3], "{h:?}");
    let entries = history["entries"].as_array().unwrap();
    assert_eq!(
        entries[2]["request_hash"], entries[3]["request_hash"],
        "one envelope"
    );
    assert_ne!(entries[2]["receipt_hash"], entries[3]["receipt_hash"]);
    assert_eq!(entries[2]["header_hash"], entries[3]["header_hash"]);
    assert_eq!(
        entries[3]["index"].as_u64(),
        Some(2),
        "the failed op keeps its leaf"
    );
    assert!(history["next_from_height"].is_null());
    history
}

#[test]
fn history_account_and_receipt_lookup_through_the_cli_and_a_restart() {
    let operator = Operator::new(|c| c.batch.batch_window_ms = 20);
    let server = operator.start();
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli {
        profile: dir.path().join("profile.toml"),
    };
    std::fs::write(&cli.profile, server.profile.to_toml_string().unwrap()).unwrap();
    let (alice_key, bob_key) = (generate_key(), generate_key());
    write_key(&dir.path().join("alice.key"), &alice_key).unwrap();
    write_key(&dir.path().join("bob.key"), &bob_key).unwrap();
    let (alice, bob) = (
        to_hex(&public_key(&alice_key)),
        to_hex(&public_key(&bob_key)),
    );
    submit_workload(&cli, dir.path(), &alice, &bob);

    let history = check_alice(&cli, &alice);
    let h = heights(&history);
    let bob_history = cli.ok(&["history", &bob]);
    assert_eq!(
        summary(&bob_history),
        vec![
            entry("transfer", "credit", 300, 300),
            entry("withdraw", "debit", 50, 250),
            entry("transfer", "credit", 100, 350),
        ]
    );

    // Paging: two entries, then from where the first page said, inclusive.
    let first = cli.ok(&["history", &alice, "--limit", "2"]);
    assert_eq!(summary(&first), summary(&history)[..2]);
    let next = first["next_from_height"].as_u64().expect("more to come");
    assert_eq!(next, h[2]);
    let rest = cli.ok(&[
        "history",
        &alice,
        "--from-height",
        &next.to_string(),
        "--limit",
        "5",
    ]);
    assert_eq!(summary(&rest), summary(&history)[2..]);
    assert!(rest["next_from_height"].is_null());
    let from_second = cli.ok(&["history", &alice, "--from-height", &h[1].to_string()]);
    assert_eq!(summary(&from_second), summary(&history)[1..]);

    check_account(&cli, &alice, &h);
    let lookup = check_receipts(&cli, dir.path(), &history);
    server.kill();

    // After a SIGKILL: the same history and lookups, and counters going on from the stored ones.
    let server = operator.start();
    std::fs::write(&cli.profile, server.profile.to_toml_string().unwrap()).unwrap();
    let again = check_alice(&cli, &alice);
    assert_eq!(again["entries"], history["entries"]);
    let relooked = cli.ok(&["lookup", "--receipt", &lookup]);
    assert_eq!(relooked["height"].as_u64(), Some(h[2]));
    let a_key = dir.path().join("alice.key");
    cli.ok(&[
        "transfer",
        "--key",
        a_key.to_str().unwrap(),
        "--to",
        &bob,
        "--amount",
        "80",
    ]);
    let account = cli.ok(&["account", &alice]);
    assert_eq!(account["balance"], 500);
    assert_eq!(account["total_debited"], 500);
    assert_eq!(account["total_credited"], 1000);
    assert_eq!(account["operation_count"], 5);
    let latest = cli.ok(&["history", &alice]);
    assert_eq!(
        summary(&latest).last(),
        Some(&entry("transfer", "debit", 80, 500))
    );
    server.kill();
}

/// `tally account` now (against `tally balance`), as of an old height, and above the tip.
fn check_account(cli: &Cli, alice: &str, h: &[u64]) {
    let account = cli.ok(&["account", alice]);
    let balance = cli.ok(&["balance", alice]);
    assert_eq!(account["balance"], balance["balance"]);
    assert_eq!(account["height"], balance["height"]);
    assert_eq!(account["balance"], 580);
    assert_eq!(
        (
            account["pending_debits"].as_u64(),
            account["pending_credits"].as_u64()
        ),
        (Some(0), Some(0))
    );
    assert_eq!(account["total_debited"], 420);
    assert_eq!(account["total_credited"], 1000);
    assert_eq!(account["operation_count"], 4);
    assert_eq!(account["last_height"].as_u64(), Some(h[3]));
    assert_eq!(account["exists"], true);

    // As of the transfer's height: 700 after two operations; before the deposit: nothing.
    let old = cli.ok(&["account", alice, "--height", &h[1].to_string()]);
    assert_eq!(old["balance"], 700);
    assert_eq!(old["height"].as_u64(), Some(h[1]));
    assert_eq!(old["operation_count"], 2);
    assert_eq!(old["total_debited"], 300);
    assert_eq!(old["pending_known"], false);
    if h[0] > 1 {
        let before = cli.ok(&["account", alice, "--height", &(h[0] - 1).to_string()]);
        assert_eq!(
            (before["exists"].as_bool(), before["balance"].as_u64()),
            (Some(false), Some(0))
        );
    }
    let (ok, above) = cli.run(&["account", alice, "--height", "999999"]);
    assert!(!ok);
    assert_eq!(above["code"], "height_not_applied");
}

/// Looks up the envelope's withdrawal by receipt hash; the file verifies, a tampered hash is
/// not found. Returns the hash.
fn check_receipts(cli: &Cli, dir: &Path, history: &Value) -> String {
    let withdraw = &history["entries"][3];
    let hash = withdraw["receipt_hash"].as_str().unwrap().to_string();
    let out = dir.join("r.json");
    let found = cli.ok(&["lookup", "--receipt", &hash, "--out", out.to_str().unwrap()]);
    assert_eq!(found["height"], withdraw["height"]);
    assert_eq!(found["index"], withdraw["index"]);
    assert_eq!(found["operation"]["op"], "withdraw");
    let verified = cli.ok(&["verify", out.to_str().unwrap()]);
    assert_eq!(verified["valid"], true);
    let mut tampered = hash.clone().into_bytes();
    tampered[0] = if tampered[0] == b'0' { b'1' } else { b'0' };
    let tampered = String::from_utf8(tampered).unwrap();
    let (ok, json) = cli.run(&["lookup", "--receipt", &tampered]);
    assert!(!ok);
    assert_eq!(json["code"], "not_found");
    hash
}

/// A replica whose history starts later (as after an install from a snapshot that lacked the
/// older history) refuses reads below it with `history_pruned`, naming the oldest height held,
/// and answers from there on.
#[test]
fn reads_below_the_history_held_are_refused_naming_the_oldest_height() {
    let operator = Operator::new(|c| c.batch.batch_window_ms = 20);
    let server = operator.start();
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli {
        profile: dir.path().join("profile.toml"),
    };
    std::fs::write(&cli.profile, server.profile.to_toml_string().unwrap()).unwrap();
    let alice = to_hex(&public_key(&generate_key()));
    for id in 1..=4 {
        cli.ok(&[
            "deposit",
            "--to",
            &alice,
            "--amount",
            "10",
            "--id",
            &id.to_string(),
        ]);
    }
    let full = cli.ok(&["history", &alice]);
    let h = heights(&full);
    assert_eq!(h.len(), 4);
    assert!(h.windows(2).all(|w| w[0] < w[1]), "{h:?}");
    server.terminate();

    // The history now starts at the third deposit's height.
    let held_from = h[2];
    let ledger = operator.data_dir().join("ledger");
    let mut db = tally_storage::LedgerDb::open(&ledger, Default::default()).unwrap();
    let key = tally_storage::layout::history_held_from_key();
    db.raw_put(&key, &held_from.to_le_bytes()).unwrap();
    db.close().unwrap();

    let server = operator.start();
    std::fs::write(&cli.profile, server.profile.to_toml_string().unwrap()).unwrap();
    let from = h[0].to_string();
    let (ok, refused) = cli.run(&["history", &alice, "--from-height", &from]);
    assert!(!ok);
    assert_eq!(refused["code"], "history_pruned");
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("holds, {held_from}")),
        "{message}"
    );
    let (ok, refused) = cli.run(&["account", &alice, "--height", &h[1].to_string()]);
    assert!(!ok);
    assert_eq!(refused["code"], "history_pruned");
    // From the oldest height held on: the entries there, and the figures as of it.
    let held = cli.ok(&["history", &alice]);
    assert_eq!(held["held_from"].as_u64(), Some(held_from));
    assert_eq!(heights(&held), h[2..]);
    let at = cli.ok(&["account", &alice, "--height", &held_from.to_string()]);
    assert_eq!(at["balance"], 30);
    assert_eq!(cli.ok(&["account", &alice])["balance"], 40);
    server.kill();
}
