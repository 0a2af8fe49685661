//! The centralized parts of Meshwork.
//!
//! - [`tracker`]: the content tracker's state (sans-IO): announces, bounded peer samples,
//!   expiry, statistics.
//! - [`http`]: the tracker served over HTTP (`meshwork tracker start`).
//!
//! The client-server counterpart of the ledger and content services comes with the lab issue.

pub mod http;
pub mod tracker;
