//! `meshwork lab run partition`: the network splits in two halves for `duration`, then heals
//! (netns: blackhole routes between the halves' hosts, then none). Every user's client submits
//! a transfer every `interval` from an account of its own.
//!
//! - **Peer to peer**: every node mines, so each half goes on: it accepts and confirms its
//!   users' transfers on a branch of its own. The figures: when the fork appeared, how long
//!   the branches grew, how long after the heal every node is on one tip with every accepted
//!   transfer confirmed, how many blocks the losing branch had (reorganized away), and how
//!   many accepted transfers were lost (the claim: none, since the halves spend different
//!   accounts and the losing branch's transfers go back to the mempools).
//! - **Client-server**: the half with the server goes on; the other half is refused service
//!   until the heal. No fork, and nothing accepted is lost, because nothing is accepted there.
//!
//! The clients stop at the heal, so that the convergence time measures the backlog of the
//! partition, not transfers that keep arriving.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};

use crate::scenario::{
    accepted_ids, availability, both, confirmed, users_at_work, Common, Outputs, RunnerKind, Share,
};
use crate::testbed::{Arch, Bed};

#[derive(Clone, Debug)]
pub struct PartitionOptions {
    pub common: Common,
    pub interval: Duration,
    /// How long the halves stay apart.
    pub duration: Duration,
    /// Before the split, with everyone connected.
    pub settle: Duration,
    pub block_interval: Duration,
}

impl PartitionOptions {
    pub fn new(runner: RunnerKind, out: &Path) -> PartitionOptions {
        PartitionOptions {
            common: Common::new(runner, 10, out),
            interval: Duration::from_secs(1),
            duration: Duration::from_secs(30),
            settle: Duration::from_secs(5),
            block_interval: Duration::from_secs(1),
        }
    }
}

