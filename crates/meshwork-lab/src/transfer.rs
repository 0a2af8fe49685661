//! `meshwork lab transfer`: one file over one loopback connection between two nodes in this
//! process, through the content swarm (shared, fetched, every piece verified and written),
//! and in the same run a raw libp2p stream copy of the same size between the same two nodes:
//! the ceiling that the transport (TCP + Noise + Yamux) sets here.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::StreamProtocol;
use meshwork_node::content::{FetchRequest, ShareRequest, State};
use meshwork_swarm::ContentId;
use rand::{RngCore, SeedableRng};
use serde::Serialize;

use crate::harness::{HarnessBuilder, Topology};

#[derive(Clone, Debug)]
pub struct TransferOptions {
    pub size_mib: u64,
    /// The piece size in KiB (default: the manifest default, 256).
    pub piece_kib: u32,
    /// Where the files go (a temporary directory by default).
    pub dir: Option<std::path::PathBuf>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TransferReport {
    pub bytes: u64,
    pub piece_size: u32,
    /// Hashing the file to share it (the manifest, then the store's check).
    pub share_s: f64,
    /// From the fetch request to a complete, verified file on disk.
    pub fetch_s: f64,
    pub fetch_mb_s: f64,
    pub raw_s: f64,
    pub raw_mb_s: f64,
    /// Swarm throughput over raw stream throughput.
    pub ratio: f64,
    pub wasted_bytes: u64,
}

const RAW: StreamProtocol = StreamProtocol::new("/meshwork-lab/raw-copy/1");

fn write_file(path: &Path, size: u64) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut chunk = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        rng.fill_bytes(&mut chunk);
        let n = left.min(chunk.len() as u64) as usize;
        std::io::Write::write_all(&mut f, &chunk[..n])?;
        left -= n as u64;
    }
    std::io::Write::flush(&mut f)?;
    Ok(())
}

pub async fn run(opts: TransferOptions) -> Result<TransferReport> {
    ensure!(opts.size_mib > 0, "--size-mib must be at least 1");
    let tmp = tempfile::tempdir()?;
    let dir = opts.dir.clone().unwrap_or_else(|| tmp.path().to_owned());
    std::fs::create_dir_all(&dir)?;
    let size = opts.size_mib << 20;
    let origin = dir.join("transfer-origin.bin");
    let copy = dir.join("transfer-copy.bin");
    let _ = std::fs::remove_file(&copy);
    eprintln!("writing a {} MiB file", opts.size_mib);
    write_file(&origin, size)?;

    let h = HarnessBuilder::new("test-transfer")?
        .topology(Topology::Chain)
        .spawn(2)
        .await?;
    let (a, b) = (&h.running(0)?.handle, &h.running(1)?.handle);
    crate::wait_for(
        "the two nodes connected",
        Duration::from_secs(30),
        Duration::from_millis(50),
        || async { Ok(!a.peers().await?.is_empty()) },
    )
    .await?;

    // 1. Raw: one libp2p stream, 64 KiB writes, the receiver counting bytes.
    let mut incoming = b
        .stream_control()
        .accept(RAW)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let sink = tokio::spawn(async move {
        let (_, mut s) = incoming.next().await.context("no raw stream")?;
        let mut buf = vec![0u8; 256 << 10];
        let mut got = 0u64;
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        anyhow::Ok(got)
    });
    eprintln!("raw libp2p stream copy");
    let start = Instant::now();
    let mut s = a
        .stream_control()
        .open_stream(b.peer_id, RAW)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let chunk = vec![7u8; 64 << 10];
    let mut sent = 0;
    while sent < size {
        let n = (size - sent).min(chunk.len() as u64) as usize;
        s.write_all(&chunk[..n]).await?;
        sent += n as u64;
    }
    s.close().await?;
    let got = sink.await??;
    let raw_s = start.elapsed().as_secs_f64();
    ensure!(got == size, "the raw copy received {got} of {size} bytes");

    // 2. The swarm: share on A, fetch on B.
    eprintln!("sharing (hashing the file)");
    let start = Instant::now();
    let shared = a
        .content
        .share(ShareRequest {
            path: origin.clone(),
            super_seed: false,
            tracker: None,
            piece_size: Some(opts.piece_kib << 10),
        })
        .await?;
    let share_s = start.elapsed().as_secs_f64();
    let id: ContentId = shared.id.parse()?;
    eprintln!("fetching through the swarm");
    let start = Instant::now();
    b.content
        .fetch(FetchRequest {
            target: shared.ticket.clone(),
            out: Some(copy.clone()),
            tracker: None,
        })
        .await?;
    let done = loop {
        let c = b.content.get(id).await?.context("content gone")?;
        match c.state {
            State::Seeding => break c,
            State::Failed => bail!("the fetch failed: {:?}", c.error),
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    };
    let fetch_s = start.elapsed().as_secs_f64();
    h.shutdown().await;
    let same = {
        let (x, y) = (origin.clone(), copy.clone());
        tokio::task::spawn_blocking(move || -> Result<bool> {
            let hash = |p: &Path| -> Result<blake3::Hash> {
                let mut h = blake3::Hasher::new();
                h.update_reader(std::fs::File::open(p)?)?;
                Ok(h.finalize())
            };
            Ok(hash(&x)? == hash(&y)?)
        })
        .await??
    };
    ensure!(same, "the fetched copy differs from the origin");
    let _ = std::fs::remove_file(&origin);
    let _ = std::fs::remove_file(&copy);
    let mb = size as f64 / 1e6;
    Ok(TransferReport {
        bytes: size,
        piece_size: opts.piece_kib << 10,
        share_s,
        fetch_s,
        fetch_mb_s: mb / fetch_s,
        raw_s,
        raw_mb_s: mb / raw_s,
        ratio: (mb / fetch_s) / (mb / raw_s),
        wasted_bytes: done.wasted,
    })
}
