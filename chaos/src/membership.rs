//! The `replace` fault: a backup replaced by a new replica while the load runs, the way an
//! operator does it (docs/OPERATING.md, "Replacing a dead replica"): `tally-server
//! init-cluster --add-node` with a new id, the new replica started, then the admin requests
//! of `tally cluster add --learner`, `promote` once it has caught up, and `remove` of the
//! backup, signed with the profile's `admin_key` and sent through `ClusterClient::admin`.
//!
//! The removed replica must exit by itself (code 0, saying so); it is then forgotten: the
//! final convergence and every invariant are judged over the members at the end, the new
//! replica included. With `isolated`, the backup is cut off from every other replica for the
//! whole change (a partition, as a dead replica would be) and healed once its removal
//! committed; a replica that never heard of its removal keeps running outside the cluster
//! (ARCHITECTURE.md, "Known limits"), so the harness stops it then, as an operator would.

use std::time::{Duration, Instant};

use anyhow::Result;
use ed25519_dalek::SigningKey;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::Serialize;
use tally_client::{ClusterClient, ClusterOptions};
use tally_wire::{AdminCommand, MemberRole, MembersReply};

use crate::cluster::{leader_of, AddedReplica, LiveCluster};
use crate::faults::Plan;
use crate::load::Recorder;
use crate::report::{FaultEvent, Invariant};

/// How long each membership change may take, retries included.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a new replica may take to reach the leader's height.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a replica removed while connected may take to exit by itself.
const EXIT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a replica removed while cut off is given, once healed, to hear of its removal.
const ISOLATED_EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// How one replacement went; the report lists every one.
#[derive(Debug, Clone, Serialize)]
pub struct Replacement {
    /// The backup replaced.
    pub old: u64,
    /// The replica that replaced it (0 if none could be made).
    pub new: u64,
    /// Whether the backup was cut off from every other replica during the change.
    pub isolated: bool,
    pub at_ms: u64,
    /// When each step was seen done, in ms since the run began.
    pub added_ms: Option<u64>,
    pub caught_up_ms: Option<u64>,
    pub promoted_ms: Option<u64>,
    pub removed_ms: Option<u64>,
    /// How the removed replica's process ended.
    pub old_exit: Option<String>,
    /// Whether it exited by itself with code 0, logging its removal.
    pub old_exited_cleanly: bool,
    /// Every step done: the new replica a voter, the backup no longer a member.
    pub completed: bool,
    /// The step that failed, if one did.
    pub failure: Option<String>,
}

/// Admin requests signed with the profile's admin key, to the current members.
struct Admin {
    client: ClusterClient,
    chain_id: [u8; 32],
    key: SigningKey,
}

impl Admin {
    fn new(cluster: &LiveCluster) -> Result<Admin> {
        let options = ClusterOptions {
            call_timeout: Duration::from_secs(2),
            total_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_millis(500),
            queue_max: 4,
        };
        Ok(Admin {
            client: ClusterClient::new(&cluster.profile, options),
            chain_id: cluster.profile.chain_id_bytes()?,
            key: cluster.profile.load_admin_key()?,
        })
    }

