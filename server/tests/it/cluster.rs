//! Three real replica processes on 127.0.0.1: replication, failover, catch-up, snapshots and
//! partitions.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tally_client::{build_request, generate_key, public_key, ClusterClient};
use tally_core::crypto::{header_hash, verify_header};
use tally_core::verify::verify_confirmation;
use tally_wire::{Confirmation, Op, PublicKey, SignedHeader};

use crate::cluster_harness::Cluster;

pub fn fast(c: &mut tally_config::Config) {
    c.batch.batch_window_ms = 20;
    c.raft.tick_ms = 50;
    c.raft.election_ticks = 10;
    c.raft.heartbeat_ticks = 2;
}

/// Every replica's latest header, once all have applied the same height.
pub async fn converged(cluster: &Cluster) -> SignedHeader {
    let mut last = HashMap::new();
    for _ in 0..300 {
        last.clear();
        for &id in cluster.servers.keys() {
            if let Ok(c) = cluster.try_client_of(id).await {
                if let Ok(s) = c.status().await {
                    last.insert(id, s.latest_header.clone());
                }
            }
        }
        let first = last.values().next().cloned().flatten();
        if let Some(header) = &first {
            if last.len() == cluster.servers.len() && last.values().all(|h| *h == first) {
                return header.clone();
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("replicas did not converge: {last:?}");
}

/// Reads the whole header chain from replica `id`, checking signatures and links.
async fn chain(cluster: &Cluster, id: u64, operator: &PublicKey) -> Vec<SignedHeader> {
    let client = cluster.client_of(id).await;
    let mut headers: Vec<SignedHeader> = Vec::new();
    loop {
        let from = headers.len() as u64 + 1;
        let page = client.headers(from, 1024).await.expect("headers");
        if page.is_empty() {
            break;
        }
        headers.extend(page);
    }
    let mut prev = [0u8; 32];
    for (i, h) in headers.iter().enumerate() {
        assert_eq!(h.header.height, i as u64 + 1);
        assert_eq!(
            h.header.prev_hash,
            prev,
            "replica {id}: header {} links to its predecessor",
            i + 1
        );
        verify_header(operator, h).expect("header signature");
        prev = header_hash(&h.header);
    }
    headers
}

async fn transfer(
    cc: &ClusterClient,
    from: &ed25519_dalek::SigningKey,
    chain: [u8; 32],
    id: u128,
    to: PublicKey,
) -> Confirmation {
    cc.submit(build_request(from, chain, Op::Transfer, id, to, 1))
        .await
        .expect("transfer")
}

#[test]
fn three_replicas_replicate_fail_over_catch_up_and_rebuild_from_a_snapshot() {
    let rt = crate::harness::runtime();
    rt.block_on(async {
        // A small compaction threshold (in bytes: a few batches) so that a wiped replica must
        // be sent a snapshot.
        let mut cluster = Cluster::new(3, |c| {
            fast(c);
            c.raft.compaction_entries = 1_000_000;
            c.raft.compaction_bytes = 4096;
        })
        .await;
        cluster.start_all();
        let op = cluster.profile.operator_key().unwrap();
        let chain_id = cluster.profile.chain_id_bytes().unwrap();
        let deposit_key = cluster.profile.load_deposit_key().unwrap();
        let (alice, bob) = (generate_key(), public_key(&generate_key()));
        let leader = cluster.leader().await;
        let cc = cluster.cluster_client();
        let mut confirmed = vec![cc
            .submit(build_request(
                &deposit_key,
                chain_id,
                Op::Deposit,
                1,
                public_key(&alice),
                1_000_000,
            ))
            .await
            .expect("deposit")];
        let mut next_id = 1u128;
        for _ in 0..20 {
            next_id += 1;
            confirmed.push(transfer(&cc, &alice, chain_id, next_id, bob).await);
        }

        // SIGKILL the leader: another is elected and writes continue.
        cluster.kill(leader);
        let killed_at = Instant::now();
        next_id += 1;
        confirmed.push(transfer(&cc, &alice, chain_id, next_id, bob).await);
        eprintln!(
            "first confirmation {} ms after killing the leader",
            killed_at.elapsed().as_millis()
        );
        let new_leader = cluster.leader().await;
        assert_ne!(new_leader, leader);
        for _ in 0..20 {
            next_id += 1;
            confirmed.push(transfer(&cc, &alice, chain_id, next_id, bob).await);
        }

        // The killed replica restarts and catches up from its own disk and the leader's log.
        cluster.start(leader);
        converged(&cluster).await;

        // A follower wiped and restarted is rebuilt from a snapshot (the log was compacted).
        let follower = *cluster.ids.iter().find(|&&id| id != new_leader).unwrap();
        cluster.kill(follower);
        cluster.wipe(follower);
        for _ in 0..30 {
            next_id += 1;
            confirmed.push(transfer(&cc, &alice, chain_id, next_id, bob).await);
        }
        cluster.start(follower);
        converged(&cluster).await;
        // It was rebuilt from a snapshot: its raft log starts past the compaction point.
        cluster.kill(follower);
        let first = {
            let dir = cluster.data_dir(follower).join("raft");
            let log = tally_storage::RaftLogDb::open(&dir, &cluster.ids).unwrap();
            raft::Storage::first_index(&log).unwrap()
        };
        assert!(
            first > 1,
            "the wiped replica should have installed a snapshot (first index {first})"
        );
        // Its ledger directory lost, its raft log kept (past a snapshot point): at start it
        // fetches that snapshot from a peer before it applies anything, and catches up.
        std::fs::remove_dir_all(cluster.data_dir(follower).join("ledger")).unwrap();
        for _ in 0..5 {
            next_id += 1;
            confirmed.push(transfer(&cc, &alice, chain_id, next_id, bob).await);
        }
        cluster.start(follower);
        let tip = converged(&cluster).await;

        // Same state on every replica, one chain, and every confirmation proves into it.
        let chains: Vec<_> = {
            let mut v = Vec::new();
            for &id in &cluster.ids {
                v.push(chain(&cluster, id, &op).await);
            }
            v
        };
        assert!(
            chains.iter().all(|c| *c == chains[0]),
            "every replica holds the same header chain"
        );
        assert_eq!(chains[0].last().unwrap(), &tip);
        for c in &confirmed {
            verify_confirmation(c, &op).unwrap();
            assert_eq!(
                &chains[0][c.receipt.height as usize - 1],
                &c.header,
                "confirmed header is in the final chain"
            );
        }
        // Nothing applied twice: alice paid exactly one unit per confirmed transfer.
        let transfers = (confirmed.len() - 1) as u64;
        let b = cc
            .balance(public_key(&alice), tally_wire::ReadMode::Linearizable)
            .await
            .unwrap();
        assert_eq!(b.balance, 1_000_000 - transfers);
        let b = cc
            .balance(bob, tally_wire::ReadMode::Linearizable)
            .await
            .unwrap();
        assert_eq!(b.balance, transfers);
        // Every replica proves bob's balance against the same header and state map root,
        // the wiped one too, whose map was built from the rows of the snapshot it installed.
        let mut roots = Vec::new();
        for &id in &cluster.ids {
            let p = cluster
                .client_of(id)
                .await
                .balance_proof(bob)
                .await
                .unwrap();
            tally_core::verify::verify_balance_proof(&p, &op).unwrap();
            assert_eq!(
                (p.balance, &p.header),
                (Some(transfers), &tip),
                "replica {id}"
            );
            roots.push(p.map_root);
        }
        assert!(roots.iter().all(|r| *r == roots[0]), "{roots:?}");
    });
}

#[test]
fn a_partitioned_leader_confirms_nothing_while_the_majority_commits() {
    let rt = crate::harness::runtime();
    rt.block_on(async {
        let mut cluster = Cluster::new(3, fast).await;
        cluster.start_all();
        let op = cluster.profile.operator_key().unwrap();
        let chain_id = cluster.profile.chain_id_bytes().unwrap();
        let deposit_key = cluster.profile.load_deposit_key().unwrap();
        let (alice, bob) = (generate_key(), public_key(&generate_key()));
        let old = cluster.leader().await;
        let cc = cluster.cluster_client();
        cc.submit(build_request(
            &deposit_key,
            chain_id,
            Op::Deposit,
            1,
            public_key(&alice),
            1000,
        ))
        .await
        .expect("deposit");
        let before = cluster
            .client_of(old)
            .await
            .status()
            .await
            .unwrap()
            .applied_height;

        // Cut the old leader off from both others, then ask it (and only it) to transfer.
        cluster.isolate(old, true);
        let direct = cluster
            .client_of(old)
            .await
            .with_timeout(Duration::from_secs(4));
        let cut_off = build_request(&alice, chain_id, Op::Transfer, 77, bob, 5);
        match direct.submit(cut_off.clone()).await {
            Ok(c) => panic!("a partitioned leader confirmed height {}", c.receipt.height),
            Err(e) => eprintln!("partitioned leader answered: {e}"),
        }
        let status = direct.status().await.unwrap();
        assert_eq!(
            status.applied_height, before,
            "the cut-off leader applied nothing"
        );

        // The majority elects a leader among themselves and keeps committing.
        let others: Vec<u64> = cluster
            .ids
            .iter()
            .copied()
            .filter(|&id| id != old)
            .collect();
        let mut majority_leader = None;
        for _ in 0..200 {
            for &id in &others {
                if cluster
                    .client_of(id)
                    .await
                    .status()
                    .await
                    .is_ok_and(|s| s.writable)
                {
                    majority_leader = Some(id);
                }
            }
            if majority_leader.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let new = majority_leader.expect("the majority elects a leader");
        let c = cluster
            .client_of(new)
            .await
            .submit(build_request(&alice, chain_id, Op::Transfer, 78, bob, 5))
            .await
            .expect("the majority commits");
        verify_confirmation(&c, &op).unwrap();
        assert_eq!(
            direct.status().await.unwrap().applied_height,
            before,
            "still nothing on the old leader"
        );

        // Heal: the old leader rejoins as a follower and converges; the request it was sent
        // while cut off was never applied, and a retry with the same id applies it once.
        cluster.isolate(old, false);
        converged(&cluster).await;
        let retried = cc.submit(cut_off).await.expect("retry after healing");
        verify_confirmation(&retried, &op).unwrap();
        let again = cc
            .submit(build_request(&alice, chain_id, Op::Transfer, 77, bob, 5))
            .await
            .unwrap();
        assert!(again.replayed);
        assert_eq!(again.receipt, retried.receipt);
        let b = cc
            .balance(public_key(&alice), tally_wire::ReadMode::Linearizable)
            .await
            .unwrap();
        assert_eq!(b.balance, 1000 - 10);
        converged(&cluster).await;
    });
}

#[test]
fn a_peer_whose_certificate_does_not_match_its_claimed_id_is_refused() {
    use std::sync::Arc;
    use tally_server::peer::{check_cert_names, hello, peer_tls, CHANNEL_RAFT};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let rt = crate::harness::runtime();
    rt.block_on(async {
        let mut cluster = Cluster::new(3, fast).await;
        cluster.start(1);
        let root = cluster.configs[&1].parent().unwrap().to_path_buf();
        let config = tally_config::Config::from_toml_str(
            &std::fs::read_to_string(&cluster.configs[&1]).unwrap(),
        )
        .unwrap();
        let chain_id = config.chain_id_bytes();

        // The name check itself: node 2's certificate is good for node 2 only.
        let cert2 = tally_server::tls::load_certs(&root.join("node2.pem")).unwrap();
        check_cert_names(&cert2[0], 2).expect("node 2's certificate names node 2");
        let err = check_cert_names(&cert2[0], 3).unwrap_err();
        assert!(err.to_string().contains("not for node 3"), "{err}");

        // Over the wire: dial node 1 with node 2's certificate, claim to be node 3, and send a
        // raft message; node 1 closes the connection without reading it.
        let (_, client) = peer_tls(
            &root.join("ca.pem"),
            &root.join("node2.pem"),
            &root.join("node2.key"),
        )
        .unwrap();
        let connect = |claim: u64| {
            let client = Arc::clone(&client);
            let peer = config.listen.peer;
            async move {
                let tcp = tokio::net::TcpStream::connect(peer).await.unwrap();
                let name = rustls::pki_types::ServerName::try_from("node-1.tally").unwrap();
                let mut tls = tokio_rustls::TlsConnector::from(client)
                    .connect(name, tcp)
                    .await
                    .unwrap();
                tls.write_all(&hello(claim, &chain_id, CHANNEL_RAFT))
                    .await
                    .unwrap();
                let msg = raft::eraftpb::Message {
                    from: claim,
                    to: 1,
                    ..Default::default()
                };
                let bytes = tally_core::replica::encode_message(&msg);
                let _ = tls.write_all(&(bytes.len() as u32 + 1).to_le_bytes()).await;
                let _ = tls.write_all(&[tally_server::peer::FRAME_RAFT]).await;
                let _ = tls.write_all(&bytes).await;
                let _ = tls.flush().await;
                let mut buf = [0u8; 1];
                // Refused: the server closes (EOF or reset). Accepted: nothing comes back and
                // the read times out.
                match tokio::time::timeout(Duration::from_secs(3), tls.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => true,
                    Ok(Ok(_)) => panic!("a peer never sends on an inbound connection"),
                    Err(_) => false,
                }
            }
        };
        assert!(
            connect(3).await,
            "claiming node 3 with node 2's certificate is refused"
        );
        assert!(
            !connect(2).await,
            "the same certificate claiming node 2 is accepted"
        );
    });
}

/// Operator key rotation on three replicas (PROTOCOL.md §4.14): every replica holds the next
/// key; one is down during the rotation and replays it when it comes back; afterwards every
/// replica's chain verifies under the key chain, the new key signing every header after the
/// rotation's, and a leader change keeps the new key.
#[test]
fn three_replicas_rotate_the_operator_key_and_a_late_one_follows() {
    let rt = crate::harness::runtime();
    rt.block_on(async {
        let keys = tempfile::tempdir().unwrap();
        let next = generate_key();
        let next_path = keys.path().join("next-operator.key");
        tally_server::bootstrap::write_signing_key(&next_path, &next).unwrap();
        let mut cluster = Cluster::new(3, |c| {
            fast(c);
            c.operator.as_mut().unwrap().next_signing_key = Some(next_path.clone());
        })
        .await;
        cluster.start_all();
        let genesis = cluster.profile.operator_key().unwrap();
        let chain_id = cluster.profile.chain_id_bytes().unwrap();
        let deposit_key = cluster.profile.load_deposit_key().unwrap();
        let admin = cluster.profile.load_admin_key().unwrap();
        let alice = public_key(&generate_key());
        let cc = cluster.cluster_client();
        let deposit = |id: u128| build_request(&deposit_key, chain_id, Op::Deposit, id, alice, 5);
        cc.submit(deposit(1)).await.expect("deposit");
        let leader = cluster.leader().await;
        let late = cluster
            .ids
            .iter()
            .copied()
            .find(|&id| id != leader)
            .unwrap();
        cluster.kill(late);

        let link = cc
            .rotate_key(chain_id, &admin, public_key(&next))
            .await
            .expect("rotate-key");
        let mut keys = tally_core::key_chain::KeySchedule::genesis(genesis);
        keys.extend(&link)
            .expect("the answered link follows the genesis key");
        let rotated_at = link.header.header.height;
        for id in 2..=4 {
            let c = cc.submit(deposit(id)).await.expect("deposit");
            assert!(c.header.header.height > rotated_at);
            verify_confirmation(&c, &public_key(&next)).expect("signed by the new key");
        }

        // The late replica applies the rotation batch and signs with the new key.
        cluster.start(late);
        cluster.kill(leader);
        cc.submit(deposit(5))
            .await
            .expect("deposit after the leader's death");
        cluster.start(leader);
        let tip = converged(&cluster).await;
        assert!(tip.header.height > rotated_at + 3);
        let served = cc.key_chain().await.expect("key chain").links;
        assert_eq!(served, vec![link]);
        for id in cluster.ids.clone() {
            let headers = chain_under(&cluster, id, &keys).await;
            assert_eq!(headers.last(), Some(&tip), "replica {id}");
        }
    });
}

/// Replica `id`'s header chain, each header checked under the key for its height.
pub async fn chain_under(
    cluster: &Cluster,
    id: u64,
    keys: &tally_core::key_chain::KeySchedule,
) -> Vec<SignedHeader> {
    let client = cluster.client_of(id).await;
    let mut headers: Vec<SignedHeader> = Vec::new();
    loop {
        let page = client
            .headers(headers.len() as u64 + 1, 1024)
            .await
            .expect("headers");
        if page.is_empty() {
            break;
        }
        headers.extend(page);
    }
    for h in &headers {
        keys.verify_header(h)
            .unwrap_or_else(|e| panic!("replica {id}, height {}: {e}", h.header.height));
    }
    headers
}
