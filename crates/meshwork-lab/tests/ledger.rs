//! The replicated ledger end to end: real nodes in one process over loopback TCP, gossiping
//! transactions and blocks, syncing, forking under a partition and healing.
//!
//! Networks are named `test-*`, so they run the `test` chain spec: difficulty 1, and miners
//! paced by the lab (see `MinerConfig::pace`) instead of by hashing.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use libp2p::identity::Keypair;
use meshwork_lab::harness::{lab_config, metric_sum, wait_for, Harness, HarnessBuilder, Topology};
use meshwork_ledger::spec::DEV_FAUCET_SECRET;
use meshwork_ledger::{Address, ChainSpec, Hash, Ledger, SignedTransfer, TxStatus, Wallet};
use meshwork_node::ledger_service::{MinerConfig, Topic};
use meshwork_node::NodeHandle;
use meshwork_proto::NetworkName;

fn faucet() -> Wallet {
    Wallet::from_secret(&DEV_FAUCET_SECRET)
}

fn miner(address: Address, pace_ms: u64) -> Option<MinerConfig> {
    Some(MinerConfig {
        address,
        pace: Some(Duration::from_millis(pace_ms)),
    })
}

async fn chain_id(h: &NodeHandle) -> Result<Hash> {
    Ok(h.ledger(|l| l.chain().chain_id()).await?)
}

async fn status(h: &NodeHandle, id: Hash) -> Result<TxStatus> {
    Ok(h.ledger(move |l| l.tx_status(&id)).await??)
}

async fn tip(h: &NodeHandle) -> Result<(u64, Hash)> {
    Ok(h.ledger(|l| (l.tip().height, l.tip().hash)).await?)
}

/// Signs a transfer with the sender's next nonce as `via` sees it, and submits it there.
async fn send(via: &NodeHandle, from: &Wallet, to: Address, amount: u64) -> Result<SignedTransfer> {
    let addr = from.address();
    let (_, nonce) = via.ledger(move |l| l.account(&addr)).await??;
    let t = from.transfer(chain_id(via).await?, to, amount, 2, nonce);
    via.submit(t).await??;
    Ok(t)
}

/// Waits until every node's gossipsub mesh holds at least `min` peers on both topics (the
/// `gossipsub_mesh_peer_counts` gauge): a message published before a peer joins its neighbour's
/// mesh reaches that peer only if gossip happens to advertise it.
async fn meshed(h: &Harness, min: usize) -> Result<()> {
    wait_for(
        "every node's meshes formed",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            for (_, n) in h.running_nodes() {
                // Gauges per topic and per kind of peer (with partial-message support or
                // not): a topic's mesh is their sum. Both topics (tx and block) need `min`.
                let text = n.handle.encode_metrics();
                for topic in ["tx", "block"] {
                    let label = format!("topic_hash=\"{}\"", n.handle.network.protocol(topic, 1));
                    if metric_sum(&text, "gossipsub_mesh_peer_counts{", &[&label]) < min as f64 {
                        return Ok(false);
                    }
                }
            }
            Ok(true)
        },
    )
    .await?;
    Ok(())
}

