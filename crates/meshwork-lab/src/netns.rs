//! The network-namespace runner: N hosts on one bridge, each a Linux network namespace with
//! its own address, an upload cap (`tc tbf` on its side of the veth) and optionally a download
//! cap (`tbf` on the bridge side), running real `meshwork` processes.
//!
//! Layout of a runner with prefix `P` (unique per runner: `mwl` + 4 hex digits of the pid +
//! a counter, so that every name fits Linux's 15-byte interface names):
//! - bridge `Pbr` in the root namespace, address 10.0.S.254/32 (the runner's control path),
//!   and one /32 route per host through it;
//! - host i: namespace `Phi`, veth `Pai` (bridge side) ↔ `Pbi` (host side), address
//!   10.G.S.y with G = 1 + i mod 250 and y = 2 + i / 250, on-link for all of 10/8.
//!
//! Each of the first 250 hosts is in an address group (IPv4 /16) of its own, as peers on the
//! Internet are: the node keeps its outbound connections in distinct groups (a defence
//! against eclipse), so on one shared /16 every node would make a single outbound connection
//! and a hundred-node network would hang together by a thread. `S` (100..=227), the third
//! octet, differs between the runners of one process, and usually between processes: the
//! root namespace routes each host's /32 through its runner's bridge, and hosts of different
//! runners sit on different bridges, so they never meet.
//!
//! Faults: [`NetnsRunner::cut`] takes a host's link down (the host is alone); a
//! [`NetnsRunner::partition`] splits the hosts into groups with blackhole routes inside each
//! host (`10.S.x.y/32` for every host of the other groups), so that each group still talks
//! within itself and the runner's control path (the bridge's address) reaches every host. (The
//! kernel here has no `tc` actions and no netfilter tools, so routes do the dropping.) A
//! blackhole drops silently: open connections stall as they would behind a dead link, and new
//! dials fail at once.
//!
//! Cleanup invariant: everything the runner creates is named with its prefix and recorded in
//! `/run/meshwork-lab/P.pid`. [`NetnsRunner::teardown`] (also run by `Drop`, so on errors,
//! panics and a dropped future after Ctrl-C) kills every process it started and every process
//! still inside its namespaces, deletes the veths, namespaces and bridge, then the record.
//! A runner that was itself SIGKILLed leaves a record whose pid is dead; the next runner (or
//! `meshwork lab clean`) removes what it names.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

const STATE_DIR: &str = "/run/meshwork-lab";
/// Every resource name starts with this.
pub const NAME_PREFIX: &str = "mwl";
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Upload and download caps of one host, in bits per second.
#[derive(Clone, Copy, Debug, Default)]
pub struct Caps {
    pub up_bps: Option<u64>,
    pub down_bps: Option<u64>,
}

struct Host {
    ns: String,
    veth_bridge: String,
    veth_host: String,
    ip: Ipv4Addr,
}

struct Proc {
    host: usize,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

pub type ProcId = usize;

pub struct NetnsRunner {
    prefix: String,
    bin: PathBuf,
    dir: PathBuf,
    hosts: Vec<Host>,
    procs: Vec<Proc>,
    bridge: String,
    /// The third octet of every address of this runner.
    subnet: u8,
    torn_down: bool,
    /// (host, blocked host) pairs of the current partition.
    blackholes: Vec<(usize, usize)>,
    /// How long building the hosts took.
    pub setup_time: Duration,
}

/// Why the runner cannot run here, or `None` when it can.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some(
            "the netns runner needs root (network namespaces, veth, tc); run as root or use \
             --runner inproc"
                .into(),
        );
    }
    for tool in ["ip", "tc"] {
        let ok = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            return Some(format!(
                "the netns runner needs `{tool}` (iproute2), which is not installed"
            ));
        }
    }
    None
}

fn run(cmd: &mut Command) -> Result<String> {
    run_with_input(cmd, None)
}

