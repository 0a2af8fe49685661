//! What every scenario produces, and where it goes: `<out>/<scenario>.json` (the numbers),
//! `<out>/<scenario>.md` (a table) and SVG plots beside them. `meshwork lab report` reads the
//! JSON files back, never the Markdown.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunnerKind {
    /// Real processes in network namespaces, links capped with `tc`.
    Netns,
    /// Everything in one process over loopback, with application-level caps.
    Inproc,
}

impl fmt::Display for RunnerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RunnerKind::Netns => "netns",
            RunnerKind::Inproc => "inproc",
        })
    }
}

impl FromStr for RunnerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "netns" => Ok(RunnerKind::Netns),
            "inproc" => Ok(RunnerKind::Inproc),
            other => Err(format!("unknown runner {other:?}: use netns or inproc")),
        }
    }
}

pub struct Outputs {
    pub json: serde_json::Value,
    pub markdown: String,
    /// (file name, SVG text).
    pub svgs: Vec<(String, String)>,
}

impl Outputs {
    /// Writes the three kinds of output; returns the JSON file's path.
    pub fn write(&self, out: &Path, name: &str) -> Result<PathBuf> {
        std::fs::create_dir_all(out).with_context(|| out.display().to_string())?;
        let json = out.join(format!("{name}.json"));
        std::fs::write(&json, serde_json::to_string_pretty(&self.json)?)
            .with_context(|| json.display().to_string())?;
        std::fs::write(out.join(format!("{name}.md")), &self.markdown)?;
        for (file, svg) in &self.svgs {
            std::fs::write(out.join(file), svg)?;
        }
        Ok(json)
    }
}

// ---------------------------------------------------------------------------------------
// What the scenarios share.

use std::time::Duration;

use meshwork_ledger::{Hash, TxStatus, Wallet};

use crate::agent::Attempt;
use crate::testbed::{Arch, Bed, BedOptions};

/// The options every scenario on test beds has.
#[derive(Clone, Debug)]
pub struct Common {
    pub runner: RunnerKind,
    /// Users: nodes peer to peer, clients of the server client-server.
    pub users: usize,
    pub seed: u64,
    /// Results go here; work files, data directories and logs under `work/`.
    pub out: PathBuf,
    /// The `meshwork` binary (netns).
    pub bin: Option<PathBuf>,
    /// inproc: the loopback index of the first host (scenarios in one process stay apart).
    pub first_index: usize,
}

impl Common {
    pub fn new(runner: RunnerKind, users: usize, out: &Path) -> Common {
        Common {
            runner,
            users,
            seed: 1,
            out: out.to_path_buf(),
            bin: None,
            first_index: 0,
        }
    }

    /// `<out>/work/<scenario>`, created.
    pub fn work(&self, scenario: &str) -> Result<PathBuf> {
        let w = self.out.join("work").join(scenario);
        std::fs::create_dir_all(&w).with_context(|| w.display().to_string())?;
        Ok(w)
    }
}

/// Runs `drive` on a fresh test bed of `arch` for `scenario` (its own directory, network name
/// and loopback addresses), then takes the bed down, whatever `drive` returned. Returns what
/// `drive` did and how long the teardown took.
pub async fn with_bed<T>(
    scenario: &str,
    c: &Common,
    arch: Arch,
    tweak: impl FnOnce(&mut BedOptions),
    drive: impl AsyncFnOnce(&mut Bed) -> Result<T>,
) -> Result<(T, Duration)> {
    let dir = c.work(scenario)?.join(arch.to_string());
    let _ = std::fs::remove_dir_all(&dir);
    let mut bo = BedOptions::new(c.runner, c.users, &dir);
    bo.bin = c.bin.clone();
    bo.seed = c.seed;
    // Client-server needs a host more than peer to peer: the server's.
    bo.first_index = c.first_index
        + match arch {
            Arch::ClientServer => 0,
            Arch::PeerToPeer => c.users + 1,
        };
    bo.network = format!("test-{scenario}-{arch}");
    tweak(&mut bo);
    let mut bed = Bed::start(bo, arch).await?;
    let r = drive(&mut bed).await;
    let teardown = bed.shutdown().await;
    Ok((r?, teardown))
}

