//! The client side of the content server: upload a file, download one with every piece
//! verified against the manifest the content id names.
//!
//! A download writes a partial file beside `out` named by the content and the final name
//! ([`part_path`]), never through a symbolic link, and holds an exclusive lock
//! on it while it writes. When it is cut short, the verified whole pieces stay there, and the
//! next download of the same content to the same name re-hashes them and asks for the
//! rest with a `Range` request. The file gets its final name only once every piece has
//! verified, and never over an existing file (a hard link, which fails if the name is taken,
//! then the partial name removed), so a file at `out` is always a verified copy and never
//! replaces one. Keyed by the content, two downloads of different contents to one name can
//! never share or truncate each other's partial file, and any name the file system takes fits
//! (no suffix is added to it).

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use meshwork_http::body::{
    read_capped, read_json_capped, read_text_capped, BodyError, API_ANSWER_MAX, SMALL_ANSWER_MAX,
};
use meshwork_swarm::manifest::MAX_MANIFEST_BYTES;
use meshwork_swarm::{ContentId, Digest, Manifest};

use crate::server::ContentSummary;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the server at {url}: {source}")]
    Http { url: String, source: reqwest::Error },
    #[error("{url}: {status}: {reason}")]
    Status {
        url: String,
        status: reqwest::StatusCode,
        reason: String,
    },
    #[error("the server's manifest does not match the content id: {0}")]
    Manifest(#[from] meshwork_swarm::manifest::ManifestError),
    #[error("piece {piece} failed verification: the server sent corrupt data (the {verified} bytes before it are kept)")]
    Corrupt { piece: usize, verified: u64 },
    #[error("the server's answer ended after {got} of {want} bytes")]
    Short { got: u64, want: u64 },
    #[error("{0} already exists")]
    Exists(PathBuf),
    /// The download completed, but its final name was taken meanwhile: the verified copy
    /// stays under its partial name.
    #[error("{0} already exists; the verified copy is kept at {1}")]
    ExistsKept(PathBuf, PathBuf),
    #[error("{0} is being written by another download of the same content")]
    Busy(PathBuf),
    #[error("{0} is a symbolic link: a download never writes through one")]
    Symlink(PathBuf),
    #[error("{0} is not this user's partial file ({1}): remove it to download again")]
    Foreign(PathBuf, String),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// The answer was over its cap, broken off or not the JSON expected.
    #[error("{url}: {source}")]
    Answer { url: String, source: BodyError },
}

fn answer(url: &str) -> impl FnOnce(BodyError) -> ClientError + '_ {
    move |source| ClientError::Answer {
        url: url.to_string(),
        source,
    }
}

fn http(url: &str) -> impl FnOnce(reqwest::Error) -> ClientError + '_ {
    move |source| ClientError::Http {
        url: url.to_string(),
        source,
    }
}

fn io(p: &Path) -> impl FnOnce(std::io::Error) -> ClientError + '_ {
    move |e| ClientError::Io(p.display().to_string(), e)
}

fn client(timeout: Option<Duration>) -> reqwest::Client {
    let mut b = reqwest::Client::builder().connect_timeout(Duration::from_secs(10));
    if let Some(t) = timeout {
        b = b.timeout(t);
    }
    b.build().expect("a default reqwest client builds")
}

async fn check(url: &str, r: reqwest::Response) -> Result<reqwest::Response, ClientError> {
    if r.status().is_success() {
        return Ok(r);
    }
    let status = r.status();
    let text = read_text_capped(r, SMALL_ANSWER_MAX)
        .await
        .unwrap_or_else(|e| format!("({e})"));
    let reason = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
        .unwrap_or(text);
    Err(ClientError::Status {
        url: url.to_string(),
        status,
        reason,
    })
}

/// Uploads `path` under its file name; the answer names the content id.
pub async fn upload(
    base: &str,
    creds: &meshwork_http::auth::Credentials,
    path: &Path,
) -> Result<ContentSummary, ClientError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "content".into());
    let file = tokio::fs::File::open(path).await.map_err(io(path))?;
    // The length lets the server cut the file as a node would (the same content id).
    let len = file.metadata().await.map_err(io(path))?.len();
    let url = format!("{base}/api/v1/upload/{}", urlencode(&name));
    let r = creds
        .apply(client(None).post(&url))
        .header(reqwest::header::CONTENT_LENGTH, len)
        .body(reqwest::Body::from(file))
        .send()
        .await
        .map_err(http(&url))?;
    let r = check(&url, r).await?;
    read_json_capped(r, API_ANSWER_MAX)
        .await
        .map_err(answer(&url))
}

