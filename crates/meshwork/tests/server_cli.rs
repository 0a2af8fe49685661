//! The binary's server and tracker commands, the `--server URL` client commands, `share
//! --tracker --super-seed` against a node, and where a node's settings come from (flag, then
//! environment, then config file).

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::Value;

mod common;

use common::{http_get, meshwork, ok, spawn, stderr, stdout, Proc};

fn path(p: &Path) -> Result<&str> {
    p.to_str().context("a UTF-8 path")
}

/// `server start --refuse ADDR`, then every command that takes `--server URL`, from the binary:
/// `tx send`, `tx status`, `balance`, `log`, `share`, `fetch` and `content rm`. A transfer from
/// the refused sender is refused with the reason and never logged; the swarm-only options of
/// `share` are refused with a sentence.
#[test]
fn server_start_serves_every_server_command_and_refuses_a_sender() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let sdir = tmp.path().join("server");
    let cdir = tmp.path().join("client");
    std::fs::create_dir_all(&cdir)?;
    let keys = |name: &str| tmp.path().join(name);
    let faucet = keys("faucet.key");
    ok(&cdir, &["key", "dev-faucet", "--out", path(&faucet)?])?;
    let bob = ok(&cdir, &["key", "new", "--out", path(&keys("bob.key"))?])?;
    let mallory_key = keys("mallory.key");
    let mallory = ok(&cdir, &["key", "new", "--out", path(&mallory_key)?])?;

    let srv = spawn(
        &sdir,
        &[
            "server",
            "start",
            "--listen",
            "127.0.0.1:0",
            "--network",
            "test-servercli",
            "--refuse",
            &mallory,
        ],
        "server is ready",
    )?;
    let url = format!("http://{}", srv.url_addr("api")?);
    let with = |args: &[&str]| -> Vec<String> {
        ["--server", url.as_str()]
            .iter()
            .chain(args)
            .map(|s| s.to_string())
            .collect()
    };
    let client =
        |args: &[&str]| -> Result<Output> { Ok(meshwork(&cdir).args(with(args)).output()?) };
    let client_ok = |args: &[&str]| -> Result<String> {
        let o = client(args)?;
        ensure!(o.status.success(), "{args:?} failed: {}", stderr(&o));
        Ok(stdout(&o))
    };

    let f = path(&faucet)?;
    let id = client_ok(&[
        "tx", "send", "--key", f, "--to", &bob, "--amount", "500", "--fee", "1",
    ])?;
    ensure!(id.len() == 64, "transaction id {id:?}");
    let status: Value = serde_json::from_str(&client_ok(&["tx", "status", &id, "--json"])?)?;
    ensure!(status["state"] == "confirmed", "{status}");
    ensure!(client_ok(&["balance", &bob])? == "500");

    // The refused sender, funded first so that only the policy can refuse it.
    client_ok(&[
        "tx", "send", "--key", f, "--to", &mallory, "--amount", "100",
    ])?;
    ensure!(client_ok(&["balance", &mallory])? == "100");
    let m = path(&mallory_key)?;
    let refused = client(&["tx", "send", "--key", m, "--to", &bob, "--amount", "10"])?;
    ensure!(
        !refused.status.success() && stderr(&refused).contains("refuse"),
        "mallory's transfer: {}",
        stderr(&refused)
    );
    ensure!(client_ok(&["balance", &bob])? == "500");

    let log = client_ok(&["log", "--json"])?;
    let entries: Vec<Value> = log
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    ensure!(entries.len() == 2, "the log: {log}");
    ensure!(entries[0]["id"] == id.as_str(), "the log: {log}");

    // Content: upload with the server's cookie (its data dir), fetch, delete.
    let file = tmp.path().join("data.bin");
    let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&file, &bytes)?;
    let o = meshwork(&sdir)
        .args(with(&["share", "--json", path(&file)?]))
        .output()?;
    ensure!(o.status.success(), "share: {}", stderr(&o));
    let cid = serde_json::from_slice::<Value>(&o.stdout)?["id"]
        .as_str()
        .context("content id")?
        .to_string();
    let out = tmp.path().join("fetched.bin");
    client_ok(&["fetch", &cid, "-o", path(&out)?])?;
    ensure!(std::fs::read(&out)? == bytes, "the fetched file differs");
    let o = meshwork(&sdir)
        .args(with(&["content", "rm", &cid]))
        .output()?;
    ensure!(o.status.success(), "content rm: {}", stderr(&o));
    let gone = client(&["fetch", &cid, "-o", path(&tmp.path().join("again.bin"))?])?;
    ensure!(!gone.status.success(), "a deleted content was fetched");

    let swarm_only = meshwork(&sdir)
        .args(with(&["share", "--super-seed", path(&file)?]))
        .output()?;
    ensure!(
        !swarm_only.status.success() && stderr(&swarm_only).contains("swarm options"),
        "{}",
        stderr(&swarm_only)
    );
    ensure!(srv.terminate()?.success());
    Ok(())
}

