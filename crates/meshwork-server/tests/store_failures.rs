//! Issue 13, the server's store: a full disk (through the `Faults` seam, no root needed) makes
//! the server report itself unhealthy and refuse what it cannot make durable, then recover by
//! itself; damaged or emptied databases are start-up errors that delete nothing.

#[path = "../../../support/skip.rs"]
mod skip;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use meshwork_ledger::spec::DEV_FAUCET_SECRET;
use meshwork_ledger::{chain::genesis_block, ChainSpec, Hash, SignedTransfer, Wallet};
use meshwork_server::client;
use meshwork_server::server::{self, ServerConfig, DB_FILE};
use meshwork_server::store::Faults;
use serde_json::Value;

async fn post_tx(base: &str, t: &SignedTransfer) -> Result<(u16, Value)> {
    let r = reqwest::Client::new()
        .post(format!("{base}/api/v1/tx"))
        .json(&serde_json::json!({ "tx": hex::encode(t.encode()) }))
        .send()
        .await?;
    Ok((r.status().as_u16(), r.json().await?))
}

async fn get(url: &str) -> Result<(u16, Value)> {
    let r = reqwest::get(url).await?;
    Ok((r.status().as_u16(), r.json().await?))
}

async fn tx_state(base: &str, id: &Hash) -> Result<String> {
    let (_, v) = get(&format!("{base}/api/v1/tx/{id}")).await?;
    Ok(v["state"].as_str().unwrap_or("").to_string())
}

fn reason(v: &Value) -> &str {
    v["error"].as_str().unwrap_or("")
}

/// Every file under `dir` with its bytes, sorted by name.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Case 6: the disk fills. Health and status flip to 503 with the reason, a transfer and an
/// upload are refused with 503 (not acknowledged, not 500); once space returns the store
/// reopens by itself, a new transfer is accepted, and after a restart every acknowledged
/// transfer is there.
#[tokio::test]
async fn a_full_disk_makes_the_server_unhealthy_and_it_recovers_by_itself() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let spec = ChainSpec::test("test-central-full");
    let chain_id = genesis_block(&spec).hash();
    let cfg = ServerConfig::new(&dir.path().join("server"), spec);
    let faults = Faults::new();
    let srv =
        server::start_with_faults("127.0.0.1:0".parse()?, cfg.clone(), faults.clone()).await?;
    let base = format!("http://{}", srv.addr);
    let faucet = Wallet::from_secret(&DEV_FAUCET_SECRET);
    let bob = Wallet::generate();
    let mut acked = vec![];
    for nonce in 0..3 {
        let t = faucet.transfer(chain_id, bob.address(), 10, 1, nonce);
        let (code, body) = post_tx(&base, &t).await?;
        assert_eq!(code, 201, "{body}");
        acked.push(t.id());
    }
    let (code, body) = get(&format!("{base}/api/v1/health")).await?;
    assert_eq!((code, body["status"].as_str()), (200, Some("ok")));

    faults.set_space(Some(0));
    let t3 = faucet.transfer(chain_id, bob.address(), 10, 1, 3);
    let (code, body) = post_tx(&base, &t3).await?;
    assert_eq!(code, 503, "a transfer the disk could not hold: {body}");
    assert!(reason(&body).contains("No space left"), "{body}");
    let (code, body) = get(&format!("{base}/api/v1/health")).await?;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["status"], "unavailable");
    assert!(reason(&body).contains("No space left"), "{body}");
    assert!(reason(&body).contains(DB_FILE), "names the file: {body}");
    let (code, body) = get(&format!("{base}/api/v1/status")).await?;
    assert_eq!(code, 503, "status says so too: {body}");
    // Still refused, with the reason, while down (not 500, not acknowledged).
    let (code, body) = post_tx(&base, &t3).await?;
    assert_eq!(code, 503, "{body}");
    let file = dir.path().join("f.bin");
    std::fs::write(&file, vec![1u8; 100_000])?;
    let e = client::upload(&base, &srv.api_credentials(), &file)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, client::ClientError::Status { status, .. } if status.as_u16() == 503),
        "{e}"
    );

    // Space returns: the store reopens without a restart.
    faults.set_space(None);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, _) = get(&format!("{base}/api/v1/health")).await?;
        if code == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the store never reopened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, body) = post_tx(&base, &t3).await?;
    assert_eq!(code, 201, "accepted once space returned: {body}");
    acked.push(t3.id());
    let sum = client::upload(&base, &srv.api_credentials(), &file).await?;

    srv.stop().await;
    let srv = server::start("127.0.0.1:0".parse()?, cfg).await?;
    let base = format!("http://{}", srv.addr);
    for id in &acked {
        assert_eq!(tx_state(&base, id).await?, "confirmed", "{id} lost");
    }
    let (_, acct) = get(&format!("{base}/api/v1/accounts/{}", bob.address())).await?;
    assert_eq!(acct["balance"], 40);
    let (_, content) = get(&format!("{base}/api/v1/content/{}", sum.id)).await?;
    assert_eq!(content["size"], 100_000);
    srv.stop().await;
    Ok(())
}

