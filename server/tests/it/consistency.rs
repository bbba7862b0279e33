//! The header log's consistency against real servers: `tally consistency` and `tally verify`
//! on its file (a changed digit anywhere fails), the profile's held header moving forward, and
//! an operator that forks its ledger (two servers with one key and one chain, from one copied
//! data directory) caught as a split view with both headers saved.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use tally_client::{build_request, generate_key, public_key, ReplicaAddress};
use tally_wire::Op;

use crate::envelopes::tally_bin;
use crate::harness::{Operator, Server};

fn tally(profile: &Path, args: &[&str]) -> (i32, Value) {
    crate::harness::cli(profile, args)
}

/// Writes a profile for `server` next to `base` (same directory, so the same trust store).
fn profile_for(base: &Path, server: &Server, name: &str) -> PathBuf {
    let mut profile = tally_client::Profile::load(base).unwrap();
    profile.replicas = vec![ReplicaAddress {
        id: 1,
        address: server.addr.clone(),
    }];
    let path = base.with_file_name(name);
    std::fs::write(&path, profile.to_toml_string().unwrap()).unwrap();
    path
}

fn deposit(profile: &Path, to: &str, amount: u64) -> (i32, Value) {
    tally(
        profile,
        &["deposit", "--to", to, "--amount", &amount.to_string()],
    )
}

/// Every position of every hex string in the file, changed one at a time, fails `verify`
/// (checked on a sample of positions: the first, a middle and the last digit of each).
fn edits_fail(profile: &Path, file: &Path) {
    let text = std::fs::read_to_string(file).unwrap();
    let json: Value = serde_json::from_str(&text).unwrap();
    let mut hexes: Vec<String> = Vec::new();
    for key in ["from_root", "to_root", "from_header_hex", "to_header_hex"] {
        hexes.push(json[key].as_str().unwrap().to_string());
    }
    for key in ["proof", "from_inclusion", "to_inclusion"] {
        for h in json[key].as_array().unwrap() {
            hexes.push(h.as_str().unwrap().to_string());
        }
    }
    assert!(!json["proof"].as_array().unwrap().is_empty(), "{json}");
    let edited = file.with_extension("edited.json");
    for h in &hexes {
        for at in [0, h.len() / 2, h.len() - 1] {
            let mut changed = h.clone().into_bytes();
            changed[at] = if changed[at] == b'0' { b'1' } else { b'0' };
            let changed = String::from_utf8(changed).unwrap();
            std::fs::write(&edited, text.replacen(h.as_str(), &changed, 1)).unwrap();
            let (code, out) = tally(profile, &["verify", edited.to_str().unwrap()]);
            assert_ne!(
                code, 0,
                "a digit changed at {at} of {h} still verifies: {out}"
            );
        }
    }
}

#[test]
fn consistency_proofs_verify_and_refuse_any_changed_digit() {
    let operator = Operator::new(|c| c.batch.batch_window_ms = 10);
    let server = operator.start();
    let profile = profile_for(&operator.data_dir().join("profile.toml"), &server, "p.toml");
    let alice = hex::encode(public_key(&generate_key()));
    for amount in 1..=6 {
        let (code, out) = deposit(&profile, &alice, amount);
        assert_eq!(code, 0, "{out}");
    }
    let held = operator
        .data_dir()
        .join("trust")
        .join(format!("{}.json", operator.profile.chain_id));
    let held: Value = serde_json::from_str(&std::fs::read_to_string(&held).unwrap()).unwrap();
    let top = held["height"].as_u64().unwrap();
    assert!(
        top >= 6,
        "the held header follows the confirmations: {held}"
    );
    let file = operator.data_dir().join("proof.json");
    let (code, out) = tally(
        &profile,
        &[
            "consistency",
            "--from",
            "3",
            "--to",
            &top.to_string(),
            "--out",
            file.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        (out["from_size"].as_u64(), out["to_size"].as_u64()),
        (Some(3), Some(top))
    );
    let (code, out) = tally(&profile, &["verify", file.to_str().unwrap()]);
    assert_eq!((code, &out["valid"]), (0, &Value::Bool(true)), "{out}");
    edits_fail(&profile, &file);
    let (code, out) = tally(&profile, &["consistency", "--from", "2", "--to", "999"]);
    assert_ne!(code, 0);
    assert_eq!(out["code"], "height_not_applied", "{out}");
    same_checkpoint_as_the_archive(&profile, operator.data_dir());
}

/// The checkpoint a replica signs for a size is byte for byte the one its archive (the
/// development operator's local directory) published for that size: one log, one key.
fn same_checkpoint_as_the_archive(profile: &Path, data: &Path) {
    let path = data.join("archive").join("checkpoint");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let archived = loop {
        match std::fs::read_to_string(&path) {
            Ok(text) => break text,
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(100))
            }
            Err(e) => panic!("{}: {e}", path.display()),
        }
    };
    let size = archived.lines().nth(1).unwrap().to_string();
    let (code, out) = tally(profile, &["consistency", "--from", &size, "--to", &size]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out["to_checkpoint"].as_str(), Some(archived.as_str()));
}

