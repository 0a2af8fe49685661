//! Propagation of transactions and blocks through N in-process nodes: how long until a message
//! has reached every node, and how many copies of it each node receives.
//!
//! Each node records when it first accepted (or published) every gossip message; the origin's
//! time is the earliest. Copies come from gossipsub's own counter of every message received on
//! a topic, duplicates included, summed over nodes and divided by messages × (N − 1): the
//! origin receives none, every other node at least one.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{ensure, Result};
use meshwork_ledger::Wallet;
use meshwork_node::ledger_service::{MinerConfig, Topic};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::harness::{wait_for, HarnessBuilder, Topology};

#[derive(Clone, Debug)]
pub struct PropagationOptions {
    pub nodes: usize,
    pub txs: usize,
    pub blocks: usize,
    /// Between two transactions, and the miner's pace between blocks (blocks get 4x).
    pub interval: Duration,
    pub seed: u64,
    /// Quiet time after connecting, before the first message.
    pub settle: Duration,
}

impl Default for PropagationOptions {
    fn default() -> Self {
        Self {
            nodes: 100,
            txs: 30,
            blocks: 5,
            interval: Duration::from_millis(250),
            seed: 1,
            settle: Duration::from_secs(10),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Figures {
    pub messages: usize,
    /// Messages that reached every node.
    pub reached_all: usize,
    /// Time until a message had reached every node that got it, over messages.
    pub all_p50_ms: f64,
    pub all_p99_ms: f64,
    /// Latency of single deliveries (origin to one node), over all deliveries.
    pub delivery_p50_ms: f64,
    pub delivery_p99_ms: f64,
    /// Copies received per node per message (1.0 is the minimum).
    pub copies_per_node: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub nodes: usize,
    pub setup_s: f64,
    pub tx: Figures,
    pub block: Figures,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// Sums gossipsub's "received, duplicates included" counter for the topic ending in `suffix`.
fn received_copies(metrics: &str, suffix: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("gossipsub_topic_msg_recv_counts_unfiltered_total"))
        .filter(|l| l.contains(suffix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub async fn run(opts: PropagationOptions) -> Result<Report> {
    let n = opts.nodes.max(2);
    let started = std::time::Instant::now();
    let h = HarnessBuilder::new("test-propagation")?
        .topology(Topology::Random {
            degree: 3,
            seed: opts.seed,
        })
        // Production discovery timers: the lab's fast ones keep 100+ in-process nodes busy
        // with feelers and DHT walks (Noise handshakes), which would be measured as gossip
        // latency on this 2-core machine.
        .tweak(|_, cfg| cfg.timings = meshwork_node::config::Timings::default())
        .spawn(n)
        .await?;
    let degree = 6.min(n - 1);
    wait_for(
        "every node with enough connections",
        Duration::from_secs(300),
        Duration::from_millis(250),
        || async {
            for (_, node) in h.running_nodes() {
                if node.handle.peers().await?.len() < degree {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )
    .await?;
    // Let the start-up storm (Kademlia bootstraps, first PEX rounds, feelers) pass and the
    // meshes form: at least `settle`, then until the process uses under half a core (at most
    // three more minutes). Otherwise the figures measure CPU queueing, not gossip.
    tokio::time::sleep(opts.settle).await;
    let quiet_by = std::time::Instant::now() + Duration::from_secs(180);
    while std::time::Instant::now() < quiet_by {
        match crate::resources::cpu_share_over(Duration::from_secs(2)).await {
            Some(share) if share > 0.5 => continue,
            _ => break,
        }
    }
    let setup_s = started.elapsed().as_secs_f64();

    let faucet = Wallet::from_secret(&meshwork_ledger::spec::DEV_FAUCET_SECRET);
    let chain_id = h
        .running(0)?
        .handle
        .ledger(|l| l.chain().chain_id())
        .await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    for i in 0..opts.txs {
        let via = &h.running(rng.gen_range(0..n))?.handle;
        let t = faucet.transfer(chain_id, Wallet::generate().address(), 1, 1, i as u64);
        via.submit(t)
            .await?
            .map_err(|e| anyhow::anyhow!("transfer {i} refused: {e}"))?;
        tokio::time::sleep(opts.interval).await;
    }
    if opts.blocks > 0 {
        let miner = &h.running(rng.gen_range(0..n))?.handle;
        miner
            .set_mining(Some(MinerConfig {
                address: Wallet::generate().address(),
                pace: Some(opts.interval * 4),
            }))
            .await?;
        let target = opts.blocks as u64;
        wait_for(
            "the blocks mined",
            Duration::from_secs(300),
            Duration::from_millis(100),
            || async { Ok(miner.ledger(|l| l.tip().height).await? >= target) },
        )
        .await?;
        miner.set_mining(None).await?;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Arrival times per message, per topic.
    let mut arrivals: HashMap<Vec<u8>, (Topic, Vec<tokio::time::Instant>)> = HashMap::new();
    let mut copies = (0.0, 0.0);
    for (_, node) in h.running_nodes() {
        for (id, topic, at) in node.handle.gossip_seen().await? {
            arrivals.entry(id).or_insert((topic, vec![])).1.push(at);
        }
        let m = node.handle.encode_metrics();
        copies.0 += received_copies(&m, "/tx/1");
        copies.1 += received_copies(&m, "/block/1");
    }
    h.shutdown().await;
    let figures = |topic: Topic, copies: f64| {
        let mut all = vec![];
        let mut deliveries = vec![];
        let mut messages = 0;
        let mut reached_all = 0;
        for (t, times) in arrivals.values() {
            if *t != topic {
                continue;
            }
            messages += 1;
            let origin = *times.iter().min().expect("at least the origin");
            let last = *times.iter().max().expect("at least the origin");
            if times.len() >= n {
                reached_all += 1;
            }
            all.push((last - origin).as_secs_f64() * 1000.0);
            deliveries.extend(
                times
                    .iter()
                    .filter(|t| **t != origin)
                    .map(|t| (*t - origin).as_secs_f64() * 1000.0),
            );
        }
        all.sort_by(f64::total_cmp);
        deliveries.sort_by(f64::total_cmp);
        Figures {
            messages,
            reached_all,
            all_p50_ms: percentile(&all, 0.5),
            all_p99_ms: percentile(&all, 0.99),
            delivery_p50_ms: percentile(&deliveries, 0.5),
            delivery_p99_ms: percentile(&deliveries, 0.99),
            copies_per_node: copies / (messages.max(1) * (n - 1)) as f64,
        }
    };
    let report = Report {
        nodes: n,
        setup_s,
        tx: figures(Topic::Tx, copies.0),
        block: figures(Topic::Block, copies.1),
    };
    ensure!(
        report.tx.messages == opts.txs,
        "{} transactions seen",
        report.tx.messages
    );
    Ok(report)
}
