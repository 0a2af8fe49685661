//! Issue 13, case 9: a transfer confirmed on a branch that loses a reorganization is not
//! lost. Node A mines alone (partitioned away); miner B and node C confirm a transfer sent
//! through C in B's blocks; B stops; A and B connect. B and C put the transfer back in their
//! mempools, and announce it again until A, which never saw it, mines it.
//!
//! In miniature and on lab timers: re-announcement after 1 s (doubling to 4 s), gossipsub's
//! seen TTL 500 ms, blocks every few tens of ms while the branches grow.

mod common;

use std::time::Duration;

use anyhow::{ensure, Result};
use meshwork_lab::harness::{wait_for, HarnessBuilder, Topology};
use meshwork_ledger::spec::DEV_FAUCET_SECRET;
use meshwork_ledger::{Hash, TxStatus, Wallet};
use meshwork_node::ledger_service::{MinerConfig, RebroadcastConfig};
use meshwork_node::NodeHandle;

fn miner(pace_ms: u64) -> Option<MinerConfig> {
    Some(MinerConfig {
        address: Wallet::generate().address(),
        pace: Some(Duration::from_millis(pace_ms)),
    })
}

async fn height(h: &NodeHandle) -> Result<u64> {
    Ok(h.ledger(|l| l.tip().height).await?)
}

async fn status(h: &NodeHandle, id: Hash) -> Result<TxStatus> {
    Ok(h.ledger(move |l| l.tx_status(&id)).await??)
}

async fn on_main(h: &NodeHandle, block: Hash) -> Result<bool> {
    Ok(h.ledger(move |l| l.chain().on_main(&block)).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_lost_to_a_reorganization_is_announced_again_and_confirmed() -> Result<()> {
    common::init_logs();
    let h = HarnessBuilder::new("test-reorg-rebroadcast")?
        .topology(Topology::Chain) // B knows A, C knows B
        .tweak(|_, cfg| {
            cfg.rebroadcast = RebroadcastConfig {
                round: Duration::from_millis(100),
                initial: Duration::from_secs(1),
                max: Duration::from_secs(4),
            };
            cfg.gossip_seen_ttl = Duration::from_millis(500);
        })
        .spawn(3)
        .await?;
    let (a, b, c) = (
        h.running(0)?.handle.clone(),
        h.running(1)?.handle.clone(),
        h.running(2)?.handle.clone(),
    );
    h.partition(&[vec![0], vec![1, 2]]).await?;
    wait_for(
        "A alone, B and C together",
        Duration::from_secs(20),
        Duration::from_millis(50),
        || async {
            let a_alone = a.peers().await?.is_empty();
            let bc = c
                .peers()
                .await?
                .iter()
                .any(|p| p.peer_id == b.peer_id.to_string());
            Ok(a_alone && bc)
        },
    )
    .await?;

    // A mines alone.
    a.set_mining(miner(20)).await?;
    wait_for(
        "A's branch",
        Duration::from_secs(30),
        Duration::from_millis(20),
        || async { Ok(height(&a).await? >= 12) },
    )
    .await?;
    a.set_mining(None).await?;

    // B mines; a transfer through C is confirmed in B's blocks.
    b.set_mining(miner(40)).await?;
    wait_for(
        "B's branch started",
        Duration::from_secs(30),
        Duration::from_millis(20),
        || async { Ok(height(&c).await? >= 2) },
    )
    .await?;
    let faucet = Wallet::from_secret(&DEV_FAUCET_SECRET);
    let chain_id = c.ledger(|l| l.chain().chain_id()).await?;
    let t = faucet.transfer(chain_id, Wallet::generate().address(), 777, 2, 0);
    c.submit(t).await??;
    wait_for(
        "the transfer confirmed on B and C",
        Duration::from_secs(30),
        Duration::from_millis(20),
        || async {
            for n in [&b, &c] {
                if !matches!(status(n, t.id()).await?, TxStatus::Confirmed { .. }) {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )
    .await?;
    let TxStatus::Confirmed {
        block: lost_block, ..
    } = status(&b, t.id()).await?
    else {
        anyhow::bail!("no longer confirmed on B");
    };
    wait_for(
        "a block on top",
        Duration::from_secs(30),
        Duration::from_millis(20),
        || async { Ok(height(&b).await? >= 4) },
    )
    .await?;
    b.set_mining(None).await?;
    // A's branch must carry more work, so that it wins.
    let b_height = height(&b).await?;
    if height(&a).await? <= b_height + 2 {
        a.set_mining(miner(20)).await?;
        wait_for(
            "A ahead",
            Duration::from_secs(30),
            Duration::from_millis(20),
            || async { Ok(height(&a).await? > b_height + 2) },
        )
        .await?;
    }
    ensure!(
        status(&a, t.id()).await? == TxStatus::Unknown,
        "A never saw the transfer"
    );

    // A keeps mining at a calm pace; A and B connect.
    a.set_mining(miner(300)).await?;
    h.heal().await?;
    wait_for(
        "the transfer confirmed on A's chain, on every node",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || async {
            for n in [&a, &b, &c] {
                let TxStatus::Confirmed { block, .. } = status(n, t.id()).await? else {
                    return Ok(false);
                };
                if block == lost_block || !on_main(&a, block).await? {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )
    .await?;
    for n in [&a, &b, &c] {
        ensure!(
            !on_main(n, lost_block).await?,
            "B's block lost the reorganization"
        );
        n.ledger(|l| l.chain().verify_consistency())
            .await?
            .map_err(anyhow::Error::msg)?;
    }
    h.shutdown().await;
    Ok(())
}
