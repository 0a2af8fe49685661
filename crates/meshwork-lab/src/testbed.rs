//! A test bed: `users` people, each on a host of their own, using one architecture.
//!
//! - **Peer to peer**: user `u` runs node `u` on host `u`; the user's client talks to its own
//!   node. Nodes are told about `degree` random earlier nodes at start and find the rest.
//! - **Client-server**: the server runs on host 0; user `u`'s clients run on host `u + 1` and
//!   talk to the server.
//!
//! The scenarios (`failure`, `churn`, `partition`, `propagation`) are written once against
//! this type; what differs between the runners stays here:
//!
//! | | `netns` | `inproc` |
//! |---|---|---|
//! | host | a network namespace with a capped veth | a loopback address of this process |
//! | node, server | a `meshwork` process | a task of this process |
//! | a user's client ([`crate::agent`]), download, log watcher | a `meshwork` process in the user's host | a task |
//! | crash | SIGKILL | a shutdown (a node flushes its state; [`RunningServer::kill`] cuts what is in flight) |
//! | partition | blackhole routes between the groups' hosts | nodes refuse each other (the gate's lab partition); a cut-off user's client fails its requests itself |
//!
//! Either way the lab reads and drives every node through its HTTP API ([`crate::api`]).
//! Every node runs the production timers, so that both runners discover peers at the same pace.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use meshwork_http::auth::COOKIE_FILE;
use meshwork_ledger::{Address, Wallet};
use meshwork_node::content::{FetchRequest, ShareRequest, State};
use meshwork_server::server::{RunningServer, ServerConfig};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::agent::{Agent, Attempt};
use crate::api::{wait_up, Api};
use crate::harness::{Harness, HarnessBuilder, Topology};
use crate::netns::{Caps, NetnsRunner, ProcId};
use crate::scenario::RunnerKind;

/// The network (and so the chain spec) of every test bed: `test-*` networks run the `test`
/// spec, with difficulty 1 and miners paced by the lab.
pub const NETWORK: &str = "test-lab";
const NODE_PORT: u16 = 4001;
const API_PORT: u16 = 8081;
const SERVER_PORT: u16 = 8080;
/// How long a node or server gets to answer after it starts; [`Bed::start_timeout`] adds a
/// second per user (a hundred processes starting at once share two cores).
const START_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Arch {
    ClientServer,
    PeerToPeer,
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Arch::ClientServer => "client-server",
            Arch::PeerToPeer => "peer-to-peer",
        })
    }
}

#[derive(Clone, Debug)]
pub struct BedOptions {
    pub runner: RunnerKind,
    pub users: usize,
    /// Data directories, logs, downloads.
    pub dir: PathBuf,
    /// The `meshwork` binary (netns).
    pub bin: Option<PathBuf>,
    /// Every host's link: `tc` on netns; the nodes' and the server's own upload limits in
    /// process (download caps apply on netns only).
    pub caps: Caps,
    /// inproc: the loopback index of the first host, to keep test beds of one process apart.
    pub first_index: usize,
    /// inproc: the network name (test beds in one process must differ); `test-*`.
    pub network: String,
    pub seed: u64,
    /// Each node is told about this many random earlier nodes at start.
    pub degree: usize,
    /// An operator's policy: transfers from these senders are refused by the server, or by
    /// the nodes of the users in `refusers` (`[chain] refuse_senders`).
    pub refuse_senders: HashSet<Address>,
    pub refusers: HashSet<usize>,
}

impl BedOptions {
    pub fn new(runner: RunnerKind, users: usize, dir: &Path) -> BedOptions {
        BedOptions {
            runner,
            users,
            dir: dir.to_path_buf(),
            bin: None,
            caps: Caps::default(),
            first_index: 0,
            network: NETWORK.into(),
            seed: 1,
            degree: 3,
            refuse_senders: HashSet::new(),
            refusers: HashSet::new(),
        }
    }
}

/// Where a user's download stands.
#[derive(Clone, Debug, PartialEq)]
pub enum Download {
    Running,
    /// Verified and complete, this many seconds after it was asked for.
    Done(f64),
    Failed(String),
}

/// How a user's download is carried out.
enum Fetcher {
    /// The node's content service does it; the lab polls the node.
    Node { id: String },
    /// A client task of this process (inproc client-server).
    Task(tokio::task::JoinHandle<Result<()>>),
    /// `meshwork --server URL fetch` in the user's host (netns client-server).
    Proc(ProcId),
}

