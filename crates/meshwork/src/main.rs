//! `meshwork`: the command-line program. It parses, calls the libraries or a running node's
//! HTTP API, and prints: results to stdout, logs to stderr.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use libp2p::multiaddr::Protocol;
use libp2p::Multiaddr;
use meshwork_node::config::{self, API_FILE};
use meshwork_node::node::{PeerInfo, Status};
use meshwork_node::NodeConfig;
use meshwork_proto::NetworkName;

mod central;
mod content;
mod lab;
mod wallet;

#[derive(Parser)]
#[command(
    name = "meshwork",
    version,
    about = "A peer-to-peer node, its client-server counterpart, and a lab that measures both"
)]
struct Cli {
    /// The data directory (identity, config, address book).
    #[arg(long, global = true, env = "MESHWORK_HOME", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Use a client-server counterpart (`meshwork server start`) at this URL instead of a
    /// node: `tx send`, `tx status`, `balance`, `share` and `fetch` then talk to it.
    #[arg(long, global = true, env = "MESHWORK_SERVER", value_name = "URL")]
    server: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Create the data directory, an identity and a commented config.toml.
    Init {
        /// The network to join.
        #[arg(long, default_value = config::DEFAULT_NETWORK)]
        network: String,
    },
    /// Run a node.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Show a running node's status.
    Status(ClientArgs),
    /// List a running node's connected peers.
    Peers(ClientArgs),
    /// Wallet keys.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Send a transfer, or follow one.
    Tx {
        #[command(subcommand)]
        command: TxCommand,
    },
    /// An account's confirmed balance.
    Balance {
        /// The account's address (64 hex digits).
        address: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The chain's tip and size; `chain verify` checks a stopped node's store.
    Chain {
        #[command(subcommand)]
        command: Option<ChainCommand>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The server's transfer log (with --server): the newest entries, or, with --follow,
    /// every new one as the server orders it (a long poll: the clients' subscription).
    Log {
        /// Start after this sequence number (default: the newest 20, or the end with --follow).
        #[arg(long, value_name = "SEQ")]
        after: Option<u64>,
        /// Keep printing entries as they come, until interrupted.
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show a block by height or hash.
    Block {
        /// A height on the main chain, or a block hash.
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Share a file through the running node: prints its content id and a ticket.
    Share {
        path: PathBuf,
        /// A tracker to announce to (http://HOST:PORT); it goes into the ticket.
        #[arg(long, value_name = "URL")]
        tracker: Option<String>,
        /// Initial seeding that uploads about one copy (offers pieces one at a time).
        #[arg(long)]
        super_seed: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Download a content through the running node; exits 0 only with a verified file.
    Fetch {
        /// A ticket (mw1...) or a bare content id (providers then come from the DHT or the
        /// tracker).
        target: String,
        /// Where to write the file (default: <data-dir>/downloads/<name>).
        #[arg(short = 'o', long = "out", value_name = "PATH")]
        out: Option<PathBuf>,
        /// A tracker to ask for peers (overrides the ticket's).
        #[arg(long, value_name = "URL")]
        tracker: Option<String>,
        /// Give up waiting after this many seconds (the node keeps fetching).
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The contents on the running node.
    Content {
        #[command(subcommand)]
        command: ContentCommand,
    },
    /// The content tracker (client-server peer discovery for the content swarm).
    Tracker {
        #[command(subcommand)]
        command: TrackerCommand,
    },
    /// The client-server counterpart: the ledger and content services on one HTTP server.
    Server {
        #[command(subcommand)]
        command: ServerCommand,
    },
    /// Lab measurements.
    Lab {
        #[command(subcommand)]
        command: lab::LabCommand,
    },
    /// Run a local demonstration network in this process.
    Demo {
        /// How many nodes.
        #[arg(long, default_value_t = 20)]
        nodes: usize,
        /// Bootstrap topology: chain, star or random.
        #[arg(long, default_value = "chain")]
        topology: meshwork_lab::Topology,
        /// Seconds of idle CPU measurement after convergence (0 skips it).
        #[arg(long, default_value_t = 3)]
        idle_secs: u64,
        /// Seconds to let the network settle before measuring idle CPU.
        #[arg(long, default_value_t = 5)]
        settle_secs: u64,
        /// Timers: "lab" (discovery in seconds) or "production" (a real node's).
        #[arg(long, default_value = "lab", value_parser = ["lab", "production"])]
        timers: String,
    },
}

#[derive(Subcommand)]
pub(crate) enum ContentCommand {
    /// Every content, with its state and progress.
    List(ClientArgs),
    /// Stop sharing or fetching a content (a shared file and a finished download stay on disk).
    /// With --server: delete it from the server (needs the server's cookie).
    Rm {
        /// The content id.
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Hash every piece the node holds of a content again: a download fetches the pieces that
    /// no longer match, a shared file that changed stops being served.
    Verify {
        /// The content id.
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand)]
enum TrackerCommand {
    /// Serve announces on HOST:PORT until Ctrl-C or SIGTERM.
    Start {
        #[arg(long, default_value = "127.0.0.1:6969", value_name = "HOST:PORT")]
        listen: SocketAddr,
        /// Seconds between a peer's announces; peers silent for three intervals expire.
        #[arg(long, default_value_t = 60)]
        interval_secs: u64,
        /// Seconds after which a silent peer expires (default: three intervals).
        #[arg(long, value_name = "SECS")]
        peer_ttl_secs: Option<u64>,
        /// Contents tracked at once; announces of further contents are refused (503).
        #[arg(long, default_value_t = 100_000)]
        max_contents: usize,
    },
}

#[derive(Subcommand)]
enum ServerCommand {
    /// Serve transfers, balances and content on HOST:PORT until Ctrl-C or SIGTERM. Its store
    /// is `--data-dir` (default: <meshwork home>/server).
    Start {
        #[arg(long, default_value = "127.0.0.1:8080", value_name = "HOST:PORT")]
        listen: SocketAddr,
        /// The network whose chain spec (and so chain id) transfers are signed for.
        #[arg(long, default_value = config::DEFAULT_NETWORK)]
        network: String,
        /// A JSON chain spec file instead of the network's built-in spec.
        #[arg(long, value_name = "FILE")]
        spec: Option<PathBuf>,
        /// Refuse transfers from this sender (repeatable): the operator's policy.
        #[arg(long, value_name = "ADDR")]
        refuse: Vec<String>,
        /// The most content bytes stored in all (uploads past it get 507), e.g. 16GiB.
        #[arg(long, env = "MESHWORK_SERVER_QUOTA", value_name = "BYTES", default_value = "16GiB", value_parser = parse_bytes)]
        quota: u64,
        /// The largest single upload (larger ones get 413), e.g. 4GiB.
        #[arg(long, env = "MESHWORK_SERVER_MAX_UPLOAD", value_name = "BYTES", default_value = "4GiB", value_parser = parse_bytes)]
        max_upload: u64,
    },
}

/// A byte count: digits with an optional binary suffix (KiB, MiB, GiB, TiB; K, M, G, T).
fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a byte count (e.g. 16GiB)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        u => return Err(format!("unknown unit {u:?} (use KiB, MiB, GiB or TiB)")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Create a key pair; prints its address and writes the secret key to FILE (mode 0600).
    New {
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Write the built-in dev and test chains' faucet key (public, funded at genesis) to FILE.
    DevFaucet {
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
pub(crate) enum TxCommand {
    /// Sign a transfer locally and submit it to the node; prints the transaction id.
    Send {
        /// The sender's key file (from `meshwork key new`).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The recipient's address.
        #[arg(long, value_name = "ADDR")]
        to: String,
        #[arg(long)]
        amount: u64,
        #[arg(long, default_value_t = 1)]
        fee: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// pending, confirmed at height H, or unknown.
    Status {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand)]
enum ChainCommand {
    /// Replay a stopped node's main chain from genesis and compare with its stored state.
    Verify,
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Start the node and run until Ctrl-C or SIGTERM.
    Start(StartArgs),
    /// Make a long-lived API token, for clients that cannot read the cookie file (another
    /// machine, a container, a monitoring system): prints the token, for the client
    /// (`--api-token`, MESHWORK_API_TOKEN, or `Authorization: Bearer TOKEN`), and its hash, for
    /// `[api] token_hashes` in the node's config.toml. The node keeps only the hash.
    Token,
}

#[derive(Args)]
struct StartArgs {
    /// An address to listen on (repeatable), e.g. /ip4/0.0.0.0/tcp/4001 or
    /// /ip4/0.0.0.0/udp/4001/quic-v1. Replaces the config file's list.
    #[arg(
        long = "listen",
        env = "MESHWORK_LISTEN",
        value_delimiter = ',',
        value_name = "MULTIADDR"
    )]
    listen: Vec<Multiaddr>,
    /// A peer to contact first (repeatable), e.g. /ip4/203.0.113.7/tcp/4001/p2p/12D3Koo...
    /// Added to the config file's list.
    #[arg(
        long = "bootstrap",
        env = "MESHWORK_BOOTSTRAP",
        value_delimiter = ',',
        value_name = "MULTIADDR"
    )]
    bootstrap: Vec<Multiaddr>,
    /// The HTTP API address (port 0 picks one).
    #[arg(long, env = "MESHWORK_API", value_name = "HOST:PORT")]
    api: Option<SocketAddr>,
    /// Accept loopback and private addresses heard from peers (LAN or single-machine networks).
    #[arg(long)]
    allow_private_addrs: bool,
    /// Mine blocks on a background thread.
    #[arg(long)]
    mine: bool,
    /// Where block rewards go; by default the key <data-dir>/miner.key (created if missing).
    #[arg(long, value_name = "ADDR", requires = "mine")]
    miner_address: Option<String>,
    /// Lab: the mean milliseconds between mined blocks, with exponentially distributed waits
    /// as proof of work's (for difficulty-1 test chains, where every hash wins).
    #[arg(long, value_name = "MS", requires = "mine")]
    mine_pace_ms: Option<u64>,
}

#[derive(Args)]
pub(crate) struct ClientArgs {
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
    /// The node's API address; by default read from <data-dir>/api.
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) api: Option<String>,
    /// The API cookie (the file the node writes at each start); by default
    /// <data-dir>/api.cookie.
    #[arg(long, env = "MESHWORK_API_COOKIE", value_name = "FILE")]
    pub(crate) api_cookie: Option<PathBuf>,
    /// A long-lived API token (`meshwork node token`), instead of the cookie.
    #[arg(
        long,
        env = "MESHWORK_API_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true,
        conflicts_with = "api_cookie"
    )]
    pub(crate) api_token: Option<String>,
}

fn main() {
    let cli = Cli::parse();
    // Servers and nodes hold many sockets: take the hard file limit, as most servers do. The
    // HTTP services keep their connection caps below whatever limit is in force.
    let _ = meshwork_http::serve::raise_file_limit();
    // yamux warns about every connection whose peer hung up first ("Broken pipe"), which is
    // routine at shutdown. The demo and the lab run many nodes in this process and print
    // their own results: their nodes' routine logs (blocks mined, gossipsub's complaints about
    // restarted peers) would bury them. RUST_LOG overrides these defaults.
    let quiet = matches!(cli.command, Command::Demo { .. } | Command::Lab { .. });
    // A client command whose output goes to a pipe closed early (`meshwork status | head`)
    // ends quietly, as Unix tools do, instead of panicking in println!. The long-running
    // services keep Rust's default (SIGPIPE ignored, EPIPE returned), so that nothing they
    // write can kill them.
    let service = matches!(
        cli.command,
        Command::Node { .. }
            | Command::Server { .. }
            | Command::Tracker { .. }
            | Command::Lab { .. }
            | Command::Demo { .. }
    );
    if !service {
        // SAFETY: restoring a signal's default disposition before any thread is started.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let default = if quiet {
        "warn,yamux=error,libp2p_gossipsub=error"
    } else {
        "warn,yamux=error,meshwork_node=info"
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default.into()),
        )
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(cli)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(mut cli: Cli) -> Result<()> {
    if let Some(url) = cli.server.take() {
        return central::run(cli.command, cli.data_dir.as_deref(), &url).await;
    }
    match cli.command {
        Command::Init { network } => init(cli.data_dir.as_deref(), &network),
        Command::Node {
            command: NodeCommand::Start(args),
        } => node_start(cli.data_dir.as_deref(), args).await,
        Command::Node {
            command: NodeCommand::Token,
        } => {
            let (token, hash) = meshwork_http::auth::new_token();
            println!("token  {token}");
            println!("hash   {hash}");
            println!();
            println!("Add the hash to the node's config.toml and restart the node:");
            println!("  [api]");
            println!("  token_hashes = [\"{hash}\"]");
            println!("and give the token to the client, which passes it with --api-token TOKEN");
            println!("(or MESHWORK_API_TOKEN, or the header 'Authorization: Bearer TOKEN').");
            println!("Keep the token secret: it works until its hash leaves the config.");
            Ok(())
        }
        Command::Status(args) => status(cli.data_dir.as_deref(), args).await,
        Command::Share {
            path,
            tracker,
            super_seed,
            client,
        } => content::share(cli.data_dir.as_deref(), client, &path, tracker, super_seed).await,
        Command::Fetch {
            target,
            out,
            tracker,
            timeout,
            client,
        } => {
            content::fetch(
                cli.data_dir.as_deref(),
                client,
                &target,
                out.as_deref(),
                tracker,
                timeout,
            )
            .await
        }
        Command::Content {
            command: ContentCommand::List(client),
        } => content::list(cli.data_dir.as_deref(), client).await,
        Command::Content {
            command: ContentCommand::Rm { id, client },
        } => content::remove(cli.data_dir.as_deref(), client, &id).await,
        Command::Content {
            command: ContentCommand::Verify { id, client },
        } => content::verify(cli.data_dir.as_deref(), client, &id).await,
        Command::Peers(args) => peers(cli.data_dir.as_deref(), args).await,
        Command::Tracker {
            command:
                TrackerCommand::Start {
                    listen,
                    interval_secs,
                    peer_ttl_secs,
                    max_contents,
                },
        } => {
            if interval_secs == 0 || peer_ttl_secs == Some(0) || max_contents == 0 {
                bail!("--interval-secs, --peer-ttl-secs and --max-contents must be at least 1");
            }
            let interval = Duration::from_secs(interval_secs);
            let stop = StopSignals::install()?;
            let t = meshwork_server::http::start(
                listen,
                meshwork_server::tracker::TrackerConfig {
                    interval,
                    peer_ttl: peer_ttl_secs.map_or(interval * 3, Duration::from_secs),
                    max_contents,
                    ..Default::default()
                },
            )
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
            println!("announce    http://{}/api/v1/announce", t.addr);
            println!("stats       http://{}/api/v1/stats", t.addr);
            println!("tracker is ready");
            stop.wait().await?;
            t.stop();
            Ok(())
        }
        Command::Server {
            command:
                ServerCommand::Start {
                    listen,
                    network,
                    spec,
                    refuse,
                    quota,
                    max_upload,
                },
        } => {
            let refuse = refuse
                .iter()
                .map(|a| a.parse().with_context(|| format!("--refuse {a}")))
                .collect::<Result<_>>()?;
            let opts = central::ServerOptions {
                listen,
                network: &network,
                spec: spec.as_deref(),
                refuse,
                quota,
                max_upload,
            };
            central::server_start(cli.data_dir.as_deref(), opts).await
        }
        Command::Lab { command } => lab::run(command).await,
        Command::Key {
            command: KeyCommand::New { out },
        } => wallet::key_new(&out),
        Command::Key {
            command: KeyCommand::DevFaucet { out },
        } => wallet::write_key(
            &out,
            &meshwork_ledger::Wallet::from_secret(&meshwork_ledger::spec::DEV_FAUCET_SECRET),
        ),
        Command::Tx {
            command:
                TxCommand::Send {
                    key,
                    to,
                    amount,
                    fee,
                    client,
                },
        } => {
            let a = wallet::SendArgs {
                key: &key,
                to: &to,
                amount,
                fee,
            };
            wallet::tx_send(cli.data_dir.as_deref(), client, a).await
        }
        Command::Tx {
            command: TxCommand::Status { id, client },
        } => wallet::tx_status(cli.data_dir.as_deref(), client, &id).await,
        Command::Balance { address, client } => {
            wallet::balance(cli.data_dir.as_deref(), client, &address).await
        }
        Command::Chain {
            command: Some(ChainCommand::Verify),
            ..
        } => wallet::chain_verify(cli.data_dir.as_deref()),
        Command::Chain {
            command: None,
            client,
        } => wallet::chain(cli.data_dir.as_deref(), client).await,
        Command::Block { id, client } => wallet::block(cli.data_dir.as_deref(), client, &id).await,
        Command::Log { .. } => bail!(
            "log is the transfer log of a server: use it with --server URL (a node's chain is \
             `meshwork chain` and `meshwork block`)"
        ),
        Command::Demo {
            nodes,
            topology,
            idle_secs,
            settle_secs,
            timers,
        } => {
            let opts = meshwork_lab::demo::DemoOptions {
                nodes,
                topology,
                idle_window: Duration::from_secs(idle_secs),
                settle: Duration::from_secs(settle_secs),
                production_timers: timers == "production",
                ..Default::default()
            };
            meshwork_lab::demo::run(opts, &mut std::io::stdout()).await
        }
    }
}

fn init(data_dir: Option<&Path>, network: &str) -> Result<()> {
    let network = NetworkName::new(network)?;
    let dir = config::data_dir(data_dir)?;
    let key = config::init(&dir, &network)?;
    println!("initialized {}", dir.display());
    println!("network   {network}");
    println!("peer id   {}", key.public().to_peer_id());
    println!("identity  {}", dir.join(config::IDENTITY_FILE).display());
    println!("config    {}", dir.join(config::CONFIG_FILE).display());
    Ok(())
}

async fn node_start(data_dir: Option<&Path>, args: StartArgs) -> Result<()> {
    let stop = StopSignals::install()?;
    let dir = config::data_dir(data_dir)?;
    let key = config::load_identity(&dir)?;
    let file = config::load_file_config(&dir)?;
    let mut cfg = NodeConfig::from_file(&file, key, dir.clone())?;
    if !args.listen.is_empty() {
        cfg.listen = args.listen;
    }
    cfg.bootstrap.extend(args.bootstrap);
    if let Some(api) = args.api {
        cfg.api = Some(api);
    }
    cfg.allow_private_addrs |= args.allow_private_addrs;
    if args.mine {
        let address = match &args.miner_address {
            Some(a) => a.parse().context("--miner-address")?,
            None => wallet::miner_wallet(&dir)?.address(),
        };
        cfg.mining = Some(meshwork_node::ledger_service::MinerConfig {
            address,
            pace: args.mine_pace_ms.map(Duration::from_millis),
        });
    }
    if cfg.listen.is_empty() {
        bail!(
            "no listen address: pass --listen or set [node] listen in {}",
            dir.join(config::CONFIG_FILE).display()
        );
    }

    let node = meshwork_node::start(cfg.clone()).await?;
    let peer_id = node.peer_id();
    println!("peer id     {peer_id}");
    println!("network     {}", cfg.network);
    for a in &node.listen_addrs {
        println!("listening   {}", a.clone().with(Protocol::P2p(peer_id)));
    }
    if let Some(api) = node.api_addr {
        println!("api         http://{api}/api/v1/status");
        println!("metrics     http://{api}/metrics");
        let cookie = node
            .api_cookie_path()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "(held in memory)".into());
        println!("api cookie  {cookie}");
        if !api.ip().is_loopback() {
            println!(
                "note        the API listens beyond loopback ({api}): every call needs the cookie \
                 in {cookie} (HTTP basic as __cookie__, or a bearer token) or a token of \
                 [api] token_hashes (`meshwork node token`); requests must name this machine by \
                 the address they connect to (IP:{port}), localhost:{port} or a name of [api] hosts",
                port = api.port()
            );
        }
    }
    if let Some(m) = &cfg.mining {
        println!("mining to   {}", m.address);
    }
    println!("node is ready");

    stop.wait().await?;
    eprintln!("stopping: flushing the address book");
    node.shutdown().await;
    println!("node stopped");
    Ok(())
}

/// Ctrl-C (SIGINT) and SIGTERM, listened for from the moment [`StopSignals::install`] returns.
///
/// Install it before saying "ready": a signal sent by a supervisor or a test right after the
/// ready line, before the wait begins, is then held for [`StopSignals::wait`] instead of
/// killing the process by the default action (no flush of the address book, exit by signal).
pub(crate) struct StopSignals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Replaces the default action of SIGINT and SIGTERM with a wake-up of [`Self::wait`].
    ///
    /// # Errors
    /// When the signal handlers cannot be installed (no Tokio runtime with signals).
    pub(crate) fn install() -> Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Self {
                interrupt: signal(SignalKind::interrupt())?,
                terminate: signal(SignalKind::terminate())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// Returns once either signal has arrived since [`Self::install`].
    ///
    /// # Errors
    /// Off Unix, when Ctrl-C cannot be listened for.
    pub(crate) async fn wait(mut self) -> Result<()> {
        #[cfg(unix)]
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
        #[cfg(not(unix))]
        tokio::signal::ctrl_c().await?;
        Ok(())
    }
}

/// A node's API (or a server's) as the CLI calls it: the base URL and the credentials.
pub(crate) struct Target {
    pub(crate) base: String,
    /// The cookie's credentials, or why there are none (said when the service answers 401).
    creds: std::result::Result<meshwork_http::auth::Credentials, String>,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.base)
    }
}

impl Target {
    /// `base` with the cookie from `cookie` (`--api-cookie`), else `<dir>/api.cookie`. A
    /// cookie that cannot be read is not an error yet: calls that need none still work, and a
    /// 401 then says why it was missing.
    pub(crate) fn new(base: String, cookie: Option<&Path>, dir: Option<&Path>) -> Target {
        let creds = match (cookie, dir) {
            (Some(c), _) => meshwork_http::auth::Credentials::read(c).map_err(|e| {
                format!("{e} (the file given with --api-cookie or MESHWORK_API_COOKIE)")
            }),
            // A cookie of the data directory goes to its own service only.
            (None, Some(d)) => {
                meshwork_http::auth::Credentials::read(&d.join(config::API_COOKIE_FILE))
                    .map_err(|e| e.to_string())
                    .and_then(|c| own_service(d, &base).map(|()| c))
            }
            (None, None) => Err("no API cookie: pass --api-cookie FILE".into()),
        };
        Target { base, creds }
    }

