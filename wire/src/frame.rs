//! The frame header: how a byte stream is cut into messages.

use crate::WireError;

/// The first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"TLLY";
/// The protocol version this build speaks. A frame with another version is refused.
pub const VERSION: u8 = 1;
/// Size of the fixed frame header.
pub const FRAME_HEADER_BYTES: usize = 20;
/// The default cap on a frame's payload. Servers configure theirs (`limits.frame_bytes_max`).
pub const FRAME_PAYLOAD_BYTES_MAX_DEFAULT: u32 = 1 << 20;

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub message_type: u8,
    pub correlation_id: u64,
    pub payload_len: u32,
}

/// The outcome of trying to decode a frame from the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<T> {
    /// A whole item, and how many bytes of the buffer it used.
    Complete(T, usize),
    /// The buffer holds a valid prefix; read at least this many more bytes and try again.
    Incomplete { needed: usize },
}

impl FrameHeader {
    pub fn encode(&self) -> [u8; FRAME_HEADER_BYTES] {
        let mut out = [0u8; FRAME_HEADER_BYTES];
        out[0..4].copy_from_slice(&MAGIC);
        out[4] = VERSION;
        out[5] = self.message_type;
        // out[6..8]: flags, zero in this version.
        out[8..16].copy_from_slice(&self.correlation_id.to_le_bytes());
        out[16..20].copy_from_slice(&self.payload_len.to_le_bytes());
        out
    }

    /// Decodes and checks a frame header. The payload cap is checked here, before the caller
    /// allocates a buffer for the payload. Each field is checked as soon as its bytes are present,
    /// so garbage is refused after four bytes rather than after a whole header's worth.
    pub fn decode(buf: &[u8], payload_bytes_max: u32) -> Result<Decoded<FrameHeader>, WireError> {
        let have = buf.len().min(4);
        if buf[..have] != MAGIC[..have] {
            let mut found = [0u8; 4];
            found[..have].copy_from_slice(&buf[..have]);
            return Err(WireError::BadMagic { found });
        }
        if buf.len() > 4 && buf[4] != VERSION {
            return Err(WireError::UnsupportedVersion {
                found: buf[4],
                supported: VERSION,
            });
        }
        if buf.len() < FRAME_HEADER_BYTES {
            return Ok(Decoded::Incomplete {
                needed: FRAME_HEADER_BYTES - buf.len(),
            });
        }
        let flags = u16::from_le_bytes([buf[6], buf[7]]);
        if flags != 0 {
            return Err(WireError::BadFlags { found: flags });
        }
        let payload_len = u32::from_le_bytes(buf[16..20].try_into().expect("4 bytes"));
        if payload_len > payload_bytes_max {
            return Err(WireError::FrameTooLarge {
                length: payload_len,
                max: payload_bytes_max,
            });
        }
        let header = FrameHeader {
            message_type: buf[5],
            correlation_id: u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes")),
            payload_len,
        };
        Ok(Decoded::Complete(header, FRAME_HEADER_BYTES))
    }
}

/// A whole frame: header fields plus the raw payload, not yet decoded as a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    pub message_type: u8,
    pub correlation_id: u64,
    pub payload: Vec<u8>,
}

/// Cuts one frame from the front of `buf`. Checks the cap before copying the payload.
pub fn decode_frame(buf: &[u8], payload_bytes_max: u32) -> Result<Decoded<RawFrame>, WireError> {
    let header = match FrameHeader::decode(buf, payload_bytes_max)? {
        Decoded::Complete(header, _) => header,
        Decoded::Incomplete { needed } => return Ok(Decoded::Incomplete { needed }),
    };
    let total = FRAME_HEADER_BYTES + header.payload_len as usize;
    if buf.len() < total {
        return Ok(Decoded::Incomplete {
            needed: total - buf.len(),
        });
    }
    let frame = RawFrame {
        message_type: header.message_type,
        correlation_id: header.correlation_id,
        payload: buf[FRAME_HEADER_BYTES..total].to_vec(),
    };
    Ok(Decoded::Complete(frame, total))
}

/// Appends a whole frame (header and payload) to `out`.
pub fn encode_frame(out: &mut Vec<u8>, message_type: u8, correlation_id: u64, payload: &[u8]) {
    let payload_len = u32::try_from(payload.len()).expect("payload longer than u32::MAX");
    let header = FrameHeader {
        message_type,
        correlation_id,
        payload_len,
    };
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(payload);
}
