//! `meshwork share`, `fetch` and `content`: the content swarm through a running node's API.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use meshwork_node::content::{ContentInfo, FetchRequest, ShareRequest, State, VerifyReport};

use crate::{api_base, api_error, get, request, ClientArgs};

/// POSTs (or DELETEs, with no body) JSON and returns the answer's JSON; an error status
/// becomes the API's error sentence.
async fn send<B: serde::Serialize>(
    target: &crate::Target,
    method: reqwest::Method,
    url: &str,
    body: Option<&B>,
    timeout: Duration,
) -> Result<serde_json::Value> {
    let (code, json) = request(target, method, url, body, timeout).await?;
    if !code.is_success() {
        bail!(
            "{}",
            api_error(&json)
                .map(str::to_owned)
                .unwrap_or_else(|| format!("{url}: {code}"))
        );
    }
    Ok(json)
}

fn absolute(p: &Path) -> Result<PathBuf> {
    if p.is_absolute() {
        return Ok(p.to_owned());
    }
    Ok(std::env::current_dir()
        .context("cannot read the current directory")?
        .join(p))
}

pub async fn share(
    data_dir: Option<&Path>,
    client: ClientArgs,
    path: &Path,
    tracker: Option<String>,
    super_seed: bool,
) -> Result<()> {
    let path = absolute(path)?;
    if !path.is_file() {
        bail!("{}: not a readable file", path.display());
    }
    let base = api_base(data_dir, &client)?;
    let req = ShareRequest {
        path,
        super_seed,
        tracker,
        piece_size: None,
    };
    let json = send(
        &base,
        reqwest::Method::POST,
        &format!("{base}/api/v1/content"),
        Some(&req),
        Duration::from_secs(600),
    )
    .await?;
    if client.json {
        println!("{json}");
        return Ok(());
    }
    let info: ContentInfo = serde_json::from_value(json)?;
    println!("content  {}", info.id);
    println!("size     {} bytes", info.size.unwrap_or(0));
    println!("ticket   {}", info.ticket);
    println!();
    println!("On another machine (with a node running), fetch it with:");
    println!("  meshwork fetch {}", info.ticket);
    Ok(())
}

