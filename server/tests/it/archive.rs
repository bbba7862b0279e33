//! The archive with real server processes and a real S3 server (SeaweedFS; CI starts one with
//! `.ci/s3.sh`, and the outage test starts its own): every replica's data lost and restored,
//! a leader killed while it archives, the store down and back.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tally_client::{build_request, generate_key, public_key, Client};
use tally_config::{ArchiveUrl, Config};
use tally_core::archive::batch_key;
use tally_core::verify::verify_confirmation;
use tally_storage::archive_read::{audit, AuditReport};
use tally_storage::bucket::{Bucket, BucketSettings};
use tally_wire::{Confirmation, ErrorCode, Op, ReadMode};

use crate::cluster_harness::Cluster;
use crate::harness::{runtime, Operator};

/// A fresh archive URL: a prefix of the test bucket on S3 when a server is there (always in
/// CI), else a directory under `dir`.
fn archive_url(name: &str, dir: &Path) -> String {
    if std::env::var_os("TALLY_TEST_S3").is_some() {
        return format!("s3://tally-test/{name}-{}", rand::random::<u64>());
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must run the archive tests against S3: start it with .ci/s3.sh"
    );
    dir.join(format!("archive-{name}")).display().to_string()
}

fn open(url: &str, config: &Config) -> Bucket {
    Bucket::open(&BucketSettings {
        url: ArchiveUrl::parse(url).unwrap(),
        endpoint: config.archive.endpoint.clone(),
        region: String::new(),
        allow_http: config.archive.allow_http,
    })
    .unwrap()
}

