//! Envelopes against a real server: atomic envelopes apply all or nothing, independent ones
//! give every operation its own result, a resubmission applies nothing again (before and after
//! a SIGKILL), a full envelope of 8,192 operations is confirmed and proven, and the `tally`
//! CLI's `envelope` and `verify` commands keep their contract.

use std::path::{Path, PathBuf};
use std::process::Command;

use ed25519_dalek::SigningKey;
use tally_client::envelope::build_envelope;
use tally_client::{build_request, generate_key, public_key, write_key, Client, Error};
use tally_core::engine::apply::Found;
use tally_core::verify::{verify_envelope_confirmation, verify_operation_confirmation};
use tally_wire::{ErrorCode, Op, Operation, PublicKey, ReadMode, ENVELOPE_OPS_MAX};

use crate::harness::Operator;

fn transfer(id: u128, to: &SigningKey, amount: u64) -> Operation {
    Operation {
        op: Op::Transfer,
        id,
        to: public_key(to),
        amount,
    }
}

async fn balance(client: &Client, key: &SigningKey) -> u64 {
    let reply = client
        .balance(public_key(key), ReadMode::Linearizable)
        .await;
    reply.expect("balance").balance
}

#[test]
fn envelopes_apply_all_or_nothing_once_and_prove_every_operation() {
    let operator = Operator::new(|c| c.batch.batch_window_ms = 20);
    let op_key = operator.profile.operator_key().unwrap();
    let chain = operator.profile.chain_id_bytes().unwrap();
    let deposit_key = operator.profile.load_deposit_key().unwrap();
    let (alice, bob, carol) = (generate_key(), generate_key(), generate_key());
    let rt = crate::harness::runtime();
    let server = operator.start();
    let (independent, full) = rt.block_on(async {
        let client = server.client().await;
        let dep = build_request(
            &deposit_key,
            chain,
            Op::Deposit,
            1,
            public_key(&alice),
            100_000,
        );
        client.submit(dep).await.expect("deposit");

        // Atomic: the third operation overdraws, so nothing applies, and the failure names it.
        let ops = vec![
            transfer(1, &bob, 30_000),
            transfer(2, &carol, 40_000),
            transfer(3, &bob, 40_000),
        ];
        let atomic = build_envelope(&alice, chain, true, ops);
        match client.submit_envelope(atomic).await {
            Err(Error::EnvelopeFailed(f)) => {
                assert_eq!((f.failed_index, f.code), (2, ErrorCode::InsufficientFunds))
            }
            other => panic!("expected the atomic envelope to fail at 2, got {other:?}"),
        }
        assert_eq!(balance(&client, &alice).await, 100_000, "nothing applied");
        assert_eq!(balance(&client, &bob).await, 0);

        // Independent: the same operations, each its own result.
        let ops = vec![
            transfer(1, &bob, 30_000),
            transfer(2, &carol, 40_000),
            transfer(3, &bob, 40_000),
        ];
        let independent = build_envelope(&alice, chain, false, ops);
        let c = client
            .submit_envelope(independent.clone())
            .await
            .expect("independent");
        verify_envelope_confirmation(&independent, &c, &op_key).expect("verifies");
        let failed: Vec<_> = c.receipts.iter().map(|r| r.failed).collect();
        assert_eq!(failed, vec![None, None, Some(ErrorCode::InsufficientFunds)]);
        assert_eq!(balance(&client, &alice).await, 30_000);
        assert_eq!(balance(&client, &bob).await, 30_000);

        // A resubmission is the original confirmation; nothing moves again.
        let again = client
            .submit_envelope(independent.clone())
            .await
            .expect("again");
        assert!(again.replayed);
        assert_eq!(again.receipts, c.receipts);
        assert_eq!(balance(&client, &alice).await, 30_000);

        // A full envelope: 8,192 transfers of 1 from carol to bob (carol holds 40,000).
        let n = ENVELOPE_OPS_MAX as u128;
        let ops = (0..n).map(|i| transfer(10_000 + i, &bob, 1)).collect();
        let full = build_envelope(&carol, chain, true, ops);
        let c = client
            .submit_envelope(full.clone())
            .await
            .expect("full envelope");
        verify_envelope_confirmation(&full, &c, &op_key).expect("verifies");
        assert_eq!(balance(&client, &carol).await, 40_000 - 8_192);
        assert_eq!(balance(&client, &bob).await, 30_000 + 8_192);
        (independent, full)
    });
    server.kill();

    // After a SIGKILL the stored bodies answer resubmissions: nothing applies twice.
    let server = operator.start();
    rt.block_on(async {
        let client = server.client().await;
        for e in [independent, full] {
            let c = client
                .submit_envelope(e.clone())
                .await
                .expect("resubmitted");
            assert!(c.replayed);
            verify_envelope_confirmation(&e, &c, &op_key).expect("verifies after restart");
        }
        assert_eq!(balance(&client, &alice).await, 30_000);
        assert_eq!(balance(&client, &carol).await, 40_000 - 8_192);
        // Lookups without resubmitting: an operation of the full envelope, and the deposit.
        match client
            .find_confirmation(public_key(&carol), 10_000 + 4_321)
            .await
        {
            Ok(Found::Operation(c)) => {
                verify_operation_confirmation(&c, &op_key).expect("verifies");
                assert_eq!(
                    (c.receipt.op_index, c.receipt.to_balance > 0),
                    (4_321, true)
                );
            }
            other => panic!("expected an operation's confirmation, got {other:?}"),
        }
        match client.find_confirmation(public_key(&deposit_key), 1).await {
            Ok(Found::Request(c)) => {
                tally_core::verify::verify_confirmation(&c, &op_key).expect("verifies");
                assert!(c.replayed);
            }
            other => panic!("expected the deposit's confirmation, got {other:?}"),
        }
        match client.find_confirmation(public_key(&carol), 99).await {
            Err(Error::Rejected(r)) => assert_eq!(r.code, ErrorCode::NotFound),
            other => panic!("expected not_found, got {other:?}"),
        }
        // Supply: 100,000 deposited, nothing withdrawn; the balances (counted again at the
        // restart's open) sum to it.
        let s = client.supply().await.expect("supply");
        assert_eq!((s.total_deposited, s.total_withdrawn), (100_000, 0));
        assert_eq!(s.sum_of_balances, 100_000);
        assert_eq!(s.accounts, 3);
    });
    server.kill();
}

