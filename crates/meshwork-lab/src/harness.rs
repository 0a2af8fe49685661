//! Many full nodes in one process, over TCP on loopback.
//!
//! Node `i` listens on `127.(1 + i % 250).(i / 250).1`, so the first 250 nodes are each in
//! their own address group (IPv4 /16), as they would be on the Internet, and the address book
//! and connection manager behave as they would there. (Linux routes all of `127.0.0.0/8` to
//! the loopback interface; no setup is needed.) Each node also dials *from* its own IP
//! (`NodeConfig::dial_from`): otherwise the kernel would pick `127.0.0.1` as the source of every
//! connection and all inbound peers would seem to share one address group.
//!
//! Nodes can be stopped and restarted with the same identity and data directory.

use std::collections::HashSet;
use std::future::Future;
use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use meshwork_node::config::Timings;
use meshwork_node::{NodeConfig, RunningNode};
use meshwork_proto::NetworkName;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

/// Who each node is told about at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    /// Node `i` knows node `i - 1` only.
    Chain,
    /// Every node knows node 0 only.
    Star,
    /// Node `i` knows `degree` random earlier nodes.
    Random { degree: usize, seed: u64 },
}

impl std::str::FromStr for Topology {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "chain" => Ok(Topology::Chain),
            "star" => Ok(Topology::Star),
            "random" => Ok(Topology::Random { degree: 2, seed: 1 }),
            other => bail!("unknown topology {other:?}: expected chain, star or random"),
        }
    }
}

/// The loopback address of node `i` (see the module docs).
pub fn loopback_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 1 + (i % 250) as u8, (i / 250) as u8, 1)
}

/// Timers for a lab network: discovery runs in seconds rather than minutes.
pub fn fast_timings() -> Timings {
    Timings {
        maintenance: Duration::from_millis(200),
        pex_interval: Duration::from_secs(2),
        pex_answer_interval: Duration::from_secs(1),
        random_walk_interval: Duration::from_secs(30),
        kad_bootstrap_interval: Duration::from_secs(300),
        feeler_interval: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(5),
        flush_interval: Duration::from_secs(5),
    }
}

/// A configuration for lab node `i`: loopback address, private addresses allowed, fast timers.
pub fn lab_config(network: &NetworkName, i: usize, keypair: Keypair) -> NodeConfig {
    let mut cfg = NodeConfig::new(network.clone(), keypair);
    cfg.listen = vec![format!("/ip4/{}/tcp/0", loopback_ip(i))
        .parse()
        .expect("valid multiaddr")];
    cfg.dial_from = Some(loopback_ip(i).into());
    cfg.allow_private_addrs = true;
    cfg.timings = fast_timings();
    cfg
}

/// The transient-connection budget per node for `n` nodes in one process.
///
/// Both ends of every connection live in this process: `n` nodes holding `8` outbound,
/// `t` transient and a few feeler or pending connections each use about `2·n·(t + 13)`
/// descriptors. Sixty percent of the limit leaves room for listeners, pending dials and the
/// runtime. The result is capped at the node's own default (32) and floored at 4: 200 nodes
/// under a 20 000-descriptor limit get 17.
pub fn transient_budget(fd_limit: u64, n: usize) -> usize {
    let per_node = (fd_limit as f64 * 0.6 / (2.0 * n.max(1) as f64)) as usize;
    per_node.saturating_sub(13).clamp(4, 32)
}

/// The sum of the samples of a Prometheus text exposition (`NodeHandle::encode_metrics`) whose
/// line starts with `series` (a metric name, or a name and the opening `{`) and contains every
/// string of `labels` (e.g. `offence="pex_flood"`): one counter's value, or a family's total.
/// 0 when no sample matches.
pub fn metric_sum(text: &str, series: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(series) && labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Polls `check` every `every` until it returns true; fails after `timeout`. Returns the time
/// it took.
pub async fn wait_for<F, Fut>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut check: F,
) -> Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let start = Instant::now();
    loop {
        if check().await? {
            return Ok(start.elapsed());
        }
        if start.elapsed() >= timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(every).await;
    }
}

