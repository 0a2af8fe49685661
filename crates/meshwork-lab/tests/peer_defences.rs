//! The node's defences against single hostile peers, each tested against a real node: a peer of
//! another network is disconnected once identify names its network, a peer that floods PEX
//! requests is penalized and then banned, a peer that relays invalid blocks is banned after two,
//! and everything works over QUIC as over TCP.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{ensure, Result};
use libp2p::identity::Keypair;
use meshwork_lab::harness::{loopback_ip, metric_sum, wait_for, HarnessBuilder};
use meshwork_lab::rogue::{constant, encode_records, RawAnswer, Rogue};
use meshwork_node::ledger_service::{MinerConfig, Topic};
use meshwork_node::NodeHandle;
use meshwork_proto::NetworkName;

/// A node's misbehaviour penalties for `offence` so far.
fn penalties(h: &NodeHandle, offence: &str) -> f64 {
    let label = format!("offence=\"{offence}\"");
    metric_sum(&h.encode_metrics(), "meshwork_penalties_total", &[&label])
}

fn empty_answer() -> meshwork_lab::rogue::Answerer {
    constant(RawAnswer::Body(encode_records(vec![])))
}

/// A rogue that speaks another network's identify version (and protocols) connects: the node
/// disconnects it as soon as identify tells, and keeps it out of its address book. A rogue of
/// the node's own network, connected the same way and just as idle, stays connected: the
/// network is what made the difference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_of_another_network_is_disconnected_once_identify_tells() -> Result<()> {
    common::init_logs();
    let victim = HarnessBuilder::new("netcheck")?
        .first_index(130)
        .spawn(1)
        .await?;
    let v = victim.running(0)?.handle.clone();
    let target = victim.dial_addr(0)?;
    let mut same = Rogue::spawn(
        &v.network,
        Keypair::generate_ed25519(),
        Ipv4Addr::new(127, 252, 0, 1),
        vec![target.clone()],
        empty_answer(),
    )
    .await?;
    same.wait_until(Duration::from_secs(20), |s| s.connections == 1)
        .await?;

    let elsewhere = NetworkName::new("elsewhere")?;
    let mut other = Rogue::spawn(
        &elsewhere,
        Keypair::generate_ed25519(),
        Ipv4Addr::new(127, 252, 0, 2),
        vec![target],
        empty_answer(),
    )
    .await?;
    other
        .wait_until(Duration::from_secs(20), |s| {
            s.closed >= 1 && s.connections == 0
        })
        .await?;
    let other_id = other.peer_id.to_string();
    ensure!(
        !v.peers().await?.iter().any(|p| p.peer_id == other_id),
        "the node still lists the other network's peer"
    );
    ensure!(
        !v.addrbook().await?.iter().any(|e| e.peer_id == other_id),
        "the other network's peer is in the address book"
    );
    let s = same.seen();
    ensure!(
        s.connections == 1 && s.closed == 0,
        "the same network's peer was disconnected too: {s:?}"
    );
    other.stop().await;
    same.stop().await;
    Ok(())
}

/// PEX requests beyond the answer rate (one per `pex_answer_interval`) get empty answers; the
/// first five refused cost nothing (an honest peer may retry), every sixth costs 10 points, and
/// at 100 points the peer is banned: after ten penalties, eleven if a second of score decay
/// passed between them (points halve every 10 minutes, so 10 × 10 can fall a little short).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pex_request_flood_is_penalized_then_banned() -> Result<()> {
    common::init_logs();
    let victim = HarnessBuilder::new("pexflood")?
        .first_index(131)
        // Every request of the test falls in one answer interval, however slow the machine.
        .tweak(|_, cfg| cfg.timings.pex_answer_interval = Duration::from_secs(600))
        .spawn(1)
        .await?;
    let v = victim.running(0)?.handle.clone();
    let vid = victim.running(0)?.peer_id();
    let mut rogue = Rogue::spawn(
        &v.network,
        Keypair::generate_ed25519(),
        Ipv4Addr::new(127, 252, 1, 1),
        vec![victim.dial_addr(0)?],
        empty_answer(),
    )
    .await?;
    rogue
        .wait_until(Duration::from_secs(20), |s| s.connections == 1)
        .await?;
    let bans_before = v.status().await?.address_book.banned;

    // The answered request and five refused: no penalty.
    let mut sent = 0;
    for _ in 0..6 {
        rogue.request_pex(vid, 32).await?;
        sent += 1;
    }
    rogue
        .wait_until(Duration::from_secs(20), |s| s.pex_answers == sent)
        .await?;
    ensure!(
        penalties(&v, "pex_flood") == 0.0,
        "penalized within the tolerance of five refused requests"
    );
    // Then six at a time, each batch answered before the next, until the ban.
    let mut penalties_seen = vec![];
    while v.status().await?.address_book.banned == bans_before {
        ensure!(sent < 6 + 6 * 12, "no ban after {sent} requests");
        for _ in 0..6 {
            rogue.request_pex(vid, 32).await?;
            sent += 1;
        }
        rogue
            .wait_until(Duration::from_secs(20), |s| {
                s.pex_answers + s.pex_failures == sent || s.connections == 0
            })
            .await?;
        penalties_seen.push(penalties(&v, "pex_flood"));
    }
    let at_ban = penalties(&v, "pex_flood");
    ensure!(
        (10.0..=11.0).contains(&at_ban),
        "banned after {at_ban} flood penalties (seen after each batch: {penalties_seen:?})"
    );
    // One penalty per batch of six refused, until the ban.
    for (k, p) in penalties_seen.iter().enumerate() {
        ensure!(
            *p == (k + 1) as f64,
            "after batch {} the node counted {p} penalties ({penalties_seen:?})",
            k + 1
        );
    }
    rogue
        .wait_until(Duration::from_secs(10), |s| s.connections == 0)
        .await?;
    println!("PEX flood: banned after {sent} requests, {at_ban} penalties");
    rogue.stop().await;
    Ok(())
}

