//! The tracker's wire format: `POST /api/v1/announce` and `GET /api/v1/stats` bodies (JSON).
//! Shared by the tracker (`meshwork-server`) and its client (the node's content service).
//!
//! # Signed announces
//! An announce can change only its announcer's own record: it carries the announcer's
//! signature, made with its libp2p identity key, over [`AnnounceRequest::signed_bytes`]. The
//! tracker takes the public key from the peer id itself (an ed25519 key is short enough that
//! its peer id is the identity multihash of the protobuf-encoded key), so a peer id and its key
//! cannot be told apart, and a forged `stopped` or a re-announce with another peer's id fails
//! the check. `time_ms` makes every announce unique: the tracker refuses one more than five
//! minutes from its clock, or not newer than the last it accepted for that record (a replay).

use std::str::FromStr;

use libp2p_identity::{Keypair, PeerId, PublicKey};
use serde::{Deserialize, Serialize};

use crate::ContentId;

/// The domain separator that starts every signed announce (so the signature cannot be taken
/// for one over any other message signed with the same key).
pub const SIGNING_DOMAIN: &[u8] = b"meshwork/tracker/announce/v1\n";
/// An ed25519 signature's length in bytes (hex: twice this).
pub const SIGNATURE_LEN: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Event {
    Started,
    Completed,
    Stopped,
}

/// `POST /api/v1/announce`, as sent.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnnounceRequest {
    /// The content id, 64 hexadecimal digits.
    pub content: String,
    /// The announcer's peer id (base58), which must embed its ed25519 public key.
    pub peer: String,
    /// The addresses it listens on. The tracker keeps only each one's transport and port and
    /// hands them out with the IP the announce came from.
    pub addrs: Vec<String>,
    #[serde(default)]
    pub event: Option<Event>,
    /// Bytes still missing (0: a seeder).
    pub left: u64,
    /// At most this many peers in the answer (not signed: it changes no record).
    #[serde(default)]
    pub numwant: Option<usize>,
    /// When it was made: milliseconds since the Unix epoch. Each announce of a record must be
    /// newer than the last one the tracker accepted.
    pub time_ms: u64,
    /// The signature over [`AnnounceRequest::signed_bytes`], 128 lowercase hexadecimal digits.
    pub sig: String,
}

/// Why an announce cannot be signed or its signature does not hold.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("content {0:?} is not a content id (64 hexadecimal digits)")]
    Content(String),
    #[error("peer id {0:?} is not a peer id")]
    Peer(String),
    #[error("peer id {0} does not embed its public key (only ed25519 peer ids do)")]
    NoKey(String),
    #[error("{0} addresses cannot be signed (at most 255, each at most 65535 bytes)")]
    TooLong(usize),
    #[error("the signature is not {SIGNATURE_LEN} bytes of hexadecimal")]
    Malformed,
    #[error("the signature does not match peer {0}")]
    Invalid(String),
    #[error("cannot sign: {0}")]
    Signing(String),
}

fn event_byte(e: Option<Event>) -> u8 {
    match e {
        None => 0,
        Some(Event::Started) => 1,
        Some(Event::Completed) => 2,
        Some(Event::Stopped) => 3,
    }
}

impl AnnounceRequest {
    /// The bytes signed, in this order (integers big-endian):
    ///
    /// ```text
    /// SIGNING_DOMAIN                      "meshwork/tracker/announce/v1\n" (29 bytes)
    /// content                             32 bytes (the id, not its hex)
    /// u8 n, peer                          the peer id's n bytes (its multihash)
    /// u8 k, then k times: u16 n, addr     each address's UTF-8 text as sent
    /// u8 event                            0 none, 1 started, 2 completed, 3 stopped
    /// u64 left
    /// u64 time_ms
    /// ```
    ///
    /// `numwant` and `sig` are not signed.
    ///
    /// # Errors
    /// A content or peer id that does not parse, more than 255 addresses or one longer than
    /// 65 535 bytes.
    pub fn signed_bytes(&self) -> Result<Vec<u8>, SignatureError> {
        let content = ContentId::from_str(&self.content)
            .map_err(|_| SignatureError::Content(self.content.chars().take(80).collect()))?;
        let peer = PeerId::from_str(&self.peer)
            .map_err(|_| SignatureError::Peer(self.peer.chars().take(140).collect()))?
            .to_bytes();
        let addrs = u8::try_from(self.addrs.len())
            .map_err(|_| SignatureError::TooLong(self.addrs.len()))?;
        let mut out =
            Vec::with_capacity(128 + self.addrs.iter().map(|a| a.len() + 2).sum::<usize>());
        out.extend_from_slice(SIGNING_DOMAIN);
        out.extend_from_slice(&content.0);
        out.push(u8::try_from(peer.len()).map_err(|_| SignatureError::Peer(self.peer.clone()))?);
        out.extend_from_slice(&peer);
        out.push(addrs);
        for a in &self.addrs {
            let n =
                u16::try_from(a.len()).map_err(|_| SignatureError::TooLong(self.addrs.len()))?;
            out.extend_from_slice(&n.to_be_bytes());
            out.extend_from_slice(a.as_bytes());
        }
        out.push(event_byte(self.event));
        out.extend_from_slice(&self.left.to_be_bytes());
        out.extend_from_slice(&self.time_ms.to_be_bytes());
        Ok(out)
    }

