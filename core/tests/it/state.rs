//! The ledger summary: what its digest covers, and its stored form.

use tally_core::state::LedgerMeta;
use tally_core::Error;

use crate::common::pk;

#[test]
fn the_state_digest_covers_the_summary() {
    let mut base = LedgerMeta::genesis();
    base.account_changed(&pk(1), None, 5);
    base.map.flush();
    base.height = 3;
    base.total_deposited = 5;
    let check = |name: &str, change: fn(&mut LedgerMeta), covered: bool| {
        let mut m = base.clone();
        change(&mut m);
        assert_ne!(m, base, "{name}: the change changes nothing");
        assert_eq!(m.state_digest() != base.state_digest(), covered, "{name}");
    };
    check("height", |m| m.height += 1, true);
    check("account count", |m| m.account_count += 1, true);
    check("total deposited", |m| m.total_deposited += 1, true);
    check("total withdrawn", |m| m.total_withdrawn += 1, true);
    check(
        "a balance",
        |m| {
            m.account_changed(&pk(1), Some(5), 6);
            m.map.flush();
        },
        true,
    );
    check(
        "another account",
        |m| {
            m.account_changed(&pk(2), None, 0);
            m.map.flush();
        },
        true,
    );
    check(
        "a reserve",
        |m| {
            m.map.set_reserve(&pk(1), 1, &[0]);
            m.map.flush();
        },
        true,
    );
    // The chain link is the header's prev_hash; the digest is about state only.
    check("last header hash", |m| m.last_header_hash[0] ^= 1, false);
}

#[test]
fn meta_round_trips_and_refuses_other_lengths() {
    let mut m = LedgerMeta::genesis();
    m.account_changed(&pk(1), None, u64::MAX);
    m.map.flush();
    m.height = u64::MAX;
    m.last_header_hash = [9; 32];
    m.total_deposited = u128::MAX;
    m.total_withdrawn = 1;
    let bytes = m.encode();
    assert_eq!(LedgerMeta::decode(&bytes).expect("decodes"), m);
    for bad in [
        &bytes[..bytes.len() - 1],
        &[&bytes[..], &[0u8][..]].concat()[..],
        &[],
    ] {
        assert!(
            matches!(LedgerMeta::decode(bad), Err(Error::Corrupt { .. })),
            "{} bytes",
            bad.len()
        );
    }
}
