//! Meshwork content distribution, sans-IO: BitTorrent's data plane as state machines.
//!
//! - [`manifest`]: name, size, piece size and the BLAKE3 hash of every piece; the content id is
//!   the hash of the manifest's canonical bytes.
//! - [`store`]: the file written in place at piece offsets, and a journal of verified pieces
//!   (nothing is marked verified unless its hash matched; downloads resume).
//! - [`picker`]: random first pieces, then rarest first; in-flight tracking; the endgame.
//! - [`choker`]: tit-for-tat upload slots, a rotating optimistic unchoke, anti-snubbing.
//! - [`superseed`]: an initial seeder that uploads about one copy.
//! - [`wire`]: the piece protocol's messages, framing and bounds.
//!
//! The networking (the piece protocol on libp2p streams, the tracker, DHT providers) is not
//! built yet; these cores are written to be driven by it, as the ledger is by the node.

pub mod bitfield;
pub mod choker;
pub mod manifest;
pub mod picker;
pub mod store;
pub mod superseed;
pub mod wire;

pub use bitfield::Bitfield;
pub use manifest::{ContentId, Digest, Manifest};
