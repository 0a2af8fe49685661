//! The client-server counterpart end to end over HTTP on loopback: transfers, balances,
//! history, long polls, content with ranges and verification, and a restart with nothing lost.

use std::time::Duration;

use anyhow::Result;
use meshwork_ledger::spec::DEV_FAUCET_SECRET;
use meshwork_ledger::{chain::genesis_block, ChainSpec, Wallet};
use meshwork_server::client;
use meshwork_server::server::{self, ServerConfig};
use serde_json::Value;

async fn post_tx(base: &str, t: &meshwork_ledger::SignedTransfer) -> Result<(u16, Value)> {
    let r = reqwest::Client::new()
        .post(format!("{base}/api/v1/tx"))
        .json(&serde_json::json!({ "tx": hex::encode(t.encode()) }))
        .send()
        .await?;
    Ok((r.status().as_u16(), r.json().await?))
}

async fn get(url: &str) -> Result<Value> {
    Ok(reqwest::get(url).await?.error_for_status()?.json().await?)
}

/// Polls `cond` every 10 ms until it holds; fails after 20 s (only so as not to hang).
async fn until<F, Fut>(what: &str, mut cond: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond().await? {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

#[tokio::test]
async fn ledger_and_content_over_http_survive_a_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let spec = ChainSpec::test("test-central-http");
    let chain_id = genesis_block(&spec).hash();
    let cfg = ServerConfig {
        piece_size: Some(16 << 10),
        ..ServerConfig::new(&dir.path().join("server"), spec.clone())
    };
    let srv = server::start("127.0.0.1:0".parse()?, cfg.clone()).await?;
    let base = format!("http://{}", srv.addr);

    let chain = get(&format!("{base}/api/v1/chain")).await?;
    assert_eq!(chain["chain_id"], chain_id.to_string());

    // A subscriber waiting for the first entry, for as long as the server allows (30 s).
    let waiter = {
        let url = format!("{base}/api/v1/log?after=0&wait_ms=30000");
        tokio::spawn(async move { get(&url).await })
    };
    until("the long poll waiting", || async {
        Ok(srv.long_polls() == 1)
    })
    .await?;

    let faucet = Wallet::from_secret(&DEV_FAUCET_SECRET);
    let bob = Wallet::generate();
    let t0 = faucet.transfer(chain_id, bob.address(), 1000, 1, 0);
    let (code, body) = post_tx(&base, &t0).await?;
    assert_eq!(code, 201, "{body}");
    assert_eq!(body["seq"], 1);
    // The submit wakes the poll: it answers with the entry long before its own 30 s are up
    // (20 s here only tells a wake-up from the poll's timeout, which would also carry it).
    let page = tokio::time::timeout(Duration::from_secs(20), waiter)
        .await
        .map_err(|_| anyhow::anyhow!("the submit did not wake the long poll"))???;
    assert_eq!(page["entries"][0]["id"], t0.id().to_string());

    // Refusals carry the reason.
    let (code, body) = post_tx(&base, &t0).await?;
    assert_eq!(code, 400);
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("already confirmed"));
    let mut bad = faucet.transfer(chain_id, bob.address(), 5, 1, 1);
    bad.signature[0] ^= 1;
    let (code, body) = post_tx(&base, &bad).await?;
    assert_eq!(code, 400);
    assert!(
        body["error"].as_str().unwrap().contains("signature"),
        "{body}"
    );
    let r = reqwest::Client::new()
        .post(format!("{base}/api/v1/tx"))
        .json(&serde_json::json!({ "tx": "zz" }))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 400);

    let t1 = bob.transfer(chain_id, faucet.address(), 100, 1, 0);
    assert_eq!(post_tx(&base, &t1).await?.0, 201);
    let acct = get(&format!("{base}/api/v1/accounts/{}", bob.address())).await?;
    assert_eq!(acct["balance"], 899);
    assert_eq!(acct["next_nonce"], 1);
    let hist = get(&format!("{base}/api/v1/accounts/{}/history", bob.address())).await?;
    assert_eq!(hist.as_array().unwrap().len(), 2);
    let st = get(&format!("{base}/api/v1/tx/{}", t1.id())).await?;
    assert_eq!(st["state"], "confirmed");
    assert_eq!(st["height"], 2);

    // Content: upload, full and ranged reads, a verified download.
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 31 % 253) as u8).collect();
    let src = dir.path().join("report.bin");
    std::fs::write(&src, &data)?;
    let sum = client::upload(&base, &srv.api_credentials(), &src).await?;
    let want = meshwork_swarm::Manifest::from_file(&src, 16 << 10)?;
    assert_eq!(
        sum.id,
        want.id().to_string(),
        "same content id as the swarm"
    );
    let r = reqwest::Client::new()
        .get(format!("{base}/content/{}", sum.id))
        .header("Range", "bytes=100-199")
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 206);
    assert_eq!(
        r.headers()["content-range"].to_str()?,
        format!("bytes 100-199/{}", data.len())
    );
    assert_eq!(&r.bytes().await?[..], &data[100..200]);
    let r = reqwest::Client::new()
        .get(format!("{base}/content/{}", sum.id))
        .header("Range", "bytes=999999-")
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 416);

    let out = dir.path().join("copy.bin");
    let got = client::download(&base, &want.id(), &out, |_, _| {}).await?;
    assert_eq!(std::fs::read(&out)?, data);
    assert_eq!(got.received, data.len() as u64);

    // A resumed download asks only for what is missing.
    let out2 = dir.path().join("copy2.bin");
    std::fs::write(client::part_path(&out2, &want.id()), &data[..50_000])?;
    let got = client::download(&base, &want.id(), &out2, |_, _| {}).await?;
    assert_eq!(
        got.resumed,
        3 * (16 << 10),
        "three whole verified pieces kept"
    );
    assert_eq!(got.received, data.len() as u64 - got.resumed);
    assert_eq!(std::fs::read(&out2)?, data);

    // Restart: everything is still there.
    srv.stop().await;
    let srv = server::start("127.0.0.1:0".parse()?, cfg.clone()).await?;
    let base = format!("http://{}", srv.addr);
    let acct = get(&format!("{base}/api/v1/accounts/{}", bob.address())).await?;
    assert_eq!(acct["balance"], 899);
    let status = get(&format!("{base}/api/v1/status")).await?;
    assert_eq!(status["transactions"], 2);
    assert_eq!(status["contents"], 1);

    // Corruption on the server's disk is caught by the client, which keeps what verified.
    srv.stop().await;
    let stored = dir.path().join("server/content").join(&sum.id);
    let mut bytes = std::fs::read(&stored)?;
    bytes[40_000] ^= 0xff;
    std::fs::write(&stored, &bytes)?;
    let srv = server::start("127.0.0.1:0".parse()?, cfg.clone()).await?;
    let base = format!("http://{}", srv.addr);
    let out3 = dir.path().join("copy3.bin");
    let e = client::download(&base, &want.id(), &out3, |_, _| {})
        .await
        .unwrap_err();
    assert!(
        matches!(e, client::ClientError::Corrupt { piece: 2, verified } if verified == 2 * (16 << 10)),
        "{e}"
    );
    assert!(!out3.exists(), "no unverified file under the final name");

    // Another content's partial file at the same name is neither used nor cut; a symbolic
    // link where the partial file goes is not written through; a name of 255 bytes fits.
    let other = meshwork_swarm::ContentId::of(b"another content");
    let out4 = dir.path().join(format!("{}.bin", "b".repeat(251)));
    let theirs = client::part_path(&out4, &other);
    std::fs::write(&theirs, b"another download's progress")?;
    let victim = dir.path().join("victim.txt");
    std::fs::write(&victim, b"untouched")?;
    std::fs::create_dir_all(dir.path().join("sub"))?;
    let out5 = dir.path().join("sub").join("copy5.bin");
    std::os::unix::fs::symlink(&victim, client::part_path(&out5, &want.id()))?;
    let e = client::download(&base, &want.id(), &out5, |_, _| {})
        .await
        .unwrap_err();
    assert!(matches!(e, client::ClientError::Symlink(_)), "{e}");
    assert_eq!(std::fs::read(&victim)?, b"untouched");
    // Nor is a partial file anyone may write (planted by another user) taken up.
    let out6 = dir.path().join("sub").join("copy6.bin");
    let planted = client::part_path(&out6, &want.id());
    std::fs::write(&planted, &data[..1000])?;
    std::fs::set_permissions(
        &planted,
        std::os::unix::fs::PermissionsExt::from_mode(0o666),
    )?;
    let e = client::download(&base, &want.id(), &out6, |_, _| {})
        .await
        .unwrap_err();
    assert!(matches!(e, client::ClientError::Foreign(..)), "{e}");
    assert!(!out6.exists());
    srv.stop().await;
    std::fs::write(&stored, &data)?;
    let srv = server::start("127.0.0.1:0".parse()?, cfg).await?;
    let base = format!("http://{}", srv.addr);
    client::download(&base, &want.id(), &out4, |_, _| {}).await?;
    assert_eq!(std::fs::read(&out4)?, data);
    assert_eq!(std::fs::read(&theirs)?, b"another download's progress");
    // A second download to a name that is now taken does not replace the file (refused
    // before it starts).
    let e = client::download(&base, &want.id(), &out4, |_, _| {})
        .await
        .unwrap_err();
    assert!(matches!(e, client::ClientError::Exists(_)), "{e}");
    srv.stop().await;
    Ok(())
}

