//! `meshwork lab run distribution`: one file of F bytes from one origin to N downloaders, every
//! host's upload capped at U, by the client-server counterpart and by the content swarm.
//!
//! The bounds are the textbook minimum distribution times (Kurose & Ross, §2.5):
//! - client-server: `max(N·F/u_s, F/d_min)`: the server uploads every copy;
//! - peer-to-peer: `max(F/u_s, F/d_min, N·F/(u_s + Σu_i))`: the origin uploads one copy,
//!   and the peers' uploads carry the rest. With every host capped alike the third term
//!   never binds (`N·F/((N+1)·u) < F/u`); capping the downloaders' uploads below the
//!   origin's (`peer_upload_mbps`) makes it the bound: the peers' uploads are the bottleneck.
//!
//! A case's time runs from the moment the downloads are asked for (the server or the nodes
//! already up) until the last downloader holds a file whose every piece verified; each copy is
//! then also compared with the original by hash. The origin's bytes are its application-level
//! upload (bytes served by the server, `uploaded` of the origin node) and, on the netns runner,
//! the bytes its link sent (headers included).
//!
//! Runners:
//! - `netns`: each case gets its own hosts (namespaces on a bridge, `tc tbf` caps) and real
//!   `meshwork` processes. The swarm cases run first, one after another, each alone on the
//!   machine; then the client-server cases, which are network-bound and light, all at once:
//!   the scenario takes about as long as the swarm cases plus the largest client-server case.
//!   (Run beside the client-server cases, whose clients hash 20 Mbit/s each, the swarm at
//!   N = 16 measured 1.16x its bound instead of 1.14x alone.)
//! - `inproc`: the same in one process over loopback, with application-level caps (the
//!   server's download limiter, the nodes' upload limit). Quicker, for the demo.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use meshwork_http::auth::{Credentials, COOKIE_FILE};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::netns::{Caps, NetnsRunner, ProcId};
use crate::scenario::{Outputs, RunnerKind};
use crate::svg::{line_chart, Series};
use crate::testbed::Arch;

const NETWORK: &str = "meshwork-lab";
const SERVER_PORT: u16 = 8080;
const NODE_PORT: u16 = 4001;
const API_PORT: u16 = 8081;

#[derive(Clone, Debug)]
pub struct DistOptions {
    pub runner: RunnerKind,
    pub ns: Vec<usize>,
    pub file_mib: u64,
    pub upload_mbps: f64,
    /// The downloaders' upload cap (peer to peer they upload to each other; client-server
    /// their uploads carry nothing); `None`: the same as every other host's, `upload_mbps`.
    pub peer_upload_mbps: Option<f64>,
    pub download_mbps: Option<f64>,
    /// The piece size in KiB; `None`: the swarm's default for the file's size (64 KiB for
    /// 64 MiB, see `manifest::default_piece_size`).
    pub piece_kib: Option<u32>,
    pub seed: u64,
    pub out: PathBuf,
    /// The `meshwork` binary the netns runner starts.
    pub bin: Option<PathBuf>,
    /// inproc: the loopback index of the first case's first host.
    pub first_index: usize,
}

