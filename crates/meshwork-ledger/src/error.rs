//! Errors, written for a person: "insufficient balance: has 5, needs 7".
//!
//! `punishable()` separates what only a misbehaving peer sends (bad signatures, bad proof of
//! work, malformed bytes: an honest node validates before forwarding, so it never relays those)
//! from what an honest peer can send because its view differs from ours (a nonce already used
//! in a block we have and it has not seen yet, a block too far in the future for our clock).

use crate::tx::DecodeError;
use crate::types::{Amount, Hash};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("wrong chain: this network's chain id is {expected}, the transaction is for {got}")]
    WrongChain { expected: Hash, got: Hash },
    #[error("bad signature")]
    BadSignature,
    #[error("amount must be positive")]
    ZeroAmount,
    #[error("fee {got} is below the minimum fee {min}")]
    FeeTooLow { min: Amount, got: Amount },
    #[error("amount plus fee overflows")]
    Overflow,
    #[error("nonce {got} is already used: the account's next nonce is {expected}")]
    NonceTooLow { expected: u64, got: u64 },
    #[error("nonce {got} is too far ahead: the account's next nonce is {expected}, at most {max_ahead} may wait")]
    NonceGap {
        expected: u64,
        got: u64,
        max_ahead: u64,
    },
    #[error("nonce {got} does not match the account's next nonce {expected}")]
    BadNonce { expected: u64, got: u64 },
    #[error("already confirmed at height {height}")]
    AlreadyConfirmed { height: u64 },
    #[error("insufficient balance: has {has}, needs {needs}")]
    InsufficientBalance { has: Amount, needs: Amount },
    #[error("credit overflows the recipient's balance")]
    BalanceOverflow,
    #[error("already in the mempool")]
    Duplicate,
    #[error("another transaction with nonce {nonce} is pending; a replacement needs a fee of at least {fee_needed}")]
    Conflict { nonce: u64, fee_needed: Amount },
    #[error("the mempool is full: a fee of at least {min_fee} is needed")]
    MempoolFull { min_fee: Amount },
    /// The operator does not accept this sender's transfers (a node then neither relays nor
    /// mines them; it is a policy, not a rule: blocks that hold them are still valid).
    #[error("transfers from {0} are refused by the operator's policy")]
    Refused(crate::Address),
    #[error("storage: {0}")]
    Storage(#[from] StoreError),
}

impl TxError {
    /// Whether relaying this transaction is misbehaviour.
    pub fn punishable(&self) -> bool {
        matches!(
            self,
            TxError::Decode(_)
                | TxError::WrongChain { .. }
                | TxError::BadSignature
                | TxError::ZeroAmount
                | TxError::Overflow
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("unsupported block version {0}")]
    Version(u32),
    #[error("proof of work does not meet the block's difficulty {0}")]
    BadProofOfWork(u64),
    #[error("difficulty {got} is not the expected {expected}")]
    BadDifficulty { expected: u64, got: u64 },
    #[error("height {got} does not follow the parent's height {parent}")]
    BadHeight { parent: u64, got: u64 },
    #[error("timestamp {got} is not after the median of recent blocks {median}")]
    TimeTooOld { median: u64, got: u64 },
    #[error("timestamp {got} is more than {drift_ms} ms ahead of the local clock {now}")]
    TimeTooNew { now: u64, drift_ms: u64, got: u64 },
    #[error("{got} transactions exceed the limit of {max}")]
    TooManyTxs { max: usize, got: usize },
    #[error("{got} bytes exceed the limit of {max}")]
    TooLarge { max: usize, got: usize },
    #[error("the first transaction is not a coinbase")]
    NoCoinbase,
    #[error("a coinbase outside the first position")]
    ExtraCoinbase,
    #[error("coinbase height {got} is not the block height {expected}")]
    CoinbaseHeight { expected: u64, got: u64 },
    #[error("coinbase pays {got}; reward plus fees is {allowed}")]
    CoinbaseAmount { allowed: Amount, got: Amount },
    #[error("Merkle root does not match the transactions")]
    MerkleMismatch,
    #[error("transaction {0} appears twice")]
    DuplicateTx(Hash),
    #[error("transaction {id}: {error}")]
    Tx { id: Hash, error: TxError },
    #[error("parent {0} is invalid")]
    InvalidParent(Hash),
    #[error("block is known to be invalid")]
    KnownInvalid,
    #[error("storage: {0}")]
    Storage(#[from] StoreError),
}

impl BlockError {
    /// Whether relaying this block is misbehaviour. A block from the future may be honest
    /// (clock skew), and storage failures are ours.
    pub fn punishable(&self) -> bool {
        !matches!(self, BlockError::TimeTooNew { .. } | BlockError::Storage(_))
    }
}

/// A failure of the embedded database: the disk, or (see [`StoreError::is_corrupt`]) damaged
/// data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

/// How the chain's own damage reports begin (`chain::corrupt`).
pub(crate) const CORRUPT_PREFIX: &str = "corrupt store: ";

impl StoreError {
    /// Whether the error reports damaged data (a stored value that does not decode, a record
    /// that should be there and is not, redb's own "DB corrupted") rather than a failing disk.
    pub fn is_corrupt(&self) -> bool {
        self.0.starts_with(CORRUPT_PREFIX) || self.0.starts_with("DB corrupted")
    }
}

macro_rules! store_from {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError(e.to_string()) }
        }
    )*};
}
store_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    postcard::Error
);

