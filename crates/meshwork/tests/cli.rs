//! The command-line program end to end, from the built binary.

#[path = "../../../support/skip.rs"]
mod skip;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::Value;

mod common;

use common::{http_get, meshwork, ok, run, spawn, stderr, stdout, Proc, NODE_START as START};

#[test]
fn init_refuses_twice_keeps_the_key_private_and_names_corrupt_files() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("home");
    let first = run(&dir, &["init", "--network", "testnet"])?;
    ensure!(first.status.success(), "init failed: {}", stderr(&first));
    let stdout = String::from_utf8(first.stdout)?;
    ensure!(
        stdout.contains("peer id") && stdout.contains("testnet"),
        "{stdout}"
    );

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("identity.key"))?
            .permissions()
            .mode();
        ensure!(mode & 0o777 == 0o600, "identity mode is {:o}", mode & 0o777);
    }
    let key_before = std::fs::read(dir.join("identity.key"))?;
    let second = run(&dir, &["init"])?;
    ensure!(!second.status.success(), "a second init must fail");
    ensure!(
        stderr(&second).contains("refusing to overwrite"),
        "{}",
        stderr(&second)
    );
    ensure!(
        std::fs::read(dir.join("identity.key"))? == key_before,
        "the identity must be untouched"
    );

    std::fs::write(dir.join("identity.key"), b"\x08\x01\x12 not a key")?;
    let start = run(&dir, &START)?;
    ensure!(!start.status.success());
    let err = stderr(&start);
    ensure!(
        err.contains("identity.key") && err.contains("corrupt"),
        "{err}"
    );

    let bad = tmp.path().join("bad-config");
    ensure!(run(&bad, &["init"])?.status.success());
    std::fs::write(bad.join("config.toml"), "[node]\nlisten = 5\n")?;
    let start = run(&bad, &["node", "start"])?;
    ensure!(!start.status.success());
    ensure!(stderr(&start).contains("config.toml"), "{}", stderr(&start));

    let wrong_flag = run(&bad, &["node", "start", "--listen", "not-a-multiaddr"])?;
    ensure!(
        !wrong_flag.status.success() && stderr(&wrong_flag).contains("--listen"),
        "{}",
        stderr(&wrong_flag)
    );

    let no_node = run(&dir, &["status"])?;
    ensure!(
        !no_node.status.success() && stderr(&no_node).contains("is the node running"),
        "{}",
        stderr(&no_node)
    );
    Ok(())
}

/// `node start` with `extra` arguments, once it is ready.
fn node(dir: &Path, extra: &[&str]) -> Result<Proc> {
    spawn(dir, &[&START[..], extra].concat(), "node is ready")
}

fn json(dir: &Path, args: &[&str]) -> Result<Value> {
    Ok(serde_json::from_str(&ok(dir, args)?)?)
}

