//! Reading an HTTP response with a size cap that fits its purpose.
//!
//! `reqwest::Response::bytes()`/`text()`/`json()` read whatever the peer sends: a tracker that
//! answers with 800 MiB of valid JSON takes the reader to gigabytes. [`read_capped`] checks the
//! declared `Content-Length` first (refusing before reading a byte), then streams the body
//! chunk by chunk and stops as soon as the total would pass the cap (a peer can lie about the
//! length, or send none). Dropping the response closes the connection, so the peer stops
//! sending too.

use bytes::Bytes;
use serde::de::DeserializeOwned;

/// The cap for an answer of a node's API or of `meshwork server`'s JSON calls: the largest
/// are lists (contents, the address book of up to a few thousand entries, a page of blocks),
/// a few MiB at most; 32 MiB leaves room and still bounds a rogue or confused server.
pub const API_ANSWER_MAX: usize = 32 << 20;

/// The cap for a short answer (a submission's id, an error sentence).
pub const SMALL_ANSWER_MAX: usize = 64 << 10;

/// Why a capped read failed.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The answer (declared or actually sent) exceeds the cap of `max` bytes.
    #[error("answer larger than {} KiB", max.div_ceil(1024))]
    TooLarge {
        /// The cap, in bytes.
        max: usize,
    },
    /// The transfer failed (connection reset, timeout, broken chunked encoding).
    #[error("reading the answer: {0}")]
    Read(#[from] reqwest::Error),
    /// The answer is not the JSON expected.
    #[error("the answer is not the JSON expected: {0}")]
    Json(#[from] serde_json::Error),
}

impl BodyError {
    /// Whether the answer was refused for its size.
    pub fn is_too_large(&self) -> bool {
        matches!(self, Self::TooLarge { .. })
    }
}

/// Reads `resp`'s body, at most `max` bytes (a body of exactly `max` bytes passes).
///
/// Errors: [`BodyError::TooLarge`] as soon as the declared `Content-Length` or the bytes
/// received pass `max` (nothing more is read); [`BodyError::Read`] if the transfer fails.
pub async fn read_capped(mut resp: reqwest::Response, max: usize) -> Result<Bytes, BodyError> {
    if let Some(len) = resp.content_length() {
        if len > max as u64 {
            return Err(BodyError::TooLarge { max });
        }
    }
    // Never pre-allocate on the peer's word beyond the cap; the declared length is a hint.
    let hint = resp.content_length().unwrap_or(0).min(max as u64) as usize;
    let mut out = Vec::with_capacity(hint.min(1 << 20));
    while let Some(chunk) = resp.chunk().await? {
        if chunk.len() > max - out.len() {
            return Err(BodyError::TooLarge { max });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(out))
}

/// [`read_capped`] and then JSON-decodes the body into `T`.
///
/// Errors: those of [`read_capped`], and [`BodyError::Json`] for a body that is not a `T`.
pub async fn read_json_capped<T: DeserializeOwned>(
    resp: reqwest::Response,
    max: usize,
) -> Result<T, BodyError> {
    let bytes = read_capped(resp, max).await?;
    Ok(serde_json::from_slice(&bytes)?)
}

/// [`read_capped`] as text (invalid UTF-8 replaced), for error messages and plain answers.
///
/// Errors: those of [`read_capped`].
pub async fn read_text_capped(resp: reqwest::Response, max: usize) -> Result<String, BodyError> {
    let bytes = read_capped(resp, max).await?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-shot HTTP server that answers every connection with `head` then `body`.
    async fn answer(head: String, body: Vec<u8>) -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let (head, body) = (head.clone(), body.clone());
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(head.as_bytes()).await;
                    let _ = s.write_all(&body).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        format!("http://{addr}/")
    }

    async fn get(url: &str) -> reqwest::Response {
        reqwest::get(url).await.unwrap()
    }

    fn with_length(n: usize) -> String {
        format!("HTTP/1.1 200 OK\r\ncontent-length: {n}\r\nconnection: close\r\n\r\n")
    }

    #[tokio::test]
    async fn the_exact_cap_passes_one_more_byte_fails() {
        let url = answer(with_length(1000), vec![b'x'; 1000]).await;
        assert_eq!(
            read_capped(get(&url).await, 1000).await.unwrap().len(),
            1000
        );
        let e = read_capped(get(&url).await, 999).await.unwrap_err();
        assert!(e.is_too_large(), "{e}");
        assert_eq!(e.to_string(), "answer larger than 1 KiB");
    }

    #[tokio::test]
    async fn a_lying_or_missing_length_is_caught_while_streaming() {
        // Declares 10 bytes, sends 5 000: reqwest stops at the declared length, so the read
        // must not return more than was declared (nor pass the cap).
        let url = answer(with_length(10), vec![b'y'; 5000]).await;
        match read_capped(get(&url).await, 100).await {
            Ok(b) => assert_eq!(b.len(), 10),
            Err(e) => assert!(!e.is_too_large(), "{e}"),
        }
        // No length at all (read to close), larger than the cap.
        let head = "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n".to_string();
        let url = answer(head.clone(), vec![b'z'; 5000]).await;
        assert!(read_capped(get(&url).await, 4999)
            .await
            .unwrap_err()
            .is_too_large());
        let url = answer(head, vec![b'z'; 5000]).await;
        assert_eq!(
            read_capped(get(&url).await, 5000).await.unwrap().len(),
            5000
        );
        // Chunked, larger than the cap.
        let chunked = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_string();
        let mut body = Vec::new();
        for _ in 0..10 {
            body.extend_from_slice(b"100\r\n");
            body.extend_from_slice(&[b'c'; 256]);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"0\r\n\r\n");
        let url = answer(chunked.clone(), body.clone()).await;
        assert!(read_capped(get(&url).await, 2559)
            .await
            .unwrap_err()
            .is_too_large());
        let url = answer(chunked, body).await;
        assert_eq!(
            read_capped(get(&url).await, 2560).await.unwrap().len(),
            2560
        );
    }

    #[tokio::test]
    async fn a_declared_length_over_the_cap_is_refused_before_reading() {
        // Declares 1 GiB and sends nothing: only the header can have refused it.
        let url = answer(with_length(1 << 30), vec![]).await;
        let e = read_capped(get(&url).await, 1 << 20).await.unwrap_err();
        assert!(e.is_too_large(), "{e}");
        let url = answer(with_length(7), b"{\"a\":1}".to_vec()).await;
        let v: serde_json::Value = read_json_capped(get(&url).await, 100).await.unwrap();
        assert_eq!(v["a"], 1);
        let url = answer(with_length(7), b"{\"a\":1}".to_vec()).await;
        assert!(matches!(
            read_json_capped::<Vec<u8>>(get(&url).await, 100).await,
            Err(BodyError::Json(_))
        ));
    }
}
