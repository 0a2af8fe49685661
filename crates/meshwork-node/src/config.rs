//! The data directory, the identity file and `config.toml`.
//!
//! Layout of a data directory:
//! - `identity.key`: the node's ed25519 key, libp2p protobuf encoding, mode 0600;
//! - `config.toml`: settings, written commented by `meshwork init`;
//! - `node.redb`: the address book, bans and anchors (a cache: a damaged one is set aside as
//!   `node.redb.damaged-<unix time>` and rebuilt);
//! - `chain.redb`: the chain store (blocks, state, undo data);
//! - `api`: the address of the running node's HTTP API (present while it runs);
//! - `api.cookie`: the API's secret, new at each start, mode 0600 (present while it runs).
//!
//! Precedence: command-line flags override environment variables, which override the file,
//! which overrides the defaults here.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::Multiaddr;
use meshwork_proto::NetworkName;
use serde::{Deserialize, Serialize};

use crate::addrbook::AddrBookConfig;

pub const IDENTITY_FILE: &str = "identity.key";
pub const CONFIG_FILE: &str = "config.toml";
pub const STORE_FILE: &str = "node.redb";
/// The chain store: blocks, state, undo data (see `meshwork_ledger::chain`).
pub const CHAIN_FILE: &str = "chain.redb";
pub const API_FILE: &str = "api";
/// The API cookie in the data directory (see `meshwork_http::auth`).
pub const API_COOKIE_FILE: &str = meshwork_http::auth::COOKIE_FILE;
pub const DEFAULT_NETWORK: &str = "meshwork";
pub const DEFAULT_PORT: u16 = 4001;
pub const DEFAULT_API: &str = "127.0.0.1:8650";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no data directory given and none could be derived for this platform; pass --data-dir or set MESHWORK_HOME")]
    NoDataDir,
    #[error("{path}: an identity already exists; refusing to overwrite it")]
    IdentityExists { path: PathBuf },
    #[error("{path}: no identity here; run `meshwork init` first")]
    NoIdentity { path: PathBuf },
    #[error("{path}: cannot read the identity: {source}")]
    ReadIdentity {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: the identity file is corrupt: {reason}")]
    CorruptIdentity { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid configuration: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ConfigError + '_ {
    move |source| ConfigError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The data directory: the given one, else `$MESHWORK_HOME` (the CLI passes it as the flag's
/// env fallback), else the platform's data directory (`~/.local/share/meshwork` on Linux).
pub fn data_dir(given: Option<&Path>) -> Result<PathBuf, ConfigError> {
    if let Some(p) = given {
        return Ok(p.to_owned());
    }
    directories::ProjectDirs::from("", "", "meshwork")
        .map(|d| d.data_dir().to_owned())
        .ok_or(ConfigError::NoDataDir)
}

/// `config.toml`. Every field has a default, and unknown fields are errors (a typo in a
/// setting should not be silently ignored).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    pub network: NetworkSection,
    pub node: NodeSection,
    pub connections: ConnectionsSection,
    pub discovery: DiscoverySection,
    pub chain: ChainSection,
    pub content: ContentSection,
    pub api_connections: ApiConnectionsSection,
    pub api: ApiSection,
}

/// `[api_connections]`: the HTTP API listener's bounds (`meshwork_http::serve::Limits`;
/// defaults from `Limits::api()`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConnectionsSection {
    /// Connections open at once, at most (also kept below the file limit).
    pub max_connections: usize,
    /// Connections from one IP, at most.
    pub max_per_ip: usize,
    /// Seconds for a request's headers to arrive.
    pub header_read_s: u64,
    /// Seconds a keep-alive connection may rest between requests.
    pub keep_alive_s: u64,
    /// Seconds a request may wait on its client (its upload, or reading the answer).
    pub stall_s: u64,
}

impl Default for ApiConnectionsSection {
    fn default() -> Self {
        let l = meshwork_http::serve::Limits::api();
        Self {
            max_connections: l.max_connections,
            max_per_ip: l.max_per_ip,
            header_read_s: l.header_read.as_secs(),
            keep_alive_s: l.keep_alive.as_secs(),
            stall_s: l.stall.as_secs(),
        }
    }
}

/// Default `[content] tracker_retry_s`.
pub const DEFAULT_TRACKER_RETRY_S: u64 = 60;

/// `[content]`: the content service's settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContentSection {
    /// Seconds before a failed tracker is asked again (at least 1).
    pub tracker_retry_s: u64,
}

