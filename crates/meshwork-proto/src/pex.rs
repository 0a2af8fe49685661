//! The peer-exchange protocol, `/meshwork/<network>/pex/1`.
//!
//! One request, one response, on a fresh stream:
//! - the asker sends [`PexRequest`] with the number of records it wants (at most
//!   [`MAX_RECORDS`]);
//! - the answerer replies with [`PexResponse`], at most that many [`WireRecord`]s taken from
//!   the *tried* table of its address book (addresses it has connected to itself), each with at
//!   most [`MAX_ADDRS_PER_RECORD`] addresses.
//!
//! Both messages are postcard-encoded and framed with a 4-byte big-endian length; a frame longer
//! than [`MAX_MESSAGE_BYTES`] is a protocol violation and is refused before it is read.
//!
//! A response is validated as a whole ([`PexResponse::validate`]): one bad record makes the
//! whole answer rejected, so a peer that sends garbage changes nothing in our tables.

use libp2p_identity::PeerId;
use multiaddr::Multiaddr;
use serde::{Deserialize, Serialize};

use crate::addr::{check_dialable, AddrError};

/// The most records one answer may hold.
pub const MAX_RECORDS: usize = 32;
/// The most addresses one record may hold.
pub const MAX_ADDRS_PER_RECORD: usize = 4;
/// The largest encoded message, request or response. A full legitimate answer (32 records of 4
/// IPv6 QUIC addresses) is under 5 KiB.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024;
/// The longest encoded peer id and multiaddr accepted in a record.
const MAX_FIELD_BYTES: usize = 128;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PexRequest {
    /// How many records the asker wants; answers hold at most `min(max, MAX_RECORDS)`.
    pub max: u8,
}

/// A record as it travels: raw bytes, to be validated by the receiver.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireRecord {
    pub peer: Vec<u8>,
    pub addrs: Vec<Vec<u8>>,
    /// When the answerer last saw this peer, in seconds since the Unix epoch.
    pub last_seen: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PexResponse {
    pub records: Vec<WireRecord>,
}

/// A validated record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerRecord {
    pub peer: PeerId,
    /// Dialable addresses, without `/p2p` suffix, at least one.
    pub addrs: Vec<Multiaddr>,
    pub last_seen: u64,
}

/// What is wrong with a message.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum PexError {
    #[error("message of {0} bytes exceeds the limit of {MAX_MESSAGE_BYTES}")]
    Oversized(usize),
    #[error("message does not decode: {0}")]
    Decode(String),
    #[error("answer holds {got} records; at most {allowed} were asked for")]
    TooManyRecords { got: usize, allowed: usize },
    #[error("record holds {0} addresses; 1 to {MAX_ADDRS_PER_RECORD} are allowed")]
    BadAddrCount(usize),
    #[error("record holds an invalid peer id")]
    InvalidPeerId,
    #[error("record holds invalid multiaddr bytes")]
    InvalidMultiaddr,
    #[error("record holds an address we cannot use: {0}")]
    Addr(#[from] AddrError),
}

impl PexError {
    /// A severe error cannot come from an honest peer running any version of this protocol:
    /// broken encoding, limits exceeded, or records that contradict themselves. The rest
    /// (unroutable addresses, transports we do not speak) may come from a misconfigured but
    /// honest peer, and cost it less.
    pub fn is_severe(&self) -> bool {
        !matches!(
            self,
            PexError::Addr(AddrError::Unroutable(_))
                | PexError::Addr(AddrError::UnsupportedTransport(_))
        )
    }
}

impl PexRequest {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("encoding a small struct into a Vec cannot fail")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, PexError> {
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(PexError::Oversized(bytes.len()));
        }
        postcard::from_bytes(bytes).map_err(|e| PexError::Decode(e.to_string()))
    }

    /// How many records an answer to this request may hold.
    pub fn allowed(&self) -> usize {
        usize::from(self.max).min(MAX_RECORDS)
    }
}

