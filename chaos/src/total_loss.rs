//! The total-loss ending of a live run (`--total-loss`): every replica is lost and rebuilt from
//! the archive alone, and nothing acknowledged may be missing.
//!
//! Once the load has stopped and the run's own verdict has read every replica: wait until the
//! leader reports the archive at its applied height; SIGKILL every replica and delete its data
//! directory (ledger and raft log; the configs, keys and certificates beside it stay); run
//! `tally-server restore --config nodeK.toml` for each, as an operator would (docs/OPERATING.md,
//! "Restoring after losing every replica"); start them all again. Three more invariants:
//!
//! - `restore_complete`: the archive caught up with the cluster's final height; every restore
//!   ends at that height; the restored replicas converge on the chain they had before, header
//!   for header, with the same balances; every confirmation acknowledged during the run names a
//!   header byte-equal to the restored chain's at its height; and the restored cluster takes a
//!   new write and archives it (it goes on where the archive ended, unfenced).
//! - `restore_replays`: acknowledged requests resubmitted with the same bytes (same id, same
//!   signature) are answered `replayed`, with their original receipt and header.
//! - `archive_audit`: `tally_storage::archive_read::audit` of the whole archive, at the very
//!   end, is ok and verified and replayed every batch its checkpoint covers.
//!
//! The replays' confirmations also go through the run's recorder, so the run-wide invariants
//! (one receipt per request, one signed header per height, confirmations that verify) cover
//! the restored cluster too.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Result;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tally_client::{build_request, ClusterClient, ClusterOptions};
use tally_core::archive::batch_key;
use tally_core::crypto::sha256;
use tally_storage::archive_read::audit;
use tally_wire::{Op, PublicKey, Request, SignedHeader};

use crate::cluster::{leader_of, LiveCluster};
use crate::live::LiveOptions;
use crate::load::{self, Confirmed, Recorder};
use crate::report::{FaultEvent, Invariant, TotalLoss};
use crate::verdict::{self, invariant, Final};

/// How long the archive may take to catch up with the applied ledger once the load stopped.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one `tally-server restore` may take.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(180);
/// How long the restored replicas may take to elect a leader and agree.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);
/// Acknowledged requests resubmitted to the restored cluster, at most (spread over the run).
const REPLAYS_MAX: usize = 48;
/// The request id of the deposit written after the restore: far above the funding deposits'.
const NEW_DEPOSIT_ID: u128 = 1 << 64;

/// What the ending found.
pub struct Ending {
    pub invariants: Vec<Invariant>,
    pub summary: TotalLoss,
    /// The archive damage injected before the restore, if any.
    pub injected: Option<FaultEvent>,
}

