//! Threshold signing across replicas (issue 20 point 4, PROTOCOL.md §4.15): three real replica
//! processes of an `init-cluster --threshold` operator, each holding only its FROST share.
//! Every header and checkpoint is signed by a majority after commit; the signatures are
//! ordinary Ed25519 ones under the group key, through a leader's death and a restart, and the
//! archive the leader writes with them passes `tally audit`.

use tally_client::{build_request, generate_key, public_key};
use tally_core::header_log::{verify_consistency_reply, verify_consistency_reply_under};
use tally_core::key_chain::KeySchedule;
use tally_core::verify::verify_confirmation;
use tally_core::witness::cosigned_at;
use tally_wire::{Hash, Op, PublicKey, Request};

use crate::archive::{restore_with, wait_archived};
use crate::cluster::{chain_under, converged, fast};
use crate::cluster_harness::Cluster;
use crate::consistency::{start_witness, KillOnDrop};
use crate::metrics::get;
use crate::rotation_archive::audit_at;

/// No file of the operator holds the whole key: no `operator.key`, and each replica's config
/// names its own share file, which holds one share.
fn assert_no_whole_key(cluster: &Cluster) {
    let dir = cluster.operator_dir();
    assert!(!dir.join("operator.key").exists(), "the whole key on disk");
    for id in &cluster.ids {
        let text = std::fs::read_to_string(&cluster.configs[id]).unwrap();
        let config = tally_config::Config::from_toml_str(&text).unwrap();
        let operator = config.operator.unwrap();
        assert_eq!(operator.signing_key, None, "node {id}");
        let share = operator.signing_key_share.expect("a share");
        let file = tally_server::bootstrap::ShareFile::read(&dir.join(share)).unwrap();
        assert_eq!(
            (file.signer as u64, file.threshold, file.signers),
            (*id, 2, 3)
        );
    }
}

/// The group key, the chain id, and a deposit of 5 to one new account by request id.
fn deposits(cluster: &Cluster) -> (PublicKey, Hash, impl Fn(u128) -> Request) {
    let group = cluster.profile.operator_key().unwrap();
    let chain_id = cluster.profile.chain_id_bytes().unwrap();
    let key = cluster.profile.load_deposit_key().unwrap();
    let alice = public_key(&generate_key());
    let deposit = move |id| build_request(&key, chain_id, Op::Deposit, id, alice, 5);
    (group, chain_id, deposit)
}

#[test]
fn a_majority_signs_every_header_and_checkpoint_through_a_leader_change() {
    let rt = crate::harness::runtime();
    rt.block_on(async {
        let mut cluster = Cluster::threshold(3, fast).await;
        assert_no_whole_key(&cluster);
        cluster.start_all();
        let (group, chain_id, deposit) = deposits(&cluster);
        let cc = cluster.cluster_client();
        for id in 1..=5 {
            let c = cc.submit(deposit(id)).await.expect("deposit");
            verify_confirmation(&c, &group).expect("an ordinary signature by the group key");
        }

        // The leader dies: the other two are a majority and sign on.
        let leader = cluster.leader().await;
        cluster.kill(leader);
        for id in 6..=8 {
            let c = cc
                .submit(deposit(id))
                .await
                .expect("deposit after the leader's death");
            verify_confirmation(&c, &group).expect("signed by the two left");
        }
        // A resubmission gets its original confirmation, signed.
        let again = cc.submit(deposit(7)).await.expect("resubmission");
        verify_confirmation(&again, &group).expect("the original confirmation");

        cluster.start(leader);
        let c = cc
            .submit(deposit(9))
            .await
            .expect("deposit after the restart");
        verify_confirmation(&c, &group).expect("signed");
        let tip = converged(&cluster).await;
        let keys = KeySchedule::genesis(group);
        for id in cluster.ids.clone() {
            let headers = chain_under(&cluster, id, &keys).await;
            assert_eq!(headers.last(), Some(&tip), "replica {id}");
        }
        // The checkpoints are signed too: a consistency proof across the leader change.
        let reply = cc
            .consistency(2, tip.header.height)
            .await
            .expect("consistency");
        let (from, to) = verify_consistency_reply(&reply, &group, &chain_id).expect("valid");
        assert_eq!((from.size, to.size), (2, tip.header.height));

        // The archive (the leader's writer, no key held) holds every batch under checkpoints
        // the threshold signed: `tally audit` verifies it from its objects alone.
        let dir = cluster.operator_dir();
        let report = audit_at(
            &dir.join("profile.toml"),
            &dir.join("archive"),
            tip.header.height,
        );
        assert_eq!(report["batches"], tip.header.height, "{report}");
        assert_eq!(
            report["checkpoint_signatures"], tip.header.height,
            "every checkpoint's signature is archived: {report}"
        );
    });
}