impl PexResponse {
    /// Builds an answer from validated records, keeping within every limit: at most
    /// `MAX_RECORDS` records, `MAX_ADDRS_PER_RECORD` addresses each, `MAX_MESSAGE_BYTES` in all.
    pub fn from_records(records: impl IntoIterator<Item = PeerRecord>, max: usize) -> Self {
        let mut out = PexResponse::default();
        let mut size = 8usize;
        for r in records.into_iter().take(max.min(MAX_RECORDS)) {
            let wire = WireRecord {
                peer: r.peer.to_bytes(),
                addrs: r
                    .addrs
                    .iter()
                    .take(MAX_ADDRS_PER_RECORD)
                    .map(|a| a.to_vec())
                    .collect(),
                last_seen: r.last_seen,
            };
            // Upper bound of the record's encoded size: varint lengths are at most 5 bytes.
            let rec_size =
                15 + wire.peer.len() + wire.addrs.iter().map(|a| a.len() + 5).sum::<usize>();
            if size + rec_size > MAX_MESSAGE_BYTES {
                break;
            }
            size += rec_size;
            out.records.push(wire);
        }
        out
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("encoding into a Vec cannot fail")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, PexError> {
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(PexError::Oversized(bytes.len()));
        }
        postcard::from_bytes(bytes).map_err(|e| PexError::Decode(e.to_string()))
    }

