//! Transactions: signed transfers and the coinbase.
//!
//! A transfer is valid on one chain, once: it carries the chain id (the genesis hash, which
//! commits to the whole spec) and the sender's next nonce, both under the signature. The signed
//! message is a domain tag followed by the postcard encoding of the [`Transfer`], so a
//! signature over anything else Meshwork signs can never be replayed as a transfer.
//!
//! Signatures are checked with `verify_strict` (no small-order keys or R points), and in
//! batches with ed25519-dalek's batch verification when a block or a burst of gossip brings
//! many at once. A batch that fails is re-checked one by one to find the culprit, so the
//! verdict on each transfer is the single-verification one whenever anything is wrong.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::spec::MAX_TX_BYTES;
use crate::types::{Address, Amount, Hash};

const DOMAIN: &[u8] = b"meshwork/transfer/v1\0";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    pub chain_id: Hash,
    pub from: Address,
    pub to: Address,
    pub amount: Amount,
    pub fee: Amount,
    pub nonce: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedTransfer {
    pub transfer: Transfer,
    #[serde(with = "sig_bytes")]
    pub signature: [u8; 64],
}

/// The first transaction of every block: the block reward plus the block's fees, to the miner.
/// The height makes every coinbase's id unique.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coinbase {
    pub height: u64,
    pub to: Address,
    pub amount: Amount,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Transaction {
    Coinbase(Coinbase),
    Transfer(SignedTransfer),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("{what} of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
}

mod sig_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        let v: &[u8] = <&[u8]>::deserialize(d)?;
        v.try_into()
            .map_err(|_| serde::de::Error::invalid_length(v.len(), &"64 bytes"))
    }
}

impl Transfer {
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut out = DOMAIN.to_vec();
        out.extend(postcard::to_allocvec(self).expect("a transfer always encodes"));
        out
    }

    pub fn sign(self, key: &SigningKey) -> SignedTransfer {
        let signature = key.sign(&self.signing_bytes()).to_bytes();
        SignedTransfer {
            transfer: self,
            signature,
        }
    }

    /// What the sender pays: amount plus fee, or `None` if that overflows.
    pub fn cost(&self) -> Option<Amount> {
        self.amount.checked_add(self.fee)
    }
}

impl SignedTransfer {
    pub fn id(&self) -> Hash {
        Transaction::Transfer(*self).id()
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("a transfer always encodes")
    }

    /// Decodes gossip or API bytes. Structural only: the signature is not checked here.
    pub fn decode(bytes: &[u8]) -> Result<SignedTransfer, DecodeError> {
        if bytes.len() > MAX_TX_BYTES {
            return Err(DecodeError::TooLarge {
                what: "transaction",
                len: bytes.len(),
                max: MAX_TX_BYTES,
            });
        }
        let (tx, rest) = postcard::take_from_bytes(bytes).map_err(|e| DecodeError::Malformed {
            what: "transaction",
            reason: e.to_string(),
        })?;
        if !rest.is_empty() {
            return Err(DecodeError::Malformed {
                what: "transaction",
                reason: format!("{} trailing bytes", rest.len()),
            });
        }
        Ok(tx)
    }

    fn key(&self) -> Option<VerifyingKey> {
        let key = VerifyingKey::from_bytes(&self.transfer.from.0).ok()?;
        (!key.is_weak()).then_some(key)
    }

    /// Checks the signature alone.
    pub fn verify(&self) -> bool {
        let Some(key) = self.key() else { return false };
        let sig = Signature::from_bytes(&self.signature);
        key.verify_strict(&self.transfer.signing_bytes(), &sig)
            .is_ok()
    }
}

