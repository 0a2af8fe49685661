//! Slow clients cannot take a service down (issue 14, case 3): with the process at
//! `RLIMIT_NOFILE` soft = hard = 1 024, 1 100 connections that each send one header byte per
//! second (from 127.0.0.2-127.0.0.250, plus a share from one address), re-opened whenever they
//! are closed, are held against `meshwork server`, `meshwork tracker` and a node's API for
//! ~15 s; throughout, a normal request from 127.0.0.1 every ~200 ms must be answered within a
//! second. On the node, a second node also fetches a file from the flooded node meanwhile.

#[path = "../../../support/skip.rs"]
mod skip;

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use common::Proc;
use tokio::io::AsyncWriteExt;

/// The flood tests take turns: three floods at once on two cores would measure the machine.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const FLOOD: usize = 1100;
/// Of [`FLOOD`], this many come from one address (the rest spread over 127.0.0.2-250).
const FROM_ONE: usize = 150;
const ONE_ADDR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 251);
const FLOOD_FOR: Duration = Duration::from_secs(15);
const PROBE_EVERY: Duration = Duration::from_millis(200);
const ANSWER_WITHIN: Duration = Duration::from_secs(1);

/// The built binary with the file limit at soft = hard = 1 024 files.
fn meshwork_limited(dir: &Path) -> Command {
    let mut c = common::meshwork(dir);
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // setrlimit(2), which is async-signal-safe.
    unsafe {
        c.pre_exec(|| {
            let r = libc::rlimit {
                rlim_cur: 1024,
                rlim_max: 1024,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c
}

/// Raises this test process's own file limit (it holds the 1 100 client sockets); `false`
/// if the hard limit is too low to run the flood.
fn raise_own_limit() -> bool {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return false;
        }
        r.rlim_cur = r.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
            return false;
        }
    }
    r.rlim_cur == libc::RLIM_INFINITY || r.rlim_cur >= FLOOD as u64 + 500
}

/// What the flood did.
#[derive(Default)]
struct FloodStats {
    connects: AtomicU64,
    held: AtomicU64,
    max_held: AtomicU64,
    closed_by_server: AtomicU64,
}

/// One slow client: connects from `from` and sends a request one byte per second, never
/// finishing it: its head (slowloris), or with `body_to` a complete head of a POST of
/// 15 000 bytes to that path and then its body (a slow upload); re-connects whenever the server
/// closes it, until `stop`.
async fn slow_client(
    from: IpAddr,
    to: SocketAddr,
    body_to: Option<&'static str>,
    stop: Arc<AtomicBool>,
    st: Arc<FloodStats>,
) {
    let head: Vec<u8> = match body_to {
        None => b"GET /api/v1/health HTTP/1.1\r\nHost: flood\r\nX-Slow: ".to_vec(),
        Some(path) => format!(
            "POST {path} HTTP/1.1\r\nHost: {to}\r\nContent-Type: application/json\r\n\
             Content-Length: 15000\r\n\r\n{{"
        )
        .into_bytes(),
    };
    while !stop.load(Ordering::Relaxed) {
        let Ok(sock) = tokio::net::TcpSocket::new_v4() else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if sock.bind(SocketAddr::new(from, 0)).is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let mut s = match tokio::time::timeout(Duration::from_secs(3), sock.connect(to)).await {
            Ok(Ok(s)) => s,
            _ => continue,
        };
        st.connects.fetch_add(1, Ordering::Relaxed);
        let held = st.held.fetch_add(1, Ordering::Relaxed) + 1;
        st.max_held.fetch_max(held, Ordering::Relaxed);
        // A slow upload sends its head at once; a slowloris byte by byte.
        let mut i = if body_to.is_some() {
            if s.write_all(&head).await.is_err() {
                st.held.fetch_sub(1, Ordering::Relaxed);
                continue;
            }
            head.len()
        } else {
            0
        };
        while !stop.load(Ordering::Relaxed) {
            let b = if i < head.len() { head[i] } else { b' ' };
            i += 1;
            if s.write_all(&[b]).await.is_err() {
                st.closed_by_server.fetch_add(1, Ordering::Relaxed);
                break;
            }
            // A closed connection shows on the next write (RST), or here as EOF.
            let mut buf = [0u8; 64];
            match tokio::time::timeout(Duration::from_secs(1), s.peek(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    st.closed_by_server.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                _ => {}
            }
        }
        st.held.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Floods `target` for [`FLOOD_FOR`] while probing `GET probe_path` from 127.0.0.1 every
/// [`PROBE_EVERY`] on a fresh connection; runs `during` (blocking) meanwhile. Returns the worst
/// probe latency after asserting every probe was answered with 200 within [`ANSWER_WITHIN`].
/// What the flood sends, and where.
struct Flood {
    /// With a path, every `bodies_every`-th client is a slow upload to it, the rest slow heads.
    body_to: Option<&'static str>,
    bodies_every: usize,
    /// Flood this address instead of the probed one (the node's p2p port).
    to: Option<SocketAddr>,
}

async fn flood_and_probe(
    what: &str,
    target: SocketAddr,
    probe_path: &str,
    flood: Flood,
    creds: Option<meshwork_http::auth::Credentials>,
    during: impl FnOnce() -> Result<()> + Send + 'static,
) -> Result<Duration> {
    let Flood {
        body_to,
        bodies_every,
        to: flood_to,
    } = flood;
    let stop = Arc::new(AtomicBool::new(false));
    let st = Arc::new(FloodStats::default());
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..FLOOD {
        let from = if i < FROM_ONE {
            ONE_ADDR
        } else {
            Ipv4Addr::new(127, 0, 0, 2 + (i % 249) as u8)
        };
        // With `body_to`, every `bodies_every`-th client is a slow upload.
        let body = body_to.filter(|_| i % bodies_every == 0);
        clients.spawn(slow_client(
            IpAddr::V4(from),
            flood_to.unwrap_or(target),
            body,
            stop.clone(),
            st.clone(),
        ));
    }
    // Let the flood build up before the clock starts.
    let built = Instant::now() + Duration::from_secs(10);
    while st.max_held.load(Ordering::Relaxed) < 900 && Instant::now() < built {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let during = tokio::task::spawn_blocking(during);
    let url = format!("http://{target}{probe_path}");
    let start = Instant::now();
    let mut worst = Duration::ZERO;
    let mut probes = 0;
    let mut failures = vec![];
    while start.elapsed() < FLOOD_FOR {
        let t0 = Instant::now();
        // A fresh client: no pooled connection, a new one accepted under the flood each time.
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .local_address(IpAddr::V4(Ipv4Addr::LOCALHOST))
            .timeout(Duration::from_secs(5))
            .build()?;
        let mut req = client.get(&url);
        if let Some(c) = &creds {
            req = c.apply(req);
        }
        let r = req.send().await;
        let took = t0.elapsed();
        probes += 1;
        worst = worst.max(took);
        match r {
            Ok(r) if r.status().is_success() && took <= ANSWER_WITHIN => {}
            Ok(r) => failures.push(format!(
                "at {:?}: {} in {took:?}",
                start.elapsed(),
                r.status()
            )),
            Err(e) => failures.push(format!("at {:?}: {e} after {took:?}", start.elapsed())),
        }
        tokio::time::sleep(PROBE_EVERY.saturating_sub(t0.elapsed())).await;
    }
    let held_now = st.held.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let during = during.await?;
    clients.shutdown().await;
    eprintln!(
        "{what}: {probes} probes, worst latency {worst:?}; flood: {} connects, {} held at \
         most, {held_now} held at the end, {} closed by the server",
        st.connects.load(Ordering::Relaxed),
        st.max_held.load(Ordering::Relaxed),
        st.closed_by_server.load(Ordering::Relaxed),
    );
    // Against HTTP the flood must have held its connections; against the p2p port (whose
    // gate closes handshakes beyond its caps at once) it must have kept connecting.
    ensure!(
        st.max_held.load(Ordering::Relaxed) >= 900
            || (flood_to.is_some() && st.connects.load(Ordering::Relaxed) >= 10 * FLOOD as u64),
        "the flood never held 900 connections: it did not test anything"
    );
    ensure!(
        failures.is_empty(),
        "{what}: {} of {probes} probes not answered within {ANSWER_WITHIN:?}: {failures:?}",
        failures.len()
    );
    during.context("the work done during the flood")?;
    Ok(worst)
}

/// This test's turn to flood (one at a time), with the process's file limit raised; `None`
/// (the test skips, saying so) when the hard limit is too low.
fn flood_turn() -> Option<MutexGuard<'static, ()>> {
    let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if !raise_own_limit() {
        skip::skip(&format!(
            "this process cannot hold {FLOOD} sockets (hard RLIMIT_NOFILE)"
        ));
        return None;
    }
    Some(turn)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Starts the service `args` names (at 1 024 files, data in `name` of a temporary
/// directory), reads its URL from the line starting with `url_line` once it printed `ready`,
/// and floods it while probing `probe`.
fn flood_service(
    name: &str,
    args: &[&str],
    ready: &str,
    url_line: &str,
    probe: &str,
    flood: Flood,
) -> Result<()> {
    let Some(_turn) = flood_turn() else {
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;
    let mut cmd = meshwork_limited(&tmp.path().join(name));
    cmd.args(args);
    let service = Proc::start(cmd, &tmp.path().join(format!("{name}.log")), ready)?;
    let addr = service.url_addr(url_line)?;
    runtime()?.block_on(flood_and_probe(name, addr, probe, flood, None, || Ok(())))?;
    Ok(())
}

#[test]
fn the_tracker_answers_through_a_slow_client_flood_at_1024_files() -> Result<()> {
    flood_service(
        "tracker",
        &["tracker", "start", "--listen", "127.0.0.1:0"],
        "tracker is ready",
        "stats",
        "/api/v1/stats",
        // All slow uploads: no idle connection to evict, only ones that wait on their peer.
        Flood {
            body_to: Some("/api/v1/announce"),
            bodies_every: 1,
            to: None,
        },
    )
}

#[test]
fn the_server_answers_through_a_slow_client_flood_at_1024_files() -> Result<()> {
    flood_service(
        "server",
        &["server", "start", "--listen", "127.0.0.1:0"],
        "server is ready",
        "api",
        "/api/v1/status",
        Flood {
            body_to: Some("/api/v1/tx"),
            bodies_every: 2,
            to: None,
        },
    )
}

#[test]
fn a_node_api_answers_and_serves_a_fetch_through_a_slow_client_flood_at_1024_files() -> Result<()> {
    let Some(_turn) = flood_turn() else {
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;
    let (a_dir, b_dir) = (tmp.path().join("a"), tmp.path().join("b"));
    for d in [&a_dir, &b_dir] {
        let mut init = meshwork_limited(d);
        init.args(["init", "--network", "test-slow-clients"]);
        common::run_ok(init)?;
    }
    let mut cmd = meshwork_limited(&a_dir);
    cmd.args(common::NODE_START).env("RUST_LOG", "info");
    let a = Proc::start(cmd, &a_dir.join("node.log"), "node is ready")?;
    let mut cmd = meshwork_limited(&b_dir);
    cmd.args(common::NODE_START).env("RUST_LOG", "info");
    let _b = Proc::start(cmd, &b_dir.join("node.log"), "node is ready")?;
    let api: SocketAddr = std::fs::read_to_string(a_dir.join("api"))?.trim().parse()?;

    let file = tmp.path().join("data.bin");
    let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
    std::fs::write(&file, &bytes)?;
    let shared = meshwork_limited(&a_dir)
        .args(["share", file.to_str().context("path")?])
        .output()?;
    ensure!(
        shared.status.success(),
        "share: {}",
        String::from_utf8_lossy(&shared.stderr)
    );
    let ticket = String::from_utf8(shared.stdout)?
        .lines()
        .find_map(|l| l.strip_prefix("ticket").map(|t| t.trim().to_owned()))
        .context("no ticket line")?;

    let out = tmp.path().join("copy.bin");
    let (b_dir2, out2) = (b_dir.clone(), out.clone());
    let fetch = move || -> Result<()> {
        let o = meshwork_limited(&b_dir2)
            .args(["fetch", &ticket, "-o"])
            .arg(&out2)
            .args(["--timeout", "60"])
            .output()?;
        ensure!(
            o.status.success(),
            "fetch during the flood: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(())
    };
    let rt = runtime()?;
    // The API needs the node's cookie (the flood's requests never get past the headers).
    let creds = meshwork_http::auth::Credentials::read(&a_dir.join("api.cookie"))?;
    rt.block_on(flood_and_probe(
        "node API",
        api,
        "/api/v1/health",
        Flood {
            body_to: None,
            bodies_every: 1,
            to: None,
        },
        Some(creds.clone()),
        fetch,
    ))?;
    ensure!(std::fs::read(&out)? == bytes, "the fetched file differs");
    // The node's metrics count what the listener did.
    let metrics = rt.block_on(async {
        creds
            .apply(reqwest::Client::new().get(format!("http://{api}/metrics")))
            .send()
            .await?
            .text()
            .await
    })?;
    let count = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0)
    };
    let (evicted, timed_out) = (
        count("meshwork_api_connections_evicted_total"),
        count("meshwork_api_connections_timed_out_total"),
    );
    eprintln!("node API metrics: {evicted} evicted, {timed_out} timed out");
    ensure!(evicted > 0, "the flood evicted connections: {metrics}");
    drop(a);
    Ok(())
}

/// Sockets that never finish a libp2p handshake, 1 100 of them on the node's p2p port, neither
/// exhaust the node's descriptors (its gate caps handshakes in progress) nor stop its API.
#[test]
fn a_node_api_answers_through_a_flood_of_unfinished_p2p_handshakes_at_1024_files() -> Result<()> {
    let Some(_turn) = flood_turn() else {
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("a");
    let mut init = meshwork_limited(&dir);
    init.args(["init", "--network", "test-p2p-flood"]);
    common::run_ok(init)?;
    let mut cmd = meshwork_limited(&dir);
    cmd.args(common::NODE_START).env("RUST_LOG", "info");
    let node = Proc::start(cmd, &dir.join("node.log"), "node is ready")?;
    let api: SocketAddr = std::fs::read_to_string(dir.join("api"))?.trim().parse()?;
    let listen = node.listen_addr()?;
    let port: u16 = listen
        .split('/')
        .nth(4)
        .context("a /ip4/IP/tcp/PORT listen address")?
        .parse()?;
    let p2p = SocketAddr::from(([127, 0, 0, 1], port));
    let creds = meshwork_http::auth::Credentials::read(&dir.join("api.cookie"))?;
    let pid = node.child.id();
    // Throughout the flood, the node's open descriptors stay well below its 1 024.
    let fds = move || -> Result<()> {
        let until = Instant::now() + FLOOD_FOR;
        let mut most = 0;
        while Instant::now() < until {
            let n = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
            most = most.max(n);
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("p2p flood: the node held at most {most} descriptors");
        ensure!(
            most < 512,
            "the node held {most} descriptors under the flood"
        );
        Ok(())
    };
    runtime()?.block_on(flood_and_probe(
        "node API (p2p flood)",
        api,
        "/api/v1/health",
        Flood {
            body_to: None,
            bodies_every: 1,
            to: Some(p2p),
        },
        Some(creds),
        fds,
    ))?;
    Ok(())
}
