//! The HTTP ground under every Meshwork service (the node's API, `meshwork server`,
//! `meshwork tracker`) and every client that reads their answers.
//!
//! - [`serve`]: an accept loop with caps on connections in total and per IP, kept below the
//!   process's file limit, and header-read, idle and stall timeouts (slow clients cannot take a
//!   service down).
//! - [`auth`]: the API cookie (bitcoind's `.cookie` scheme) and the `Host`/`Origin` check
//!   that keeps web pages (DNS rebinding, CSRF) out.
//! - [`body`]: reading an HTTP response with a size cap that fits its purpose.

pub mod auth;
pub mod body;
pub mod serve;