/// A peer that relays invalid blocks: each is rejected and never forwarded (gossipsub also
/// stops listening to the peer for a while: one invalid message puts it below the graylist
/// threshold), costs 60 misbehaviour points, and the second one bans it. The rogue here is a
/// real node that publishes bytes without validating them, a fresh malformed block every
/// 200 ms, so the second one the victim hears arrives once gossipsub listens again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_relaying_invalid_blocks_is_banned_after_two() -> Result<()> {
    common::init_logs();
    let h = HarnessBuilder::new("badblocks")?
        .first_index(133)
        .spawn(2)
        .await?;
    let (liar, victim) = (&h.running(0)?.handle, &h.running(1)?.handle);
    let liar_id = h.running(0)?.peer_id().to_string();
    wait_for(
        "the two nodes connected",
        Duration::from_secs(30),
        Duration::from_millis(50),
        || async { Ok(victim.peers().await?.iter().any(|p| p.peer_id == liar_id)) },
    )
    .await?;
    let mut k: u32 = 0;
    let banned = wait_for(
        "the liar banned",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || {
            k += 1;
            let bytes = [b"not a block ".as_slice(), &k.to_be_bytes()].concat();
            async move {
                // The liar may already be disconnected: publishing then fails, which is fine.
                let _ = liar.inject_gossip(Topic::Block, bytes).await;
                Ok(victim.status().await?.address_book.banned >= 1)
            }
        },
    )
    .await?;
    let strikes = penalties(victim, "invalid_gossip");
    ensure!(
        strikes == 2.0,
        "banned after {strikes} invalid-gossip penalties"
    );
    let rejected = metric_sum(
        &victim.encode_metrics(),
        "meshwork_gossip_messages_total",
        &["reject"],
    );
    ensure!(rejected >= 2.0, "{rejected} messages rejected");
    wait_for(
        "the liar disconnected",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async { Ok(!victim.peers().await?.iter().any(|p| p.peer_id == liar_id)) },
    )
    .await?;
    println!(
        "invalid blocks: the liar was banned at its second penalty, {banned:?} after the first block"
    );
    h.shutdown().await;
    Ok(())
}

/// Nodes that listen and dial only over QUIC connect, exchange addresses and relay a block: the
/// whole stack (gate, identify, gossipsub, sync) runs on QUIC as on TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_on_quic_alone_connect_and_agree_on_mined_blocks() -> Result<()> {
    common::init_logs();
    let h = HarnessBuilder::new("quiconly")?
        .first_index(135)
        .tweak(|i, cfg| {
            cfg.listen = vec![format!("/ip4/{}/udp/0/quic-v1", loopback_ip(135 + i))
                .parse()
                .expect("valid multiaddr")];
        })
        .spawn(3)
        .await?;
    for i in 0..3 {
        let addr = h.dial_addr(i)?.to_string();
        ensure!(addr.contains("/quic-v1"), "node {i} dials at {addr}");
    }
    // Node 2 knows only node 1; the blocks of node 0 reach it through node 1.
    h.running(0)?
        .handle
        .set_mining(Some(MinerConfig {
            address: meshwork_ledger::Wallet::generate().address(),
            pace: Some(Duration::from_millis(300)),
        }))
        .await?;
    wait_for(
        "every node at height 3 or more",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || async {
            for (_, n) in h.running_nodes() {
                if n.handle.ledger(|l| l.tip().height).await? < 3 {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )
    .await?;
    for (i, n) in h.running_nodes() {
        let peers = n.handle.peers().await?;
        ensure!(!peers.is_empty(), "node {i} has no peers");
        for p in &peers {
            ensure!(
                p.address.contains("/quic-v1"),
                "node {i} is connected over {}",
                p.address
            );
        }
    }
    h.shutdown().await;
    Ok(())
}
