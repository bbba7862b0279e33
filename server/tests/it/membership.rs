//! Membership change on a live operator: three replica processes grow to four (a node made
//! with `init-cluster --add-node`, added as a learner, caught up, promoted) and shrink to three
//! (a follower removed: it stops and says why), while a client keeps transferring. Every
//! confirmation proves into the final chain and no transfer is applied twice.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tally_client::{build_request, generate_key, public_key, ClusterClient};
use tally_config::Config;
use tally_core::verify::verify_confirmation;
use tally_wire::{AdminCommand, Confirmation, MemberRole, MembersReply, Op};

use crate::cluster::{converged, fast};
use crate::cluster_harness::Cluster;
use crate::harness::Server;

/// Makes node `id` with `init-cluster --add-node` in the cluster's directory and moves it onto
/// free ports; returns its config path, peer address and client address.
pub(crate) fn add_node_files(cluster: &Cluster, id: u64) -> (std::path::PathBuf, String, String) {
    let dir = cluster.configs[&1].parent().unwrap().to_path_buf();
    let out = Command::new(env!("CARGO_BIN_EXE_tally-server"))
        .args(["init-cluster", "--dir"])
        .arg(&dir)
        .args(["--add-node", &id.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = dir.join(format!("node{id}.toml"));
    let mut config = Config::from_toml_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert!(
        !config.initial_voters().contains(&id),
        "a node added later starts outside the configuration"
    );
    config.listen.client = crate::cluster_harness::local_port();
    config.listen.peer = crate::cluster_harness::local_port();
    config.listen.metrics = "127.0.0.1:0".parse().unwrap();
    fast(&mut config);
    std::fs::write(&path, config.to_toml_string()).unwrap();
    let (peer, client) = (
        config.listen.peer.to_string(),
        config.listen.client.to_string(),
    );
    (path, peer, client)
}

pub(crate) async fn admin(
    cc: &ClusterClient,
    chain_id: [u8; 32],
    key: &ed25519_dalek::SigningKey,
    c: AdminCommand,
) -> MembersReply {
    let mut last = String::new();
    for _ in 0..50 {
        match cc.admin(chain_id, key, c.clone()).await {
            Ok(m) => return m,
            // A change still being applied, or a leader change: retry shortly.
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("admin {c:?} failed: {last}");
}

fn roles(m: &MembersReply) -> Vec<(u64, MemberRole)> {
    let mut v: Vec<_> = m.members.iter().map(|m| (m.id, m.role)).collect();
    v.sort_by_key(|(id, _)| *id);
    v
}

#[test]
fn an_operator_grows_to_four_replicas_and_shrinks_to_three_under_load() {
    let rt = crate::harness::runtime();
    rt.block_on(async {
        let mut cluster = Cluster::new(3, fast).await;
        cluster.start_all();
        let leader = cluster.leader().await;
        let admin_key = cluster.profile.load_admin_key().unwrap();
        let chain_id = cluster.profile.chain_id_bytes().unwrap();
        let op = cluster.profile.operator_key().unwrap();
        let deposit = cluster.profile.load_deposit_key().unwrap();
        let cc = Arc::new(cluster.cluster_client());
        let alice = generate_key();
        let alice_public = public_key(&alice);
        let bob = public_key(&generate_key());
        cc.submit(build_request(
            &deposit,
            chain_id,
            Op::Deposit,
            1,
            public_key(&alice),
            1 << 40,
        ))
        .await
        .expect("deposit");

        // A load that keeps transferring through every change, one unit each.
        let stop = Arc::new(AtomicBool::new(false));
        let confirmed: Arc<Mutex<Vec<Confirmation>>> = Arc::default();
        let load = {
            let (cc, stop, confirmed) = (cc.clone(), stop.clone(), confirmed.clone());
            tokio::spawn(async move {
                let mut id = 1u128;
                while !stop.load(Ordering::SeqCst) {
                    id += 1;
                    let r = build_request(&alice, chain_id, Op::Transfer, id, bob, 1);
                    // The same id until it is confirmed: a retry of a request that did commit
                    // returns its original confirmation, so each counts once.
                    let c = loop {
                        match cc.submit(r.clone()).await {
                            Ok(c) => break c,
                            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                        }
                    };
                    confirmed.lock().unwrap().push(c);
                }
            })
        };
        let before = roles(&admin(&cc, chain_id, &admin_key, AdminCommand::Members).await);
        assert_eq!(before.len(), 3);

        // Grow: node 4 from init-cluster --add-node, added as a learner, then promoted.
        let (config4, peer4, client4) = add_node_files(&cluster, 4);
        let server4 = Server::start_replica(&config4, &cluster.profile, 4);
        let add = AdminCommand::Add {
            id: 4,
            address: peer4,
            client_address: client4.clone(),
            learner: true,
        };
        let m = admin(&cc, chain_id, &admin_key, add).await;
        assert!(roles(&m).contains(&(4, MemberRole::Learner)), "{m:?}");
        cluster.servers.insert(4, server4);
        cluster.profile.replicas.push(tally_client::ReplicaAddress {
            id: 4,
            address: client4.clone(),
        });
        converged(&cluster).await;
        let m = admin(&cc, chain_id, &admin_key, AdminCommand::Promote { id: 4 }).await;
        assert!(roles(&m).contains(&(4, MemberRole::Voter)), "{m:?}");
        assert_eq!(
            m.members
                .iter()
                .filter(|m| m.role == MemberRole::Voter)
                .count(),
            4
        );
        tokio::time::sleep(Duration::from_millis(500)).await;

        // Shrink: a follower other than node 4 is removed; it stops and says why.
        let removed = *[1, 2, 3].iter().find(|&&id| id != leader).unwrap();
        let m = admin(
            &cc,
            chain_id,
            &admin_key,
            AdminCommand::Remove { id: removed },
        )
        .await;
        assert!(!roles(&m).iter().any(|(id, _)| *id == removed), "{m:?}");
        let server = cluster.servers.remove(&removed).unwrap();
        let status = server.wait_exit(Duration::from_secs(20));
        assert_eq!(
            status.map(|s| s.code()),
            Some(Some(0)),
            "the removed replica exits"
        );

        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::SeqCst);
        load.await.unwrap();
        let tip = converged(&cluster).await;
        let after = roles(&admin(&cc, chain_id, &admin_key, AdminCommand::Members).await);
        assert_eq!(after.len(), 3, "{after:?}");
        assert!(after.iter().all(|(_, r)| *r == MemberRole::Voter));

        // Zero lost or doubled: every confirmation proves into the chain the replicas hold,
        // and alice paid exactly one unit per confirmed transfer.
        let confirmed = confirmed.lock().unwrap().clone();
        assert!(
            confirmed.len() > 20,
            "the load kept going: {}",
            confirmed.len()
        );
        for c in &confirmed {
            verify_confirmation(c, &op).unwrap();
            assert!(c.receipt.height <= tip.header.height);
        }
        let b = cc
            .balance(alice_public, tally_wire::ReadMode::Linearizable)
            .await
            .unwrap();
        assert_eq!(b.balance, (1 << 40) - confirmed.len() as u64);
        eprintln!(
            "membership: {} transfers confirmed through the changes",
            confirmed.len()
        );
    });
}
