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
