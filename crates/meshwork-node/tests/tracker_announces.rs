//! A node's announces to a tracker: hundreds of contents through one real (in-process)
//! tracker all get announced, within its per-IP rate bucket and connection cap; a tracker's
//! redirect is a failed announce, never followed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use libp2p::identity::Keypair;
use meshwork_node::content::ShareRequest;
use meshwork_node::NodeConfig;
use meshwork_proto::NetworkName;

async fn node(name: &str) -> meshwork_node::RunningNode {
    let mut cfg = NodeConfig::new(NetworkName::new(name).unwrap(), Keypair::generate_ed25519());
    cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    meshwork_node::start(cfg).await.unwrap()
}

/// Shares `n` small files through `tracker`.
async fn share_all(
    node: &meshwork_node::RunningNode,
    dir: &std::path::Path,
    n: usize,
    tracker: &str,
) {
    for i in 0..n {
        let file = dir.join(format!("f{i}"));
        std::fs::write(&file, format!("small content number {i}")).unwrap();
        node.handle
            .content
            .share(ShareRequest {
                path: file,
                super_seed: false,
                tracker: Some(tracker.to_string()),
                piece_size: None,
            })
            .await
            .unwrap();
    }
}

/// 300 contents through one tracker with its default limits (a bucket of 200 announces and
/// 20/s per IP, 32 connections per IP): all announced, none left with a tracker error, well
/// before the 60 s retry period a refused announce used to wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_contents_through_one_tracker_all_get_announced() {
    const N: usize = 300;
    let tracker = meshwork_server::http::start(
        "127.0.0.1:0".parse().unwrap(),
        meshwork_server::tracker::TrackerConfig::default(),
    )
    .await
    .unwrap();
    let url = format!("http://{}", tracker.addr);
    let node = node("test-announces").await;
    let dir = tempfile::tempdir().unwrap();
    let start = Instant::now();
    share_all(&node, dir.path(), N, &url).await;
    let http = reqwest::Client::new();
    let deadline = start + Duration::from_secs(45);
    loop {
        let stats: serde_json::Value = http
            .get(format!("{url}/api/v1/stats"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let list = node.handle.content.list().await.unwrap();
        let failing = list.iter().filter(|c| c.tracker_error.is_some()).count();
        if stats["peers"] == N && failing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after {:?}: {} of {N} announced, {failing} failing: {:?}",
            start.elapsed(),
            stats["peers"],
            list.iter().find_map(|c| c.tracker_error.clone())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("{N} contents announced in {:?}", start.elapsed());
    node.shutdown().await;
    tracker.stop();
}

/// A tracker answering 307 to a sink: one POST reaches the tracker, none the sink, and the
/// content's tracker error says where it was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tracker_redirect_is_not_followed() {
    let counter = |n: Arc<AtomicUsize>, to: Option<String>| {
        post(move || {
            let n = n.clone();
            let to = to.clone();
            async move {
                n.fetch_add(1, Ordering::SeqCst);
                match to {
                    Some(to) => {
                        (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, to)]).into_response()
                    }
                    None => StatusCode::OK.into_response(),
                }
            }
        })
    };
    let serve = |app: Router| async move {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l, app).await });
        url
    };
    let sunk = Arc::new(AtomicUsize::new(0));
    let sink = serve(Router::new().route("/sink", counter(sunk.clone(), None))).await;
    let asked = Arc::new(AtomicUsize::new(0));
    let to = format!("{sink}/sink");
    let tracker =
        serve(Router::new().route("/api/v1/announce", counter(asked.clone(), Some(to.clone()))))
            .await;
    let node = node("test-redirect").await;
    let dir = tempfile::tempdir().unwrap();
    share_all(&node, dir.path(), 1, &tracker).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let why = loop {
        let list = node.handle.content.list().await.unwrap();
        if let Some(why) = list[0].tracker_error.clone() {
            break why;
        }
        assert!(Instant::now() < deadline, "no announce failed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        why.contains(&format!("the tracker redirected to \"{to}\"")),
        "{why}"
    );
    assert_eq!(asked.load(Ordering::SeqCst), 1, "one POST per announce");
    assert_eq!(sunk.load(Ordering::SeqCst), 0, "the sink got the announce");
    node.shutdown().await;
}
