//! `meshwork lab report DIR...`: the seeds' comparison of client-server and peer-to-peer,
//! with each cell's numbers read from the scenarios' JSON results in the given directories.
//! A cell whose scenario has not been run says so, and names the command that measures it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::distribution::DistReport;

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

/// Finds `<dir>/<name>.json` in the first directory that has it.
fn find(dirs: &[PathBuf], name: &str) -> Option<PathBuf> {
    dirs.iter()
        .map(|d| d.join(format!("{name}.json")))
        .find(|p| p.is_file())
}

fn load<T: serde::de::DeserializeOwned>(p: &Path) -> Result<T> {
    let text = std::fs::read_to_string(p).with_context(|| p.display().to_string())?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a scenario result", p.display()))
}

fn not_run(scenario: &str) -> String {
    format!("not measured: `meshwork lab run {scenario}`")
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

pub fn build(dirs: &[PathBuf]) -> Result<Report> {
    if dirs.is_empty() {
        bail!("name at least one directory with scenario results");
    }
    for d in dirs {
        if !d.is_dir() {
            bail!("{}: not a directory", d.display());
        }
    }
    let mut lines = vec![Line {
        aspect: "control",
        client_server: "the server orders transfers alone (no proof of work)".into(),
        peer_to_peer: "every node validates; the most-work chain decides".into(),
        source: "design (meshwork-server::ledger, meshwork-ledger)".into(),
    }];
    match find(dirs, "distribution") {
        Some(p) => {
            let r: DistReport = load(&p)?;
            let (Some(first), Some(last)) = (r.rows.first(), r.rows.last()) else {
                bail!("{}: no rows", p.display());
            };
            let src = link(&p, "distribution.svg");
            lines.push(Line {
                aspect: "scalability",
                client_server: format!(
                    "N={}→{}: {:.1} s → {:.1} s (×{:.1})",
                    first.n,
                    last.n,
                    first.client_server.secs,
                    last.client_server.secs,
                    last.client_server.secs / first.client_server.secs
                ),
                peer_to_peer: format!(
                    "N={}→{}: {:.1} s → {:.1} s (×{:.1})",
                    first.n,
                    last.n,
                    first.swarm.secs,
                    last.swarm.secs,
                    last.swarm.secs / first.swarm.secs
                ),
                source: src.clone(),
            });
            lines.push(Line {
                aspect: "cost",
                client_server: format!(
                    "the server uploads {:.2} copies at N={}",
                    last.cs_origin_copies, last.n
                ),
                peer_to_peer: format!(
                    "the origin uploads {:.2} copies at N={}; peers carry the rest",
                    last.swarm_origin_copies, last.n
                ),
                source: src,
            });
        }
        None => {
            for aspect in ["scalability", "cost"] {
                lines.push(Line {
                    aspect,
                    client_server: not_run("distribution"),
                    peer_to_peer: not_run("distribution"),
                    source: "distribution".into(),
                });
            }
        }
    }
    for (aspect, scenario) in [
        ("failure risk", "failure"),
        ("latency", "propagation"),
        ("overhead", "propagation"),
        ("censorship resistance", "sybil"),
    ] {
        lines.push(Line {
            aspect,
            client_server: not_run(scenario),
            peer_to_peer: not_run(scenario),
            source: scenario.into(),
        });
    }
    Ok(Report { lines })
}