/// Case 6: an upload that runs out of room half way is refused with 507 and the reason, and
/// leaves no file at all (no temporary, nothing under a content id), the store staying
/// healthy; one whose record does not fit is refused with 503 and leaves nothing either; the
/// same upload succeeds once there is room.
#[tokio::test]
async fn an_upload_that_runs_out_of_disk_is_refused_and_leaves_no_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = ServerConfig::new(
        &dir.path().join("server"),
        ChainSpec::test("test-central-upfull"),
    );
    let faults = Faults::new();
    let srv = server::start_with_faults("127.0.0.1:0".parse()?, cfg, faults.clone()).await?;
    let base = format!("http://{}", srv.addr);
    let file = dir.path().join("big.bin");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 249) as u8).collect();
    std::fs::write(&file, &data)?;
    faults.set_space(Some(1_000_000));
    let e = client::upload(&base, &srv.api_credentials(), &file)
        .await
        .unwrap_err();
    match &e {
        client::ClientError::Status { status, reason, .. } => {
            assert_eq!(status.as_u16(), 507, "{e}");
            assert!(reason.contains("No space left"), "{reason}");
        }
        e => panic!("not an answer with the reason: {e}"),
    }
    let content_dir = dir.path().join("server/content");
    assert_eq!(snapshot(&content_dir), vec![], "a partial file was left");
    let (_, list) = get(&format!("{base}/api/v1/content")).await?;
    assert_eq!(list.as_array().map(Vec::len), Some(0));
    let (code, _) = get(&format!("{base}/api/v1/health")).await?;
    assert_eq!(code, 200, "the database was not hurt");

    // Room for the file but not for its record: refused (the store is down), and the file
    // renamed to its content id is removed again.
    faults.set_space(Some(data.len() as u64));
    let e = client::upload(&base, &srv.api_credentials(), &file)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, client::ClientError::Status { status, .. } if status.as_u16() == 503),
        "{e}"
    );
    assert_eq!(
        snapshot(&content_dir),
        vec![],
        "an unrecorded file was left"
    );

    faults.set_space(None);
    let deadline = Instant::now() + Duration::from_secs(20);
    while get(&format!("{base}/api/v1/health")).await?.0 != 200 {
        assert!(Instant::now() < deadline, "the store never reopened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sum = client::upload(&base, &srv.api_credentials(), &file).await?;
    assert_eq!(std::fs::read(content_dir.join(&sum.id))?, data);
    srv.stop().await;
    Ok(())
}

/// A server with two transfers and two uploads, stopped; returns its config and the upload
/// ids.
async fn populated(dir: &Path, net: &str) -> Result<(ServerConfig, Vec<String>)> {
    let spec = ChainSpec::test(net);
    let chain_id = genesis_block(&spec).hash();
    let cfg = ServerConfig::new(&dir.join("server"), spec);
    let srv = server::start("127.0.0.1:0".parse()?, cfg.clone()).await?;
    let base = format!("http://{}", srv.addr);
    let faucet = Wallet::from_secret(&DEV_FAUCET_SECRET);
    for nonce in 0..2 {
        let t = faucet.transfer(chain_id, Wallet::generate().address(), 3, 1, nonce);
        assert_eq!(post_tx(&base, &t).await?.0, 201);
    }
    let mut ids = vec![];
    for (name, byte) in [("a.bin", 1u8), ("b.bin", 2u8)] {
        let f = dir.join(name);
        std::fs::write(&f, vec![byte; 50_000])?;
        ids.push(client::upload(&base, &srv.api_credentials(), &f).await?.id);
    }
    srv.stop().await;
    Ok((cfg, ids))
}

/// Case 7: `truncate -s 4096 server.redb` is a start-up error that names the file and how to
/// recover, not a panic; the content files are untouched.
#[tokio::test]
async fn a_truncated_database_is_a_start_up_error_not_a_panic() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (cfg, _) = populated(dir.path(), "test-central-trunc").await?;
    let db = cfg.data_dir.join(DB_FILE);
    let before = snapshot(&cfg.data_dir.join("content"));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&db)?
        .set_len(4096)?;
    let e = match server::start("127.0.0.1:0".parse()?, cfg.clone()).await {
        Ok(_) => panic!("a truncated database was opened"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains(&db.display().to_string()), "names the file: {e}");
    assert!(
        e.contains("damaged") && e.contains("backup"),
        "says how to recover: {e}"
    );
    assert_eq!(snapshot(&cfg.data_dir.join("content")), before);
    Ok(())
}