    /// Signs the request with `key` (whose peer id must be `self.peer`), filling `sig`.
    ///
    /// # Errors
    /// See [`AnnounceRequest::signed_bytes`]; or the key cannot sign.
    pub fn sign(&mut self, key: &Keypair) -> Result<(), SignatureError> {
        let msg = self.signed_bytes()?;
        let sig = key
            .sign(&msg)
            .map_err(|e| SignatureError::Signing(e.to_string()))?;
        self.sig = hex::encode(sig);
        Ok(())
    }

    /// Checks the signature against the key embedded in the peer id and returns that id.
    ///
    /// # Errors
    /// A peer id without an embedded key (not ed25519), a malformed or wrong signature.
    pub fn verify(&self) -> Result<PeerId, SignatureError> {
        let msg = self.signed_bytes()?;
        let peer =
            PeerId::from_str(&self.peer).map_err(|_| SignatureError::Peer(self.peer.clone()))?;
        let key = embedded_key(&peer).ok_or_else(|| SignatureError::NoKey(self.peer.clone()))?;
        if self.sig.len() != 2 * SIGNATURE_LEN {
            return Err(SignatureError::Malformed);
        }
        let sig = hex::decode(&self.sig).map_err(|_| SignatureError::Malformed)?;
        if !key.verify(&msg, &sig) {
            return Err(SignatureError::Invalid(self.peer.clone()));
        }
        Ok(peer)
    }
}

/// The public key a peer id embeds (an identity multihash of a protobuf-encoded key, as for
/// every ed25519 key), if it is one and it hashes back to the same peer id.
pub fn embedded_key(peer: &PeerId) -> Option<PublicKey> {
    let mh = peer.as_ref();
    // 0x00: the identity multihash (libp2p's peer id spec); anything else is a hash of a key.
    if mh.code() != 0 {
        return None;
    }
    let key = PublicKey::try_decode_protobuf(mh.digest()).ok()?;
    (PeerId::from_public_key(&key) == *peer).then_some(key)
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerAddrs {
    pub peer: String,
    pub addrs: Vec<String>,
    pub seeder: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnounceResponse {
    pub interval_s: u64,
    pub seeders: usize,
    pub leechers: usize,
    pub peers: Vec<PeerAddrs>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub contents: usize,
    pub peers: usize,
    pub seeders: usize,
    pub leechers: usize,
    pub announces: u64,
    pub rejected: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(key: &Keypair) -> AnnounceRequest {
        let mut r = AnnounceRequest {
            content: "ab".repeat(32),
            peer: key.public().to_peer_id().to_string(),
            addrs: vec!["/ip4/1.2.3.4/tcp/4001".into()],
            event: Some(Event::Started),
            left: 5,
            numwant: None,
            time_ms: 1_700_000_000_000,
            sig: String::new(),
        };
        r.sign(key).unwrap();
        r
    }

    #[test]
    fn a_signed_announce_verifies_and_any_change_breaks_it() {
        let key = Keypair::generate_ed25519();
        let r = req(&key);
        assert_eq!(r.verify().unwrap(), key.public().to_peer_id());
        let msg = r.signed_bytes().unwrap();
        assert!(msg.starts_with(SIGNING_DOMAIN));
        assert_eq!(SIGNING_DOMAIN.len(), 29);
        let mut numwant = r.clone();
        numwant.numwant = Some(3);
        assert!(numwant.verify().is_ok(), "numwant is not signed");
        let changes: Vec<fn(&mut AnnounceRequest)> = vec![
            |r| r.content = "cd".repeat(32),
            |r| r.addrs.push("/ip4/1.2.3.5/tcp/1".into()),
            |r| r.addrs[0] = "/ip4/1.2.3.4/tcp/4002".into(),
            |r| r.event = Some(Event::Stopped),
            |r| r.event = None,
            |r| r.left = 0,
            |r| r.time_ms += 1,
        ];
        for change in changes {
            let mut bad = r.clone();
            change(&mut bad);
            assert!(
                matches!(bad.verify(), Err(SignatureError::Invalid(_))),
                "{bad:?}"
            );
        }
        // Another key's signature over the same record, under this peer id.
        let other = Keypair::generate_ed25519();
        let mut forged = r.clone();
        forged.sign(&other).unwrap();
        assert!(matches!(forged.verify(), Err(SignatureError::Invalid(_))));
        let mut garbage = r.clone();
        garbage.sig = "zz".repeat(64);
        assert_eq!(garbage.verify(), Err(SignatureError::Malformed));
        let mut rsa_like = r;
        rsa_like.peer = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N".into();
        assert!(matches!(rsa_like.verify(), Err(SignatureError::NoKey(_))));
    }
}
