//! Money moves over TLS, every confirmation verifies, and a SIGKILL loses nothing confirmed.

use std::collections::HashMap;

use tally_client::{build_request, generate_key, public_key, Client};
use tally_core::crypto::{header_hash, verify_header};
use tally_core::verify::verify_confirmation;
use tally_wire::{Confirmation, Op, PublicKey, ReadMode};

use crate::harness::Operator;

async fn balance(client: &Client, account: PublicKey) -> u64 {
    client
        .balance(account, ReadMode::Linearizable)
        .await
        .expect("balance")
        .balance
}

/// Fetches every header and checks signatures and the hash chain from height 1.
async fn check_chain(client: &Client, operator: &PublicKey) -> u64 {
    let mut prev = [0u8; 32];
    let mut height = 0;
    loop {
        let headers = client.headers(height + 1, 1024).await.expect("headers");
        if headers.is_empty() {
            return height;
        }
        for h in headers {
            assert_eq!(h.header.height, height + 1, "heights have no gaps");
            assert_eq!(
                h.header.prev_hash, prev,
                "header {} chains to its predecessor",
                h.header.height
            );
            verify_header(operator, &h).expect("header signature");
            prev = header_hash(&h.header);
            height = h.header.height;
        }
    }
}

#[test]
fn money_moves_verifies_and_survives_sigkill() {
    let operator = Operator::new(|c| c.batch.batch_window_ms = 20);
    let op_key = operator.profile.operator_key().unwrap();
    let chain = operator.profile.chain_id_bytes().unwrap();
    let deposit_key = operator.profile.load_deposit_key().unwrap();
    let alice = generate_key();
    let accounts: Vec<_> = (0..5).map(|_| generate_key()).collect();
    let rt = crate::harness::runtime();

    let server = operator.start();
    let (confirmed, replay_source) = rt.block_on(async {
        let client = std::sync::Arc::new(server.client().await);
        let dep = build_request(
            &deposit_key,
            chain,
            Op::Deposit,
            1,
            public_key(&alice),
            10_000,
        );
        let c = client.submit(dep).await.expect("deposit");
        verify_confirmation(&c, &op_key).expect("deposit confirmation verifies");
        assert_eq!(c.receipt.to_balance, 10_000);

        // Many requests in flight on one connection, answered out of order by correlation id.
        let mut tasks = Vec::new();
        for i in 0..100u128 {
            let to = public_key(&accounts[(i % 5) as usize]);
            let req = build_request(&alice, chain, Op::Transfer, 1000 + i, to, 7);
            let client = std::sync::Arc::clone(&client);
            tasks.push(tokio::spawn(async move { client.submit(req).await }));
        }
        let mut confirmed: Vec<Confirmation> = vec![c];
        for t in tasks {
            let c = t.await.unwrap().expect("transfer");
            verify_confirmation(&c, &op_key).expect("transfer confirmation verifies");
            assert!(!c.replayed);
            confirmed.push(c);
        }
        let w = build_request(&accounts[0], chain, Op::Withdraw, 1, [0; 32], 20);
        let c = client.submit(w).await.expect("withdraw");
        verify_confirmation(&c, &op_key).unwrap();
        confirmed.push(c);

        assert_eq!(balance(&client, public_key(&alice)).await, 10_000 - 700);
        assert_eq!(balance(&client, public_key(&accounts[0])).await, 140 - 20);
        assert_eq!(balance(&client, public_key(&accounts[1])).await, 140);

        // A resubmission is answered with the original confirmation and applies nothing.
        let again = build_request(
            &alice,
            chain,
            Op::Transfer,
            1000,
            public_key(&accounts[0]),
            7,
        );
        let replay = client.submit(again).await.expect("replay");
        assert!(replay.replayed);
        assert_eq!(balance(&client, public_key(&alice)).await, 10_000 - 700);
        (confirmed, replay)
    });
    server.kill();

    // Restart after SIGKILL: every confirmed request and balance is intact.
    let server = operator.start();
    rt.block_on(async {
        let client = server.client().await;
        let height = check_chain(&client, &op_key).await;
        let mut by_height: HashMap<u64, u32> = HashMap::new();
        for c in &confirmed {
            *by_height.entry(c.receipt.height).or_default() += 1;
            assert!(
                c.receipt.height <= height,
                "confirmed batch {} survived",
                c.receipt.height
            );
            let stored = &client.headers(c.receipt.height, 1).await.unwrap()[0];
            assert_eq!(
                stored, &c.header,
                "the confirmation's header is the stored one"
            );
        }
        assert_eq!(by_height.values().sum::<u32>() as usize, confirmed.len());
        assert_eq!(balance(&client, public_key(&alice)).await, 10_000 - 700);
        for (i, k) in accounts.iter().enumerate() {
            let expected = if i == 0 { 120 } else { 140 };
            assert_eq!(balance(&client, public_key(k)).await, expected);
        }
        // The original confirmation, proof included, still comes back after the restart.
        let again = build_request(
            &alice,
            chain,
            Op::Transfer,
            1000,
            public_key(&accounts[0]),
            7,
        );
        let replay = client.submit(again).await.expect("replay after restart");
        assert!(replay.replayed);
        assert_eq!(replay.receipt, replay_source.receipt);
        assert_eq!(replay.header, replay_source.header);
        verify_confirmation(&replay, &op_key).unwrap();
        // Conservation: 10_000 deposited, 20 withdrawn.
        let mut total = balance(&client, public_key(&alice)).await;
        for k in &accounts {
            total += balance(&client, public_key(k)).await;
        }
        assert_eq!(total, 10_000 - 20);
    });
    drop(server);
}

