//! The end of a live run: what every replica holds once the cluster has healed, and the
//! invariants judged against it and against everything observed during the run.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tally_core::archive::{batch_key, decode_batch};
use tally_core::crypto::{header_hash, sha256, verify_header};
use tally_core::state::LedgerMeta;
use tally_wire::{PublicKey, ReadMode, SignedHeader};

use crate::cluster::LiveCluster;
use crate::envelopes::{self, ChainIndex};
use crate::history::Model;
use crate::load::History;
use crate::report::Invariant;
use crate::reserves::{self, Replay};

/// How long the archive may take to catch up with the final chain before its bodies are read.
const ARCHIVE_CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);

/// What the replicas hold at the end.
pub struct Final {
    /// Whether every replica reached the same applied height and latest header, and if not,
    /// what each one said.
    pub converged: Result<(), String>,
    /// The replica whose chain is the reference (the leader at the end, else the first that
    /// answered).
    pub reference: Option<u64>,
    pub chains: BTreeMap<u64, Result<Vec<SignedHeader>, String>>,
    /// Per replica: every account's balance, read at one height.
    pub balances: BTreeMap<u64, Result<Balances, String>>,
    /// Every operation of the reference chain, and its reserves, from its batches' bodies.
    pub bodies: Result<ChainBodies, String>,
}

/// What the final chain's bodies hold, read once in height order.
#[derive(Debug, Default)]
pub struct ChainBodies {
    pub index: ChainIndex,
    pub replay: Replay,
}

/// Every account's balance on one replica, in account order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Balances {
    pub height: u64,
    /// (exists, balance) per account.
    pub values: Vec<(bool, u64)>,
}

