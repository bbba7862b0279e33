//! Threshold signing across replicas (issue 20 point 4, PROTOCOL.md §4.15): three real replica
//! processes of an `init-cluster --threshold` operator, each holding only its FROST share.
//! Every header and checkpoint is signed by a majority after commit; the signatures are
//! ordinary Ed25519 ones under the group key, through a leader's death and a restart.

use tally_client::{build_request, generate_key, public_key};
use tally_core::header_log::verify_consistency_reply;
use tally_core::key_chain::KeySchedule;
use tally_core::verify::verify_confirmation;
use tally_wire::Op;

use crate::cluster::{chain_under, converged, fast};
use crate::cluster_harness::Cluster;

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

#[test]
fn a_majority_signs_every_header_and_checkpoint_through_a_leader_change() {
    let rt = crate::harness::runtime();
    rt.block_on(async {
        let mut cluster = Cluster::threshold(3, fast).await;
        assert_no_whole_key(&cluster);
        cluster.start_all();
        let group = cluster.profile.operator_key().unwrap();
        let chain_id = cluster.profile.chain_id_bytes().unwrap();
        let deposit_key = cluster.profile.load_deposit_key().unwrap();
        let alice = public_key(&generate_key());
        let cc = cluster.cluster_client();
        let deposit = |id: u128| build_request(&deposit_key, chain_id, Op::Deposit, id, alice, 5);
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
    });
}