#[test]
fn sigterm_finishes_the_batch_in_progress() {
    // A long window: requests are still in the open batch when SIGTERM arrives.
    let operator = Operator::new(|c| {
        c.batch.batch_window_ms = 2_000;
        c.batch.batch_close_idle = false;
    });
    let op_key = operator.profile.operator_key().unwrap();
    let chain = operator.profile.chain_id_bytes().unwrap();
    let deposit_key = operator.profile.load_deposit_key().unwrap();
    let rt = crate::harness::runtime();
    let server = operator.start();
    let accounts: Vec<_> = (0..10).map(|_| generate_key()).collect();
    let results = rt.block_on(async {
        let client = std::sync::Arc::new(server.client().await);
        let mut tasks = Vec::new();
        for (i, k) in accounts.iter().enumerate() {
            let req = build_request(
                &deposit_key,
                chain,
                Op::Deposit,
                i as u128,
                public_key(k),
                5,
            );
            let client = std::sync::Arc::clone(&client);
            tasks.push(tokio::spawn(async move { client.submit(req).await }));
        }
        // SIGTERM only once all ten sit in the open batch (a loaded machine may take a while).
        let mut open = 0.0;
        for _ in 0..200 {
            open = crate::metrics::scrape(&server.metrics_addr)
                .get("tally_open_batch_requests")
                .copied()
                .unwrap_or(0.0);
            if open >= accounts.len() as f64 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        assert_eq!(
            open,
            accounts.len() as f64,
            "every request reached the open batch"
        );
        let pid = server.child.id().to_string();
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.unwrap());
        }
        results
    });
    let status = server.terminate();
    assert!(status.success(), "clean exit after SIGTERM: {status}");
    for r in &results {
        let c = r
            .as_ref()
            .expect("every request in the open batch is confirmed before exit");
        verify_confirmation(c, &op_key).unwrap();
    }
    let server = operator.start();
    rt.block_on(async {
        let client = server.client().await;
        for k in &accounts {
            assert_eq!(balance(&client, public_key(k)).await, 5);
        }
    });
}

