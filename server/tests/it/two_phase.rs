//! Two-phase transfers against real servers: the `tally reserve`, `post`, `void` and `renew`
//! commands and their codes on one node, an idle leader expiring a reserve on time, and
//! reserves that neither expire early nor get lost when the leader of three is killed.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use serde_json::Value;
use tally_client::envelope::build_envelope;
use tally_client::{build_request, generate_key, public_key, write_key, ClusterClient, Error};
use tally_wire::{ErrorCode, Op, Operation, PublicKey, ReadMode};

use crate::cluster::fast;
use crate::cluster_harness::Cluster;
use crate::envelopes::tally_bin;
use crate::harness::Operator;

/// Runs `tally --json ARGS` with `profile`: (exit success, its JSON).
fn tally(profile: &Path, args: &[&str]) -> (bool, Value) {
    let (code, json) = crate::harness::cli(profile, args);
    assert!(!json.is_null(), "{args:?}: no JSON");
    (code == 0, json)
}

/// Runs a command that must fail with `code`.
fn refused(profile: &Path, args: &[&str], code: &str) {
    let (ok, json) = tally(profile, args);
    assert!(!ok, "{args:?} must fail: {json}");
    assert_eq!(json["code"], code, "{args:?}: {json}");
    assert_eq!(json["failed_index"], 0, "{args:?}: {json}");
}

#[test]
fn the_cli_reserves_posts_voids_and_an_idle_leader_expires_on_time() {
    let window_ms = 20;
    let operator = Operator::new(|c| c.batch.batch_window_ms = window_ms);
    let chain = operator.profile.chain_id_bytes().unwrap();
    let deposit_key = operator.profile.load_deposit_key().unwrap();
    let (alice, bob) = (generate_key(), generate_key());
    let server = operator.start();
    let rt = crate::harness::runtime();
    let client = rt.block_on(async {
        let client = server.client().await;
        let dep = build_request(
            &deposit_key,
            chain,
            Op::Deposit,
            1,
            public_key(&alice),
            1000,
        );
        client.submit(dep).await.expect("deposit");
        client
    });
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("profile.toml");
    std::fs::write(&profile, server.profile.to_toml_string().unwrap()).unwrap();
    let key = dir.path().join("alice.key");
    write_key(&key, &alice).unwrap();
    let (k, bob_hex) = (
        key.to_str().unwrap(),
        tally_client::to_hex(&public_key(&bob)),
    );
    let p = profile.as_path();

    let reserve = |id: &str, amount: &str, ms: &str| {
        tally(
            p,
            &[
                "reserve",
                "--key",
                k,
                "--to",
                &bob_hex,
                "--amount",
                amount,
                "--expires-in-ms",
                ms,
                "--id",
                id,
            ],
        )
    };
    let (ok, json) = reserve("7", "600", "60000");
    assert!(ok, "{json}");
    assert_eq!(json["owner_balance"], 400);
    let expires = json["expires_at_ms"].as_u64().unwrap();
    assert_eq!(expires, json["batch_time_ms"].as_u64().unwrap() + 60_000);
    // A partial post: 250 to bob, the other 350 back to alice.
    let (ok, json) = tally(
        p,
        &["post", "--key", k, "--reserve-id", "7", "--amount", "250"],
    );
    assert!(ok, "{json}");
    assert_eq!(
        (
            json["receiver_balance"].as_u64(),
            json["owner_balance"].as_u64()
        ),
        (Some(250), Some(750))
    );
    refused(
        p,
        &["post", "--key", k, "--reserve-id", "7"],
        "reserve_closed",
    );
    refused(
        p,
        &["void", "--key", k, "--reserve-id", "7"],
        "reserve_closed",
    );
    refused(
        p,
        &["post", "--key", k, "--reserve-id", "99"],
        "reserve_not_found",
    );
    let (ok, _) = reserve("8", "100", "60000");
    assert!(ok);
    refused(
        p,
        &["post", "--key", k, "--reserve-id", "8", "--amount", "101"],
        "post_exceeds_reserve",
    );
    let (ok, json) = tally(p, &["void", "--key", k, "--reserve-id", "8"]);
    assert!(ok && json["owner_balance"] == 750, "{json}");

    // Nobody decides: the idle leader expires it within a batch window of the deadline.
    let (ok, json) = reserve("9", "700", "300");
    assert!(ok, "{json}");
    let deadline = json["expires_at_ms"].as_u64().unwrap();
    let back = rt.block_on(wait_for_balance(&client, &alice, 750));
    let late_ms = back.saturating_sub(deadline);
    eprintln!("expired {late_ms} ms after the deadline (batch window {window_ms} ms)");
    refused(
        p,
        &["post", "--key", k, "--reserve-id", "9"],
        "reserve_expired",
    );
    let (ok, json) = tally(p, &["supply"]);
    assert!(
        ok && json["total_supply"] == 1000 && json["sum_of_balances"] == 1000,
        "{json}"
    );
    check_expiry_proof(p, dir.path(), &tally_client::to_hex(&public_key(&alice)));
    server.kill();
}

