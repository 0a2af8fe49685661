//! `meshwork lab run propagation`: how fast news reaches everyone, and at what cost in copies.
//!
//! - **Peer to peer**: `txs` transfers, each submitted to a random node, then `blocks` blocks
//!   mined by a random node, through N nodes. Every node records when it first accepted (or
//!   published) each gossip message (`GET /api/v1/gossip/recent`, wall-clock µs). A transfer's
//!   clock starts when the lab submits it; a block's when its miner publishes it. Copies come
//!   from gossipsub's counter of every message received on a topic, duplicates included,
//!   summed over nodes and divided by messages × (N − 1).
//! - **Client-server**: the same transfers to the server, and N clients following its log
//!   (long polls: the clients' subscription). A transfer's clock starts at its submission and
//!   stops at each client's receipt. Copies: entries received per client per transfer.
//!
//! Before the first message, the network is left to settle (`settle`, then until the machine
//! uses under half a core, at most three minutes): otherwise the figures measure the CPU
//! queueing of the start-up storm (Kademlia bootstraps, first PEX rounds), not gossip. The
//! settled state is also where the runner's idle cost is read.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use meshwork_ledger::Wallet;
use meshwork_node::ledger_service::Topic;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::api::Submitted;
use crate::scenario::{both, p50_p99, Common, Outputs, RunnerKind};
use crate::testbed::{Arch, Bed};

#[derive(Clone, Debug)]
pub struct PropagationOptions {
    /// `users`: the nodes, or the server's clients.
    pub common: Common,
    pub txs: usize,
    pub blocks: usize,
    /// Between two transactions, and the miner's pace between blocks (blocks get 4x).
    pub interval: Duration,
    /// Quiet time after connecting, before the first message.
    pub settle: Duration,
    /// Then at most this long until the machine uses under half a core.
    pub quiet_max: Duration,
    /// The window the idle CPU is read over.
    pub idle_window: Duration,
}