struct Fetch {
    fetcher: Option<Fetcher>,
    /// What to ask for: a ticket (peer to peer) or a content id (client-server).
    target: String,
    out: PathBuf,
    asked: Instant,
    state: Download,
}

enum Server {
    Inproc {
        srv: Option<RunningServer>,
        cfg: Box<ServerConfig>,
        addr: SocketAddr,
    },
    Netns(ProcId),
}

/// A user's client: a task, or processes in its host (one per start).
enum Client {
    Task(tokio::task::JoinHandle<()>),
    Proc(ProcId),
}

/// What a user's client does, kept so that it can be started again after a crash.
#[derive(Clone)]
struct AgentPlan {
    wallet: Wallet,
    to: Address,
    interval: Duration,
}

pub struct Bed {
    pub arch: Arch,
    pub runner: RunnerKind,
    o: BedOptions,
    net: Option<NetnsRunner>,
    harness: Option<Harness>,
    server: Option<Server>,
    server_api: Option<Api>,
    /// Peer to peer: node `u`'s API (a restarted in-process node gets a new port).
    nodes: Vec<Api>,
    node_procs: Vec<ProcId>,
    /// Which users' hosts are up.
    up: Vec<bool>,
    plans: Vec<Option<AgentPlan>>,
    clients: Vec<Option<Client>>,
    /// Every agent process ever started (netns), for their records.
    agent_procs: Vec<(usize, ProcId)>,
    /// Attempts of in-process agents.
    attempts: Arc<Mutex<Vec<(usize, Attempt)>>>,
    /// In-process client-server partition: the users cut off from the server.
    cut: Vec<Arc<AtomicBool>>,
    fetches: Vec<Option<Fetch>>,
    /// Client-server: the users' log followers (tasks, or processes on netns).
    watchers: Vec<Client>,
    /// What in-process followers received: (user, transfer id, µs since the epoch).
    watched: Arc<Mutex<Vec<(usize, String, u64)>>>,
    /// How long building the hosts and starting the services took.
    pub setup: Duration,
}

fn tempdir_in(dir: &Path, name: &str) -> Result<PathBuf> {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).with_context(|| d.display().to_string())?;
    Ok(d)
}

impl Bed {
    pub async fn start(o: BedOptions, arch: Arch) -> Result<Bed> {
        ensure!(o.users >= 1, "a test bed needs at least one user");
        ensure!(
            o.network.starts_with("test-"),
            "test beds run test networks (test-*)"
        );
        std::fs::create_dir_all(&o.dir).with_context(|| o.dir.display().to_string())?;
        let started = Instant::now();
        let n = o.users;
        let mut bed = Bed {
            arch,
            runner: o.runner,
            net: None,
            harness: None,
            server: None,
            server_api: None,
            nodes: vec![],
            node_procs: vec![],
            up: vec![true; n],
            plans: vec![None; n],
            clients: (0..n).map(|_| None).collect(),
            agent_procs: vec![],
            attempts: Arc::default(),
            cut: (0..n).map(|_| Arc::new(AtomicBool::new(false))).collect(),
            fetches: (0..n).map(|_| None).collect(),
            watchers: vec![],
            watched: Arc::default(),
            setup: Duration::ZERO,
            o,
        };
        if bed.runner == RunnerKind::Netns {
            let bin = bed
                .o
                .bin
                .clone()
                .context("the netns runner needs the meshwork binary")?;
            let hosts = match arch {
                Arch::PeerToPeer => n,
                Arch::ClientServer => n + 1,
            };
            bed.net = Some(NetnsRunner::new(
                &bin,
                &bed.o.dir,
                &vec![bed.o.caps; hosts],
            )?);
        }
        match arch {
            Arch::PeerToPeer => bed.start_nodes().await?,
            Arch::ClientServer => bed.start_server().await?,
        }
        bed.setup = started.elapsed();
        Ok(bed)
    }

    pub fn users(&self) -> usize {
        self.o.users
    }

    /// netns: how long building the hosts took (namespaces, veths, caps), services aside.
    pub fn hosts_setup(&self) -> Option<Duration> {
        self.net.as_ref().map(|n| n.setup_time)
    }

    pub fn is_up(&self, u: usize) -> bool {
        self.up[u]
    }

    pub fn up_users(&self) -> Vec<usize> {
        (0..self.users()).filter(|u| self.up[*u]).collect()
    }

