//! The node's stores under bad disks, in process: a full disk under the chain store (through
//! the ledger's fault-injection backend, no root needed) and damaged files at start.

#[path = "../../../support/skip.rs"]
mod skip;

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::identity::Keypair;
use meshwork_ledger::faults::DiskFull;
use meshwork_ledger::spec::DEV_FAUCET_SECRET;
use meshwork_ledger::{ChainSpec, Ledger, TxStatus, Wallet};
use meshwork_node::ledger_service::{MinerConfig, StoreRetry};
use meshwork_node::node::Status;
use meshwork_node::{NodeConfig, NodeError, RunningNode};
use meshwork_proto::NetworkName;

/// Everything logged by any test of this binary (a global subscriber: the ledger's own
/// thread logs too). Tests look for their own lines only.
fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: std::sync::OnceLock<Arc<Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("meshwork_node=info")
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .try_init();
        buf
    })
    .clone()
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        std::io::stderr().write_all(b)?;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The tests whose stores fail take turns: the log capture is one for the whole binary, and a
/// count of "said once" must not see another test's node say it too.
static FAILING_DISKS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn count(logs: &Arc<Mutex<Vec<u8>>>, needle: &str) -> usize {
    String::from_utf8_lossy(&logs.lock().unwrap())
        .matches(needle)
        .count()
}

fn config(network: &str, dir: &Path) -> NodeConfig {
    let mut cfg = NodeConfig::new(
        NetworkName::new(network).unwrap(),
        Keypair::generate_ed25519(),
    );
    cfg.data_dir = Some(dir.to_owned());
    cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    cfg.api = Some("127.0.0.1:0".parse().unwrap());
    cfg.allow_private_addrs = true;
    cfg
}

async fn wait_for<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn height(n: &RunningNode) -> u64 {
    n.handle.ledger(|l| l.tip().height).await.unwrap()
}

/// A node's API address and the cookie its calls need.
type Api<'a> = (std::net::SocketAddr, &'a meshwork_http::auth::Credentials);

