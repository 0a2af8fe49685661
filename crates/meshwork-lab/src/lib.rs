//! Meshwork's lab: many nodes on one machine, and the measurements made on them.
//!
//! - [`harness`]: N full nodes in one process over loopback TCP, with chain, star or random
//!   bootstrap topologies and wait-for-condition helpers. The test suite uses it; so does the
//!   demo.
//! - [`rogue`]: peers that misbehave on purpose, for the tests of the node's defences.
//! - [`demo`]: the README's first command.
//! - [`resources`]: memory and CPU readings of this process.
//! - [`transfer`]: one file over one connection, the swarm against a raw stream copy.
//! - [`netns`]: hosts in network namespaces with capped links, running real processes.
//! - [`testbed`]: N users on their own hosts, with a swarm of nodes or the server, in either
//!   runner; [`api`] (the HTTP client of both services) and [`agent`] (a user's client).
//! - [`scenario`], [`distribution`], [`propagation`], [`failure`], [`churn`], [`partition`],
//!   [`sybil`], [`report`]: `meshwork lab run` and `meshwork lab report`.

pub mod agent;
pub mod api;
pub mod churn;
pub mod demo;
pub mod distribution;
pub mod failure;
pub mod harness;
pub mod netns;
pub mod partition;
pub mod propagation;
pub mod report;
pub mod resources;
pub mod rogue;
pub mod scenario;
pub mod svg;
pub mod sybil;
pub mod testbed;
pub mod transfer;

pub use harness::{wait_for, Harness, HarnessBuilder, Topology};