    /// The service user `u` talks to: its own node, or the server.
    pub fn service(&self, u: usize) -> &Api {
        match self.arch {
            Arch::PeerToPeer => &self.nodes[u],
            Arch::ClientServer => self.server_api.as_ref().expect("a client-server bed"),
        }
    }

    /// Node `u`'s API (peer to peer).
    pub fn node(&self, u: usize) -> &Api {
        &self.nodes[u]
    }

    /// The server's API (client-server).
    pub fn server(&self) -> &Api {
        self.server_api.as_ref().expect("a client-server bed")
    }

    fn net(&mut self) -> &mut NetnsRunner {
        self.net.as_mut().expect("a netns bed")
    }

    /// The host of user `u`.
    fn host(&self, u: usize) -> usize {
        match self.arch {
            Arch::PeerToPeer => u,
            Arch::ClientServer => u + 1,
        }
    }

    // ---- the services

    async fn start_server(&mut self) -> Result<()> {
        let data = tempdir_in(&self.o.dir, "server")?;
        match self.runner {
            RunnerKind::Inproc => {
                let mut cfg = ServerConfig::new(
                    &data,
                    meshwork_ledger::ChainSpec::for_network(&self.o.network),
                );
                cfg.upload_limit = self.o.caps.up_bps.map(|b| b / 8);
                cfg.refuse_senders = self.o.refuse_senders.clone();
                let ip = crate::harness::loopback_ip(self.o.first_index);
                let srv =
                    meshwork_server::server::start(SocketAddr::new(ip.into(), 0), cfg.clone())
                        .await?;
                let addr = srv.addr;
                self.server_api = Some(Api::with_credentials(addr, srv.api_credentials()));
                self.server = Some(Server::Inproc {
                    srv: Some(srv),
                    cfg: Box::new(cfg),
                    addr,
                });
            }
            RunnerKind::Netns => {
                let mut args = vec![
                    "--data-dir".to_string(),
                    data.display().to_string(),
                    "server".into(),
                    "start".into(),
                    "--listen".into(),
                    format!("{}:{SERVER_PORT}", self.net().ip(0)),
                    "--network".into(),
                    NETWORK.into(),
                ];
                for a in &self.o.refuse_senders {
                    args.extend(["--refuse".into(), a.to_string()]);
                }
                let net = self.net();
                let ip = net.ip(0);
                let p = net.spawn(0, "server", &args)?;
                self.server = Some(Server::Netns(p));
                self.server_api = Some(Api::with_cookie_file(
                    format!("{ip}:{SERVER_PORT}"),
                    data.join(COOKIE_FILE),
                ));
            }
        }
        self.wait_server().await
    }

    async fn wait_server(&mut self) -> Result<()> {
        let api = self.server().clone();
        let timeout = self.start_timeout();
        match self.server {
            Some(Server::Netns(p)) => {
                let net = self.net.as_mut().expect("netns");
                wait_up(&api, timeout, || exited(net, p)).await
            }
            _ => wait_up(&api, timeout, || Ok(None)).await,
        }
    }

    /// Crashes the server (see the module docs for what that is in each runner).
    pub async fn kill_server(&mut self) -> Result<()> {
        match self.server.as_mut().context("no server")? {
            Server::Inproc { srv, .. } => {
                if let Some(s) = srv.take() {
                    s.kill().await;
                }
            }
            Server::Netns(p) => {
                let p = *p;
                self.net().kill(p);
            }
        }
        Ok(())
    }

    /// Starts the server again on its address, with its store.
    pub async fn restart_server(&mut self) -> Result<()> {
        match self.server.as_mut().context("no server")? {
            Server::Inproc { srv, cfg, addr } => {
                if srv.is_none() {
                    let started = meshwork_server::server::start(*addr, (**cfg).clone()).await?;
                    // A new start, a new cookie.
                    self.server_api = Some(Api::with_credentials(
                        started.addr,
                        started.api_credentials(),
                    ));
                    *srv = Some(started);
                }
            }
            Server::Netns(p) => {
                let p = *p;
                self.net().restart(p)?;
            }
        }
        self.wait_server().await
    }