/// [`with_bed`] for client-server, then for peer to peer, with the same `tweak` and `drive`:
/// their results and teardown times, in that order.
pub async fn both<T>(
    scenario: &str,
    c: &Common,
    tweak: impl Fn(&mut BedOptions),
    drive: impl AsyncFn(&mut Bed) -> Result<T>,
) -> Result<[(T, Duration); 2]> {
    let cs = with_bed(scenario, c, Arch::ClientServer, &tweak, &drive).await?;
    let p2p = with_bed(scenario, c, Arch::PeerToPeer, &tweak, &drive).await?;
    Ok([cs, p2p])
}

/// Every host's upload capped at `mbps` (the distribution, failure and churn scenarios).
pub fn upload_cap(mbps: f64) -> impl Fn(&mut BedOptions) {
    move |b: &mut BedOptions| {
        b.caps = crate::netns::Caps {
            up_bps: Some((mbps * 1e6) as u64),
            down_bps: None,
        }
    }
}

/// Writes `<work>/payload.bin`, `mib` MiB of seeded random bytes, off the async threads.
pub async fn payload(work: &Path, mib: u64, seed: u64) -> Result<PathBuf> {
    let file = work.join("payload.bin");
    let f = file.clone();
    tokio::task::spawn_blocking(move || crate::distribution::make_file(&f, mib << 20, seed))
        .await??;
    Ok(file)
}

/// Reads `null` as NaN: serde_json writes a NaN (a statistic over nothing, a reading this
/// machine cannot make) as `null`, and a result must read back what it wrote.
pub fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// The `p`-quantile of sorted values (nearest rank); NaN for none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// Sorts and returns (p50, p99).
pub fn p50_p99(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (percentile(&v, 0.5), percentile(&v, 0.99))
}

/// What each user's wallet is given at the start.
pub const FUNDING: u64 = 1_000_000;

/// Gives every wallet [`FUNDING`] from the dev faucet, through user 0's service, and waits
/// until each user's own service shows it (peer to peer: until it is mined, so the nodes must
/// be mining).
pub async fn fund(bed: &Bed, wallets: &[Wallet]) -> Result<()> {
    let faucet = Wallet::from_secret(&meshwork_ledger::spec::DEV_FAUCET_SECRET);
    let via = bed.service(0);
    let chain = via.chain_id().await?;
    let first = via.account(&faucet.address()).await?.next_nonce;
    for (k, w) in wallets.iter().enumerate() {
        let t = faucet.transfer(chain, w.address(), FUNDING, 1, first + k as u64);
        match via.submit(&t).await? {
            crate::api::Submitted::Accepted(_) => {}
            crate::api::Submitted::Refused(why) => anyhow::bail!("funding refused: {why}"),
        }
    }
    crate::harness::wait_for(
        "every wallet funded",
        Duration::from_secs(120),
        Duration::from_millis(250),
        || async {
            for (u, w) in wallets.iter().enumerate() {
                if bed.service(u).account(&w.address()).await?.balance < FUNDING {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )
    .await?;
    Ok(())
}

/// Peer to peer: every node in `users` mines, each at most one block per
/// `users.len() × interval`, so that the network finds about one block per `interval` and
/// keeps mining when any of them is left.
pub async fn mine_everywhere(bed: &Bed, users: &[usize], interval: Duration) -> Result<()> {
    if bed.arch != Arch::PeerToPeer {
        return Ok(());
    }
    let pace = interval * users.len() as u32;
    for &u in users {
        bed.node(u)
            .set_mining(Some((Wallet::generate().address(), pace)))
            .await?;
    }
    Ok(())
}

/// How most scenarios start: peer to peer, every node with `min_peers` connections and mining
/// (about one block per `block_interval` between them); then every user's wallet funded, and
/// every user's client submitting a transfer every `interval`.
pub async fn users_at_work(
    bed: &mut Bed,
    min_peers: usize,
    block_interval: Duration,
    interval: Duration,
) -> Result<()> {
    let n = bed.users();
    if bed.arch == Arch::PeerToPeer {
        bed.wait_connected(min_peers.min(n - 1), Duration::from_secs(60))
            .await?;
        let all: Vec<usize> = (0..n).collect();
        mine_everywhere(bed, &all, block_interval).await?;
    }
    let wallets: Vec<Wallet> = (0..n).map(|_| Wallet::generate()).collect();
    fund(bed, &wallets).await?;
    for (u, w) in wallets.into_iter().enumerate() {
        bed.start_agent(u, w, interval)?;
    }
    Ok(())
}

/// Attempts that began in `[from_us, to_us)` by users `who` accepts: (accepted, all).
pub fn availability(
    attempts: &[(usize, Attempt)],
    from_us: u64,
    to_us: u64,
    who: impl Fn(usize) -> bool,
) -> Share {
    let mut s = Share::default();
    for (u, a) in attempts {
        if a.at_us >= from_us && a.at_us < to_us && who(*u) {
            s.all += 1;
            if a.ok() {
                s.ok += 1;
            }
        }
    }
    s
}

/// `ok` of `all`, and the ratio (NaN when there were none).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Share {
    pub ok: usize,
    pub all: usize,
}

impl Share {
    pub fn ratio(&self) -> f64 {
        if self.all == 0 {
            f64::NAN
        } else {
            self.ok as f64 / self.all as f64
        }
    }
}

impl fmt::Display for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:.1} % ({} of {})",
            self.ratio() * 100.0,
            self.ok,
            self.all
        )
    }
}

