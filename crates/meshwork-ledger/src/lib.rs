//! The Meshwork ledger, sans-IO: signed, replay-protected transfers between ed25519 accounts,
//! proof-of-work blocks, most-work fork choice with exact reorganizations, a bounded mempool,
//! and the redb store that holds all of it. No async, no network, no clock: the node's event
//! loop feeds it blocks and transfers and passes `now`.

pub mod block;
pub mod chain;
pub mod error;
pub mod faults;
pub mod ledger;
pub mod mempool;
pub mod spec;
pub mod tx;
pub mod types;

pub use block::{Block, Header};
pub use chain::{AccountsDigest, Chain, Reorg, TipInfo, TxLocation};
pub use error::{BlockError, OpenError, StoreError, TxError};
pub use ledger::{BlockOutcome, ChainChange, Ledger, TxStatus};
pub use spec::ChainSpec;
pub use tx::{SignedTransfer, Transaction, Transfer, Wallet};
pub use types::{Account, Address, Amount, Hash, Millis};
