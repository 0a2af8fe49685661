//! Blocks: a fixed-layout header under proof of work, and the transactions it commits to.
//!
//! # Difficulty and work
//! The header's `target` field holds the *difficulty* D, the expected number of hashes per
//! block. The 256-bit target it stands for is ⌊(2²⁵⁶−1)/D⌋: a header meets it when its BLAKE3
//! hash, read as a big-endian integer h, satisfies h·D < 2²⁵⁶ (checked by multiplying without
//! overflow, no division). The work of a block is D itself, and the chain with the most
//! cumulative work (a `u128` sum) is the best chain. Keeping D in the header rather than a
//! 256-bit target keeps work exact and arithmetic in native integers.

use serde::{Deserialize, Serialize};

use crate::tx::{DecodeError, Transaction};
use crate::types::{Hash, Millis};

pub const HEADER_BYTES: usize = 100;
/// Offset of the nonce in the encoded header: the miner rewrites only these 8 bytes.
pub const NONCE_OFFSET: usize = 92;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub version: u32,
    pub height: u64,
    pub prev: Hash,
    pub merkle_root: Hash,
    pub timestamp: Millis,
    /// The difficulty D (see the module docs).
    pub target: u64,
    pub nonce: u64,
}

impl Header {
    /// The canonical 100-byte layout, little-endian integers, that the proof of work hashes.
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        out[0..4].copy_from_slice(&self.version.to_le_bytes());
        out[4..12].copy_from_slice(&self.height.to_le_bytes());
        out[12..44].copy_from_slice(&self.prev.0);
        out[44..76].copy_from_slice(&self.merkle_root.0);
        out[76..84].copy_from_slice(&self.timestamp.to_le_bytes());
        out[84..92].copy_from_slice(&self.target.to_le_bytes());
        out[NONCE_OFFSET..].copy_from_slice(&self.nonce.to_le_bytes());
        out
    }

    pub fn hash(&self) -> Hash {
        Hash::of(&self.encode())
    }

    pub fn meets_target(&self) -> bool {
        meets_difficulty(&self.hash(), self.target)
    }
}

/// Whether `hash`·`difficulty` < 2²⁵⁶, i.e. `hash` ≤ ⌊(2²⁵⁶−1)/D⌋.
pub fn meets_difficulty(hash: &Hash, difficulty: u64) -> bool {
    // Multiply the 256-bit big-endian number by D limb by limb, least significant first; any
    // carry out of the top limb means the product overflowed 256 bits.
    let mut carry: u128 = 0;
    for i in (0..4).rev() {
        let limb = u64::from_be_bytes(hash.0[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        let product = limb as u128 * difficulty as u128 + carry;
        carry = product >> 64;
    }
    carry == 0
}

/// Searches nonces `start..start+count` for one that meets the header's target. Returns the
/// nonce found, if any. The header is encoded once; only the nonce bytes change per hash.
pub fn search_nonce(header: &Header, start: u64, count: u64) -> Option<u64> {
    let mut bytes = header.encode();
    for nonce in start..start.saturating_add(count) {
        bytes[NONCE_OFFSET..].copy_from_slice(&nonce.to_le_bytes());
        let h = Hash(*blake3::hash(&bytes).as_bytes());
        if meets_difficulty(&h, header.target) {
            return Some(nonce);
        }
    }
    None
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    pub header: Header,
    pub txs: Vec<Transaction>,
}

impl Block {
    pub fn hash(&self) -> Hash {
        self.header.hash()
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("a block always encodes")
    }

    /// Decodes a block of at most `max_bytes`. Structural only.
    pub fn decode(bytes: &[u8], max_bytes: usize) -> Result<Block, DecodeError> {
        if bytes.len() > max_bytes {
            return Err(DecodeError::TooLarge {
                what: "block",
                len: bytes.len(),
                max: max_bytes,
            });
        }
        let (block, rest) =
            postcard::take_from_bytes(bytes).map_err(|e| DecodeError::Malformed {
                what: "block",
                reason: e.to_string(),
            })?;
        if !rest.is_empty() {
            return Err(DecodeError::Malformed {
                what: "block",
                reason: format!("{} trailing bytes", rest.len()),
            });
        }
        Ok(block)
    }

    pub fn tx_ids(&self) -> Vec<Hash> {
        self.txs.iter().map(|t| t.id()).collect()
    }
}

/// The Merkle root of transaction ids. Leaves and inner nodes are hashed with different
/// prefixes, and an odd node is carried up unpaired rather than paired with itself, so two
/// different lists can never share a root (Bitcoin's duplicated-last-leaf ambiguity,
/// CVE-2012-2459, cannot happen).
pub fn merkle_root(ids: &[Hash]) -> Hash {
    if ids.is_empty() {
        return Hash::ZERO;
    }
    let mut level: Vec<Hash> = ids
        .iter()
        .map(|id| {
            let mut h = blake3::Hasher::new();
            h.update(&[0]);
            h.update(&id.0);
            Hash(*h.finalize().as_bytes())
        })
        .collect();
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|pair| match pair {
                [l, r] => {
                    let mut h = blake3::Hasher::new();
                    h.update(&[1]);
                    h.update(&l.0);
                    h.update(&r.0);
                    Hash(*h.finalize().as_bytes())
                }
                [odd] => *odd,
                _ => unreachable!("chunks(2) yields one or two"),
            })
            .collect();
    }
    level[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn difficulty_one_accepts_everything_and_more_rejects_most() {
        let max = Hash([0xff; 32]);
        assert!(meets_difficulty(&max, 1));
        assert!(!meets_difficulty(&max, 2));
        let mut half = [0u8; 32];
        half[0] = 0x7f;
        half[1..].fill(0xff);
        assert!(meets_difficulty(&Hash(half), 2));
        assert!(!meets_difficulty(&Hash(half), 3));
        assert!(meets_difficulty(&Hash::ZERO, u64::MAX));
    }

    /// The carry between limbs counts: for difficulty 3 the largest hash that meets it is
    /// ⌊(2²⁵⁶−1)/3⌋ (all bytes 0x55), and one more overflows only through the carries.
    #[test]
    fn the_largest_hash_meeting_difficulty_3_is_a_third_of_2_256_and_one_more_fails() {
        let at = Hash([0x55; 32]);
        assert!(meets_difficulty(&at, 3));
        let mut over = [0x55; 32];
        over[31] = 0x56;
        assert!(!meets_difficulty(&Hash(over), 3));
    }

    #[test]
    fn search_finds_a_nonce_that_verifies() {
        let mut h = Header {
            version: 1,
            height: 1,
            prev: Hash::of(b"p"),
            merkle_root: Hash::ZERO,
            timestamp: 5,
            target: 1000,
            nonce: 0,
        };
        let nonce = search_nonce(&h, 0, 1_000_000).expect("1000 expected hashes");
        h.nonce = nonce;
        assert!(h.meets_target());
    }

    #[test]
    fn merkle_roots_distinguish_lists() {
        let a = Hash::of(b"a");
        let b = Hash::of(b"b");
        let c = Hash::of(b"c");
        assert_ne!(merkle_root(&[a, b, c]), merkle_root(&[a, b, c, c]));
        assert_ne!(merkle_root(&[a, b]), merkle_root(&[b, a]));
        assert_ne!(merkle_root(&[a]), a);
    }
}