/// The operator's refusal list: a refused sender's transfer is turned away with the reason,
/// another sender's is accepted.
#[tokio::test]
async fn the_operator_refuses_the_senders_it_lists() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let spec = ChainSpec::test("test-central-refuse");
    let chain_id = genesis_block(&spec).hash();
    let faucet = Wallet::from_secret(&DEV_FAUCET_SECRET);
    let mut cfg = ServerConfig::new(&dir.path().join("server"), spec);
    cfg.refuse_senders.insert(faucet.address());
    let srv = server::start("127.0.0.1:0".parse()?, cfg).await?;
    let base = format!("http://{}", srv.addr);
    let (code, body) = post_tx(
        &base,
        &faucet.transfer(chain_id, Wallet::generate().address(), 5, 1, 0),
    )
    .await?;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("operator's policy"),
        "{body}"
    );
    let status = get(&format!("{base}/api/v1/status")).await?;
    assert_eq!(status["transactions"], 0, "nothing was recorded");
    srv.stop().await;
    Ok(())
}

/// A killed server cuts what is in flight at once: a download stops short (the client keeps
/// only verified pieces) and a long poll is answered with an error, not left hanging.
#[tokio::test]
async fn a_killed_server_cuts_downloads_and_long_polls_at_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let spec = ChainSpec::test("test-central-kill");
    let mut cfg = ServerConfig::new(&dir.path().join("server"), spec);
    cfg.piece_size = Some(16 << 10);
    // 256 KiB/s: the 4 MiB download would take 16 s, far beyond the 8 s it is given to end
    // once the server dies; the long poll would wait 25 s.
    cfg.upload_limit = Some(256 << 10);
    let srv = server::start("127.0.0.1:0".parse()?, cfg).await?;
    let base = format!("http://{}", srv.addr);
    let file = dir.path().join("f.bin");
    std::fs::write(&file, vec![7u8; 4 << 20])?;
    let sum = client::upload(&base, &srv.api_credentials(), &file).await?;
    let id = sum.id.parse()?;
    let out = dir.path().join("copy.bin");
    // Verified bytes so far, as the client reports them.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let download = {
        let (base, out, done) = (base.clone(), out.clone(), done.clone());
        tokio::spawn(async move {
            client::download(&base, &id, &out, |d, _| {
                done.store(d, std::sync::atomic::Ordering::SeqCst)
            })
            .await
        })
    };
    let poll = {
        let url = format!("{base}/api/v1/log?after=0&wait_ms=25000");
        tokio::spawn(async move { reqwest::get(&url).await.map(|r| r.status()) })
    };
    // Both in flight: the poll is waiting and the download has been sent some bytes.
    let status = format!("{base}/api/v1/status");
    until("the poll waiting and the download running", || async {
        Ok(srv.long_polls() == 1 && get(&status).await?["bytes_served"].as_u64() > Some(0))
    })
    .await?;
    let before = done.load(std::sync::atomic::Ordering::SeqCst);
    srv.kill().await;
    let d = tokio::time::timeout(Duration::from_secs(8), download).await??;
    assert!(d.is_err(), "the download cannot have completed");
    assert!(!out.exists(), "no unverified file under the final name");
    // Cut at once: at most the chunks already on their way (64 KiB each), not the 1.25 MiB
    // that 5 s of a graceful stop would still send at this rate.
    let after = done.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        after - before <= 256 << 10,
        "{} bytes arrived after the kill",
        after - before
    );
    // The poll is answered: 503, the server stopped (not cut off with the connection).
    let p = tokio::time::timeout(Duration::from_secs(8), poll).await??;
    assert!(
        matches!(p, Ok(s) if s.as_u16() == 503),
        "the long poll was not answered with 503: {p:?}"
    );
    Ok(())
}