/// Runs `cmd` with `input` on its stdin (nothing when `None`); its stdout, or its stderr as
/// the error.
fn run_with_input(cmd: &mut Command, input: Option<&str>) -> Result<String> {
    use std::io::Write;
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if let Some(input) = input {
        child
            .stdin
            .take()
            .context("the child's stdin")?
            .write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

/// Makes room in the kernel's ARP table for `hosts` hosts that each talk to all the others.
///
/// The table is one for the whole machine, namespaces included, with a hard limit
/// (`gc_thresh3`, 1024 by default) on its entries. A hundred hosts that each hold thirty-odd
/// connections need thousands: past the limit, new neighbours are refused ("neighbor table
/// overflow") and dials fail as if the peers were down. The limits are only ever raised,
/// never restored: another runner may be using them, and a larger table costs nothing
/// until it is used.
fn neighbour_room(hosts: usize) -> Result<()> {
    const DIR: &str = "/proc/sys/net/ipv4/neigh/default";
    let need = (hosts * hosts + 1024) as u64;
    for (name, want) in [("gc_thresh2", need), ("gc_thresh3", 2 * need)] {
        let path = Path::new(DIR).join(name);
        let now: u64 = std::fs::read_to_string(&path)
            .with_context(|| path.display().to_string())?
            .trim()
            .parse()
            .with_context(|| path.display().to_string())?;
        if now < want {
            std::fs::write(&path, want.to_string())
                .with_context(|| format!("cannot raise {}", path.display()))?;
            tracing::info!(%name, from = now, to = want, "raised the ARP table's limit");
        }
    }
    Ok(())
}

/// Runs `ip [-n NS] -batch -` on `script` (one command per line): one process for many
/// commands.
fn ip_batch(ns: Option<&str>, script: &str) -> Result<()> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["-n", ns]);
    }
    run_with_input(cmd.args(["-batch", "-"]), Some(script)).map(drop)
}

/// Host `i` of the runner with third octet `subnet`: see the module's layout.
fn host_ip(subnet: u8, i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, (1 + i % 250) as u8, subnet, (2 + i / 250) as u8)
}

/// The bridge's address in the root namespace: group 0 is never a host's.
fn control_ip(subnet: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, subnet, 254)
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 || *libc::__errno_location() == libc::EPERM }
}