async fn all_confirmed(h: &Harness, ids: &[Hash]) -> Result<bool> {
    for (_, n) in h.running_nodes() {
        for id in ids {
            if !matches!(status(&n.handle, *id).await?, TxStatus::Confirmed { .. }) {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

async fn same_tip(h: &Harness) -> Result<Option<(u64, Hash)>> {
    let mut tips = HashSet::new();
    for (_, n) in h.running_nodes() {
        tips.insert(tip(&n.handle).await?);
    }
    Ok((tips.len() == 1).then(|| tips.into_iter().next().expect("one")))
}

/// A line A–B–C (A and C may not connect directly): a transaction with a bad signature
/// published by A is rejected by B, never reaches C, and costs A score on B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_transactions_stop_at_the_first_hop() -> Result<()> {
    common::init_logs();
    let h = HarnessBuilder::new("test-vbf")?
        .topology(Topology::Chain)
        .spawn(3)
        .await?;
    h.partition(&[vec![0], vec![2]]).await?; // A and C refuse each other; B talks to both
    meshed(&h, 1).await?;
    let (a, b, c) = (
        &h.running(0)?.handle,
        &h.running(1)?.handle,
        &h.running(2)?.handle,
    );
    // First a valid transfer, to know the path A → B → C works.
    let good = send(a, &faucet(), Wallet::generate().address(), 10).await?;
    wait_for(
        "the valid transfer in C's mempool",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async { Ok(status(c, good.id()).await? == TxStatus::Pending) },
    )
    .await?;
    let c_seen_before = metric_sum(&c.encode_metrics(), "meshwork_gossip_messages_total", &[]);
    ensure!(c_seen_before == 1.0, "C validated {c_seen_before} messages");

    // Now a forged one: a real transfer with one bit of its signature flipped.
    let mut bad = faucet().transfer(chain_id(a).await?, Wallet::generate().address(), 10, 2, 1);
    bad.signature[7] ^= 0x10;
    a.inject_gossip(Topic::Tx, bad.encode()).await?;
    let a_id = h.running(0)?.peer_id();
    wait_for(
        "B to reject it",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async {
            let text = b.encode_metrics();
            Ok(text
                .lines()
                .any(|l| l.contains("gossip_messages_total") && l.contains("reject")))
        },
    )
    .await?;
    let score = b.gossip_score(a_id).await?.unwrap_or(0.0);
    ensure!(score < 0.0, "B's gossipsub score of A is {score}");
    let points = b
        .peers()
        .await?
        .into_iter()
        .find(|p| p.peer_id == a_id.to_string())
        .map(|p| p.misbehaviour)
        .unwrap_or(0.0);
    ensure!(points > 0.0, "B holds no misbehaviour points against A");
    // A valid canary, published by B after it judged the forged one: B's messages to C go
    // in order on one stream, so once C holds the canary, a copy of the forged one that B
    // relayed would have arrived before it. (Not from A: B no longer listens to A, whose
    // gossipsub score went below the graylist threshold with the forged message.) It takes
    // the nonce the forged one claimed; the first transfer holds the one before.
    let canary = faucet().transfer(chain_id(a).await?, Wallet::generate().address(), 11, 2, 1);
    b.submit(canary).await??;
    wait_for(
        "the canary in C's mempool",
        Duration::from_secs(30),
        Duration::from_millis(50),
        || async { Ok(status(c, canary.id()).await? == TxStatus::Pending) },
    )
    .await?;
    let c_seen = metric_sum(&c.encode_metrics(), "meshwork_gossip_messages_total", &[]);
    ensure!(
        c_seen == c_seen_before + 1.0,
        "C validated {c_seen} messages: the first transfer and the canary are {}",
        c_seen_before + 1.0
    );
    ensure!(status(c, bad.id()).await? == TxStatus::Unknown);
    h.shutdown().await;
    Ok(())
}

/// 20 nodes, one miner: a transfer submitted to one node reaches every mempool, then a block
/// on every node, and all nodes end on the same tip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_nodes_agree_on_a_mined_transfer() -> Result<()> {
    common::init_logs();
    let n = 20;
    let h = HarnessBuilder::new("test-twenty")?
        .topology(Topology::Random { degree: 2, seed: 7 })
        .spawn(n)
        .await?;
    meshed(&h, 2).await?;
    let recipient = Wallet::generate().address();
    let t = send(&h.running(n - 1)?.handle, &faucet(), recipient, 1234).await?;
    let started = Instant::now();
    wait_for(
        "the transfer in all 20 mempools",
        Duration::from_secs(60),
        Duration::from_millis(50),
        || async {
            for (_, node) in h.running_nodes() {
                if status(&node.handle, t.id()).await? != TxStatus::Pending {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )
    .await?;
    let spread = started.elapsed();
    h.running(0)?
        .handle
        .set_mining(miner(Wallet::generate().address(), 500))
        .await?;
    wait_for(
        "the transfer confirmed on all 20 nodes, one tip",
        Duration::from_secs(90),
        Duration::from_millis(200),
        || async { Ok(all_confirmed(&h, &[t.id()]).await? && same_tip(&h).await?.is_some()) },
    )
    .await?;
    for (_, node) in h.running_nodes() {
        let bal = node
            .handle
            .ledger(move |l| l.chain().account(&recipient).map(|a| a.balance))
            .await??;
        ensure!(bal == 1234, "balance {bal}");
    }
    println!("transfer in every mempool after {spread:?}");
    h.shutdown().await;
    Ok(())
}

/// 10 nodes split 5/5 with a miner in each half: both halves grow their own chain; after the
/// partition heals every node is on the most-work chain and every transfer made in either half
/// is confirmed on it: none is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_forks_and_heals_without_losing_transfers() -> Result<()> {
    common::init_logs();
    let h = HarnessBuilder::new("test-partition")?
        .topology(Topology::Random { degree: 3, seed: 3 })
        .spawn(10)
        .await?;
    let (left, right): (Vec<usize>, Vec<usize>) = ((0..5).collect(), (5..10).collect());
    let node = |i: usize| h.running(i).map(|n| n.handle.clone());

    // Fund one sender per half before the split, so the halves spend different accounts.
    let (wa, wb) = (Wallet::generate(), Wallet::generate());
    let fa = send(&node(0)?, &faucet(), wa.address(), 1_000_000).await?;
    let fb = send(&node(0)?, &faucet(), wb.address(), 1_000_000).await?;
    node(0)?
        .set_mining(miner(Wallet::generate().address(), 300))
        .await?;
    wait_for(
        "funding confirmed everywhere",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || async { all_confirmed(&h, &[fa.id(), fb.id()]).await },
    )
    .await?;
    node(0)?.set_mining(None).await?;

    h.partition(&[left.clone(), right.clone()]).await?;
    wait_for(
        "no connection across the partition",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async {
            for i in 0..10 {
                let other: HashSet<String> = (if i < 5 { &right } else { &left })
                    .iter()
                    .map(|j| h.running(*j).map(|n| n.peer_id().to_string()))
                    .collect::<Result<_>>()?;
                if node(i)?
                    .peers()
                    .await?
                    .iter()
                    .any(|p| other.contains(&p.peer_id))
                {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )
    .await?;
    let (_, split_tip) = tip(&node(0)?).await?;

    // Each half mines (the right half faster, so it has more work) and spends.
    node(0)?
        .set_mining(miner(Wallet::generate().address(), 900))
        .await?;
    node(5)?
        .set_mining(miner(Wallet::generate().address(), 400))
        .await?;
    let mut spent = vec![];
    for k in 0..3 {
        spent.push(
            send(
                &node(1 + k)?,
                &wa,
                Wallet::generate().address(),
                100 + k as u64,
            )
            .await?,
        );
        spent.push(
            send(
                &node(6 + k)?,
                &wb,
                Wallet::generate().address(),
                200 + k as u64,
            )
            .await?,
        );
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let confirmed_in = |group: Vec<usize>, ids: Vec<Hash>| {
        let h = &h;
        async move {
            for i in group {
                for id in &ids {
                    let s = status(&h.running(i)?.handle, *id).await?;
                    if !matches!(s, TxStatus::Confirmed { .. }) {
                        return Ok::<bool, anyhow::Error>(false);
                    }
                }
            }
            Ok(true)
        }
    };
    let left_ids: Vec<Hash> = spent.iter().step_by(2).map(|t| t.id()).collect();
    let right_ids: Vec<Hash> = spent.iter().skip(1).step_by(2).map(|t| t.id()).collect();
    wait_for(
        "each half confirms its own transfers",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || async {
            Ok(confirmed_in(left.clone(), left_ids.clone()).await?
                && confirmed_in(right.clone(), right_ids.clone()).await?)
        },
    )
    .await?;
    // The fork: two different chains past the split point.
    let (lh, ltip) = tip(&node(0)?).await?;
    let (rh, rtip) = tip(&node(5)?).await?;
    ensure!(
        ltip != rtip && ltip != split_tip && rtip != split_tip,
        "no fork"
    );
    ensure!(
        status(&node(0)?, right_ids[0]).await? == TxStatus::Unknown,
        "the left half must not know the right half's transfers yet"
    );
    println!("fork: left at height {lh}, right at height {rh}");

    h.heal().await?;
    let healed = Instant::now();
    let all: Vec<Hash> = spent.iter().map(|t| t.id()).collect();
    wait_for(
        "one tip everywhere and every transfer of both halves confirmed",
        Duration::from_secs(120),
        Duration::from_millis(250),
        || async { Ok(all_confirmed(&h, &all).await? && same_tip(&h).await?.is_some()) },
    )
    .await?;
    println!("healed and converged in {:?}", healed.elapsed());
    // One of the two branch tips lost: it is no longer on anyone's main chain.
    let on_main = |hash: Hash| {
        let n0 = node(0);
        async move { Ok::<bool, anyhow::Error>(n0?.ledger(move |l| l.chain().on_main(&hash)).await?) }
    };
    ensure!(
        !(on_main(ltip).await? && on_main(rtip).await?),
        "both branch tips on the main chain"
    );
    for (i, n) in h.running_nodes() {
        n.handle
            .ledger(|l| l.chain().verify_consistency())
            .await?
            .map_err(|e| anyhow::anyhow!("node {i}: {e}"))?;
    }
    h.shutdown().await;
    Ok(())
}

/// A node started empty next to a node holding 500 blocks syncs all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_node_syncs_a_500_block_chain() -> Result<()> {
    common::init_logs();
    let network = NetworkName::new("test-sync500")?;
    let spec = ChainSpec::for_network("test-sync500");
    let dir = tempfile::tempdir()?;
    // Build the chain offline into node A's store, with transfers in many blocks.
    let (height, tip_hash) = {
        let mut ledger = Ledger::open(&dir.path().join("chain.redb"), spec.clone())?;
        let f = faucet();
        let chain = ledger.chain().chain_id();
        let miner = Wallet::generate().address();
        let mut now = spec.genesis_timestamp;
        for i in 0..500u64 {
            if i % 5 == 0 {
                for k in 0..4 {
                    let nonce = ledger.account(&f.address())?.1;
                    ledger.submit(f.transfer(chain, miner, 1 + k, 1, nonce))?;
                }
            }
            now += 1000;
            let b = ledger.template(miner, now)?;
            ledger.import(b, now)?;
        }
        (ledger.tip().height, ledger.tip().hash)
    };
    ensure!(height == 500);
    let mut a_cfg = lab_config(&network, 0, Keypair::generate_ed25519());
    a_cfg.data_dir = Some(dir.path().to_owned());
    let a = meshwork_node::start(a_cfg).await?;
    let mut b_cfg = lab_config(&network, 1, Keypair::generate_ed25519());
    b_cfg.bootstrap = vec![a.dial_addr()];
    let started = Instant::now();
    let b = meshwork_node::start(b_cfg).await?;
    wait_for(
        "B at A's tip",
        Duration::from_secs(120),
        Duration::from_millis(100),
        || async { Ok(tip(&b.handle).await? == (500, tip_hash)) },
    )
    .await?;
    println!("500 blocks synced in {:?}", started.elapsed());
    b.handle
        .ledger(|l| l.chain().verify_consistency())
        .await?
        .map_err(anyhow::Error::msg)?;
    let blocks = b.handle.ledger(|l| l.chain().block_count()).await?;
    if blocks != 501 {
        bail!("B holds {blocks} blocks");
    }
    b.shutdown().await;
    a.shutdown().await;
    Ok(())
}
