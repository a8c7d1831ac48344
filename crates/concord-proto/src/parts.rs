//! Large messages in parts: a message larger than the server's
//! `max_payload` (a replica's first world sync frame can hold the whole
//! document) travels as several messages on the same subject, each with a
//! header naming the frame and the part. Parts of one frame are published in
//! order by one publisher; a receiver that misses one drops the frame.
//!
//! ```
//! use concord_proto::parts::{parts, Reassembly};
//!
//! let frame: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
//! let mut whole = Reassembly::default();
//! let mut got = None;
//! for (header, bytes) in parts(&frame, 4_096, 7) {
//!     got = whole.push(header.as_ref(), &bytes).unwrap();
//! }
//! assert_eq!(got.as_deref(), Some(&frame[..]));
//! ```

/// Header naming the frame a part belongs to (a number that only rises per
/// connection) and the part: `<frame>:<index>/<count>`.
pub const PART_HEADER: &str = "Concord-World-Part";
/// Most bytes of one reassembled frame (the whole document, compressed, is
/// the largest a replica ever receives).
pub const REASSEMBLED_BYTES_MAX: usize = 256 * 1024 * 1024;
/// Most parts of one frame.
pub const PARTS_MAX: usize = 65_536;
/// Room kept in a message for headers and protocol overhead below `max_payload`.
pub const PART_OVERHEAD_BYTES: usize = 1024;

/// What a part header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    /// The frame.
    pub frame: u64,
    /// This part, from 0.
    pub index: usize,
    /// Parts of the frame.
    pub count: usize,
}

impl Part {
    /// The header value.
    pub fn encode(&self) -> String {
        format!("{}:{}/{}", self.frame, self.index, self.count)
    }

    /// Reads a header value.
    pub fn decode(s: &str) -> Option<Part> {
        let (frame, rest) = s.split_once(':')?;
        let (index, count) = rest.split_once('/')?;
        let p = Part {
            frame: frame.parse().ok()?,
            index: index.parse().ok()?,
            count: count.parse().ok()?,
        };
        (p.count >= 1 && p.count <= PARTS_MAX && p.index < p.count).then_some(p)
    }
}

/// Splits `frame` into messages of at most `part_bytes_max` bytes: one
/// message without a header when it fits, else parts that each name the
/// frame (`frame_id`) and their place.
pub fn parts(frame: &[u8], part_bytes_max: usize, frame_id: u64) -> Vec<(Option<Part>, Vec<u8>)> {
    let size = part_bytes_max.max(1);
    if frame.len() <= size {
        return vec![(None, frame.to_vec())];
    }
    let count = frame.len().div_ceil(size);
    frame
        .chunks(size)
        .enumerate()
        .map(|(index, c)| {
            (
                Some(Part {
                    frame: frame_id,
                    index,
                    count,
                }),
                c.to_vec(),
            )
        })
        .collect()
}

/// Why parts were dropped.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PartError {
    /// The header does not read as `<frame>:<index>/<count>`.
    #[error("malformed part header `{0}`")]
    Header(String),
    /// A part came out of order (one was lost): the frame is dropped.
    #[error("part {index} of frame {frame} came out of order; the frame is dropped")]
    OutOfOrder {
        /// The frame.
        frame: u64,
        /// The part.
        index: usize,
    },
    /// The frame grew past [`REASSEMBLED_BYTES_MAX`].
    #[error("a frame of more than {max} bytes; dropped")]
    TooLarge {
        /// The bound.
        max: usize,
    },
}

/// Puts parts back together. Parts of one frame arrive in order on one
/// subscription (NATS keeps a publisher's order); a gap drops the frame.
#[derive(Debug, Default)]
pub struct Reassembly {
    current: Option<(Part, Vec<u8>)>,
}

impl Reassembly {
    /// Takes one message: `Some(frame)` when a frame is complete.
    pub fn push(&mut self, header: Option<&Part>, bytes: &[u8]) -> Result<Option<Vec<u8>>, PartError> {
        let Some(p) = header else {
            self.current = None;
            return Ok(Some(bytes.to_vec()));
        };
        let expected = match &self.current {
            Some((q, _)) if q.frame == p.frame && q.count == p.count => q.index + 1,
            _ => 0,
        };
        if p.index != expected {
            self.current = None;
            return Err(PartError::OutOfOrder {
                frame: p.frame,
                index: p.index,
            });
        }
        let mut buf = match self.current.take() {
            Some((_, b)) if expected > 0 => b,
            _ => Vec::new(),
        };
        if buf.len() + bytes.len() > REASSEMBLED_BYTES_MAX {
            return Err(PartError::TooLarge {
                max: REASSEMBLED_BYTES_MAX,
            });
        }
        buf.extend_from_slice(bytes);
        if p.index + 1 == p.count {
            return Ok(Some(buf));
        }
        self.current = Some((*p, buf));
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_round_trip_and_a_gap_drops_the_frame() {
        let frame: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let ps = parts(&frame, 3_000, 9);
        assert_eq!(ps.len(), 4);
        assert_eq!(ps[3].0.unwrap().encode(), "9:3/4");
        assert_eq!(Part::decode("9:3/4"), ps[3].0);
        assert_eq!(Part::decode("9:4/4"), None);
        assert_eq!(Part::decode("x"), None);
        let mut r = Reassembly::default();
        let mut out = None;
        for (h, b) in &ps {
            out = r.push(h.as_ref(), b).unwrap();
        }
        assert_eq!(out.unwrap(), frame);
        // A lost part: the frame is dropped, the next one is whole.
        assert_eq!(r.push(ps[0].0.as_ref(), &ps[0].1), Ok(None));
        assert!(matches!(
            r.push(ps[2].0.as_ref(), &ps[2].1),
            Err(PartError::OutOfOrder { index: 2, .. })
        ));
        let small = parts(b"CWS-small", 3_000, 10);
        assert_eq!(small.len(), 1);
        assert_eq!(r.push(None, &small[0].1).unwrap().unwrap(), b"CWS-small");
    }
}