fn human(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

fn progress_line(c: &ContentInfo) -> String {
    let size = c.size.unwrap_or(0);
    let pct = if size > 0 {
        c.bytes_have as f64 * 100.0 / size as f64
    } else {
        0.0
    };
    let eta = if c.down_rate > 1.0 && size > c.bytes_have {
        let s = ((size - c.bytes_have) as f64 / c.down_rate) as u64;
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        "--".into()
    };
    if let Some(why) = &c.stalled {
        return format!("{pct:5.1}%  stalled: {why}");
    }
    match c.state {
        State::FetchingManifest => format!("looking for providers ({} known)", c.candidates),
        _ => format!(
            "{pct:5.1}%  {} / {}  down {}/s  up {}/s  peers {}  eta {eta}",
            human(c.bytes_have as f64),
            human(size as f64),
            human(c.down_rate),
            human(c.up_rate),
            c.peers
        ),
    }
}

pub async fn fetch(
    data_dir: Option<&Path>,
    client: ClientArgs,
    target: &str,
    out: Option<&Path>,
    tracker: Option<String>,
    timeout: Option<u64>,
) -> Result<()> {
    let base = api_base(data_dir, &client)?;
    let req = FetchRequest {
        target: target.to_string(),
        out: out.map(absolute).transpose()?,
        tracker,
    };
    let url = format!("{base}/api/v1/fetch");
    let (code, json) = request(
        &base,
        reqwest::Method::POST,
        &url,
        Some(&req),
        Duration::from_secs(15),
    )
    .await?;
    let id = if code.is_success() {
        serde_json::from_value::<ContentInfo>(json)?.id
    } else if code == reqwest::StatusCode::CONFLICT
        && api_error(&json).is_some_and(|e| e.contains("is already on this node"))
    {
        // The same fetch again (after a restart, say): follow the one the node has.
        let id = target_id(target)?;
        eprintln!("content {id} is already on this node; following it");
        id
    } else {
        bail!(
            "{}",
            api_error(&json)
                .map(str::to_owned)
                .unwrap_or_else(|| format!("{url}: {code}"))
        );
    };
    let tty = std::io::stderr().is_terminal() && !client.json;
    let begun = Instant::now();
    loop {
        let (c, raw): (ContentInfo, _) = get(&base, &format!("/api/v1/content/{id}")).await?;
        if tty {
            eprint!("\r\x1b[2K{}", progress_line(&c));
            let _ = std::io::stderr().flush();
        }
        match c.state {
            State::Seeding => {
                if tty {
                    eprintln!();
                }
                if client.json {
                    println!("{raw}");
                } else {
                    let path = c.path.map(|p| p.display().to_string()).unwrap_or_default();
                    println!("{path}");
                    println!(
                        "verified {} bytes in {:.1} s; seeding it now",
                        c.size.unwrap_or(0),
                        begun.elapsed().as_secs_f64()
                    );
                }
                return Ok(());
            }
            State::Failed => {
                if tty {
                    eprintln!();
                }
                bail!(
                    "the download of {} failed: {}",
                    c.id,
                    c.error.unwrap_or_default()
                );
            }
            _ => {}
        }
        if timeout.is_some_and(|t| begun.elapsed() >= Duration::from_secs(t)) {
            if tty {
                eprintln!();
            }
            bail!(
                "no complete file after {} s ({} of {} bytes verified; the node keeps fetching)",
                timeout.unwrap_or(0),
                c.bytes_have,
                c.size.unwrap_or(0)
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The content id a ticket or a bare id names.
fn target_id(target: &str) -> Result<String> {
    let target = target.trim();
    if target.starts_with(meshwork_swarm::ticket::PREFIX) {
        return Ok(meshwork_swarm::ticket::Ticket::decode(target)?
            .content
            .to_string());
    }
    Ok(target.parse::<meshwork_swarm::ContentId>()?.to_string())
}

pub async fn list(data_dir: Option<&Path>, client: ClientArgs) -> Result<()> {
    let base = api_base(data_dir, &client)?;
    let (all, raw): (Vec<ContentInfo>, _) = get(&base, "/api/v1/content").await?;
    if client.json {
        println!("{raw}");
        return Ok(());
    }
    if all.is_empty() {
        println!("no content");
        return Ok(());
    }
    println!(
        "{:<16} {:<17} {:>7} {:>10} {:>10} {:>5}  path",
        "id", "state", "done", "down", "up", "peers"
    );
    for c in all {
        let state = serde_json::to_value(c.state)?
            .as_str()
            .unwrap_or("?")
            .to_string();
        let pct = match c.size {
            Some(s) if s > 0 => format!("{:.1}%", c.bytes_have as f64 * 100.0 / s as f64),
            _ => "-".into(),
        };
        // The path says which file (two contents may share a name); a failed one says why,
        // and a stalled one what it waits for.
        let what = c
            .path
            .as_ref()
            .map(|p| p.display().to_string())
            .or(c.name)
            .unwrap_or_default();
        println!(
            "{:<16} {:<17} {:>7} {:>10} {:>10} {:>5}  {what}",
            &c.id[..16],
            state,
            pct,
            human(c.downloaded as f64),
            human(c.uploaded as f64),
            c.peers,
        );
        if let Some(why) = c.error.as_ref().or(c.stalled.as_ref()) {
            println!("{:<16} {why}", "");
        }
        if let Some(why) = &c.tracker_error {
            println!("{:<16} tracker failed: {why}", "");
        }
    }
    Ok(())
}

pub async fn remove(data_dir: Option<&Path>, client: ClientArgs, id: &str) -> Result<()> {
    let base = api_base(data_dir, &client)?;
    send::<()>(
        &base,
        reqwest::Method::DELETE,
        &format!("{base}/api/v1/content/{id}"),
        None,
        Duration::from_secs(15),
    )
    .await?;
    println!("removed {id}");
    Ok(())
}

pub async fn verify(data_dir: Option<&Path>, client: ClientArgs, id: &str) -> Result<()> {
    let base = api_base(data_dir, &client)?;
    let json = send::<()>(
        &base,
        reqwest::Method::POST,
        &format!("{base}/api/v1/content/{id}/verify"),
        None,
        Duration::from_secs(610),
    )
    .await?;
    if client.json {
        println!("{json}");
        return Ok(());
    }
    let r: VerifyReport = serde_json::from_value(json)?;
    let path = r.info.path.as_ref().map(|p| p.display().to_string());
    let path = path.unwrap_or_default();
    if r.bad.is_empty() {
        println!("{path}: all {} pieces held verify", r.checked);
        return Ok(());
    }
    let state = serde_json::to_value(r.info.state)?;
    bail!(
        "{path}: {} of {} pieces no longer verify (now {}){}",
        r.bad.len(),
        r.checked,
        state.as_str().unwrap_or("?"),
        r.info
            .error
            .map(|e| format!(": {e}"))
            .unwrap_or_else(|| "; fetching them again".into())
    )
}