#[test]
fn a_forked_ledger_is_a_split_view_with_both_headers_saved() {
    let operator = Operator::new(|c| c.batch.batch_window_ms = 10);
    let base = operator.data_dir().join("profile.toml");
    let alice = hex::encode(public_key(&generate_key()));
    let server = operator.start();
    let a = profile_for(&base, &server, "a.toml");
    assert_eq!(deposit(&a, &alice, 5).0, 0);
    server.terminate();
    // The operator copies its data directory and runs both copies: one key, one chain, two
    // histories from here on.
    let fork_dir = operator._dir.path().join("fork");
    copy_dir(operator.data_dir(), &fork_dir);
    let (server, forked) = (
        operator.start(),
        Server::start_replica(&fork_dir.join("config.toml"), &operator.profile, 1),
    );
    let a = profile_for(&base, &server, "a.toml");
    let b = profile_for(&base, &forked, "b.toml");
    assert_eq!(deposit(&a, &alice, 7).0, 0);
    // The fork's next header is at the height the profile holds from the original.
    let (code, out) = deposit(&b, &alice, 9);
    assert_eq!(code, 3, "a split view exits 3: {out}");
    assert_eq!(out["code"], "split_view", "{out}");
    let evidence = evidence_files(operator.data_dir());
    assert_eq!(evidence.len(), 1, "{evidence:?}");
    let saved: Value =
        serde_json::from_str(&std::fs::read_to_string(&evidence[0]).unwrap()).unwrap();
    let headers = saved["headers"].as_array().unwrap();
    assert_eq!(headers.len(), 2, "{saved}");
    assert_eq!(headers[0]["height"], headers[1]["height"], "{saved}");
    assert_ne!(
        headers[0]["signed_header_hex"],
        headers[1]["signed_header_hex"]
    );

    // A newer header of the fork is caught through the consistency proof.
    let rt = crate::harness::runtime();
    rt.block_on(async {
        let client = forked.client().await;
        let key = operator.profile.load_deposit_key().unwrap();
        let chain = operator.profile.chain_id_bytes().unwrap();
        let to = public_key(&generate_key());
        client
            .submit(build_request(&key, chain, Op::Deposit, 77, to, 1))
            .await
            .unwrap();
    });
    let (code, out) = deposit(&b, &alice, 11);
    assert_eq!(
        (code, &out["code"]),
        (3, &Value::from("split_view")),
        "{out}"
    );
    assert_eq!(evidence_files(operator.data_dir()).len(), 2);
    // The original's own next header is still consistent.
    assert_eq!(deposit(&a, &alice, 13).0, 0);
}