/// Adjusts node `i`'s configuration before it starts.
type Tweak = Box<dyn Fn(usize, &mut NodeConfig) + Send + Sync>;

struct Slot {
    keypair: Keypair,
    ip_index: usize,
    /// `Some` for nodes with a data directory (persisted address book).
    dir: Option<tempfile::TempDir>,
    node: Option<RunningNode>,
}

pub struct Harness {
    pub network: NetworkName,
    /// Each node's `max_transient` (see [`transient_budget`]).
    pub transient_budget: usize,
    slots: Vec<Slot>,
    tweak: Tweak,
}

/// How to build a harness.
pub struct HarnessBuilder {
    network: NetworkName,
    topology: Topology,
    persistent: bool,
    tweak: Tweak,
    first_index: usize,
}

impl HarnessBuilder {
    pub fn new(network: &str) -> Result<Self> {
        Ok(Self {
            network: NetworkName::new(network)?,
            topology: Topology::Chain,
            persistent: false,
            tweak: Box::new(|_, _| {}),
            first_index: 0,
        })
    }

    pub fn topology(mut self, t: Topology) -> Self {
        self.topology = t;
        self
    }

    /// Give every node a data directory, so that it can be restarted with its address book.
    pub fn persistent(mut self, yes: bool) -> Self {
        self.persistent = yes;
        self
    }

    /// Adjusts each node's configuration before it starts (index, config).
    pub fn tweak(mut self, f: impl Fn(usize, &mut NodeConfig) + Send + Sync + 'static) -> Self {
        self.tweak = Box::new(f);
        self
    }

    /// Starts the nodes at loopback indices `first_index..` (to keep several harnesses apart).
    pub fn first_index(mut self, i: usize) -> Self {
        self.first_index = i;
        self
    }

    /// Starts `n` nodes one after another, each bootstrapped per the topology.
    pub async fn spawn(self, n: usize) -> Result<Harness> {
        let fd_limit = crate::resources::raise_fd_limit();
        let transient = transient_budget(fd_limit, n);
        let mut h = Harness {
            network: self.network,
            transient_budget: transient,
            slots: Vec::with_capacity(n),
            tweak: self.tweak,
        };
        let mut rng = match self.topology {
            Topology::Random { seed, .. } => StdRng::seed_from_u64(seed),
            _ => StdRng::seed_from_u64(0),
        };
        for i in 0..n {
            let bootstrap: Vec<Multiaddr> = match (i, self.topology) {
                (0, _) => vec![],
                (_, Topology::Chain) => vec![h.dial_addr(i - 1)?],
                (_, Topology::Star) => vec![h.dial_addr(0)?],
                (_, Topology::Random { degree, .. }) => {
                    let picks = rand::seq::index::sample(&mut rng, i, degree.min(i));
                    picks
                        .into_iter()
                        .map(|j| h.dial_addr(j))
                        .collect::<Result<_>>()?
                }
            };
            let dir = if self.persistent {
                Some(tempfile::tempdir()?)
            } else {
                None
            };
            h.slots.push(Slot {
                keypair: Keypair::generate_ed25519(),
                ip_index: self.first_index + i,
                dir,
                node: None,
            });
            h.start_at(i, bootstrap, |_| {}).await?;
            // Stagger starts a little, as real nodes would not all start in the same millisecond.
            if rng.gen_bool(0.5) {
                tokio::task::yield_now().await;
            }
        }
        Ok(h)
    }
}

