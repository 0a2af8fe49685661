//! `meshwork lab run churn`: users come and go while they use the service. Every user's
//! client submits a transfer every `interval` and every user but the first downloads a file
//! (peer to peer, user 0's node publishes it). Every `period`, one user among the others
//! crashes (SIGKILL on netns), and comes back `down` later: its node restarts from its data
//! directory (peer to peer), its client and its download resume. At most a quarter of the
//! users are down at once.
//!
//! Client-server, churn touches only clients: the server stays. Peer to peer, the peers *are*
//! the service, so churn shows up in it: the figures say how much. They are the share of
//! requests accepted while the users were up, the transfers confirmed by the end, the
//! confirmation delay, and when the downloads completed (restarts included).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use meshwork_ledger::TxStatus;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::scenario::{
    accepted_ids, availability, both, p50_p99, payload, upload_cap, users_at_work, wait_confirmed,
    Common, Outputs, RunnerKind, Share,
};
use crate::testbed::{pick, Arch, Bed, Download};

#[derive(Clone, Debug)]
pub struct ChurnOptions {
    pub common: Common,
    pub file_mib: u64,
    pub upload_mbps: f64,
    pub interval: Duration,
    /// How long users come and go.
    pub duration: Duration,
    /// Between two crashes.
    pub period: Duration,
    /// How long a crashed user stays away.
    pub down: Duration,
    pub block_interval: Duration,
}