fn evidence_files(data: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(data.join("evidence")) {
        Ok(dir) => dir.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// POSTs `body` to `addr`'s `/add-checkpoint`: (status, body).
fn post_checkpoint(addr: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let request = format!(
        "POST /add-checkpoint HTTP/1.1\r\nHost: w\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1.to_string();
    (status, body)
}

/// `tally witness` as a process: (child, its stdout drained, address, name).
pub type WitnessProcess = (
    std::process::Child,
    std::sync::mpsc::Receiver<String>,
    String,
    String,
);

pub fn start_witness(profile: &Path, key: &Path) -> WitnessProcess {
    let mut child = Command::new(tally_bin())
        .args(["--profile", profile.to_str().unwrap(), "witness", "--key"])
        .arg(key)
        .args(["--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = crate::harness::lines(Box::new(child.stdout.take().unwrap()));
    let first = stdout
        .recv_timeout(std::time::Duration::from_secs(30))
        .unwrap();
    let (name, addr) = first
        .trim()
        .strip_prefix("tally witness ")
        .and_then(|rest| rest.split_once(" listening on "))
        .unwrap_or_else(|| panic!("witness said {first:?}"));
    (child, stdout, addr.to_string(), name.to_string())
}

/// The add-checkpoint body for the log at `to`, from `old` (0: first contact), asked of `server`.
fn add_request(server: &Server, old: u64, to: u64) -> String {
    crate::harness::runtime().block_on(async {
        let client = server.client().await;
        let reply = client.consistency(old.max(1), to).await.unwrap();
        tally_core::witness::AddCheckpoint {
            old_size: old,
            proof: if old == 0 { vec![] } else { reply.proof },
            note: reply.to.checkpoint,
        }
        .encode()
    })
}

fn height(server: &Server) -> u64 {
    crate::harness::runtime().block_on(async {
        let status = server.client().await.status().await.unwrap();
        status.applied_height
    })
}

/// A witness (a real `tally witness` process) cosigns the ledger's checkpoints as it grows;
/// when the operator forks the ledger, the witness cosigns one branch and refuses the other:
/// a checkpoint of a size it cosigned with another root (409) and a proof from the branch it
/// cosigned to the other (422).
#[test]
fn a_witness_cosigns_one_history_and_refuses_a_fork() {
    let operator = Operator::new(|c| c.batch.batch_window_ms = 10);
    let base = operator.data_dir().join("profile.toml");
    let alice = hex::encode(public_key(&generate_key()));
    let server = operator.start();
    let a = profile_for(&base, &server, "a.toml");
    let witness_key = operator._dir.path().join("witness.key");
    let key = generate_key();
    tally_client::write_key(&witness_key, &key).unwrap();
    let (witness, _stdout, addr, name) = start_witness(&a, &witness_key);
    let _witness = KillOnDrop(witness);

    assert_eq!(deposit(&a, &alice, 1).0, 0);
    let first = height(&server);
    let (status, cosignature) = post_checkpoint(&addr, &add_request(&server, 0, first));
    assert_eq!(status, 200, "{cosignature}");
    let note = crate::harness::runtime().block_on(async {
        server
            .client()
            .await
            .consistency(first, first)
            .await
            .unwrap()
            .to
            .checkpoint
    });
    let cosigned = format!("{note}{cosignature}");
    let at = tally_core::witness::cosigned_at(&cosigned, &name, &key.verifying_key()).unwrap();
    assert!(at.is_some(), "a valid cosignature by {name}: {cosigned}");
    // A second first contact conflicts, naming the size cosigned.
    assert_eq!(
        post_checkpoint(&addr, &add_request(&server, 0, first)),
        (409, format!("{first}\n"))
    );
    assert_eq!(deposit(&a, &alice, 2).0, 0);
    let second = height(&server);
    assert_eq!(
        post_checkpoint(&addr, &add_request(&server, first, second)).0,
        200
    );
    server.terminate();

    let fork_dir = operator._dir.path().join("fork");
    copy_dir(operator.data_dir(), &fork_dir);
    let server = operator.start();
    let forked = Server::start_replica(&fork_dir.join("config.toml"), &operator.profile, 1);
    // The fork's client keeps its own held header (a client of both would see the split view).
    let a = profile_for(&base, &server, "a.toml");
    let b = profile_for(&fork_dir.join("profile.toml"), &forked, "b.toml");
    for (profile, amount) in [(&b, 3), (&a, 4), (&a, 5)] {
        let (code, out) = deposit(profile, &alice, amount);
        assert_eq!(code, 0, "{out}");
    }
    let fork_top = height(&forked);
    assert_eq!(
        post_checkpoint(&addr, &add_request(&forked, second, fork_top)).0,
        200
    );
    let top = height(&server);
    assert!(top > fork_top);
    let same_size = crate::harness::runtime().block_on(async {
        server
            .client()
            .await
            .consistency(fork_top, fork_top)
            .await
            .unwrap()
            .to
            .checkpoint
    });
    let body = format!("old {fork_top}\n\n{same_size}");
    assert_eq!(
        post_checkpoint(&addr, &body).0,
        409,
        "the original at the fork's size"
    );
    let (status, why) = post_checkpoint(&addr, &add_request(&server, fork_top, top));
    assert_eq!(
        status, 422,
        "the original's proof from the fork's size: {why}"
    );
    let state = std::fs::read_to_string(format!("{}.state.json", witness_key.display())).unwrap();
    assert!(state.contains(&format!("\"size\": {fork_top}")), "{state}");
}

/// A child process killed when the test ends, passed or not.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The leader sends its checkpoints to the witness in its config (a `tally witness` process)
/// and serves them cosigned; a profile requiring that witness's cosignature trusts a
/// confirmation once a cosigned checkpoint covers it, and one requiring an unknown witness
/// refuses it.
#[test]
fn a_witness_quorum_in_the_profile_needs_the_leaders_cosigned_checkpoints() {
    let operator = Operator::new(|c| c.batch.batch_window_ms = 10);
    let base = operator.data_dir().join("profile.toml");
    let witness_key = operator._dir.path().join("witness.key");
    let key = generate_key();
    tally_client::write_key(&witness_key, &key).unwrap();
    let (witness, _stdout, addr, name) = start_witness(&base, &witness_key);
    let _witness = KillOnDrop(witness);
    let mut config = tally_config::Config::from_toml_str(
        &std::fs::read_to_string(&operator.config_path).unwrap(),
    )
    .unwrap();
    config.witnesses.push(tally_config::WitnessConfig {
        url: format!("http://{addr}"),
        public_key: hex::encode(key.verifying_key().as_bytes()),
    });
    std::fs::write(&operator.config_path, config.to_toml_string()).unwrap();
    let server = operator.start();

    let with_quorum = |name: &str, public_key: &str, file: &str| {
        let mut profile = tally_client::Profile::load(&base).unwrap();
        profile.replicas = server.profile.replicas.clone();
        profile.witness_quorum = 1;
        profile.witnesses = vec![tally_client::ProfileWitness {
            name: name.into(),
            public_key: public_key.into(),
        }];
        let path = operator.data_dir().join(file);
        std::fs::write(&path, profile.to_toml_string().unwrap()).unwrap();
        path
    };
    let alice = hex::encode(public_key(&generate_key()));
    let good = with_quorum(
        &name,
        &hex::encode(key.verifying_key().as_bytes()),
        "good.toml",
    );
    let (code, out) = deposit(&good, &alice, 5);
    assert_eq!(code, 0, "{out}");
    let height = out["receipt"]["height"].as_u64().unwrap();
    let held = operator
        .data_dir()
        .join("trust")
        .join(format!("{}.json", operator.profile.chain_id));
    let held: Value = serde_json::from_str(&std::fs::read_to_string(held).unwrap()).unwrap();
    let note = held["checkpoint"].as_str().unwrap();
    assert!(held["height"].as_u64().unwrap() >= height, "{held}");
    let cosigned = tally_core::witness::cosigned_at(note, &name, &key.verifying_key()).unwrap();
    assert!(
        cosigned.is_some(),
        "the held checkpoint carries the witness's cosignature: {note}"
    );

    let stranger = hex::encode(public_key(&generate_key()));
    let bad = with_quorum("tally-witness/stranger", &stranger, "bad.toml");
    let (code, out) = deposit(&bad, &alice, 6);
    assert_ne!(code, 0, "no cosignature by an unknown witness: {out}");
    assert_eq!(out["code"], "verification_failed", "{out}");
}

/// After an operator key rotation (PROTOCOL.md §4.14) the witness learns the new key from the
/// log's key chain and goes on cosigning: a profile with a `witness_quorum` keeps confirming
/// across the rotation, its held checkpoint signed by the new key and cosigned.
#[test]
fn a_witness_follows_the_operator_key_chain_across_a_rotation() {
    let next = generate_key();
    let operator = Operator::new(|c| {
        c.batch.batch_window_ms = 10;
        // A fixed client address, so that the witness's profile reaches every start.
        c.listen.client = crate::cluster_harness::local_port();
    });
    let dir = operator.data_dir().to_path_buf();
    let next_path = dir.join("next-operator.key");
    tally_server::bootstrap::write_signing_key(&next_path, &next).unwrap();
    let witness_key = operator._dir.path().join("witness.key");
    let key = generate_key();
    tally_client::write_key(&witness_key, &key).unwrap();
    let mut config = tally_config::Config::from_toml_str(
        &std::fs::read_to_string(&operator.config_path).unwrap(),
    )
    .unwrap();
    config.operator.as_mut().unwrap().next_signing_key = Some(next_path);

    // The witness's profile names the server's address (it asks the log for its key chain).
    let server = operator.start();
    let profile = dir.join("w.toml");
    std::fs::write(&profile, server.profile.to_toml_string().unwrap()).unwrap();
    server.kill();
    let (witness, _stdout, addr, name) = start_witness(&profile, &witness_key);
    let _witness = KillOnDrop(witness);
    config.witnesses.push(tally_config::WitnessConfig {
        url: format!("http://{addr}"),
        public_key: hex::encode(key.verifying_key().as_bytes()),
    });
    std::fs::write(&operator.config_path, config.to_toml_string()).unwrap();
    let server = operator.start();

    let mut quorum = server.profile.clone();
    quorum.witness_quorum = 1;
    quorum.witnesses = vec![tally_client::ProfileWitness {
        name: name.clone(),
        public_key: hex::encode(key.verifying_key().as_bytes()),
    }];
    let quorum_path = dir.join("quorum.toml");
    std::fs::write(&quorum_path, quorum.to_toml_string().unwrap()).unwrap();
    let alice = hex::encode(public_key(&generate_key()));
    let (code, out) = deposit(&quorum_path, &alice, 5);
    assert_eq!(code, 0, "{out}");

    let new_key = hex::encode(public_key(&next));
    let (code, rotated) = crate::harness::cli(
        &quorum_path,
        &["cluster", "rotate-key", "--new-public-key", &new_key],
    );
    assert_eq!(code, 0, "{rotated}");
    let (code, out) = deposit(&quorum_path, &alice, 6);
    assert_eq!(code, 0, "{out}");
    assert!(
        out["header"]["height"].as_u64() > rotated["height"].as_u64(),
        "{out}"
    );
    let held = dir
        .join("trust")
        .join(format!("{}.json", operator.profile.chain_id));
    let held: Value = serde_json::from_str(&std::fs::read_to_string(held).unwrap()).unwrap();
    let note = held["checkpoint"].as_str().unwrap();
    let cosigned = tally_core::witness::cosigned_at(note, &name, &key.verifying_key()).unwrap();
    assert!(cosigned.is_some(), "cosigned after the rotation: {note}");
    let new = ed25519_dalek::VerifyingKey::from_bytes(&public_key(&next)).unwrap();
    let origin = tally_core::tlog::origin_for(&quorum.chain_id_bytes().unwrap());
    tally_core::tlog::open_note(note, &origin, &new).expect("the held checkpoint is the new key's");
    drop(server);
}