/// Every replica of a threshold operator lost, then each restored from the archive alone:
/// from its (unsigned) snapshots or by a full replay, keeping the archive's signatures, since
/// no replica can sign alone. The restored three sign on together; retries get their original
/// confirmations; the checkpoint at the restored height and after it prove consistency; the
/// archive, snapshots included, passes `tally audit`.
#[test]
fn every_threshold_replica_lost_then_restored_from_the_archive_alone() {
    let rt = crate::harness::runtime();
    rt.block_on(async {
        let mut cluster = Cluster::threshold(3, |c| {
            fast(c);
            c.archive.snapshot_every_batches = 4;
        })
        .await;
        cluster.start_all();
        let (group, chain_id, deposit) = deposits(&cluster);
        let cc = cluster.cluster_client();
        let first = cc.submit(deposit(0)).await.expect("deposit");
        for id in 1..12 {
            cc.submit(deposit(id)).await.expect("deposit");
        }
        let leader = cluster.leader().await;
        let height = wait_archived(&cluster.client_of(leader).await).await;
        // A snapshot is written after the checkpoint covering it, which can come after the
        // batches: wait for one, or replica 1 has none to start from.
        wait_for_snapshot(&cluster.operator_dir().join("archive")).await;
        for id in cluster.ids.clone() {
            cluster.kill(id);
            cluster.wipe(id);
        }
        for (id, args) in [(1, &[][..]), (2, &["--full-replay"][..]), (3, &[][..])] {
            let (ok, out) = restore_with(&cluster.configs[&id], args);
            assert!(
                ok && out.contains(&format!("restored height {height}")),
                "replica {id}: {out}"
            );
            assert_eq!(
                out.contains("from height 1,"),
                id == 2,
                "replica {id} starts from a snapshot unless told to replay: {out}"
            );
        }
        cluster.start_all();
        let c = cc.submit(deposit(12)).await.expect("the restored sign on");
        verify_confirmation(&c, &group).expect("signed by the group key");
        let again = cc.submit(deposit(0)).await.expect("a retry");
        assert!(again.replayed);
        assert_eq!((again.receipt, again.header), (first.receipt, first.header));
        let tip = converged(&cluster).await;
        assert!(tip.header.height > height);
        // Every checkpoint signature came back from the archive: proofs from before the loss.
        for (from, to) in [
            (2, height),
            (1, tip.header.height),
            (height, tip.header.height),
        ] {
            let reply = cc.consistency(from, to).await.expect("consistency");
            let (a, b) = verify_consistency_reply(&reply, &group, &chain_id).expect("valid");
            assert_eq!((a.size, b.size), (from, to));
        }
        let leader = cluster.leader().await;
        let archived = wait_archived(&cluster.client_of(leader).await).await;
        let dir = cluster.operator_dir();
        let report = audit_at(&dir.join("profile.toml"), &dir.join("archive"), archived);
        assert_eq!(report["batches"], archived, "{report}");
        assert!(
            report["snapshots"].as_u64() >= Some(height / 4),
            "the threshold's unsigned snapshots are audited: {report}"
        );
        assert_eq!(report["checkpoint_signatures"], archived, "{report}");
    });
}