    async fn start_nodes(&mut self) -> Result<()> {
        let n = self.users();
        match self.runner {
            RunnerKind::Inproc => {
                let limit = self.o.caps.up_bps.map(|b| b / 8);
                let (senders, refusers) = (self.o.refuse_senders.clone(), self.o.refusers.clone());
                let h = HarnessBuilder::new(&self.o.network)?
                    .topology(Topology::Random {
                        degree: self.o.degree,
                        seed: self.o.seed,
                    })
                    .persistent(true)
                    .first_index(self.o.first_index)
                    .tweak(move |i, cfg| {
                        cfg.timings = meshwork_node::config::Timings::default();
                        cfg.api = cfg.dial_from.map(|ip| SocketAddr::new(ip, 0));
                        cfg.content.upload_limit = limit;
                        if refusers.contains(&i) {
                            cfg.refuse_senders = senders.clone();
                        }
                    })
                    .spawn(n)
                    .await?;
                for u in 0..n {
                    let node = h.running(u)?;
                    self.nodes.push(Api::with_credentials(
                        node.api_addr.context("the node has no API")?,
                        node.api_credentials(),
                    ));
                }
                self.harness = Some(h);
            }
            RunnerKind::Netns => {
                let bin = self.o.bin.clone().expect("checked at start");
                let mut peer_ids = vec![];
                for u in 0..n {
                    let d = tempdir_in(&self.o.dir, &format!("node-{u}"))?;
                    peer_ids.push(init_node(&bin, &d)?);
                    if self.o.refusers.contains(&u) {
                        refuse_in_config(&d, &self.o.refuse_senders)?;
                    }
                }
                let mut rng = rand::rngs::StdRng::seed_from_u64(self.o.seed);
                for u in 0..n {
                    let net = self.net.as_mut().expect("netns");
                    let ip = net.ip(u);
                    let mut args = vec![
                        "--data-dir".to_string(),
                        self.o.dir.join(format!("node-{u}")).display().to_string(),
                        "node".into(),
                        "start".into(),
                        "--listen".into(),
                        format!("/ip4/{ip}/tcp/{NODE_PORT}"),
                        "--api".into(),
                        format!("{ip}:{API_PORT}"),
                        "--allow-private-addrs".into(),
                    ];
                    for j in rand::seq::index::sample(&mut rng, u, self.o.degree.min(u)) {
                        args.push("--bootstrap".into());
                        args.push(format!(
                            "/ip4/{}/tcp/{NODE_PORT}/p2p/{}",
                            net.ip(j),
                            peer_ids[j]
                        ));
                    }
                    self.node_procs.push(net.spawn(u, "node", &args)?);
                    self.nodes.push(Api::with_cookie_file(
                        format!("{ip}:{API_PORT}"),
                        self.o.dir.join(format!("node-{u}")).join(COOKIE_FILE),
                    ));
                }
                for u in 0..n {
                    self.wait_node(u).await?;
                }
            }
        }
        Ok(())
    }

    fn start_timeout(&self) -> Duration {
        START_TIMEOUT + Duration::from_secs(self.users() as u64)
    }

    async fn wait_node(&mut self, u: usize) -> Result<()> {
        let api = self.nodes[u].clone();
        let timeout = self.start_timeout();
        match self.net.as_mut() {
            Some(net) => {
                let p = self.node_procs[u];
                wait_up(&api, timeout, || exited(net, p)).await
            }
            None => wait_up(&api, timeout, || Ok(None)).await,
        }
    }

    /// Waits until every running node has at least `min` connections.
    pub async fn wait_connected(&self, min: usize, timeout: Duration) -> Result<Duration> {
        let ups = self.up_users();
        crate::harness::wait_for(
            "every node connected",
            timeout,
            Duration::from_millis(250),
            || async {
                for &u in &ups {
                    if self.nodes[u].peers().await?.len() < min {
                        return Ok(false);
                    }
                }
                Ok(true)
            },
        )
        .await
    }

    // ---- crashes, restarts, partitions

    /// User `u`'s host crashes: its node (peer to peer), its client and its download stop.
    pub async fn kill_user(&mut self, u: usize) -> Result<()> {
        ensure!(self.up[u], "user {u} is already down");
        // A download that has just finished is counted before it is cut.
        self.download_state(u).await?;
        self.up[u] = false;
        self.stop_client(u);
        if let Some(f) = self.fetches[u].as_mut() {
            match f.fetcher.take() {
                Some(Fetcher::Task(t)) => t.abort(),
                Some(Fetcher::Proc(p)) => self.net.as_mut().expect("netns").kill(p),
                other => f.fetcher = other,
            }
        }
        if self.arch == Arch::PeerToPeer {
            match self.runner {
                RunnerKind::Inproc => {
                    self.harness.as_mut().expect("inproc").stop(u).await?;
                }
                RunnerKind::Netns => {
                    let p = self.node_procs[u];
                    self.net().kill(p);
                }
            }
        }
        Ok(())
    }

