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
//! - [`engine`]: one content's session with its peers, tying the above together.
//! - [`ticket`]: the shareable string naming a content, its providers and tracker.
//! - [`tracker_wire`]: the tracker's announce request and answer (JSON).
//!
//! The networking (streams, the tracker client, DHT providers) is the node's content service,
//! which drives these cores as it drives the ledger.

pub mod bitfield;
pub mod choker;
pub mod engine;
pub mod manifest;
pub mod picker;
pub mod store;
pub mod superseed;
pub mod ticket;
pub mod tracker_wire;
pub mod wire;

pub use bitfield::Bitfield;
pub use manifest::{ContentId, Digest, Manifest};