/// Witnesses and the explorer on a threshold operator: the leader sends the threshold-signed
/// checkpoints to a witness (a real `tally witness` process), which cosigns them, and the
/// explorer serves a checkpoint that verifies under the group key.
#[test]
fn a_witness_cosigns_and_the_explorer_serves_threshold_signed_checkpoints() {
    let rt = crate::harness::runtime();
    rt.block_on(async {
        let mut cluster = Cluster::threshold(3, |c| {
            fast(c);
            c.explorer.enabled = true;
        })
        .await;
        let witness_key = cluster.operator_dir().join("witness.key");
        let key = generate_key();
        tally_client::write_key(&witness_key, &key).unwrap();
        let profile_path = cluster.operator_dir().join("profile.toml");
        let (witness, _out, addr, name) = start_witness(&profile_path, &witness_key);
        let _witness = KillOnDrop(witness);
        for path in cluster.configs.values() {
            let text = std::fs::read_to_string(path).unwrap();
            let mut config = tally_config::Config::from_toml_str(&text).unwrap();
            config.witnesses.push(tally_config::WitnessConfig {
                url: format!("http://{addr}"),
                public_key: hex::encode(key.verifying_key().as_bytes()),
            });
            std::fs::write(path, config.to_toml_string()).unwrap();
        }
        cluster.start_all();
        let group = cluster.profile.operator_key().unwrap();
        let group_key = ed25519_dalek::VerifyingKey::from_bytes(&group).unwrap();
        let chain_id = cluster.profile.chain_id_bytes().unwrap();
        let origin = tally_core::tlog::origin_for(&chain_id);
        let deposit_key = cluster.profile.load_deposit_key().unwrap();
        let cc = cluster.cluster_client();
        let alice = public_key(&generate_key());
        let mut height = 0;
        for id in 1..=3 {
            let request = build_request(&deposit_key, chain_id, Op::Deposit, id, alice, 5);
            height = cc
                .submit(request)
                .await
                .expect("deposit")
                .header
                .header
                .height;
        }

        let mut cosigned = None;
        for _ in 0..100 {
            if let Ok(note) = cc.checkpoint().await {
                let at = cosigned_at(&note, &name, &key.verifying_key()).unwrap();
                if at.is_some() && note_size(&note) >= height {
                    cosigned = Some(note);
                    break;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let note = cosigned.expect("a cosigned checkpoint covering the deposits");
        tally_core::tlog::open_note(&note, &origin, &group_key).expect("signed by the group");

        let leader = cluster.leader().await;
        let metrics = cluster.servers[&leader].metrics_addr.clone();
        let (status, body) = get(&metrics, "/explorer/api/checkpoint");
        assert_eq!(status, 200, "{body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        let served = json["checkpoint"].as_str().expect("a checkpoint");
        tally_core::tlog::open_note(served, &origin, &group_key).expect("under the group key");
    });
}

/// The tree size a checkpoint note names (its second line).
fn note_size(note: &str) -> u64 {
    note.lines()
        .nth(1)
        .and_then(|l| l.parse().ok())
        .unwrap_or(0)
}

/// Rotating a threshold group after a membership change (issue 20 point 5): a fourth replica
/// is added (`init-cluster --add-node`, learner, promoted) and a follower removed; a new group
/// is dealt to the three members (`init-cluster --new-group --members`), the two old ones
/// restart holding their next shares, and `tally cluster rotate-key` names the new group's key.
/// The old group signs the rotation's batch, the new one every header after it, each
/// checkpoint by the group of the header after it; confirmations before and after verify
/// through the key chain, and the archive audits.
#[test]
fn a_threshold_group_rotates_to_a_new_group_after_a_membership_change() {
    use crate::membership::{add_node_files, admin};
    use tally_wire::AdminCommand;
    let rt = crate::harness::runtime();
    rt.block_on(async {
        let mut cluster = Cluster::threshold(3, fast).await;
        cluster.start_all();
        let (old, chain_id, deposit) = deposits(&cluster);
        let admin_key = cluster.profile.load_admin_key().unwrap();
        let cc = cluster.cluster_client();
        let before = cc.submit(deposit(1)).await.expect("deposit");
        verify_confirmation(&before, &old).expect("signed by the old group");

        // Replica 4 joins and a follower leaves: the new group is dealt to the three members
        // (replica 4 holds no share of the old group, so it does not campaign).
        let (config4, peer4, client4) = add_node_files(&cluster, 4);
        let leader = cluster.leader().await;
        let gone = *[1, 2, 3].iter().find(|&&id| id != leader).unwrap();
        let members: Vec<u64> = [1, 2, 3, 4].into_iter().filter(|id| *id != gone).collect();
        let listed: Vec<String> = members.iter().map(u64::to_string).collect();
        let new = deal_new_group(&cluster.operator_dir(), &listed.join(","));
        let server4 = crate::harness::Server::start_replica(&config4, &cluster.profile, 4);
        cluster.servers.insert(4, server4);
        let add = AdminCommand::Add {
            id: 4,
            address: peer4,
            client_address: client4.clone(),
            learner: true,
        };
        admin(&cc, chain_id, &admin_key, add).await;
        cluster.profile.replicas.push(tally_client::ReplicaAddress {
            id: 4,
            address: client4,
        });
        cluster.ids.push(4);
        converged(&cluster).await;
        admin(&cc, chain_id, &admin_key, AdminCommand::Promote { id: 4 }).await;
        // The other two old members still make the old group's majority.
        admin(&cc, chain_id, &admin_key, AdminCommand::Remove { id: gone }).await;
        let server = cluster.servers.remove(&gone).unwrap();
        server.wait_exit(std::time::Duration::from_secs(20));
        cluster.ids.retain(|id| *id != gone);
        let during = cc.submit(deposit(2)).await.expect("deposit");
        verify_confirmation(&during, &old).expect("signed by the old group");

        // The old two restart holding their shares of the new group.
        for id in cluster.ids.clone().into_iter().filter(|id| *id != 4) {
            cluster.kill(id);
            cluster.start(id);
            cc.submit(deposit(10 + id as u128)).await.expect("deposit");
        }
        let link = cc
            .rotate_key(chain_id, &admin_key, new)
            .await
            .expect("rotate-key to the new group");
        let mut keys = KeySchedule::genesis(old);
        keys.extend(&link)
            .expect("the old group signed the rotation");
        let rotated_at = link.header.header.height;
        for id in 20..=24 {
            let c = cc
                .submit(deposit(id))
                .await
                .expect("deposit after the rotation");
            assert!(c.header.header.height > rotated_at);
            verify_confirmation(&c, &new).expect("signed by the new group");
            assert!(verify_confirmation(&c, &old).is_err());
        }
        let again = cc.submit(deposit(1)).await.expect("a retry");
        assert_eq!(
            again.header, before.header,
            "the original, under the old group"
        );

        let tip = converged(&cluster).await;
        for id in cluster.ids.clone() {
            let headers = chain_under(&cluster, id, &keys).await;
            assert_eq!(headers.last(), Some(&tip), "replica {id}");
        }
        // Checkpoints on both sides of the rotation, each under its group: the one of size
        // `rotated_at - 1` under the old (the key of the header after it), from `rotated_at` on
        // under the new (a reply also carries the header at each size, under its own key).
        let reply = cc.consistency(1, rotated_at - 1).await.unwrap();
        verify_consistency_reply(&reply, &old, &chain_id).expect("the old group's");
        let reply = cc
            .consistency(rotated_at + 1, tip.header.height)
            .await
            .unwrap();
        verify_consistency_reply(&reply, &new, &chain_id).expect("the new group's");
        let reply = cc
            .consistency(rotated_at - 1, tip.header.height)
            .await
            .unwrap();
        assert!(verify_consistency_reply(&reply, &old, &chain_id).is_err());
        let (from, to) = verify_consistency_reply_under(&reply, &keys, &chain_id).unwrap();
        assert_eq!((from.size, to.size), (rotated_at - 1, tip.header.height));

        let leader = cluster.leader().await;
        let archived = wait_archived(&cluster.client_of(leader).await).await;
        let dir = cluster.operator_dir();
        let report = audit_at(&dir.join("profile.toml"), &dir.join("archive"), archived);
        assert_eq!(report["batches"], archived, "{report}");
        assert_eq!(report["checkpoint_signatures"], archived, "{report}");
        assert_eq!(report["key_rotations"], 1, "{report}");
    });
}

/// Runs `init-cluster --dir DIR --new-group --members MEMBERS`; returns the new group's key.
fn deal_new_group(dir: &std::path::Path, members: &str) -> PublicKey {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally-server"))
        .args(["init-cluster", "--dir"])
        .arg(dir)
        .args(["--new-group", "--members", members])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("new group key: "))
        .expect("the new group's key");
    let hex_key = line.split_whitespace().next().unwrap();
    hex::decode(hex_key).unwrap().try_into().unwrap()
}

/// Waits (up to 60 s) until the local archive in `archive` holds a snapshot manifest.
async fn wait_for_snapshot(archive: &std::path::Path) {
    let dir = archive.join(tally_core::snapshot::MANIFEST_PREFIX.trim_end_matches('/'));
    let started = std::time::Instant::now();
    while std::fs::read_dir(&dir).map_or(true, |mut d| d.next().is_none()) {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "no snapshot in {}",
            dir.display()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
