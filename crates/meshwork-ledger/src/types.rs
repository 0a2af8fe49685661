//! Hashes, addresses and amounts: the vocabulary of the chain.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A BLAKE3 digest: block hashes, transaction ids, Merkle roots, chain ids.
///
/// Serialized as 64 hex digits in human-readable formats (JSON: the APIs), and as the newtype
/// of 32 bytes otherwise (postcard: blocks, the store, the wire), exactly as a derive would.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Hash(pub [u8; 32]);

impl Serialize for Hash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            s.serialize_newtype_struct("Hash", &self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Hash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            s.parse().map_err(serde::de::Error::custom)
        } else {
            #[derive(Deserialize)]
            #[serde(rename = "Hash")]
            struct Raw([u8; 32]);
            Raw::deserialize(d).map(|r| Hash(r.0))
        }
    }
}

impl Hash {
    pub const ZERO: Hash = Hash([0; 32]);

    pub fn of(bytes: &[u8]) -> Hash {
        Hash(*blake3::hash(bytes).as_bytes())
    }

    /// The first 8 hex digits: enough to tell blocks apart in a log line.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", self.short())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("expected 64 hexadecimal digits, got {0:?}")]
    Hex(String),
    #[error("{0} is not a valid ed25519 public key")]
    Key(String),
}

fn parse_32(s: &str) -> Result<[u8; 32], ParseError> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s.trim(), &mut out).map_err(|_| ParseError::Hex(s.to_string()))?;
    Ok(out)
}

impl FromStr for Hash {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_32(s).map(Hash)
    }
}

/// An account: the ed25519 public key that signs its transfers, shown as 64 hex digits.
///
/// Any 32 bytes can *receive* (a transfer to a key nobody holds burns the amount, as in every
/// account chain); only a valid, non-weak key can *send*, which [`crate::tx`] checks.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Address(pub [u8; 32]);

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Address({})", hex::encode(&self.0[..4]))
    }
}

impl FromStr for Address {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = parse_32(s)?;
        ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .map_err(|_| ParseError::Key(s.trim().to_string()))?;
        Ok(Address(bytes))
    }
}

/// Amounts are whole units in a `u64`; all arithmetic on them is checked.
pub type Amount = u64;

/// The state of one account. An account that was never touched is `Account::default()`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub balance: Amount,
    /// The nonce its next transfer must carry: the number of transfers it has made.
    pub nonce: u64,
}

/// Milliseconds since the Unix epoch: the unit of block timestamps and of every `now`.
pub type Millis = u64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_is_hex_in_json_and_32_bytes_in_postcard() {
        let h = Hash::of(b"x");
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(json, format!("\"{h}\""));
        assert_eq!(serde_json::from_str::<Hash>(&json).unwrap(), h);
        assert!(serde_json::from_str::<Hash>("\"zz\"").is_err());
        let bytes = postcard::to_stdvec(&h).unwrap();
        assert_eq!(bytes, h.0.to_vec(), "postcard keeps the derive's layout");
        assert_eq!(postcard::from_bytes::<Hash>(&bytes).unwrap(), h);
    }

    #[test]
    fn hashes_round_trip_through_hex() {
        let h = Hash::of(b"meshwork");
        assert_eq!(h.to_string().parse::<Hash>().unwrap(), h);
        assert!("xyz".parse::<Hash>().is_err());
    }

    #[test]
    fn addresses_must_be_keys() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let a = Address(key.verifying_key().to_bytes());
        assert_eq!(a.to_string().parse::<Address>().unwrap(), a);
        assert!("00".repeat(31).parse::<Address>().is_err());
    }
}