/// Case 7: a deleted or emptied `server.redb` next to stored uploads refuses to start with a
/// clear message, every time, and deletes nothing (every file byte for byte, including one
/// that is not the server's); a temporary file of an interrupted upload is swept.
#[tokio::test]
async fn a_new_database_next_to_stored_content_refuses_and_deletes_nothing() -> Result<()> {
    for how in ["deleted", "emptied"] {
        let dir = tempfile::tempdir()?;
        let (cfg, ids) = populated(dir.path(), "test-central-empty").await?;
        let content = cfg.data_dir.join("content");
        std::fs::write(content.join("README.operator"), b"mine")?;
        let before = snapshot(&content);
        assert_eq!(before.len(), 3);
        let db = cfg.data_dir.join(DB_FILE);
        match how {
            "deleted" => std::fs::remove_file(&db)?,
            _ => std::fs::write(&db, b"")?,
        }
        std::fs::write(content.join("tmp-0123456789abcdef"), b"half an upload")?;
        for attempt in 0..2 {
            let e = match server::start("127.0.0.1:0".parse()?, cfg.clone()).await {
                Ok(_) => panic!("{how} database: started with an empty ledger (attempt {attempt})"),
                Err(e) => e.to_string(),
            };
            assert!(
                e.contains(&content.display().to_string()) && e.contains("Nothing was deleted"),
                "{how}: {e}"
            );
            assert_eq!(snapshot(&content).len(), before.len() + 1, "{how}");
            let now: Vec<_> = snapshot(&content)
                .into_iter()
                .filter(|(n, _)| !n.starts_with("tmp-"))
                .collect();
            assert_eq!(now, before, "{how}: a stored file changed");
        }
        assert!(ids.iter().all(|id| content.join(id).exists()));
    }
    Ok(())
}

