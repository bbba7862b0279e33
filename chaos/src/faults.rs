//! The faults a live run injects, and the seeded schedule that picks them.
//!
//! Faults run one after another: each is applied, held, healed, and the next waits until some
//! replica takes writes again. Each one affects at most a minority of the replicas, so the
//! cluster can always make progress once the fault's election is over. The archive outage is
//! the exception: it cuts every replica off the archive's store, but no replica off another,
//! so the cluster commits on until the archive lag bound refuses new writes; the next fault
//! waits until the store is back and the archive under the bound again. A replacement
//! ([`crate::membership`]) adds a replica before it removes one, so the cluster never has
//! fewer voters than it started with.

use std::time::Duration;

use anyhow::{bail, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use serde::Serialize;

/// A family of faults, as named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// SIGKILL of the leader or a backup (or, with 5 replicas, of both), restarted after a delay.
    Kill,
    /// SIGSTOP for longer than the election timeout, then SIGCONT.
    Pause,
    /// Leader isolated, majority/minority split, or one direction of some links cut.
    Partition,
    /// SIGTERM (a graceful shutdown that drains the batch in progress), restarted after a delay.
    Restart,
    /// A forced leader transfer under load: SIGUSR1 to the leader, which hands leadership to
    /// its best-caught-up follower.
    Transfer,
    /// Client connections dropped after requests went out and before their answers came back.
    CutClient,
    /// The archive's object store unreachable for a few seconds (the TCP proxy between the
    /// replicas and S3 cut), then back. Only a run with an S3 archive can inject it.
    ArchiveOutage,
    /// A membership change under load: a backup is replaced by a new replica, as an operator
    /// does (docs/OPERATING.md, "Replacing a dead replica"): `init-cluster --add-node` with a
    /// new id, started, added as a learner, promoted once it caught up, then the backup
    /// removed; it must exit by itself. Now and then the backup is cut off (a partition) for
    /// the whole change, as a dead replica would be.
    Replace,
}

impl FaultKind {
    pub const ALL: &'static [FaultKind] = &[
        FaultKind::Kill,
        FaultKind::Pause,
        FaultKind::Partition,
        FaultKind::Restart,
        FaultKind::Transfer,
        FaultKind::CutClient,
        FaultKind::ArchiveOutage,
        FaultKind::Replace,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Pause => "pause",
            FaultKind::Partition => "partition",
            FaultKind::Restart => "restart",
            FaultKind::Transfer => "transfer",
            FaultKind::CutClient => "cut-client",
            FaultKind::ArchiveOutage => "archive-outage",
            FaultKind::Replace => "replace",
        }
    }

    /// Why the harness cannot inject this kind in a run, if it cannot. Every kind works against
    /// any cluster except an archive outage, which needs the replicas' S3 traffic to go
    /// through the harness's proxy (`--archive s3://…` with a plain-HTTP endpoint): a local
    /// directory cannot be cut; and a replacement in a run that ends with `--total-loss`,
    /// because `restore` gives the raft log the config's initial voters (ARCHITECTURE.md,
    /// "Known limits"). `"all"` lists them anyway; such a run skips them and says why.
    pub fn unavailable(
        self,
        archive_proxied: bool,
        total_loss: bool,
        threshold: bool,
    ) -> Option<&'static str> {
        match self {
            FaultKind::Replace if threshold => {
                Some("not with --threshold: a new member needs a new group and a rotation to it, which this harness does not drive")
            }
            FaultKind::ArchiveOutage if !archive_proxied => Some(
                "needs an S3 archive the harness can cut (--archive s3://BUCKET/PREFIX with \
                 AWS_ENDPOINT_URL=http://…)",
            ),
            FaultKind::Replace if total_loss => Some(
                "not with --total-loss: restore writes the config's initial voters, not the \
                 members after a replacement",
            ),
            _ => None,
        }
    }
}