impl PropagationOptions {
    pub fn new(runner: RunnerKind, out: &Path) -> PropagationOptions {
        PropagationOptions {
            common: Common::new(runner, 100, out),
            txs: 30,
            blocks: 5,
            interval: Duration::from_millis(250),
            settle: Duration::from_secs(10),
            quiet_max: Duration::from_secs(180),
            idle_window: Duration::from_secs(5),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Figures {
    pub messages: usize,
    /// Messages that reached every node (client).
    pub reached_all: usize,
    /// Time until a message had reached every node that got it, over messages.
    #[serde(deserialize_with = "crate::scenario::nan_if_null")]
    pub all_p50_ms: f64,
    #[serde(deserialize_with = "crate::scenario::nan_if_null")]
    pub all_p99_ms: f64,
    /// Latency of single deliveries (origin to one receiver), over all deliveries.
    #[serde(deserialize_with = "crate::scenario::nan_if_null")]
    pub delivery_p50_ms: f64,
    #[serde(deserialize_with = "crate::scenario::nan_if_null")]
    pub delivery_p99_ms: f64,
    /// Copies received per receiver per message (1.0 is the minimum).
    pub copies_per_node: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ArchPropagation {
    pub arch: Arch,
    /// Seconds to build the hosts and start the nodes (or server), connected.
    pub setup_secs: f64,
    /// netns: of which building the hosts (namespaces, veths, `tc` caps).
    #[serde(default)]
    pub hosts_setup_secs: Option<f64>,
    pub teardown_secs: f64,
    /// Once settled: the lab process's CPU (% of a core) and the whole machine's (cores).
    #[serde(deserialize_with = "crate::scenario::nan_if_null")]
    pub idle_runner_cpu_pct: f64,
    #[serde(deserialize_with = "crate::scenario::nan_if_null")]
    pub idle_machine_cores: f64,
    pub tx: Figures,
    /// Peer to peer only: there are no blocks client-server.
    pub block: Option<Figures>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PropagationReport {
    pub scenario: String,
    pub runner: RunnerKind,
    pub seed: u64,
    pub nodes: usize,
    pub client_server: ArchPropagation,
    pub peer_to_peer: ArchPropagation,
}

pub async fn run(o: PropagationOptions) -> Result<(PropagationReport, Outputs)> {
    let c = &o.common;
    ensure!(c.users >= 2, "propagation needs at least 2 nodes");
    let [(mut cs, cs_down), (mut p2p, p2p_down)] =
        both("propagation", c, |_| {}, async |bed| drive(&o, bed).await).await?;
    cs.teardown_secs = cs_down.as_secs_f64();
    p2p.teardown_secs = p2p_down.as_secs_f64();
    let report = PropagationReport {
        scenario: "propagation".into(),
        runner: c.runner,
        seed: c.seed,
        nodes: c.users,
        client_server: cs,
        peer_to_peer: p2p,
    };
    ensure!(
        report.peer_to_peer.tx.messages == o.txs && report.client_server.tx.messages == o.txs,
        "transfers went missing: {} of {} seen peer to peer, {} client-server",
        report.peer_to_peer.tx.messages,
        o.txs,
        report.client_server.tx.messages
    );
    let outputs = outputs(&report)?;
    Ok((report, outputs))
}

async fn drive(o: &PropagationOptions, bed: &mut Bed) -> Result<ArchPropagation> {
    let n = bed.users();
    let arch = bed.arch;
    let connected = Instant::now();
    if arch == Arch::PeerToPeer {
        bed.wait_connected(6.min(n - 1), Duration::from_secs(300))
            .await?;
    } else {
        bed.start_watchers().await?;
    }
    // Building the hosts and starting the services, then connecting.
    let setup_secs = (bed.setup + connected.elapsed()).as_secs_f64();
    tokio::time::sleep(o.settle).await;
    let quiet_by = Instant::now() + o.quiet_max;
    while Instant::now() < quiet_by {
        match crate::resources::machine_cores_busy_over(Duration::from_secs(2)).await {
            Some(cores) if cores > 0.5 => continue,
            _ => break,
        }
    }
    let window = o.idle_window;
    let (runner_cpu, machine) = tokio::join!(
        crate::resources::cpu_share_over(window),
        crate::resources::machine_cores_busy_over(window)
    );

    // The transfers: from the faucet to fresh addresses, each through a random user's service.
    let faucet = Wallet::from_secret(&meshwork_ledger::spec::DEV_FAUCET_SECRET);
    let chain_id = bed.service(0).chain_id().await?;
    let first = bed.service(0).account(&faucet.address()).await?.next_nonce;
    let mut rng = rand::rngs::StdRng::seed_from_u64(o.common.seed);
    // Message id (BLAKE3 of the gossip payload, or the transfer id client-server) → when the
    // lab submitted it.
    let mut origin: HashMap<String, u64> = HashMap::new();
    for i in 0..o.txs {
        let u = rng.gen_range(0..n);
        let t = faucet.transfer(
            chain_id,
            Wallet::generate().address(),
            1,
            1,
            first + i as u64,
        );
        let key = match arch {
            Arch::PeerToPeer => blake3::hash(&t.encode()).to_hex().to_string(),
            Arch::ClientServer => t.id().to_string(),
        };
        origin.insert(key, meshwork_node::unix_micros());
        if let Submitted::Refused(why) = bed.service(u).submit(&t).await? {
            anyhow::bail!("transfer {i} refused: {why}");
        }
        tokio::time::sleep(o.interval).await;
    }
    let mut height = 0;
    if arch == Arch::PeerToPeer && o.blocks > 0 {
        let miner = bed.node(rng.gen_range(0..n)).clone();
        let target = miner.chain().await?.height + o.blocks as u64;
        height = target;
        miner
            .set_mining(Some((Wallet::generate().address(), o.interval * 4)))
            .await?;
        crate::harness::wait_for(
            "the blocks mined",
            Duration::from_secs(300),
            Duration::from_millis(100),
            || async { Ok(miner.chain().await?.height >= target) },
        )
        .await?;
        miner.set_mining(None).await?;
    }
    // Until every message has reached everyone, or 10 s have passed: what never arrives is
    // a result (`reached_all`), not an error.
    let all_in_by = Instant::now() + Duration::from_secs(10);
    while Instant::now() < all_in_by && !arrived_everywhere(bed, &origin, height).await? {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut r = ArchPropagation {
        arch,
        setup_secs,
        hosts_setup_secs: bed.hosts_setup().map(|d| d.as_secs_f64()),
        teardown_secs: 0.0,
        idle_runner_cpu_pct: runner_cpu.unwrap_or(f64::NAN) * 100.0,
        idle_machine_cores: machine.unwrap_or(f64::NAN),
        tx: empty(),
        block: None,
    };
    match arch {
        Arch::PeerToPeer => {
            // Arrivals per message id, per topic; copies per topic.
            let mut arrivals: HashMap<String, (Topic, Vec<u64>)> = HashMap::new();
            let (mut tx_copies, mut block_copies) = (0.0, 0.0);
            for u in 0..n {
                for a in bed.node(u).gossip_recent().await? {
                    arrivals
                        .entry(a.id)
                        .or_insert((a.topic, vec![]))
                        .1
                        .push(a.at_us);
                }
                let m = bed.node(u).metrics().await?;
                tx_copies += received_copies(&m, "/tx/1");
                block_copies += received_copies(&m, "/block/1");
            }
            let of = |topic: Topic| {
                arrivals
                    .iter()
                    .filter(|(_, (t, _))| *t == topic)
                    .map(|(id, (_, times))| {
                        // A transfer's clock starts at its submission; a block's at its miner.
                        let start = origin
                            .get(id)
                            .copied()
                            .unwrap_or_else(|| times.iter().copied().min().unwrap_or(0));
                        (start, times.clone())
                    })
                    .collect::<Vec<_>>()
            };
            r.tx = figures(&of(Topic::Tx), n, tx_copies, n - 1);
            r.block = Some(figures(&of(Topic::Block), n, block_copies, n - 1));
        }
        Arch::ClientServer => {
            let mut per: HashMap<String, Vec<u64>> = HashMap::new();
            let mut received = 0.0;
            for (_, id, at) in bed.watched() {
                if origin.contains_key(&id) {
                    received += 1.0;
                    per.entry(id).or_default().push(at);
                }
            }
            let msgs: Vec<(u64, Vec<u64>)> = per
                .into_iter()
                .map(|(id, times)| (origin[&id], times))
                .collect();
            r.tx = figures(&msgs, n, received, n);
        }
    }
    Ok(r)
}

/// Whether every user has every transfer of `origin` (peer to peer: in its gossip record,
/// and its chain at `height`; client-server: each client received it from the server's log).
async fn arrived_everywhere(bed: &Bed, origin: &HashMap<String, u64>, height: u64) -> Result<bool> {
    let n = bed.users();
    match bed.arch {
        Arch::PeerToPeer => {
            for u in 0..n {
                let node = bed.node(u);
                if node.chain().await?.height < height {
                    return Ok(false);
                }
                let seen: std::collections::HashSet<String> = node
                    .gossip_recent()
                    .await?
                    .into_iter()
                    .map(|a| a.id)
                    .collect();
                if origin.keys().any(|id| !seen.contains(id)) {
                    return Ok(false);
                }
            }
            Ok(true)
        }
        Arch::ClientServer => {
            let mut got: HashMap<String, std::collections::HashSet<usize>> = HashMap::new();
            for (client, id, _) in bed.watched() {
                got.entry(id).or_default().insert(client);
            }
            Ok(origin
                .keys()
                .all(|id| got.get(id).map_or(0, |c| c.len()) >= n))
        }
    }
}

fn empty() -> Figures {
    figures(&[], 1, 0.0, 1)
}

/// Figures over messages given as (start µs, arrival µs at each receiver that got it).
/// `everyone` receivers make "reached all"; `copies` over messages × `per` receivers.
fn figures(msgs: &[(u64, Vec<u64>)], everyone: usize, copies: f64, per: usize) -> Figures {
    let mut all = vec![];
    let mut deliveries = vec![];
    let mut reached_all = 0;
    for (start, times) in msgs {
        let ms = |t: &u64| t.saturating_sub(*start) as f64 / 1000.0;
        if times.len() >= everyone {
            reached_all += 1;
        }
        all.push(times.iter().map(ms).fold(0.0, f64::max));
        deliveries.extend(times.iter().filter(|t| **t != *start).map(ms));
    }
    let (all_p50_ms, all_p99_ms) = p50_p99(all);
    let (delivery_p50_ms, delivery_p99_ms) = p50_p99(deliveries);
    Figures {
        messages: msgs.len(),
        reached_all,
        all_p50_ms,
        all_p99_ms,
        delivery_p50_ms,
        delivery_p99_ms,
        copies_per_node: copies / (msgs.len().max(1) * per.max(1)) as f64,
    }
}

/// Sums gossipsub's "received, duplicates included" counter for the topic ending in `suffix`.
fn received_copies(metrics: &str, suffix: &str) -> f64 {
    crate::harness::metric_sum(
        metrics,
        "gossipsub_topic_msg_recv_counts_unfiltered_total",
        &[suffix],
    )
}

fn outputs(r: &PropagationReport) -> Result<Outputs> {
    use std::fmt::Write;
    let mut md = String::new();
    writeln!(
        md,
        "# Propagation through {} nodes (clients) ({} runner)\n",
        r.nodes, r.runner
    )?;
    writeln!(
        md,
        "| architecture | message | count | reached all | to all p50 / p99 | one delivery p50 / p99 | copies per receiver |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|")?;
    let mut row = |a: &ArchPropagation, what: &str, f: &Figures| {
        writeln!(
            md,
            "| {} | {what} | {} | {} | {:.0} / {:.0} ms | {:.0} / {:.0} ms | {:.2} |",
            a.arch,
            f.messages,
            f.reached_all,
            f.all_p50_ms,
            f.all_p99_ms,
            f.delivery_p50_ms,
            f.delivery_p99_ms,
            f.copies_per_node
        )
    };
    row(&r.client_server, "transfer", &r.client_server.tx)?;
    row(&r.peer_to_peer, "transfer", &r.peer_to_peer.tx)?;
    if let Some(b) = &r.peer_to_peer.block {
        row(&r.peer_to_peer, "block", b)?;
    }
    writeln!(md)?;
    for a in [&r.client_server, &r.peer_to_peer] {
        writeln!(
            md,
            "{}: set up in {:.1} s{}, torn down in {:.1} s; settled, the runner used {:.1} % of a core and the machine {:.2} cores.",
            a.arch,
            a.setup_secs,
            a.hosts_setup_secs
                .map_or(String::new(), |h| format!(" (the hosts alone {h:.1} s)")),
            a.teardown_secs,
            a.idle_runner_cpu_pct,
            a.idle_machine_cores
        )?;
    }
    let mut cats = vec![
        "transfer, client-server".to_string(),
        "transfer, P2P".into(),
    ];
    let mut p50 = vec![r.client_server.tx.all_p50_ms, r.peer_to_peer.tx.all_p50_ms];
    let mut p99 = vec![r.client_server.tx.all_p99_ms, r.peer_to_peer.tx.all_p99_ms];
    if let Some(b) = &r.peer_to_peer.block {
        cats.push("block, P2P".into());
        p50.push(b.all_p50_ms);
        p99.push(b.all_p99_ms);
    }
    let svg = crate::svg::bar_chart(
        &format!("Time until every one of {} has it", r.nodes),
        "ms",
        &cats,
        &[("p50".into(), p50), ("p99".into(), p99)],
    );
    writeln!(md, "\n![propagation](propagation.svg)")?;
    Ok(Outputs {
        json: serde_json::to_value(r)?,
        markdown: md,
        svgs: vec![("propagation.svg".into(), svg)],
    })
}

#[cfg(test)]
mod tests {
    use super::figures;

    #[test]
    fn figures_time_each_message_from_its_start_to_its_last_receiver() {
        // Two messages to three receivers: one reaches all, one misses a receiver.
        let msgs = vec![
            (1_000, vec![1_000, 3_000, 5_000]),
            (10_000, vec![11_000, 12_000]),
        ];
        let f = figures(&msgs, 3, 12.0, 2);
        assert_eq!(f.messages, 2);
        assert_eq!(f.reached_all, 1);
        // To all: 4 ms and 2 ms; deliveries other than at the start: 2, 4, 1, 2 ms.
        assert_eq!((f.all_p50_ms, f.all_p99_ms), (4.0, 4.0));
        assert_eq!(f.delivery_p50_ms, 2.0);
        assert_eq!(
            f.copies_per_node, 3.0,
            "12 copies over 2 messages x 2 receivers"
        );
    }
}