fn load(path: &Path) -> Config {
    Config::from_toml_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn audit_of(rt: &tokio::runtime::Runtime, bucket: &Bucket, op: &Operator) -> AuditReport {
    let operator = op.profile.operator_key().unwrap();
    let chain = op.profile.chain_id_bytes().unwrap();
    rt.block_on(audit(bucket, Some(&chain), &operator, None))
        .unwrap()
}

/// Runs `tally-server restore --config FILE`; returns (success, stdout + stderr).
fn restore(config: &Path) -> (bool, String) {
    restore_with(config, &[])
}

pub(crate) fn restore_with(config: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tally-server"))
        .arg("restore")
        .args(args)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Waits until the replica reports the archive at its applied height.
pub(crate) async fn wait_archived(client: &Client) -> u64 {
    let started = Instant::now();
    loop {
        let s = client.status().await.unwrap();
        if s.archive_height == Some(s.applied_height) && s.applied_height > 0 {
            return s.applied_height;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the archive stayed at {:?} of {}",
            s.archive_height,
            s.applied_height
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn every_replica_lost_then_restored_from_the_archive_alone() {
    let dir = tempfile::tempdir().unwrap();
    let url = archive_url("restore", dir.path());
    let op = Operator::new(|c| {
        c.batch.batch_window_ms = 20;
        c.archive.url = url.clone();
        // Snapshots along the way, which the restore checks its state against.
        c.archive.snapshot_every_batches = 4;
    });
    let config = load(&op.config_path);
    let (chain, op_key) = (
        op.profile.chain_id_bytes().unwrap(),
        op.profile.operator_key().unwrap(),
    );
    let deposit = op.profile.load_deposit_key().unwrap();
    let (alice, bob) = (generate_key(), generate_key());
    let rt = runtime();

    let server = op.start();
    let (first, height) = rt.block_on(async {
        let client = server.client().await;
        let dep = build_request(&deposit, chain, Op::Deposit, 1, public_key(&alice), 5_000);
        let first = client.submit(dep).await.unwrap();
        for i in 0..40u128 {
            let t = build_request(&alice, chain, Op::Transfer, 100 + i, public_key(&bob), 3);
            client.submit(t).await.unwrap();
        }
        (first, wait_archived(&client).await)
    });
    server.kill();
    // Every replica's data is gone; keys and config survive (they are not in the archive).
    std::fs::remove_dir_all(op.data_dir().join("ledger")).unwrap();
    std::fs::remove_dir_all(op.data_dir().join("raft")).unwrap();
    let (ok, out) = restore(&op.config_path);
    assert!(ok, "{out}");
    assert!(out.contains(&format!("restored height {height}")), "{out}");
    assert!(
        out.contains("from the snapshot at"),
        "the restore starts from the newest snapshot: {out}"
    );
    let (again, out) = restore(&op.config_path);
    assert!(
        !again && out.contains("not empty"),
        "restore never writes over a ledger: {out}"
    );
    same_ledger_by_full_replay(&op, height);

    let server = op.start();
    let proof = rt.block_on(async {
        let client = server.client().await;
        let b = client
            .balance(public_key(&bob), ReadMode::Linearizable)
            .await;
        assert_eq!(b.unwrap().balance, 120);
        // A retry of a request confirmed before the loss: the original, never applied twice.
        let dep = build_request(&deposit, chain, Op::Deposit, 1, public_key(&alice), 5_000);
        let replay: Confirmation = client.submit(dep).await.unwrap();
        assert!(replay.replayed);
        verify_confirmation(&replay, &op_key).unwrap();
        assert_eq!(
            (replay.receipt, replay.header),
            (first.receipt, first.header)
        );
        let a = client
            .balance(public_key(&alice), ReadMode::Linearizable)
            .await;
        assert_eq!(a.unwrap().balance, 5_000 - 120);
        // The restored operator goes on archiving where the archive ended.
        let t = build_request(&alice, chain, Op::Transfer, 999, public_key(&bob), 1);
        client.submit(t).await.unwrap();
        assert_eq!(wait_archived(&client).await, height + 1);
        client.balance_proof(public_key(&bob)).await.unwrap()
    });
    drop(server);
    let bucket = open(&url, &config);
    let report = audit_of(&rt, &bucket, &op);
    assert!(report.ok, "{:?}", report.errors);
    assert_eq!(report.batches, height + 1);
    // The audit recomputes, from the archive alone, the state map root the replica proves
    // balances against.
    assert_eq!(proof.header.header.height, height + 1);
    assert_eq!(report.state_map_root, Some(proof.map_root));
    assert!(
        report.snapshots >= height / 4,
        "{} snapshots",
        report.snapshots
    );

    // A damaged archive: the audit names the object and a restore refuses it.
    let key = batch_key(2);
    let mut bytes = rt.block_on(bucket.get(&key)).unwrap().unwrap().0.to_vec();
    let at = bytes.len() - 1;
    bytes[at] ^= 0x40;
    rt.block_on(bucket.delete(&key)).unwrap();
    rt.block_on(bucket.put_new(&key, bytes.into())).unwrap();
    let report = audit_of(&rt, &bucket, &op);
    assert_eq!(report.errors[0].key, key, "{:?}", report.errors);
    std::fs::remove_dir_all(op.data_dir().join("ledger")).unwrap();
    std::fs::remove_dir_all(op.data_dir().join("raft")).unwrap();
    let (ok, out) = restore(&op.config_path);
    assert!(!ok && out.contains(&key), "{out}");
    assert!(
        op.data_dir().join("RESTORED-READ-ONLY").exists(),
        "a failed restore leaves a replica that will not sign"
    );
}

/// Restores again with `--full-replay` and checks that it gives the ledger the snapshot gave:
/// summary, every header and body, and the request index.
fn same_ledger_by_full_replay(op: &Operator, height: u64) {
    use tally_core::ports::{LedgerRead, LedgerStore};
    let live = op.data_dir().join("ledger");
    let from_snapshot = op.data_dir().join("ledger-from-snapshot");
    std::fs::rename(&live, &from_snapshot).unwrap();
    // The raft log restore wrote (a snapshot point naming the restored ledger) goes too.
    std::fs::remove_dir_all(op.data_dir().join("raft")).unwrap();
    let (ok, out) = restore_with(&op.config_path, &["--full-replay"]);
    assert!(ok && out.contains("from height 1"), "{out}");
    let opts = tally_storage::StoreOptions::default();
    let mut a = tally_storage::LedgerDb::open(&from_snapshot, opts.clone()).unwrap();
    let mut b = tally_storage::LedgerDb::open(&live, opts).unwrap();
    assert_eq!(a.meta().unwrap(), b.meta().unwrap());
    assert_eq!(a.meta().unwrap().height, height);
    for h in 1..=height {
        assert_eq!(a.header(h).unwrap(), b.header(h).unwrap(), "header {h}");
        let body = b.body(h).unwrap().unwrap();
        assert_eq!(a.body(h).unwrap(), Some(body.clone()), "body {h}");
        let body = tally_core::batch::BatchBody::decode(&body).unwrap();
        for (signer, id, _) in body.records() {
            let record = b.request(&signer, id).unwrap();
            assert!(record.is_some());
            assert_eq!(a.request(&signer, id).unwrap(), record, "request {id}");
        }
    }
    a.close().unwrap();
    b.close().unwrap();
    std::fs::remove_dir_all(&from_snapshot).unwrap();
}

#[test]
fn a_point_in_time_restore_serves_reads_only() {
    let dir = tempfile::tempdir().unwrap();
    let url = archive_url("pitr", dir.path());
    let op = Operator::new(|c| {
        c.batch.batch_window_ms = 10;
        c.archive.url = url.clone();
    });
    let chain = op.profile.chain_id_bytes().unwrap();
    let deposit = op.profile.load_deposit_key().unwrap();
    let alice = generate_key();
    let rt = runtime();
    let server = op.start();
    let height = rt.block_on(async {
        let client = server.client().await;
        for i in 0..5u128 {
            let d = build_request(&deposit, chain, Op::Deposit, i, public_key(&alice), 10);
            client.submit(d).await.unwrap();
        }
        wait_archived(&client).await
    });
    server.kill();
    std::fs::remove_dir_all(op.data_dir().join("ledger")).unwrap();
    std::fs::remove_dir_all(op.data_dir().join("raft")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tally-server"))
        .args(["restore", "--height", "2", "--config"])
        .arg(&op.config_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(height > 2);
    let server = op.start();
    rt.block_on(async {
        let client = Client::connect(&server.profile).await.unwrap();
        let b = client
            .balance(public_key(&alice), ReadMode::Stale)
            .await
            .unwrap();
        assert_eq!(
            (b.balance, b.height),
            (20, 2),
            "the state as of height 2, labelled"
        );
        let d = build_request(&deposit, chain, Op::Deposit, 77, public_key(&alice), 1);
        match client.submit(d).await {
            Err(tally_client::Error::Rejected(r)) => assert_eq!(r.code, ErrorCode::Recovering),
            other => panic!("a forensic copy must refuse writes: {other:?}"),
        }
    });
}

#[test]
fn a_new_leader_resumes_the_archive_after_the_leader_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let url = archive_url("failover", dir.path());
    let rt = runtime();
    rt.block_on(async {
        let mut cluster = Cluster::new(3, |c| {
            crate::cluster::fast(c);
            c.archive.url = url.clone();
        })
        .await;
        cluster.start_all();
        let chain = cluster.profile.chain_id_bytes().unwrap();
        let deposit = cluster.profile.load_deposit_key().unwrap();
        let cc = cluster.cluster_client();
        let alice = generate_key();
        let to = public_key(&alice);
        for id in 0..30u128 {
            let d = build_request(&deposit, chain, Op::Deposit, id, to, 1);
            cc.submit(d).await.expect("deposit");
        }
        // Killed while it archives: batches are written continuously behind the commits.
        let leader = cluster.leader().await;
        cluster.kill(leader);
        for id in 30..60u128 {
            let d = build_request(&deposit, chain, Op::Deposit, id, to, 1);
            cc.submit(d).await.expect("deposit after the failover");
        }
        let new_leader = cluster.leader().await;
        assert_ne!(new_leader, leader);
        let height = wait_archived(&cluster.client_of(new_leader).await).await;
        assert!(
            height >= 60,
            "60 deposits, each its own batch at least: {height}"
        );
        let config = load(&cluster.configs[&new_leader]);
        let bucket = open(&url, &config);
        let operator = cluster.profile.operator_key().unwrap();
        let report = audit(&bucket, Some(&chain), &operator, None).await.unwrap();
        assert!(report.ok, "{:?}", report.errors);
        assert_eq!(
            (report.height, report.batches),
            (height, height),
            "no gap, no duplicate"
        );
    });
}

/// Every replica lost, one restored: the two wiped ones do not elect each other (they hold
/// none of the history), the restored one leads and sends them its ledger, and all three serve
/// the archived history (retries get their original confirmations) and new writes.
#[test]
fn one_restored_replica_seeds_the_wiped_others() {
    let dir = tempfile::tempdir().unwrap();
    let url = archive_url("seed", dir.path());
    let rt = runtime();
    rt.block_on(async {
        let mut cluster = Cluster::new(3, |c| {
            crate::cluster::fast(c);
            c.archive.url = url.clone();
            c.archive.snapshot_every_batches = 5;
        })
        .await;
        cluster.start_all();
        let chain = cluster.profile.chain_id_bytes().unwrap();
        let deposit = cluster.profile.load_deposit_key().unwrap();
        let cc = cluster.cluster_client();
        let alice = public_key(&generate_key());
        let dep = |id: u128| build_request(&deposit, chain, Op::Deposit, id, alice, 10);
        let first = cc.submit(dep(0)).await.unwrap();
        for id in 1..20u128 {
            cc.submit(dep(id)).await.unwrap();
        }
        let leader = cluster.leader().await;
        let height = wait_archived(&cluster.client_of(leader).await).await;
        for id in cluster.ids.clone() {
            cluster.kill(id);
            cluster.wipe(id);
        }
        let (ok, out) = restore(&cluster.configs[&1]);
        assert!(
            ok && out.contains(&format!("restored height {height}")),
            "{out}"
        );

        // The wiped two alone, for several election timeouts: no leader among them.
        cluster.start(2);
        cluster.start(3);
        tokio::time::sleep(Duration::from_secs(3)).await;
        for id in [2, 3] {
            let s = cluster.client_of(id).await.status().await.unwrap();
            assert_eq!(
                (s.leader_id, s.applied_height),
                (0, 0),
                "replica {id} without the history must not be elected"
            );
        }
        cluster.start(1);
        cc.submit(dep(20))
            .await
            .expect("the restored replica leads");
        let tip = crate::cluster::converged(&cluster).await;
        assert!(tip.header.height > height);
        for id in cluster.ids.clone() {
            let client = cluster.client_of(id).await;
            let b = client.balance(alice, ReadMode::Stale).await.unwrap();
            assert_eq!(b.balance, 210, "replica {id}");
        }
        let again: Confirmation = cc.submit(dep(0)).await.unwrap();
        assert!(again.replayed);
        assert_eq!((again.receipt, again.header), (first.receipt, first.header));
    });
}

/// A free port below Linux's ephemeral range (32768 on): while the store is down the servers
/// keep dialling its port, and a dial from an ephemeral port equal to it connects to itself
/// (TCP simultaneous open on loopback), which then holds the port the store must come back on.
fn port_outside_the_ephemeral_range() -> u16 {
    // 20000..32000, and never handed to another test of this process (the port stays free
    // while the store is down, and must be ours when it comes back).
    crate::cluster_harness::local_port().port()
}

/// Starts a SeaweedFS of this test's own on `port` (`.ci/s3.sh`); returns its endpoint.
fn start_s3(dir: &Path, port: u16) -> String {
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../.ci/s3.sh"))
        .args(["start"])
        .arg(dir)
        .env("TALLY_S3_PORT", port.to_string())
        .env("TALLY_S3_BUCKETS", "outage")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    format!("http://127.0.0.1:{port}")
}

fn stop_s3(dir: &Path) {
    s3_script("stop", dir);
}

fn s3_script(command: &str, dir: &Path) {
    let status = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../.ci/s3.sh"))
        .arg(command)
        .arg(dir)
        .status()
        .unwrap();
    assert!(status.success());
}

/// A test's own S3 server directory: its server stopped and its data deleted on drop, even
/// when the test fails (a weed left running holds memory and ports).
struct OwnS3(tempfile::TempDir);

impl OwnS3 {
    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for OwnS3 {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../.ci/s3.sh"))
            .arg("clean")
            .arg(self.0.path())
            .status();
    }
}

#[test]
fn the_store_down_for_30_s_and_back() {
    if std::env::var_os("TALLY_TEST_S3").is_none() {
        assert!(std::env::var_os("CI").is_none(), "CI runs this test");
        println!("no S3 server here (TALLY_TEST_S3 unset): skipped");
        return;
    }
    let s3 = OwnS3(tempfile::tempdir().unwrap());
    let port = port_outside_the_ephemeral_range();
    let endpoint = start_s3(s3.path(), port);
    let op = Operator::new(|c| {
        c.batch.batch_window_ms = 10;
        c.archive.url = "s3://outage/ledger".into();
        c.archive.endpoint = endpoint.clone();
        c.archive.allow_http = true;
        c.archive.max_lag_batches = 20;
    });
    let chain = op.profile.chain_id_bytes().unwrap();
    let deposit = op.profile.load_deposit_key().unwrap();
    let alice = generate_key();
    let rt = runtime();
    let server = op.start();
    rt.block_on(async {
        let client = server.client().await;
        let to = public_key(&alice);
        let deposit_one = |id: u128| {
            let d = build_request(&deposit, chain, Op::Deposit, id, to, 1);
            client.submit(d)
        };
        for id in 0..5 {
            deposit_one(id).await.unwrap();
        }
        let mut id = 5;
        wait_archived(&client).await;
        let down = Instant::now();
        stop_s3(s3.path());
        // Commits go on without the store, up to the lag bound; then writes are refused.
        let mut confirmed = 0;
        let refused = loop {
            id += 1;
            match deposit_one(id).await {
                Ok(_) => confirmed += 1,
                Err(tally_client::Error::Rejected(r)) => break r,
                Err(e) => panic!("{e}"),
            }
            assert!(confirmed <= 40, "the lag bound never refused a write");
        };
        assert_eq!(refused.code, ErrorCode::ArchiveBehind);
        assert!(
            confirmed >= 10,
            "commits went on while the store was down: {confirmed}"
        );
        tokio::time::sleep(Duration::from_secs(30).saturating_sub(down.elapsed())).await;
        let metrics = crate::metrics::scrape(&server.metrics_addr);
        assert!(
            metrics["tally_archive_upload_errors_total"] > 0.0,
            "{metrics:?}"
        );
        assert!(metrics["tally_archive_lag_batches"] >= 20.0, "{metrics:?}");
        start_s3(s3.path(), port);
        let height = wait_archived(&client).await;
        deposit_one(id + 1)
            .await
            .expect("writes are taken again once the archive caught up");
        let bucket = open("s3://outage/ledger", &load(&op.config_path));
        let report = audit(
            &bucket,
            Some(&chain),
            &op.profile.operator_key().unwrap(),
            None,
        )
        .await
        .unwrap();
        assert!(report.ok, "{:?}", report.errors);
        assert!(report.height >= height);
    });
    drop(server);
    drop(s3);
}
