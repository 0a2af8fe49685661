//! `meshwork tracker start` gives its memory back: flooded until full from many source IPs,
//! then left until everything expired, its RSS returns under 1.5× its value at start.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use libp2p::identity::Keypair;
use meshwork_swarm::tracker_wire::{AnnounceRequest, Event, Stats};

const IPS: u32 = 100;
const PER_IP: u32 = 200; // the default burst of one IP
const MAX_CONTENTS: u32 = IPS * PER_IP;

struct Tracker(Child);

impl Drop for Tracker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn stats(base: &str) -> Stats {
    reqwest::get(format!("{base}/api/v1/stats"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tracker_returns_its_memory_after_a_flood_expires() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshwork"))
        .args([
            "tracker",
            "start",
            "--listen",
            "127.0.0.1:0",
            "--interval-secs",
            "1",
        ])
        .args([
            "--peer-ttl-secs",
            "10",
            "--max-contents",
            &MAX_CONTENTS.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    let pid = child.id();
    let _guard = Tracker(child);
    let mut base = None;
    for line in out.lines() {
        let line = line.unwrap();
        if let Some(url) = line.strip_prefix("stats       ") {
            base = Some(url.trim_end_matches("/api/v1/stats").to_string());
        }
        if line == "tracker is ready" {
            break;
        }
    }
    let base = base.expect("the tracker printed its address");
    // Settled: one request served, so the runtime's first allocations are in the baseline.
    stats(&base).await;
    let start = rss_kib(pid);

    let url = format!("{base}/api/v1/announce");
    let mut tasks = vec![];
    for i in 0..IPS {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let ip = format!("127.0.{}.{}", 10 + i / 200, i % 200 + 1);
            let client = reqwest::Client::builder()
                .local_address(Some(ip.parse().unwrap()))
                .build()
                .unwrap();
            let key = Keypair::generate_ed25519();
            let mut ok = 0;
            for j in 0..PER_IP {
                let mut r = AnnounceRequest {
                    content: format!("{:032x}{:032x}", i, j),
                    peer: key.public().to_peer_id().to_string(),
                    addrs: vec!["/ip4/127.0.0.1/tcp/4001".into()],
                    event: Some(Event::Started),
                    left: 0,
                    numwant: None,
                    time_ms: now_ms(),
                    sig: String::new(),
                };
                r.sign(&key).unwrap();
                let resp = client.post(&url).json(&r).send().await.unwrap();
                if resp.status() == 200 {
                    ok += 1;
                }
            }
            ok
        }));
    }
    let mut accepted = 0;
    for t in tasks {
        accepted += t.await.unwrap();
    }
    let full = stats(&base).await;
    let peak = rss_kib(pid);
    eprintln!(
        "RSS at start {start} KiB, full ({} contents, {accepted} accepted) {peak} KiB",
        full.contents
    );
    assert_eq!(
        full.contents as u32, MAX_CONTENTS,
        "the flood filled the tracker"
    );

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = stats(&base).await;
        let rss = rss_kib(pid);
        if s.contents == 0 && (rss as f64) < 1.5 * start as f64 {
            eprintln!("RSS after expiry {rss} KiB");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "RSS {rss} KiB ({} contents left), start {start} KiB, peak {peak} KiB",
            s.contents
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
