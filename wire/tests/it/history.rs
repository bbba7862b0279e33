//! History and account reads: byte offsets of the fixed fields, the page bound, and every
//! refusal of a malformed request or reply.

use tally_wire::*;

use crate::fixtures::*;

fn decode(message_type: u8, payload: &[u8]) -> Result<Message, WireError> {
    Message::decode(&frame(message_type, payload))
}

fn invalid(message_type: u8, payload: &[u8], field: &str) {
    match decode(message_type, payload) {
        Err(WireError::Invalid { field: f, .. }) => assert_eq!(f, field),
        other => panic!("0x{message_type:02x}: want invalid {field}, got {other:?}"),
    }
}

fn get_history(limit: u16) -> Message {
    Message::GetHistory {
        account: [1; 32],
        from_height: 2,
        from_index: 3,
        limit,
    }
}

#[test]
fn get_history_layout_and_limits() {
    let p = payload(&get_history(1));
    assert_eq!(p.len(), 32 + 8 + 4 + 2);
    assert_eq!(&p[32..40], &2u64.to_le_bytes());
    assert_eq!(&p[40..44], &3u32.to_le_bytes());
    assert_eq!(&p[44..46], &1u16.to_le_bytes());
    let max = payload(&get_history(HISTORY_ENTRIES_PER_REPLY_MAX));
    assert!(decode(message_type::GET_HISTORY, &max).is_ok());
    for limit in [0u16, HISTORY_ENTRIES_PER_REPLY_MAX + 1, u16::MAX] {
        let mut p = p.clone();
        p[44..46].copy_from_slice(&limit.to_le_bytes());
        invalid(message_type::GET_HISTORY, &p, "get_history.limit");
    }
}

#[test]
fn a_full_history_page_fits_the_reply_bound() {
    let full = history_reply(HISTORY_ENTRIES_PER_REPLY_MAX, true);
    let p = payload(&Message::History(Box::new(full.clone())));
    assert_eq!(p.len(), HISTORY_BYTES_MAX);
    assert!(p.len() <= REPLY_PAYLOAD_BYTES_MAX as usize);
    assert_eq!(
        decode(message_type::HISTORY, &p).unwrap(),
        Message::History(Box::new(full))
    );
    let empty = payload(&Message::History(Box::new(history_reply(0, false))));
    assert_eq!(empty.len(), HISTORY_FIXED_BYTES);
}

#[test]
fn history_reply_refusals() {
    let one = payload(&Message::History(Box::new(history_reply(1, true))));
    // Fixed part: account 0, height 32, held_from 40, has_next 48, next 49..61, count 61.
    let entry = 63;
    let mut bad = one.clone();
    bad[48] = 2;
    invalid(message_type::HISTORY, &bad, "history.has_next");
    let mut bad = one.clone();
    bad[61..63].copy_from_slice(&(HISTORY_ENTRIES_PER_REPLY_MAX + 1).to_le_bytes());
    invalid(message_type::HISTORY, &bad, "history.count");
    // Entry: height 0, index 8, op 12, direction 13.
    let mut bad = one.clone();
    bad[entry + 12] = 0;
    invalid(message_type::HISTORY, &bad, "history.entry.op");
    for direction in [0u8, 3, 0xff] {
        let mut bad = one.clone();
        bad[entry + 13] = direction;
        invalid(message_type::HISTORY, &bad, "history.entry.direction");
    }
    let headers_at = entry + HISTORY_ENTRY_BYTES;
    let mut bad = one.clone();
    bad[headers_at..headers_at + 2].copy_from_slice(&2u16.to_le_bytes());
    invalid(message_type::HISTORY, &bad, "history.header_count");
}

#[test]
fn account_layout_and_refusals() {
    let reply = account_reply();
    let p = payload(&Message::Account(Box::new(reply.clone())));
    assert_eq!(p.len(), ACCOUNT_REPLY_BYTES);
    assert_eq!(&p[32..40], &reply.height.to_le_bytes());
    assert_eq!(&p[42..50], &reply.balance.to_le_bytes());
    assert_eq!(&p[66..82], &reply.total_debited.to_le_bytes());
    assert_eq!(&p[106..114], &reply.last_height.to_le_bytes());
    for (at, field) in [(40, "account.exists"), (41, "account.pending_known")] {
        let mut bad = p.clone();
        bad[at] = 2;
        invalid(message_type::ACCOUNT, &bad, field);
    }
    let get = payload(&Message::GetAccount {
        account: [1; 32],
        at_height: 9,
    });
    assert_eq!(get.len(), 40);
    let by_receipt = payload(&Message::GetConfirmationByReceipt { leaf_hash: [2; 32] });
    assert_eq!(by_receipt, vec![2; 32]);
}

#[test]
fn the_new_codes_are_stable() {
    assert_eq!(ErrorCode::HistoryPruned as u16, 41);
    assert_eq!(ErrorCode::HistoryPruned.name(), "history_pruned");
    assert_eq!(ErrorCode::HeightNotApplied as u16, 42);
    assert_eq!(ErrorCode::HeightNotApplied.retry(), Retry::Never);
}