    /// Sends `command` until a replica reports members for which `done` holds, retrying
    /// whatever fails (a change still pending answers `membership_refused`, a moving
    /// leadership `not_leader` or `unavailable`) until `timeout`. The members are asked
    /// first, so a change an earlier attempt made (its answer lost) is not sent again.
    async fn until(
        &self,
        command: AdminCommand,
        done: impl Fn(&MembersReply) -> bool,
        timeout: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut last = "no answer".to_string();
        while Instant::now() < deadline {
            for c in [AdminCommand::Members, command.clone()] {
                match self.client.admin(self.chain_id, &self.key, c).await {
                    Ok(members) if done(&members) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => last = e.to_string(),
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(format!("{command:?} not done within {timeout:?}: {last}"))
    }
}

fn role_of(members: &MembersReply, id: u64) -> Option<MemberRole> {
    members.members.iter().find(|m| m.id == id).map(|m| m.role)
}

/// The `replace` fault against the current leader's cluster: a random backup replaced. None if
/// no replica led within 15 s.
pub async fn fault(
    cluster: &mut LiveCluster,
    isolated: bool,
    rng: &mut StdRng,
    recorder: &Recorder,
) -> Result<Option<(FaultEvent, Replacement)>> {
    let Some((leader, term)) = cluster.wait_leader(Duration::from_secs(15)).await else {
        return Ok(None);
    };
    let backups: Vec<u64> = cluster
        .ids
        .iter()
        .copied()
        .filter(|&id| id != leader)
        .collect();
    let old = *backups.choose(rng).expect("a cluster has backups");
    let r = replace(cluster, old, isolated, recorder).await?;
    let plan = Plan::Replace { isolated };
    let event = FaultEvent {
        at_ms: r.at_ms,
        healed_at_ms: recorder.now_ms(),
        kind: plan.kind_name().to_string(),
        targets: vec![old, r.new],
        disrupts_leader: plan.disrupts_leader(),
        leader: Some((leader, term)),
        detail: describe(&r),
    };
    Ok(Some((event, r)))
}

/// One line on a replacement: its steps' times and how it ended.
fn describe(r: &Replacement) -> String {
    let step = |name: &str, at: Option<u64>| match at {
        Some(ms) => format!("{name} +{} ms", ms - r.at_ms),
        None => format!("no {name}"),
    };
    let steps = [
        step("added", r.added_ms),
        step("caught up", r.caught_up_ms),
        step("promoted", r.promoted_ms),
        step("removed", r.removed_ms),
    ];
    format!(
        "node {} replaced by node {}{}: {}; node {} {}{}",
        r.old,
        r.new,
        if r.isolated {
            " (cut off throughout)"
        } else {
            ""
        },
        steps.join(", "),
        r.old,
        r.old_exit.as_deref().unwrap_or("still a member"),
        r.failure
            .as_ref()
            .map(|f| format!("; FAILED at {f}"))
            .unwrap_or_default()
    )
}

/// Replaces backup `old` by a new replica (see the module's doc). Errors are the harness's
/// own (files, processes); how the change went is in the [`Replacement`].
pub async fn replace(
    cluster: &mut LiveCluster,
    old: u64,
    isolated: bool,
    recorder: &Recorder,
) -> Result<Replacement> {
    let mut r = Replacement {
        old,
        new: 0,
        isolated,
        at_ms: recorder.now_ms(),
        added_ms: None,
        caught_up_ms: None,
        promoted_ms: None,
        removed_ms: None,
        old_exit: None,
        old_exited_cleanly: false,
        completed: false,
        failure: None,
    };
    if isolated {
        cluster.isolate(old, true);
    }
    let added = cluster.add_replica().await?;
    r.new = added.id;
    let admin = Admin::new(cluster)?;
    if let Err(e) = grow(cluster, &admin, &added, &mut r, recorder).await {
        r.failure = Some(e);
        cluster.heal_network();
        return Ok(r);
    }
    let removed = remove(cluster, &admin, old).await;
    cluster.heal_network();
    match removed {
        Ok(()) => r.removed_ms = Some(recorder.now_ms()),
        Err(e) => {
            r.failure = Some(e);
            return Ok(r);
        }
    }
    stop_removed(cluster, &mut r, recorder).await?;
    r.completed = true;
    Ok(r)
}

/// Adds the new replica as a learner, waits until it has caught up, promotes it. A replica
/// the cluster never added is stopped and forgotten; one it added stays (a member).
async fn grow(
    cluster: &mut LiveCluster,
    admin: &Admin,
    added: &AddedReplica,
    r: &mut Replacement,
    recorder: &Recorder,
) -> Result<(), String> {
    let id = added.id;
    let add = AdminCommand::Add {
        id,
        address: added.peer_address.to_string(),
        client_address: added.client_address.to_string(),
        learner: true,
    };
    let is_member = |m: &MembersReply| role_of(m, id).is_some();
    if let Err(e) = admin.until(add, is_member, CHANGE_TIMEOUT).await {
        cluster.terminate(id).await;
        cluster.retire(id).map_err(|e| e.to_string())?;
        return Err(format!("add: {e}"));
    }
    r.added_ms = Some(recorder.now_ms());
    catch_up(cluster, id)
        .await
        .map_err(|e| format!("catch-up: {e}"))?;
    r.caught_up_ms = Some(recorder.now_ms());
    let is_voter = |m: &MembersReply| role_of(m, id) == Some(MemberRole::Voter);
    let promote = AdminCommand::Promote { id };
    admin
        .until(promote, is_voter, CHANGE_TIMEOUT)
        .await
        .map_err(|e| format!("promote: {e}"))?;
    r.promoted_ms = Some(recorder.now_ms());
    Ok(())
}

/// Waits until replica `id`'s applied height reaches the leader's as it was when the wait
/// began.
async fn catch_up(cluster: &LiveCluster, id: u64) -> Result<(), String> {
    let deadline = Instant::now() + CATCH_UP_TIMEOUT;
    let mut target = None;
    let mut seen = 0;
    while Instant::now() < deadline {
        let st = cluster.statuses().await;
        if target.is_none() {
            let leader = leader_of(&st).and_then(|(l, _)| st.get(&l).cloned().flatten());
            target = leader.map(|s| s.applied_height);
        }
        if let Some(s) = st.get(&id).cloned().flatten() {
            seen = s.applied_height;
            if target.is_some_and(|t| seen >= t) {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!(
        "node {id} at height {seen}, the leader's was {target:?}, after {CATCH_UP_TIMEOUT:?}"
    ))
}

/// Removes `old`, first moving leadership off it (SIGUSR1) if it leads: a leader cannot
/// remove itself.
async fn remove(cluster: &mut LiveCluster, admin: &Admin, old: u64) -> Result<(), String> {
    let gone = |m: &MembersReply| role_of(m, old).is_none();
    let mut last = String::new();
    for _ in 0..3 {
        if cluster.leader().await.is_some_and(|(l, _)| l == old) {
            let _ = cluster.transfer_leadership(old);
            cluster.wait_leader(Duration::from_secs(10)).await;
        }
        let command = AdminCommand::Remove { id: old };
        match admin.until(command, gone, CHANGE_TIMEOUT / 2).await {
            Ok(()) => return Ok(()),
            Err(e) => last = e,
        }
    }
    Err(format!("remove: {last}"))
}

/// Waits for the removed replica to exit by itself, stops it if it does not (a replica cut
/// off when its removal committed never hears of it), and forgets it.
async fn stop_removed(
    cluster: &mut LiveCluster,
    r: &mut Replacement,
    recorder: &Recorder,
) -> Result<()> {
    let old = r.old;
    let patience = if r.isolated {
        ISOLATED_EXIT_TIMEOUT
    } else {
        EXIT_TIMEOUT
    };
    match cluster.wait_exit(old, patience).await {
        Some(status) => {
            if !status.success() {
                let line = format!(
                    "node {old} exited with {status} after its removal; see {}",
                    cluster.log_path(old).display()
                );
                recorder.lock().crashes.push(line);
            }
            let said = std::fs::read_to_string(cluster.log_path(old))
                .is_ok_and(|log| log.contains("removed from the cluster"));
            r.old_exited_cleanly = status.success() && said;
            r.old_exit = Some(format!(
                "exited by itself ({status}){}",
                if said { ", logging its removal" } else { "" }
            ));
        }
        None => {
            cluster.terminate(old).await;
            r.old_exit = Some(format!(
                "still running {} s after its removal: stopped by the harness",
                patience.as_secs()
            ));
        }
    }
    cluster.retire(old)
}

/// The membership invariant of a run that replaced replicas: every replica removed while
/// connected exited by itself with code 0, logging its removal (those removed while cut off
/// may instead be stopped by the harness: a documented limit).
pub fn invariant(replacements: &[Replacement]) -> Invariant {
    let problems = replacements
        .iter()
        .filter(|r| r.removed_ms.is_some() && !r.isolated && !r.old_exited_cleanly)
        .map(|r| {
            format!(
                "node {} (replaced by {}): {}",
                r.old,
                r.new,
                r.old_exit.as_deref().unwrap_or("")
            )
        })
        .collect();
    let done = replacements.iter().filter(|r| r.completed).count();
    let clean = replacements.iter().filter(|r| r.old_exited_cleanly).count();
    crate::verdict::invariant(
        "removed_replicas_exit",
        problems,
        format!(
            "{done} of {} replacements completed; {clean} removed replicas exited by \
             themselves with code 0, logging their removal",
            replacements.len()
        ),
    )
}
