//! The content swarm end to end: real nodes in one process over loopback TCP, sharing a file
//! through piece streams, with peers found by ticket, in-swarm exchange, the DHT and a tracker.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use meshwork_lab::harness::{wait_for, Harness, HarnessBuilder, Topology};
use meshwork_node::content::{ContentInfo, FetchRequest, ShareRequest, State};
use meshwork_node::NodeHandle;
use meshwork_swarm::ContentId;
use rand::{Rng, SeedableRng};

const PIECE: u32 = 64 << 10;

fn random_file(dir: &Path, name: &str, size: usize, seed: u64) -> Result<PathBuf> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut bytes = vec![0u8; size];
    rng.fill(&mut bytes[..]);
    let path = dir.join(name);
    std::fs::write(&path, &bytes)?;
    Ok(path)
}

async fn share(
    h: &NodeHandle,
    path: &Path,
    super_seed: bool,
    tracker: Option<String>,
) -> Result<ContentInfo> {
    Ok(h.content
        .share(ShareRequest {
            path: path.to_owned(),
            super_seed,
            tracker,
            piece_size: Some(PIECE),
        })
        .await?)
}

async fn fetch(h: &NodeHandle, target: &str, out: &Path) -> Result<ContentInfo> {
    Ok(h.content
        .fetch(FetchRequest {
            target: target.to_string(),
            out: Some(out.to_owned()),
            tracker: None,
        })
        .await?)
}

async fn info(h: &NodeHandle, id: &str) -> Result<ContentInfo> {
    let id: ContentId = id.parse()?;
    h.content.get(id).await?.context("content gone")
}

/// Waits until every handle in `who` seeds the content.
async fn all_seeding(h: &Harness, who: &[usize], id: &str, timeout: Duration) -> Result<()> {
    wait_for(
        "every leecher complete",
        timeout,
        Duration::from_millis(200),
        || async {
            for &i in who {
                let c = info(&h.running(i)?.handle, id).await?;
                ensure!(c.state != State::Failed, "node {i}: {:?}", c.error);
                if c.state != State::Seeding {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_leechers_get_byte_identical_files_and_the_super_seeder_uploads_about_one_copy(
) -> Result<()> {
    common::init_logs();
    let dir = tempfile::tempdir()?;
    let size = 8 << 20;
    let origin = random_file(dir.path(), "origin.bin", size, 1)?;
    let h = HarnessBuilder::new("test-content-ten")?
        .topology(Topology::Star)
        .spawn(11)
        .await?;
    let seeder = &h.running(0)?.handle;
    let shared = share(seeder, &origin, true, None).await?;
    for i in 1..=10 {
        let out = dir.path().join(format!("leech{i}.bin"));
        fetch(&h.running(i)?.handle, &shared.ticket, &out).await?;
    }
    all_seeding(
        &h,
        &(1..=10).collect::<Vec<_>>(),
        &shared.id,
        Duration::from_secs(180),
    )
    .await?;
    let want = std::fs::read(&origin)?;
    for i in 1..=10 {
        let got = std::fs::read(dir.path().join(format!("leech{i}.bin")))?;
        ensure!(got == want, "leecher {i}'s file differs");
    }
    let up = info(seeder, &shared.id).await?.uploaded;
    let ratio = up as f64 / size as f64;
    eprintln!("the super-seeder uploaded {ratio:.3} copies");
    ensure!(ratio <= 1.2, "the super-seeder uploaded {ratio:.3} copies");
    h.shutdown().await;
    Ok(())
}
