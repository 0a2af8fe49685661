//! `meshwork lab`: the scenarios that measure client-server against peer to peer, their
//! report, the netns runner's cleanup, the lab's client process (`lab agent`), and two
//! one-off measurements (`transfer`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use meshwork_lab::scenario::{Common, Outputs, RunnerKind};

use crate::StopSignals;

/// The scenarios `lab run` knows.
const SCENARIOS: &str = "distribution, propagation, failure, churn, partition, sybil";

#[derive(Subcommand)]
pub(crate) enum LabCommand {
    /// Run a scenario (distribution, propagation, failure, churn, partition, sybil); writes
    /// SCENARIO.json, SCENARIO.md and SVG plots to --out.
    Run(LabRunArgs),
    /// The comparison table of client-server and peer-to-peer, from scenario results.
    Report {
        /// Directories holding scenario results (SCENARIO.json files).
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
    },
    /// Remove namespaces and links left by netns runners that were killed (SIGKILL).
    Clean,
    /// The lab's client, run by the netns runner inside a user's host: submits a transfer of 1
    /// every --interval-ms to a node or server until killed, printing one JSON record per
    /// attempt.
    Agent {
        /// The service: a node's API or a server (http://HOST:PORT).
        #[arg(long, value_name = "URL")]
        target: String,
        /// The sender's key file.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The receiver's address.
        #[arg(long, value_name = "ADDR")]
        to: String,
        #[arg(long, default_value_t = 500)]
        interval_ms: u64,
        /// The target's API cookie (a node's `<data-dir>/api.cookie`), re-read when the
        /// target restarts.
        #[arg(long, value_name = "FILE")]
        api_cookie: Option<PathBuf>,
    },
    /// One file over one loopback connection: the content swarm (shared, fetched, verified,
    /// written) against a raw libp2p stream copy between the same two nodes. Prints JSON.
    Transfer {
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
        #[arg(long, default_value_t = 256)]
        piece_kib: u32,
        /// Where to write the two files (default: a temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Args)]
pub(crate) struct LabRunArgs {
    /// distribution, propagation, failure, churn, partition or sybil.
    scenario: String,
    /// netns: real processes in network namespaces (needs root); inproc: one process.
    /// Default: netns, but inproc for sybil (which runs only in process).
    #[arg(long)]
    runner: Option<RunnerKind>,
    /// Users (nodes, or clients of the server). distribution: the largest N, run as 1, 2,
    /// 4, ... up to it. Defaults: distribution 16, propagation 100, failure 16, churn 16,
    /// partition 10, sybil 50 honest nodes.
    #[arg(long)]
    nodes: Option<usize>,
    /// distribution: an explicit list of N instead of the doubling up to --nodes.
    #[arg(long, value_delimiter = ',', value_name = "N,N,...")]
    ns: Vec<usize>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value = "lab-results", value_name = "DIR")]
    out: PathBuf,
    /// distribution, failure, churn: the file's size (defaults: 64, 16, 16).
    #[arg(long)]
    file_mib: Option<u64>,
    /// distribution, failure, churn: every host's upload cap.
    #[arg(long, default_value_t = 20.0)]
    upload_mbps: f64,
    /// distribution: every host's download cap (none by default).
    #[arg(long)]
    download_mbps: Option<f64>,
    /// distribution: the piece size in KiB (default: the swarm's default for the file's size,
    /// about a thousand pieces).
    #[arg(long)]
    piece_kib: Option<u32>,
    /// failure, churn, partition: milliseconds between two transfers of one client;
    /// propagation: between two transfers (blocks: four times this).
    #[arg(long)]
    interval_ms: Option<u64>,
    /// failure: the share of peers that crash.
    #[arg(long, default_value_t = 0.5)]
    fraction: f64,
    /// failure: seconds the clients go on after the crash; churn: seconds of churn;
    /// partition: seconds apart.
    #[arg(long)]
    secs: Option<u64>,
    /// churn: seconds between two crashes.
    #[arg(long, default_value_t = 3)]
    period_secs: u64,
    /// churn: seconds a crashed user stays away (give or take a half).
    #[arg(long, default_value_t = 10)]
    down_secs: u64,
    /// propagation: transfers and blocks to send.
    #[arg(long, default_value_t = 30)]
    txs: usize,
    #[arg(long, default_value_t = 5)]
    blocks: usize,
    /// propagation: seconds of quiet after the nodes connect, before the first message.
    #[arg(long, default_value_t = 10)]
    settle_secs: u64,
    /// sybil: addresses in the flood.
    #[arg(long, default_value_t = 5000)]
    flood: usize,
}

