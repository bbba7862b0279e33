//! `tally-bench --threshold-signers N --threshold-min T`: what FROST threshold signing
//! (`tally_core::threshold`) costs per header, step by step, beside one ordinary Ed25519
//! signature of the same 192 bytes measured in the same run (the single-key operator's cost).

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;
use tally_core::crypto::verify_strict;
use tally_core::threshold::{aggregate, deal, Share, SignerId};

#[derive(Debug, Serialize)]
pub struct ThresholdCost {
    pub signers: u16,
    pub threshold: u16,
    pub rounds: usize,
    /// Medians over the rounds, in microseconds.
    pub commit_us_per_signer: f64,
    pub sign_share_us_per_signer: f64,
    pub aggregate_us: f64,
    /// What a header costs the group in all: t commitments, t shares, one aggregation.
    pub total_cpu_us_per_header: f64,
    /// One Ed25519 signature of the same bytes with one key (the bound to compare with).
    pub single_key_sign_us: f64,
    /// Bytes a signer sends per header: its commitment and its share.
    pub bytes_per_signer: usize,
    pub deal_ms: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn micros(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e6
}

/// Deals an `n`-share key with threshold `t`, then signs `rounds` headers with signers 1..=t.
pub fn threshold_cost(n: u16, t: u16, rounds: usize) -> ThresholdCost {
    let mut rng = rand::rngs::OsRng;
    let started = Instant::now();
    let dealt = deal(n, t, &mut rng).expect("dealing");
    let deal_ms = started.elapsed().as_secs_f64() * 1e3;
    let signers: Vec<(SignerId, Share)> = (1..=t)
        .map(|id| {
            (
                id,
                Share::decode(&dealt.shares[&id]).expect("a dealt share"),
            )
        })
        .collect();
    let single = ed25519_dalek::SigningKey::generate(&mut rng);
    let (mut commit, mut sign, mut agg, mut one) = (vec![], vec![], vec![], vec![]);
    let mut bytes_per_signer = 0;
    for round in 0..rounds {
        let message = [round as u8; 192];
        let (mut nonces, mut commitments) = (BTreeMap::new(), BTreeMap::new());
        for (id, share) in &signers {
            let at = Instant::now();
            let (n, c) = share.commit(&mut rng).expect("commit");
            commit.push(micros(at));
            nonces.insert(*id, n);
            commitments.insert(*id, c);
        }
        let mut shares = BTreeMap::new();
        for (id, share) in &signers {
            let n = nonces.remove(id).expect("nonces");
            let at = Instant::now();
            shares.insert(*id, share.sign(&message, &commitments, n).expect("sign"));
            sign.push(micros(at));
        }
        bytes_per_signer = commitments[&1].len() + shares[&1].len();
        let at = Instant::now();
        let signature = aggregate(&message, &commitments, &shares, &dealt.public).expect("agg");
        agg.push(micros(at));
        assert!(verify_strict(&dealt.group_key, &message, &signature));
        let at = Instant::now();
        let _ = ed25519_dalek::Signer::sign(&single, &message);
        one.push(micros(at));
    }
    let (c, s, a) = (median(commit), median(sign), median(agg));
    ThresholdCost {
        signers: n,
        threshold: t,
        rounds,
        commit_us_per_signer: c,
        sign_share_us_per_signer: s,
        aggregate_us: a,
        total_cpu_us_per_header: f64::from(t) * (c + s) + a,
        single_key_sign_us: median(one),
        bytes_per_signer,
        deal_ms,
    }
}
