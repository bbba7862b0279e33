//! Kill -9 in the middle of raft log writes: every write that returned survives, and the log
//! on disk is exactly the state after some write (never a mix of two).
//!
//! Like `crash.rs`, the test runs its own binary again as a child that performs random model
//! operations (appends, suffix replacements, commits, compactions, snapshots) and reports each
//! once it has returned. Both sides draw the operations from the same seeded generator and the
//! same starting state, so the parent knows the state after every operation: after the kill, the
//! reopened log must equal the state after the last reported operation or a later one.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tally_storage::RaftLogDb;

use crate::raft_model::{run, small, Model, Op, VOTERS};
use crate::support::seed;

const CHILD_DIR: &str = "TALLY_RAFT_CRASH_CHILD";
const CHILD_SEED: &str = "TALLY_RAFT_CRASH_SEED";
const TEST_NAME: &str = "raft_crash::sigkill_loses_no_persisted_raft_write";
const MARK: &str = "TALLY_RAFT_DONE ";
/// How far past the last reported operation the parent looks for the recovered state.
const LOOKAHEAD_OPS: usize = 100_000;

#[test]
fn sigkill_loses_no_persisted_raft_write() {
    if let Ok(dir) = std::env::var(CHILD_DIR) {
        let seed = std::env::var(CHILD_SEED).unwrap().parse().unwrap();
        return child(Path::new(&dir), seed);
    }
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut start = Model::default();
    for round in 0..5u64 {
        let child_seed = seed ^ round.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let kill_after = rng.gen_range(5..80);
        let mut child = KillOnDrop(
            Command::new(std::env::current_exe().unwrap())
                .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
                .env(CHILD_DIR, dir.path())
                .env(CHILD_SEED, child_seed.to_string())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        // Kept open until the child is dead (see crash.rs).
        let mut stdout = BufReader::new(child.0.stdout.take().unwrap());
        let mut reported = 0usize;
        let mut line = String::new();
        while reported < kill_after {
            line.clear();
            if stdout.read_line(&mut line).unwrap() == 0 {
                break;
            }
            if let Some(at) = line.find(MARK) {
                reported = line[at + MARK.len()..].trim().parse().unwrap();
            }
        }
        assert_eq!(
            reported, kill_after,
            "round {round}: the child stopped early"
        );
        std::thread::sleep(Duration::from_micros(rng.gen_range(0..5_000)));
        child.0.kill().unwrap();
        child.0.wait().unwrap();
        drop(stdout);

        let log = RaftLogDb::open_with_options(dir.path(), &VOTERS, small()).unwrap();
        let recovered = Model::read(&log);
        drop(log);
        // Replay the child's operations; the durable state after operation `reported` or a
        // later one must be what was recovered.
        let mut model = start.clone();
        let mut ops_rng = StdRng::seed_from_u64(child_seed);
        let mut found = None;
        for done in 1..=reported + LOOKAHEAD_OPS {
            let op = model.next_op(&mut ops_rng);
            model.apply(&op);
            if done >= reported && model.durable == recovered.durable {
                found = Some(done);
                break;
            }
        }
        let Some(done) = found else {
            panic!(
                "round {round}: the recovered log is no state at or after reported operation \
                 {reported}: {recovered:?} (seed {seed})"
            );
        };
        println!(
            "round {round}: killed after {reported} reported operations, recovered the state \
             after {done} (last index {}, snapshot {})",
            recovered.last(),
            recovered.durable.snap_index
        );
        start = recovered;
    }
}

/// Performs operations until killed (or, if nobody kills it, for a while).
fn child(dir: &Path, seed: u64) {
    let mut log = RaftLogDb::open_with_options(dir, &VOTERS, small()).unwrap();
    let mut model = Model::read(&log);
    let mut rng = StdRng::seed_from_u64(seed);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut done = 0u64;
    while Instant::now() < deadline {
        let op: Op = model.next_op(&mut rng);
        run(&mut log, &op);
        model.apply(&op);
        done += 1;
        println!("{MARK}{done}");
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