#[test]
fn node_start_status_and_peers_from_the_binary() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (a_dir, b_dir) = (tmp.path().join("a"), tmp.path().join("b"));
    for d in [&a_dir, &b_dir] {
        ensure!(run(d, &["init", "--network", "clitest"])?.status.success());
    }
    // A keeps loopback addresses heard from peers, so that B's goes into its address book.
    let a = node(&a_dir, &["--allow-private-addrs"])?;
    let a_addr = a.listen_addr()?;
    ensure!(
        a_dir.join("api").exists(),
        "the node must write its API address"
    );

    let status = json(&a_dir, &["status", "--json"])?;
    ensure!(status["network"] == "clitest", "{status}");
    ensure!(
        a_addr.ends_with(status["peer_id"].as_str().context("peer_id")?),
        "{a_addr} vs {status}"
    );
    ensure!(
        status["listen_addrs"]
            .as_array()
            .is_some_and(|l| !l.is_empty()),
        "{status}"
    );
    for key in ["inbound", "outbound"] {
        ensure!(status["connections"][key].is_u64(), "{status}");
    }
    for key in ["new", "tried"] {
        ensure!(status["address_book"][key].is_u64(), "{status}");
    }
    ensure!(status["uptime_s"].is_u64(), "{status}");
    let human = run(&a_dir, &["status"])?;
    ensure!(
        String::from_utf8(human.stdout)?.contains("connections"),
        "human status"
    );

    let b = node(&b_dir, &["--bootstrap", &a_addr])?;
    // Generous: only to avoid hanging; on a loaded machine the connection can take a while.
    let deadline = Instant::now() + Duration::from_secs(60);
    let peers = loop {
        let peers = json(&a_dir, &["peers", "--json"])?;
        if peers.as_array().is_some_and(|p| !p.is_empty()) || Instant::now() > deadline {
            break peers;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let b_id = json(&b_dir, &["status", "--json"])?["peer_id"].clone();
    let list = peers.as_array().context("peers is a list")?;
    let logs = || {
        let read = |d: &Path| std::fs::read_to_string(d.join("proc.log")).unwrap_or_default();
        format!("A's log:\n{}\nB's log:\n{}", read(&a_dir), read(&b_dir))
    };
    ensure!(
        list.len() == 1 && list[0]["peer_id"] == b_id,
        "A's peers: {peers}\n{}",
        logs()
    );
    ensure!(
        list[0]["direction"] == "inbound"
            && list[0]["address"].is_string()
            && list[0]["address_group"].is_string(),
        "{peers}"
    );
    let b_peers = json(&b_dir, &["peers", "--json"])?;
    ensure!(b_peers[0]["direction"] == "outbound", "{b_peers}");

    // Metrics: libp2p's and ours.
    let api = std::fs::read_to_string(a_dir.join("api"))?;
    let cookie = std::fs::read_to_string(a_dir.join("api.cookie"))?;
    let unauthorized = http_get(api.trim(), "/metrics", None)?;
    ensure!(
        unauthorized.starts_with("HTTP/1.0 401") || unauthorized.starts_with("HTTP/1.1 401"),
        "{unauthorized:.300}"
    );
    let metrics = http_get(api.trim(), "/metrics", Some(&cookie))?;
    ensure!(
        metrics.contains("libp2p_") && metrics.contains("meshwork_connections"),
        "metrics: {metrics:.300}"
    );

    for (p, dir) in [(b, &b_dir), (a, &a_dir)] {
        let status = p.terminate()?;
        ensure!(status.success(), "node exited with {status}");
        ensure!(
            !dir.join("api").exists(),
            "the API address file must be removed on shutdown"
        );
    }
    // The address book written at shutdown: A learned B (inbound, with its listen address from
    // identify) less than a minute ago, before its first periodic flush was due, so only the
    // write at shutdown can have stored B. A restarted alone (B is stopped, so it cannot be
    // learned again) lists B in its book.
    let a = node(&a_dir, &[])?;
    let api = std::fs::read_to_string(a_dir.join("api"))?;
    let cookie = std::fs::read_to_string(a_dir.join("api.cookie"))?;
    let book = http_get(api.trim(), "/api/v1/addrbook", Some(&cookie))?;
    let b_id = b_id.as_str().context("B's peer id")?;
    ensure!(
        book.starts_with("HTTP/1.0 200") || book.starts_with("HTTP/1.1 200"),
        "{book:.300}"
    );
    ensure!(
        book.contains(b_id),
        "A's address book after a restart lacks B ({b_id}): {book}"
    );
    ensure!(a.terminate()?.success());
    Ok(())
}

/// Issue 14, case 1: the CLI finds the node's cookie in the data directory, `--api-cookie`
/// or `MESHWORK_API_COOKIE`; without it, a refusal says what to do. As root, a process of
/// another user (nobody) cannot read the cookie and is refused, and shares nothing.
#[test]
fn the_cli_sends_the_cookie_and_a_refusal_says_what_to_do() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("a");
    ensure!(run(&dir, &["init", "--network", "clitest"])?
        .status
        .success());
    let node = node(&dir, &[])?;
    let api = std::fs::read_to_string(dir.join("api"))?.trim().to_owned();
    let cookie = dir.join("api.cookie");
    ensure!(
        node.seen
            .iter()
            .any(|l| l.starts_with("api cookie") && l.contains("api.cookie")),
        "node start names the cookie: {:?}",
        node.seen
    );
    ensure!(json(&dir, &["status", "--json"])?["network"] == "clitest");

    // Elsewhere, with the address and the cookie given (flag, then environment).
    let other = tmp.path().join("elsewhere");
    let o = meshwork(&other)
        .args(["status", "--json", "--api", &api, "--api-cookie"])
        .arg(&cookie)
        .output()?;
    ensure!(o.status.success(), "{}", stderr(&o));
    let o = meshwork(&other)
        .args(["status", "--json", "--api", &api])
        .env("MESHWORK_API_COOKIE", &cookie)
        .output()?;
    ensure!(o.status.success(), "{}", stderr(&o));

    // The data directory's cookie goes to its own node only, never to another address given
    // with --api (which may be anyone's): a listener there sees no Authorization header.
    let sink = std::net::TcpListener::bind("127.0.0.1:0")?;
    let sink_addr = sink.local_addr()?.to_string();
    let heard = std::thread::spawn(move || -> Result<String> {
        use std::io::Read;
        let (mut s, _) = sink.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut head = vec![0u8; 8192];
        let n = s.read(&mut head)?;
        Ok(String::from_utf8_lossy(&head[..n]).into_owned())
    });
    // The sink hangs up after the head: the command fails, which is not what is tested.
    let _ = meshwork(&dir)
        .args(["status", "--api", &sink_addr])
        .output()?;
    let head = heard.join().expect("the sink thread")?;
    ensure!(
        head.starts_with("GET ") && !head.to_ascii_lowercase().contains("authorization"),
        "the cookie went to another address: {head}"
    );

    // No cookie there: the error names the file and the flag.
    let o = meshwork(&other).args(["status", "--api", &api]).output()?;
    let e = stderr(&o);
    ensure!(
        !o.status.success()
            && e.contains("401")
            && e.contains("cannot read the API cookie")
            && e.contains("--api-cookie"),
        "{e}"
    );
    // A stale cookie (of an earlier start): refused, and told so.
    let stale = tmp.path().join("stale.cookie");
    std::fs::write(&stale, format!("__cookie__:{}", "ab".repeat(32)))?;
    let o = meshwork(&other)
        .args(["status", "--api", &api, "--api-cookie"])
        .arg(&stale)
        .output()?;
    let e = stderr(&o);
    ensure!(
        !o.status.success() && e.contains("401") && e.contains("cookie was refused"),
        "{e}"
    );

    // Another local user.
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip::skip("the other-user part needs root to run the CLI as nobody");
        return Ok(());
    }
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let open = tmp.path().join("open");
    std::fs::create_dir(&open)?;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))?;
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let file = open.join("readable.txt");
    std::fs::write(&file, b"shared by nobody?")?;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))?;
    let as_nobody = |args: &[&str]| -> Result<Output> {
        Ok(meshwork(&dir)
            .args(args)
            .env("HOME", "/nonexistent")
            .uid(65534)
            .gid(65534)
            .output()?)
    };
    for args in [
        vec!["status", "--api", api.as_str()],
        vec!["share", file.to_str().context("utf-8 path")?, "--api", &api],
    ] {
        let o = as_nobody(&args)?;
        let e = stderr(&o);
        ensure!(
            !o.status.success()
                && e.contains("401")
                && e.contains("permission denied; run as the node's user or pass --api-cookie"),
            "{args:?} as nobody: {e}"
        );
    }
    let list = json(&dir, &["content", "list", "--json"])?;
    ensure!(
        list.as_array().is_some_and(|l| l.is_empty()),
        "nothing was shared: {list}"
    );
    drop(node);
    Ok(())
}

