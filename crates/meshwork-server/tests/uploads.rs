//! Uploads to `meshwork server` (issue 14, case 8): only with the server's cookie, within a
//! per-upload cap and a quota on stored bytes, and a delete that frees the quota. Reads and
//! downloads stay open.

use anyhow::Result;
use meshwork_http::auth::{Credentials, COOKIE_FILE};
use meshwork_ledger::ChainSpec;
use meshwork_server::client;
use meshwork_server::server::{self, ServerConfig};

/// The content directory's files (the store's own and finished ones alike).
fn stored(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("content"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A 150 000-byte cap per upload, a 200 000-byte quota.
fn config(dir: &std::path::Path) -> ServerConfig {
    ServerConfig {
        piece_size: Some(16 << 10),
        max_upload_bytes: 150_000,
        quota_bytes: 200_000,
        ..ServerConfig::new(dir, ChainSpec::test("test-uploads"))
    }
}

async fn raw_upload(
    base: &str,
    creds: Option<&Credentials>,
    name: &str,
    body: Vec<u8>,
) -> Result<(u16, String)> {
    let mut req = reqwest::Client::new()
        .post(format!("{base}/api/v1/upload/{name}"))
        .body(body);
    if let Some(c) = creds {
        req = c.apply(req);
    }
    let r = req.send().await?;
    Ok((r.status().as_u16(), r.text().await?))
}

#[tokio::test]
async fn uploads_need_the_cookie_stay_in_quota_and_deletes_free_it() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("server");
    let srv = server::start("127.0.0.1:0".parse()?, config(&dir)).await?;
    let base = format!("http://{}", srv.addr);
    let creds = srv.api_credentials();

    // The cookie is in the data dir, mode 0600, and is what the server accepts.
    let cookie = dir.join(COOKIE_FILE);
    assert_eq!(Credentials::read(&cookie)?, creds);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&cookie)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "cookie mode {mode:o}");
    }

    // Without the cookie, or with another secret: 401 and nothing stored.
    let (code, body) = raw_upload(&base, None, "a.bin", vec![1; 1000]).await?;
    assert_eq!(code, 401, "{body}");
    let other = meshwork_http::auth::Cookie::generate().credentials();
    let (code, _) = raw_upload(&base, Some(&other), "a.bin", vec![1; 1000]).await?;
    assert_eq!(code, 401);
    assert!(stored(&dir).is_empty(), "{:?}", stored(&dir));
    let list: serde_json::Value = reqwest::get(format!("{base}/api/v1/content"))
        .await?
        .json()
        .await?;
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");

    // Above the per-upload cap: 413, nothing left.
    let (code, body) = raw_upload(&base, Some(&creds), "big.bin", vec![2; 150_001]).await?;
    assert_eq!(code, 413, "{body}");
    assert!(stored(&dir).is_empty(), "{:?}", stored(&dir));

    // Within both: stored, and downloads stay open (no cookie).
    let a = tmp.path().join("a.bin");
    std::fs::write(&a, vec![3u8; 120_000])?;
    let sa = client::upload(&base, &creds, &a).await?;
    let r = reqwest::get(format!("{base}/content/{}", sa.id)).await?;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await?.len(), 120_000);

    // 120 000 + 100 000 passes the 200 000 quota: 507 (told at once from the length, and
    // without one, as the bytes come), and nothing of it stays.
    let b = tmp.path().join("b.bin");
    std::fs::write(&b, vec![4u8; 100_000])?;
    let e = client::upload(&base, &creds, &b).await.unwrap_err();
    assert!(
        matches!(&e, client::ClientError::Status { status, .. } if status.as_u16() == 507),
        "{e}"
    );
    let chunked = reqwest::Body::wrap_stream(futures::stream::iter(
        (0..10).map(|_| Ok::<_, std::io::Error>(vec![5u8; 10_000])),
    ));
    let r = creds
        .apply(reqwest::Client::new().post(format!("{base}/api/v1/upload/c.bin")))
        .body(chunked)
        .send()
        .await?;
    assert_eq!(r.status(), 507, "{}", r.text().await?);
    assert_eq!(stored(&dir), vec![sa.id.to_string()]);

    // Delete: 401 without the cookie (still there), then 204, file and record gone, quota
    // free again.
    let url = format!("{base}/api/v1/content/{}", sa.id);
    let r = reqwest::Client::new().delete(&url).send().await?;
    assert_eq!(r.status(), 401);
    assert_eq!(stored(&dir), vec![sa.id.to_string()]);
    assert!(client::delete(&base, &creds, &sa.id.parse()?).await?);
    assert!(stored(&dir).is_empty(), "{:?}", stored(&dir));
    assert_eq!(reqwest::get(&url).await?.status(), 404);
    assert!(!client::delete(&base, &creds, &sa.id.parse()?).await?);
    let sb = client::upload(&base, &creds, &b).await?;
    assert_eq!(stored(&dir), vec![sb.id.to_string()]);

    // Durable: after a restart the deleted content stays deleted and the quota counts only
    // what is stored (another 100 000 fits, a third does not). The cookie is new.
    srv.stop().await;
    assert!(!cookie.exists(), "a clean stop removes the cookie");
    let srv = server::start("127.0.0.1:0".parse()?, config(&dir)).await?;
    let base = format!("http://{}", srv.addr);
    let creds2 = srv.api_credentials();
    assert_ne!(creds, creds2);
    let e = client::upload(&base, &creds, &a).await.unwrap_err();
    assert!(
        matches!(&e, client::ClientError::Status { status, .. } if status.as_u16() == 401),
        "the old cookie is refused: {e}"
    );
    assert_eq!(
        reqwest::get(format!("{base}/api/v1/content/{}", sa.id))
            .await?
            .status(),
        404
    );
    let c = tmp.path().join("c.bin");
    std::fs::write(&c, vec![6u8; 100_000])?;
    client::upload(&base, &creds2, &c).await?;
    let d = tmp.path().join("d.bin");
    std::fs::write(&d, vec![7u8; 10])?;
    let e = client::upload(&base, &creds2, &d).await.unwrap_err();
    assert!(
        matches!(&e, client::ClientError::Status { status, .. } if status.as_u16() == 507),
        "{e}"
    );
    srv.stop().await;
    Ok(())
}
