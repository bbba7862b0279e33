//! A byte stream cut anywhere decodes to the same frames as when it arrives whole.

use tally_wire::*;

use crate::fixtures::*;

/// A minimal connection reader: appends each chunk to a buffer and cuts whole frames off its
/// front. Checks on the way that every `Incomplete { needed }` is exact: reading `needed` more
/// bytes never reads past the header (when the header is short) or past the frame.
fn feed(chunks: &[&[u8]]) -> Vec<RawFrame> {
    let mut buf: Vec<u8> = Vec::new();
    let mut frames = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            match decode_frame(&buf, MAX).expect("valid stream") {
                Decoded::Complete(frame, used) => {
                    assert_eq!(used, FRAME_HEADER_BYTES + frame.payload.len());
                    buf.drain(..used);
                    frames.push(frame);
                }
                Decoded::Incomplete { needed } => {
                    let want = if buf.len() < FRAME_HEADER_BYTES {
                        FRAME_HEADER_BYTES - buf.len()
                    } else {
                        let len = u32::from_le_bytes(buf[16..20].try_into().unwrap()) as usize;
                        FRAME_HEADER_BYTES + len - buf.len()
                    };
                    assert_eq!(needed, want, "buffer of {} bytes", buf.len());
                    break;
                }
            }
        }
    }
    assert!(buf.is_empty(), "{} bytes left over", buf.len());
    frames
}

fn two_frames() -> (Vec<u8>, Vec<Message>) {
    let messages = vec![
        Message::Submit(request(Op::Transfer)),
        Message::Confirmed(Box::new(confirmation(4, false))),
    ];
    let mut bytes = messages[0].encode_frame(1);
    bytes.extend_from_slice(&messages[1].encode_frame(2));
    (bytes, messages)
}

fn assert_frames(frames: &[RawFrame], messages: &[Message]) {
    assert_eq!(frames.len(), messages.len());
    for (i, (f, m)) in frames.iter().zip(messages).enumerate() {
        assert_eq!(f.correlation_id, i as u64 + 1);
        assert_eq!(&Message::decode(f).unwrap(), m);
    }
}

#[test]
fn split_at_every_byte_boundary() {
    let (bytes, messages) = two_frames();
    let whole = feed(&[&bytes]);
    assert_frames(&whole, &messages);
    for cut in 0..=bytes.len() {
        let (a, b) = bytes.split_at(cut);
        assert_eq!(feed(&[a, b]), whole, "cut at {cut}");
    }
}

#[test]
fn split_at_every_pair_of_boundaries_around_the_seam() {
    // Three pieces, with both cuts near the end of the first frame and the start of the second.
    let (bytes, _) = two_frames();
    let whole = feed(&[&bytes]);
    let seam = FRAME_HEADER_BYTES + REQUEST_BYTES;
    for i in seam - 24..=seam + 24 {
        for j in i..=seam + 24 {
            assert_eq!(
                feed(&[&bytes[..i], &bytes[i..j], &bytes[j..]]),
                whole,
                "cuts at {i}, {j}"
            );
        }
    }
}

#[test]
fn one_byte_at_a_time() {
    let (bytes, messages) = two_frames();
    let chunks: Vec<&[u8]> = bytes.chunks(1).collect();
    assert_frames(&feed(&chunks), &messages);
}

#[test]
fn every_sample_message_back_to_back() {
    let messages = every_message();
    let mut bytes = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        bytes.extend_from_slice(&m.encode_frame(i as u64 + 1));
    }
    for chunk in [1, 7, 20, 64, 1000, bytes.len()] {
        let chunks: Vec<&[u8]> = bytes.chunks(chunk).collect();
        assert_frames(&feed(&chunks), &messages);
    }
}