/// Case 7: at start the server sweeps the temporary file of an interrupted upload, and only
/// that: an unrecorded file named like a content id, and files that are not its own, stay.
#[tokio::test]
async fn only_the_servers_own_temporary_files_are_swept() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (cfg, ids) = populated(dir.path(), "test-central-sweep").await?;
    let content = cfg.data_dir.join("content");
    let stray_id = "ab".repeat(32);
    std::fs::write(content.join(&stray_id), b"unrecorded")?;
    std::fs::write(content.join("tmp-notours"), b"a look-alike")?;
    std::fs::write(content.join("tmp-00000000000000ff"), b"half an upload")?;
    let srv = server::start("127.0.0.1:0".parse()?, cfg.clone()).await?;
    let base = format!("http://{}", srv.addr);
    assert!(!content.join("tmp-00000000000000ff").exists(), "not swept");
    assert_eq!(std::fs::read(content.join(&stray_id))?, b"unrecorded");
    assert_eq!(std::fs::read(content.join("tmp-notours"))?, b"a look-alike");
    for id in &ids {
        assert!(content.join(id).exists());
    }
    // Unrecorded means not served.
    let (code, _) = get(&format!("{base}/api/v1/content/{stray_id}")).await?;
    assert_eq!(code, 404);
    srv.stop().await;
    Ok(())
}

/// Unmounts on drop, so a failed assertion does not leave the mount behind.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Case 6 on a real full disk (a 20 MB tmpfs; root only, skipped with a message otherwise):
/// the server's data dir fills up, a transfer is refused with 503 and health says why; once
/// the filler is removed the store reopens by itself, a new transfer is accepted, and after a
/// restart every acknowledged transfer is there.
#[tokio::test]
async fn a_real_full_tmpfs_makes_the_server_unhealthy_until_space_returns() -> Result<()> {
    if !is_root() {
        skip::skip("mounting a tmpfs needs root (the Faults seam covers this without)");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let mnt = dir.path().join("disk");
    std::fs::create_dir(&mnt)?;
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=20m", "tmpfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        skip::skip("cannot mount a tmpfs here");
        return Ok(());
    }
    let _mount = Mount(mnt.clone());
    let spec = ChainSpec::test("test-central-tmpfs");
    let chain_id = genesis_block(&spec).hash();
    let cfg = ServerConfig::new(&mnt.join("server"), spec);
    let srv = server::start("127.0.0.1:0".parse()?, cfg.clone()).await?;
    let base = format!("http://{}", srv.addr);
    let faucet = Wallet::from_secret(&DEV_FAUCET_SECRET);
    let to = Wallet::generate().address();
    let t0 = faucet.transfer(chain_id, to, 1, 1, 0);
    assert_eq!(post_tx(&base, &t0).await?.0, 201);
    let mut acked = vec![t0.id()];
    // Fill the disk to the last byte.
    {
        use std::io::Write;
        let mut f = std::fs::File::create(mnt.join("filler"))?;
        let block = vec![0xa5u8; 64 << 10];
        loop {
            if let Err(e) = f.write_all(&block) {
                assert!(meshwork_server::store::is_no_space(&e), "{e}");
                break;
            }
        }
        let _ = f.write_all(&block[..1]);
    }
    let mut nonce = 1;
    let refused = loop {
        let t = faucet.transfer(chain_id, to, 1, 1, nonce);
        let (code, body) = post_tx(&base, &t).await?;
        match code {
            201 => acked.push(t.id()),
            503 => break t,
            c => panic!("{c}: {body}"),
        }
        nonce += 1;
        assert!(nonce < 5000, "the disk never filled");
    };
    let (code, body) = get(&format!("{base}/api/v1/health")).await?;
    // A reopen may already have succeeded on the full disk; the next write fails again.
    if code == 200 {
        assert_eq!(post_tx(&base, &refused).await?.0, 503);
    } else {
        assert_eq!(code, 503, "{body}");
        assert!(reason(&body).contains("No space left"), "{body}");
    }
    std::fs::remove_file(mnt.join("filler"))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let again = loop {
        let (code, body) = post_tx(&base, &refused).await?;
        if code == 201 {
            break body;
        }
        assert_eq!(code, 503, "{body}");
        assert!(Instant::now() < deadline, "the store never reopened");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(again["id"], refused.id().to_string());
    acked.push(refused.id());
    srv.stop().await;
    let srv = server::start("127.0.0.1:0".parse()?, cfg).await?;
    let base = format!("http://{}", srv.addr);
    for id in &acked {
        assert_eq!(tx_state(&base, id).await?, "confirmed", "{id} lost");
    }
    srv.stop().await;
    Ok(())
}