/// The `tally` binary next to `tally-server` (built first when this test runs alone).
pub(crate) fn tally_bin() -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_tally-server")).with_file_name("tally");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "tally-client", "--bin", "tally"])
            .status()
            .expect("cargo build");
        assert!(
            status.success() && bin.exists(),
            "the tally binary could not be built"
        );
    }
    bin
}

fn hex(key: &PublicKey) -> String {
    tally_client::to_hex(key)
}

#[test]
fn the_cli_submits_envelopes_and_verifies_their_file() {
    let operator = Operator::new(|c| c.batch.batch_window_ms = 20);
    let chain = operator.profile.chain_id_bytes().unwrap();
    let deposit_key = operator.profile.load_deposit_key().unwrap();
    let (alice, bob) = (generate_key(), generate_key());
    let server = operator.start();
    let rt = crate::harness::runtime();
    rt.block_on(async {
        let client = server.client().await;
        let dep = build_request(&deposit_key, chain, Op::Deposit, 1, public_key(&alice), 500);
        client.submit(dep).await.expect("deposit");
    });
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("profile.toml");
    std::fs::write(&profile, server.profile.to_toml_string().unwrap()).unwrap();
    let key = dir.path().join("alice.key");
    write_key(&key, &alice).unwrap();
    let ops = dir.path().join("ops.jsonl");
    let bob_hex = hex(&public_key(&bob));
    let lines = [
        format!(r#"{{"op": "transfer", "to": "{bob_hex}", "amount": 100, "id": 1}}"#),
        r#"{"op": "withdraw", "amount": 50, "id": "2"}"#.to_string(),
        format!(r#"{{"op": "transfer", "to": "{bob_hex}", "amount": 900, "id": 3}}"#),
    ];
    std::fs::write(&ops, lines.join("\n")).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(tally_bin())
            .arg("--profile")
            .arg(&profile)
            .args(args)
            .output()
            .expect("tally");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        (
            out.status.success(),
            serde_json::from_str::<serde_json::Value>(&stdout),
        )
    };
    let (key_s, ops_s) = (key.to_str().unwrap(), ops.to_str().unwrap());
    let out = dir.path().join("c.json");
    // Atomic: the third operation overdraws; exit non-zero with failed_index and code.
    let (ok, json) = run(&[
        "--json", "envelope", "--key", key_s, "--file", ops_s, "--atomic",
    ]);
    let json = json.expect("JSON on failure");
    assert!(!ok);
    assert_eq!(json["code"], "insufficient_funds");
    assert_eq!(json["failed_index"], 2);
    // Independent: written out, verified offline.
    let out_s = out.to_str().unwrap();
    let (ok, json) = run(&[
        "--json", "envelope", "--key", key_s, "--file", ops_s, "--out", out_s,
    ]);
    let json = json.expect("JSON");
    assert!(ok, "{json}");
    assert_eq!(json["operations"][2]["failed"], "insufficient_funds");
    assert_eq!(json["operations"][0]["to_balance"], 100);
    let (ok, json) = run(&["--json", "verify", out_s]);
    assert!(ok);
    assert_eq!(json.expect("JSON")["valid"], true);
    // Lookups by (signer, id): an envelope's operation and an unknown id.
    let alice_hex = hex(&public_key(&alice));
    let looked = dir.path().join("l.json");
    let looked_s = looked.to_str().unwrap();
    let (ok, json) = run(&[
        "--json", "lookup", "--signer", &alice_hex, "--id", "1", "--out", looked_s,
    ]);
    assert!(ok, "{json:?}");
    assert_eq!(json.expect("JSON")["operation"]["to_balance"], 100);
    let (ok, json) = run(&["--json", "verify", looked_s]);
    assert!(ok && json.expect("JSON")["valid"] == true);
    let (ok, json) = run(&["--json", "lookup", "--signer", &alice_hex, "--id", "77"]);
    assert!(!ok);
    assert_eq!(json.expect("JSON")["code"], "not_found");
    // Supply after 500 deposited and 50 withdrawn.
    let (ok, json) = run(&["--json", "supply"]);
    let json = json.expect("JSON");
    assert!(ok, "{json}");
    assert_eq!(
        (
            json["total_supply"].as_u64(),
            json["sum_of_balances"].as_u64()
        ),
        (Some(450), Some(450))
    );
    assert!(json["height"].as_u64().unwrap() >= 2);
    // An edited file does not verify.
    let text = std::fs::read_to_string(&out).unwrap();
    std::fs::write(
        &out,
        text.replacen("\"to_balance\": 100", "\"to_balance\": 101", 1),
    )
    .unwrap();
    let (ok, _) = run(&["--json", "verify", out_s]);
    assert!(!ok, "an edited envelope file must not verify");
    server.kill();
}