/// Verifies many signatures, and says which are good. One batch verification when all are
/// good (about twice as fast per signature); one by one otherwise.
pub fn verify_all(txs: &[&SignedTransfer]) -> Vec<bool> {
    if txs.len() < 2 {
        return txs.iter().map(|t| t.verify()).collect();
    }
    let keys: Option<Vec<VerifyingKey>> = txs.iter().map(|t| t.key()).collect();
    if let Some(keys) = keys {
        let msgs: Vec<Vec<u8>> = txs.iter().map(|t| t.transfer.signing_bytes()).collect();
        let msg_refs: Vec<&[u8]> = msgs.iter().map(|m| m.as_slice()).collect();
        let sigs: Vec<Signature> = txs
            .iter()
            .map(|t| Signature::from_bytes(&t.signature))
            .collect();
        if ed25519_dalek::verify_batch(&msg_refs, &sigs, &keys).is_ok() {
            return vec![true; txs.len()];
        }
    }
    txs.iter().map(|t| t.verify()).collect()
}

impl Transaction {
    pub fn id(&self) -> Hash {
        Hash::of(&postcard::to_allocvec(self).expect("a transaction always encodes"))
    }

    pub fn as_transfer(&self) -> Option<&SignedTransfer> {
        match self {
            Transaction::Transfer(t) => Some(t),
            Transaction::Coinbase(_) => None,
        }
    }
}

/// A key pair for a wallet, stored as its 32-byte secret in hex.
#[derive(Clone)]
pub struct Wallet {
    key: SigningKey,
}

impl Wallet {
    pub fn generate() -> Wallet {
        Wallet {
            key: SigningKey::generate(&mut rand::rngs::OsRng),
        }
    }

    pub fn from_secret(secret: &[u8; 32]) -> Wallet {
        Wallet {
            key: SigningKey::from_bytes(secret),
        }
    }

    pub fn address(&self) -> Address {
        Address(self.key.verifying_key().to_bytes())
    }

    pub fn secret_hex(&self) -> String {
        hex::encode(self.key.to_bytes())
    }

    pub fn from_secret_hex(s: &str) -> Result<Wallet, crate::types::ParseError> {
        let mut secret = [0u8; 32];
        hex::decode_to_slice(s.trim(), &mut secret)
            .map_err(|_| crate::types::ParseError::Hex("<secret key>".into()))?;
        Ok(Wallet::from_secret(&secret))
    }

    /// Signs a transfer from this wallet.
    pub fn transfer(
        &self,
        chain_id: Hash,
        to: Address,
        amount: Amount,
        fee: Amount,
        nonce: u64,
    ) -> SignedTransfer {
        Transfer {
            chain_id,
            from: self.address(),
            to,
            amount,
            fee,
            nonce,
        }
        .sign(&self.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: u64) -> SignedTransfer {
        let w = Wallet::from_secret(&[n as u8 + 1; 32]);
        w.transfer(Hash::of(b"chain"), w.address(), 5, 1, n)
    }

    #[test]
    fn encoding_round_trips_and_rejects_trailing_bytes() {
        let t = sample(3);
        let bytes = t.encode();
        assert!(bytes.len() < MAX_TX_BYTES);
        assert_eq!(SignedTransfer::decode(&bytes).unwrap(), t);
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(SignedTransfer::decode(&longer).is_err());
        assert!(SignedTransfer::decode(&bytes[..bytes.len() - 1]).is_err());
        assert!(SignedTransfer::decode(&vec![0xff; MAX_TX_BYTES + 1]).is_err());
    }

    #[test]
    fn tampering_breaks_the_signature() {
        let t = sample(1);
        assert!(t.verify());
        let mut bad = t;
        bad.transfer.amount += 1;
        assert!(!bad.verify());
        let mut bad = t;
        bad.signature[0] ^= 1;
        assert!(!bad.verify());
    }

    #[test]
    fn batch_finds_the_bad_signature() {
        let mut txs: Vec<SignedTransfer> = (0..8).map(sample).collect();
        let all: Vec<&SignedTransfer> = txs.iter().collect();
        assert_eq!(verify_all(&all), vec![true; 8]);
        txs[5].signature[10] ^= 0x40;
        let all: Vec<&SignedTransfer> = txs.iter().collect();
        let verdict = verify_all(&all);
        assert_eq!(verdict.iter().filter(|ok| !**ok).count(), 1);
        assert!(!verdict[5]);
    }
}