/// Why a chain store did not open.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The disk refused (permissions, no space, an I/O error): the file may be fine.
    #[error(transparent)]
    Store(StoreError),
    /// Another process holds the store open.
    #[error("the store is open in another process (is a node running on this data directory?)")]
    Locked,
    #[error("the store holds chain {stored}, but the spec describes {expected}: wrong data directory or spec")]
    SpecMismatch { stored: Hash, expected: Hash },
    #[error("invalid chain spec: {0}")]
    Spec(String),
    /// The file is damaged: it does not parse, or fails the consistency check at open (see
    /// `Chain::open`). Opening it again will not help; moving it aside and syncing will.
    #[error("the store is damaged: {0}")]
    Corrupt(String),
}

/// Damage found while reading the store at open is [`OpenError::Corrupt`].
impl From<StoreError> for OpenError {
    fn from(e: StoreError) -> Self {
        if e.is_corrupt() {
            let what = e.0.strip_prefix(CORRUPT_PREFIX).unwrap_or(&e.0);
            OpenError::Corrupt(what.to_string())
        } else {
            OpenError::Store(e)
        }
    }
}

impl OpenError {
    /// Whether the file itself is damaged (and the remedy is to set it aside and re-sync).
    pub fn is_damage(&self) -> bool {
        matches!(self, OpenError::Corrupt(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // `punishable()` decides whether a peer loses points (and, twice over, its connection):
    // each side of the line is a rule, so every variant's side is pinned here.
    #[test]
    fn only_what_an_honest_relay_never_sends_is_punishable_in_a_transfer() {
        let misbehaviour = [
            TxError::Decode(DecodeError::Malformed {
                what: "transfer",
                reason: "short".into(),
            }),
            TxError::WrongChain {
                expected: crate::types::Hash([1; 32]),
                got: crate::types::Hash([2; 32]),
            },
            TxError::BadSignature,
            TxError::ZeroAmount,
            TxError::Overflow,
        ];
        for e in &misbehaviour {
            assert!(e.punishable(), "{e} must cost the sender points");
        }
        // A view that differs from ours (a nonce confirmed in a block the peer has not seen, a
        // full mempool, our operator's policy) is not misbehaviour.
        let honest = [
            TxError::FeeTooLow { min: 2, got: 1 },
            TxError::NonceTooLow {
                expected: 3,
                got: 1,
            },
            TxError::NonceGap {
                expected: 1,
                got: 90,
                max_ahead: 64,
            },
            TxError::BadNonce {
                expected: 1,
                got: 2,
            },
            TxError::AlreadyConfirmed { height: 4 },
            TxError::InsufficientBalance { has: 5, needs: 7 },
            TxError::BalanceOverflow,
            TxError::Duplicate,
            TxError::Conflict {
                nonce: 1,
                fee_needed: 11,
            },
            TxError::MempoolFull { min_fee: 3 },
            TxError::Refused(crate::Address([7; 32])),
            TxError::Storage(StoreError("disk".into())),
        ];
        for e in &honest {
            assert!(!e.punishable(), "{e} can come from an honest peer");
        }
    }

    #[test]
    fn a_block_from_the_future_or_our_own_disk_failure_is_not_punishable() {
        assert!(!BlockError::TimeTooNew {
            now: 1,
            drift_ms: 2,
            got: 9
        }
        .punishable());
        assert!(!BlockError::Storage(StoreError("disk".into())).punishable());
        for e in [
            BlockError::BadProofOfWork(3),
            BlockError::MerkleMismatch,
            BlockError::TimeTooOld { median: 5, got: 4 },
            BlockError::KnownInvalid,
        ] {
            assert!(e.punishable(), "{e} must cost the sender points");
        }
    }

    #[test]
    fn damage_is_told_from_a_failing_disk_at_open() {
        let ours = StoreError(format!("{CORRUPT_PREFIX}block 3 is missing"));
        let redb = StoreError("DB corrupted: bad page".into());
        let disk = StoreError("No space left on device".into());
        assert!(ours.is_corrupt() && redb.is_corrupt());
        assert!(!disk.is_corrupt());

        let open = OpenError::from(ours);
        assert!(open.is_damage());
        assert_eq!(open.to_string(), "the store is damaged: block 3 is missing");
        assert!(OpenError::from(redb).is_damage());
        let open = OpenError::from(disk);
        assert!(
            !open.is_damage(),
            "a full disk is not a damaged file: {open}"
        );
        assert!(!OpenError::Locked.is_damage());
    }
}