/// Waits until every replica answers with the same applied height and latest header and one of
/// them takes writes.
pub async fn converge(cluster: &LiveCluster, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let statuses = cluster.statuses().await;
        let described: Vec<String> = statuses
            .iter()
            .map(|(id, s)| match s {
                Some(s) => format!(
                    "node {id}: height {} ({}, term {}, commit {}, applied {})",
                    s.applied_height,
                    tally_client::role_name(s.role),
                    s.term,
                    s.commit_index,
                    s.applied_index
                ),
                None => format!("node {id}: no answer"),
            })
            .collect();
        let answered: Vec<_> = statuses.values().flatten().collect();
        if answered.len() == cluster.ids.len()
            && answered.iter().any(|s| s.writable)
            && answered.iter().all(|s| {
                s.applied_height == answered[0].applied_height
                    && s.latest_header == answered[0].latest_header
            })
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "not converged after {} s: {}",
                timeout.as_secs(),
                described.join("; ")
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads every replica's whole header chain and the balance of every account.
pub async fn collect(
    cluster: &LiveCluster,
    accounts: &[PublicKey],
    converged: Result<(), String>,
) -> Final {
    let timeout = Duration::from_secs(10);
    let mut chains = BTreeMap::new();
    let mut balances = BTreeMap::new();
    for &id in &cluster.ids {
        let chain = async {
            let client = cluster
                .client_of(id, timeout)
                .await
                .map_err(|e| e.to_string())?;
            let mut headers: Vec<SignedHeader> = Vec::new();
            loop {
                let page = client
                    .headers(headers.len() as u64 + 1, 1024)
                    .await
                    .map_err(|e| e.to_string())?;
                if page.is_empty() {
                    return Ok::<_, String>(headers);
                }
                headers.extend(page);
            }
        }
        .await;
        chains.insert(id, chain);
        balances.insert(id, read_balances(cluster, id, accounts, timeout).await);
    }
    let leader = cluster.leader().await.map(|(id, _)| id);
    let reference = leader
        .filter(|id| chains.get(id).is_some_and(|c| c.is_ok()))
        .or_else(|| chains.iter().find(|(_, c)| c.is_ok()).map(|(&id, _)| id));
    let bodies = match reference.and_then(|id| chains[&id].as_ref().ok().map(|c| (id, c))) {
        Some((_, chain)) => chain_index(cluster, chain).await,
        None => Err("no replica's chain could be read".into()),
    };
    Final {
        converged,
        reference,
        chains,
        balances,
        bodies,
    }
}

/// Every account's balance on replica `id`, read at one height.
async fn read_balances(
    cluster: &LiveCluster,
    id: u64,
    accounts: &[PublicKey],
    timeout: Duration,
) -> Result<Balances, String> {
    let client = cluster
        .client_of(id, timeout)
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(accounts.len());
    let mut height = None;
    for a in accounts {
        let b = client
            .balance(*a, ReadMode::Stale)
            .await
            .map_err(|e| e.to_string())?;
        if height.is_some_and(|h| h != b.height) {
            return Err(format!(
                "the applied height moved while reading balances ({} then {})",
                height.unwrap_or(0),
                b.height
            ));
        }
        height = Some(b.height);
        out.push((b.exists, b.balance));
    }
    Ok(Balances {
        height: height.unwrap_or(0),
        values: out,
    })
}

/// Every operation of `chain`, from its batches' bodies. The replicas serve no bodies, so they
/// are read from the archive's batch objects once it has caught up with the chain, each one's
/// header byte-equal to the chain's.
async fn chain_index(cluster: &LiveCluster, chain: &[SignedHeader]) -> Result<ChainBodies, String> {
    let height = chain.len() as u64;
    crate::total_loss::caught_up(cluster, height, ARCHIVE_CATCH_UP_TIMEOUT)
        .await
        .map_err(|(h, why)| format!("the archive holds {h} of {height} batches ({why})"))?;
    let bucket = cluster.archive_bucket().map_err(|e| e.to_string())?;
    let mut bodies = ChainBodies::default();
    for (i, signed) in chain.iter().enumerate() {
        let key = batch_key(i as u64 + 1);
        let bytes = match bucket.get(&key).await {
            Ok(Some((bytes, _))) => bytes,
            Ok(None) => return Err(format!("the archive lacks {key}")),
            Err(e) => return Err(format!("reading {key}: {e}")),
        };
        let batch = decode_batch(&bytes).map_err(|e| format!("{key}: {e}"))?;
        if &batch.signed != signed {
            return Err(format!("{key} holds another header than the final chain's"));
        }
        bodies.index.add(&batch.body);
        bodies.replay.add(&batch.body);
    }
    Ok(bodies)
}

/// Checks that a chain starts at height 1, has no gap, links every header to its predecessor
/// and carries valid operator signatures throughout.
pub fn check_chain(chain: &[SignedHeader], operator: &PublicKey) -> Result<(), String> {
    let mut prev = [0u8; 32];
    for (i, h) in chain.iter().enumerate() {
        let height = i as u64 + 1;
        if h.header.height != height {
            return Err(format!("header #{height} says height {}", h.header.height));
        }
        if h.header.prev_hash != prev {
            return Err(format!(
                "header {height} does not link to header {}",
                height - 1
            ));
        }
        if let Err(e) = verify_header(operator, h) {
            return Err(format!("header {height}: {e}"));
        }
        prev = header_hash(&h.header);
    }
    Ok(())
}

pub(crate) fn invariant(name: &'static str, problems: Vec<String>, ok_detail: String) -> Invariant {
    if problems.is_empty() {
        Invariant {
            name,
            ok: true,
            detail: ok_detail,
        }
    } else {
        let n = problems.len();
        let mut shown: Vec<String> = problems.into_iter().take(5).collect();
        if n > 5 {
            shown.push(format!("... and {} more", n - 5));
        }
        Invariant {
            name,
            ok: false,
            detail: shown.join("; "),
        }
    }
}

/// Judges every invariant. Returns them with the final height of the reference chain.
pub fn judge(
    h: &mut History,
    fin: &Final,
    accounts: &[PublicKey],
    operator: &PublicKey,
) -> (Vec<Invariant>, u64) {
    let empty = Vec::new();
    let reference: &Vec<SignedHeader> = fin
        .reference
        .and_then(|id| fin.chains.get(&id))
        .and_then(|c| c.as_ref().ok())
        .unwrap_or(&empty);
    let final_height = reference.len() as u64;
    for (id, chain) in &fin.chains {
        if let Ok(chain) = chain {
            for header in chain {
                h.headers
                    .record(header, || format!("the final chain of node {id}"));
            }
        }
    }

    let (mut model, unknown) = model_of(h, accounts.len());
    let replay = fin.bodies.as_ref().ok().map(|b| &b.replay);
    if let Some(r) = replay {
        model.add_net(accounts, &r.net);
    }
    let envelope = envelope_verdict(h, fin, reference);
    // What open reserves hold is not in any balance (PROTOCOL.md §4.10, conservation).
    let held = replay.map_or(0, |r| r.held() as i128);
    let expected_total = model.deposited as i128 - model.withdrawn as i128 - held;

    // 4. Convergence: same height, latest header and chain everywhere; valid chains.
    let mut converge_problems = Vec::new();
    if let Err(e) = &fin.converged {
        converge_problems.push(e.clone());
    }
    for (id, chain) in &fin.chains {
        match chain {
            Err(e) => converge_problems.push(format!("node {id}: reading its chain: {e}")),
            Ok(chain) => {
                if let Err(e) = check_chain(chain, operator) {
                    converge_problems.push(format!("node {id}: {e}"));
                }
                if chain != reference {
                    converge_problems.push(format!(
                        "node {id}'s chain (height {}) differs from node {}'s (height {})",
                        chain.len(),
                        fin.reference.unwrap_or(0),
                        reference.len()
                    ));
                }
            }
        }
    }
    let mut reads: Vec<(u64, &Balances)> = Vec::new();
    for (id, b) in &fin.balances {
        match b {
            Err(e) => converge_problems.push(format!("node {id}: reading balances: {e}")),
            Ok(b) => reads.push((*id, b)),
        }
    }
    if let Some((first_id, first)) = reads.first() {
        for (id, b) in &reads[1..] {
            if b.values != first.values {
                converge_problems.push(format!(
                    "node {id}'s balances differ from node {first_id}'s"
                ));
            }
        }
    }
    let converge = invariant(
        "replicas_converge",
        converge_problems,
        format!(
            "all {} replicas at height {final_height} with the same latest header, the same \
             {final_height}-header chain (links and signatures checked) and the same balances",
            fin.chains.len()
        ),
    );

    // 1. Conservation, and the state digest recomputed from what was read.
    let mut conservation = Vec::new();
    for (id, Balances { height, values }) in &reads {
        let sum: i128 = values.iter().map(|(_, b)| *b as i128).sum();
        if sum != expected_total {
            conservation.push(format!(
                "node {id}: balances sum to {sum}, deposits minus withdrawals are {expected_total}"
            ));
        }
        let mut meta = LedgerMeta::genesis();
        for ((exists, balance), key) in values.iter().zip(accounts) {
            if *exists {
                meta.account_changed(key, None, *balance);
            }
        }
        if let Some(r) = replay {
            r.add_reserves(&mut meta);
        }
        meta.map.flush();
        meta.height = *height;
        meta.total_deposited = model.deposited;
        meta.total_withdrawn = model.withdrawn;
        match reference.get((*height as usize).wrapping_sub(1)) {
            Some(header) if header.header.state_digest == meta.state_digest() => {}
            Some(_) => conservation.push(format!(
                "node {id}: the state digest recomputed from the balances read and the model's \
                 totals does not match header {height}'s"
            )),
            None => conservation.push(format!(
                "node {id}: balances read at height {height}, which the final chain lacks"
            )),
        }
    }
    if !unknown.is_empty() {
        conservation.push(format!(
            "{} operations unresolved: the expected total is unknown",
            unknown.len()
        ));
    }
    let conservation = invariant(
        "conservation",
        conservation,
        format!(
            "on every replica the {} balances sum to deposits {} minus withdrawals {} = \
             {expected_total} (u64 balances, none negative), and the state digest recomputed \
             from them matches the final header",
            accounts.len(),
            model.deposited,
            model.withdrawn
        ),
    );

    // 2. Every confirmed request is in the final chain once; balances match the model.
    let mut once = [unknown.clone(), envelope.fate].concat();
    let mut confirmed = 0;
    let mut not_in_chain = 0;
    for (i, op) in h.ops.iter().enumerate() {
        let Some(c) = op.state.confirmed() else {
            continue;
        };
        confirmed += 1;
        let in_chain = reference
            .get((c.height as usize).wrapping_sub(1))
            .is_some_and(|header| sha256(&[&header.encode()]) == c.header_digest);
        if !in_chain {
            not_in_chain += 1;
            if not_in_chain <= 3 {
                once.push(format!(
                    "op #{i} was confirmed at height {} (term {}) but the final chain {}",
                    c.height,
                    c.term,
                    if c.height > final_height {
                        "ends before that height"
                    } else {
                        "holds another batch there"
                    }
                ));
            }
        }
    }
    if not_in_chain > 3 {
        once.push(format!(
            "{not_in_chain} confirmed operations in all are missing from the final chain"
        ));
    }
    for (id, b) in &reads {
        let actual: Vec<u64> = b.values.iter().map(|(_, b)| *b).collect();
        for d in model.differences(&actual) {
            once.push(format!("node {id}: {d}"));
        }
    }
    let rejected = h
        .ops
        .iter()
        .filter(|o| o.state.applied() == Some(false))
        .count();
    let exactly_once = invariant(
        "confirmed_exactly_once",
        once,
        format!(
            "{confirmed} confirmed operations all in the final chain; every account's balance \
             equals the model built from them (each applied once), {rejected} refused or \
             never-applied ones (not applied) and every indeterminate one as resolved"
        ),
    );

    // 3. Retries with the same id never applied twice.
    let retried = h.ops.iter().filter(|o| o.retried).count();
    let replayed = h
        .ops
        .iter()
        .filter(|o| o.state.confirmed().is_some_and(|c| c.replayed))
        .count();
    let mut twice = [h.receipts.conflicts.clone(), envelope.twice].concat();
    if !reads.is_empty() && !exactly_once.ok {
        twice.push("balances differ from the model (see confirmed_exactly_once)".into());
    }
    let retries = invariant(
        "retries_not_applied_twice",
        twice,
        format!(
            "{retried} operations resubmitted by the harness ({replayed} answered as replays) \
             and every client-library retry: each request key confirmed with one receipt only, \
             and balances count each once"
        ),
    );

    // 5. Confirmations verify against a signed header in the final chain.
    let mut verify = h.verify_failures.clone();
    if not_in_chain > 0 {
        verify.push(format!(
            "{not_in_chain} confirmations name a header that is not in the final chain"
        ));
    }
    let verified = invariant(
        "confirmations_verify_in_final_chain",
        verify,
        format!(
            "{} confirmations received (replays included) verified on arrival \
             (verify_confirmation), and each one's signed header is byte-equal to the final \
             chain's at its height",
            h.receipts.len()
        ),
    );

    // 6. Never two signed headers for one height.
    let forks = h.headers.forks();
    let no_fork = invariant(
        "no_fork",
        forks,
        format!(
            "{} header observations (confirmations, status samples, final chains) over {} \
             heights: one signed header per height",
            h.headers.observations,
            h.headers.heights()
        ),
    );

    // 7. Heights a client observes never go backwards.
    let monotonic = invariant(
        "heights_monotonic",
        h.regressions.clone(),
        format!(
            "per client, {} linearizable reads and every new request's confirmation never \
             went below a height seen before",
            h.reads
        ),
    );

    let crashes = invariant(
        "no_replica_crash",
        h.crashes.clone(),
        "no replica exited unless the harness stopped it, and no replica log shows a panic".into(),
    );

    (
        vec![
            conservation,
            exactly_once,
            retries,
            converge,
            verified,
            no_fork,
            monotonic,
            crashes,
        ]
        .into_iter()
        .chain(envelope.invariants)
        .chain(reserve_invariants(h, fin))
        .collect(),
        final_height,
    )
}

/// The model: balances implied by every operation known to be applied (the operations of
/// envelopes included), and the submissions whose outcome is unknown.
fn model_of(h: &History, accounts: usize) -> (Model, Vec<String>) {
    let mut model = Model::new(accounts);
    let mut unknown = Vec::new();
    for (i, op) in h.ops.iter().enumerate() {
        match op.state.applied() {
            Some(true) => model.apply(op.effect),
            Some(false) => {}
            None => unknown.push(format!("op #{i} is still unresolved: {:?}", op.state)),
        }
    }
    for (i, e) in h.envelopes.iter().enumerate() {
        e.apply_to(&mut model);
        if e.state.applied().is_none() {
            unknown.push(format!("envelope #{i} is still unresolved: {:?}", e.state));
        }
    }
    (model, unknown)
}

/// The envelope invariants, and what the others must add.
struct EnvelopeInvariants {
    invariants: Vec<Invariant>,
    /// Envelopes whose confirmation or settled refusal the final chain contradicts.
    fate: Vec<String>,
    /// Operation keys the final chain applies twice.
    twice: Vec<String>,
}

/// Judges `envelopes_atomic`, `envelopes_whole` and `failed_operations_change_nothing` against
/// the final chain's bodies (`envelopes::check`).
fn envelope_verdict(h: &History, fin: &Final, reference: &[SignedHeader]) -> EnvelopeInvariants {
    let (mut v, twice) = match &fin.bodies {
        Ok(b) => (
            envelopes::check(&h.envelopes, &b.index),
            b.index.twice.clone(),
        ),
        Err(e) => {
            let why = format!("the final chain's bodies could not be read: {e}");
            let v = envelopes::EnvelopeVerdict {
                atomic: vec![why.clone()],
                whole: vec![why.clone()],
                failed_ops: vec![why],
                ..Default::default()
            };
            (v, Vec::new())
        }
    };
    let mut fate = std::mem::take(&mut v.fate);
    for (i, e) in h.envelopes.iter().enumerate() {
        let Some(c) = e.state.confirmed() else {
            continue;
        };
        let at = reference.get((c.height as usize).wrapping_sub(1));
        if at.is_none_or(|header| sha256(&[&header.encode()]) != c.header_digest) {
            fate.push(format!(
                "envelope #{i} was confirmed under a header the final chain lacks at height {}",
                c.height
            ));
        }
    }
    let invariants = envelope_invariants(h, v);
    EnvelopeInvariants {
        invariants,
        fate,
        twice,
    }
}

/// The three envelope invariants from their problems and the counts they describe.
fn envelope_invariants(h: &History, v: envelopes::EnvelopeVerdict) -> Vec<Invariant> {
    let (in_chain, failed_in_chain) = (v.in_chain, v.failed_in_chain);
    let sent = |atomic: bool| {
        h.envelopes
            .iter()
            .filter(|e| e.envelope.atomic == atomic)
            .count()
    };
    let failed_ops: usize = h
        .envelopes
        .iter()
        .map(|e| e.failed.iter().flatten().count())
        .sum();
    vec![
        invariant(
            "envelopes_atomic",
            v.atomic,
            format!(
                "{} atomic envelopes sent, {} in the final chain: each one's operations all \
                 there as consecutive leaves under its hash, none failed, or none there",
                sent(true),
                in_chain.0
            ),
        ),
        invariant(
            "envelopes_whole",
            v.whole,
            format!(
                "{} independent envelopes sent, {} in the final chain: each one's operations \
                 all there as consecutive leaves under its hash, or none there",
                sent(false),
                in_chain.1
            ),
        ),
        invariant(
            "failed_operations_change_nothing",
            v.failed_ops,
            format!(
                "{} failed operations in the final chain ({failed_ops} confirmed as failed): \
                 each receipt names no balance and the model leaves it out",
                failed_in_chain
            ),
        ),
    ]
}

/// `reserves_settle_once`, `expiries_on_time`, `reserves_not_lost` and `supply_balanced` from the
/// final chain's bodies (`reserves::Replay`). The open reserves of the final state are checked
/// through the state digest (`conservation` recomputes it with every reserve's term), since the
/// replicas serve no reserve reads.
pub fn reserve_invariants(h: &History, fin: &Final) -> Vec<Invariant> {
    let names = [
        "reserves_settle_once",
        "expiries_on_time",
        "reserves_not_lost",
        "supply_balanced",
    ];
    let r = match &fin.bodies {
        Ok(b) => &b.replay,
        Err(e) => {
            let why = format!("the final chain's bodies could not be read: {e}");
            return (names.iter())
                .map(|&n| invariant(n, vec![why.clone()], String::new()))
                .collect();
        }
    };
    let confirmed = reserves::confirmed_reserves(&h.envelopes);
    let n = confirmed.len();
    let state: Option<Vec<(&(PublicKey, u128), &tally_core::reserve::Reserve)>> = None;
    let lost = r.not_lost(confirmed, state);
    let c = &r.counts;
    let open = (r.reserves.values())
        .filter(|x| x.fate == reserves::Fate::Open)
        .count();
    vec![
        invariant(
            "reserves_settle_once",
            r.settle_once.clone(),
            format!(
                "{} reserves in the final chain: {} posted ({} partly), {} voided, {} expired, {} \
                 renewals; none closed twice or acted on once closed, {} refusals as the \
                 chain's reserves imply",
                c.reserves,
                c.posted,
                c.posted_partly,
                c.voided,
                c.expired,
                c.renewed,
                c.refused.values().sum::<u64>()
            ),
        ),
        invariant(
            "expiries_on_time",
            r.on_time.clone(),
            format!(
                "{} expiries each at or after its deadline by its batch's time; no post, void or \
                 renew succeeded at or past one; batch times never went back",
                c.expired
            ),
        ),
        invariant(
            "reserves_not_lost",
            lost,
            format!(
                "{n} reserves confirmed to clients all in the final chain; the {open} still open \
                 held in the final state (its digest, see conservation)"
            ),
        ),
        invariant(
            "supply_balanced",
            r.supply.clone(),
            format!(
                "after each of {} batches: balances from the receipts plus what open reserves \
                 hold equal deposits minus withdrawals",
                r.height
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::Recorder;

    fn fin(bodies: Result<ChainBodies, String>) -> Final {
        Final {
            converged: Ok(()),
            reference: None,
            chains: BTreeMap::new(),
            balances: BTreeMap::new(),
            bodies,
        }
    }

    /// The live verdict names the four reserve invariants and fails the one whose problems the
    /// replay found, and all four when the bodies could not be read.
    #[test]
    fn the_reserve_invariants_fail_on_what_the_replay_found() {
        let recorder = Recorder::new();
        let h = recorder.lock();
        let mut b = ChainBodies::default();
        b.replay
            .on_time
            .push("an expiry before its deadline".into());
        let v = reserve_invariants(&h, &fin(Ok(b)));
        let failed: Vec<&str> = v.iter().filter(|i| !i.ok).map(|i| i.name).collect();
        assert_eq!(v.len(), 4);
        assert_eq!(failed, ["expiries_on_time"]);
        let v = reserve_invariants(&h, &fin(Err("no archive".into())));
        assert!(v.iter().all(|i| !i.ok), "{v:?}");
    }
}
