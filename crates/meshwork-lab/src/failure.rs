//! `meshwork lab run failure`: the single point of failure, measured. Every user's client
//! submits a transfer every `interval` and every user downloads one file; half way through the
//! downloads,
//!
//! - **client-server**: the server crashes (SIGKILL on netns);
//! - **peer to peer**: a `fraction` of the peers crash, picked at random (seeded) among all
//!   but the origin of the file. (Whether content outlives its only publisher is a question
//!   about replicas, not about the network; the churn scenario lets every peer come and go.)
//!
//! Then the clients go on for `window`. The figures: the share of client requests accepted
//! before and after the crash (availability), whether the transfers accepted after it are
//! confirmed (the ledger goes on), and how many downloads complete. Peer to peer, only the
//! surviving users count after the crash: the crashed ones are gone with their machines.
//! Client-server, the server is finally restarted on its store, to show what a crash costs
//! beyond the outage: every transfer it acknowledged must still be there.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::scenario::{
    accepted_ids, availability, both, payload, upload_cap, users_at_work, wait_confirmed, Common,
    Outputs, RunnerKind, Share,
};
use crate::testbed::{pick, Arch, Bed, Download};

#[derive(Clone, Debug)]
pub struct FailureOptions {
    pub common: Common,
    /// Peer to peer: the share of peers that crash.
    pub fraction: f64,
    pub file_mib: u64,
    pub upload_mbps: f64,
    /// Between two transfers of one client.
    pub interval: Duration,
    /// How long the clients go on after the crash.
    pub window: Duration,
    /// Peer to peer: the network's block interval (every node mines).
    pub block_interval: Duration,
}