/// The expiry of reserve 9 is provable: its receipt, named by the owner's history, looked up
/// and verified offline; a changed digit in the proof fails.
fn check_expiry_proof(p: &Path, dir: &Path, owner: &str) {
    let (ok, history) = tally(p, &["history", owner]);
    assert!(ok, "{history}");
    let entries = history["entries"].as_array().unwrap();
    let expiry = entries.iter().find(|e| e["op"] == "expire");
    let expiry = expiry.unwrap_or_else(|| panic!("no expiry in {history}"));
    let receipt = expiry["receipt_hash"].as_str().unwrap();
    let out = dir.join("expiry.json");
    let path = out.to_str().unwrap();
    let (ok, found) = tally(p, &["lookup", "--receipt", receipt, "--out", path]);
    assert!(ok, "{found}");
    assert_eq!(found["format"], "tally-expiry-confirmation-v1", "{found}");
    assert_eq!(found["owner"], owner);
    assert_eq!(found["reserve_id"], "9");
    assert_eq!(found["height"], expiry["height"]);
    assert_eq!(found["receipt_hash"], receipt);
    assert_eq!(found["owner_balance"], 750);
    let (ok, verified) = tally(p, &["verify", path]);
    assert!(ok && verified["valid"] == true, "{verified}");
    assert_eq!(verified["op"], "expire");
    let text = std::fs::read_to_string(&out).unwrap();
    let file: Value = serde_json::from_str(&text).unwrap();
    let mut hex = file["confirmation_hex"]
        .as_str()
        .unwrap()
        .to_string()
        .into_bytes();
    // A digit of the header's Merkle root (after owner, id, the 80-byte receipt and 120
    // bytes of the header).
    let at = 2 * (48 + 80 + 120);
    hex[at] = if hex[at] == b'0' { b'1' } else { b'0' };
    let tampered = text.replace(
        file["confirmation_hex"].as_str().unwrap(),
        std::str::from_utf8(&hex).unwrap(),
    );
    std::fs::write(&out, tampered).unwrap();
    let status = Command::new(tally_bin())
        .args(["--profile", p.to_str().unwrap(), "verify", path])
        .output()
        .expect("tally")
        .status;
    assert!(!status.success(), "a tampered expiry proof verified");
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Polls until `key`'s balance is `want`; returns the wall-clock time it was first seen.
async fn wait_for_balance(client: &tally_client::Client, key: &SigningKey, want: u64) -> u64 {
    let started = Instant::now();
    loop {
        let b = client
            .balance(public_key(key), ReadMode::Linearizable)
            .await;
        if b.as_ref().is_ok_and(|b| b.balance == want) {
            return unix_ms();
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "balance never {want}: {b:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn reserve_op(id: u128, to: PublicKey, amount: u64, timeout_ms: u64) -> Operation {
    Operation {
        op: Op::Reserve,
        id,
        to,
        amount,
        timeout_ms,
        reserve_id: 0,
        party: [0; 32],
    }
}

fn post_op(id: u128, reserve_id: u128) -> Operation {
    Operation {
        op: Op::Post,
        id,
        to: [0; 32],
        amount: 0,
        timeout_ms: 0,
        reserve_id,
        party: [0; 32],
    }
}

/// Submits one operation as an atomic envelope: the owner's balance after it, and its batch's
/// time.
async fn one(
    cc: &ClusterClient,
    key: &SigningKey,
    chain: [u8; 32],
    op: Operation,
) -> Result<(u64, u64), Error> {
    let e = build_envelope(key, chain, true, vec![op]);
    cc.submit_envelope(std::sync::Arc::new(e))
        .await
        .map(|c| (c.receipts[0].signer_balance, c.header.header.time_unix_ms))
}

#[test]
fn reserves_survive_a_leader_kill_and_expire_on_the_new_leader() {
    let rt = crate::harness::runtime();
    rt.block_on(async {
        let mut cluster = Cluster::new(3, fast).await;
        cluster.start_all();
        let chain = cluster.profile.chain_id_bytes().unwrap();
        let deposit_key = cluster.profile.load_deposit_key().unwrap();
        let (alice, bob) = (generate_key(), public_key(&generate_key()));
        let cc = cluster.cluster_client();
        let dep = build_request(
            &deposit_key,
            chain,
            Op::Deposit,
            1,
            public_key(&alice),
            1000,
        );
        cc.submit(dep).await.expect("deposit");
        // One to post after the failover, one to expire across it.
        let (left, _) = one(&cc, &alice, chain, reserve_op(10, bob, 300, 60_000))
            .await
            .unwrap();
        assert_eq!(left, 700);
        let (left, made) = one(&cc, &alice, chain, reserve_op(11, bob, 200, 2_000))
            .await
            .unwrap();
        assert_eq!(left, 500);
        let leader = cluster.leader().await;
        cluster.kill(leader);
        let new_leader = cluster.leader().await;
        assert_ne!(new_leader, leader);
        let client = cluster.client_of(new_leader).await;
        let back = wait_for_balance(&client, &alice, 700).await;
        assert!(
            back >= made + 2_000,
            "expired {} ms early",
            made + 2_000 - back
        );
        eprintln!(
            "expired {} ms after its deadline, across a leader kill",
            back - made - 2_000
        );
        // Posted once on the new leader; a second post of it and a post of the expired one fail.
        let (owner_after, _) = one(&cc, &alice, chain, post_op(12, 10)).await.unwrap();
        assert_eq!(owner_after, 700);
        let b = client
            .balance(bob, ReadMode::Linearizable)
            .await
            .unwrap()
            .balance;
        assert_eq!(b, 300, "posted exactly once");
        for (id, reserve, code) in [
            (13, 10, ErrorCode::ReserveClosed),
            (14, 11, ErrorCode::ReserveExpired),
        ] {
            match one(&cc, &alice, chain, post_op(id, reserve)).await {
                Err(Error::EnvelopeFailed(f)) => assert_eq!(f.code, code),
                other => panic!("post of {reserve}: {other:?}"),
            }
        }
        let s = client.supply().await.unwrap();
        assert_eq!(s.sum_of_balances, 1000);
    });
}