async fn get((api, creds): Api<'_>, path: &str) -> (u16, serde_json::Value) {
    let r = creds
        .apply(reqwest::Client::new().get(format!("http://{api}{path}")))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn post_tx(
    (api, creds): Api<'_>,
    t: &meshwork_ledger::SignedTransfer,
) -> (u16, serde_json::Value) {
    let r = creds
        .apply(reqwest::Client::new().post(format!("http://{api}/api/v1/tx")))
        .json(&serde_json::json!({ "tx": hex::encode(t.encode()) }))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// Case 6 of issue 13: the disk under the chain store fills while the node mines. The node
/// says why once, turns unhealthy (status, health endpoint), stops mining, refuses transfers
/// with a 503 rather than acknowledging them; it never calls the failure an invalid block.
/// When space returns the store is reopened by itself, mining resumes and the chain advances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_mining_and_transfers_until_the_store_reopens() {
    let _turn = FAILING_DISKS.lock().await;
    let logs = logs();
    // What earlier tests in this binary logged is not this node's.
    let before = |needle: &str| count(&logs, needle);
    let (said0, invalid0, reopened0) = (
        before("not mining and refusing transfers"),
        before("mined an invalid block"),
        before("chain store reopened"),
    );
    let dir = tempfile::tempdir().unwrap();
    let full = DiskFull::new();
    let mut cfg = config("test-fulldisk", dir.path());
    cfg.disk_fault = Some(full.clone());
    cfg.store_retry = StoreRetry {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(100),
        min_free_bytes: 0, // the switch, not the real disk, says when it is full
    };
    cfg.mining = Some(MinerConfig {
        address: Wallet::from_secret(&[9; 32]).address(),
        pace: Some(Duration::from_millis(30)),
    });
    let node = meshwork_node::start(cfg).await.unwrap();
    let creds = node.api_credentials();
    let api = (node.api_addr.unwrap(), &creds);
    wait_for("a few blocks", || async { height(&node).await >= 3 }).await;
    assert_eq!(get(api, "/api/v1/health").await.0, 200);

    full.set(true);
    wait_for("the node to notice", || async {
        node.handle.health().is_some()
    })
    .await;
    let why = node.handle.health().unwrap();
    assert!(why.contains("No space left on device"), "{why}");
    let (code, body) = get(api, "/api/v1/health").await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["healthy"], false);
    assert!(
        body["error"].as_str().unwrap().contains("No space left"),
        "{body}"
    );
    let status: Status = node.handle.status().await.unwrap();
    assert!(!status.chain.mining, "status must not claim mining");
    assert!(status.chain.miner_configured);
    assert!(!status.health.healthy);

    let chain_id = node.handle.ledger(|l| l.chain().chain_id()).await.unwrap();
    let faucet = Wallet::from_secret(&DEV_FAUCET_SECRET);
    let t = faucet.transfer(chain_id, Wallet::from_secret(&[5; 32]).address(), 42, 2, 0);
    let (code, body) = post_tx(api, &t).await;
    assert_eq!(code, 503, "refused, not acknowledged: {body}");
    assert!(
        body["error"].as_str().unwrap().contains("storage"),
        "{body}"
    );
    assert_eq!(node.handle.ledger(|l| l.mempool().len()).await.unwrap(), 0);

    // The height stays while the disk is full (the miner is paused, not failing every slice).
    let stuck = height(&node).await;
    let retried = Instant::now();
    while retried.elapsed() < Duration::from_millis(500) {
        assert_eq!(height(&node).await, stuck);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let said = count(&logs, "not mining and refusing transfers") - said0;
    assert_eq!(said, 1, "the reason is logged once, not at every retry");
    assert_eq!(
        count(&logs, "mined an invalid block") - invalid0,
        0,
        "a storage error is not an invalid block"
    );

    full.set(false);
    wait_for("healthy again", || async { node.handle.health().is_none() }).await;
    wait_for("the chain to advance", || async {
        height(&node).await > stuck + 2
    })
    .await;
    let status = node.handle.status().await.unwrap();
    assert!(status.chain.mining && status.health.healthy);
    assert_eq!(get(api, "/api/v1/health").await.0, 200);
    let (code, body) = post_tx(api, &t).await;
    assert_eq!(code, 200, "{body}");
    wait_for("the transfer confirmed", || async {
        matches!(
            node.handle
                .ledger(move |l| l.tx_status(&t.id()))
                .await
                .unwrap()
                .unwrap(),
            TxStatus::Confirmed { .. }
        )
    })
    .await;
    assert_eq!(count(&logs, "chain store reopened") - reopened0, 1);
    node.handle
        .ledger(|l| l.chain().verify_consistency())
        .await
        .unwrap()
        .unwrap();
    node.shutdown().await;
}

/// A truncated `node.redb` (the address book, a cache) does not stop the node: it is kept
/// aside as `node.redb.damaged-<time>` and a new store is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_node_store_is_set_aside_and_rebuilt() {
    let _ = logs();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config("test-damaged-book", dir.path());
    let node = meshwork_node::start(cfg.clone()).await.unwrap();
    node.shutdown().await;
    let path = dir.path().join("node.redb");
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(4096)
        .unwrap();

    let node = meshwork_node::start(cfg.clone())
        .await
        .expect("starts anyway");
    node.shutdown().await;
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("node.redb.damaged-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "the damaged file is kept aside");
    assert_eq!(aside[0].metadata().unwrap().len(), 4096, "untouched");
    // The new store is a good one: the node starts from it again without setting it aside.
    let node = meshwork_node::start(cfg).await.unwrap();
    node.shutdown().await;
    let count = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().contains("damaged"))
        })
        .count();
    assert_eq!(count, 1);
}

/// Writes a few blocks into `dir`'s chain store, with a transfer of a marked amount.
fn build_chain(dir: &Path, network: &str, marked: u64) {
    let spec = ChainSpec::for_network(network);
    let mut ledger = Ledger::open(&dir.join("chain.redb"), spec.clone()).unwrap();
    let faucet = Wallet::from_secret(&DEV_FAUCET_SECRET);
    let chain_id = ledger.chain().chain_id();
    let (marked_to, other) = (
        Wallet::from_secret(&[7; 32]).address(),
        Wallet::from_secret(&[8; 32]).address(),
    );
    let mut now = spec.genesis_timestamp;
    for nonce in 0..3 {
        let (to, amount) = if nonce == 0 {
            (marked_to, marked)
        } else {
            (other, 5)
        };
        ledger
            .submit(faucet.transfer(chain_id, to, amount, 1, nonce))
            .unwrap();
        now += 1000;
        let b = ledger.template(other, now).unwrap();
        ledger.import(b, now).unwrap();
    }
}