/// The two branches of a fork (peer to peer).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Fork {
    /// Height of the common tip when the halves split.
    pub split_height: u64,
    /// Seconds after the split until the halves' tips differed, both past the split (`None`:
    /// they never did).
    pub appeared_secs: Option<f64>,
    /// Each half's height at the heal.
    pub heights: [u64; 2],
    /// Blocks of the branch that lost (reorganized away after the heal).
    pub reorganized: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ArchPartition {
    pub arch: Arch,
    /// The users of each half (client-server: the server is with the first).
    pub halves: [Vec<usize>; 2],
    /// Requests accepted in each half while it was apart.
    pub during: [Share; 2],
    pub fork: Option<Fork>,
    /// Seconds after the heal until every node is on one tip with every accepted transfer
    /// confirmed (peer to peer), or until the cut-off half's first accepted request
    /// (client-server). `None`: not within the three minutes given.
    pub heal_secs: Option<f64>,
    /// Transfers accepted during the whole run, confirmed after the heal, and lost.
    pub accepted: usize,
    pub confirmed: usize,
    pub lost: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PartitionReport {
    pub scenario: String,
    pub runner: RunnerKind,
    pub seed: u64,
    pub users: usize,
    pub duration_secs: f64,
    pub client_server: ArchPartition,
    pub peer_to_peer: ArchPartition,
}

pub async fn run(o: PartitionOptions) -> Result<(PartitionReport, Outputs)> {
    let c = &o.common;
    ensure!(
        c.users >= 4,
        "the partition scenario needs at least 4 users"
    );
    let [(cs, _), (p2p, _)] =
        both("partition", c, |_| {}, async |bed| drive(&o, bed).await).await?;
    let report = PartitionReport {
        scenario: "partition".into(),
        runner: c.runner,
        seed: c.seed,
        users: c.users,
        duration_secs: o.duration.as_secs_f64(),
        client_server: cs,
        peer_to_peer: p2p,
    };
    let outputs = outputs(&report)?;
    Ok((report, outputs))
}

/// (height, tip) of a node.
async fn tip(bed: &Bed, u: usize) -> Result<(u64, String)> {
    let c = bed.node(u).chain().await?;
    Ok((c.height, c.tip))
}

async fn drive(o: &PartitionOptions, bed: &mut Bed) -> Result<ArchPartition> {
    let n = bed.users();
    let arch = bed.arch;
    let all: Vec<usize> = (0..n).collect();
    let halves = [all[..n / 2].to_vec(), all[n / 2..].to_vec()];
    users_at_work(bed, 3, o.block_interval, o.interval).await?;
    tokio::time::sleep(o.settle).await;

    let split_height = match arch {
        Arch::PeerToPeer => tip(bed, 0).await?.0,
        Arch::ClientServer => 0,
    };
    bed.partition(&halves).await?;
    let split = Instant::now();
    let split_us = meshwork_node::unix_micros();
    let mut appeared = None;
    while split.elapsed() < o.duration {
        if arch == Arch::PeerToPeer && appeared.is_none() {
            let (a, b) = (tip(bed, halves[0][0]).await?, tip(bed, halves[1][0]).await?);
            if a.1 != b.1 && a.0 > split_height && b.0 > split_height {
                appeared = Some(split.elapsed().as_secs_f64());
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let heal_us = meshwork_node::unix_micros();
    let branch_tips = match arch {
        Arch::PeerToPeer => Some((tip(bed, halves[0][0]).await?, tip(bed, halves[1][0]).await?)),
        Arch::ClientServer => None,
    };
    bed.heal().await?;
    let healed = Instant::now();
    let in_half = |h: usize| {
        let set = halves[h].clone();
        move |u: usize| set.contains(&u)
    };
    let (heal_secs, attempts) = match arch {
        Arch::PeerToPeer => {
            bed.stop_agents();
            let attempts = bed.attempts();
            let ids = accepted_ids(&attempts);
            let deadline = healed + Duration::from_secs(180);
            loop {
                if same_tip(bed).await? && confirmed(bed.node(0), &ids).await? == ids.len() {
                    break (Some(healed.elapsed().as_secs_f64()), attempts);
                }
                if Instant::now() >= deadline {
                    break (None, attempts);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        Arch::ClientServer => {
            // Until the cut-off half is served again.
            let cut = in_half(1);
            let deadline = healed + Duration::from_secs(60);
            let secs = loop {
                let back = bed
                    .attempts()
                    .iter()
                    .find(|(u, a)| cut(*u) && a.at_us >= heal_us && a.ok())
                    .map(|(_, a)| a.at_us);
                if let Some(at) = back {
                    break Some((at - heal_us) as f64 / 1e6);
                }
                if Instant::now() >= deadline {
                    bail!("the cut-off clients were not served again after the heal");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            bed.stop_agents();
            (secs, bed.attempts())
        }
    };
    let ids = accepted_ids(&attempts);
    let witness = bed.service(0).clone();
    let ok = confirmed(&witness, &ids).await?;
    let fork = match branch_tips {
        Some(((ha, ta), (hb, tb))) => {
            // Each branch's tip is known in its own half (the winner's everywhere, the
            // loser's perhaps only where it was mined); every node now has one main chain.
            let left_won = bed.node(halves[0][0]).block(&ta).await?.on_main_chain;
            let right_won = bed.node(halves[1][0]).block(&tb).await?.on_main_chain;
            let reorganized = match (left_won, right_won) {
                (true, false) => hb - split_height,
                (false, true) => ha - split_height,
                // Both on the main chain: one branch was empty (no fork).
                _ => 0,
            };
            Some(Fork {
                split_height,
                appeared_secs: appeared,
                heights: [ha, hb],
                reorganized,
            })
        }
        None => None,
    };
    Ok(ArchPartition {
        arch,
        during: [
            availability(&attempts, split_us, heal_us, in_half(0)),
            availability(&attempts, split_us, heal_us, in_half(1)),
        ],
        halves,
        fork,
        heal_secs,
        accepted: ids.len(),
        confirmed: ok,
        lost: ids.len() - ok,
    })
}

/// Whether every node is on one tip.
async fn same_tip(bed: &Bed) -> Result<bool> {
    let mut tips = std::collections::HashSet::new();
    for u in bed.up_users() {
        tips.insert(tip(bed, u).await?.1);
    }
    Ok(tips.len() == 1)
}

/// "1.2 s", or "never" for what did not happen in the time given.
pub fn secs(s: Option<f64>) -> String {
    s.map_or("never".into(), |s| format!("{s:.1} s"))
}

fn outputs(r: &PartitionReport) -> Result<Outputs> {
    use std::fmt::Write;
    let mut md = String::new();
    writeln!(
        md,
        "# Partition: {} users split in two halves for {:.0} s ({} runner)\n",
        r.users, r.duration_secs, r.runner
    )?;
    writeln!(
        md,
        "| architecture | accepted in half 1 / half 2 while apart | fork (heights at heal, from {}) | healed in | blocks reorganized | transfers accepted | confirmed | lost |",
        r.peer_to_peer
            .fork
            .as_ref()
            .map_or(0, |f| f.split_height)
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|")?;
    for a in [&r.client_server, &r.peer_to_peer] {
        let fork = a.fork.as_ref().map_or("none".into(), |f| {
            format!(
                "{} / {} (appeared after {})",
                f.heights[0],
                f.heights[1],
                secs(f.appeared_secs)
            )
        });
        writeln!(
            md,
            "| {} | {} / {} | {} | {} | {} | {} | {} | {} |",
            a.arch,
            a.during[0],
            a.during[1],
            fork,
            secs(a.heal_secs),
            a.fork.as_ref().map_or(0, |f| f.reorganized),
            a.accepted,
            a.confirmed,
            a.lost
        )?;
    }
    let svg = crate::svg::bar_chart(
        "Requests accepted in each half while apart",
        "% accepted",
        &["client-server".into(), "peer-to-peer".into()],
        &[
            (
                "half with the server / half 1".into(),
                vec![
                    r.client_server.during[0].ratio() * 100.0,
                    r.peer_to_peer.during[0].ratio() * 100.0,
                ],
            ),
            (
                "other half".into(),
                vec![
                    r.client_server.during[1].ratio() * 100.0,
                    r.peer_to_peer.during[1].ratio() * 100.0,
                ],
            ),
        ],
    );
    writeln!(md, "\n![availability](partition.svg)")?;
    Ok(Outputs {
        json: serde_json::to_value(r)?,
        markdown: md,
        svgs: vec![("partition.svg".into(), svg)],
    })
}