/// Deletes a stored content (`DELETE /api/v1/content/{id}`, with the server's cookie):
/// `Ok(false)` when the server does not hold it.
///
/// Errors: the server unreachable ([`ClientError::Http`]), any other refusal (401 without
/// the right cookie, 503 with the store down) as [`ClientError::Status`].
pub async fn delete(
    base: &str,
    creds: &meshwork_http::auth::Credentials,
    id: &ContentId,
) -> Result<bool, ClientError> {
    let url = format!("{base}/api/v1/content/{id}");
    let r = creds
        .apply(client(Some(Duration::from_secs(30))).delete(&url))
        .send()
        .await
        .map_err(http(&url))?;
    if r.status() == reqwest::StatusCode::NOT_FOUND {
        return Ok(false);
    }
    check(&url, r).await?;
    Ok(true)
}

fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The manifest of `id`, checked against the id.
pub async fn manifest(base: &str, id: &ContentId) -> Result<Manifest, ClientError> {
    let url = format!("{base}/content/{id}/manifest");
    let r = client(Some(Duration::from_secs(30)))
        .get(&url)
        .send()
        .await
        .map_err(http(&url))?;
    let r = check(&url, r).await?;
    // Read no more than a manifest can be (the decoder checks the bound again).
    let bytes = read_capped(r, MAX_MANIFEST_BYTES)
        .await
        .map_err(answer(&url))?;
    Ok(Manifest::decode_verified(&bytes, id)?)
}

#[derive(Clone, Debug, Default)]
pub struct Downloaded {
    /// Bytes received in this download (a resumed one skips what it had).
    pub received: u64,
    /// Bytes already verified in the partial file when it started.
    pub resumed: u64,
    pub size: u64,
}

/// The partial file of a download of `id` to `out`, in `out`'s directory:
/// `.<16 hex digits of the id>-<16 of the hash of the id and out's name>.part`. Fixed in
/// length (any name fits beside it), its own for each content and each final name (several
/// downloads of one content into one directory do not meet), and the same again for the same
/// download (which resumes from it).
pub fn part_path(out: &Path, id: &ContentId) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    let mut h = blake3::Hasher::new();
    h.update(&id.0);
    h.update(out.file_name().map_or(&[][..], |n| n.as_bytes()));
    let key = h.finalize().to_hex();
    let id = id.to_string();
    out.with_file_name(format!(".{}-{}.part", &id[..16], &key.as_str()[..16]))
}

/// Opens `path` for the download: created if missing (mode 0600), never through a symbolic
/// link, only if it is this user's own and nobody else may write it (a partial file planted
/// by another local user would become the "verified" output, still theirs to change), and
/// locked (`flock`, exclusive) so that a second download of the same content waits its turn
/// rather than writing over the first.
fn open_part(path: &Path) -> Result<std::fs::File, ClientError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => ClientError::Symlink(path.to_owned()),
            _ => io(path)(e),
        })?;
    let meta = f.metadata().map_err(io(path))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(ClientError::Foreign(
            path.to_owned(),
            format!("owned by uid {}", meta.uid()),
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(ClientError::Foreign(
            path.to_owned(),
            format!("writable by others (mode {:o})", meta.mode() & 0o777),
        ));
    }
    // SAFETY: flock on a descriptor we own; it has no memory effects.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(ClientError::Busy(path.to_owned()));
    }
    Ok(f)
}

/// How many leading whole pieces of `f` verify against `m`.
fn verified_prefix(f: &mut std::fs::File, m: &Manifest) -> Result<usize, ClientError> {
    f.seek(SeekFrom::Start(0))
        .map_err(|e| ClientError::Io("the partial file".into(), e))?;
    let mut buf = vec![0u8; m.piece_size as usize];
    for i in 0..m.piece_count() {
        let len = m.piece_len(i) as usize;
        if f.read_exact(&mut buf[..len]).is_err() || Digest::of(&buf[..len]) != m.pieces[i] {
            return Ok(i);
        }
    }
    Ok(m.piece_count())
}