fn refused(r: Result<RunningNode, NodeError>) -> String {
    match r {
        Ok(_) => panic!("the node must not start on a damaged chain store"),
        Err(e) => e.to_string(),
    }
}

/// A truncated `chain.redb`: a clear error naming the file and the way to recover, no panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_chain_store_stops_the_start_with_the_recovery() {
    let dir = tempfile::tempdir().unwrap();
    build_chain(dir.path(), "test-truncated", 1000);
    let path = dir.path().join("chain.redb");
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let e = refused(meshwork_node::start(config("test-truncated", dir.path())).await);
    assert!(e.contains(&path.display().to_string()), "{e}");
    assert!(
        e.contains("damaged") && e.contains("move the file aside"),
        "{e}"
    );
}

/// One flipped byte in an account's balance: `chain verify` used to be the only thing that
/// noticed. Now the node refuses to start, and says how to recover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_account_state_stops_the_start_with_the_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let marked: u64 = 0x0a_bcde_f123;
    build_chain(dir.path(), "test-flipped", marked);
    let path = dir.path().join("chain.redb");
    let mut bytes = std::fs::read(&path).unwrap();
    let pattern = marked.to_le_bytes();
    let spots: Vec<usize> = (0..bytes.len() - 8)
        .filter(|&i| bytes[i..i + 8] == pattern)
        .collect();
    assert!(!spots.is_empty());
    for i in spots {
        bytes[i + 3] ^= 0x10;
    }
    std::fs::write(&path, bytes).unwrap();
    let e = refused(meshwork_node::start(config("test-flipped", dir.path())).await);
    assert!(e.contains("account state"), "{e}");
    assert!(
        e.contains(&format!("mv {p} {p}.damaged", p = path.display())),
        "{e}"
    );
}

/// Unmounts a tmpfs when the test ends, however it ends: lazily, since after a failed
/// assertion the node still holds its files open.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The same on a real full disk: a 16 MiB tmpfs under the data directory, filled by another
/// file, then freed. Needs root (to mount); skips with a message otherwise. It checks what the
/// fault switch cannot: a full disk still takes writes into pages the file already holds, so
/// the node must not call itself healthy (and fail again) until space has returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_real_full_tmpfs_the_node_stops_and_recovers() {
    let _turn = FAILING_DISKS.lock().await;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip::skip("mounting a tmpfs needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
        .arg(&mnt)
        .status();
    if !mounted.is_ok_and(|s| s.success()) {
        skip::skip("cannot mount a tmpfs here");
        return;
    }
    let _unmount = Unmount(mnt.clone());
    let mut cfg = config("test-tmpfs", &mnt.join("node"));
    cfg.store_retry.initial = Duration::from_millis(20);
    cfg.store_retry.max = Duration::from_millis(100);
    cfg.mining = Some(MinerConfig {
        address: Wallet::from_secret(&[9; 32]).address(),
        pace: Some(Duration::from_millis(30)),
    });
    let node = meshwork_node::start(cfg).await.unwrap();
    wait_for("a few blocks", || async { height(&node).await >= 3 }).await;

    let fill = mnt.join("fill");
    let mut f = std::fs::File::create(&fill).unwrap();
    while f.write_all(&[0u8; 1 << 20]).is_ok() {}
    drop(f);
    wait_for("the node to notice", || async {
        node.handle.health().is_some()
    })
    .await;
    assert!(node.handle.health().unwrap().contains("No space left"));
    let stuck = height(&node).await;
    let since = Instant::now();
    while since.elapsed() < Duration::from_millis(500) {
        assert!(
            node.handle.health().is_some(),
            "no flapping back to healthy while full"
        );
        assert_eq!(height(&node).await, stuck);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let chain_id = node.handle.ledger(|l| l.chain().chain_id()).await.unwrap();
    let t = Wallet::from_secret(&DEV_FAUCET_SECRET).transfer(
        chain_id,
        Wallet::from_secret(&[5; 32]).address(),
        42,
        2,
        0,
    );
    assert!(matches!(
        node.handle.submit(t).await.unwrap(),
        Err(meshwork_ledger::TxError::Storage(_))
    ));

    std::fs::remove_file(&fill).unwrap();
    wait_for("healthy again", || async { node.handle.health().is_none() }).await;
    wait_for("the chain to advance", || async {
        height(&node).await > stuck + 2
    })
    .await;
    node.handle.submit(t).await.unwrap().unwrap();
    node.shutdown().await;
}