/// Without a configured piece size, an upload is cut as a node's `share` cuts it (the swarm's
/// default for its length), so one file has one content id in both architectures.
#[tokio::test]
async fn an_upload_gets_the_content_id_a_node_would_give_it() -> Result<()> {
    use meshwork_swarm::manifest::{default_piece_size, Manifest};
    let dir = tempfile::tempdir()?;
    let cfg = ServerConfig::new(
        &dir.path().join("server"),
        ChainSpec::test("test-central-ids"),
    );
    let srv = server::start("127.0.0.1:0".parse()?, cfg).await?;
    let base = format!("http://{}", srv.addr);
    let file = dir.path().join("three.bin");
    let len = 3 << 20;
    std::fs::write(
        &file,
        (0..len).map(|i| (i % 251) as u8).collect::<Vec<u8>>(),
    )?;
    let sum = client::upload(&base, &srv.api_credentials(), &file).await?;
    let want = Manifest::from_file(&file, default_piece_size(len as u64))?;
    assert_eq!(sum.id, want.id().to_string());
    assert_ne!(
        default_piece_size(len as u64),
        meshwork_swarm::manifest::DEFAULT_PIECE_SIZE
    );
    srv.stop().await;
    Ok(())
}

/// Issue 13, case 10: with an upload cap, N downloads of an F-byte file can never finish
/// before N·F/cap (the client-server bound the lab compares against), even right after an
/// idle spell (no credit saved).
#[tokio::test]
async fn capped_downloads_never_beat_the_client_server_bound() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cfg = ServerConfig::new(
        &dir.path().join("server"),
        ChainSpec::test("test-central-cap"),
    );
    let cap: u64 = 8 << 20; // bytes per second
    cfg.upload_limit = Some(cap);
    let srv = server::start("127.0.0.1:0".parse()?, cfg).await?;
    let base = format!("http://{}", srv.addr);
    let file = dir.path().join("f.bin");
    let size: u64 = 2 << 20;
    std::fs::write(
        &file,
        (0..size).map(|i| (i % 241) as u8).collect::<Vec<u8>>(),
    )?;
    let sum = client::upload(&base, &srv.api_credentials(), &file).await?;
    let id: meshwork_swarm::ContentId = sum.id.parse()?;
    // Idle before the transfers, on purpose (the stimulus, not a wait for anything): a
    // bucket that saved credit would have filled up meanwhile and let the downloads beat the
    // bound.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let n = 3u64;
    let t0 = std::time::Instant::now();
    let mut tasks = vec![];
    for i in 0..n {
        let (base, out) = (base.clone(), dir.path().join(format!("copy-{i}.bin")));
        tasks.push(tokio::spawn(async move {
            client::download(&base, &id, &out, |_, _| {}).await
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = t0.elapsed().as_secs_f64();
    let bound = (n * size) as f64 / cap as f64;
    eprintln!(
        "{n} downloads of {size} bytes at {cap} B/s: {secs:.3} s, {:.3}x the bound",
        secs / bound
    );
    assert!(secs >= bound, "{secs:.3} s beats the bound of {bound:.3} s");
    srv.stop().await;
    Ok(())
}

/// JSON bodies are limited to 16 KiB (`POST /api/v1/tx`): a valid transfer padded (with JSON
/// whitespace) to exactly 16 KiB is accepted, another padded to 16 KiB + 1 byte is refused
/// with 413 and never enters the log.
#[tokio::test]
async fn a_json_body_over_16_kib_is_refused_with_413() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let spec = ChainSpec::test("test-central-body");
    let chain_id = genesis_block(&spec).hash();
    let srv = server::start(
        "127.0.0.1:0".parse()?,
        ServerConfig::new(&dir.path().join("server"), spec),
    )
    .await?;
    let base = format!("http://{}", srv.addr);
    let post = |t: &meshwork_ledger::SignedTransfer, len: usize| {
        let mut body =
            serde_json::to_vec(&serde_json::json!({ "tx": hex::encode(t.encode()) })).unwrap();
        assert!(body.len() < len);
        body.resize(len, b' ');
        reqwest::Client::new()
            .post(format!("{base}/api/v1/tx"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let faucet = Wallet::from_secret(&DEV_FAUCET_SECRET);
    let over = faucet.transfer(chain_id, Wallet::generate().address(), 5, 1, 0);
    let r = post(&over, (16 << 10) + 1).await?;
    assert_eq!(r.status().as_u16(), 413, "16 KiB + 1 byte");
    let log = get(&format!("{base}/api/v1/log?after=0")).await?;
    assert_eq!(log["count"], 0, "the refused transfer was logged: {log}");

    let at = faucet.transfer(chain_id, Wallet::generate().address(), 5, 1, 0);
    let r = post(&at, 16 << 10).await?;
    assert_eq!(r.status().as_u16(), 201, "exactly 16 KiB");
    let log = get(&format!("{base}/api/v1/log?after=0")).await?;
    assert_eq!(log["entries"][0]["id"], at.id().to_string());
    srv.stop().await;
    Ok(())
}
