//! tally-wire's one integration-test binary.
//!
//! - `admin`: admin requests and membership replies: what is signed, every field's rule.
//! - `envelope`: envelopes of operations, their confirmations and failures, every refusal.
//! - `history`: history and account reads: their layouts, size bounds and every refusal.
//! - `roundtrip`: every message variant encodes and decodes back to itself.
//! - `malformed`: every way a frame or payload can be wrong, and what the decoder says.
//! - `stream`: frames cut at every byte boundary decode the same as whole ones.
//! - `errors`: `WireError` → `ErrorCode` mapping and the stable code table.
//! - `protocol_doc`: PROTOCOL.md's code table, message table and Info layout are the code's.
//! - `golden`: byte layouts written out by hand from PROTOCOL.md; they pin the format.
//! - `props`: randomized round trips and "decoding never panics" (proptest: a failure prints the
//!   minimal failing input and records its seed under `proptest-regressions/`, so it replays).

mod admin;
mod envelope;
mod errors;
mod fixtures;
mod golden;
mod history;
mod malformed;
mod props;
mod protocol_doc;
mod roundtrip;
mod stream;
