//! The tracker over real HTTP: announces answer with peers at the address they came from,
//! malformed ones get a 400 (a body over 16 KiB a 413) and change nothing, forged ones a 403.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Result};
use libp2p_identity::Keypair;
use meshwork_server::http;
use meshwork_server::tracker::{AnnounceRequest, AnnounceResponse, Event, Stats, TrackerConfig};
use serde_json::json;

const ID: &str = "abababababababababababababababababababababababababababababababab";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn signed(key: &Keypair, addrs: &[&str], event: Option<Event>, left: u64) -> AnnounceRequest {
    let mut r = AnnounceRequest {
        content: ID.into(),
        peer: key.public().to_peer_id().to_string(),
        addrs: addrs.iter().map(|a| a.to_string()).collect(),
        event,
        left,
        numwant: None,
        time_ms: now_ms(),
        sig: String::new(),
    };
    r.sign(key).unwrap();
    r
}

#[tokio::test]
async fn announce_over_http_and_refuse_garbage() -> Result<()> {
    let t = http::start(
        "127.0.0.1:0".parse()?,
        TrackerConfig {
            interval: Duration::from_secs(60),
            ..TrackerConfig::default()
        },
    )
    .await?;
    let base = format!("http://{}", t.addr);
    // The seeder announces from 127.0.0.3, claiming an address on another host.
    let from = |ip: &str| {
        reqwest::Client::builder()
            .local_address(Some(ip.parse().unwrap()))
            .build()
            .unwrap()
    };
    let (seeder, leecher) = (from("127.0.0.3"), from("127.0.0.4"));
    let url = format!("{base}/api/v1/announce");
    let seed_key = Keypair::generate_ed25519();
    let seed = signed(
        &seed_key,
        &["/ip4/127.0.0.99/tcp/4001"],
        Some(Event::Started),
        0,
    );
    let r = seeder.post(&url).json(&seed).send().await?;
    ensure!(r.status() == 200, "{}", r.status());
    let leech = signed(
        &Keypair::generate_ed25519(),
        &[],
        Some(Event::Started),
        1000,
    );
    let a: AnnounceResponse = leecher.post(&url).json(&leech).send().await?.json().await?;
    ensure!(a.peers.len() == 1 && a.peers[0].peer == seed.peer && a.peers[0].seeder);
    ensure!(
        a.peers[0].addrs == ["/ip4/127.0.0.3/tcp/4001"],
        "the source IP, not the claimed one: {:?}",
        a.peers[0].addrs
    );
    ensure!(a.seeders == 1 && a.leechers == 1);

    let c = reqwest::Client::new();
    let stats_url = format!("{base}/api/v1/stats");
    let before: Stats = c.get(&stats_url).send().await?.json().await?;
    let mut stale = seed.clone();
    stale.event = Some(Event::Stopped);
    let forged = serde_json::to_value(&stale)?; // the started announce's signature
    for (bad, code) in [
        (
            json!({"content": "nope", "peer": "X", "addrs": [], "left": 0, "time_ms": 1, "sig": ""}),
            400,
        ),
        (
            json!({"content": ID, "peer": "X", "addrs": ["garbage"], "left": 0, "time_ms": 1, "sig": ""}),
            400,
        ),
        (
            json!({"content": ID, "peer": "X", "addrs": [], "left": -1, "time_ms": 1, "sig": ""}),
            400,
        ),
        (
            json!({"content": ID, "peer": "X", "addrs": [], "left": 0, "extra": true}),
            400,
        ),
        (
            json!({"content": ID, "peer": seed.peer, "addrs": [], "left": 0}),
            400,
        ),
        (forged, 403),
        (serde_json::to_value(&seed)?, 403), // replayed
    ] {
        let r = c.post(&url).json(&bad).send().await?;
        ensure!(r.status() == code, "{bad}: {}", r.status());
        let body: serde_json::Value = r.json().await?;
        ensure!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{body}"
        );
    }
    let r = c
        .post(&url)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await?;
    ensure!(r.status() == 400);
    // A body over the 16 KiB limit is refused as too large, one at the limit is read (and
    // refused for what it says, not for its size).
    for (size, code) in [(16 << 10, 400), ((16 << 10) + 1, 413)] {
        let mut body =
            json!({"content": ID, "peer": "X", "addrs": [], "left": 0, "pad": ""}).to_string();
        let pad = size - body.len();
        body = body.replace("\"pad\":\"\"", &format!("\"pad\":\"{}\"", "x".repeat(pad)));
        ensure!(body.len() == size);
        let r = c
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await?;
        ensure!(r.status() == code, "a {size}-byte announce: {}", r.status());
    }
    let after: Stats = c.get(&stats_url).send().await?.json().await?;
    ensure!(after.peers == before.peers && after.announces == before.announces);
    ensure!(after.rejected == before.rejected + 10, "{after:?}");
    t.stop();
    Ok(())
}