/// Runs the ending on a healed, converged, quiet cluster whose final state is `fin`.
/// `lose_batch`: delete one archived batch object before the restore (a planted bug that
/// `restore_complete` and `archive_audit` must catch). Errors only when the harness itself
/// fails; what goes wrong with the cluster is in the invariants.
pub async fn run(
    cluster: &mut LiveCluster,
    recorder: &Recorder,
    fin: &Final,
    accounts: &[PublicKey],
    lose_batch: bool,
    opts: &LiveOptions,
) -> Result<Ending> {
    let profile = cluster.profile.clone();
    let operator = profile.operator_key()?;
    let chain_id = profile.chain_id_bytes()?;
    let empty = Vec::new();
    let before: &Vec<SignedHeader> = fin
        .reference
        .and_then(|id| fin.chains.get(&id))
        .and_then(|c| c.as_ref().ok())
        .unwrap_or(&empty);
    let before_balances = fin
        .reference
        .and_then(|id| fin.balances.get(&id))
        .and_then(|b| b.as_ref().ok());
    let final_height = before.len() as u64;
    let mut summary = TotalLoss::default();
    let mut complete: Vec<String> = Vec::new();
    let mut replays: Vec<String> = Vec::new();

    // 1. The archive catches up.
    let started = Instant::now();
    let archived = match caught_up(cluster, final_height, CATCH_UP_TIMEOUT).await {
        Ok(h) => h,
        Err((h, why)) => {
            complete.push(format!(
                "the archive did not catch up with the final height {final_height} within {} s: \
                 {why}",
                CATCH_UP_TIMEOUT.as_secs()
            ));
            h
        }
    };
    summary.archive_height = archived;
    summary.catch_up_ms = started.elapsed().as_millis() as u64;
    if archived != final_height {
        complete.push(format!(
            "the archive holds {archived} batches, the cluster had applied {final_height}"
        ));
    }
    progress!(
        opts,
        recorder,
        "total loss: the archive caught up at height {archived} in {} ms",
        summary.catch_up_ms
    );

    // 2. The planted bug: the store loses a batch object.
    let mut injected = None;
    if lose_batch && archived > 0 {
        let mut rng = StdRng::seed_from_u64(opts.seed ^ 0x0070_74a1_1055);
        let height = rng.gen_range(1..=archived);
        let key = batch_key(height);
        let at_ms = recorder.now_ms();
        cluster.archive_bucket()?.delete(&key).await?;
        progress!(
            opts,
            recorder,
            "INJECTED archive-loses-batch: {key} deleted"
        );
        injected = Some(FaultEvent {
            at_ms,
            healed_at_ms: at_ms,
            kind: "injected-archive-loses-batch".into(),
            targets: Vec::new(),
            disrupts_leader: false,
            leader: None,
            detail: format!(
                "deleted {key} (height {height} of {archived}) from the archive before the restore"
            ),
        });
    }

    // 3. Every replica lost: killed, its data directory deleted.
    for id in cluster.ids.clone() {
        cluster.kill(id);
    }
    for id in cluster.ids.clone() {
        cluster.wipe(id)?;
    }

    // 4. Every replica restored from the archive alone.
    let restores = restore_all(cluster).await?;
    let mut all_restored = true;
    for (id, r) in &restores {
        match r {
            Ok(r) => {
                summary.restored += 1;
                summary.restore_ms_max = summary.restore_ms_max.max(r.ms);
                if (r.height, r.archive_height) != (archived, archived) {
                    complete.push(format!(
                        "node {id}: restored height {} of the archive's {}, expected {archived}",
                        r.height, r.archive_height
                    ));
                }
            }
            Err(e) => {
                all_restored = false;
                complete.push(format!("node {id}: tally-server restore failed: {e}"));
            }
        }
    }
    progress!(
        opts,
        recorder,
        "total loss: {} of {} replicas restored (slowest {} ms)",
        summary.restored,
        cluster.ids.len(),
        summary.restore_ms_max
    );

    // 5. The restored cluster: what it holds, replays, a new write.
    let mut expected_archive = archived;
    if all_restored {
        for id in cluster.ids.clone() {
            if let Err(e) = cluster.start(id).await {
                complete.push(format!("node {id} did not start after its restore: {e:#}"));
            }
        }
        let converged = verdict::converge(cluster, CONVERGE_TIMEOUT).await;
        if let Err(e) = &converged {
            complete.push(format!("the restored replicas: {e}"));
        }
        let after = verdict::collect(cluster, accounts, converged).await;
        check_restored(&after, before, before_balances, recorder, &mut complete);
        let sample = sample_confirmed(recorder);
        summary.replays_checked = sample.len() as u64;
        check_replays(&sample, recorder, cluster, &operator, &mut replays).await;
        let deposit_key = profile.load_deposit_key()?;
        let deposit = build_request(
            &deposit_key,
            chain_id,
            Op::Deposit,
            NEW_DEPOSIT_ID,
            accounts[0],
            1,
        );
        let client = ClusterClient::new(&profile, replay_options());
        match client.submit(deposit).await {
            Ok(c) if c.receipt.height == archived + 1 && !c.replayed => {
                expected_archive = archived + 1;
                if let Err((h, why)) = caught_up(cluster, archived + 1, CATCH_UP_TIMEOUT).await {
                    complete.push(format!(
                        "the restored cluster did not archive its new batch {} (the archive is at \
                         {h}): {why}",
                        archived + 1
                    ));
                }
            }
            Ok(c) => complete.push(format!(
                "a new deposit after the restore was confirmed at height {}{}, expected {}",
                c.receipt.height,
                if c.replayed { " as a replay" } else { "" },
                archived + 1
            )),
            Err(e) => complete.push(format!("the restored cluster refused a new deposit: {e}")),
        }
    } else {
        replays.push("not checked: no restored cluster to ask".into());
    }

    // 6. The archive, audited whole.
    let mut audited = Vec::new();
    match audit(&cluster.archive_bucket()?, Some(&chain_id), &operator, None).await {
        Err(e) => audited.push(format!("the store could not be read: {e}")),
        Ok(r) => {
            summary.final_archive_height = r.checkpoint_size.unwrap_or(0);
            audited.extend(r.errors.iter().map(|e| e.to_string()));
            if r.checkpoint_size != Some(r.height) || r.batches != r.height {
                audited.push(format!(
                    "{} batches verified up to height {} of the checkpoint's {:?}",
                    r.batches, r.height, r.checkpoint_size
                ));
            }
            if r.ok && r.checkpoint_size != Some(expected_archive) {
                audited.push(format!(
                    "the checkpoint covers {:?} batches, the cluster wrote {expected_archive}",
                    r.checkpoint_size
                ));
            }
        }
    }

    let invariants = vec![
        invariant(
            "restore_complete",
            complete,
            format!(
                "the archive caught up at the final height {archived}; every replica killed, \
                 wiped and restored to it; the restored chains equal the {final_height} headers \
                 before the loss, balances too; every acknowledged confirmation is in them; a \
                 new deposit was confirmed at {} and archived",
                archived + 1
            ),
        ),
        invariant(
            "restore_replays",
            replays,
            format!(
                "{} acknowledged requests resubmitted with the same bytes: each answered \
                 replayed, with its original receipt and header",
                summary.replays_checked
            ),
        ),
        invariant(
            "archive_audit",
            audited,
            format!(
                "audit ok: {} batches verified and replayed, up to the checkpoint's height",
                summary.final_archive_height
            ),
        ),
    ];
    Ok(Ending {
        invariants,
        summary,
        injected,
    })
}

