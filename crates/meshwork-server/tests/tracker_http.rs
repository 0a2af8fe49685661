//! The tracker over real HTTP: announces answer with peers, malformed ones get a 400 and
//! change nothing.

use std::time::Duration;

use anyhow::{ensure, Result};
use meshwork_server::http;
use meshwork_server::tracker::{AnnounceResponse, Stats, TrackerConfig};
use serde_json::json;

const ID: &str = "abababababababababababababababababababababababababababababababab";

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
    let c = reqwest::Client::new();
    let announce = |body: serde_json::Value| {
        let c = c.clone();
        let url = format!("{base}/api/v1/announce");
        async move { c.post(url).json(&body).send().await }
    };
    let seed = json!({"content": ID, "peer": "SeedPeer", "addrs": ["/ip4/127.0.0.1/tcp/4001"], "event": "started", "left": 0});
    let r = announce(seed).await?;
    ensure!(r.status() == 200, "{}", r.status());
    let leech =
        json!({"content": ID, "peer": "LeechPeer", "addrs": [], "event": "started", "left": 1000});
    let a: AnnounceResponse = announce(leech).await?.json().await?;
    ensure!(a.peers.len() == 1 && a.peers[0].peer == "SeedPeer" && a.peers[0].seeder);
    ensure!(a.seeders == 1 && a.leechers == 1);

    let stats_url = format!("{base}/api/v1/stats");
    let before: Stats = c.get(&stats_url).send().await?.json().await?;
    for bad in [
        json!({"content": "nope", "peer": "X", "addrs": [], "left": 0}),
        json!({"content": ID, "peer": "X", "addrs": ["garbage"], "left": 0}),
        json!({"content": ID, "peer": "X", "addrs": [], "left": -1}),
        json!({"content": ID, "peer": "X", "addrs": [], "left": 0, "extra": true}),
    ] {
        let r = announce(bad.clone()).await?;
        ensure!(r.status() == 400, "{bad}: {}", r.status());
        let body: serde_json::Value = r.json().await?;
        ensure!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{body}"
        );
    }
    let r = c
        .post(format!("{base}/api/v1/announce"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await?;
    ensure!(r.status() == 400);
    let after: Stats = c.get(&stats_url).send().await?.json().await?;
    ensure!(after.peers == before.peers && after.announces == before.announces);
    ensure!(after.rejected == before.rejected + 5, "{after:?}");
    t.stop();
    Ok(())
}
