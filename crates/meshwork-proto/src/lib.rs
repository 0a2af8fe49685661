//! Meshwork's pure vocabulary: network and protocol names, address groups, and the wire
//! messages of Meshwork's own protocols.
//!
//! This crate does no I/O and has no async code. Everything here is a value and a function of
//! values, so that the state machines built on it (address book, connection manager, ledger,
//! swarm) can be tested with a fake clock and without sockets.

pub mod addr;
pub mod network;
pub mod pex;

pub use addr::{AddrError, AddrGroup};
pub use libp2p_identity::{Keypair, PeerId};
pub use multiaddr::Multiaddr;
pub use network::{NetworkName, NetworkNameError};
