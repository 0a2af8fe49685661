//! The Meshwork peer.
//!
//! - [`addrbook`]: the eclipse-resistant address book (sans-IO).
//! - [`connmgr`]: outbound selection and misbehaviour scoring (sans-IO).
//! - [`bans`]: the bounded ban list shared by the address book and the gate.
//! - [`dialguard`]: per-IP caps and backoff on content dials (sans-IO).
//! - [`gate`]: the libp2p behaviour that enforces connection limits, bans and keep-alive.
//! - [`pex`]: the codec of the peer-exchange protocol.
//! - [`node`]: the actor that owns the libp2p `Swarm` and drives all of the above; other code
//!   talks to it through [`node::NodeHandle`].
//! - [`api`]: the HTTP API and Prometheus metrics, a thin layer over the handle.
//! - [`config`] and [`store`]: the data directory, identity, `config.toml`, and redb.
//! - [`transport`]: TCP dials bound to a chosen local IP.
//! - [`ledger_service`]: the threads that own the ledger and run the miner.
//! - [`chainsync`]: the block-sync protocol and its download scheduler (sans-IO).
//! - [`content`]: the content service: piece streams, tracker announces, DHT providers and
//!   in-swarm peer exchange driving `meshwork-swarm`'s engines.

pub mod addrbook;
pub mod api;
pub mod bans;
pub mod chainsync;
pub mod config;
pub mod connmgr;
pub mod content;
pub mod dialguard;
pub mod gate;
pub mod ledger_service;
mod metrics;
pub mod node;
pub mod pex;
pub mod store;
pub mod transport;

pub use config::NodeConfig;
pub use node::{start, NodeError, NodeHandle, RunningNode};

/// Seconds since the Unix epoch: the clock of the address book and of bans, which are persisted
/// and so need wall-clock time rather than a monotonic instant.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch: the time a tracker announce is signed with.
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Microseconds since the Unix epoch: gossip arrival times, which the lab compares across the
/// processes of one machine.
pub fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The agent string sent in identify.
pub const AGENT: &str = concat!("meshwork/", env!("CARGO_PKG_VERSION"));
