//! `meshwork lab report DIR...`: the seeds' comparison of client-server and peer-to-peer,
//! with each cell's numbers read from the scenarios' JSON results in the given directories
//! (the first directory that holds a scenario's JSON wins). A cell whose scenario has not been
//! run says so, and names the command that measures it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::churn::ChurnReport;
use crate::distribution::DistReport;
use crate::failure::FailureReport;
use crate::partition::PartitionReport;
use crate::propagation::PropagationReport;
use crate::sybil::SybilReport;

/// One aspect of the comparison.
pub struct Line {
    pub aspect: &'static str,
    pub client_server: String,
    pub peer_to_peer: String,
    /// Where the numbers come from (a JSON file and its plot), or how to measure them.
    pub source: String,
}

pub struct Report {
    pub lines: Vec<Line>,
}

impl Report {
    pub fn line(&self, aspect: &str) -> Option<&Line> {
        self.lines.iter().find(|l| l.aspect == aspect)
    }

    pub fn markdown(&self) -> String {
        let mut s = String::from(
            "| aspect | client-server | peer-to-peer | measured by |\n|---|---|---|---|\n",
        );
        for l in &self.lines {
            s.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                l.aspect, l.client_server, l.peer_to_peer, l.source
            ));
        }
        s
    }
}

/// Finds `<dir>/<name>.json` in the first directory that has it, and reads it.
fn load<T: serde::de::DeserializeOwned>(
    dirs: &[PathBuf],
    name: &str,
) -> Result<Option<(PathBuf, T)>> {
    let Some(p) = dirs
        .iter()
        .map(|d| d.join(format!("{name}.json")))
        .find(|p| p.is_file())
    else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(&p).with_context(|| p.display().to_string())?;
    let v = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a {name} scenario result", p.display()))?;
    Ok(Some((p, v)))
}

fn link(p: &Path, svg: &str) -> String {
    let dir = p.parent().unwrap_or(Path::new("."));
    format!(
        "[{}]({}), [plot]({})",
        p.file_name().unwrap_or_default().to_string_lossy(),
        p.display(),
        dir.join(svg).display()
    )
}