    /// Validates every record of an answer to a request that allowed `allowed` records. Returns
    /// the records, or the first error found: the caller then discards the whole answer.
    pub fn validate(
        self,
        allowed: usize,
        allow_private: bool,
    ) -> Result<Vec<PeerRecord>, PexError> {
        if self.records.len() > allowed {
            return Err(PexError::TooManyRecords {
                got: self.records.len(),
                allowed,
            });
        }
        let mut out = Vec::with_capacity(self.records.len());
        for r in self.records {
            if r.peer.len() > MAX_FIELD_BYTES {
                return Err(PexError::InvalidPeerId);
            }
            let peer = PeerId::from_bytes(&r.peer).map_err(|_| PexError::InvalidPeerId)?;
            if r.addrs.is_empty() || r.addrs.len() > MAX_ADDRS_PER_RECORD {
                return Err(PexError::BadAddrCount(r.addrs.len()));
            }
            let mut addrs = Vec::with_capacity(r.addrs.len());
            for raw in r.addrs {
                if raw.len() > MAX_FIELD_BYTES {
                    return Err(PexError::InvalidMultiaddr);
                }
                let addr = Multiaddr::try_from(raw).map_err(|_| PexError::InvalidMultiaddr)?;
                addrs.push(check_dialable(&addr, Some(&peer), allow_private)?);
            }
            out.push(PeerRecord {
                peer,
                addrs,
                last_seen: r.last_seen,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record(ip: &str) -> PeerRecord {
        PeerRecord {
            peer: PeerId::random(),
            addrs: vec![format!("/ip4/{ip}/tcp/4001").parse().unwrap()],
            last_seen: 1_700_000_000,
        }
    }

    #[test]
    fn round_trip() {
        let recs: Vec<_> = (0..5).map(|i| record(&format!("1.2.3.{i}"))).collect();
        let msg = PexResponse::from_records(recs.clone(), 32);
        let back = PexResponse::decode(&msg.encode())
            .unwrap()
            .validate(32, false)
            .unwrap();
        assert_eq!(back, recs);
    }

    #[test]
    fn full_answer_fits_the_limit() {
        let recs: Vec<_> = (0..40)
            .map(|i| PeerRecord {
                peer: PeerId::random(),
                addrs: (0..6)
                    .map(|j| {
                        format!("/ip6/2001:470::{i:x}:{j:x}/udp/65535/quic-v1")
                            .parse()
                            .unwrap()
                    })
                    .collect(),
                last_seen: u64::MAX,
            })
            .collect();
        let msg = PexResponse::from_records(recs, 100);
        assert_eq!(msg.records.len(), MAX_RECORDS);
        assert!(msg.encode().len() <= MAX_MESSAGE_BYTES);
        assert!(msg.validate(MAX_RECORDS, false).is_ok());
    }

    #[test]
    fn violations_are_caught() {
        let recs: Vec<_> = (0..10).map(|i| record(&format!("1.2.3.{i}"))).collect();
        let msg = PexResponse::from_records(recs, 32);
        assert_eq!(
            msg.clone().validate(4, false),
            Err(PexError::TooManyRecords {
                got: 10,
                allowed: 4
            })
        );

        let mut bad = msg.clone();
        bad.records[3].addrs[0] = vec![0xff, 0xff, 0xff];
        assert_eq!(bad.validate(32, false), Err(PexError::InvalidMultiaddr));

        let mut bad = msg.clone();
        bad.records[0].peer = vec![1, 2, 3];
        assert_eq!(bad.validate(32, false), Err(PexError::InvalidPeerId));

        let mut bad = msg.clone();
        bad.records[0].addrs.clear();
        assert_eq!(bad.validate(32, false), Err(PexError::BadAddrCount(0)));

        let private = PexResponse::from_records(vec![record("10.0.0.1")], 32);
        let err = private.clone().validate(32, false).unwrap_err();
        assert!(matches!(err, PexError::Addr(AddrError::Unroutable(_))));
        assert!(!err.is_severe());
        assert!(private.validate(32, true).is_ok());

        assert!(matches!(
            PexResponse::decode(&vec![0u8; MAX_MESSAGE_BYTES + 1]),
            Err(PexError::Oversized(_))
        ));
    }

    /// A request is one byte on the wire and asks for at most `MAX_RECORDS`.
    #[test]
    fn requests_round_trip_and_are_capped() {
        let req = PexRequest { max: 7 };
        assert_eq!(req.encode(), vec![7]);
        assert_eq!(PexRequest::decode(&req.encode()), Ok(req.clone()));
        assert_eq!(req.allowed(), 7);
        assert_eq!(PexRequest { max: 200 }.allowed(), MAX_RECORDS);
        assert_eq!(PexRequest { max: 0 }.allowed(), 0);
    }

    /// The size limit is exact for both messages: `MAX_MESSAGE_BYTES` is read (postcard ignores
    /// trailing bytes), one byte more is refused before decoding.
    #[test]
    fn the_message_limit_is_exact() {
        let mut req = vec![5u8; MAX_MESSAGE_BYTES];
        assert_eq!(PexRequest::decode(&req), Ok(PexRequest { max: 5 }));
        req.push(5);
        assert_eq!(
            PexRequest::decode(&req),
            Err(PexError::Oversized(MAX_MESSAGE_BYTES + 1))
        );

        let msg = PexResponse::from_records(vec![record("1.2.3.4")], 32);
        let mut bytes = msg.encode();
        bytes.resize(MAX_MESSAGE_BYTES, 0);
        assert_eq!(PexResponse::decode(&bytes), Ok(msg));
        bytes.push(0);
        assert_eq!(
            PexResponse::decode(&bytes),
            Err(PexError::Oversized(MAX_MESSAGE_BYTES + 1))
        );
    }

    /// `from_records` stops at the last record whose size bound (15 bytes of framing, the peer
    /// id, each address plus 5) still fits: records of exactly 712 bound bytes fill the 16 376
    /// bytes after the 8-byte header 23 times over, and the 24th is left out. The encoded answer
    /// is within the limit.
    #[test]
    fn an_answer_is_cut_at_the_byte_limit() {
        let peer = PeerId::random();
        let name_len = 712 - 15 - peer.to_bytes().len() - 5 - 6;
        let addr: Multiaddr = format!("/dns/{}/tcp/1", "a".repeat(name_len))
            .parse()
            .unwrap();
        assert_eq!(15 + peer.to_bytes().len() + addr.to_vec().len() + 5, 712);
        let recs = (0..24).map(|_| PeerRecord {
            peer,
            addrs: vec![addr.clone()],
            last_seen: u64::MAX,
        });
        let msg = PexResponse::from_records(recs, 32);
        assert_eq!(msg.records.len(), 23);
        assert!(msg.encode().len() <= MAX_MESSAGE_BYTES);

        // Every address counts 5 bytes over its length: records of four addresses bounded at
        // 513 bytes in all fit 31 times (8 + 31 × 513 = 15 911) and the 32nd is left out,
        // although all 32 would fit encoded (the bound is 19 bytes over each record).
        let len = (513 - 15 - peer.to_bytes().len() - 4 * 5) / 4;
        let addr: Multiaddr = format!("/dns/{}/tcp/1", "a".repeat(len - 5))
            .parse()
            .unwrap();
        assert_eq!(
            15 + peer.to_bytes().len() + 4 * (addr.to_vec().len() + 5),
            513
        );
        let recs = (0..32).map(|_| PeerRecord {
            peer,
            addrs: vec![addr.clone(); 4],
            last_seen: u64::MAX,
        });
        let msg = PexResponse::from_records(recs, 32);
        assert_eq!(msg.records.len(), 31);
        assert!(msg.encode().len() <= MAX_MESSAGE_BYTES);
    }

    /// An address field over 128 bytes is refused as such, before it is parsed; one of exactly
    /// 128 bytes is parsed and judged on what it is (here: no IP).
    #[test]
    fn the_address_field_limit_is_exact() {
        let peer = PeerId::random();
        // `/dns/NAME/tcp/1` is NAME plus 5 or 6 bytes (the length varint is 1 or 2 bytes).
        let dns = |total: usize| -> Vec<u8> {
            (total - 6..=total - 5)
                .map(|n| {
                    let a: Multiaddr = format!("/dns/{}/tcp/1", "a".repeat(n)).parse().unwrap();
                    a.to_vec()
                })
                .find(|v| v.len() == total)
                .expect("a name of the right length")
        };
        for (len, want) in [
            (128, PexError::Addr(AddrError::NoIp(String::new()))),
            (129, PexError::InvalidMultiaddr),
            (300, PexError::InvalidMultiaddr),
        ] {
            let msg = PexResponse {
                records: vec![WireRecord {
                    peer: peer.to_bytes(),
                    addrs: vec![dns(len)],
                    last_seen: 0,
                }],
            };
            let got = msg.validate(32, true).unwrap_err();
            assert_eq!(
                std::mem::discriminant(&got),
                std::mem::discriminant(&want),
                "{len} bytes: {got}"
            );
            if let (PexError::Addr(g), PexError::Addr(w)) = (&got, &want) {
                assert_eq!(std::mem::discriminant(g), std::mem::discriminant(w));
            }
        }
    }

    /// Only unroutable addresses and transports we do not speak are mild: they come from honest
    /// but misconfigured peers. Everything else is severe.
    #[test]
    fn severity_of_each_error() {
        assert!(PexError::Oversized(1).is_severe());
        assert!(PexError::Decode(String::new()).is_severe());
        assert!(PexError::TooManyRecords { got: 2, allowed: 1 }.is_severe());
        assert!(PexError::BadAddrCount(0).is_severe());
        assert!(PexError::InvalidPeerId.is_severe());
        assert!(PexError::InvalidMultiaddr.is_severe());
        assert!(PexError::Addr(AddrError::NoIp(String::new())).is_severe());
        assert!(!PexError::Addr(AddrError::Unroutable(String::new())).is_severe());
        assert!(!PexError::Addr(AddrError::UnsupportedTransport(String::new())).is_severe());
    }

    proptest! {
        /// Arbitrary bytes never panic the decoder or the validator.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            if let Ok(msg) = PexResponse::decode(&bytes) {
                let _ = msg.validate(MAX_RECORDS, false);
            }
            let _ = PexRequest::decode(&bytes);
        }
    }
}