/// The archive (bodies, request index) is written behind the state. A replica whose archive is
/// behind at start (here: lost whole) rebuilds it from its raft log before it serves: a
/// resubmission still gets the original confirmation. When the raft log was compacted past the
/// archive's point, the replica refuses to start and says what to do instead of serving a
/// ledger that could apply a request twice.
#[test]
fn an_archive_behind_the_state_is_rebuilt_from_the_raft_log() {
    let rt = crate::harness::runtime();
    for compacted in [false, true] {
        let operator = Operator::new(|c| {
            c.batch.batch_window_ms = 5;
            if compacted {
                c.raft.compaction_entries = 2;
            }
        });
        let op_key = operator.profile.operator_key().unwrap();
        let chain = operator.profile.chain_id_bytes().unwrap();
        let deposit_key = operator.profile.load_deposit_key().unwrap();
        let alice = generate_key();
        let bob = public_key(&generate_key());
        let server = operator.start();
        let originals = rt.block_on(async {
            let client = server.client().await;
            let dep = build_request(&deposit_key, chain, Op::Deposit, 1, public_key(&alice), 100);
            let mut originals = vec![client.submit(dep).await.expect("deposit")];
            // One request per batch: the raft log holds several batches.
            for id in 1..=6u128 {
                let t = build_request(&alice, chain, Op::Transfer, id, bob, 1);
                originals.push(client.submit(t).await.expect("transfer"));
            }
            originals
        });
        assert!(server.terminate().success());
        let archive = operator.data_dir().join("ledger").join("archive");
        assert!(archive.join("CURRENT").exists(), "the archive lives here");
        std::fs::remove_dir_all(&archive).unwrap();

        if compacted {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally-server"))
                .arg("--config")
                .arg(&operator.config_path)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success(),
                "started without its archive: {stderr}"
            );
            assert!(
                stderr.contains("no longer holds entry")
                    && stderr.contains("wipe this replica's ledger and raft directories"),
                "{stderr}"
            );
            continue;
        }
        let server = operator.start();
        rt.block_on(async {
            let client = server.client().await;
            assert_eq!(
                check_chain(&client, &op_key).await,
                originals.last().unwrap().receipt.height
            );
            for (i, original) in originals.iter().enumerate().skip(1) {
                let again = build_request(&alice, chain, Op::Transfer, i as u128, bob, 1);
                let replay = client.submit(again).await.expect("replay");
                assert!(replay.replayed, "request {i} is known again");
                assert_eq!(replay.receipt, original.receipt);
                verify_confirmation(&replay, &op_key).unwrap();
            }
            assert_eq!(balance(&client, public_key(&alice)).await, 100 - 6);
        });
    }
}

/// A clean stop saves the request filter, so the next start loads it instead of scanning the
/// request table (`tally_request_filter_loaded`); after a kill, applies the saved filter does not
/// know about mean a scan. Either way every applied request is recognized when resubmitted.
#[test]
fn a_clean_stop_saves_the_request_filter_and_a_kill_falls_back_to_the_scan() {
    let rt = crate::harness::runtime();
    let operator = Operator::new(|c| c.batch.batch_window_ms = 5);
    let op_key = operator.profile.operator_key().unwrap();
    let chain = operator.profile.chain_id_bytes().unwrap();
    let deposit_key = operator.profile.load_deposit_key().unwrap();
    let alice = generate_key();
    let bob = public_key(&generate_key());
    let file = operator.data_dir().join("ledger").join("request-filter");
    let loaded = |server: &crate::harness::Server| {
        crate::metrics::scrape(&server.metrics_addr)["tally_request_filter_loaded"]
    };
    let transfer = |id: u128| build_request(&alice, chain, Op::Transfer, id, bob, 1);
    // Resubmits transfers 1..=n: each must come back as the original, never apply again.
    let replay_all = |client: &Client, originals: &[Confirmation]| {
        rt.block_on(async {
            for (i, original) in originals.iter().enumerate() {
                let replay = client
                    .submit(transfer(i as u128 + 1))
                    .await
                    .expect("replay");
                assert!(replay.replayed, "transfer {} is known again", i + 1);
                assert_eq!(replay.receipt, original.receipt);
                verify_confirmation(&replay, &op_key).unwrap();
            }
            assert_eq!(
                balance(client, public_key(&alice)).await,
                100 - originals.len() as u64
            );
        })
    };

    let server = operator.start();
    assert_eq!(loaded(&server), 0.0, "a new ledger has no saved filter");
    let mut originals = rt.block_on(async {
        let client = server.client().await;
        let dep = build_request(&deposit_key, chain, Op::Deposit, 1, public_key(&alice), 100);
        client.submit(dep).await.expect("deposit");
        let mut originals = Vec::new();
        for id in 1..=5u128 {
            originals.push(client.submit(transfer(id)).await.expect("transfer"));
        }
        originals
    });
    assert!(!file.exists(), "saved only at a clean stop");
    assert!(server.terminate().success());
    assert!(file.exists(), "a clean stop saves the filter");

    let server = operator.start();
    assert_eq!(loaded(&server), 1.0, "loaded after a clean stop");
    let client = rt.block_on(server.client());
    replay_all(&client, &originals);
    rt.block_on(async {
        originals.push(client.submit(transfer(6)).await.expect("transfer 6"));
    });
    drop(client);
    server.kill();

    // Killed after transfer 6: the saved filter (from before it) must not be used.
    let server = operator.start();
    assert_eq!(
        loaded(&server),
        0.0,
        "stale after a kill: rebuilt by a scan"
    );
    let client = rt.block_on(server.client());
    replay_all(&client, &originals);
}