impl Default for ContentSection {
    fn default() -> Self {
        Self {
            tracker_retry_s: DEFAULT_TRACKER_RETRY_S,
        }
    }
}

/// `[api]`: who may call the HTTP API (its address is `[node] api`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiSection {
    /// Further names the API answers to in the `Host` header (`NAME` or `NAME:PORT`), besides
    /// its own address, `localhost` and (on loopback) `127.0.0.1`/`[::1]`; most 64.
    pub hosts: Vec<String>,
    /// BLAKE3 hashes (64 hex digits) of long-lived API tokens accepted besides the cookie
    /// (`meshwork node token` makes one); at most 64.
    pub token_hashes: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChainSection {
    /// A JSON chain spec; empty means the built-in spec of the network.
    pub spec_file: String,
    /// Senders (addresses) whose transfers this node neither relays nor mines.
    pub refuse_senders: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkSection {
    pub name: String,
    pub bootstrap: Vec<String>,
    pub allow_private_addrs: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeSection {
    pub listen: Vec<String>,
    pub api: String,
    pub kad_server: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectionsSection {
    pub target_outbound: usize,
    pub max_inbound: usize,
    pub max_inbound_per_ip: usize,
    pub max_transient: usize,
    pub idle_timeout_s: u64,
    pub anchors: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscoverySection {
    pub pex_interval_s: u64,
    pub pex_answer_interval_s: u64,
    pub random_walk_interval_s: u64,
    pub feeler_interval_s: u64,
}

impl Default for NetworkSection {
    fn default() -> Self {
        Self {
            name: DEFAULT_NETWORK.into(),
            bootstrap: vec![],
            allow_private_addrs: false,
        }
    }
}

impl Default for NodeSection {
    fn default() -> Self {
        Self {
            listen: vec![
                format!("/ip4/0.0.0.0/tcp/{DEFAULT_PORT}"),
                format!("/ip4/0.0.0.0/udp/{DEFAULT_PORT}/quic-v1"),
            ],
            api: DEFAULT_API.into(),
            kad_server: true,
        }
    }
}

impl Default for ConnectionsSection {
    fn default() -> Self {
        let t = Timings::default();
        Self {
            target_outbound: 8,
            max_inbound: 64,
            max_inbound_per_ip: 8,
            max_transient: 32,
            idle_timeout_s: t.idle_timeout.as_secs(),
            anchors: true,
        }
    }
}

impl Default for DiscoverySection {
    fn default() -> Self {
        let t = Timings::default();
        Self {
            pex_interval_s: t.pex_interval.as_secs(),
            pex_answer_interval_s: t.pex_answer_interval.as_secs(),
            random_walk_interval_s: t.random_walk_interval.as_secs(),
            feeler_interval_s: t.feeler_interval.as_secs(),
        }
    }
}

/// The text `meshwork init` writes: every setting, commented, at its default.
pub fn default_config_text(network: &NetworkName) -> String {
    let d = FileConfig::default();
    format!(
        r#"# Meshwork node configuration.
# Command-line flags override environment variables, which override this file.

[network]
# The network to join. Nodes only talk to nodes of the same network: every protocol name
# carries it (/meshwork/<name>/...).
name = "{network}"
# Peers to contact first, as multiaddrs ending in /p2p/<peer id>; --bootstrap adds more.
# After the first run the node remembers its peers (node.redb) and needs no bootstrap.
bootstrap = []
# Accept loopback and private (10/8, 192.168/16, ...) addresses heard from peers. Leave false
# on the Internet; set true on a LAN or for a test network on one machine.
allow_private_addrs = {allow_private}

[node]
# Addresses to listen on (TCP and QUIC). --listen replaces this list.
listen = [{listen}]
# The HTTP API (JSON, /api/v1/...) and Prometheus metrics (/metrics). Every call needs the
# cookie the node writes to <data-dir>/api.cookie at each start (HTTP basic as __cookie__, or
# a bearer token). Port 0 picks a free port; the address in use is written to <data-dir>/api.
api = "{api}"
# Answer Kademlia queries from other peers (turn off on nodes that are not reachable).
kad_server = {kad}

[connections]
# Outbound connections to keep, each to a different address group (IPv4 /16, IPv6 /32).
target_outbound = {out}
# Inbound connections accepted, in all and from one IP.
max_inbound = {inb}
max_inbound_per_ip = {per_ip}
# Short-lived outbound connections (DHT queries) open at once; further dials wait or fail.
max_transient = {transient}
# Seconds an unused short-lived connection (DHT query, feeler) stays open.
idle_timeout_s = {idle}
# Reconnect to the previous outbound peers first after a restart.
anchors = {anchors}

[discovery]
# Seconds between peer-exchange requests (each to one random connected peer; every new peer
# is also asked once when it connects).
pex_interval_s = {pex}
# Seconds a peer must wait between two of its PEX requests being answered.
pex_answer_interval_s = {pex_answer}
# Seconds between Kademlia random walks that refresh the routing table.
random_walk_interval_s = {walk}
# Seconds between feeler connections that test addresses of the new table.
feeler_interval_s = {feeler}

[chain]
# A chain spec (JSON: genesis allocations, block interval, difficulty, limits). Empty: the
# built-in spec of the network (`dev` rules; networks named test-* get difficulty 1).
spec_file = ""
# Addresses whose transfers this node neither accepts into its mempool, relays nor mines (an
# operator's policy; blocks that hold them are still valid). Most at 10 000.
refuse_senders = []

[content]
# Seconds before a tracker that failed (unreachable, an error, an oversized answer) is asked
# again.
tracker_retry_s = {tracker_retry}

[api_connections]
# The API's connections: at most this many at once (kept below the process's file limit
# anyway) and from one IP; when full, a newcomer replaces the connection idle the longest.
max_connections = {api_max}
max_per_ip = {api_per_ip}
# Seconds for a request's headers to arrive, for a kept-alive connection to rest between
# requests, and for a request to wait on its client (its upload, or reading the answer).
header_read_s = {api_header}
keep_alive_s = {api_keep}
stall_s = {api_stall}

[api]
# Names the API answers to besides its own address and localhost (for a reverse proxy or a
# DNS name), as "NAME" or "NAME:PORT". Requests naming any other host are refused (421), so
# that a web page cannot reach the API through DNS rebinding.
hosts = []
# Hashes of long-lived API tokens, accepted as "Authorization: Bearer TOKEN" besides the cookie,
# for clients that cannot read the cookie file. `meshwork node token` makes a token and its hash.
token_hashes = []
"#,
        network = network,
        allow_private = d.network.allow_private_addrs,
        listen = d
            .node
            .listen
            .iter()
            .map(|l| format!("\"{l}\""))
            .collect::<Vec<_>>()
            .join(", "),
        api = d.node.api,
        tracker_retry = d.content.tracker_retry_s,
        api_max = d.api_connections.max_connections,
        api_per_ip = d.api_connections.max_per_ip,
        api_header = d.api_connections.header_read_s,
        api_keep = d.api_connections.keep_alive_s,
        api_stall = d.api_connections.stall_s,
        kad = d.node.kad_server,
        out = d.connections.target_outbound,
        inb = d.connections.max_inbound,
        per_ip = d.connections.max_inbound_per_ip,
        transient = d.connections.max_transient,
        idle = d.connections.idle_timeout_s,
        anchors = d.connections.anchors,
        pex = d.discovery.pex_interval_s,
        pex_answer = d.discovery.pex_answer_interval_s,
        walk = d.discovery.random_walk_interval_s,
        feeler = d.discovery.feeler_interval_s,
    )
}

/// Reads `config.toml` from the data dir; a missing file means all defaults.
pub fn load_file_config(dir: &Path) -> Result<FileConfig, ConfigError> {
    let path = dir.join(CONFIG_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(FileConfig::default()),
        Err(source) => return Err(ConfigError::Io { path, source }),
    };
    let cfg: FileConfig = toml::from_str(&text).map_err(|e| ConfigError::Invalid {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    NetworkName::new(&cfg.network.name).map_err(|e| ConfigError::Invalid {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    Ok(cfg)
}

/// Creates the data dir, the identity (mode 0600) and a commented config. Refuses if an
/// identity exists. Returns the new identity.
pub fn init(dir: &Path, network: &NetworkName) -> Result<Keypair, ConfigError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let id_path = dir.join(IDENTITY_FILE);
    if id_path.exists() {
        return Err(ConfigError::IdentityExists { path: id_path });
    }
    let key = Keypair::generate_ed25519();
    let bytes = key
        .to_protobuf_encoding()
        .expect("ed25519 keys always encode");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&id_path).map_err(|source| match source.kind() {
        std::io::ErrorKind::AlreadyExists => ConfigError::IdentityExists {
            path: id_path.clone(),
        },
        _ => ConfigError::Io {
            path: id_path.clone(),
            source,
        },
    })?;
    f.write_all(&bytes)
        .and_then(|_| f.sync_all())
        .map_err(io_err(&id_path))?;
    let cfg_path = dir.join(CONFIG_FILE);
    if !cfg_path.exists() {
        std::fs::write(&cfg_path, default_config_text(network)).map_err(io_err(&cfg_path))?;
    }
    Ok(key)
}

/// Reads the identity from the data dir, naming the file in every error.
pub fn load_identity(dir: &Path) -> Result<Keypair, ConfigError> {
    let path = dir.join(IDENTITY_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ConfigError::NoIdentity { path })
        }
        Err(source) => return Err(ConfigError::ReadIdentity { path, source }),
    };
    let key =
        Keypair::from_protobuf_encoding(&bytes).map_err(|e| ConfigError::CorruptIdentity {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    if key.clone().try_into_ed25519().is_err() {
        return Err(ConfigError::CorruptIdentity {
            path,
            reason: "not an ed25519 key".into(),
        });
    }
    Ok(key)
}

/// Timers of the node's periodic work. Production defaults; the lab shortens them.
#[derive(Clone, Debug, PartialEq)]
pub struct Timings {
    /// How often the connection manager tops up outbound connections and resolves collisions.
    pub maintenance: Duration,
    /// Every interval, one random connected peer is asked for PEX (every new peer is asked once
    /// when it connects).
    pub pex_interval: Duration,
    pub pex_answer_interval: Duration,
    /// Random walks: one `get_closest_peers` of a random id.
    pub random_walk_interval: Duration,
    /// Kademlia's own periodic bootstrap: a lookup of our id and of a random id in every bucket
    /// range, so it costs several walks; it runs less often.
    pub kad_bootstrap_interval: Duration,
    pub feeler_interval: Duration,
    pub idle_timeout: Duration,
    /// How often the address book is written to disk (it is also written at shutdown).
    pub flush_interval: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            maintenance: Duration::from_secs(1),
            pex_interval: Duration::from_secs(120),
            pex_answer_interval: Duration::from_secs(60),
            random_walk_interval: Duration::from_secs(300),
            kad_bootstrap_interval: Duration::from_secs(1800),
            feeler_interval: Duration::from_secs(120),
            // libp2p's default is 10 s; DHT queries often come in bursts a little apart.
            idle_timeout: Duration::from_secs(60),
            flush_interval: Duration::from_secs(60),
        }
    }
}

/// Everything a node needs to start.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub network: NetworkName,
    pub keypair: Keypair,
    /// Where `node.redb` and `api` live; `None` keeps everything in memory.
    pub data_dir: Option<PathBuf>,
    pub listen: Vec<Multiaddr>,
    /// Dial TCP from this local IP instead of letting the kernel choose (see `transport`);
    /// tracker announces go from it too (a tracker hands out the IP an announce came from).
    pub dial_from: Option<std::net::IpAddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub api: Option<SocketAddr>,
    /// The API's connection caps and timeouts (see `meshwork_http::serve`).
    pub api_limits: meshwork_http::serve::Limits,
    /// `[api] hosts`: further names the API answers to (see `meshwork_http::auth`).
    pub api_hosts: Vec<String>,
    /// `[api] token_hashes`, parsed: BLAKE3 hashes of the API tokens also accepted.
    pub api_token_hashes: Vec<[u8; 32]>,
    pub allow_private_addrs: bool,
    pub kad_server: bool,
    pub target_outbound: usize,
    pub max_inbound: usize,
    pub max_inbound_per_ip: usize,
    pub max_transient: usize,
    pub anchors: bool,
    pub timings: Timings,
    pub addrbook: AddrBookConfig,
    /// The chain's rules and genesis.
    pub chain: meshwork_ledger::ChainSpec,
    /// Mine blocks, when set.
    pub mining: Option<crate::ledger_service::MinerConfig>,
    /// Senders whose transfers the mempool refuses (`[chain] refuse_senders`).
    pub refuse_senders: std::collections::HashSet<meshwork_ledger::Address>,
    /// The content service's options.
    pub content: ContentConfig,
    /// When pending transfers (our own, and those a reorganization returned) are announced
    /// again.
    pub rebroadcast: crate::ledger_service::RebroadcastConfig,
    /// How the chain store is reopened after a storage error.
    pub store_retry: crate::ledger_service::StoreRetry,
    /// How long gossipsub remembers a message id it has seen (and so drops copies and refuses
    /// to publish it again): libp2p's `duplicate_cache_time`. Shorter than
    /// `rebroadcast.initial`, so that a re-announcement is published. Messages circulate for a
    /// few heartbeats (gossip history: 3 s), far less than this.
    pub gossip_seen_ttl: Duration,
    /// Tests only: the chain store sits on a disk that this switch can make full (see
    /// `meshwork_ledger::faults`). Never set outside tests.
    pub disk_fault: Option<meshwork_ledger::faults::DiskFull>,
}

/// Default [`NodeConfig::gossip_seen_ttl`].
pub const GOSSIP_SEEN_TTL: Duration = Duration::from_secs(20);

/// Options of the content service.
#[derive(Clone, Debug)]
pub struct ContentConfig {
    /// Piece data sent per second, across all contents, at most (`None`: no cap).
    pub upload_limit: Option<u64>,
    /// Lab fault injection: flip a byte in every block this node serves (a peer that serves
    /// corrupt pieces). Never set outside tests and the lab.
    pub corrupt_uploads: bool,
    /// A fetch that has no manifest this long after it was asked for (across restarts) fails
    /// and frees its slot.
    pub manifest_timeout: std::time::Duration,
    /// How often a complete content's file is checked (`stat`) for changes behind the
    /// node's back; a change has it re-hashed.
    pub change_check: std::time::Duration,
    /// After a failed announce (tracker unreachable, an error status, an answer over the cap)
    /// the tracker is asked again this much later (`[content] tracker_retry_s`).
    pub tracker_retry: std::time::Duration,
}

impl Default for ContentConfig {
    fn default() -> Self {
        ContentConfig {
            upload_limit: None,
            corrupt_uploads: false,
            manifest_timeout: std::time::Duration::from_secs(600),
            change_check: std::time::Duration::from_secs(10),
            tracker_retry: std::time::Duration::from_secs(DEFAULT_TRACKER_RETRY_S),
        }
    }
}

impl NodeConfig {
    /// A configuration with defaults, for a given network and key.
    pub fn new(network: NetworkName, keypair: Keypair) -> Self {
        let f = FileConfig::default();
        Self {
            keypair,
            data_dir: None,
            listen: vec![],
            dial_from: None,
            bootstrap: vec![],
            api: None,
            api_limits: meshwork_http::serve::Limits::api(),
            api_hosts: vec![],
            api_token_hashes: vec![],
            allow_private_addrs: f.network.allow_private_addrs,
            kad_server: f.node.kad_server,
            target_outbound: f.connections.target_outbound,
            max_inbound: f.connections.max_inbound,
            max_inbound_per_ip: f.connections.max_inbound_per_ip,
            max_transient: f.connections.max_transient,
            anchors: f.connections.anchors,
            timings: Timings::default(),
            addrbook: AddrBookConfig::default(),
            chain: meshwork_ledger::ChainSpec::for_network(&network.to_string()),
            mining: None,
            refuse_senders: Default::default(),
            content: ContentConfig::default(),
            rebroadcast: Default::default(),
            store_retry: Default::default(),
            gossip_seen_ttl: GOSSIP_SEEN_TTL,
            disk_fault: None,
            network,
        }
    }

    /// Builds the configuration from a parsed file (flags are applied by the caller after).
    pub fn from_file(
        file: &FileConfig,
        keypair: Keypair,
        data_dir: PathBuf,
    ) -> Result<Self, ConfigError> {
        let path = data_dir.join(CONFIG_FILE);
        let invalid = |reason: String| ConfigError::Invalid {
            path: path.clone(),
            reason,
        };
        let network = NetworkName::new(&file.network.name).map_err(|e| invalid(e.to_string()))?;
        let parse_addrs = |list: &[String], what: &str| -> Result<Vec<Multiaddr>, ConfigError> {
            list.iter()
                .map(|s| {
                    s.parse::<Multiaddr>()
                        .map_err(|e| invalid(format!("{what} address {s:?}: {e}")))
                })
                .collect()
        };
        let listen = parse_addrs(&file.node.listen, "listen")?;
        let bootstrap = parse_addrs(&file.network.bootstrap, "bootstrap")?;
        let api = file
            .node
            .api
            .parse()
            .map_err(|e| invalid(format!("api address {:?}: {e}", file.node.api)))?;
        if file.connections.target_outbound > 64 {
            return Err(invalid("target_outbound above 64 is not supported".into()));
        }
        let secs = |s: u64, what: &str| {
            if s == 0 {
                Err(invalid(format!("{what} must be at least 1 second")))
            } else {
                Ok(Duration::from_secs(s))
            }
        };
        let a = &file.api_connections;
        if a.max_connections == 0 || a.max_per_ip == 0 {
            return Err(invalid(
                "[api_connections] max_connections and max_per_ip must be at least 1".into(),
            ));
        }
        let api_limits = meshwork_http::serve::Limits {
            max_connections: a.max_connections,
            max_per_ip: a.max_per_ip,
            header_read: secs(a.header_read_s, "[api_connections] header_read_s")?,
            keep_alive: secs(a.keep_alive_s, "[api_connections] keep_alive_s")?,
            stall: secs(a.stall_s, "[api_connections] stall_s")?,
            ..meshwork_http::serve::Limits::api()
        };
        let d = &file.discovery;
        let timings = Timings {
            pex_interval: secs(d.pex_interval_s, "pex_interval_s")?,
            pex_answer_interval: secs(d.pex_answer_interval_s, "pex_answer_interval_s")?,
            random_walk_interval: secs(d.random_walk_interval_s, "random_walk_interval_s")?,
            feeler_interval: secs(d.feeler_interval_s, "feeler_interval_s")?,
            idle_timeout: secs(file.connections.idle_timeout_s, "idle_timeout_s")?,
            ..Timings::default()
        };
        let chain = chain_spec(file, &data_dir)?;
        if file.chain.refuse_senders.len() > MAX_REFUSED {
            return Err(invalid(format!(
                "refuse_senders holds more than {MAX_REFUSED} addresses"
            )));
        }
        if file.api.token_hashes.len() > meshwork_http::auth::MAX_TOKENS {
            return Err(invalid(format!(
                "[api] token_hashes holds more than {} hashes",
                meshwork_http::auth::MAX_TOKENS
            )));
        }
        let api_token_hashes = file
            .api
            .token_hashes
            .iter()
            .map(|h| {
                meshwork_http::auth::parse_token_hash(h)
                    .map_err(|e| invalid(format!("[api] token_hashes: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let refuse_senders = file
            .chain
            .refuse_senders
            .iter()
            .map(|a| {
                a.parse()
                    .map_err(|e| invalid(format!("refuse_senders: {a:?}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            network,
            keypair,
            data_dir: Some(data_dir),
            listen,
            dial_from: None,
            bootstrap,
            api: Some(api),
            api_limits,
            api_hosts: file.api.hosts.clone(),
            api_token_hashes,
            allow_private_addrs: file.network.allow_private_addrs,
            kad_server: file.node.kad_server,
            target_outbound: file.connections.target_outbound,
            max_inbound: file.connections.max_inbound,
            max_inbound_per_ip: file.connections.max_inbound_per_ip.max(1),
            max_transient: file.connections.max_transient.max(1),
            anchors: file.connections.anchors,
            timings,
            addrbook: AddrBookConfig::default(),
            chain,
            mining: None,
            refuse_senders,
            content: ContentConfig {
                tracker_retry: Duration::from_secs(file.content.tracker_retry_s.max(1)),
                ..ContentConfig::default()
            },
            rebroadcast: Default::default(),
            store_retry: Default::default(),
            gossip_seen_ttl: GOSSIP_SEEN_TTL,
            disk_fault: None,
        })
    }
}

/// Most senders `[chain] refuse_senders` may name.
pub const MAX_REFUSED: usize = 10_000;

/// The chain spec a data directory's config names: its `[chain] spec_file` (relative to the
/// data directory), or the network's built-in spec.
pub fn chain_spec(
    file: &FileConfig,
    data_dir: &Path,
) -> Result<meshwork_ledger::ChainSpec, ConfigError> {
    if file.chain.spec_file.is_empty() {
        return Ok(meshwork_ledger::ChainSpec::for_network(&file.network.name));
    }
    let p = Path::new(&file.chain.spec_file);
    load_spec(&if p.is_relative() {
        data_dir.join(p)
    } else {
        p.to_path_buf()
    })
}

/// Reads a JSON chain spec.
pub fn load_spec(path: &Path) -> Result<meshwork_ledger::ChainSpec, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let spec: meshwork_ledger::ChainSpec =
        serde_json::from_str(&text).map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    spec.validate().map_err(|reason| ConfigError::Invalid {
        path: path.to_path_buf(),
        reason,
    })?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_writes_a_private_identity_and_a_parseable_config() {
        let dir = tempfile::tempdir().unwrap();
        let net = NetworkName::new("dev").unwrap();
        let key = init(dir.path(), &net).unwrap();
        let loaded = load_identity(dir.path()).unwrap();
        assert_eq!(key.public(), loaded.public());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(IDENTITY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let cfg = load_file_config(dir.path()).unwrap();
        assert_eq!(cfg.network.name, "dev");
        assert_eq!(
            FileConfig {
                network: NetworkSection {
                    name: "meshwork".into(),
                    ..cfg.network.clone()
                },
                ..cfg.clone()
            },
            FileConfig::default()
        );
        assert!(NodeConfig::from_file(&cfg, loaded, dir.path().into()).is_ok());
        assert!(matches!(
            init(dir.path(), &net),
            Err(ConfigError::IdentityExists { .. })
        ));
    }

    #[test]
    fn api_connection_bounds_come_from_the_file_and_zero_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = init(dir.path(), &NetworkName::new("dev").unwrap()).unwrap();
        let mut file = FileConfig::default();
        file.api_connections.max_per_ip = 7;
        file.api_connections.stall_s = 90;
        let cfg = NodeConfig::from_file(&file, key.clone(), dir.path().into()).unwrap();
        assert_eq!(cfg.api_limits.max_per_ip, 7);
        assert_eq!(cfg.api_limits.stall, Duration::from_secs(90));
        assert_eq!(
            cfg.api_limits.max_connections,
            meshwork_http::serve::Limits::api().max_connections
        );
        file.api_connections.header_read_s = 0;
        let err = NodeConfig::from_file(&file, key, dir.path().into()).unwrap_err();
        assert!(err.to_string().contains("header_read_s"), "{err}");
    }

    #[test]
    fn api_token_hashes_come_from_the_file_and_a_malformed_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = init(dir.path(), &NetworkName::new("dev").unwrap()).unwrap();
        let (token, hash) = meshwork_http::auth::new_token();
        let mut file = FileConfig::default();
        file.api.token_hashes = vec![hash];
        let cfg = NodeConfig::from_file(&file, key.clone(), dir.path().into()).unwrap();
        assert_eq!(cfg.api_token_hashes.len(), 1);
        assert_eq!(
            hex::encode(cfg.api_token_hashes[0]),
            meshwork_http::auth::token_hash(&token)
        );
        // A malformed hash is refused at load, naming the setting.
        file.api.token_hashes = vec!["abc".into()];
        let err = NodeConfig::from_file(&file, key, dir.path().into()).unwrap_err();
        assert!(err.to_string().contains("token_hashes"), "{err}");
    }

    #[test]
    fn corrupt_files_give_errors_that_name_them() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(IDENTITY_FILE), b"garbage").unwrap();
        let err = load_identity(dir.path()).unwrap_err();
        assert!(err.to_string().contains(IDENTITY_FILE), "{err}");
        std::fs::write(dir.path().join(CONFIG_FILE), "[network]\nnmae = \"x\"\n").unwrap();
        let err = load_file_config(dir.path()).unwrap_err();
        assert!(
            err.to_string().contains(CONFIG_FILE) && err.to_string().contains("nmae"),
            "{err}"
        );
        std::fs::write(
            dir.path().join(CONFIG_FILE),
            "[network]\nname = \"Bad Name\"\n",
        )
        .unwrap();
        assert!(load_file_config(dir.path()).is_err());
    }

    #[test]
    fn refused_senders_parse_and_a_bad_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let key = init(dir.path(), &NetworkName::new("dev").unwrap()).unwrap();
        let mut file = load_file_config(dir.path()).unwrap();
        assert!(file.chain.refuse_senders.is_empty(), "none by default");
        let a = meshwork_ledger::Wallet::from_secret(&[9; 32]).address();
        file.chain.refuse_senders = vec![a.to_string()];
        let cfg = NodeConfig::from_file(&file, key.clone(), dir.path().into()).unwrap();
        assert_eq!(cfg.refuse_senders, [a].into_iter().collect());
        file.chain.refuse_senders = vec!["not-an-address".into()];
        let err = NodeConfig::from_file(&file, key, dir.path().into()).unwrap_err();
        assert!(err.to_string().contains("not-an-address"), "{err}");
    }
}
