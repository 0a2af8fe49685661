//! Discovery end to end: many real nodes in one process over loopback TCP.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{ensure, Result};
use futures::StreamExt;
use libp2p::PeerId;
use meshwork_lab::harness::{wait_for, HarnessBuilder, Topology};
use meshwork_node::node::Class;
use rand::seq::SliceRandom;

/// 50 nodes, node i bootstrapped from node i-1 only: every node reaches its 8 outbound
/// connections and knows all 49 other addresses (measured: 22 to 27 s on the 2-core machine
/// under load; the wait gives up at 60 s), and a Kademlia lookup of every node's id from a
/// random node finds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_of_50_converges_and_the_dht_finds_every_node() -> Result<()> {
    common::init_logs();
    let n = 50;
    let h = HarnessBuilder::new("chain50")?
        .topology(Topology::Chain)
        .spawn(n)
        .await?;
    // Converged: every node holds its 8 outbound connections (the ones it chose and keeps;
    // transient DHT dials, feelers and content connections do not count) and knows the
    // addresses of all 49 others, although each was told only one at start.
    let took = wait_for(
        "50 nodes: 8 outbound connections and all 49 other addresses known each",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || async {
            for (_, node) in h.running_nodes() {
                let s = node.handle.status().await?;
                if s.connections.outbound < 8 || s.address_book.new + s.address_book.tried < 49 {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )
    .await?;
    let mut least = (usize::MAX, usize::MAX);
    for (_, node) in h.running_nodes() {
        let s = node.handle.status().await?;
        least.0 = least.0.min(s.connections.outbound);
        least.1 = least.1.min(s.address_book.new + s.address_book.tried);
    }
    println!(
        "chain of {n}: converged in {:.2} s (then at least {} outbound connections and {} addresses on every node)",
        took.as_secs_f64(),
        least.0,
        least.1
    );

    let ids: Vec<PeerId> = h.running_nodes().map(|(_, node)| node.peer_id()).collect();
    let from = *(0..n)
        .collect::<Vec<_>>()
        .choose(&mut rand::thread_rng())
        .expect("n > 0");
    let asker = h.running(from)?.handle.clone();
    // Four lookups at a time, as an application would issue them.
    let lookups = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != from)
        .map(|(i, id)| {
            let asker = asker.clone();
            let id = *id;
            async move { (i, id, asker.find_peer(id).await) }
        });
    let results: Vec<_> = futures::stream::iter(lookups)
        .buffer_unordered(4)
        .collect()
        .await;
    let mut missing = vec![];
    for (i, id, res) in results {
        if !res?.contains(&id) {
            missing.push(i);
        }
    }
    ensure!(
        missing.is_empty(),
        "lookups from node {from} did not find nodes {missing:?}"
    );
    println!(
        "lookups of all {} other ids from node {from}: all found",
        n - 1
    );
    h.shutdown().await;
    Ok(())
}

/// A node stopped and restarted with the same data directory, and no bootstrap address, dials
/// at least 3 of its former peers again from its address book (outbound connections: the
/// others dialling it back would not show that its book works).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_reconnects_from_its_address_book() -> Result<()> {
    common::init_logs();
    let n = 16;
    let target = 8;
    let mut h = HarnessBuilder::new("restart")?
        .topology(Topology::Chain)
        .persistent(true)
        .spawn(n)
        .await?;
    wait_for(
        "node 8 to have 6 lasting connections",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            let s = h.running(target)?.handle.status().await?;
            Ok(s.connections.inbound + s.connections.outbound >= 6)
        },
    )
    .await?;
    let former: HashSet<String> = h
        .running(target)?
        .handle
        .peers()
        .await?
        .into_iter()
        .map(|p| p.peer_id)
        .collect();
    let (now, took) = restart_and_reconnect(&mut h, target, &former, true).await?;
    println!(
        "restarted without bootstrap: {} of {} former peers again after {:.2} s",
        now.intersection(&former).count(),
        former.len(),
        took.as_secs_f64()
    );
    // Again without the anchors: the tried table alone must lead back to the network.
    let (again, took) = restart_and_reconnect(&mut h, target, &now, false).await?;
    println!(
        "restarted without bootstrap or anchors: {} of {} former peers again after {:.2} s",
        again.intersection(&now).count(),
        now.len(),
        took.as_secs_f64()
    );
    h.shutdown().await;
    Ok(())
}

/// Stops node `target`, restarts it with no bootstrap address (and with or without anchors),
/// and waits until it has dialled at least 3 of `former`. Returns its peers then.
async fn restart_and_reconnect(
    h: &mut meshwork_lab::Harness,
    target: usize,
    former: &HashSet<String>,
    anchors: bool,
) -> Result<(HashSet<String>, Duration)> {
    let id = h.running(target)?.peer_id().to_string();
    h.stop(target).await?;
    // The others noticed it left: none lists it as a peer.
    wait_for(
        "the others to drop their connections to the stopped node",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async {
            for (_, n) in h.running_nodes() {
                if n.handle.peers().await?.iter().any(|p| p.peer_id == id) {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )
    .await?;
    h.restart(target, vec![], |cfg| cfg.anchors = anchors)
        .await?;
    let node = h.running(target)?.handle.clone();
    let peers = || async {
        Ok::<_, anyhow::Error>(
            node.peers()
                .await?
                .into_iter()
                .map(|p| p.peer_id)
                .collect::<HashSet<String>>(),
        )
    };
    let dialled = || async {
        Ok::<_, anyhow::Error>(
            node.peers()
                .await?
                .into_iter()
                .filter(|p| p.direction == Class::Outbound && former.contains(&p.peer_id))
                .count(),
        )
    };
    let took = wait_for(
        "the restarted node to dial 3 former peers from its book",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async { Ok(dialled().await? >= 3) },
    )
    .await?;
    Ok((peers().await?, took))
}