/// Parses `kill,pause,...` (or `all`).
pub fn parse_faults(text: &str) -> Result<Vec<FaultKind>> {
    let mut out = Vec::new();
    for word in text.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        if word == "all" {
            out.extend_from_slice(FaultKind::ALL);
            continue;
        }
        match FaultKind::ALL.iter().find(|k| k.name() == word) {
            Some(k) => out.push(*k),
            None => {
                let names: Vec<&str> = FaultKind::ALL.iter().map(|k| k.name()).collect();
                bail!("unknown fault {word:?}; known: {}", names.join(", "))
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// One concrete fault, fully decided from the seed before it is applied. Replica roles are
/// resolved against the leader at the time it is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// SIGKILL these replicas; restart them after `down`.
    Kill {
        leader: bool,
        backups: usize,
        down: Duration,
    },
    /// SIGSTOP one replica for `hold`.
    Pause { leader: bool, hold: Duration },
    /// SIGTERM one replica; restart it after `down`.
    Restart { leader: bool, down: Duration },
    /// Cut the leader off from everyone, both directions.
    IsolateLeader { hold: Duration },
    /// Split into a minority (with the leader if `leader_in_minority`) and a majority.
    Split {
        leader_in_minority: bool,
        hold: Duration,
    },
    /// Cut one direction only: the leader's outbound links, its inbound links, or one link
    /// from the leader to one backup.
    Asymmetric { variant: Asymmetry, hold: Duration },
    /// Drop client connections as soon as an answer comes back, for `hold`.
    CutClient { hold: Duration },
    /// Ask the leader to hand over leadership (SIGUSR1).
    Transfer,
    /// Cut every connection from the replicas to the archive's store for `hold`.
    ArchiveOutage { hold: Duration },
    /// Replace one backup by a new replica; with `isolated`, the backup is cut off from every
    /// other replica until its removal committed.
    Replace { isolated: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asymmetry {
    LeaderCannotSend,
    LeaderCannotHear,
    OneLinkFromLeader,
}

impl Plan {
    /// The name a report counts it under.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Plan::Kill { leader: true, .. } => "kill-leader",
            Plan::Kill { leader: false, .. } => "kill-backup",
            Plan::Pause { leader: true, .. } => "pause-leader",
            Plan::Pause { leader: false, .. } => "pause-backup",
            Plan::Restart { leader: true, .. } => "restart-leader",
            Plan::Restart { leader: false, .. } => "restart-backup",
            Plan::IsolateLeader { .. } => "partition-isolate-leader",
            Plan::Split {
                leader_in_minority: true,
                ..
            } => "partition-split-leader-in-minority",
            Plan::Split { .. } => "partition-split-leader-in-majority",
            Plan::Asymmetric {
                variant: Asymmetry::LeaderCannotSend,
                ..
            } => "partition-asymmetric-leader-cannot-send",
            Plan::Asymmetric {
                variant: Asymmetry::LeaderCannotHear,
                ..
            } => "partition-asymmetric-leader-cannot-hear",
            Plan::Asymmetric { .. } => "partition-asymmetric-one-link",
            Plan::CutClient { .. } => "cut-client",
            Plan::Transfer => "transfer-leader",
            Plan::ArchiveOutage { .. } => "archive-outage",
            Plan::Replace { isolated: false } => "replace-backup",
            Plan::Replace { isolated: true } => "replace-isolated-backup",
        }
    }

    /// Whether the fault takes the leader's leadership away (what failover times measure).
    pub fn disrupts_leader(&self) -> bool {
        match self {
            Plan::Kill { leader, .. }
            | Plan::Pause { leader, .. }
            | Plan::Restart { leader, .. } => *leader,
            Plan::IsolateLeader { .. } => true,
            Plan::Split {
                leader_in_minority, ..
            } => *leader_in_minority,
            Plan::Asymmetric { variant, .. } => *variant != Asymmetry::OneLinkFromLeader,
            Plan::CutClient { .. } | Plan::ArchiveOutage { .. } | Plan::Replace { .. } => false,
            Plan::Transfer => true,
        }
    }
}

fn ms(rng: &mut StdRng, low: u64, high: u64) -> Duration {
    Duration::from_millis(rng.gen_range(low..=high))
}

/// Draws the next fault among `kinds` (those the run can inject, see
/// [`FaultKind::unavailable`]) for a cluster of `nodes` whose election timeout is `election`.
pub fn draw(rng: &mut StdRng, kinds: &[FaultKind], nodes: u64, election: Duration) -> Plan {
    assert!(!kinds.is_empty(), "no fault kind to draw from");
    let kind = *kinds.choose(rng).expect("not empty");
    // Most faults aim at the leader: that is where failover happens.
    let at_leader = rng.gen_bool(0.8);
    let minority = ((nodes - 1) / 2) as usize;
    let election_ms = election.as_millis() as u64;
    match kind {
        FaultKind::Kill => {
            // A backup alone, or with 5 replicas now and then the leader and a backup.
            let backups = usize::from(!at_leader || (minority >= 2 && rng.gen_bool(0.3)));
            // Now and then a replica stays down long enough for the log to be compacted past
            // it, so that it must be sent a snapshot.
            let down = if rng.gen_bool(0.15) {
                ms(rng, 6000, 10_000)
            } else {
                ms(rng, 500, 3500)
            };
            Plan::Kill {
                leader: at_leader,
                backups,
                down,
            }
        }
        FaultKind::Pause => Plan::Pause {
            leader: at_leader,
            hold: ms(rng, 2 * election_ms + 200, 2 * election_ms + 2500),
        },
        FaultKind::Restart => Plan::Restart {
            leader: at_leader,
            down: ms(rng, 300, 2000),
        },
        FaultKind::Partition => {
            let hold = ms(rng, 2 * election_ms + 500, 2 * election_ms + 3500);
            match rng.gen_range(0..4) {
                0 => Plan::IsolateLeader { hold },
                1 => Plan::Split {
                    leader_in_minority: at_leader,
                    hold,
                },
                _ => {
                    let variant = *[
                        Asymmetry::LeaderCannotSend,
                        Asymmetry::LeaderCannotHear,
                        Asymmetry::OneLinkFromLeader,
                    ]
                    .choose(rng)
                    .expect("not empty");
                    Plan::Asymmetric { variant, hold }
                }
            }
        }
        FaultKind::CutClient => Plan::CutClient {
            // Short cuts are healed by the client library's own retry; long ones outlast its
            // total timeout and leave operations indeterminate.
            hold: if rng.gen_bool(0.5) {
                ms(rng, 100, 1000)
            } else {
                ms(rng, 10_500, 13_000)
            },
        },
        FaultKind::Transfer => Plan::Transfer,
        // Longer than the archive writer's longest backoff (5 s) now and then, so that a round
        // fails, backs off and fails again; the lag bound refuses writes in the longer ones.
        FaultKind::ArchiveOutage => Plan::ArchiveOutage {
            hold: ms(rng, 2000, 8000),
        },
        FaultKind::Replace => Plan::Replace {
            isolated: rng.gen_bool(0.3),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn fault_lists_parse() {
        assert_eq!(
            parse_faults("kill, pause,kill").unwrap(),
            vec![FaultKind::Kill, FaultKind::Pause]
        );
        assert_eq!(parse_faults("all").unwrap().len(), FaultKind::ALL.len());
        assert!(parse_faults("kill,explode").is_err());
    }

    #[test]
    fn draws_replay_from_the_seed_and_stay_within_a_minority() {
        let draw_all = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..200)
                .map(|_| draw(&mut rng, FaultKind::ALL, 3, Duration::from_millis(500)))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw_all(7), draw_all(7));
        for plan in draw_all(7) {
            if let Plan::Kill {
                leader, backups, ..
            } = plan
            {
                assert_eq!(leader as usize + backups, 1, "3 replicas: one down at most");
            }
        }
        let mut rng = StdRng::seed_from_u64(1);
        let five: Vec<Plan> = (0..500)
            .map(|_| draw(&mut rng, &[FaultKind::Kill], 5, Duration::from_millis(500)))
            .collect();
        assert!(five.iter().any(|p| matches!(
            p,
            Plan::Kill {
                leader: true,
                backups: 1,
                ..
            }
        )));
    }
}