/// Issue 14, case 8 through the binary: `server start --quota`, uploads with the server's
/// cookie (its data dir, or --api-cookie), 507 past the quota, `content rm --server` frees it,
/// and an upload without the cookie is refused with a sentence.
#[test]
fn server_uploads_need_its_cookie_and_stay_within_the_quota() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let sdir = tmp.path().join("server");
    std::fs::create_dir_all(&sdir)?;
    let guard = spawn(
        &sdir,
        &[
            "server",
            "start",
            "--listen",
            "127.0.0.1:0",
            "--network",
            "clitest",
            "--quota",
            "1KiB",
        ],
        "server is ready",
    )?;
    let url = guard
        .seen
        .iter()
        .find_map(|l| {
            l.strip_prefix("api")
                .and_then(|a| a.trim().strip_suffix("/api/v1/status"))
        })
        .context("server start printed no api line")?
        .to_string();
    let file = |name: &str, n: usize| -> Result<std::path::PathBuf> {
        let p = tmp.path().join(name);
        std::fs::write(&p, vec![7u8; n])?;
        Ok(p)
    };
    let share = |dir: &Path, f: &Path| -> Result<Output> {
        Ok(meshwork(dir)
            .args(["--server", &url, "share", "--json"])
            .arg(f)
            .output()?)
    };
    let a = file("a.bin", 600)?;
    let o = share(&sdir, &a)?;
    ensure!(o.status.success(), "{}", stderr(&o));
    let id = serde_json::from_slice::<Value>(&o.stdout)?["id"]
        .as_str()
        .context("id")?
        .to_string();
    // Past the quota (600 + 600 > 1024): refused, and said so.
    let b = file("b.bin", 600)?;
    let o = share(&sdir, &b)?;
    let e = stderr(&o);
    ensure!(!o.status.success() && e.contains("quota"), "{e}");
    // Without the server's cookie.
    let o = share(&tmp.path().join("nowhere"), &b)?;
    let e = stderr(&o);
    ensure!(
        !o.status.success() && e.contains("cannot read the API cookie"),
        "{e}"
    );
    // With it by flag from elsewhere: delete, then the second fits.
    let o = meshwork(&tmp.path().join("nowhere"))
        .args(["--server", &url, "content", "rm", &id, "--api-cookie"])
        .arg(sdir.join("api.cookie"))
        .output()?;
    ensure!(o.status.success(), "{}", stderr(&o));
    let o = share(&sdir, &b)?;
    ensure!(o.status.success(), "{}", stderr(&o));
    guard.terminate()?;
    ensure!(!sdir.join("api.cookie").exists(), "a clean stop removes it");
    Ok(())
}