    /// `base` with an API token (`--api-token`); a token a header cannot carry is an error.
    pub(crate) fn with_token(base: String, token: &str) -> Result<Target> {
        let creds = meshwork_http::auth::Credentials::token(token)
            .map_err(|e| anyhow::anyhow!("--api-token: {e}"))?;
        Ok(Target {
            base,
            creds: Ok(creds),
        })
    }

    /// Adds the credentials, when there are any.
    pub(crate) fn authorize(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.creds {
            Ok(c) => c.apply(req),
            Err(_) => req,
        }
    }

    /// The credentials, or the reason there are none.
    pub(crate) fn credentials(&self) -> Result<&meshwork_http::auth::Credentials> {
        self.creds.as_ref().map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// The sentence for a 401 at `url`.
    pub(crate) fn unauthorized(&self, url: &str) -> anyhow::Error {
        match &self.creds {
            Err(why) => anyhow::anyhow!("{url}: 401 Unauthorized: {why}"),
            Ok(c) if c.is_token() => anyhow::anyhow!(
                "{url}: 401 Unauthorized: the API token was refused; is its hash in the node's \
                 [api] token_hashes, and was the node restarted since?"
            ),
            Ok(_) => anyhow::anyhow!(
                "{url}: 401 Unauthorized: the API cookie was refused; it changes at each start of \
                 the service, so pass the current one (--api-cookie FILE, or the data directory \
                 of the running service with --data-dir)"
            ),
        }
    }
}

/// Whether `base` is the service whose data directory is `dir` (the address it wrote to
/// `<dir>/api`): the cookie of a data directory is sent there only, never to another address
/// given with `--api` or `--server` (which may be anyone's). A wildcard or loopback bind also
/// answers `localhost` and loopback addresses on its port.
fn own_service(dir: &Path, base: &str) -> Result<(), String> {
    let file = dir.join(API_FILE);
    let refuse = |why: &str| {
        Err(format!(
            "the cookie of {} goes only to the service that wrote it ({why}); for {base} pass \
             --api-cookie FILE or --api-token TOKEN",
            dir.display()
        ))
    };
    let Ok(text) = std::fs::read_to_string(&file) else {
        return refuse(&format!("{} is missing: is it running?", file.display()));
    };
    let Ok(own) = text.trim().parse::<std::net::SocketAddr>() else {
        return refuse(&format!("{} holds no address", file.display()));
    };
    let Ok(url) = reqwest::Url::parse(base) else {
        return refuse("not a URL");
    };
    let port = url.port_or_known_default();
    // An IPv6 host comes in brackets.
    let host: Option<std::net::IpAddr> = url
        .host_str()
        .and_then(|h| h.trim_start_matches('[').trim_end_matches(']').parse().ok());
    if host.map(|ip| std::net::SocketAddr::new(ip, port.unwrap_or(0))) == Some(own) {
        return Ok(());
    }
    let loopback = url.host_str() == Some("localhost") || host.is_some_and(|ip| ip.is_loopback());
    if port == Some(own.port()) && loopback && (own.ip().is_unspecified() || own.ip().is_loopback())
    {
        return Ok(());
    }
    refuse(&format!("it answers at {own}"))
}

/// The node's API: `--api`, else the address the node wrote to `<data-dir>/api`; its cookie
/// `--api-cookie`, else `<data-dir>/api.cookie`.
pub(crate) fn api_base(data_dir: Option<&Path>, client: &ClientArgs) -> Result<Target> {
    // With --api given, the data directory is needed only for the cookie, and may not exist.
    let dir = match (&client.api, &client.api_cookie) {
        (Some(_), Some(_)) => None,
        (Some(_), None) => config::data_dir(data_dir).ok(),
        (None, _) => Some(config::data_dir(data_dir)?),
    };
    let addr = match &client.api {
        Some(a) => a.clone(),
        None => {
            let path = dir.as_deref().unwrap_or(Path::new(".")).join(API_FILE);
            std::fs::read_to_string(&path)
                .with_context(|| {
                    format!(
                        "{}: cannot read the API address; is the node running? (or pass --api)",
                        path.display()
                    )
                })?
                .trim()
                .to_owned()
        }
    };
    let base = if addr.starts_with("http://") || addr.starts_with("https://") {
        addr
    } else {
        format!("http://{addr}")
    };
    if let Some(token) = &client.api_token {
        return Target::with_token(base, token);
    }
    Ok(Target::new(
        base,
        client.api_cookie.as_deref(),
        dir.as_deref(),
    ))
}

/// One request to the node's API: the status and the JSON answer (`null` for an empty body).
/// A 401 is an error that says what to do.
pub(crate) async fn request<B: serde::Serialize>(
    target: &Target,
    method: reqwest::Method,
    url: &str,
    body: Option<&B>,
    timeout: Duration,
) -> Result<(reqwest::StatusCode, serde_json::Value)> {
    let client = reqwest::Client::builder().timeout(timeout).build()?;
    let mut req = target.authorize(client.request(method, url));
    if let Some(b) = body {
        req = req.json(b);
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("cannot reach the node at {url}"))?;
    let code = resp.status();
    if code == reqwest::StatusCode::UNAUTHORIZED {
        return Err(target.unauthorized(url));
    }
    let text = meshwork_http::body::read_capped(resp, meshwork_http::body::API_ANSWER_MAX)
        .await
        .with_context(|| format!("{url}: the answer"))?;
    let json = if text.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&text).with_context(|| format!("{url}: the answer is not JSON"))?
    };
    Ok((code, json))
}

