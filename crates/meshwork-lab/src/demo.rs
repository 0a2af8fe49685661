//! The demonstration network (the README's first command): nodes that each know only the
//! previous one find each other through peer exchange and the DHT. It prints how long that
//! took, each node's degree, and how each node learned the peers it knows. Then a transfer
//! created on one node spreads to every mempool, is mined with real proof of work, and shows in
//! every node's ledger.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use anyhow::Result;
use meshwork_node::addrbook::Via;

use crate::harness::{loopback_ip, wait_for, HarnessBuilder, Topology};

#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub nodes: usize,
    pub topology: Topology,
    pub timeout: Duration,
    /// How long to let the network settle after convergence before measuring idle CPU: right
    /// after convergence the first DHT bootstraps and feelers are still running.
    pub settle: Duration,
    /// How long to measure idle CPU (zero skips it).
    pub idle_window: Duration,
    /// Run the nodes with the production timers instead of the lab's fast ones.
    pub production_timers: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            nodes: 20,
            topology: Topology::Chain,
            timeout: Duration::from_secs(120),
            settle: Duration::from_secs(5),
            idle_window: Duration::from_secs(3),
            production_timers: false,
        }
    }
}

/// Runs the demo, writing the story to `out`.
pub async fn run(opts: DemoOptions, out: &mut (impl Write + Send)) -> Result<()> {
    let n = opts.nodes.max(2);
    // The convergence criterion of the test suite: at least 6 connections and 30 known peers
    // per node (fewer in networks too small for that).
    let degree_goal = 6.min(n - 1);
    let known_goal = 30.min(n - 1);
    writeln!(out, "Starting {n} Meshwork nodes on loopback ({:?} bootstrap: each node knows only the one before it).", opts.topology)?;
    writeln!(
        out,
        "Node i listens on 127.(i+1).0.1, so every node is in its own address group.\n"
    )?;
    let production = opts.production_timers;
    let h = HarnessBuilder::new("demo")?
        .topology(opts.topology)
        .tweak(move |_, cfg| {
            if production {
                cfg.timings = meshwork_node::config::Timings::default();
            }
        })
        .spawn(n)
        .await?;
    let timers = if production {
        "production timers"
    } else {
        "lab timers"
    };
    writeln!(out, "All {n} nodes are up. Waiting until every node has >= {degree_goal} connections and knows >= {known_goal} peers...")?;
    let took = wait_for(
        "the demo network to converge",
        opts.timeout,
        Duration::from_millis(100),
        || async {
            for (_, node) in h.running_nodes() {
                let s = node.handle.status().await?;
                let conns = s.connections.inbound + s.connections.outbound + s.connections.other;
                if conns < degree_goal || s.address_book.new + s.address_book.tried < known_goal {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )
    .await?;
    writeln!(out, "Converged in {:.2} s.\n", took.as_secs_f64())?;

    writeln!(
        out,
        "{:>4}  {:<13} {:>4} {:>4} {:>4}  {:>5} {:>5}   {:<40}",
        "node", "address", "in", "out", "oth", "new", "tried", "known peers learned via"
    )?;
    let mut totals: BTreeMap<Via, usize> = BTreeMap::new();
    for (i, node) in h.running_nodes() {
        let s = node.handle.status().await?;
        let book = node.handle.addrbook().await?;
        let mut via: BTreeMap<Via, usize> = BTreeMap::new();
        for e in &book {
            *via.entry(e.via).or_default() += 1;
            *totals.entry(e.via).or_default() += 1;
        }
        let via_text = via
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ");
        writeln!(
            out,
            "{i:>4}  {:<13} {:>4} {:>4} {:>4}  {:>5} {:>5}   {via_text}",
            loopback_ip(i).to_string(),
            s.connections.inbound,
            s.connections.outbound,
            s.connections.other,
            s.address_book.new,
            s.address_book.tried,
        )?;
    }
    let total: usize = totals.values().sum();
    writeln!(
        out,
        "\nHow the {total} address-book entries across all nodes were first learned:"
    )?;
    for (k, v) in &totals {
        writeln!(
            out,
            "  {k:<10} {v:>6}  ({:.0}%)",
            100.0 * *v as f64 / total.max(1) as f64
        )?;
    }

    if let Some(rss) = crate::resources::rss_bytes() {
        writeln!(
            out,
            "\nMemory: {:.1} MiB resident for {n} nodes, {:.0} KiB per node (RSS / N, runtime included).",
            rss as f64 / (1024.0 * 1024.0),
            rss as f64 / 1024.0 / n as f64
        )?;
    }
    if !opts.idle_window.is_zero() {
        tokio::time::sleep(opts.settle).await;
        if let Some(share) = crate::resources::cpu_share_over(opts.idle_window).await {
            writeln!(
                out,
                "Idle CPU over {} s, {} s after convergence ({timers}): {:.1}% of one core for {n} nodes, {:.3}% per node.",
                opts.idle_window.as_secs(),
                opts.settle.as_secs(),
                share * 100.0,
                share * 100.0 / n as f64
            )?;
        }
    }

    // A Kademlia lookup of the last node's id from the first: the DHT routes to it.
    let first = h.running(0)?;
    let last = h.running(n - 1)?;
    let started = tokio::time::Instant::now();
    let found = first.handle.find_peer(last.peer_id()).await?;
    writeln!(
        out,
        "\nDHT lookup of node {} from node 0: {} in {:.0} ms.",
        n - 1,
        if found.first() == Some(&last.peer_id()) {
            "found"
        } else {
            "NOT found"
        },
        started.elapsed().as_secs_f64() * 1000.0
    )?;
    ledger_story(&h, out).await?;
    content_story(&h, out).await?;
    h.shutdown().await;
    writeln!(out, "All nodes stopped.")?;
    comparison(out).await?;
    Ok(())
}

/// Short, in-process versions of the scenarios, then the comparison table that `meshwork lab
/// report` builds from them. Each scenario's own table is printed as it finishes.
async fn comparison(out: &mut (impl Write + Send)) -> Result<()> {
    use crate::scenario::RunnerKind::Inproc;
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    writeln!(
        out,
        "\nClient-server against peer to peer, short versions in this process (`meshwork lab run SCENARIO` runs each with real processes and kernel links):"
    )?;
    let started = std::time::Instant::now();

    let mut o = crate::distribution::DistOptions::new(Inproc, d);
    o.ns = vec![1, 2, 4];
    o.file_mib = 8;
    o.upload_mbps = 40.0;
    // Past the demo network's addresses: a node on an address whose previous node has just
    // stopped can meet that node's dying connections.
    o.first_index = 30;
    writeln!(
        out,
        "\n1. distribution: 8 MiB to N = 1, 2, 4 downloaders, every upload capped at 40 Mbit/s..."
    )?;
    let r = crate::distribution::run(o).await?.1;
    show(out, d, "distribution", &r)?;

    let mut o = crate::propagation::PropagationOptions::new(Inproc, d);
    o.common.users = 20;
    o.txs = 10;
    o.blocks = 3;
    o.settle = Duration::from_secs(2);
    o.common.first_index = 60;
    writeln!(out, "2. propagation: 10 transfers and 3 blocks through 20 nodes, and to 20 clients of the server...")?;
    let r = crate::propagation::run(o).await?.1;
    show(out, d, "propagation", &r)?;

    let mut o = crate::failure::FailureOptions::new(Inproc, d);
    o.common.users = 6;
    o.file_mib = 4;
    o.window = Duration::from_secs(4);
    o.common.first_index = 110;
    writeln!(
        out,
        "3. failure: the server crashes half way through 6 downloads, or 3 of 6 peers do..."
    )?;
    let r = crate::failure::run(o).await?.1;
    show(out, d, "failure", &r)?;

    let mut o = crate::partition::PartitionOptions::new(Inproc, d);
    o.common.users = 6;
    o.duration = Duration::from_secs(8);
    o.settle = Duration::from_secs(2);
    o.common.first_index = 130;
    writeln!(out, "4. partition: 6 users split in two halves for 8 s...")?;
    let r = crate::partition::run(o).await?.1;
    show(out, d, "partition", &r)?;

    let mut o = crate::sybil::SybilOptions::new(Inproc, d);
    o.honest = 30;
    o.flood = 2000;
    o.restarts = 2;
    o.common.users = 6;
    o.common.first_index = 150;
    writeln!(out, "5. sybil: 2000 addresses from one /16 against a node that knows 30 honest peers; one account refused by the operator, or by half the nodes...")?;
    let r = crate::sybil::run(o).await?.1;
    show(out, d, "sybil", &r)?;

    let report = crate::report::build(&[d.to_path_buf()])?;
    writeln!(
        out,
        "The comparison, {:.0} s of measurements (cells not measured here name the scenario that measures them):\n",
        started.elapsed().as_secs_f64()
    )?;
    let md: String = report
        .markdown()
        .lines()
        .map(|l| {
            // Drop the last column (links into a temporary directory).
            let cells: Vec<&str> = l.split('|').collect();
            cells[..cells.len().saturating_sub(2)].join("|") + "|\n"
        })
        .collect();
    writeln!(out, "{md}")?;
    Ok(())
}

/// Writes a scenario's results where the report finds them, and prints its tables.
fn show(
    out: &mut (impl Write + Send),
    dir: &std::path::Path,
    name: &str,
    r: &crate::scenario::Outputs,
) -> Result<()> {
    r.write(dir, name)?;
    let tables: String = r
        .markdown
        .lines()
        .filter(|l| l.starts_with('|'))
        .map(|l| format!("   {l}\n"))
        .collect();
    writeln!(out, "{tables}")?;
    Ok(())
}

/// A transfer created on the last node spreads to every mempool, node 0 mines it with real
/// proof of work (the `dev` spec), and every node's ledger shows the new balance.
async fn ledger_story(h: &crate::harness::Harness, out: &mut (impl Write + Send)) -> Result<()> {
    use meshwork_ledger::{TxStatus, Wallet};
    let n = h.len();
    let last = &h.running(n - 1)?.handle;
    let miner_node = &h.running(0)?.handle;
    let (chain_id, difficulty) = last
        .ledger(|l| {
            let tip = l.tip().hash;
            (l.chain().chain_id(), l.chain().expected_difficulty(&tip))
        })
        .await?;
    let faucet = Wallet::from_secret(&meshwork_ledger::spec::DEV_FAUCET_SECRET);
    let bob = Wallet::generate();
    let fa = faucet.address();
    let (_, nonce) = last.ledger(move |l| l.account(&fa)).await??;
    let t = faucet.transfer(chain_id, bob.address(), 1_000, 5, nonce);
    writeln!(
        out,
        "
Ledger: node {} signs a transfer of 1000 from the dev faucet to a new account {}...",
        n - 1,
        &bob.address().to_string()[..16]
    )?;
    let started = tokio::time::Instant::now();
    last.submit(t)
        .await?
        .map_err(|e| anyhow::anyhow!("transfer refused: {e}"))?;
    let id = t.id();
    let spread = wait_for(
        "the transfer in every mempool",
        Duration::from_secs(30),
        Duration::from_millis(10),
        || async {
            for (_, node) in h.running_nodes() {
                let s = node.handle.ledger(move |l| l.tx_status(&id)).await??;
                if s != TxStatus::Pending {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )
    .await?;
    writeln!(
        out,
        "  verified and forwarded by every node: in all {n} mempools after {:.0} ms (transaction {}).",
        spread.as_secs_f64() * 1000.0,
        id.short()
    )?;
    writeln!(
        out,
        "  node 0 starts mining (real proof of work: about {difficulty} BLAKE3 hashes per block)..."
    )?;
    miner_node
        .set_mining(Some(meshwork_node::ledger_service::MinerConfig {
            address: Wallet::generate().address(),
            pace: None,
        }))
        .await?;
    let mining_from = tokio::time::Instant::now();
    wait_for(
        "the transfer confirmed on every node",
        Duration::from_secs(120),
        Duration::from_millis(20),
        || async {
            for (_, node) in h.running_nodes() {
                let s = node.handle.ledger(move |l| l.tx_status(&id)).await??;
                if !matches!(s, TxStatus::Confirmed { .. }) {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )
    .await?;
    miner_node.set_mining(None).await?;
    let (height, block) = match miner_node.ledger(move |l| l.tx_status(&id)).await?? {
        TxStatus::Confirmed { height, block, .. } => (height, block),
        other => anyhow::bail!("unexpected status {other:?}"),
    };
    writeln!(
        out,
        "  mined into block {} at height {height} and confirmed on all {n} nodes {:.1} s after mining began ({:.1} s after it was signed).",
        block.short(),
        mining_from.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    )?;
    let bob_addr = bob.address();
    let mut balances = vec![];
    for (_, node) in h.running_nodes() {
        balances.push(
            node.handle
                .ledger(move |l| l.chain().account(&bob_addr).map(|a| a.balance))
                .await??,
        );
    }
    let agree = balances.iter().all(|b| *b == 1_000);
    writeln!(
        out,
        "  the new account's balance on each node: {:?}{}",
        balances,
        if agree { " (all agree)" } else { " (DISAGREE)" }
    )?;
    Ok(())
}

/// Node 0 shares a file with super-seeding; every other node fetches it from the ticket.
/// Pieces spread peer to peer: the seeder uploads about one copy while everyone ends with a
/// verified file.
async fn content_story(h: &crate::harness::Harness, out: &mut (impl Write + Send)) -> Result<()> {
    use meshwork_node::content::{FetchRequest, ShareRequest, State};
    use rand::{RngCore, SeedableRng};
    let n = h.len();
    let size: usize = 8 << 20;
    let dir = tempfile::tempdir()?;
    let origin = dir.path().join("demo-file.bin");
    let mut bytes = vec![0u8; size];
    rand::rngs::StdRng::seed_from_u64(1).fill_bytes(&mut bytes);
    std::fs::write(&origin, &bytes)?;
    let seeder = &h.running(0)?.handle;
    let shared = seeder
        .content
        .share(ShareRequest {
            path: origin.clone(),
            super_seed: true,
            tracker: None,
            piece_size: Some(64 << 10),
        })
        .await?;
    writeln!(
        out,
        "\nContent: node 0 shares an {} MiB file ({} pieces, content id {}...) with super-seeding;\n  the other {} nodes fetch it from its ticket.",
        size >> 20,
        shared.pieces.unwrap_or(0),
        &shared.id[..16],
        n - 1
    )?;
    let started = tokio::time::Instant::now();
    for i in 1..n {
        h.running(i)?
            .handle
            .content
            .fetch(FetchRequest {
                target: shared.ticket.clone(),
                out: Some(dir.path().join(format!("copy-{i}.bin"))),
                tracker: None,
            })
            .await?;
    }
    let id: meshwork_swarm::ContentId = shared.id.parse()?;
    wait_for(
        "every node with the file",
        Duration::from_secs(300),
        Duration::from_millis(50),
        || async {
            for i in 1..n {
                let c = h.running(i)?.handle.content.get(id).await?;
                if !c.is_some_and(|c| c.state == State::Seeding) {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )
    .await?;
    let took = started.elapsed().as_secs_f64();
    let mut identical = 0;
    let mut uploaded_by_peers = 0u64;
    for i in 1..n {
        if std::fs::read(dir.path().join(format!("copy-{i}.bin")))? == bytes {
            identical += 1;
        }
        if let Some(c) = h.running(i)?.handle.content.get(id).await? {
            uploaded_by_peers += c.uploaded;
        }
    }
    let up = seeder.content.get(id).await?.map_or(0, |c| c.uploaded);
    writeln!(
        out,
        "  all {} nodes hold a verified, byte-identical copy after {took:.1} s ({identical} identical).\n  the seeder uploaded {:.2} copies; the other peers uploaded {:.1} copies to each other.",
        n - 1,
        up as f64 / size as f64,
        uploaded_by_peers as f64 / size as f64
    )?;
    Ok(())
}
