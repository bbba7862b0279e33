//! Kill -9 in the middle of applying: every batch whose apply returned survives.
//!
//! The test runs its own binary again as a child (selected by an environment variable) that
//! applies synced batches in a loop and reports each height once `apply` has returned. The
//! parent kills it with SIGKILL at a random point, reopens the database and checks that every
//! reported height is there and that the state is consistent, then lets a new child carry on.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tally_core::ports::LedgerStore;
use tally_storage::{LedgerDb, StoreOptions};

use crate::support::{check_chain, seed, Chain};

const CHILD_DIR: &str = "TALLY_STORAGE_CRASH_CHILD";
const CHILD_SEED: &str = "TALLY_STORAGE_CRASH_SEED";
const TEST_NAME: &str = "crash::sigkill_loses_no_applied_batch";
const MARK: &str = "TALLY_APPLIED ";

/// A small memtable, so that kills also land in table writes, compactions and manifest switches.
fn options() -> StoreOptions {
    StoreOptions {
        write_buffer_bytes: 16 << 10,
        ..StoreOptions::default()
    }
}

#[test]
fn sigkill_loses_no_applied_batch() {
    if let Ok(dir) = std::env::var(CHILD_DIR) {
        let seed = std::env::var(CHILD_SEED).unwrap().parse().unwrap();
        return child(Path::new(&dir), seed);
    }
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut reported_max = 0;
    for round in 0..4u64 {
        let kill_after = rng.gen_range(3..40);
        let mut child = KillOnDrop(
            Command::new(std::env::current_exe().unwrap())
                .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
                .env(CHILD_DIR, dir.path())
                .env(CHILD_SEED, (seed ^ round).to_string())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        // Kept open until the child is dead: a child that saw a closed pipe would stop on its
        // own, between two applies, instead of being killed at a random point.
        let mut stdout = BufReader::new(child.0.stdout.take().unwrap());
        let mut reported = Vec::new();
        let mut line = String::new();
        while reported.len() < kill_after {
            line.clear();
            if stdout.read_line(&mut line).unwrap() == 0 {
                break;
            }
            // libtest may print its own text on the same line.
            if let Some(at) = line.find(MARK) {
                reported.push(line[at + MARK.len()..].trim().parse::<u64>().unwrap());
            }
        }
        assert_eq!(
            reported.len(),
            kill_after,
            "round {round}: the child stopped early"
        );
        // Let the child get somewhere into its next apply (or further) before the kill.
        std::thread::sleep(Duration::from_micros(rng.gen_range(0..5_000)));
        child.0.kill().unwrap();
        child.0.wait().unwrap();
        drop(stdout);

        let mut db = LedgerDb::open(dir.path(), options()).unwrap();
        let meta = check_chain(&mut db);
        let last = *reported.last().unwrap();
        assert!(
            last > reported_max,
            "round {round}: the child continued the chain"
        );
        assert!(
            meta.height >= last,
            "round {round}: height {} lost reported batch {last}",
            meta.height
        );
        for h in reported {
            assert!(
                db.header(h).unwrap().is_some() && db.body(h).unwrap().is_some(),
                "batch {h} lost"
            );
        }
        println!(
            "round {round}: killed after {last}, recovered height {}",
            meta.height
        );
        reported_max = last;
    }
}

/// Applies batches until killed (or, if nobody kills it, for a while).
fn child(dir: &Path, seed: u64) {
    let mut db = LedgerDb::open(dir, options()).unwrap();
    let mut chain = Chain::new(db.meta().unwrap(), seed);
    let mut rng = StdRng::seed_from_u64(seed);
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let n = rng.gen_range(1..=64);
        let write = chain.step(&mut db, n);
        println!("{MARK}{}", write.meta.height);
        // As the server's storage thread does when idle: kills also land in these flushes.
        if rng.gen_bool(0.5) {
            db.maintain().unwrap();
        }
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