/// The API's error sentence in an answer, if it has one.
pub(crate) fn api_error(body: &serde_json::Value) -> Option<&str> {
    body.get("error").and_then(|e| e.as_str())
}

pub(crate) async fn get<T: serde::de::DeserializeOwned>(
    base: &Target,
    path: &str,
) -> Result<(T, serde_json::Value)> {
    let url = format!("{base}{path}");
    let (code, body) = request::<()>(
        base,
        reqwest::Method::GET,
        &url,
        None,
        Duration::from_secs(15),
    )
    .await?;
    if !code.is_success() {
        bail!("{url}: {code}: {}", api_error(&body).unwrap_or("error"));
    }
    let typed = serde_json::from_value(body.clone())
        .with_context(|| format!("{url}: unexpected answer"))?;
    Ok((typed, body))
}

fn duration_text(s: u64) -> String {
    let (h, m, sec) = (s / 3600, (s / 60) % 60, s % 60);
    if h > 0 {
        format!("{h}h {m}m {sec}s")
    } else if m > 0 {
        format!("{m}m {sec}s")
    } else {
        format!("{sec}s")
    }
}

async fn status(data_dir: Option<&Path>, args: ClientArgs) -> Result<()> {
    let base = api_base(data_dir, &args)?;
    let (s, raw): (Status, _) = get(&base, "/api/v1/status").await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&raw)?);
        return Ok(());
    }
    println!("peer id       {}", s.peer_id);
    println!("network       {}", s.network);
    println!("agent         {}", s.agent);
    println!("uptime        {}", duration_text(s.uptime_s));
    for a in &s.listen_addrs {
        println!("listening     {a}");
    }
    let c = &s.connections;
    println!(
        "connections   {} inbound, {} outbound, {} other",
        c.inbound, c.outbound, c.other
    );
    let b = &s.address_book;
    println!(
        "address book  {} new, {} tried, {} banned",
        b.new, b.tried, b.banned
    );
    println!(
        "chain         height {}, tip {}{}{}",
        s.chain.height,
        &s.chain.tip[..16],
        if s.chain.sync_pending > 0 {
            format!(", syncing {} blocks", s.chain.sync_pending)
        } else {
            String::new()
        },
        if s.chain.mining {
            ", mining"
        } else if s.chain.miner_configured {
            ", mining paused"
        } else {
            ""
        }
    );
    match &s.health.error {
        None => println!("health        ok"),
        Some(why) => println!("health        UNHEALTHY: {why}"),
    }
    Ok(())
}

async fn peers(data_dir: Option<&Path>, args: ClientArgs) -> Result<()> {
    let base = api_base(data_dir, &args)?;
    let (peers, raw): (Vec<PeerInfo>, _) = get(&base, "/api/v1/peers").await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&raw)?);
        return Ok(());
    }
    if peers.is_empty() {
        println!("no connected peers");
        return Ok(());
    }
    println!(
        "{:<54} {:<9} {:<18} {:<9} {:>8} {:>7}  address",
        "peer id", "direction", "group", "via", "rtt ms", "score"
    );
    for p in &peers {
        println!(
            "{:<54} {:<9} {:<18} {:<9} {:>8} {:>7.1}  {}",
            p.peer_id,
            format!("{:?}", p.direction).to_lowercase(),
            p.address_group.as_deref().unwrap_or("-"),
            p.learned_via
                .map(|v| v.to_string())
                .unwrap_or_else(|| "-".into()),
            p.rtt_ms
                .map(|r| format!("{r:.1}"))
                .unwrap_or_else(|| "-".into()),
            p.misbehaviour,
            p.address
        );
    }
    Ok(())
}