/// Names of the namespaces and links that start with `prefix`.
fn resources(prefix: &str) -> (Vec<String>, Vec<String>) {
    let ns = ip(&["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_owned)
        .collect();
    let links = ip(&["-o", "link", "show"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    (ns, links)
}

/// What a runner's prefix has left: namespaces, links (and their qdiscs), processes inside the
/// namespaces, and routes in the root namespace through its links.
pub fn leftovers(prefix: &str) -> Vec<String> {
    let (ns, links) = resources(prefix);
    let mut out: Vec<String> = vec![];
    for n in &ns {
        for pid in ip(&["netns", "pids", n])
            .unwrap_or_default()
            .split_whitespace()
        {
            out.push(format!("process {pid} in {n}"));
        }
        out.push(format!("namespace {n}"));
    }
    out.extend(links.into_iter().map(|l| format!("link {l}")));
    // The root namespace's routes to the hosts go with the bridge; any left means the
    // bridge is, too, but they are the one thing the runner adds outside its own names.
    out.extend(
        ip(&["-o", "route", "show"])
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                l.split_whitespace()
                    .skip_while(|w| *w != "dev")
                    .nth(1)
                    .is_some_and(|d| d.starts_with(prefix))
            })
            .map(|l| format!("route {}", l.trim())),
    );
    out
}

/// Kills the processes in, and deletes, every namespace and link named with `prefix`.
fn remove_prefix(prefix: &str) {
    let (ns, links) = resources(prefix);
    for n in &ns {
        for pid in ip(&["netns", "pids", n])
            .unwrap_or_default()
            .split_whitespace()
        {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: plain kill(2) of a process inside our own namespace.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    // Deleting a veth removes both ends at once; deleting a namespace alone frees its links
    // only later, asynchronously, so the links go first.
    for l in &links {
        let _ = ip(&["link", "del", l]);
    }
    for n in &ns {
        let _ = ip(&["netns", "del", n]);
    }
}

/// Removes what runners that died without cleaning up (SIGKILL) left behind.
pub fn clean_stale() -> Vec<String> {
    let mut cleaned = vec![];
    let Ok(entries) = std::fs::read_dir(STATE_DIR) else {
        return cleaned;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(prefix) = name.strip_suffix(".pid") else {
            continue;
        };
        let pid: i32 = std::fs::read_to_string(e.path())
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if pid > 0 && pid_alive(pid) {
            continue;
        }
        remove_prefix(prefix);
        let _ = std::fs::remove_file(e.path());
        cleaned.push(prefix.to_string());
    }
    cleaned
}

impl NetnsRunner {
    /// Builds `caps.len()` hosts. `bin` is the `meshwork` binary; logs and data go in `dir`.
    pub fn new(bin: &Path, dir: &Path, caps: &[Caps]) -> Result<NetnsRunner> {
        if let Some(why) = unavailable() {
            bail!("{why}");
        }
        if caps.len() > 250 * 250 {
            bail!("at most {} hosts", 250 * 250);
        }
        clean_stale();
        neighbour_room(caps.len())?;
        let started = Instant::now();
        let k = COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!(
            "{NAME_PREFIX}{:04x}{:x}",
            std::process::id() & 0xffff,
            k & 0xf
        );
        let subnet = 100 + ((std::process::id() * 16 + k) % 128) as u8;
        // A stale runner with the same pid bits could have left these.
        remove_prefix(&prefix);
        std::fs::create_dir_all(STATE_DIR).context(STATE_DIR)?;
        std::fs::write(
            Path::new(STATE_DIR).join(format!("{prefix}.pid")),
            std::process::id().to_string(),
        )
        .context("cannot record the runner")?;
        std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
        let mut r = NetnsRunner {
            bridge: format!("{prefix}br"),
            prefix,
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            hosts: vec![],
            procs: vec![],
            subnet,
            torn_down: false,
            blackholes: vec![],
            setup_time: Duration::ZERO,
        };
        // On any error below, dropping `r` removes what was built.
        r.build(caps)?;
        r.setup_time = started.elapsed();
        Ok(r)
    }

    fn build(&mut self, caps: &[Caps]) -> Result<()> {
        let br = self.bridge.clone();
        ip(&["link", "add", &br, "type", "bridge"])?;
        let control = control_ip(self.subnet);
        ip(&["addr", "add", &format!("{control}/32"), "dev", &br])?;
        ip(&["link", "set", &br, "up"])?;
        // The root namespace's routes to the hosts, one /32 each, all in one batch; they go
        // with the bridge.
        let routes: String = (0..caps.len())
            .map(|i| {
                format!(
                    "route add {}/32 dev {br} src {control}\n",
                    host_ip(self.subnet, i)
                )
            })
            .collect();
        ip_batch(None, &routes)?;
        for (i, c) in caps.iter().enumerate() {
            let h = Host {
                ns: format!("{}h{i}", self.prefix),
                veth_bridge: format!("{}a{i}", self.prefix),
                veth_host: format!("{}b{i}", self.prefix),
                ip: host_ip(self.subnet, i),
            };
            ip(&["netns", "add", &h.ns])?;
            self.hosts.push(h);
            let h = &self.hosts[i];
            ip(&[
                "link",
                "add",
                &h.veth_bridge,
                "type",
                "veth",
                "peer",
                "name",
                &h.veth_host,
            ])?;
            ip(&["link", "set", &h.veth_host, "netns", &h.ns])?;
            ip(&["link", "set", &h.veth_bridge, "master", &br])?;
            ip(&["link", "set", &h.veth_bridge, "up"])?;
            ip(&[
                "-n",
                &h.ns,
                "addr",
                "add",
                &format!("{}/8", h.ip),
                "dev",
                &h.veth_host,
            ])?;
            ip(&["-n", &h.ns, "link", "set", &h.veth_host, "up"])?;
            ip(&["-n", &h.ns, "link", "set", "lo", "up"])?;
            if let Some(up) = c.up_bps {
                tbf(Some(&h.ns), &h.veth_host, up)?;
            }
            if let Some(down) = c.down_bps {
                tbf(None, &h.veth_bridge, down)?;
            }
        }
        Ok(())
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn hosts(&self) -> usize {
        self.hosts.len()
    }

    pub fn ip(&self, host: usize) -> Ipv4Addr {
        self.hosts[host].ip
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts `meshwork ARGS` inside host `host`; its output goes to `<dir>/logs/`.
    pub fn spawn(&mut self, host: usize, name: &str, args: &[String]) -> Result<ProcId> {
        let logs = self.dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        let id = self.procs.len();
        self.procs.push(Proc {
            host,
            args: args.to_vec(),
            log: logs.join(format!("{id:03}-{name}.log")),
            child: None,
        });
        self.start(id)?;
        Ok(id)
    }

    fn start(&mut self, id: ProcId) -> Result<()> {
        let p = &mut self.procs[id];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p.log)
            .with_context(|| p.log.display().to_string())?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.hosts[p.host].ns])
            .arg(&self.bin)
            .args(&p.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // `MESHWORK_LAB_LOG` replaces this filter, to see inside the processes of a run.
            .env(
                "RUST_LOG",
                std::env::var("MESHWORK_LAB_LOG")
                    .unwrap_or_else(|_| "warn,meshwork_node=info".into()),
            )
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        p.child = Some(child);
        Ok(())
    }

    /// The output of a process so far.
    pub fn log(&self, id: ProcId) -> String {
        std::fs::read_to_string(&self.procs[id].log).unwrap_or_default()
    }

    /// Waits for a process to exit (polling: the runner is not on a hot path).
    pub async fn wait(&mut self, id: ProcId, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.procs[id]
                .child
                .as_mut()
                .ok_or_else(|| anyhow!("process {id} is not running"))?;
            if let Some(st) = child.try_wait()? {
                self.procs[id].child = None;
                return Ok(st);
            }
            if Instant::now() >= deadline {
                bail!(
                    "process {id} ({}) did not exit within {timeout:?}",
                    self.procs[id].args.join(" ")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether a process has exited; reaps it.
    pub fn exited(&mut self, id: ProcId) -> Result<Option<ExitStatus>> {
        let Some(child) = self.procs[id].child.as_mut() else {
            return Ok(None);
        };
        let st = child.try_wait()?;
        if st.is_some() {
            self.procs[id].child = None;
        }
        Ok(st)
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, id: ProcId, grace: Duration) {
        let Some(mut child) = self.procs[id].child.take() else {
            return;
        };
        // SAFETY: kill(2) of our own child, which is not yet reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// A crash: SIGKILL at once.
    pub fn kill(&mut self, id: ProcId) {
        if let Some(mut child) = self.procs[id].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a stopped process again with the same arguments (and data directory).
    pub fn restart(&mut self, id: ProcId) -> Result<()> {
        if self.procs[id].child.is_some() {
            bail!("process {id} is still running");
        }
        self.start(id)
    }

    /// Cuts host `host` off the bridge (a partition).
    pub fn cut(&self, host: usize) -> Result<()> {
        ip(&["link", "set", &self.hosts[host].veth_bridge, "down"]).map(drop)
    }

    pub fn restore(&self, host: usize) -> Result<()> {
        ip(&["link", "set", &self.hosts[host].veth_bridge, "up"]).map(drop)
    }

    /// Splits the hosts into `groups` that cannot reach each other (see the module docs); hosts
    /// in no group reach everyone. Replaces the current partition.
    pub fn partition(&mut self, groups: &[Vec<usize>]) -> Result<()> {
        self.heal()?;
        for (gi, group) in groups.iter().enumerate() {
            for &h in group {
                let blocked: Vec<usize> = groups
                    .iter()
                    .enumerate()
                    .filter(|(gj, _)| *gj != gi)
                    .flat_map(|(_, g)| g.iter().copied())
                    .collect();
                self.routes(h, "add", &blocked)?;
                self.blackholes.extend(blocked.into_iter().map(|b| (h, b)));
            }
        }
        Ok(())
    }

    /// Ends a partition: every blackhole route goes.
    pub fn heal(&mut self) -> Result<()> {
        let pairs = std::mem::take(&mut self.blackholes);
        for h in 0..self.hosts.len() {
            let blocked: Vec<usize> = pairs
                .iter()
                .filter(|(a, _)| *a == h)
                .map(|(_, b)| *b)
                .collect();
            self.routes(h, "del", &blocked)?;
        }
        Ok(())
    }

    /// Adds or deletes blackhole routes in host `h` to `to`, in one `ip -batch`.
    fn routes(&self, h: usize, verb: &str, to: &[usize]) -> Result<()> {
        if to.is_empty() {
            return Ok(());
        }
        let script: String = to
            .iter()
            .map(|&o| format!("route {verb} blackhole {}/32\n", self.hosts[o].ip))
            .collect();
        ip_batch(Some(&self.hosts[h].ns), &script)
    }

    /// Bytes host `host` has sent on its link (headers included).
    pub fn tx_bytes(&self, host: usize) -> Result<u64> {
        let h = &self.hosts[host];
        let out = ip(&["-n", &h.ns, "-s", "-j", "link", "show", "dev", &h.veth_host])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        v[0]["stats64"]["tx"]["bytes"]
            .as_u64()
            .ok_or_else(|| anyhow!("no tx statistics for {}", h.veth_host))
    }

    /// Kills every process, removes every link and namespace. Idempotent.
    pub fn teardown(&mut self) -> Duration {
        let started = Instant::now();
        if self.torn_down {
            return Duration::ZERO;
        }
        self.torn_down = true;
        for p in &mut self.procs {
            if let Some(c) = p.child.as_mut() {
                // SAFETY: kill(2) of our own unreaped child.
                unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            }
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        for p in &mut self.procs {
            if let Some(mut c) = p.child.take() {
                loop {
                    if !matches!(c.try_wait(), Ok(None)) {
                        break;
                    }
                    if Instant::now() >= deadline {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        remove_prefix(&self.prefix);
        let _ = std::fs::remove_file(Path::new(STATE_DIR).join(format!("{}.pid", self.prefix)));
        started.elapsed()
    }
}

impl Drop for NetnsRunner {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// A token bucket on `dev`'s egress. Burst: 10 ms of the rate, at least 32 KiB, so that
/// TCP sees a smooth link rather than bursts and drops.
fn tbf(ns: Option<&str>, dev: &str, bps: u64) -> Result<()> {
    let burst = (bps / 8 / 100).max(32 << 10);
    let mut cmd = Command::new("tc");
    if let Some(ns) = ns {
        cmd.args(["-n", ns]);
    }
    cmd.args([
        "qdisc",
        "replace",
        "dev",
        dev,
        "root",
        "tbf",
        "rate",
        &format!("{bps}bit"),
        "burst",
        &burst.to_string(),
        "latency",
        "100ms",
    ]);
    run(&mut cmd).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn hosts_have_distinct_addresses_and_the_first_250_distinct_groups() {
        let s = 149;
        let all: Vec<Ipv4Addr> = (0..250 * 250).map(|i| host_ip(s, i)).collect();
        let unique: HashSet<_> = all.iter().collect();
        assert_eq!(unique.len(), all.len(), "every host has its own address");
        // The node's address group of an IPv4 address is its /16.
        let groups: HashSet<[u8; 2]> = all[..250]
            .iter()
            .map(|a| [a.octets()[0], a.octets()[1]])
            .collect();
        assert_eq!(
            groups.len(),
            250,
            "each of the first 250 hosts in a group of its own"
        );
        for a in &all {
            let o = a.octets();
            assert_eq!(o[0], 10, "{a}: inside 10/8, on-link for every host");
            assert_eq!(
                o[2], s,
                "{a}: the runner's octet, which its root routes name"
            );
            assert!(o[1] != 0 && (2..=251).contains(&o[3]), "{a}");
            assert_ne!(*a, control_ip(s), "no host takes the bridge's address");
        }
    }
}
