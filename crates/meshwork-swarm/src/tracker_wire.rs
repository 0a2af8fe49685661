//! The tracker's wire format: `POST /api/v1/announce` and `GET /api/v1/stats` bodies (JSON).
//! Shared by the tracker (`meshwork-server`) and its client (the node's content service).

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Event {
    Started,
    Completed,
    Stopped,
}

/// `POST /api/v1/announce`, as sent.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnnounceRequest {
    pub content: String,
    pub peer: String,
    pub addrs: Vec<String>,
    #[serde(default)]
    pub event: Option<Event>,
    pub left: u64,
    #[serde(default)]
    pub numwant: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerAddrs {
    pub peer: String,
    pub addrs: Vec<String>,
    pub seeder: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnounceResponse {
    pub interval_s: u64,
    pub seeders: usize,
    pub leechers: usize,
    pub peers: Vec<PeerAddrs>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub contents: usize,
    pub peers: usize,
    pub seeders: usize,
    pub leechers: usize,
    pub announces: u64,
    pub rejected: u64,
}