/// Downloads `id` to `out`, verifying every piece; resumes from its partial file.
/// `progress(bytes_verified)` is called after each piece.
pub async fn download(
    base: &str,
    id: &ContentId,
    out: &Path,
    mut progress: impl FnMut(u64, &Manifest),
) -> Result<Downloaded, ClientError> {
    if out.exists() {
        return Err(ClientError::Exists(out.to_path_buf()));
    }
    let m = manifest(base, id).await?;
    let part = part_path(out, id);
    let (m2, part2) = (m.clone(), part.clone());
    let (have, mut f) = tokio::task::spawn_blocking(move || {
        let mut f = open_part(&part2)?;
        Ok::<_, ClientError>((verified_prefix(&mut f, &m2)?, f))
    })
    .await
    .map_err(|e| ClientError::Io(part.display().to_string(), std::io::Error::other(e)))??;
    let start = m.piece_offset(have).min(m.size);
    // The partial file is this content's (named by its id) and locked: ours to cut back to
    // its verified prefix.
    f.set_len(start).map_err(io(&part))?;
    f.seek(SeekFrom::Start(start)).map_err(io(&part))?;
    let mut f = std::io::BufWriter::with_capacity(1 << 20, f);
    let mut stats = Downloaded {
        received: 0,
        resumed: start,
        size: m.size,
    };
    progress(start, &m);
    if start < m.size {
        let url = format!("{base}/content/{id}");
        let r = client(None)
            .get(&url)
            .header(reqwest::header::RANGE, format!("bytes={start}-"))
            .send()
            .await
            .map_err(http(&url))?;
        let mut r = check(&url, r).await?;
        if start > 0 && r.status() != reqwest::StatusCode::PARTIAL_CONTENT {
            return Err(ClientError::Status {
                url,
                status: r.status(),
                reason: "the server ignored the range request".into(),
            });
        }
        // Invariant: `piece` is the next piece to verify; `hasher` holds `in_piece` of its
        // bytes; every byte before it is written and verified.
        let mut piece = have;
        let mut hasher = blake3::Hasher::new();
        let mut in_piece = 0u32;
        while piece < m.piece_count() {
            let chunk = match r.chunk().await {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(source) => return Err(http(&url)(source)),
            };
            stats.received += chunk.len() as u64;
            let mut rest = &chunk[..];
            while !rest.is_empty() && piece < m.piece_count() {
                let want = m.piece_len(piece) - in_piece;
                let n = (want as usize).min(rest.len());
                hasher.update(&rest[..n]);
                f.write_all(&rest[..n]).map_err(io(&part))?;
                in_piece += n as u32;
                rest = &rest[n..];
                if in_piece == m.piece_len(piece) {
                    if Digest(*hasher.finalize().as_bytes()) != m.pieces[piece] {
                        let verified = m.piece_offset(piece);
                        // Keep only the verified prefix, so a retry resumes from it.
                        if let Ok(file) = f.into_inner() {
                            let _ = file.set_len(verified);
                        }
                        return Err(ClientError::Corrupt { piece, verified });
                    }
                    hasher.reset();
                    in_piece = 0;
                    piece += 1;
                    progress(m.piece_offset(piece).min(m.size), &m);
                }
            }
            if !rest.is_empty() {
                return Err(ClientError::Short {
                    got: m.size + rest.len() as u64,
                    want: m.size,
                });
            }
        }
        if piece < m.piece_count() {
            return Err(ClientError::Short {
                got: m.piece_offset(piece) + in_piece as u64,
                want: m.size,
            });
        }
    }
    let f = f
        .into_inner()
        .map_err(|e| ClientError::Io(part.display().to_string(), e.into_error()))?;
    f.sync_all().map_err(io(&part))?;
    // The final name, never over a file that is there (the lock is held until this is done).
    match std::fs::hard_link(&part, out) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(ClientError::ExistsKept(out.to_path_buf(), part))
        }
        Err(e) => return Err(io(out)(e)),
    }
    std::fs::remove_file(&part).map_err(io(&part))?;
    if let Some(dir) = out.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    drop(f);
    Ok(stats)
}

/// The longest wait of one long poll of [`follow`]; the server caps it at 30 s.
const FOLLOW_WAIT: Duration = Duration::from_secs(25);

/// Follows the server's transfer log: calls `each` with every entry after `after`, in order,
/// as soon as the server has it (long polls of `GET /api/v1/log`), until `each` returns
/// `false`. Returns the last sequence number seen, or the error that ended the subscription.
pub async fn follow(
    base: &str,
    mut after: u64,
    mut each: impl FnMut(crate::server::LogEntry) -> bool,
) -> Result<u64, ClientError> {
    let c = client(Some(FOLLOW_WAIT + Duration::from_secs(10)));
    loop {
        let url = format!(
            "{base}/api/v1/log?after={after}&wait_ms={}",
            FOLLOW_WAIT.as_millis()
        );
        let r = c.get(&url).send().await.map_err(http(&url))?;
        let page: crate::server::LogPage = read_json_capped(check(&url, r).await?, API_ANSWER_MAX)
            .await
            .map_err(answer(&url))?;
        for e in page.entries {
            after = after.max(e.seq);
            if !each(e) {
                return Ok(after);
            }
        }
    }
}
