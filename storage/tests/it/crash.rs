//! Kill -9 in the middle of applying: every batch whose apply returned survives.
//!
//! The test runs its own binary again as a child (selected by an environment variable) that
//! applies synced batches in a loop and reports each height once `apply` has returned. The
//! parent kills it with SIGKILL at a random point, reopens the database and checks that every
//! reported height is there and that the state is consistent, then lets a new child carry on.
//!
//! The archive (bodies, request index) is written behind the state; a kill can leave it behind.
//! A replica then re-archives from its raft log: here the child keeps each body in a journal
//! file, synced before the apply, as the raft log holds a batch before it is applied.

use std::io::{BufRead, BufReader, Write};
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
        state_write_buffer_bytes: 16 << 10,
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

        let mut db = LedgerDb::open(&dir.path().join("ledger"), options()).unwrap();
        if db.archive_behind().is_some() {
            let redone = rearchive_from_journal(&mut db, &dir.path().join("journal"));
            println!("round {round}: the archive was {redone} batches behind");
        }
        assert_eq!(db.archive_behind(), None, "round {round}: re-archived");
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
    let journal = dir.join("journal");
    std::fs::create_dir_all(&journal).unwrap();
    let mut db = LedgerDb::open(&dir.join("ledger"), options()).unwrap();
    let mut chain = Chain::new(db.meta().unwrap(), seed);
    let mut rng = StdRng::seed_from_u64(seed);
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let n = rng.gen_range(1..=64);
        let write = chain.step_logged(&mut db, n, |body| {
            let height = tally_core::batch::BatchBody::decode(body)
                .unwrap()
                .header
                .height;
            let mut f = std::fs::File::create(journal.join(height.to_string())).unwrap();
            f.write_all(body).unwrap();
            f.sync_all().unwrap();
        });
        println!("{MARK}{}", write.meta.height);
        // As the server's storage thread does when idle: kills also land in these flushes.
        if rng.gen_bool(0.5) {
            db.maintain().unwrap();
        }
    }
}

/// Feeds the journal's bodies, in height order, to `rearchive`; returns how many it took.
fn rearchive_from_journal(db: &mut LedgerDb, journal: &Path) -> usize {
    let mut bodies: Vec<(u64, Vec<u8>)> = std::fs::read_dir(journal)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let height = e.file_name().to_str().unwrap().parse().unwrap();
            (height, std::fs::read(e.path()).unwrap())
        })
        .collect();
    bodies.sort();
    let mut taken = 0;
    for (_, body) in bodies {
        // A torn last file (killed while writing it) is ignored like any body not applied.
        if db.rearchive(&body, 0).unwrap() {
            taken += 1;
        }
    }
    taken
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