/// Writes `blocks` blocks of `per_block` transfers each into the chain store of `dir`, offline,
/// as a node of network `network` would hold them.
fn build_chain(dir: &Path, network: &str, blocks: u64, per_block: u64) -> Result<(u64, String)> {
    use meshwork_ledger::{ChainSpec, Ledger, Wallet};
    let spec = ChainSpec::for_network(network);
    let mut ledger = Ledger::open(&dir.join("chain.redb"), spec.clone())?;
    let faucet = Wallet::from_secret(&meshwork_ledger::spec::DEV_FAUCET_SECRET);
    let chain_id = ledger.chain().chain_id();
    let miner = Wallet::generate().address();
    let mut now = spec.genesis_timestamp;
    let mut nonce = 0;
    for _ in 0..blocks {
        let txs = (0..per_block)
            .map(|k| {
                nonce += 1;
                faucet.transfer(chain_id, miner, 1 + k, 1, nonce - 1)
            })
            .collect();
        for r in ledger.submit_many(txs) {
            r?;
        }
        now += 1000;
        let b = ledger.template(miner, now)?;
        ledger.import(b, now)?;
    }
    Ok((ledger.tip().height, ledger.tip().hash.to_string()))
}

/// SIGKILL while a node imports blocks: its store reopens consistent (checked offline by
/// `chain verify`, which replays the main chain from genesis), and the node catches up.
#[test]
fn a_node_killed_during_block_import_reopens_consistent_and_catches_up() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (a_dir, b_dir) = (tmp.path().join("a"), tmp.path().join("b"));
    for d in [&a_dir, &b_dir] {
        ensure!(run(d, &["init", "--network", "test-crash"])?
            .status
            .success());
    }
    let (height, tip) = build_chain(&a_dir, "test-crash", 2000, 20)?;
    let a = node(&a_dir, &["--allow-private-addrs"])?;
    let a_addr = a.listen_addr()?;
    let mut b = node(&b_dir, &["--allow-private-addrs", "--bootstrap", &a_addr])?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let killed_at = loop {
        ensure!(Instant::now() < deadline, "B never started importing");
        let h = json(&b_dir, &["chain", "--json"])?["height"]
            .as_u64()
            .unwrap_or(0);
        if h > 0 {
            // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
            ensure!(unsafe { libc::kill(b.child.id() as i32, libc::SIGKILL) } == 0);
            b.child.wait()?;
            break h;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    ensure!(
        killed_at < height,
        "B finished ({killed_at} blocks) before it could be killed mid-import"
    );
    let verify = run(&b_dir, &["chain", "verify"])?;
    ensure!(
        verify.status.success() && String::from_utf8_lossy(&verify.stdout).contains("consistent"),
        "{}",
        stderr(&verify)
    );
    drop(b);
    let _b = node(&b_dir, &["--allow-private-addrs", "--bootstrap", &a_addr])?;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let v = json(&b_dir, &["chain", "--json"])?;
        if v["height"].as_u64() == Some(height) && v["tip"].as_str() == Some(tip.as_str()) {
            break;
        }
        ensure!(Instant::now() < deadline, "B did not catch up: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("killed at height {killed_at} of {height}; reopened consistent and caught up");
    Ok(())
}

/// The wallet commands against a mining node: a transfer is sent, confirmed and credited; a
/// refusal says why in words; bad input gets clear errors from the CLI and the API.
#[test]
fn wallet_commands_send_confirm_and_explain_refusals() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("node");
    ensure!(run(&dir, &["init", "--network", "test-wallet"])?
        .status
        .success());
    let _node = node(&dir, &["--mine", "--mine-pace-ms", "300"])?;
    let faucet = tmp.path().join("faucet.key");
    let bob_key = tmp.path().join("bob.key");
    ensure!(run(
        &dir,
        &[
            "key",
            "dev-faucet",
            "--out",
            faucet.to_str().context("path")?
        ]
    )?
    .status
    .success());
    let new = run(
        &dir,
        &["key", "new", "--out", bob_key.to_str().context("path")?],
    )?;
    ensure!(new.status.success(), "{}", stderr(&new));
    let bob = stdout(&new);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&bob_key)?.permissions().mode();
        ensure!(mode & 0o777 == 0o600, "key mode {:o}", mode & 0o777);
    }
    let again = run(
        &dir,
        &["key", "new", "--out", bob_key.to_str().context("path")?],
    )?;
    ensure!(
        !again.status.success(),
        "a key file must never be overwritten"
    );

    let f = faucet.to_str().context("path")?;
    let sent = run(
        &dir,
        &[
            "tx", "send", "--key", f, "--to", &bob, "--amount", "500", "--fee", "3",
        ],
    )?;
    ensure!(sent.status.success(), "{}", stderr(&sent));
    let id = stdout(&sent);
    ensure!(id.len() == 64, "transaction id {id:?}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = json(&dir, &["tx", "status", &id, "--json"])?;
        if s["state"] == "confirmed" {
            break;
        }
        ensure!(Instant::now() < deadline, "not confirmed: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let bal = run(&dir, &["balance", &bob])?;
    ensure!(stdout(&bal) == "500", "balance {:?}", stdout(&bal));

    let b = bob_key.to_str().context("path")?;
    let refused = run(
        &dir,
        &["tx", "send", "--key", b, "--to", &bob, "--amount", "700"],
    )?;
    ensure!(!refused.status.success());
    ensure!(
        stderr(&refused).contains("insufficient balance: has 500, needs 701"),
        "{}",
        stderr(&refused)
    );
    let bad_addr = run(&dir, &["balance", "not-an-address"])?;
    ensure!(
        !bad_addr.status.success() && stderr(&bad_addr).contains("64 hexadecimal digits"),
        "{}",
        stderr(&bad_addr)
    );
    let missing = run(&dir, &["block", "99999"])?;
    ensure!(
        !missing.status.success() && stderr(&missing).contains("not found"),
        "{}",
        stderr(&missing)
    );
    let block = json(&dir, &["block", "1", "--json"])?;
    ensure!(
        block["height"] == 1 && block["txs"][0]["kind"] == "coinbase",
        "{block}"
    );

    // The API refuses garbage with a 400 and a reason, and keeps running.
    let api = std::fs::read_to_string(dir.join("api"))?.trim().to_owned();
    let creds = meshwork_http::auth::Credentials::read(&dir.join("api.cookie"))?;
    let rt = tokio::runtime::Runtime::new()?;
    let (code, body) = rt.block_on(async {
        let r = creds
            .apply(reqwest::Client::new().post(format!("http://{api}/api/v1/tx")))
            .json(&serde_json::json!({ "tx": "00ff" }))
            .send()
            .await?;
        Ok::<_, anyhow::Error>((r.status().as_u16(), r.text().await?))
    })?;
    ensure!(
        code == 400 && body.contains("malformed transaction"),
        "{code} {body}"
    );
    ensure!(json(&dir, &["chain", "--json"])?["height"].as_u64() >= Some(1));
    Ok(())
}

#[test]
fn share_fetch_list_and_remove_through_the_binary() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (a_dir, b_dir) = (tmp.path().join("a"), tmp.path().join("b"));
    for d in [&a_dir, &b_dir] {
        ensure!(run(d, &["init", "--network", "test-share"])?
            .status
            .success());
    }
    let file = tmp.path().join("photo.bin");
    let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
    std::fs::write(&file, &bytes)?;
    let a = node(&a_dir, &[])?;
    let _b = node(&b_dir, &[])?;

    let shared = run(&a_dir, &["share", file.to_str().context("path")?])?;
    ensure!(shared.status.success(), "share: {}", stderr(&shared));
    let text = stdout(&shared);
    let ticket = text
        .lines()
        .find_map(|l| l.strip_prefix("ticket"))
        .map(|t| t.trim().to_owned())
        .context("no ticket line")?;
    ensure!(
        text.contains(&format!("meshwork fetch {ticket}")),
        "share prints the command to run elsewhere: {text}"
    );
    let id = text
        .lines()
        .find_map(|l| l.strip_prefix("content"))
        .map(|t| t.trim().to_owned())
        .context("no content line")?;

    // Bad input is refused with a sentence, not a panic.
    let bad = run(&b_dir, &["fetch", "not-a-ticket"])?;
    ensure!(!bad.status.success());
    ensure!(
        stderr(&bad).contains("neither a ticket nor a content id"),
        "{}",
        stderr(&bad)
    );
    let bad = run(
        &b_dir,
        &["fetch", &format!("{}x", &ticket[..ticket.len() - 3])],
    )?;
    ensure!(
        !bad.status.success() && stderr(&bad).contains("ticket"),
        "{}",
        stderr(&bad)
    );

    let out = tmp.path().join("copy.bin");
    let fetched = run(
        &b_dir,
        &[
            "fetch",
            &ticket,
            "-o",
            out.to_str().context("path")?,
            "--timeout",
            "120",
        ],
    )?;
    ensure!(fetched.status.success(), "fetch: {}", stderr(&fetched));
    ensure!(std::fs::read(&out)? == bytes, "the fetched file differs");
    // Not a terminal: no progress line.
    ensure!(!stderr(&fetched).contains('\r'), "progress on a pipe");

    let list = json(&b_dir, &["content", "list", "--json"])?;
    let entry = &list.as_array().context("array")?[0];
    ensure!(
        entry["state"] == "seeding" && entry["id"] == id.as_str(),
        "{list}"
    );
    ensure!(
        entry["downloaded"].as_u64() >= Some(bytes.len() as u64),
        "{list}"
    );

    // The shared content survives a restart of its node.
    ensure!(a.terminate()?.success());
    let _a = node(&a_dir, &[])?;
    let list = json(&a_dir, &["content", "list", "--json"])?;
    ensure!(list[0]["state"] == "seeding", "after restart: {list}");

    let rm = run(&b_dir, &["content", "rm", &id])?;
    ensure!(rm.status.success(), "{}", stderr(&rm));
    ensure!(json(&b_dir, &["content", "list", "--json"])? == serde_json::json!([]));
    ensure!(out.exists(), "a finished download stays on disk");
    // A fetch never writes over a file that is not its own download.
    let clobber = run(
        &b_dir,
        &["fetch", &ticket, "-o", out.to_str().context("path")?],
    )?;
    ensure!(
        !clobber.status.success() && stderr(&clobber).contains("already exists"),
        "{}",
        stderr(&clobber)
    );
    ensure!(
        std::fs::read(&out)? == bytes,
        "the existing file is untouched"
    );
    let again = run(&b_dir, &["content", "rm", &id])?;
    ensure!(!again.status.success() && stderr(&again).contains("not on this node"));
    Ok(())
}
