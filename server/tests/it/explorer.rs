//! The public explorer in a real browser: headless Chromium (Debian's `chromium`) loads the
//! pages a server with `[explorer] enabled` serves and the test reads what a person would see:
//! the latest checkpoint, the headers, a batch's receipts, an account's history, and a
//! confirmation file verified in the browser, valid as written and invalid with one digit
//! changed. Skipped with a note without `chromium`, unless `TALLY_REQUIRE_CHROMIUM=1` (`.ci/run`
//! installs it and sets that).

use std::path::Path;
use std::process::Command;

use base64::Engine as _;
use serde_json::Value;
use tally_client::{generate_key, public_key, write_key};

use crate::harness::Operator;

/// The DOM of `url` after its scripts ran, as headless Chromium renders it.
fn dom(url: &str) -> String {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=15000",
            "--dump-dom",
            url,
        ])
        .output()
        .expect("chromium");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn chromium_present() -> bool {
    let found = Command::new("chromium").arg("--version").output();
    if found.is_ok_and(|o| o.status.success()) {
        return true;
    }
    assert_ne!(
        std::env::var("TALLY_REQUIRE_CHROMIUM").as_deref(),
        Ok("1"),
        "chromium is required (apt-get install chromium)"
    );
    eprintln!("skipped: no chromium");
    false
}

fn tally(profile: &Path, args: &[&str]) -> Value {
    let (code, json) = crate::harness::cli(profile, args);
    assert_eq!(code, 0, "{args:?}: {json}");
    json
}

#[test]
fn a_person_sees_the_ledger_and_verifies_a_confirmation_in_the_browser() {
    if !chromium_present() {
        return;
    }
    let operator = Operator::new(|c| {
        c.batch.batch_window_ms = 10;
        c.explorer.enabled = true;
    });
    let server = operator.start();
    let profile = operator.data_dir().join("p.toml");
    std::fs::write(&profile, server.profile.to_toml_string().unwrap()).unwrap();
    let alice = hex::encode(public_key(&generate_key()));
    let file = operator.data_dir().join("deposit.json");
    let deposit = tally(
        &profile,
        &[
            "deposit",
            "--to",
            &alice,
            "--amount",
            "777",
            "--out",
            file.to_str().unwrap(),
        ],
    );
    let height = deposit["receipt"]["height"].as_u64().unwrap();
    let base = format!("http://{}/explorer", server.metrics_addr);

    let index = dom(&format!("{base}/"));
    assert!(index.contains(&format!("Height {height}")), "{index}");
    assert!(
        index.contains("tally.ledger/"),
        "the checkpoint note: {index}"
    );
    assert!(index.contains(&format!("batch.html?h={height}")), "{index}");

    let batch = dom(&format!("{base}/batch.html?h={height}"));
    assert!(batch.contains(&format!("Batch {height}")), "{batch}");
    assert!(
        batch.contains(&alice) && batch.contains("777"),
        "the deposit's receipt: {batch}"
    );

    let account = dom(&format!(
        "{base}/account.html?a={alice}&key={}",
        operator.profile.operator_public_key
    ));
    assert!(account.contains("operation_count"), "{account}");
    assert!(
        account.contains("proved at height") && account.contains(": balance 777"),
        "the balance proof, checked in the page: {account}"
    );
    let nobody = hex::encode(public_key(&generate_key()));
    let absent = dom(&format!("{base}/account.html?a={nobody}"));
    assert!(absent.contains(": no such account"), "{absent}");
    assert!(
        account.contains("777"),
        "the balance and the history entry: {account}"
    );

    let text = std::fs::read_to_string(&file).unwrap();
    let operator_key = &operator.profile.operator_public_key;
    let verify = |text: &str, key: &str| {
        let encoded = base64::engine::general_purpose::STANDARD.encode(text);
        let fragment = format!("file={}&key={key}", urlencode(&encoded));
        dom(&format!("{base}/verify.html#{fragment}"))
    };
    let valid = verify(&text, operator_key);
    assert!(
        valid.contains(&format!("VALID: height {height}")),
        "{valid}"
    );
    assert!(
        valid.contains("the operator's signature over the header verifies"),
        "{valid}"
    );

    // One digit of the receipt's balance changed: the proof no longer leads to the root.
    let json: Value = serde_json::from_str(&text).unwrap();
    let hex = json["confirmation_hex"].as_str().unwrap();
    let at = 2 * (209 + 64);
    let mut changed = hex.to_string().into_bytes();
    changed[at] = if changed[at] == b'0' { b'1' } else { b'0' };
    let tampered = text.replacen(hex, std::str::from_utf8(&changed).unwrap(), 1);
    let invalid = verify(&tampered, operator_key);
    assert!(
        invalid.contains("INVALID: the inclusion proof does not lead"),
        "{invalid}"
    );
    let other_key = hex::encode(public_key(&generate_key()));
    let wrong_key = verify(&text, &other_key);
    assert!(
        wrong_key.contains("INVALID: the header names another operator key"),
        "{wrong_key}"
    );

    // A balance proof from `tally prove`, checked in the page; then with its balance moved.
    let proof = operator.data_dir().join("balance.json");
    tally(
        &profile,
        &["prove", &alice, "--out", proof.to_str().unwrap()],
    );
    let text = std::fs::read_to_string(&proof).unwrap();
    let valid = verify(&text, operator_key);
    assert!(valid.contains(", balance 777"), "{valid}");
    assert!(
        valid.contains("the map root and totals give the header's state digest"),
        "{valid}"
    );
    let tampered = text.replacen("\"balance\": 777", "\"balance\": 778", 1);
    assert_ne!(tampered, text);
    let invalid = verify(&tampered, operator_key);
    assert!(
        invalid.contains("INVALID: the proof does not lead to the state map root"),
        "{invalid}"
    );
    envelope_files_verify_in_the_page(&profile, operator.data_dir(), &alice, &verify);
}

