//! Chain specs: the genesis state and every rule parameter of one network.
//!
//! The chain id is the hash of the genesis block, and the genesis header commits to the hash of
//! the whole spec (it is the genesis block's `prev`). Two networks whose specs differ in any
//! parameter therefore have different chain ids, and a transfer signed for one is invalid on
//! the other.

use serde::{Deserialize, Serialize};

use crate::types::{Address, Amount, Hash, Millis};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainSpec {
    /// The network name: part of the spec hash, so of the chain id.
    pub name: String,
    pub genesis_timestamp: Millis,
    /// Balances at genesis.
    pub allocations: Vec<(Address, Amount)>,
    /// The block interval that difficulty retargeting aims for.
    pub block_interval_ms: u64,
    /// Expected hashes per block at genesis (see [`crate::block::meets_difficulty`]).
    pub initial_difficulty: u64,
    /// Retargeting never goes below this.
    pub min_difficulty: u64,
    /// Difficulty changes every this many blocks; 0 keeps it at `initial_difficulty` forever.
    pub retarget_interval: u64,
    /// A retarget moves difficulty by at most this factor either way (Bitcoin: 4).
    pub max_retarget_factor: u64,
    /// A block's timestamp must exceed the median of this many ancestors (Bitcoin: 11).
    pub median_time_span: usize,
    /// ... and be at most this far ahead of the local clock (Bitcoin: 2 hours).
    pub max_future_drift_ms: u64,
    pub block_reward: Amount,
    /// The lowest fee a transfer may carry.
    pub min_fee: Amount,
    pub max_block_bytes: usize,
    pub max_block_txs: usize,
}

/// Bytes of a postcard-encoded transfer are about 190; this bounds malformed ones.
pub const MAX_TX_BYTES: usize = 512;

/// 2026-01-01T00:00:00Z.
const GENESIS_2026: Millis = 1_767_225_600_000;

/// The well-known test account of the built-in specs: its secret key is public (like
/// bitcoind's regtest keys), so that demos and tests have money to move. Never use it on a
/// network that matters.
pub const DEV_FAUCET_SECRET: [u8; 32] = *b"meshwork-dev-faucet-secret-key!!";

/// The address of [`DEV_FAUCET_SECRET`].
pub fn dev_faucet() -> Address {
    let key = ed25519_dalek::SigningKey::from_bytes(&DEV_FAUCET_SECRET);
    Address(key.verifying_key().to_bytes())
}

impl ChainSpec {
    /// The lab's default, like bitcoind's regtest: a block every few seconds on one core
    /// (release build), a funded faucet, fast retargeting, and a future drift that tolerates
    /// unsynchronized lab clocks.
    pub fn dev(network: &str) -> ChainSpec {
        ChainSpec {
            name: network.to_string(),
            genesis_timestamp: GENESIS_2026,
            allocations: vec![(dev_faucet(), 1_000_000_000_000)],
            block_interval_ms: 5_000,
            // About 2 s of hashing on one core of this machine (6 M hashes/s, release).
            initial_difficulty: 12_000_000,
            min_difficulty: 1_000,
            retarget_interval: 10,
            max_retarget_factor: 4,
            median_time_span: 11,
            max_future_drift_ms: 15_000,
            block_reward: 50_000,
            min_fee: 1,
            max_block_bytes: 1 << 20,
            max_block_txs: 4_096,
        }
    }

    /// For tests: every header meets the target (difficulty 1), so blocks cost nothing to make
    /// and many-block chains build in milliseconds. Fork choice still counts work, which is
    /// then the chain length.
    pub fn test(network: &str) -> ChainSpec {
        ChainSpec {
            initial_difficulty: 1,
            min_difficulty: 1,
            retarget_interval: 0,
            ..ChainSpec::dev(network)
        }
    }

    /// The built-in spec of a network: `test-*` networks get [`ChainSpec::test`], every other
    /// one [`ChainSpec::dev`]. A real deployment passes its own spec file.
    pub fn for_network(network: &str) -> ChainSpec {
        if network.starts_with("test-") {
            ChainSpec::test(network)
        } else {
            ChainSpec::dev(network)
        }
    }

    /// The hash the genesis header commits to.
    pub fn hash(&self) -> Hash {
        // JSON of a struct with fixed field order is deterministic; a spec is hashed once.
        Hash::of(&serde_json::to_vec(self).expect("a spec always serializes"))
    }

    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("block_interval_ms", self.block_interval_ms),
            ("initial_difficulty", self.initial_difficulty),
            ("min_difficulty", self.min_difficulty),
            ("max_retarget_factor", self.max_retarget_factor),
            ("max_block_txs", self.max_block_txs as u64),
            ("median_time_span", self.median_time_span as u64),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        if self.initial_difficulty < self.min_difficulty {
            return Err("initial_difficulty is below min_difficulty".into());
        }
        if self.max_block_bytes < 4096 {
            return Err("max_block_bytes must be at least 4096".into());
        }
        let mut total: Amount = 0;
        for (_, a) in &self.allocations {
            total = total.checked_add(*a).ok_or("allocations overflow a u64")?;
        }
        Ok(())
    }
}