/// Waits until the leader's status shows the archive at its applied height, which is at least
/// `at_least`. Ok(height), or Err((the archive's height last seen, what was seen)).
pub(crate) async fn caught_up(
    cluster: &LiveCluster,
    at_least: u64,
    timeout: Duration,
) -> Result<u64, (u64, String)> {
    let deadline = Instant::now() + timeout;
    loop {
        let st = cluster.statuses().await;
        let leader =
            leader_of(&st).and_then(|(id, _)| st.get(&id).cloned().flatten().map(|s| (id, s)));
        let (archive, seen) = match &leader {
            Some((id, s)) => {
                if s.archive_height == Some(s.applied_height) && s.applied_height >= at_least {
                    return Ok(s.applied_height);
                }
                (
                    s.archive_height.unwrap_or(0),
                    format!(
                        "leader node {id} applied {}, archive {:?}",
                        s.applied_height, s.archive_height
                    ),
                )
            }
            None => (0, "no leader".to_string()),
        };
        if Instant::now() >= deadline {
            return Err((archive, seen));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A successful `tally-server restore`.
struct Restored {
    height: u64,
    archive_height: u64,
    ms: u64,
}

/// Runs `tally-server restore --config nodeK.toml` for every replica at once, each one's output
/// going to `DIR/nodeK.restore.log`.
async fn restore_all(cluster: &LiveCluster) -> Result<BTreeMap<u64, Result<Restored, String>>> {
    let started = Instant::now();
    let mut running = Vec::new();
    for &id in &cluster.ids {
        let out_path = cluster.root().join(format!("node{id}.restore.log"));
        let out = std::fs::File::create(&out_path)?;
        let child = Command::new(cluster.server_bin())
            .arg("restore")
            .arg("--config")
            .arg(cluster.config_path(id))
            // The error line, without a backtrace after it.
            .env("RUST_BACKTRACE", "0")
            .env("RUST_LIB_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        running.push((id, out_path, child));
    }
    let mut out = BTreeMap::new();
    for (id, out_path, child) in running {
        let waited = tokio::task::spawn_blocking(move || wait_restore(child, started)).await?;
        let text = std::fs::read_to_string(&out_path).unwrap_or_default();
        let result = match waited {
            Ok(ms) => parse_restored(&text)
                .map(|(height, archive_height)| Restored {
                    height,
                    archive_height,
                    ms,
                })
                .ok_or_else(|| "it printed no `restored height` line".to_string()),
            Err(e) => Err(e),
        };
        let result = result.map_err(|e| {
            let why = text
                .lines()
                .find(|l| l.starts_with("Error:"))
                .or_else(|| text.lines().rev().find(|l| !l.trim().is_empty()))
                .unwrap_or("");
            format!("{e}: {} (see {})", why.trim(), out_path.display())
        });
        out.insert(id, result);
    }
    Ok(out)
}

/// Waits for one restore (killed after [`RESTORE_TIMEOUT`]); the milliseconds since `started`
/// once it succeeded.
fn wait_restore(mut child: std::process::Child, started: Instant) -> Result<u64, String> {
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() < RESTORE_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "still running after {} s",
                    RESTORE_TIMEOUT.as_secs()
                ));
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    if status.success() {
        Ok(started.elapsed().as_millis() as u64)
    } else {
        Err(format!("it exited with {status}"))
    }
}

/// (height, archive height) from `tally-server: restored height H of the archive's N in S s`.
fn parse_restored(text: &str) -> Option<(u64, u64)> {
    let rest = text.split("restored height ").nth(1)?;
    let (height, rest) = rest.split_once(" of the archive's ")?;
    let archive = rest.split_whitespace().next()?;
    Some((height.parse().ok()?, archive.parse().ok()?))
}

/// The restored replicas against what the cluster held before the loss.
fn check_restored(
    after: &Final,
    before: &[SignedHeader],
    before_balances: Option<&verdict::Balances>,
    recorder: &Recorder,
    problems: &mut Vec<String>,
) {
    for (id, chain) in &after.chains {
        match chain {
            Err(e) => problems.push(format!("node {id}: reading its restored chain: {e}")),
            Ok(chain) if chain.as_slice() != before => {
                let first = chain
                    .iter()
                    .zip(before)
                    .position(|(a, b)| a != b)
                    .map_or(chain.len().min(before.len()) + 1, |i| i + 1);
                problems.push(format!(
                    "node {id}: the restored chain ({} headers) differs from the chain before \
                     the loss ({} headers) from height {first} on",
                    chain.len(),
                    before.len()
                ));
            }
            Ok(_) => {}
        }
    }
    for (id, b) in &after.balances {
        match (b, before_balances) {
            (Err(e), _) => problems.push(format!("node {id}: reading restored balances: {e}")),
            (Ok(b), Some(old)) if b != old => problems.push(format!(
                "node {id}: the restored balances (at height {}) differ from those before the \
                 loss (at height {})",
                b.height, old.height
            )),
            _ => {}
        }
    }
    let empty = Vec::new();
    let restored: &Vec<SignedHeader> = after
        .reference
        .and_then(|id| after.chains.get(&id))
        .and_then(|c| c.as_ref().ok())
        .unwrap_or(&empty);
    let h = recorder.lock();
    let mut missing = 0;
    for (i, op) in h.ops.iter().enumerate() {
        let Some(c) = op.state.confirmed() else {
            continue;
        };
        let present = restored
            .get((c.height as usize).wrapping_sub(1))
            .is_some_and(|header| sha256(&[&header.encode()]) == c.header_digest);
        if !present {
            missing += 1;
            if missing <= 3 {
                problems.push(format!(
                    "op #{i}, acknowledged at height {}, is not in the restored chain ({} \
                     headers)",
                    c.height,
                    restored.len()
                ));
            }
        }
    }
    if missing > 3 {
        problems.push(format!(
            "{missing} acknowledged operations in all are missing after the restore"
        ));
    }
}

/// Up to [`REPLAYS_MAX`] acknowledged operations spread over the run's heights, the first and
/// the last included: (op index, request, its confirmation).
fn sample_confirmed(recorder: &Recorder) -> Vec<(usize, Request, Confirmed)> {
    let h = recorder.lock();
    let mut confirmed: Vec<(usize, Request, Confirmed)> = h
        .ops
        .iter()
        .enumerate()
        .filter_map(|(i, o)| {
            o.state
                .confirmed()
                .map(|c| (i, o.request.clone(), c.clone()))
        })
        .collect();
    confirmed.sort_by_key(|(i, _, c)| (c.height, c.index, *i));
    let n = confirmed.len();
    if n <= REPLAYS_MAX {
        return confirmed;
    }
    let picks: Vec<usize> = (0..REPLAYS_MAX)
        .map(|k| k * (n - 1) / (REPLAYS_MAX - 1))
        .collect();
    picks.into_iter().map(|k| confirmed[k].clone()).collect()
}

fn replay_options() -> ClusterOptions {
    ClusterOptions {
        total_timeout: Duration::from_secs(30),
        ..load::client_options()
    }
}

/// Resubmits each sampled request to the restored cluster: it must come back `replayed`, with
/// the receipt and header it was confirmed with.
async fn check_replays(
    sample: &[(usize, Request, Confirmed)],
    recorder: &Recorder,
    cluster: &LiveCluster,
    operator: &PublicKey,
    problems: &mut Vec<String>,
) {
    let client = ClusterClient::new(&cluster.profile, replay_options());
    for chunk in sample.chunks(16) {
        let mut tasks = Vec::new();
        for (op, request, original) in chunk.iter().cloned() {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let sent = Instant::now();
                (op, original, client.submit(request).await, sent)
            }));
        }
        for t in tasks {
            let Ok((op, original, result, sent)) = t.await else {
                problems.push("a replay task failed".into());
                continue;
            };
            let c = match result {
                Ok(c) => c,
                Err(e) => {
                    problems.push(format!(
                        "op #{op} (acknowledged at height {}) resubmitted: {e}",
                        original.height
                    ));
                    continue;
                }
            };
            // Recorded like every confirmation: verified, one receipt per key, one header per
            // height (the run-wide invariants).
            recorder.confirmation(op, &c, operator, sent);
            let same = c.receipt.height == original.height
                && c.receipt.index == original.index
                && sha256(&[&c.header.encode()]) == original.header_digest;
            if !c.replayed || !same {
                problems.push(format!(
                    "op #{op}, acknowledged at height {} index {}, resubmitted: answered{} at \
                     height {} index {}{}",
                    original.height,
                    original.index,
                    if c.replayed {
                        " as a replay"
                    } else {
                        " as a new request"
                    },
                    c.receipt.height,
                    c.receipt.index,
                    if same {
                        ""
                    } else {
                        " with another receipt or header"
                    }
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_lines_parse() {
        assert_eq!(
            parse_restored("tally-server: restored height 812 of the archive's 812 in 1.2 s\n"),
            Some((812, 812))
        );
        assert_eq!(
            parse_restored(
                "tally-server: restored height 2 of the archive's 9 in 0.1 s (below the tip: \
                 this replica will serve reads only)"
            ),
            Some((2, 9))
        );
        assert_eq!(parse_restored("Error: the archive does not verify"), None);
    }
}