/// An envelope's file, one of its operations' file (`tally lookup`) and a reserve's expiry
/// file, each checked in the page as written, and refused with one digit changed.
fn envelope_files_verify_in_the_page(
    profile: &Path,
    dir: &Path,
    alice: &str,
    verify: &dyn Fn(&str, &str) -> String,
) {
    let key = generate_key();
    let key_path = dir.join("bob.key");
    write_key(&key_path, &key).unwrap();
    let bob = hex::encode(public_key(&key));
    let operator_key = tally_client::Profile::load(profile)
        .unwrap()
        .operator_public_key;
    tally(profile, &["deposit", "--to", &bob, "--amount", "1000"]);
    let ops = dir.join("ops.jsonl");
    std::fs::write(
        &ops,
        format!(
            "{{\"op\": \"transfer\", \"to\": \"{alice}\", \"amount\": 10, \"id\": 1}}\n\
             {{\"op\": \"reserve\", \"to\": \"{alice}\", \"amount\": 5, \"id\": 2, \"timeout_ms\": 1}}\n"
        ),
    )
    .unwrap();
    let files = [
        dir.join("env.json"),
        dir.join("op.json"),
        dir.join("exp.json"),
    ];
    let path = |i: usize| files[i].to_str().unwrap();
    let key_s = key_path.to_str().unwrap();
    tally(
        profile,
        &[
            "envelope",
            "--key",
            key_s,
            "--file",
            ops.to_str().unwrap(),
            "--out",
            path(0),
        ],
    );
    tally(
        profile,
        &["lookup", "--signer", &bob, "--id", "1", "--out", path(1)],
    );
    let receipt = expiry_receipt(profile, &bob);
    tally(
        profile,
        &["lookup", "--receipt", &receipt, "--out", path(2)],
    );
    for (file, what) in files.iter().zip(["2 operations", "amount 10", "leaf"]) {
        let text = std::fs::read_to_string(file).unwrap();
        let valid = verify(&text, &operator_key);
        assert!(
            valid.contains("VALID: height") && valid.contains(what),
            "{valid}"
        );
        // One digit in the middle of the bytes (the envelope, a receipt or the header) changed.
        let json: Value = serde_json::from_str(&text).unwrap();
        let hex = json["confirmation_hex"].as_str().unwrap();
        let at = hex.len() / 2;
        let mut changed = hex.to_string().into_bytes();
        changed[at] = if changed[at] == b'0' { b'1' } else { b'0' };
        let tampered = text.replacen(hex, std::str::from_utf8(&changed).unwrap(), 1);
        let invalid = verify(&tampered, &operator_key);
        assert!(invalid.contains("INVALID: "), "{invalid}");
    }
}