impl ChurnOptions {
    pub fn new(runner: RunnerKind, out: &Path) -> ChurnOptions {
        ChurnOptions {
            common: Common::new(runner, 16, out),
            file_mib: 16,
            upload_mbps: 20.0,
            interval: Duration::from_millis(500),
            duration: Duration::from_secs(60),
            period: Duration::from_secs(3),
            down: Duration::from_secs(10),
            block_interval: Duration::from_secs(1),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ArchChurn {
    pub arch: Arch,
    /// Crashes during the run.
    pub crashes: usize,
    /// Requests accepted, over the attempts of users while they were up.
    pub accepted: Share,
    /// Accepted transfers confirmed by the end (after the churn and a grace period).
    pub confirmed: usize,
    /// From a transfer's submission until the block holding it was made (peer to peer) or
    /// until the server's answer (client-server), in ms.
    #[serde(deserialize_with = "crate::scenario::nan_if_null")]
    pub confirm_p50_ms: f64,
    #[serde(deserialize_with = "crate::scenario::nan_if_null")]
    pub confirm_p99_ms: f64,
    pub downloads: usize,
    pub completed: usize,
    /// Completion times of the downloads, in seconds from the first request, sorted.
    pub completion_secs: Vec<f64>,
    /// The downloads that did not complete: user and where each stood.
    pub unfinished: Vec<(usize, String)>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChurnReport {
    pub scenario: String,
    pub runner: RunnerKind,
    pub seed: u64,
    pub users: usize,
    pub file_bytes: u64,
    pub upload_bps: f64,
    pub duration_secs: f64,
    pub period_secs: f64,
    pub down_secs: f64,
    pub client_server: ArchChurn,
    pub peer_to_peer: ArchChurn,
}

pub async fn run(o: ChurnOptions) -> Result<(ChurnReport, Outputs)> {
    let c = &o.common;
    ensure!(c.users >= 4, "the churn scenario needs at least 4 users");
    let file = payload(&c.work("churn")?, o.file_mib, c.seed).await?;
    let [(cs, _), (p2p, _)] = both("churn", c, upload_cap(o.upload_mbps), async |bed| {
        drive(&o, bed, &file).await
    })
    .await?;
    let _ = std::fs::remove_file(&file);
    let report = ChurnReport {
        scenario: "churn".into(),
        runner: c.runner,
        seed: c.seed,
        users: c.users,
        file_bytes: o.file_mib << 20,
        upload_bps: o.upload_mbps * 1e6,
        duration_secs: o.duration.as_secs_f64(),
        period_secs: o.period.as_secs_f64(),
        down_secs: o.down.as_secs_f64(),
        client_server: cs,
        peer_to_peer: p2p,
    };
    let outputs = outputs(&report)?;
    Ok((report, outputs))
}

async fn drive(o: &ChurnOptions, bed: &mut Bed, file: &Path) -> Result<ArchChurn> {
    let n = bed.users();
    let arch = bed.arch;
    users_at_work(bed, 2, o.block_interval, o.interval).await?;
    let target = bed.publish(file, false).await?;
    // User 0 stays: the origin peer to peer, a client like the others client-server.
    let churners: Vec<usize> = (1..n).collect();
    let t0 = Instant::now();
    for &u in &churners {
        let out = bed.work_dir().join(format!("copy-{u}.bin"));
        bed.download(u, &target, &out).await?;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(o.common.seed);
    // (user, when it comes back)
    let mut away: Vec<(usize, Instant)> = vec![];
    let mut crashes = 0;
    let mut next = Instant::now();
    while t0.elapsed() < o.duration {
        let now = Instant::now();
        let back: Vec<usize> = away
            .iter()
            .filter(|(_, t)| *t <= now)
            .map(|(u, _)| *u)
            .collect();
        for u in back {
            away.retain(|(v, _)| *v != u);
            bed.restart_user(u).await?;
        }
        if now >= next && away.len() < n / 4 {
            let up: Vec<usize> = churners.iter().copied().filter(|u| bed.is_up(*u)).collect();
            if let Some(&u) = pick(&mut rng, &up, 1).first() {
                bed.kill_user(u).await?;
                crashes += 1;
                // Down for `down`, give or take a half.
                let d = o.down.mul_f64(rng.gen_range(0.5..1.5));
                away.push((u, Instant::now() + d));
            }
            next = now + o.period;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (u, _) in std::mem::take(&mut away) {
        bed.restart_user(u).await?;
    }
    // Everyone is back: the downloads finish (or are given up on after two minutes), then
    // the clients stop.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut completion = vec![];
    let mut unfinished = vec![];
    loop {
        completion.clear();
        unfinished.clear();
        for &u in &churners {
            match bed.download_state(u).await? {
                Some(Download::Done(s)) => completion.push(s),
                Some(Download::Failed(why)) => unfinished.push((u, why)),
                _ => {
                    let have = bed.download_bytes(u).await.unwrap_or(0);
                    unfinished.push((u, format!("still running with {have} bytes")));
                }
            }
        }
        let running = unfinished.iter().any(|(_, w)| w.starts_with("still"));
        if !running || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bed.stop_agents();
    let attempts = bed.attempts();
    let accepted = availability(&attempts, 0, u64::MAX, |_| true);
    let ids = accepted_ids(&attempts);
    let witness = bed.service(0).clone();
    let confirmed = wait_confirmed(&witness, &ids, Duration::from_secs(60)).await?;
    let delays = confirmation_delays(bed, &attempts).await?;
    let (p50, p99) = p50_p99(delays);
    completion.sort_by(f64::total_cmp);
    Ok(ArchChurn {
        arch,
        crashes,
        accepted,
        confirmed,
        confirm_p50_ms: p50,
        confirm_p99_ms: p99,
        downloads: churners.len(),
        completed: completion.len(),
        completion_secs: completion,
        unfinished,
    })
}

/// Per accepted transfer: client-server, the server's answer time (the transfer is final
/// then); peer to peer, from the submission until the timestamp of the block that holds it.
pub(crate) async fn confirmation_delays(
    bed: &Bed,
    attempts: &[(usize, crate::agent::Attempt)],
) -> Result<Vec<f64>> {
    let mut out = vec![];
    let witness = bed.service(0);
    let mut block_time = std::collections::HashMap::new();
    for (_, a) in attempts {
        let Some(id) = a.accepted.as_deref() else {
            continue;
        };
        if bed.arch == Arch::ClientServer {
            out.push(a.ms);
            continue;
        }
        let Ok(TxStatus::Confirmed { height, .. }) = witness.tx_status(&id.parse()?).await else {
            continue;
        };
        let ms = match block_time.get(&height) {
            Some(ms) => *ms,
            None => {
                let ms = witness.block(&height.to_string()).await?.timestamp;
                block_time.insert(height, ms);
                ms
            }
        };
        out.push((ms as f64 * 1000.0 - a.at_us as f64).max(0.0) / 1000.0);
    }
    Ok(out)
}

fn outputs(r: &ChurnReport) -> Result<Outputs> {
    use std::fmt::Write;
    let mut md = String::new();
    writeln!(
        md,
        "# Churn: {} users, one crash every {:.0} s for {:.0} s, each away about {:.0} s ({} runner)\n",
        r.users, r.period_secs, r.duration_secs, r.down_secs, r.runner
    )?;
    writeln!(
        md,
        "| architecture | crashes | requests accepted while up | transfers confirmed | confirmation p50 / p99 | downloads completed | last download |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|")?;
    for a in [&r.client_server, &r.peer_to_peer] {
        writeln!(
            md,
            "| {} | {} | {} | {} of {} | {:.0} ms / {:.0} ms | {} of {} | {} |",
            a.arch,
            a.crashes,
            a.accepted,
            a.confirmed,
            a.accepted.ok,
            a.confirm_p50_ms,
            a.confirm_p99_ms,
            a.completed,
            a.downloads,
            a.completion_secs
                .last()
                .map_or("–".into(), |s| format!("{s:.1} s"))
        )?;
    }
    for a in [&r.client_server, &r.peer_to_peer] {
        for (u, why) in &a.unfinished {
            writeln!(
                md,
                "\n{}: user {u}'s download did not complete: {why}",
                a.arch
            )?;
        }
    }
    let pts = |a: &ArchChurn| {
        a.completion_secs
            .iter()
            .enumerate()
            .map(|(k, s)| (*s, (k + 1) as f64))
            .collect()
    };
    let svg = crate::svg::line_chart(
        "Downloads completed under churn",
        "seconds since the downloads began",
        "downloads completed",
        &[
            crate::svg::Series {
                name: "client-server".into(),
                points: pts(&r.client_server),
                dashed: false,
            },
            crate::svg::Series {
                name: "peer-to-peer".into(),
                points: pts(&r.peer_to_peer),
                dashed: false,
            },
        ],
    );
    writeln!(md, "\n![completions](churn.svg)")?;
    Ok(Outputs {
        json: serde_json::to_value(r)?,
        markdown: md,
        svgs: vec![("churn.svg".into(), svg)],
    })
}