    /// User `u`'s host comes back: its node restarts from its data directory (with the same
    /// identity and address), then its client and an unfinished download start again.
    pub async fn restart_user(&mut self, u: usize) -> Result<()> {
        ensure!(!self.up[u], "user {u} is up");
        if self.arch == Arch::PeerToPeer {
            match self.runner {
                RunnerKind::Inproc => {
                    let h = self.harness.as_mut().expect("inproc");
                    // A few running peers to start from, besides its own address book.
                    let boot: Vec<_> = h
                        .running_nodes()
                        .take(self.o.degree)
                        .map(|(_, n)| n.dial_addr())
                        .collect();
                    h.restart(u, boot, |_| {}).await?;
                    let node = h.running(u)?;
                    self.nodes[u] = Api::with_credentials(
                        node.api_addr.context("no API")?,
                        node.api_credentials(),
                    );
                }
                RunnerKind::Netns => {
                    let p = self.node_procs[u];
                    self.net().restart(p)?;
                }
            }
            self.wait_node(u).await?;
        }
        self.up[u] = true;
        if self.plans[u].is_some() {
            self.start_client(u)?;
        }
        let resume = self.fetches[u]
            .as_ref()
            .is_some_and(|f| f.fetcher.is_none() && f.state == Download::Running);
        if resume {
            self.spawn_fetch(u)?;
        }
        Ok(())
    }

    /// Splits the users into groups that cannot reach each other; the server (client-server)
    /// is with the first group. Users in no group reach everyone.
    pub async fn partition(&mut self, groups: &[Vec<usize>]) -> Result<()> {
        match (self.runner, self.arch) {
            (RunnerKind::Netns, _) => {
                let mut hosts: Vec<Vec<usize>> = groups
                    .iter()
                    .map(|g| g.iter().map(|u| self.host(*u)).collect())
                    .collect();
                if self.arch == Arch::ClientServer {
                    if let Some(first) = hosts.first_mut() {
                        first.push(0);
                    }
                }
                self.net().partition(&hosts)?;
            }
            (RunnerKind::Inproc, Arch::PeerToPeer) => {
                self.harness
                    .as_ref()
                    .expect("inproc")
                    .partition(groups)
                    .await?;
            }
            (RunnerKind::Inproc, Arch::ClientServer) => {
                for (gi, g) in groups.iter().enumerate() {
                    for &u in g {
                        self.cut[u].store(gi > 0, Ordering::SeqCst);
                    }
                }
            }
        }
        Ok(())
    }

    pub async fn heal(&mut self) -> Result<()> {
        match (self.runner, self.arch) {
            (RunnerKind::Netns, _) => self.net().heal()?,
            (RunnerKind::Inproc, Arch::PeerToPeer) => {
                self.harness.as_ref().expect("inproc").heal().await?;
            }
            (RunnerKind::Inproc, Arch::ClientServer) => {
                for c in &self.cut {
                    c.store(false, Ordering::SeqCst);
                }
            }
        }
        Ok(())
    }

    // ---- the users' clients

    /// Starts user `u`'s client: a transfer of 1 from `wallet` every `interval`.
    pub fn start_agent(&mut self, u: usize, wallet: Wallet, interval: Duration) -> Result<()> {
        self.plans[u] = Some(AgentPlan {
            wallet,
            to: Wallet::generate().address(),
            interval,
        });
        if self.up[u] {
            self.start_client(u)?;
        }
        Ok(())
    }