/// Builds the lines of `aspects` from a scenario's result, or says how to measure them.
fn lines<T: serde::de::DeserializeOwned>(
    dirs: &[PathBuf],
    scenario: &str,
    aspects: &[&'static str],
    cells: impl Fn(&T) -> Result<Vec<(String, String)>>,
) -> Result<Vec<Line>> {
    Ok(match load::<T>(dirs, scenario)? {
        Some((p, r)) => aspects
            .iter()
            .zip(cells(&r).with_context(|| p.display().to_string())?)
            .map(|(aspect, (cs, p2p))| Line {
                aspect,
                client_server: cs,
                peer_to_peer: p2p,
                source: link(&p, &format!("{scenario}.svg")),
            })
            .collect(),
        None => aspects
            .iter()
            .map(|aspect| Line {
                aspect,
                client_server: format!("not measured: `meshwork lab run {scenario}`"),
                peer_to_peer: format!("not measured: `meshwork lab run {scenario}`"),
                source: scenario.into(),
            })
            .collect(),
    })
}

fn pct(r: f64) -> String {
    format!("{:.1} %", r * 100.0)
}

pub fn build(dirs: &[PathBuf]) -> Result<Report> {
    if dirs.is_empty() {
        bail!("name at least one directory with scenario results");
    }
    for d in dirs {
        if !d.is_dir() {
            bail!("{}: not a directory", d.display());
        }
    }
    let mut out = vec![];
    out.extend(lines(dirs, "partition", &["control"], |r: &PartitionReport| {
        let (c, p) = (&r.client_server, &r.peer_to_peer);
        Ok(vec![(
            format!(
                "the server alone orders transfers: one log, no fork; the half cut off from it was served {} while apart",
                pct(c.during[1].ratio())
            ),
            match &p.fork {
                Some(f) => format!(
                    "every node validates and the most work decides: a {:.0} s split forked (heights {} / {} from {}); after the heal {} blocks were reorganized away",
                    r.duration_secs, f.heights[0], f.heights[1], f.split_height, f.reorganized
                ),
                None => "no fork was measured".into(),
            },
        )])
    })?);
    out.extend(lines(dirs, "failure", &["failure risk"], |r: &FailureReport| {
        let (c, p) = (&r.client_server, &r.peer_to_peer);
        Ok(vec![(
            format!(
                "the server crashed: requests accepted {} before, {} after; {} of {} downloads completed",
                pct(c.before.ratio()),
                pct(c.after.ratio()),
                c.completed,
                c.downloads
            ),
            format!(
                "{} crashed: requests accepted {} before, {} after; {} of {} later transfers confirmed; {} of {} surviving downloads completed",
                p.crashed,
                pct(p.before.ratio()),
                pct(p.after.ratio()),
                p.confirmed_after,
                p.accepted_after,
                p.completed,
                p.downloads
            ),
        )])
    })?);
    out.extend(lines(
        dirs,
        "distribution",
        &["scalability", "cost"],
        |r: &DistReport| {
            let (Some(first), Some(last)) = (r.rows.first(), r.rows.last()) else {
                bail!("no rows");
            };
            let grow = |a: f64, b: f64| format!("×{:.1}", b / a);
            Ok(vec![
                (
                    format!(
                        "N={}→{}: {:.1} s → {:.1} s ({}); {}× the bound N·F/u_s at N={}",
                        first.n,
                        last.n,
                        first.client_server.secs,
                        last.client_server.secs,
                        grow(first.client_server.secs, last.client_server.secs),
                        crate::distribution::ratio_cell(last.cs_ratio),
                        last.n
                    ),
                    format!(
                        "N={}→{}: {:.1} s → {:.1} s ({}); {}× the P2P bound at N={}",
                        first.n,
                        last.n,
                        first.swarm.secs,
                        last.swarm.secs,
                        grow(first.swarm.secs, last.swarm.secs),
                        crate::distribution::ratio_cell(last.swarm_ratio),
                        last.n
                    ),
                ),
                (
                    format!(
                        "the server uploads {:.2} copies at N={}",
                        last.cs_origin_copies, last.n
                    ),
                    format!(
                        "the origin uploads {:.2} copies at N={}; peers carry the rest",
                        last.swarm_origin_copies, last.n
                    ),
                ),
            ])
        },
    )?);
    out.extend(lines(
        dirs,
        "propagation",
        &["latency", "overhead"],
        |r: &PropagationReport| {
            let (c, p) = (&r.client_server, &r.peer_to_peer);
            let block = p.block.as_ref();
            Ok(vec![
                (
                    format!(
                        "a transfer reaches all {} clients in {:.0} ms (p50), {:.0} ms (p99); it is final when accepted",
                        r.nodes, c.tx.all_p50_ms, c.tx.all_p99_ms
                    ),
                    format!(
                        "a transfer reaches all {} nodes in {:.0} ms (p50), {:.0} ms (p99); a block in {} ms (p50), {} ms (p99)",
                        r.nodes,
                        p.tx.all_p50_ms,
                        p.tx.all_p99_ms,
                        block.map_or("–".into(), |b| format!("{:.0}", b.all_p50_ms)),
                        block.map_or("–".into(), |b| format!("{:.0}", b.all_p99_ms)),
                    ),
                ),
                (
                    format!(
                        "{:.2} copies per client per transfer",
                        c.tx.copies_per_node
                    ),
                    format!(
                        "{:.2} copies per node per transfer, {} per block (gossip's duplicates)",
                        p.tx.copies_per_node,
                        block.map_or("–".into(), |b| format!("{:.2}", b.copies_per_node)),
                    ),
                ),
            ])
        },
    )?);
    out.extend(lines(
        dirs,
        "sybil",
        &["censorship resistance"],
        |r: &SybilReport| {
            let (c, p, e) = (&r.client_server, &r.peer_to_peer, &r.eclipse);
            Ok(vec![(
                format!(
                    "the operator refused one account: {} of {} of its transfers accepted; there is no one else to ask",
                    c.accepted, c.submitted
                ),
                format!(
                    "{} refused one account: {} of {} of its transfers confirmed anyway; an eclipse flood ({} of what the victim heard) won at most {} of {} outbound slots",
                    p.refusers,
                    p.confirmed,
                    p.submitted,
                    pct(e.heard_share),
                    e.max_outbound_attacker(),
                    e.outbound.first().map_or(8, |(_, n)| *n)
                ),
            )])
        },
    )?);
    out.extend(lines(
        dirs,
        "churn",
        &["under churn"],
        |r: &ChurnReport| {
            let cell = |a: &crate::churn::ArchChurn| {
                format!(
                "{} crashes: requests accepted {}; {} of {} downloads completed, the last at {}",
                a.crashes,
                pct(a.accepted.ratio()),
                a.completed,
                a.downloads,
                a.completion_secs
                    .last()
                    .map_or("–".into(), |s| format!("{s:.0} s"))
            )
            };
            Ok(vec![(cell(&r.client_server), cell(&r.peer_to_peer))])
        },
    )?);
    out.extend(lines(
        dirs,
        "partition",
        &["under a partition"],
        |r: &PartitionReport| {
            let cell = |a: &crate::partition::ArchPartition| {
                format!(
                    "served {} / {} in the two halves; healed in {}; {} of {} accepted transfers lost",
                    pct(a.during[0].ratio()),
                    pct(a.during[1].ratio()),
                    crate::partition::secs(a.heal_secs),
                    a.lost,
                    a.accepted
                )
            };
            Ok(vec![(cell(&r.client_server), cell(&r.peer_to_peer))])
        },
    )?);
    Ok(Report { lines: out })
}