/// 1, 2, 4, ... up to `max`, and `max` itself.
fn doubling(max: usize) -> Vec<usize> {
    let mut v = vec![];
    let mut n = 1;
    while n < max {
        v.push(n);
        n *= 2;
    }
    v.push(max.max(1));
    v
}

/// This program's path, for the processes the netns runner starts. Linux names a binary
/// replaced on disk while it runs (a rebuild) "PATH (deleted)"; the new one is at PATH.
fn this_binary() -> Result<PathBuf> {
    let p = std::env::current_exe().context("cannot find this binary")?;
    let s = p.to_string_lossy();
    Ok(match s.strip_suffix(" (deleted)") {
        Some(orig) => PathBuf::from(orig),
        None => p,
    })
}

pub(crate) async fn run(cmd: LabCommand) -> Result<()> {
    match cmd {
        LabCommand::Run(args) => lab_run(args).await,
        LabCommand::Report { dirs } => {
            let r = meshwork_lab::report::build(&dirs)?;
            println!("{}", r.markdown());
            Ok(())
        }
        LabCommand::Clean => {
            for p in meshwork_lab::netns::clean_stale() {
                println!("removed what runner {p} left");
            }
            Ok(())
        }
        LabCommand::Agent {
            target,
            key,
            to,
            interval_ms,
            api_cookie,
        } => {
            if interval_ms == 0 {
                bail!("--interval-ms must be at least 1");
            }
            let agent = meshwork_lab::agent::Agent {
                target: match api_cookie {
                    Some(c) => meshwork_lab::api::Api::with_cookie_file(target, c),
                    None => meshwork_lab::api::Api::new(target),
                },
                wallet: crate::wallet::load_wallet(&key)?,
                to: to.parse().context("--to")?,
                interval: Duration::from_millis(interval_ms),
            };
            agent
                .run(|a| match serde_json::to_string(&a) {
                    Ok(line) => println!("{line}"),
                    Err(e) => eprintln!("cannot encode an attempt: {e}"),
                })
                .await;
            Ok(())
        }
        LabCommand::Transfer {
            size_mib,
            piece_kib,
            dir,
        } => {
            let report = meshwork_lab::transfer::run(meshwork_lab::transfer::TransferOptions {
                size_mib,
                piece_kib,
                dir,
            })
            .await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
    }
}

/// What the command line sets in every scenario's common options.
fn common(a: &LabRunArgs, c: &mut Common, bin: Option<PathBuf>) {
    if let Some(n) = a.nodes {
        c.users = n;
    }
    c.seed = a.seed;
    c.bin = bin;
}

/// The runner a scenario uses when none is named.
fn runner_of(a: &LabRunArgs) -> RunnerKind {
    a.runner.unwrap_or(if a.scenario == "sybil" {
        RunnerKind::Inproc
    } else {
        RunnerKind::Netns
    })
}

async fn scenario(a: &LabRunArgs) -> Result<Outputs> {
    let bin = Some(this_binary()?);
    let runner = runner_of(a);
    let interval = a.interval_ms.map(Duration::from_millis);
    let secs = a.secs.map(Duration::from_secs);
    Ok(match a.scenario.as_str() {
        "distribution" => {
            let mut o = meshwork_lab::distribution::DistOptions::new(runner, &a.out);
            o.ns = if a.ns.is_empty() {
                doubling(a.nodes.unwrap_or(16))
            } else {
                a.ns.clone()
            };
            o.seed = a.seed;
            o.file_mib = a.file_mib.unwrap_or(64);
            o.upload_mbps = a.upload_mbps;
            o.download_mbps = a.download_mbps;
            o.piece_kib = a.piece_kib;
            o.bin = bin;
            meshwork_lab::distribution::run(o).await?.1
        }
        "propagation" => {
            let mut o = meshwork_lab::propagation::PropagationOptions::new(runner, &a.out);
            common(a, &mut o.common, bin);
            o.txs = a.txs;
            o.blocks = a.blocks;
            o.interval = interval.unwrap_or(o.interval);
            o.settle = Duration::from_secs(a.settle_secs);
            meshwork_lab::propagation::run(o).await?.1
        }
        "failure" => {
            let mut o = meshwork_lab::failure::FailureOptions::new(runner, &a.out);
            common(a, &mut o.common, bin);
            o.fraction = a.fraction;
            o.file_mib = a.file_mib.unwrap_or(o.file_mib);
            o.upload_mbps = a.upload_mbps;
            o.interval = interval.unwrap_or(o.interval);
            o.window = secs.unwrap_or(o.window);
            meshwork_lab::failure::run(o).await?.1
        }
        "churn" => {
            let mut o = meshwork_lab::churn::ChurnOptions::new(runner, &a.out);
            common(a, &mut o.common, bin);
            o.file_mib = a.file_mib.unwrap_or(o.file_mib);
            o.upload_mbps = a.upload_mbps;
            o.interval = interval.unwrap_or(o.interval);
            o.duration = secs.unwrap_or(o.duration);
            o.period = Duration::from_secs(a.period_secs);
            o.down = Duration::from_secs(a.down_secs);
            meshwork_lab::churn::run(o).await?.1
        }
        "partition" => {
            let mut o = meshwork_lab::partition::PartitionOptions::new(runner, &a.out);
            common(a, &mut o.common, bin);
            o.interval = interval.unwrap_or(o.interval);
            o.duration = secs.unwrap_or(o.duration);
            meshwork_lab::partition::run(o).await?.1
        }
        "sybil" => {
            let mut o = meshwork_lab::sybil::SybilOptions::new(runner, &a.out);
            common(a, &mut o.common, bin);
            // --nodes is the honest network the victim knows.
            o.common.users = 10;
            o.honest = a.nodes.unwrap_or(o.honest);
            o.flood = a.flood;
            meshwork_lab::sybil::run(o).await?.1
        }
        other => bail!("unknown scenario {other:?}; scenarios: {SCENARIOS}"),
    })
}

async fn lab_run(mut a: LabRunArgs) -> Result<()> {
    // The nodes run elsewhere (other working directories, other namespaces): they are given
    // absolute paths only.
    a.out = std::path::absolute(&a.out)
        .with_context(|| format!("--out {}: cannot make it absolute", a.out.display()))?;
    if runner_of(&a) == RunnerKind::Netns {
        if let Some(why) = meshwork_lab::netns::unavailable() {
            bail!("{why}");
        }
    }
    if !(a.fraction > 0.0 && a.fraction < 1.0) {
        bail!("--fraction must be between 0 and 1");
    }
    // Dropping the scenario on a signal drops its runners, whose teardown removes every
    // namespace, link and process.
    let stop = StopSignals::install()?;
    let outputs = tokio::select! {
        r = scenario(&a) => r?,
        r = stop.wait() => {
            r?;
            bail!("interrupted; the runner's namespaces, links and processes are removed");
        }
    };
    let json = outputs.write(&a.out, &a.scenario)?;
    println!("{}", outputs.markdown);
    eprintln!("results in {}", json.display());
    Ok(())
}
