//! The node's API keeps strangers and web pages out (issue 14, cases 1 and 2): every route
//! needs the cookie (401 without it), a foreign `Host` is refused with 421 before anything
//! runs, a foreign `Origin` or a cross-site fetch with 403; the cookie file is 0600, new at
//! each start, gone after a clean stop, and a symlink planted at its name is not followed.

use std::os::unix::fs::PermissionsExt;

use libp2p::identity::Keypair;
use meshwork_http::auth::{Cookie, Credentials, COOKIE_FILE};
use meshwork_node::{NodeConfig, RunningNode};
use meshwork_proto::NetworkName;
use reqwest::Method;

const ID: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Every route of `meshwork_node::api::router`, one request each (a new route is protected
/// too: the guard wraps the whole router, its fallback included, as the last row shows).
const ROUTES: &[(&str, &str)] = &[
    ("GET", "/api/v1/status"),
    ("GET", "/api/v1/health"),
    ("GET", "/api/v1/peers"),
    ("GET", "/api/v1/addrbook"),
    ("POST", "/api/v1/tx"),
    ("GET", "/api/v1/tx/{id}"),
    ("GET", "/api/v1/accounts/{id}"),
    ("GET", "/api/v1/chain"),
    ("GET", "/api/v1/blocks/0"),
    ("GET", "/api/v1/mempool"),
    ("POST", "/api/v1/content"),
    ("GET", "/api/v1/content"),
    ("GET", "/api/v1/content/{id}"),
    ("DELETE", "/api/v1/content/{id}"),
    ("POST", "/api/v1/content/{id}/verify"),
    ("POST", "/api/v1/fetch"),
    ("GET", "/api/v1/gossip/recent"),
    ("PUT", "/api/v1/mining"),
    ("GET", "/metrics"),
    ("GET", "/no/such/route"),
];

fn config(network: &str) -> NodeConfig {
    let mut cfg = NodeConfig::new(
        NetworkName::new(network).unwrap(),
        Keypair::generate_ed25519(),
    );
    cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    cfg.api = Some("127.0.0.1:0".parse().unwrap());
    cfg.allow_private_addrs = true;
    cfg
}

enum Auth<'a> {
    None,
    Basic(&'a Credentials),
    Bearer(String),
}

async fn call(
    node: &RunningNode,
    method: &str,
    path: &str,
    auth: Auth<'_>,
    headers: &[(&str, &str)],
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let api = node.api_addr.unwrap();
    let path = path.replace("{id}", ID);
    let mut req = reqwest::Client::new().request(
        method.parse::<Method>().unwrap(),
        format!("http://{api}{path}"),
    );
    req = match auth {
        Auth::None => req,
        Auth::Basic(c) => c.apply(req),
        Auth::Bearer(t) => req.bearer_auth(t),
    };
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let code = r.status().as_u16();
    let challenge = r
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    assert!(
        r.headers().get("access-control-allow-origin").is_none(),
        "no CORS header, ever"
    );
    let text = r.text().await.unwrap();
    if code == 401 {
        assert_eq!(challenge.as_deref(), Some("Basic realm=\"meshwork\""));
    }
    (
        code,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

#[tokio::test]
async fn every_route_needs_the_cookie_basic_or_bearer() {
    let node = meshwork_node::start(config("test-api-auth")).await.unwrap();
    let creds = node.api_credentials();
    let wrong = Cookie::generate().credentials();
    let token = creds.secret().to_string();
    for (m, p) in ROUTES {
        let (code, body) = call(&node, m, p, Auth::None, &[], None).await;
        assert_eq!(code, 401, "{m} {p} without credentials: {body}");
        assert!(
            body["error"].as_str().unwrap_or("").contains("cookie"),
            "{m} {p}: the 401 says what is missing: {body}"
        );
        let (code, _) = call(&node, m, p, Auth::Basic(&wrong), &[], None).await;
        assert_eq!(code, 401, "{m} {p} with a wrong secret");
        let (code, _) = call(
            &node,
            m,
            p,
            Auth::Bearer(wrong.secret().to_string()),
            &[],
            None,
        )
        .await;
        assert_eq!(code, 401, "{m} {p} with a wrong bearer token");
        let (code, body) = call(&node, m, p, Auth::Basic(&creds), &[], None).await;
        assert!(
            ![401, 403, 421].contains(&code),
            "{m} {p} with Basic: {code} {body}"
        );
        let (code, body) = call(&node, m, p, Auth::Bearer(token.clone()), &[], None).await;
        assert!(
            ![401, 403, 421].contains(&code),
            "{m} {p} with Bearer: {code} {body}"
        );
    }
    node.shutdown().await;
}

#[tokio::test]
async fn a_foreign_host_or_origin_is_refused_before_anything_changes() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secret.txt");
    std::fs::write(&file, b"only the node's user may share this").unwrap();
    let node = meshwork_node::start(config("test-api-host")).await.unwrap();
    let creds = node.api_credentials();
    let api = node.api_addr.unwrap();
    let share = serde_json::json!({ "path": file });
    let mine =
        serde_json::json!({ "address": meshwork_ledger::Wallet::generate().address().to_string() });
    let mining = |n: &RunningNode| {
        let h = n.handle.clone();
        async move { h.status().await.unwrap().chain.miner_configured }
    };

    // DNS rebinding: the page's own name in Host, even with the cookie (and first without:
    // the Host check runs before authentication).
    for auth in [Auth::None, Auth::Basic(&creds)] {
        let host = [("host", "attacker.example")];
        let (code, body) = call(
            &node,
            "POST",
            "/api/v1/content",
            auth,
            &host,
            Some(share.clone()),
        )
        .await;
        assert_eq!(code, 421, "{body}");
    }
    let host = [("host", "attacker.example:80")];
    let (code, _) = call(
        &node,
        "PUT",
        "/api/v1/mining",
        Auth::Basic(&creds),
        &host,
        Some(mine.clone()),
    )
    .await;
    assert_eq!(code, 421);
    // A foreign Origin, or a cross-site fetch, with the right Host and cookie: 403.
    let own = format!("http://{api}");
    for headers in [
        vec![("origin", "http://attacker.example")],
        vec![("origin", "null")],
        vec![("sec-fetch-site", "cross-site")],
    ] {
        let (code, body) = call(
            &node,
            "POST",
            "/api/v1/content",
            Auth::Basic(&creds),
            &headers,
            Some(share.clone()),
        )
        .await;
        assert_eq!(code, 403, "{headers:?}: {body}");
        let (code, _) = call(
            &node,
            "PUT",
            "/api/v1/mining",
            Auth::Basic(&creds),
            &headers,
            Some(mine.clone()),
        )
        .await;
        assert_eq!(code, 403, "{headers:?}");
    }
    // Nothing changed: nothing shared, no miner.
    assert!(node.handle.content.list().await.unwrap().is_empty());
    assert!(!mining(&node).await);

    // The API's own names are served: localhost and its own origin.
    let port = api.port().to_string();
    let localhost = format!("localhost:{port}");
    let (code, body) = call(
        &node,
        "POST",
        "/api/v1/content",
        Auth::Basic(&creds),
        &[("host", &localhost), ("origin", &own)],
        Some(share),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let (code, body) = call(
        &node,
        "PUT",
        "/api/v1/mining",
        Auth::Basic(&creds),
        &[("sec-fetch-site", "same-origin")],
        Some(mine),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(node.handle.content.list().await.unwrap().len(), 1);
    assert!(mining(&node).await);
    node.shutdown().await;
}

#[tokio::test]
async fn the_cookie_file_is_private_new_at_each_start_and_gone_after_a_stop() {
    let dir = tempfile::tempdir().unwrap();
    let key = Keypair::generate_ed25519();
    let cfg = || {
        let mut c = config("test-api-cookie");
        c.keypair = key.clone();
        c.data_dir = Some(dir.path().to_owned());
        c
    };
    let path = dir.path().join(COOKIE_FILE);

    // A symlink planted at the cookie's name, pointing at a file of the attacker's choice.
    let target = dir.path().join("planted-target");
    std::fs::write(&target, b"untouched").unwrap();
    std::os::unix::fs::symlink(&target, &path).unwrap();

    let node = meshwork_node::start(cfg()).await.unwrap();
    let first = Credentials::read(&path).unwrap();
    assert_eq!(first, node.api_credentials());
    let md = std::fs::symlink_metadata(&path).unwrap();
    assert!(
        md.file_type().is_file(),
        "the link was replaced, not followed"
    );
    assert_eq!(md.permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::read(&target).unwrap(), b"untouched");
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        format!("__cookie__:{}", first.secret())
    );
    assert_eq!(first.secret().to_string().len(), 64);
    // The file's secret is what the API takes, as a bearer token too.
    let (code, _) = call(
        &node,
        "GET",
        "/api/v1/status",
        Auth::Bearer(first.secret().to_string()),
        &[],
        None,
    )
    .await;
    assert_eq!(code, 200);
    node.shutdown().await;
    assert!(!path.exists(), "a clean stop removes the cookie");

    let node = meshwork_node::start(cfg()).await.unwrap();
    let second = Credentials::read(&path).unwrap();
    assert_ne!(first, second, "a new cookie at each start");
    let (code, _) = call(
        &node,
        "GET",
        "/api/v1/status",
        Auth::Basic(&first),
        &[],
        None,
    )
    .await;
    assert_eq!(code, 401, "the old cookie is refused");
    node.shutdown().await;
    assert!(!path.exists());
}

/// A long-lived API token (`[api] token_hashes`, `meshwork node token`): the node keeps only
/// its BLAKE3 hash and accepts the token as Bearer besides the cookie; another token, or the
/// token at a node that does not list its hash, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_api_token_is_accepted_as_bearer_and_only_its_own() {
    let (token, hash) = meshwork_http::auth::new_token();
    assert_eq!(hash, meshwork_http::auth::token_hash(&token));
    let (other, _) = meshwork_http::auth::new_token();
    let mut cfg = config("test-api-token");
    cfg.api_token_hashes = vec![meshwork_http::auth::parse_token_hash(&hash).unwrap()];
    let node = meshwork_node::start(cfg).await.unwrap();
    let plain = meshwork_node::start(config("test-api-token"))
        .await
        .unwrap();

    let (code, _) = call(
        &node,
        "GET",
        "/api/v1/status",
        Auth::Bearer(token.clone()),
        &[],
        None,
    )
    .await;
    assert_eq!(code, 200, "the configured token");
    let creds = Credentials::token(&token).unwrap();
    let (code, _) = call(
        &node,
        "GET",
        "/api/v1/status",
        Auth::Basic(&creds),
        &[],
        None,
    )
    .await;
    assert_eq!(code, 200, "the token's credentials send it as Bearer");
    let (code, _) = call(
        &node,
        "GET",
        "/api/v1/status",
        Auth::Bearer(other),
        &[],
        None,
    )
    .await;
    assert_eq!(code, 401, "a token whose hash is not configured");
    let (code, _) = call(
        &node,
        "GET",
        "/api/v1/status",
        Auth::Bearer(hash.clone()),
        &[],
        None,
    )
    .await;
    assert_eq!(code, 401, "the hash itself is not a token");
    let (code, _) = call(
        &plain,
        "GET",
        "/api/v1/status",
        Auth::Bearer(token),
        &[],
        None,
    )
    .await;
    assert_eq!(code, 401, "a node that does not list the hash");
    // The cookie still works beside the token.
    let cookie = node.api_credentials();
    let (code, _) = call(
        &node,
        "GET",
        "/api/v1/status",
        Auth::Basic(&cookie),
        &[],
        None,
    )
    .await;
    assert_eq!(code, 200, "the cookie beside the token");
    node.shutdown().await;
    plain.shutdown().await;
}