    fn start_client(&mut self, u: usize) -> Result<()> {
        let plan = self.plans[u].clone().expect("a plan");
        let target = self.service(u).clone();
        let client = match self.runner {
            RunnerKind::Inproc => {
                let sink = self.attempts.clone();
                let cut = self.cut[u].clone();
                let agent = Agent {
                    target,
                    wallet: plan.wallet,
                    to: plan.to,
                    interval: plan.interval,
                };
                Client::Task(tokio::spawn(async move {
                    agent
                        .run_unless(
                            move || cut.load(Ordering::SeqCst),
                            move |a| sink.lock().expect("not poisoned").push((u, a)),
                        )
                        .await
                }))
            }
            RunnerKind::Netns => {
                let key = self.o.dir.join(format!("user-{u}.key"));
                std::fs::write(&key, plan.wallet.secret_hex() + "\n")?;
                let mut args = vec![
                    "lab".into(),
                    "agent".into(),
                    "--target".into(),
                    target.base().to_string(),
                    "--key".into(),
                    key.display().to_string(),
                    "--to".into(),
                    plan.to.to_string(),
                    "--interval-ms".into(),
                    plan.interval.as_millis().to_string(),
                ];
                if let Some(cookie) = target.cookie_file() {
                    args.extend(["--api-cookie".into(), cookie.display().to_string()]);
                }
                let host = self.host(u);
                let p = self.net().spawn(host, &format!("agent-{u}"), &args)?;
                self.agent_procs.push((u, p));
                Client::Proc(p)
            }
        };
        self.clients[u] = Some(client);
        Ok(())
    }

    fn stop_client(&mut self, u: usize) {
        match self.clients[u].take() {
            Some(Client::Task(t)) => t.abort(),
            Some(Client::Proc(p)) => self.net.as_mut().expect("netns").kill(p),
            None => {}
        }
    }

    /// Stops every client for good.
    pub fn stop_agents(&mut self) {
        for u in 0..self.users() {
            self.plans[u] = None;
            self.stop_client(u);
        }
    }

    /// Every attempt of every client so far, by user, in time order.
    pub fn attempts(&self) -> Vec<(usize, Attempt)> {
        let mut all = self.attempts.lock().expect("not poisoned").clone();
        if let Some(net) = &self.net {
            for &(u, p) in &self.agent_procs {
                all.extend(
                    net.log(p)
                        .lines()
                        .filter(|l| l.starts_with('{'))
                        .filter_map(|l| serde_json::from_str::<Attempt>(l).ok())
                        .map(|a| (u, a)),
                );
            }
        }
        all.sort_by_key(|(_, a)| a.at_us);
        all
    }

    // ---- the server's subscribers