/// `node start` on an ephemeral API port, once ready.
fn node(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Result<Proc> {
    let mut c = meshwork(dir);
    c.args(["node", "start", "--api", "127.0.0.1:0"])
        .args(extra)
        .env_remove("MESHWORK_LISTEN")
        .env("RUST_LOG", "info");
    for (k, v) in env {
        c.env(k, v);
    }
    Proc::start(c, &dir.join("node.log"), "node is ready")
}

/// `tracker start` from the binary, and `share --tracker URL --super-seed` through a node: the
/// content is super-seeded, names the tracker, and the tracker receives its announce.
#[test]
fn tracker_start_and_share_with_tracker_and_super_seed() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let tdir = tmp.path().join("tracker");
    let tracker = spawn(
        &tdir,
        &["tracker", "start", "--listen", "127.0.0.1:0"],
        "tracker is ready",
    )?;
    let taddr = tracker.url_addr("announce")?;
    let turl = format!("http://{taddr}");

    let dir = tmp.path().join("node");
    ok(&dir, &["init", "--network", "test-trackercli"])?;
    let n = node(&dir, &["--listen", "/ip4/127.0.0.1/tcp/0"], &[])?;
    let file = tmp.path().join("shared.bin");
    std::fs::write(&file, vec![3u8; 100_000])?;
    let shared: Value = serde_json::from_str(&ok(
        &dir,
        &[
            "share",
            path(&file)?,
            "--tracker",
            &turl,
            "--super-seed",
            "--json",
        ],
    )?)?;
    let id = shared["id"].as_str().context("content id")?.to_string();
    let list: Value = serde_json::from_str(&ok(&dir, &["content", "list", "--json"])?)?;
    let c = list
        .as_array()
        .and_then(|l| l.iter().find(|c| c["id"] == id.as_str()))
        .with_context(|| format!("{id} not listed: {list}"))?;
    ensure!(c["super_seed"] == true, "not super-seeded: {c}");
    ensure!(
        c["tracker"].as_str().is_some_and(|t| t.starts_with(&turl)),
        "tracker {c}"
    );

    // The tracker hears the announce (generous deadline, only so as not to hang).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stats = http_get(&taddr.to_string(), "/api/v1/stats", None)?;
        let body = stats.split("\r\n\r\n").nth(1).unwrap_or_default();
        let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
        if v["contents"] == 1 && v["seeders"] == 1 {
            break;
        }
        ensure!(Instant::now() < deadline, "the tracker's stats: {stats}");
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure!(n.terminate()?.success());
    ensure!(tracker.terminate()?.success());
    Ok(())
}

/// The IPs a node printed it listens on.
fn listen_ips(p: &Proc) -> Vec<String> {
    p.seen
        .iter()
        .filter_map(|l| l.strip_prefix("listening"))
        .filter_map(|a| a.trim().split('/').nth(2).map(str::to_owned))
        .collect()
}

/// A node's listen addresses come from `--listen` over `MESHWORK_LISTEN` over `[node] listen`
/// in config.toml: each source given a different loopback IP, the node listens on the one
/// that wins, and only there.
#[test]
fn flag_beats_environment_beats_config_file() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("node");
    ok(&dir, &["init", "--network", "test-precedence"])?;
    let cfg_path = dir.join("config.toml");
    let cfg = std::fs::read_to_string(&cfg_path)?;
    let mut replaced = 0;
    let cfg: String = cfg
        .lines()
        .map(|l| {
            if l.starts_with("listen = ") {
                replaced += 1;
                "listen = [\"/ip4/127.0.0.21/tcp/0\"]".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    ensure!(replaced == 1, "config.toml has {replaced} listen lines");
    std::fs::write(&cfg_path, cfg)?;

    let env = [("MESHWORK_LISTEN", "/ip4/127.0.0.22/tcp/0")];
    for (extra, env, want) in [
        (&[][..], &[][..], "127.0.0.21"),
        (&[][..], &env[..], "127.0.0.22"),
        (
            &["--listen", "/ip4/127.0.0.23/tcp/0"][..],
            &env[..],
            "127.0.0.23",
        ),
    ] {
        let n = node(&dir, extra, env)?;
        let ips = listen_ips(&n);
        ensure!(
            !ips.is_empty() && ips.iter().all(|ip| ip == want),
            "flags {extra:?}, environment {env:?}: listening on {ips:?}, want {want}"
        );
        // Stopped as soon as it listens, maybe before it says ready: a SIGTERM at any point
        // of the start is a clean stop (the handler is installed first).
        ensure!(n.terminate()?.success());
    }
    Ok(())
}
