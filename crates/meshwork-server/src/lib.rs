//! The centralized parts of Meshwork.
//!
//! - [`tracker`]: the content tracker's state (sans-IO): announces, bounded peer samples,
//!   expiry, statistics; [`http`] serves it (`meshwork tracker start`).
//! - The client-server counterpart of the node's services (`meshwork server start`):
//!   [`ledger`] orders the same signed transfers without proof of work, [`content`] stores
//!   files by the same content id as the swarm, both in one database ([`store`]: opened
//!   without panicking on a damaged file, reopened by itself after a storage error);
//!   [`server`] serves them over HTTP, and [`client`] uploads and downloads with every piece
//!   verified.

pub mod client;
pub mod content;
pub mod http;
pub mod ledger;
pub mod server;
pub mod store;
pub mod tracker;