impl FailureOptions {
    pub fn new(runner: RunnerKind, out: &Path) -> FailureOptions {
        FailureOptions {
            common: Common::new(runner, 16, out),
            fraction: 0.5,
            file_mib: 16,
            upload_mbps: 20.0,
            interval: Duration::from_millis(500),
            window: Duration::from_secs(20),
            block_interval: Duration::from_secs(1),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ArchFailure {
    pub arch: Arch,
    /// What crashed: "server", or the users whose peers crashed.
    pub crashed: String,
    pub crashed_users: Vec<usize>,
    /// Seconds from the first download request to the crash.
    pub crash_at_secs: f64,
    /// Client requests accepted before the crash, and in the window after it.
    pub before: Share,
    pub after: Share,
    /// Transfers accepted after the crash, and how many of them are confirmed.
    pub accepted_after: usize,
    pub confirmed_after: usize,
    /// Peer to peer: blocks added to the chain after the crash.
    pub blocks_after: Option<u64>,
    /// Downloads of the users still up at the end: asked for and completed (verified).
    pub downloads: usize,
    pub completed: usize,
    /// Seconds from the first request until the last completed download.
    pub last_completion_secs: Option<f64>,
    /// Client-server: after a restart on its store, how long the server took to answer, and
    /// how many of the transfers it had acknowledged before the crash it still holds.
    pub restart_secs: Option<f64>,
    pub acknowledged: Option<usize>,
    pub kept_after_restart: Option<usize>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FailureReport {
    pub scenario: String,
    pub runner: RunnerKind,
    pub seed: u64,
    pub users: usize,
    pub fraction: f64,
    pub file_bytes: u64,
    pub upload_bps: f64,
    pub window_secs: f64,
    pub client_server: ArchFailure,
    pub peer_to_peer: ArchFailure,
}

pub async fn run(o: FailureOptions) -> Result<(FailureReport, Outputs)> {
    let c = &o.common;
    ensure!(c.users >= 3, "the failure scenario needs at least 3 users");
    ensure!(
        o.fraction > 0.0 && o.fraction < 1.0,
        "--fraction must be between 0 and 1"
    );
    let file = payload(&c.work("failure")?, o.file_mib, c.seed).await?;
    let [(cs, _), (p2p, _)] = both("failure", c, upload_cap(o.upload_mbps), async |bed| {
        drive(&o, bed, &file).await
    })
    .await?;
    let _ = std::fs::remove_file(&file);
    let report = FailureReport {
        scenario: "failure".into(),
        runner: c.runner,
        seed: c.seed,
        users: c.users,
        fraction: o.fraction,
        file_bytes: o.file_mib << 20,
        upload_bps: o.upload_mbps * 1e6,
        window_secs: o.window.as_secs_f64(),
        client_server: cs,
        peer_to_peer: p2p,
    };
    let outputs = outputs(&report)?;
    Ok((report, outputs))
}

async fn drive(o: &FailureOptions, bed: &mut Bed, file: &Path) -> Result<ArchFailure> {
    let n = bed.users();
    let arch = bed.arch;
    let all: Vec<usize> = (0..n).collect();
    users_at_work(bed, 2, o.block_interval, o.interval).await?;
    let target = bed.publish(file, false).await?;
    // User 0 is the origin peer to peer; client-server every user downloads.
    let downloaders: Vec<usize> = match arch {
        Arch::PeerToPeer => (1..n).collect(),
        Arch::ClientServer => all.clone(),
    };
    let t0 = Instant::now();
    let us0 = meshwork_node::unix_micros();
    for &u in &downloaders {
        let out = bed_dir(bed, u);
        bed.download(u, &target, &out).await?;
    }
    // Half way: the downloaders hold half of their bytes between them.
    let size = std::fs::metadata(file)?.len();
    let want = size * downloaders.len() as u64 / 2;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        ensure!(
            Instant::now() < deadline,
            "the downloads never got half way"
        );
        if progress(bed, &downloaders).await? >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let crash_us = meshwork_node::unix_micros();
    let crash_at = t0.elapsed().as_secs_f64();
    let height_at_crash = match arch {
        Arch::PeerToPeer => Some(bed.node(0).chain().await?.height),
        Arch::ClientServer => None,
    };
    let crashed_users = match arch {
        Arch::ClientServer => {
            bed.kill_server().await?;
            vec![]
        }
        Arch::PeerToPeer => {
            let mut rng = rand::rngs::StdRng::seed_from_u64(o.common.seed);
            let k = ((n as f64 * o.fraction).round() as usize).clamp(1, n - 2);
            let victims = pick(&mut rng, &downloaders, k);
            for &u in &victims {
                bed.kill_user(u).await?;
            }
            victims
        }
    };
    tokio::time::sleep(o.window).await;
    let end_us = meshwork_node::unix_micros();
    bed.stop_agents();
    let attempts = bed.attempts();
    let survivors = bed.up_users();
    let alive = |u: usize| survivors.contains(&u);
    let before = availability(&attempts, us0, crash_us, |_| true);
    let after = availability(&attempts, crash_us, end_us, alive);
    let after_ids = accepted_ids(
        &attempts
            .iter()
            .filter(|(u, a)| a.at_us >= crash_us && alive(*u))
            .cloned()
            .collect::<Vec<_>>(),
    );
    let mut report = ArchFailure {
        arch,
        crashed: match arch {
            Arch::ClientServer => "the server".into(),
            Arch::PeerToPeer => format!("{} of {n} peers", crashed_users.len()),
        },
        crashed_users,
        crash_at_secs: crash_at,
        before,
        after,
        accepted_after: after_ids.len(),
        confirmed_after: 0,
        blocks_after: None,
        downloads: 0,
        completed: 0,
        last_completion_secs: None,
        restart_secs: None,
        acknowledged: None,
        kept_after_restart: None,
    };
    match arch {
        Arch::PeerToPeer => {
            let witness = bed.node(survivors[0]).clone();
            report.confirmed_after =
                wait_confirmed(&witness, &after_ids, Duration::from_secs(60)).await?;
            report.blocks_after = Some(
                witness
                    .chain()
                    .await?
                    .height
                    .saturating_sub(height_at_crash.unwrap_or(0)),
            );
            // The survivors' downloads go on without the crashed peers.
            wait_downloads(bed, &downloaders, Duration::from_secs(300)).await?;
        }
        Arch::ClientServer => {
            // Nothing completes while the server is down; then it restarts on its store.
            let acked = accepted_ids(&attempts);
            let started = Instant::now();
            bed.restart_server().await?;
            report.restart_secs = Some(started.elapsed().as_secs_f64());
            report.acknowledged = Some(acked.len());
            report.kept_after_restart =
                Some(crate::scenario::confirmed(bed.server(), &acked).await?);
        }
    }
    for &u in &downloaders {
        if !bed.is_up(u) {
            continue;
        }
        report.downloads += 1;
        if let Some(Download::Done(secs)) = bed.download_state(u).await? {
            report.completed += 1;
            report.last_completion_secs =
                Some(report.last_completion_secs.unwrap_or(0.0).max(secs));
        }
    }
    Ok(report)
}

fn bed_dir(bed: &Bed, u: usize) -> PathBuf {
    bed.work_dir().join(format!("copy-{u}.bin"))
}

/// Bytes the downloaders hold between them.
async fn progress(bed: &mut Bed, who: &[usize]) -> Result<u64> {
    let mut total = 0;
    for &u in who {
        total += bed.download_bytes(u).await?;
    }
    Ok(total)
}

/// Waits until every running downloader's download is over (or `timeout`).
async fn wait_downloads(bed: &mut Bed, who: &[usize], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut running = 0;
        for &u in who {
            if bed.is_up(u) && bed.download_state(u).await? == Some(Download::Running) {
                running += 1;
            }
        }
        if running == 0 || Instant::now() >= deadline {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn outputs(r: &FailureReport) -> Result<Outputs> {
    use std::fmt::Write;
    let mut md = String::new();
    writeln!(
        md,
        "# Failure: the server vs {:.0} % of the peers, crashed half way ({} users, {} MiB each, {} runner)\n",
        r.fraction * 100.0,
        r.users,
        r.file_bytes >> 20,
        r.runner
    )?;
    writeln!(
        md,
        "| architecture | crashed | requests accepted before | after (for {:.0} s) | transfers confirmed after | blocks after | downloads completed | restart: acknowledged transfers kept |",
        r.window_secs
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|")?;
    for a in [&r.client_server, &r.peer_to_peer] {
        writeln!(
            md,
            "| {} | {} | {} | {} | {} of {} | {} | {} of {} | {} |",
            a.arch,
            a.crashed,
            a.before,
            a.after,
            a.confirmed_after,
            a.accepted_after,
            a.blocks_after.map_or("–".into(), |b| b.to_string()),
            a.completed,
            a.downloads,
            match (a.kept_after_restart, a.acknowledged, a.restart_secs) {
                (Some(k), Some(n), Some(s)) => format!("{k} of {n} (up again in {s:.1} s)"),
                _ => "–".into(),
            }
        )?;
    }
    let svg = crate::svg::bar_chart(
        "Client requests accepted, before and after the crash",
        "% accepted",
        &["client-server".into(), "peer-to-peer".into()],
        &[
            (
                "before".into(),
                vec![
                    r.client_server.before.ratio() * 100.0,
                    r.peer_to_peer.before.ratio() * 100.0,
                ],
            ),
            (
                "after".into(),
                vec![
                    r.client_server.after.ratio() * 100.0,
                    r.peer_to_peer.after.ratio() * 100.0,
                ],
            ),
        ],
    );
    writeln!(md, "\n![availability](failure.svg)")?;
    Ok(Outputs {
        json: serde_json::to_value(r)?,
        markdown: md,
        svgs: vec![("failure.svg".into(), svg)],
    })
}