impl DistOptions {
    pub fn new(runner: RunnerKind, out: &Path) -> DistOptions {
        DistOptions {
            runner,
            ns: vec![1, 2, 4, 8, 16],
            file_mib: 64,
            upload_mbps: 20.0,
            peer_upload_mbps: None,
            download_mbps: None,
            piece_kib: None,
            seed: 1,
            out: out.to_path_buf(),
            bin: None,
            first_index: 0,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ArchResult {
    /// Until the last downloader held a verified copy.
    pub secs: f64,
    /// Each downloader's completion time, sorted.
    pub completion_secs: Vec<f64>,
    /// What the origin uploaded (application bytes).
    pub origin_bytes: u64,
    /// What the origin's link sent, headers included (netns only).
    pub origin_wire_bytes: Option<u64>,
    /// Copies byte-identical to the original.
    pub verified: usize,
    /// Swarm: bytes the downloaders received but discarded (duplicate blocks, failed pieces).
    #[serde(default)]
    pub wasted_bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    pub n: usize,
    pub bound_cs_secs: f64,
    pub bound_p2p_secs: f64,
    pub client_server: ArchResult,
    pub swarm: ArchResult,
    pub cs_ratio: f64,
    pub swarm_ratio: f64,
    /// Origin upload in copies of the file.
    pub cs_origin_copies: f64,
    pub swarm_origin_copies: f64,
}

impl Row {
    /// Whether either time beats its physical bound: a measurement bug, never a result.
    pub fn below_bound(&self) -> bool {
        self.cs_ratio < 1.0 || self.swarm_ratio < 1.0
    }
}

/// A ratio to the bound as a report prints it: below 1.0 it is flagged as the measurement
/// error it is (no transfer can beat the time its upload capacity allows), not shown as a
/// result.
pub fn ratio_cell(ratio: f64) -> String {
    if ratio < 1.0 {
        format!("{ratio:.3} ⚠ below the bound: a measurement error, not a result")
    } else {
        format!("{ratio:.3}")
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Overhead {
    /// Building the hosts of the largest case.
    pub setup_secs: f64,
    pub setup_hosts: usize,
    /// Removing them.
    pub teardown_secs: f64,
    /// The runner process's own CPU over the whole scenario, in % of one core.
    pub runner_cpu_pct: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DistReport {
    pub scenario: String,
    pub runner: RunnerKind,
    pub seed: u64,
    pub file_bytes: u64,
    pub upload_bps: f64,
    pub download_bps: Option<f64>,
    pub rows: Vec<Row>,
    pub overhead: Overhead,
    pub total_secs: f64,
}

/// The client-server and peer-to-peer bounds, in seconds, for `n` downloaders of `f` bits:
/// the origin (server) uploads `u` bit/s, each downloader `u_peer`, and downloads `d`.
fn bounds(n: usize, f: f64, u: f64, u_peer: f64, d: Option<f64>) -> (f64, f64) {
    let d_term = d.map(|d| f / d).unwrap_or(0.0);
    let cs = (n as f64 * f / u).max(d_term);
    let p2p = (f / u)
        .max(d_term)
        .max(n as f64 * f / (u + n as f64 * u_peer));
    (cs, p2p)
}

impl DistOptions {
    /// The downloaders' upload cap, bit/s.
    fn peer_upload_bps(&self) -> f64 {
        self.peer_upload_mbps.unwrap_or(self.upload_mbps) * 1e6
    }
}

/// Writes a seeded random file of `bytes`; returns its hash.
pub fn make_file(path: &Path, bytes: u64, seed: u64) -> Result<blake3::Hash> {
    use std::io::Write;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        h.update(&buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(h.finalize())
}

fn hash_file(path: &Path) -> Result<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(path).with_context(|| path.display().to_string())?)?;
    Ok(h.finalize())
}

/// Counts the copies identical to `want`, then deletes them (they add up to N·F per case).
fn verify_copies(copies: &[PathBuf], want: blake3::Hash) -> Result<usize> {
    let mut ok = 0;
    for c in copies {
        if hash_file(c)? == want {
            ok += 1;
        }
        let _ = std::fs::remove_file(c);
    }
    Ok(ok)
}

pub async fn run(o: DistOptions) -> Result<(DistReport, Outputs)> {
    ensure!(!o.ns.is_empty(), "no N to run");
    ensure!(o.ns.iter().all(|n| *n >= 1), "every N must be at least 1");
    ensure!(o.file_mib >= 1, "the file must be at least 1 MiB");
    ensure!(o.upload_mbps > 0.0, "the upload cap must be positive");
    ensure!(
        o.peer_upload_mbps.is_none_or(|p| p > 0.0),
        "the downloaders' upload cap must be positive"
    );
    let started = Instant::now();
    let cpu0 = crate::resources::cpu_time();
    let work = o.out.join("work");
    std::fs::create_dir_all(&work)?;
    let file = work.join("payload.bin");
    let bytes = o.file_mib << 20;
    let want = {
        let (f, seed) = (file.clone(), o.seed);
        tokio::task::spawn_blocking(move || make_file(&f, bytes, seed)).await??
    };
    let u = o.upload_mbps * 1e6;
    let d = o.download_mbps.map(|d| d * 1e6);
    let mut overhead = Overhead::default();
    let (cs, swarm) = match o.runner {
        RunnerKind::Netns => netns_all(&o, &file, want, &mut overhead).await?,
        RunnerKind::Inproc => inproc_all(&o, &file, want).await?,
    };
    let f = bytes as f64;
    let rows =
        o.ns.iter()
            .zip(cs.into_iter().zip(swarm))
            .map(|(&n, (c, s))| {
                let (bcs, bp2p) = bounds(n, f * 8.0, u, o.peer_upload_bps(), d);
                Row {
                    n,
                    bound_cs_secs: bcs,
                    bound_p2p_secs: bp2p,
                    cs_ratio: c.secs / bcs,
                    swarm_ratio: s.secs / bp2p,
                    cs_origin_copies: c.origin_bytes as f64 / f,
                    swarm_origin_copies: s.origin_bytes as f64 / f,
                    client_server: c,
                    swarm: s,
                }
            })
            .collect::<Vec<_>>();
    let _ = std::fs::remove_file(&file);
    let total = started.elapsed();
    if let (Some(a), Some(b)) = (cpu0, crate::resources::cpu_time()) {
        overhead.runner_cpu_pct = (b - a).as_secs_f64() / total.as_secs_f64() * 100.0;
    }
    let report = DistReport {
        scenario: "distribution".into(),
        runner: o.runner,
        seed: o.seed,
        file_bytes: bytes,
        upload_bps: u,
        download_bps: d,
        rows,
        overhead,
        total_secs: total.as_secs_f64(),
    };
    let outputs = outputs(&report)?;
    Ok((report, outputs))
}

fn outputs(r: &DistReport) -> Result<Outputs> {
    let mut md = String::new();
    use std::fmt::Write;
    writeln!(
        md,
        "# Distribution: {} MiB to N downloaders, upload {} Mbit/s ({} runner)\n",
        r.file_bytes >> 20,
        r.upload_bps / 1e6,
        r.runner
    )?;
    writeln!(
        md,
        "| N | client-server s | bound N·F/u_s | ratio | server uploaded (copies) | swarm s | P2P bound | ratio | origin uploaded (copies) | verified |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|---|")?;
    for row in &r.rows {
        writeln!(
            md,
            "| {} | {:.1} | {:.1} | {} | {:.2} | {:.1} | {:.1} | {} | {:.2} | {}+{} of {} |",
            row.n,
            row.client_server.secs,
            row.bound_cs_secs,
            ratio_cell(row.cs_ratio),
            row.cs_origin_copies,
            row.swarm.secs,
            row.bound_p2p_secs,
            ratio_cell(row.swarm_ratio),
            row.swarm_origin_copies,
            row.client_server.verified,
            row.swarm.verified,
            2 * row.n
        )?;
    }
    if r.rows.iter().any(Row::below_bound) {
        writeln!(
            md,
            "\n**A measured time is below its physical bound**: the caps or the clock of this run \
             are wrong, and its ratios are not results."
        )?;
    }
    writeln!(
        md,
        "\nRunner: setup of {} hosts {:.2} s, teardown {:.2} s, runner CPU {:.1} % of a core; scenario {:.0} s.\n\n![time vs N](distribution.svg)",
        r.overhead.setup_hosts,
        r.overhead.setup_secs,
        r.overhead.teardown_secs,
        r.overhead.runner_cpu_pct,
        r.total_secs
    )?;
    let pts = |f: &dyn Fn(&Row) -> f64| r.rows.iter().map(|x| (x.n as f64, f(x))).collect();
    let svg = line_chart(
        &format!(
            "{} MiB to N downloaders at {} Mbit/s upload",
            r.file_bytes >> 20,
            r.upload_bps / 1e6
        ),
        "N (downloaders)",
        "seconds until the last verified copy",
        &[
            Series {
                name: "client-server".into(),
                points: pts(&|x| x.client_server.secs),
                dashed: false,
            },
            Series {
                name: "swarm".into(),
                points: pts(&|x| x.swarm.secs),
                dashed: false,
            },
            Series {
                name: "bound N·F/u_s".into(),
                points: pts(&|x| x.bound_cs_secs),
                dashed: true,
            },
            Series {
                name: "P2P bound".into(),
                points: pts(&|x| x.bound_p2p_secs),
                dashed: true,
            },
        ],
    );
    Ok(Outputs {
        json: serde_json::to_value(r)?,
        markdown: md,
        svgs: vec![("distribution.svg".into(), svg)],
    })
}

// ---------------------------------------------------------------------------------------
// netns

async fn netns_all(
    o: &DistOptions,
    file: &Path,
    want: blake3::Hash,
    overhead: &mut Overhead,
) -> Result<(Vec<ArchResult>, Vec<ArchResult>)> {
    let bin = o
        .bin
        .clone()
        .context("the netns runner needs the meshwork binary")?;
    let caps = Caps {
        up_bps: Some((o.upload_mbps * 1e6) as u64),
        down_bps: o.download_mbps.map(|d| (d * 1e6) as u64),
    };
    let mut swarm = vec![];
    for &n in &o.ns {
        let r = swarm_netns(o, &bin, caps, n, file, want).await?;
        progress(o, Arch::PeerToPeer, n, &r.0);
        swarm.push(r);
    }
    let bin = &bin;
    let cs = futures::future::try_join_all(o.ns.iter().map(|&n| async move {
        let r = cs_netns(o, bin, caps, n, file, want).await?;
        progress(o, Arch::ClientServer, n, &r.0);
        Ok::<_, anyhow::Error>(r)
    }))
    .await?;
    let mut res_cs = vec![];
    for (r, ov) in cs.into_iter().chain(swarm.iter().cloned()) {
        if ov.setup_hosts > overhead.setup_hosts {
            overhead.setup_hosts = ov.setup_hosts;
            overhead.setup_secs = ov.setup_secs;
            overhead.teardown_secs = ov.teardown_secs;
        }
        res_cs.push(r);
    }
    let res_swarm = res_cs.split_off(o.ns.len());
    Ok((res_cs, res_swarm))
}

/// One JSON call; `creds` for a node's API (or a server's mutating call).
async fn http_json(
    method: reqwest::Method,
    url: &str,
    body: Option<serde_json::Value>,
    creds: Option<&Credentials>,
) -> Result<serde_json::Value> {
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let mut req = c.request(method, url);
    if let Some(creds) = creds {
        req = creds.apply(req);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.with_context(|| url.to_string())?;
    let code = r.status();
    let v: serde_json::Value =
        meshwork_http::body::read_json_capped(r, meshwork_http::body::API_ANSWER_MAX)
            .await
            .unwrap_or(serde_json::Value::Null);
    if !code.is_success() {
        bail!("{url}: {code}: {v}");
    }
    Ok(v)
}

/// Waits until the process `proc` answers at `addr`, failing early if it exits.
async fn wait_up(r: &mut NetnsRunner, proc: ProcId, addr: &str, timeout: Duration) -> Result<()> {
    crate::api::wait_up(&crate::api::Api::new(addr), timeout, || {
        Ok(r.exited(proc)?
            .map(|st| format!("the process exited ({st}):\n{}", r.log(proc))))
    })
    .await
}

/// The work directory of one case, emptied: a case starts clean (an earlier run's data
/// directories, identities included, would refuse `init`).
fn case_dir(o: &DistOptions, kind: &str, n: usize) -> PathBuf {
    let dir = o.out.join("work").join(format!("{kind}-{n}"));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn deadline_for(o: &DistOptions, n: usize) -> Duration {
    let f = (o.file_mib << 20) as f64 * 8.0;
    let (cs, _) = bounds(n, f, o.upload_mbps * 1e6, o.peer_upload_bps(), None);
    Duration::from_secs_f64(cs * 3.0 + 60.0)
}

async fn cs_netns(
    o: &DistOptions,
    bin: &Path,
    caps: Caps,
    n: usize,
    file: &Path,
    want: blake3::Hash,
) -> Result<(ArchResult, Overhead)> {
    let dir = case_dir(o, "cs", n);
    let mut r = NetnsRunner::new(bin, &dir, &vec![caps; n + 1])?;
    let mut ov = Overhead {
        setup_secs: r.setup_time.as_secs_f64(),
        setup_hosts: n + 1,
        ..Default::default()
    };
    let ip0 = r.ip(0);
    let base = format!("http://{ip0}:{SERVER_PORT}");
    let srv = r.spawn(
        0,
        "server",
        &[
            "--data-dir".into(),
            dir.join("server").display().to_string(),
            "server".into(),
            "start".into(),
            "--listen".into(),
            format!("{ip0}:{SERVER_PORT}"),
            "--network".into(),
            NETWORK.into(),
        ],
    )?;
    wait_up(&mut r, srv, &base, Duration::from_secs(30)).await?;
    // The server wrote its cookie before it answered.
    let server_creds = Credentials::read(&dir.join("server").join(COOKIE_FILE))?;
    let sum = meshwork_server::client::upload(&base, &server_creds, file).await?;
    let served0 = http_json(
        reqwest::Method::GET,
        &format!("{base}/api/v1/status"),
        None,
        None,
    )
    .await?["bytes_served"]
        .as_u64()
        .unwrap_or(0);
    let wire0 = r.tx_bytes(0)?;
    let t0 = Instant::now();
    let mut clients = vec![];
    let mut copies = vec![];
    for i in 1..=n {
        let out = dir.join(format!("copy-{i}.bin"));
        let p = r.spawn(
            i,
            "client",
            &[
                "--server".into(),
                base.clone(),
                "fetch".into(),
                sum.id.clone(),
                "-o".into(),
                out.display().to_string(),
                "--json".into(),
            ],
        )?;
        clients.push(p);
        copies.push(out);
    }
    let mut done = vec![None; n];
    let deadline = t0 + deadline_for(o, n);
    while done.iter().any(Option::is_none) {
        for (k, &p) in clients.iter().enumerate() {
            if done[k].is_none() {
                if let Some(st) = r.exited(p)? {
                    ensure!(
                        st.success(),
                        "client {} failed ({st}):\n{}",
                        k + 1,
                        r.log(p)
                    );
                    done[k] = Some(t0.elapsed().as_secs_f64());
                }
            }
        }
        ensure!(Instant::now() < deadline, "client-server N={n} timed out");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let served = http_json(
        reqwest::Method::GET,
        &format!("{base}/api/v1/status"),
        None,
        None,
    )
    .await?["bytes_served"]
        .as_u64()
        .unwrap_or(0);
    let wire = r.tx_bytes(0)? - wire0;
    let mut times: Vec<f64> = done.into_iter().flatten().collect();
    times.sort_by(f64::total_cmp);
    let verified = tokio::task::spawn_blocking(move || verify_copies(&copies, want)).await??;
    ov.teardown_secs = r.teardown().as_secs_f64();
    Ok((
        ArchResult {
            secs: times.last().copied().unwrap_or(0.0),
            completion_secs: times,
            origin_bytes: served - served0,
            origin_wire_bytes: Some(wire),
            verified,
            wasted_bytes: 0,
        },
        ov,
    ))
}

async fn swarm_netns(
    o: &DistOptions,
    bin: &Path,
    caps: Caps,
    n: usize,
    file: &Path,
    want: blake3::Hash,
) -> Result<(ArchResult, Overhead)> {
    let dir = case_dir(o, "swarm", n);
    // Host 0 is the origin; the downloaders upload at their own cap.
    let peer = Caps {
        up_bps: Some(o.peer_upload_bps() as u64),
        ..caps
    };
    let hosts: Vec<Caps> = std::iter::once(caps)
        .chain(std::iter::repeat_n(peer, n))
        .collect();
    let mut r = NetnsRunner::new(bin, &dir, &hosts)?;
    let mut ov = Overhead {
        setup_secs: r.setup_time.as_secs_f64(),
        setup_hosts: n + 1,
        ..Default::default()
    };
    let mut origin_peer = String::new();
    for i in 0..=n {
        let d = dir.join(format!("node-{i}"));
        let out = std::process::Command::new(bin)
            .args([
                "--data-dir",
                &d.display().to_string(),
                "init",
                "--network",
                NETWORK,
            ])
            .output()
            .context("meshwork init")?;
        ensure!(
            out.status.success(),
            "meshwork init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if i == 0 {
            origin_peer = String::from_utf8_lossy(&out.stdout)
                .lines()
                .find_map(|l| l.strip_prefix("peer id").map(|p| p.trim().to_string()))
                .context("init printed no peer id")?;
        }
    }
    let origin_addr = format!("/ip4/{}/tcp/{NODE_PORT}/p2p/{origin_peer}", r.ip(0));
    let mut nodes = vec![];
    for i in 0..=n {
        let ip = r.ip(i);
        let mut args = vec![
            "--data-dir".to_string(),
            dir.join(format!("node-{i}")).display().to_string(),
            "node".into(),
            "start".into(),
            "--listen".into(),
            format!("/ip4/{ip}/tcp/{NODE_PORT}"),
            "--api".into(),
            format!("{ip}:{API_PORT}"),
            "--allow-private-addrs".into(),
        ];
        if i > 0 {
            args.extend(["--bootstrap".into(), origin_addr.clone()]);
        }
        nodes.push(r.spawn(i, "node", &args)?);
    }
    for (i, &node) in nodes.iter().enumerate() {
        let addr = format!("{}:{API_PORT}", r.ip(i));
        wait_up(&mut r, node, &addr, Duration::from_secs(60)).await?;
    }
    let api = |i: usize| format!("http://{}:{API_PORT}/api/v1", r.ip(i));
    // Each node wrote its cookie before its API answered.
    let creds = (0..=n)
        .map(|i| Credentials::read(&dir.join(format!("node-{i}")).join(COOKIE_FILE)))
        .collect::<Result<Vec<_>, _>>()?;
    let shared = http_json(
        reqwest::Method::POST,
        &format!("{}/content", api(0)),
        Some(serde_json::json!({
            "path": file, "super_seed": true, "piece_size": o.piece_kib.map(|k| k << 10)
        })),
        Some(&creds[0]),
    )
    .await?;
    let id = shared["id"].as_str().context("share answer")?.to_string();
    let ticket = shared["ticket"]
        .as_str()
        .context("share answer")?
        .to_string();
    let wire0 = r.tx_bytes(0)?;
    let t0 = Instant::now();
    let mut copies = vec![];
    for (i, node_creds) in creds.iter().enumerate().skip(1) {
        let out = dir.join(format!("copy-{i}.bin"));
        http_json(
            reqwest::Method::POST,
            &format!("{}/fetch", api(i)),
            Some(serde_json::json!({ "target": ticket, "out": out })),
            Some(node_creds),
        )
        .await?;
        copies.push(out);
    }
    let mut done = vec![None; n];
    let mut wasted = 0;
    let deadline = t0 + deadline_for(o, n);
    while done.iter().any(Option::is_none) {
        for (k, slot) in done.iter_mut().enumerate() {
            if slot.is_some() {
                continue;
            }
            let info = http_json(
                reqwest::Method::GET,
                &format!("{}/content/{id}", api(k + 1)),
                None,
                Some(&creds[k + 1]),
            )
            .await?;
            match info["state"].as_str() {
                Some("seeding") => {
                    *slot = Some(t0.elapsed().as_secs_f64());
                    wasted += info["wasted"].as_u64().unwrap_or(0);
                }
                Some("failed") => bail!("swarm N={n}: node {} failed: {info}", k + 1),
                _ => {}
            }
        }
        ensure!(Instant::now() < deadline, "swarm N={n} timed out");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let origin = http_json(
        reqwest::Method::GET,
        &format!("{}/content/{id}", api(0)),
        None,
        Some(&creds[0]),
    )
    .await?;
    let wire = r.tx_bytes(0)? - wire0;
    let mut times: Vec<f64> = done.into_iter().flatten().collect();
    times.sort_by(f64::total_cmp);
    let verified = tokio::task::spawn_blocking(move || verify_copies(&copies, want)).await??;
    ov.teardown_secs = r.teardown().as_secs_f64();
    Ok((
        ArchResult {
            secs: times.last().copied().unwrap_or(0.0),
            completion_secs: times,
            origin_bytes: origin["uploaded"].as_u64().unwrap_or(0),
            origin_wire_bytes: Some(wire),
            verified,
            wasted_bytes: wasted,
        },
        ov,
    ))
}

// ---------------------------------------------------------------------------------------
// inproc

async fn inproc_all(
    o: &DistOptions,
    file: &Path,
    want: blake3::Hash,
) -> Result<(Vec<ArchResult>, Vec<ArchResult>)> {
    let mut cs = vec![];
    let mut swarm = vec![];
    // Each case's nodes get loopback addresses of their own: a case that reused the last
    // one's addresses and ports met its dying connections and stalled.
    let mut first = o.first_index;
    for &n in &o.ns {
        cs.push(cs_inproc(o, n, file, want).await?);
        progress(o, Arch::ClientServer, n, &cs[cs.len() - 1]);
        swarm.push(swarm_inproc(o, n, first, file, want).await?);
        progress(o, Arch::PeerToPeer, n, &swarm[swarm.len() - 1]);
        first += n + 1;
    }
    Ok((cs, swarm))
}

/// One line on stderr per finished case: a full run takes ten minutes, and whoever watches
/// it sees each figure as it comes.
fn progress(o: &DistOptions, arch: Arch, n: usize, r: &ArchResult) {
    let f = (o.file_mib << 20) as f64;
    let (bcs, bp2p) = bounds(
        n,
        f * 8.0,
        o.upload_mbps * 1e6,
        o.peer_upload_bps(),
        o.download_mbps.map(|d| d * 1e6),
    );
    let bound = match arch {
        Arch::ClientServer => bcs,
        Arch::PeerToPeer => bp2p,
    };
    eprintln!(
        "distribution: {arch} N={n}: {:.1} s, {}× the bound ({bound:.1} s), origin uploaded {:.2} copies, {} of {n} verified",
        r.secs,
        ratio_cell(r.secs / bound),
        r.origin_bytes as f64 / f,
        r.verified
    );
}

async fn cs_inproc(
    o: &DistOptions,
    n: usize,
    file: &Path,
    want: blake3::Hash,
) -> Result<ArchResult> {
    let dir = case_dir(o, "cs", n);
    let mut cfg = meshwork_server::server::ServerConfig::new(
        &dir.join("server"),
        meshwork_ledger::ChainSpec::for_network(NETWORK),
    );
    cfg.upload_limit = Some((o.upload_mbps * 1e6 / 8.0) as u64);
    cfg.piece_size = o.piece_kib.map(|k| k << 10);
    let srv = meshwork_server::server::start("127.0.0.1:0".parse()?, cfg).await?;
    let base = format!("http://{}", srv.addr);
    let sum = meshwork_server::client::upload(&base, &srv.api_credentials(), file).await?;
    let id: meshwork_swarm::ContentId = sum.id.parse()?;
    let t0 = Instant::now();
    let mut tasks = vec![];
    let mut copies = vec![];
    for i in 1..=n {
        let out = dir.join(format!("copy-{i}.bin"));
        copies.push(out.clone());
        let base = base.clone();
        tasks.push(tokio::spawn(async move {
            meshwork_server::client::download(&base, &id, &out, |_, _| {}).await?;
            Ok::<_, anyhow::Error>(t0.elapsed().as_secs_f64())
        }));
    }
    let mut times = vec![];
    for t in tasks {
        times.push(t.await??);
    }
    times.sort_by(f64::total_cmp);
    let st = http_json(
        reqwest::Method::GET,
        &format!("{base}/api/v1/status"),
        None,
        None,
    )
    .await?;
    srv.stop().await;
    let verified = tokio::task::spawn_blocking(move || verify_copies(&copies, want)).await??;
    Ok(ArchResult {
        secs: times.last().copied().unwrap_or(0.0),
        completion_secs: times,
        origin_bytes: st["bytes_served"].as_u64().unwrap_or(0),
        origin_wire_bytes: None,
        verified,
        wasted_bytes: 0,
    })
}

async fn swarm_inproc(
    o: &DistOptions,
    n: usize,
    first: usize,
    file: &Path,
    want: blake3::Hash,
) -> Result<ArchResult> {
    use meshwork_node::content::{FetchRequest, ShareRequest, State};
    let dir = case_dir(o, "swarm", n);
    std::fs::create_dir_all(&dir)?;
    let limit = (o.upload_mbps * 1e6 / 8.0) as u64;
    let peer_limit = (o.peer_upload_bps() / 8.0) as u64;
    let h = crate::HarnessBuilder::new("test-lab-dist")?
        .topology(crate::Topology::Star)
        .first_index(first)
        // Node 0 is the origin; the others are the downloaders.
        .tweak(move |i, c| c.content.upload_limit = Some(if i == 0 { limit } else { peer_limit }))
        .spawn(n + 1)
        .await?;
    let origin = h.running(0)?.handle.clone();
    let shared = origin
        .content
        .share(ShareRequest {
            path: file.to_path_buf(),
            super_seed: true,
            tracker: None,
            piece_size: o.piece_kib.map(|k| k << 10),
        })
        .await?;
    let id: meshwork_swarm::ContentId = shared.id.parse()?;
    let t0 = Instant::now();
    let mut copies = vec![];
    for i in 1..=n {
        let out = dir.join(format!("copy-{i}.bin"));
        h.running(i)?
            .handle
            .content
            .fetch(FetchRequest {
                target: shared.ticket.clone(),
                out: Some(out.clone()),
                tracker: None,
            })
            .await?;
        copies.push(out);
    }
    let mut done = vec![None; n];
    let mut wasted = 0;
    let deadline = t0 + deadline_for(o, n);
    while done.iter().any(Option::is_none) {
        for (k, slot) in done.iter_mut().enumerate() {
            if slot.is_none() {
                let info = h.running(k + 1)?.handle.content.get(id).await?;
                match info.as_ref().map(|i| i.state) {
                    Some(State::Seeding) => {
                        *slot = Some(t0.elapsed().as_secs_f64());
                        wasted += info.map_or(0, |i| i.wasted);
                    }
                    Some(State::Failed) => bail!("swarm N={n}: node {} failed", k + 1),
                    _ => {}
                }
            }
        }
        ensure!(Instant::now() < deadline, "swarm N={n} timed out");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let up = origin
        .content
        .get(id)
        .await?
        .map(|i| i.uploaded)
        .unwrap_or(0);
    h.shutdown().await;
    let mut times: Vec<f64> = done.into_iter().flatten().collect();
    times.sort_by(f64::total_cmp);
    let verified = tokio::task::spawn_blocking(move || verify_copies(&copies, want)).await??;
    Ok(ArchResult {
        secs: times.last().copied().unwrap_or(0.0),
        completion_secs: times,
        origin_bytes: up,
        origin_wire_bytes: None,
        verified,
        wasted_bytes: wasted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_time_below_its_bound_is_flagged_not_reported() {
        let row = |swarm_secs: f64| Row {
            n: 1,
            bound_cs_secs: 1.0,
            bound_p2p_secs: 1.0,
            client_server: ArchResult {
                secs: 1.2,
                ..Default::default()
            },
            swarm: ArchResult {
                secs: swarm_secs,
                ..Default::default()
            },
            cs_ratio: 1.2,
            swarm_ratio: swarm_secs,
            cs_origin_copies: 1.0,
            swarm_origin_copies: 1.0,
        };
        let report = |r: Row| DistReport {
            scenario: "distribution".into(),
            runner: RunnerKind::Inproc,
            seed: 0,
            file_bytes: 1 << 20,
            upload_bps: 1e6,
            download_bps: None,
            rows: vec![r],
            overhead: Overhead::default(),
            total_secs: 1.0,
        };
        let fine = outputs(&report(row(1.1))).unwrap().markdown;
        assert!(
            !fine.contains("below the bound") && fine.contains("| 1.100 |"),
            "{fine}"
        );
        let wrong = outputs(&report(row(0.903))).unwrap().markdown;
        assert!(wrong.contains("0.903 ⚠ below the bound"), "{wrong}");
        assert!(wrong.contains("its ratios are not results"), "{wrong}");
        assert!(row(0.903).below_bound() && !row(1.1).below_bound());
    }

    #[test]
    fn bounds_follow_the_textbook() {
        let f = 64.0 * 8.0 * 1048576.0;
        let u = 20e6;
        let (cs, p2p) = bounds(16, f, u, u, None);
        assert!((cs - 16.0 * f / u).abs() < 1e-9);
        assert!(
            (p2p - f / u).abs() < 1e-9,
            "the origin's one copy dominates"
        );
        let (_, p2p) = bounds(4, f, u, u, Some(5e6));
        assert!((p2p - f / 5e6).abs() < 1e-9, "a slow downloader dominates");
        let (_, p2p) = bounds(4, f, u, u / 8.0, None);
        assert!(
            (p2p - 4.0 * f / (u + 4.0 * u / 8.0)).abs() < 1e-9,
            "slow peer uploads dominate"
        );
    }
}