/// The ids of the accepted attempts.
pub fn accepted_ids(attempts: &[(usize, Attempt)]) -> Vec<Hash> {
    attempts
        .iter()
        .filter_map(|(_, a)| a.accepted.as_deref()?.parse().ok())
        .collect()
}

/// How many of `ids` `api` reports confirmed.
pub async fn confirmed(api: &crate::api::Api, ids: &[Hash]) -> Result<usize> {
    let mut n = 0;
    for id in ids {
        if matches!(api.tx_status(id).await?, TxStatus::Confirmed { .. }) {
            n += 1;
        }
    }
    Ok(n)
}

/// Waits (up to `timeout`) until `api` reports every one of `ids` confirmed; returns how many
/// are.
pub async fn wait_confirmed(
    api: &crate::api::Api,
    ids: &[Hash],
    timeout: Duration,
) -> Result<usize> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let n = confirmed(api, ids).await?;
        if n == ids.len() || std::time::Instant::now() >= deadline {
            return Ok(n);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(at_us: u64, ok: bool) -> Attempt {
        Attempt {
            at_us,
            ms: 1.0,
            accepted: ok.then(|| Hash::of(&at_us.to_le_bytes()).to_string()),
            error: (!ok).then(|| "down".into()),
        }
    }

    #[test]
    fn availability_counts_the_window_and_the_users_asked_for() {
        let a = vec![
            (0, attempt(10, true)),
            (1, attempt(20, false)),
            (0, attempt(30, false)),
            (2, attempt(40, true)),
        ];
        assert_eq!(
            availability(&a, 0, 35, |_| true),
            Share { ok: 1, all: 3 },
            "[0, 35) holds the first three"
        );
        assert_eq!(
            availability(&a, 20, 50, |u| u != 1),
            Share { ok: 1, all: 2 }
        );
        assert!(availability(&a, 50, 60, |_| true).ratio().is_nan());
        assert_eq!(accepted_ids(&a).len(), 2);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let (p50, p99) = p50_p99((1..=100).rev().map(f64::from).collect());
        assert_eq!((p50, p99), (51.0, 99.0));
        assert!(percentile(&[], 0.5).is_nan());
    }
}