impl Harness {
    async fn start_at(
        &mut self,
        slot: usize,
        bootstrap: Vec<Multiaddr>,
        extra: impl FnOnce(&mut NodeConfig),
    ) -> Result<()> {
        let s = &self.slots[slot];
        let mut cfg = lab_config(&self.network, s.ip_index, s.keypair.clone());
        cfg.max_transient = self.transient_budget;
        cfg.data_dir = s.dir.as_ref().map(|d| d.path().to_owned());
        cfg.bootstrap = bootstrap;
        (self.tweak)(slot, &mut cfg);
        extra(&mut cfg);
        let node = meshwork_node::start(cfg)
            .await
            .with_context(|| format!("starting node {slot}"))?;
        self.slots[slot].node = Some(node);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Node `i`, if running.
    pub fn node(&self, i: usize) -> Option<&RunningNode> {
        self.slots.get(i).and_then(|s| s.node.as_ref())
    }

    /// Node `i`, which must be running.
    pub fn running(&self, i: usize) -> Result<&RunningNode> {
        self.node(i)
            .ok_or_else(|| anyhow!("node {i} is not running"))
    }

    pub fn dial_addr(&self, i: usize) -> Result<Multiaddr> {
        Ok(self.running(i)?.dial_addr())
    }

    pub fn running_nodes(&self) -> impl Iterator<Item = (usize, &RunningNode)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.node.as_ref().map(|n| (i, n)))
    }

    /// Stops node `i` cleanly (its address book is flushed).
    pub async fn stop(&mut self, i: usize) -> Result<()> {
        let node = self
            .slots
            .get_mut(i)
            .and_then(|s| s.node.take())
            .ok_or_else(|| anyhow!("node {i} is not running"))?;
        node.shutdown().await;
        Ok(())
    }

    /// Starts node `i` again with the same identity, IP and data directory, with the given
    /// bootstrap list and a last adjustment of its configuration.
    pub async fn restart(
        &mut self,
        i: usize,
        bootstrap: Vec<Multiaddr>,
        extra: impl FnOnce(&mut NodeConfig),
    ) -> Result<()> {
        if self.node(i).is_some() {
            bail!("node {i} is running");
        }
        // The explicit list wins over whatever the harness's tweak sets.
        self.start_at(i, vec![], move |cfg| {
            cfg.bootstrap = bootstrap;
            extra(cfg);
        })
        .await
    }

    /// The data directory of node `i`, if the harness is persistent.
    pub fn data_dir(&self, i: usize) -> Option<std::path::PathBuf> {
        self.slots.get(i)?.dir.as_ref().map(|d| d.path().to_owned())
    }

    /// Splits the network: nodes in different `groups` refuse and close connections with each
    /// other (the gate's lab partition). Nodes in no group keep all their connections.
    pub async fn partition(&self, groups: &[Vec<usize>]) -> Result<()> {
        for (gi, group) in groups.iter().enumerate() {
            let others: HashSet<PeerId> = groups
                .iter()
                .enumerate()
                .filter(|(gj, _)| *gj != gi)
                .flat_map(|(_, g)| g.iter())
                .filter_map(|j| self.node(*j).map(|n| n.peer_id()))
                .collect();
            for i in group {
                self.running(*i)?.handle.partition(others.clone()).await?;
            }
        }
        Ok(())
    }

    /// Ends a partition: every node accepts every peer again, and reconnects on its own.
    pub async fn heal(&self) -> Result<()> {
        for (_, n) in self.running_nodes() {
            n.handle.partition(HashSet::new()).await?;
        }
        Ok(())
    }

    pub async fn shutdown(mut self) {
        let nodes: Vec<RunningNode> = self
            .slots
            .iter_mut()
            .filter_map(|s| s.node.take())
            .collect();
        futures::future::join_all(nodes.into_iter().map(|n| n.shutdown())).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_budget_fits_the_descriptor_limit() {
        assert_eq!(
            transient_budget(20_000, 50),
            32,
            "small networks get the node's default"
        );
        assert_eq!(transient_budget(20_000, 200), 17);
        assert_eq!(transient_budget(1024, 200), 4, "never below the floor");
        for n in [10, 100, 200, 300] {
            let t = transient_budget(20_000, n);
            assert!(
                t == 4 || 2 * n * (t + 13) <= 12_000 + 2 * n * 13,
                "n={n} t={t}"
            );
        }
    }

    #[test]
    fn loopback_addresses_put_the_first_250_nodes_in_distinct_groups() {
        let groups: std::collections::HashSet<_> = (0..250)
            .map(|i| meshwork_proto::AddrGroup::of_ip(loopback_ip(i).into()))
            .collect();
        assert_eq!(groups.len(), 250);
    }
}