/// The receipt hash of the expiry in `owner`'s history, waiting for it (its reserve lasts 1 ms).
fn expiry_receipt(profile: &Path, owner: &str) -> String {
    for _ in 0..100 {
        let history = tally(profile, &["history", owner]);
        let entries = history["entries"].as_array().unwrap();
        if let Some(e) = entries.iter().find(|e| e["op"] == "expire") {
            return e["receipt_hash"].as_str().unwrap().to_string();
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("the reserve did not expire");
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// After an operator key rotation (PROTOCOL.md §4.14): a confirmation file made after it, and a
/// balance proof, verify in the page from the genesis key through the chain the file carries,
/// and fail with one digit of that chain changed; the account page follows the server's chain
/// (`/explorer/api/key-chain`) from the genesis key.
#[test]
fn files_after_a_key_rotation_verify_in_the_browser_through_their_chain() {
    if !chromium_present() {
        return;
    }
    let next = generate_key();
    let operator = Operator::new(|c| {
        c.batch.batch_window_ms = 10;
        c.explorer.enabled = true;
    });
    let next_path = operator.data_dir().join("next-operator.key");
    tally_server::bootstrap::write_signing_key(&next_path, &next).unwrap();
    let config_path = operator.data_dir().join("config.toml");
    let text = std::fs::read_to_string(&config_path).unwrap();
    let mut config = tally_config::Config::from_toml_str(&text).unwrap();
    config.operator.as_mut().unwrap().next_signing_key = Some(next_path);
    std::fs::write(&config_path, config.to_toml_string()).unwrap();
    let server = operator.start();
    let profile = operator.data_dir().join("p.toml");
    std::fs::write(&profile, server.profile.to_toml_string().unwrap()).unwrap();
    let genesis = operator.profile.operator_public_key.clone();
    let alice = hex::encode(public_key(&generate_key()));
    tally(&profile, &["deposit", "--to", &alice, "--amount", "4"]);
    let new_key = hex::encode(public_key(&next));
    tally(
        &profile,
        &["cluster", "rotate-key", "--new-public-key", &new_key],
    );
    let files = [
        operator.data_dir().join("after.json"),
        operator.data_dir().join("balance.json"),
    ];
    let (after, balance) = (files[0].to_str().unwrap(), files[1].to_str().unwrap());
    tally(
        &profile,
        &["deposit", "--to", &alice, "--amount", "5", "--out", after],
    );
    tally(&profile, &["prove", &alice, "--out", balance]);
    let base = format!("http://{}/explorer", server.metrics_addr);
    let verify = |text: &str, key: &str| {
        let encoded = base64::engine::general_purpose::STANDARD.encode(text);
        let fragment = format!("file={}&key={key}", urlencode(&encoded));
        dom(&format!("{base}/verify.html#{fragment}"))
    };
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let valid = verify(&text, &genesis);
        assert!(valid.contains("VALID: height"), "{valid}");
        assert!(
            valid.contains("the key chain leads from the genesis key through 1 rotation"),
            "{valid}"
        );
        let json: Value = serde_json::from_str(&text).unwrap();
        let link = json["key_chain"][0].as_str().unwrap();
        // A digit of the rotation's receipt (its request hash), then of the header's signature.
        for at in [2 * (256 + 32 + 12 + 20), 2 * 200] {
            let mut changed = link.to_string().into_bytes();
            changed[at] = if changed[at] == b'0' { b'1' } else { b'0' };
            let tampered = text.replacen(link, std::str::from_utf8(&changed).unwrap(), 1);
            let invalid = verify(&tampered, &genesis);
            assert!(invalid.contains("INVALID: key chain link 0"), "{invalid}");
        }
        let bare = {
            let mut v = json.clone();
            v.as_object_mut().unwrap().remove("key_chain");
            v.to_string()
        };
        let invalid = verify(&bare, &genesis);
        assert!(
            invalid.contains("INVALID: the header names another operator key"),
            "{invalid}"
        );
    }
    let account = dom(&format!("{base}/account.html?a={alice}&key={genesis}"));
    assert!(
        account.contains("proved at height") && account.contains(": balance 9"),
        "the balance proof, checked through the server's chain: {account}"
    );
}