    /// Client-server: every user follows the server's log from its current end (the
    /// clients' subscription, a long poll), noting when each transfer reaches it.
    pub async fn start_watchers(&mut self) -> Result<()> {
        let after = self.server().server_status().await?.transactions;
        let base = self.server().base().to_string();
        for u in 0..self.users() {
            let w = match self.runner {
                RunnerKind::Inproc => {
                    let (base, sink) = (base.clone(), self.watched.clone());
                    Client::Task(tokio::spawn(async move {
                        let mut after = after;
                        loop {
                            let mut last = after;
                            // Runs until the server fails; a follower that lost the server
                            // tries again, from where it was.
                            let _ = meshwork_server::client::follow(&base, after, |e| {
                                let at = meshwork_node::unix_micros();
                                last = last.max(e.seq);
                                sink.lock().expect("not poisoned").push((u, e.id, at));
                                true
                            })
                            .await;
                            after = last;
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }))
                }
                RunnerKind::Netns => {
                    let args = vec![
                        "--server".into(),
                        base.clone(),
                        "log".into(),
                        "--follow".into(),
                        "--after".into(),
                        after.to_string(),
                        "--json".into(),
                    ];
                    let host = self.host(u);
                    Client::Proc(self.net().spawn(host, &format!("watch-{u}"), &args)?)
                }
            };
            self.watchers.push(w);
        }
        Ok(())
    }

    /// What the followers received: (user, transfer id, µs since the epoch).
    pub fn watched(&self) -> Vec<(usize, String, u64)> {
        #[derive(Deserialize)]
        struct Line {
            id: String,
            seen_us: u64,
        }
        let mut all = self.watched.lock().expect("not poisoned").clone();
        if let Some(net) = &self.net {
            for (u, w) in self.watchers.iter().enumerate() {
                if let Client::Proc(p) = w {
                    all.extend(
                        net.log(*p)
                            .lines()
                            .filter_map(|l| serde_json::from_str::<Line>(l).ok())
                            .map(|l| (u, l.id, l.seen_us)),
                    );
                }
            }
        }
        all
    }

    // ---- content

    /// Publishes `file`: shared by node 0 (peer to peer), uploaded to the server
    /// (client-server), cut into the default pieces either way (the same content id). Returns
    /// what users fetch: a ticket, or the content id.
    pub async fn publish(&self, file: &Path, super_seed: bool) -> Result<String> {
        match self.arch {
            Arch::PeerToPeer => {
                let info = self.nodes[0]
                    .share(&ShareRequest {
                        path: file.to_path_buf(),
                        super_seed,
                        tracker: None,
                        piece_size: None,
                    })
                    .await?;
                Ok(info.ticket)
            }
            Arch::ClientServer => {
                let creds = self
                    .server()
                    .credentials()?
                    .context("the server's client has no cookie")?;
                let s = meshwork_server::client::upload(self.server().base(), &creds, file).await?;
                Ok(s.id)
            }
        }
    }

    /// User `u` starts downloading `target` to `out`.
    pub async fn download(&mut self, u: usize, target: &str, out: &Path) -> Result<()> {
        self.fetches[u] = Some(Fetch {
            fetcher: None,
            target: target.to_string(),
            out: out.to_path_buf(),
            asked: Instant::now(),
            state: Download::Running,
        });
        if self.arch == Arch::PeerToPeer {
            let info = self.nodes[u]
                .fetch(&FetchRequest {
                    target: target.to_string(),
                    out: Some(out.to_path_buf()),
                    tracker: None,
                })
                .await?;
            self.fetches[u].as_mut().expect("set").fetcher = Some(Fetcher::Node { id: info.id });
            return Ok(());
        }
        self.spawn_fetch(u)
    }

    /// Starts (or resumes) user `u`'s client-server download.
    fn spawn_fetch(&mut self, u: usize) -> Result<()> {
        let base = self.server().base().to_string();
        let host = self.host(u);
        let f = self.fetches[u].as_mut().expect("a download");
        if f.out.exists() {
            // The client names the file only once every piece verified: it finished just as
            // its user went down.
            f.state = Download::Done(f.asked.elapsed().as_secs_f64());
            return Ok(());
        }
        let (target, out) = (f.target.clone(), f.out.clone());
        let fetcher = match self.runner {
            RunnerKind::Inproc => {
                let cut = self.cut[u].clone();
                Fetcher::Task(tokio::spawn(async move {
                    if cut.load(Ordering::SeqCst) {
                        bail!("cut off from the server");
                    }
                    let id: meshwork_swarm::ContentId = target.parse()?;
                    meshwork_server::client::download(&base, &id, &out, |_, _| {}).await?;
                    Ok(())
                }))
            }
            RunnerKind::Netns => {
                let args = vec![
                    "--server".into(),
                    base,
                    "fetch".into(),
                    target,
                    "-o".into(),
                    out.display().to_string(),
                    "--json".into(),
                ];
                Fetcher::Proc(self.net().spawn(host, &format!("fetch-{u}"), &args)?)
            }
        };
        self.fetches[u].as_mut().expect("a download").fetcher = Some(fetcher);
        Ok(())
    }

    /// Where user `u`'s download stands (`None`: it asked for none).
    pub async fn download_state(&mut self, u: usize) -> Result<Option<Download>> {
        let node = self.nodes.get(u).cloned();
        let Some(f) = self.fetches[u].as_mut() else {
            return Ok(None);
        };
        if f.state != Download::Running {
            return Ok(Some(f.state.clone()));
        }
        let secs = f.asked.elapsed().as_secs_f64();
        let next = match &mut f.fetcher {
            // A crashed user's download is waiting for the user to come back.
            None => None,
            Some(Fetcher::Node { id }) => {
                let api = node.expect("peer to peer");
                match api.content(id).await {
                    Ok(Some(info)) if info.state == State::Seeding => Some(Download::Done(secs)),
                    Ok(Some(info)) if info.state == State::Failed => Some(Download::Failed(
                        info.error.unwrap_or_else(|| "failed".into()),
                    )),
                    _ => None,
                }
            }
            Some(Fetcher::Task(t)) => {
                if t.is_finished() {
                    let Some(Fetcher::Task(t)) = f.fetcher.take() else {
                        unreachable!("matched a task")
                    };
                    Some(match t.await {
                        Ok(Ok(())) => Download::Done(secs),
                        Ok(Err(e)) => Download::Failed(format!("{e:#}")),
                        Err(e) => Download::Failed(e.to_string()),
                    })
                } else {
                    None
                }
            }
            Some(Fetcher::Proc(p)) => {
                let p = *p;
                let net = self.net.as_mut().expect("netns");
                match net.exited(p)? {
                    Some(st) if st.success() => Some(Download::Done(secs)),
                    Some(st) => Some(Download::Failed(format!(
                        "{st}: {}",
                        net.log(p).lines().last().unwrap_or("")
                    ))),
                    None => None,
                }
            }
        };
        if let Some(s) = next {
            f.state = s;
            f.fetcher = None;
        }
        Ok(Some(f.state.clone()))
    }

    /// The bed's directory (downloads go there).
    pub fn work_dir(&self) -> &Path {
        &self.o.dir
    }

    /// The verified bytes user `u`'s download holds (client-server: the partial file's length,
    /// which holds only what was written in order).
    pub async fn download_bytes(&self, u: usize) -> Result<u64> {
        let Some(f) = self.fetches[u].as_ref() else {
            return Ok(0);
        };
        if let Download::Done(_) = f.state {
            return Ok(std::fs::metadata(&f.out).map(|m| m.len()).unwrap_or(0));
        }
        match &f.fetcher {
            Some(Fetcher::Node { id }) if self.up[u] => {
                Ok(self.nodes[u].content(id).await?.map_or(0, |i| i.bytes_have))
            }
            _ => {
                // Client-server fetches name the content by its id.
                let part = f
                    .target
                    .parse::<meshwork_swarm::ContentId>()
                    .map(|id| meshwork_server::client::part_path(&f.out, &id));
                Ok(part
                    .map_err(|_| std::io::Error::other("not a content id"))
                    .and_then(std::fs::metadata)
                    .or_else(|_| std::fs::metadata(&f.out))
                    .map(|m| m.len())
                    .unwrap_or(0))
            }
        }
    }

    // ---- the end

    /// Stops everything and removes every host. Returns how long the teardown took.
    pub async fn shutdown(mut self) -> Duration {
        let started = Instant::now();
        self.stop_agents();
        for w in std::mem::take(&mut self.watchers) {
            if let Client::Task(t) = w {
                t.abort();
            }
        }
        for f in self.fetches.iter_mut().flatten() {
            if let Some(Fetcher::Task(t)) = f.fetcher.take() {
                t.abort();
            }
        }
        if let Some(Server::Inproc { srv: Some(s), .. }) = self.server.take() {
            s.stop().await;
        }
        if let Some(h) = self.harness.take() {
            h.shutdown().await;
        }
        if let Some(mut net) = self.net.take() {
            net.teardown();
        }
        started.elapsed()
    }
}

/// `Some(reason)` once process `p` has exited.
fn exited(net: &mut NetnsRunner, p: ProcId) -> Result<Option<String>> {
    Ok(net
        .exited(p)?
        .map(|st| format!("the process exited ({st}):\n{}", net.log(p))))
}

/// `meshwork init` of a node's data directory; returns its peer id.
fn init_node(bin: &Path, dir: &Path) -> Result<String> {
    let out = std::process::Command::new(bin)
        .args([
            "--data-dir",
            &dir.display().to_string(),
            "init",
            "--network",
        ])
        .arg(NETWORK)
        .output()
        .context("meshwork init")?;
    ensure!(
        out.status.success(),
        "meshwork init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("peer id").map(|p| p.trim().to_string()))
        .context("init printed no peer id")
}

/// Writes `senders` into the `[chain] refuse_senders` of a data directory's config.toml.
fn refuse_in_config(dir: &Path, senders: &HashSet<Address>) -> Result<()> {
    let path = dir.join(meshwork_node::config::CONFIG_FILE);
    let text = std::fs::read_to_string(&path)?;
    let list: Vec<String> = senders
        .iter()
        .map(|a| format!("{:?}", a.to_string()))
        .collect();
    let line = format!("refuse_senders = [{}]", list.join(", "));
    ensure!(
        text.contains("refuse_senders = []"),
        "{}: no refuse_senders line to fill",
        path.display()
    );
    std::fs::write(&path, text.replacen("refuse_senders = []", &line, 1))?;
    Ok(())
}

/// Random distinct users, seeded: the victims of a scenario.
pub fn pick(rng: &mut impl Rng, from: &[usize], k: usize) -> Vec<usize> {
    let mut v: Vec<usize> = rand::seq::index::sample(rng, from.len(), k.min(from.len()))
        .into_iter()
        .map(|i| from[i])
        .collect();
    v.sort_unstable();
    v
}
