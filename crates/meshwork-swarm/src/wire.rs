//! The piece protocol's messages and framing (sans-IO).
//!
//! One long-lived stream per peer and content. Each side first sends `Hello` (the content id
//! and the piece count), then its `Bitfield`; after that any order. Every frame is a 4-byte
//! big-endian length and a postcard body, and every message has a bound checked **from the
//! length prefix**, before any buffer is allocated, and again after decoding:
//!
//! | message | bound |
//! |---|---|
//! | `Piece` | one block: at most 16 KiB of data |
//! | `Bitfield` | one bit per piece of the content |
//! | `Manifest` | [`MAX_MANIFEST_BYTES`] |
//! | `Peers` | [`MAX_PEX_PEERS`] entries of a peer id and [`MAX_PEX_ADDRS`] addresses (64 bytes each) |
//! | anything else | 64 bytes |
//!
//! A frame over [`MAX_FRAME`] is a protocol violation, as is a body that does not decode, a
//! request beyond the piece's length or longer than a block, or a message before `Hello`.

use serde::{Deserialize, Serialize};

use crate::manifest::{ContentId, MAX_MANIFEST_BYTES, MAX_PIECES};
use crate::picker::BLOCK_SIZE;

/// The largest frame: a manifest (the largest message) plus its envelope.
pub const MAX_FRAME: usize = MAX_MANIFEST_BYTES + 64;
/// Frames other than `Manifest` and `Bitfield` fit here.
pub const MAX_SMALL_FRAME: usize = BLOCK_SIZE as usize + 64;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    Hello {
        content: ContentId,
        pieces: u32,
        /// Where the sender listens (for peer exchange), at most [`MAX_PEX_ADDRS`].
        listen: Vec<PexAddr>,
    },
    Bitfield(#[serde(with = "serde_bytes_vec")] Vec<u8>),
    Have(u32),
    Interested,
    NotInterested,
    Choke,
    Unchoke,
    Request {
        piece: u32,
        offset: u32,
        len: u32,
    },
    Cancel {
        piece: u32,
        offset: u32,
        len: u32,
    },
    Piece {
        piece: u32,
        offset: u32,
        #[serde(with = "serde_bytes_vec")]
        data: Vec<u8>,
    },
    /// Ask for the manifest (a fetch that starts from the content id alone). It opens a
    /// stream of its own, answered with one `Manifest` and closed.
    GetManifest(ContentId),
    Manifest(#[serde(with = "serde_bytes_vec")] Vec<u8>),
    /// In-swarm peer exchange: other peers of this content and how to reach them.
    Peers(Vec<PexEntry>),
}

/// One peer in a [`Msg::Peers`]: its peer id and multiaddrs, as bytes (this crate knows no
/// libp2p; the driver parses them and drops what does not parse).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PexEntry {
    #[serde(with = "serde_bytes_vec")]
    pub peer: Vec<u8>,
    pub addrs: Vec<PexAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PexAddr(#[serde(with = "serde_bytes_vec")] pub Vec<u8>);

/// Peers in one `Peers` message, at most.
pub const MAX_PEX_PEERS: usize = 32;
/// Addresses per peer in a `Peers` message, and bytes per peer id or address, at most.
pub const MAX_PEX_ADDRS: usize = 2;
pub const MAX_PEX_ITEM: usize = 64;

/// postcard writes `Vec<u8>` as a length and the bytes either way; this keeps the intent
/// explicit and the encoding stable if the format ever changes.
mod serde_bytes_vec {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let v: &[u8] = <&[u8]>::deserialize(d)?;
        Ok(v.to_vec())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame of {0} bytes exceeds the limit of {1}")]
    FrameTooLarge(usize, usize),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("{0}")]
    Violation(String),
}

impl Msg {
    pub fn encode(&self) -> Vec<u8> {
        let body = postcard::to_allocvec(self).expect("a message always encodes");
        let mut out = Vec::with_capacity(4 + body.len());
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Decodes one frame body (without its length prefix).
    pub fn decode(body: &[u8]) -> Result<Msg, WireError> {
        let (m, rest): (Msg, _) =
            postcard::take_from_bytes(body).map_err(|e| WireError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(WireError::Malformed(format!(
                "{} trailing bytes",
                rest.len()
            )));
        }
        Ok(m)
    }

    /// Checks the message's own bounds for a content of `pieces` pieces whose piece `i` is
    /// `piece_len(i)` bytes long.
    pub fn check(&self, pieces: u32, piece_len: impl Fn(u32) -> u32) -> Result<(), WireError> {
        let v = |s: String| Err(WireError::Violation(s));
        match self {
            Msg::Hello { pieces: p, .. } if *p as usize > MAX_PIECES => v(format!("{p} pieces")),
            Msg::Hello { listen, .. }
                if listen.len() > MAX_PEX_ADDRS
                    || listen.iter().any(|a| a.0.len() > MAX_PEX_ITEM) =>
            {
                v("oversized listen addresses in hello".into())
            }
            Msg::Bitfield(b) if b.len() != (pieces as usize).div_ceil(8) => {
                v(format!("bitfield of {} bytes for {pieces} pieces", b.len()))
            }
            Msg::Have(i) if *i >= pieces => v(format!("have {i} of {pieces} pieces")),
            Msg::Request { piece, offset, len } | Msg::Cancel { piece, offset, len } => {
                if *piece >= pieces {
                    return v(format!("request for piece {piece} of {pieces}"));
                }
                if *len == 0 || *len > BLOCK_SIZE {
                    return v(format!(
                        "request of {len} bytes (blocks are at most {BLOCK_SIZE})"
                    ));
                }
                if offset
                    .checked_add(*len)
                    .is_none_or(|end| end > piece_len(*piece))
                {
                    return v(format!("request {offset}+{len} beyond piece {piece}"));
                }
                Ok(())
            }
            Msg::Piece {
                piece,
                offset,
                data,
            } => {
                if *piece >= pieces || data.is_empty() || data.len() > BLOCK_SIZE as usize {
                    return v(format!(
                        "piece message for {piece} with {} bytes",
                        data.len()
                    ));
                }
                if offset
                    .checked_add(data.len() as u32)
                    .is_none_or(|end| end > piece_len(*piece))
                {
                    return v(format!(
                        "block {offset}+{} beyond piece {piece}",
                        data.len()
                    ));
                }
                Ok(())
            }
            Msg::Peers(list) => {
                if list.len() > MAX_PEX_PEERS {
                    return v(format!("{} peers in one exchange", list.len()));
                }
                for e in list {
                    if e.peer.len() > MAX_PEX_ITEM
                        || e.addrs.len() > MAX_PEX_ADDRS
                        || e.addrs.iter().any(|a| a.0.len() > MAX_PEX_ITEM)
                    {
                        return v("an oversized peer exchange entry".into());
                    }
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// Splits complete frames off the front of `buf`. Returns the messages and how many bytes
/// they used; a partial frame at the end waits for more bytes. `limit` is checked on each
/// length prefix before its body is needed.
pub fn split_frames(buf: &[u8], limit: usize) -> Result<(Vec<Msg>, usize), WireError> {
    let mut msgs = vec![];
    let mut used = 0;
    while buf.len() - used >= 4 {
        let len = u32::from_be_bytes(buf[used..used + 4].try_into().expect("4 bytes")) as usize;
        if len > limit {
            return Err(WireError::FrameTooLarge(len, limit));
        }
        if buf.len() - used - 4 < len {
            break;
        }
        msgs.push(Msg::decode(&buf[used + 4..used + 4 + len])?);
        used += 4 + len;
    }
    Ok((msgs, used))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Digest;
    use proptest::prelude::*;

    fn len_of(_: u32) -> u32 {
        64 << 10
    }

    #[test]
    fn messages_round_trip_through_frames() {
        let msgs = vec![
            Msg::Hello {
                content: Digest::of(b"x"),
                pieces: 10,
                listen: vec![PexAddr(vec![1, 2, 3])],
            },
            Msg::Bitfield(vec![0xff, 0xc0]),
            Msg::Have(3),
            Msg::Interested,
            Msg::Unchoke,
            Msg::Request {
                piece: 2,
                offset: 16384,
                len: 16384,
            },
            Msg::Piece {
                piece: 2,
                offset: 16384,
                data: vec![7; 16384],
            },
        ];
        let mut bytes: Vec<u8> = msgs.iter().flat_map(|m| m.encode()).collect();
        bytes.extend_from_slice(&[0, 0]); // the start of a next frame
        let (back, used) = split_frames(&bytes, MAX_SMALL_FRAME).unwrap();
        assert_eq!(back, msgs);
        assert_eq!(used, bytes.len() - 2);
        for m in &back {
            m.check(10, len_of).unwrap();
        }
    }

    #[test]
    fn bounds_are_enforced() {
        let huge = (MAX_SMALL_FRAME as u32 + 1).to_be_bytes();
        assert!(matches!(
            split_frames(&huge, MAX_SMALL_FRAME),
            Err(WireError::FrameTooLarge(..))
        ));
        for bad in [
            Msg::Have(10),
            Msg::Bitfield(vec![0; 3]),
            Msg::Request {
                piece: 1,
                offset: 0,
                len: BLOCK_SIZE + 1,
            },
            Msg::Request {
                piece: 1,
                offset: 60 << 10,
                len: 8 << 10,
            },
            Msg::Piece {
                piece: 1,
                offset: u32::MAX,
                data: vec![1],
            },
            Msg::Piece {
                piece: 0,
                offset: 0,
                data: vec![],
            },
        ] {
            assert!(bad.check(10, len_of).is_err(), "{bad:?}");
        }
    }

    proptest! {
        /// Garbage never panics: it splits into messages or fails cleanly.
        #[test]
        fn garbage_is_refused_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            if let Ok((msgs, used)) = split_frames(&bytes, MAX_SMALL_FRAME) {
                prop_assert!(used <= bytes.len());
                for m in msgs {
                    let _ = m.check(10, len_of);
                }
            }
        }
    }
}
