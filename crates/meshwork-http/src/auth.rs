//! API authentication: bitcoind's cookie scheme, and the `Host`/`Origin` check that keeps web
//! pages out (DNS rebinding, cross-site requests).
//!
//! The cookie: at each start a service makes a fresh secret (32 bytes from the OS RNG, in hex)
//! and writes `__cookie__:HEX` to `<data-dir>/api.cookie` (bitcoind's `.cookie` format), mode
//! 0600 from creation: a temporary file created with `O_EXCL | O_NOFOLLOW`, fsynced, renamed
//! over the name (a rename replaces a planted symlink instead of following it). Whoever can read
//! that file is the service's user, or was let in by them; everyone else gets 401. A clean stop
//! removes the file. A service without a data directory keeps its cookie in memory only
//! ([`Cookie::generate`]) and hands it out in process.
//!
//! A request is accepted with `Authorization: Basic base64(__cookie__:HEX)` (RFC 7617) or
//! `Authorization: Bearer HEX` (RFC 6750, what Prometheus sends with `bearer_token_file`).
//! The secret is compared in constant time (`subtle`).
//!
//! The `Host` check ([`check_host`]) runs before authentication: a request whose `Host` is
//! not one of the API's own names is refused with 421 Misdirected Request (RFC 9110 §15.5.20),
//! and one with an `Origin` that is not one of its own origins, or with
//! `Sec-Fetch-Site: cross-site`, with 403. The API's own names are the connection's local
//! address `IP:PORT` (`[IP]:PORT` for IPv6), `localhost:PORT`, `127.0.0.1:PORT` and
//! `[::1]:PORT` when bound to loopback, and the configured ones. A page that rebinds its own
//! name to 127.0.0.1 still sends its own name as the `Host`, so it never reaches a handler.
//! No CORS headers are ever sent, so browsers keep every cross-origin answer from the page.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use base64::Engine as _;
use subtle::ConstantTimeEq;

/// The cookie's file name in a data directory.
pub const COOKIE_FILE: &str = "api.cookie";
/// The user name of the cookie's `user:password` pair (bitcoind's).
pub const COOKIE_USER: &str = "__cookie__";
/// The realm of the `WWW-Authenticate` challenge.
pub const REALM: &str = "meshwork";
/// A cookie file longer than this is not one (the real one is 75 bytes).
const MAX_COOKIE_FILE: u64 = 4096;
/// Bytes of secret.
const SECRET_BYTES: usize = 32;

/// Errors of writing, reading and removing a cookie file. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum CookieError {
    #[error("cannot write the API cookie {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the API cookie {path}: permission denied; run as the node's user or pass --api-cookie")]
    PermissionDenied { path: PathBuf },
    #[error("cannot read the API cookie {path}: no such file; is the service running with this data directory? (or pass --api-cookie)")]
    Missing { path: PathBuf },
    #[error("cannot read the API cookie {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the API cookie {path} is not a cookie: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("cannot remove the API cookie {path}: {source}")]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A service's secret, and the file that holds it (if it was written to one).
///
/// Invariant: `secret` is 64 lowercase hex digits; the file, while present and ours, holds
/// exactly `__cookie__:<secret>`.
#[derive(Clone)]
pub struct Cookie {
    secret: String,
    path: Option<PathBuf>,
}

impl std::fmt::Debug for Cookie {
    // The secret stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cookie")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Cookie {
    /// A fresh secret held in memory only (a service without a data directory).
    pub fn generate() -> Cookie {
        use rand::RngCore;
        let mut bytes = [0u8; SECRET_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Cookie {
            secret: hex::encode(bytes),
            path: None,
        }
    }

    /// A fresh secret written to `<dir>/api.cookie` (replacing any file there, and never
    /// following a symlink planted at that name).
    ///
    /// Errors: [`CookieError::Write`] when `dir` does not exist or cannot be written.
    pub fn write(dir: &Path) -> Result<Cookie, CookieError> {
        let mut c = Cookie::generate();
        let path = dir.join(COOKIE_FILE);
        let err = |source| CookieError::Write {
            path: path.clone(),
            source,
        };
        // A name of its own randomness: nothing of the secret shows in a directory listing.
        let tmp = dir.join(format!(
            ".{COOKIE_FILE}.{}.{:016x}.tmp",
            std::process::id(),
            rand::random::<u64>()
        ));
        let written = (|| {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true) // O_EXCL: never an existing file, nor a symlink's target
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)?;
            f.write_all(format!("{COOKIE_USER}:{}", c.secret).as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            // The rename itself durable, as far as the directory allows.
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
            Ok(())
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(err(e));
        }
        c.path = Some(path);
        Ok(c)
    }

    /// The file holding the cookie, if it was written to one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The credentials a client sends.
    pub fn credentials(&self) -> Credentials {
        Credentials {
            user: COOKIE_USER.into(),
            password: self.secret.clone(),
            bearer: false,
        }
    }

    /// Removes the cookie file (at a clean stop), if it still holds this cookie: a file that
    /// another start of the service has written since is left alone. A missing file is fine.
    pub fn remove(&self) -> Result<(), CookieError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        match Credentials::read(path) {
            Ok(c) if c.password.as_bytes().ct_eq(self.secret.as_bytes()).into() => {}
            _ => return Ok(()),
        }
        match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(CookieError::Remove {
                path: path.clone(),
                source,
            }),
        }
    }
}

/// What a client sends: a `user:password` pair, as HTTP basic authentication (RFC 7617).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    user: String,
    password: String,
    /// An API token goes as `Authorization: Bearer TOKEN` (RFC 6750); a cookie as Basic.
    bearer: bool,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Parses a cookie file's text, `user:password` (surrounding whitespace ignored).
    pub fn parse(text: &str) -> Result<Credentials, String> {
        let text = text.trim();
        let (user, password) = text
            .split_once(':')
            .ok_or_else(|| "expected user:secret".to_string())?;
        if user.is_empty() || password.is_empty() {
            return Err("expected user:secret, both non-empty".into());
        }
        if text.chars().any(|c| c.is_control()) {
            return Err("it holds control characters".into());
        }
        Ok(Credentials {
            user: user.into(),
            password: password.into(),
            bearer: false,
        })
    }

    /// An API token (see [`new_token`]), sent as `Authorization: Bearer TOKEN`. Errors: an
    /// empty token or one with characters a header cannot carry.
    pub fn token(token: &str) -> Result<Credentials, String> {
        let token = token.trim();
        if token.is_empty() || !token.chars().all(|c| c.is_ascii_graphic()) {
            return Err("an API token is printable ASCII without spaces".into());
        }
        Ok(Credentials {
            user: TOKEN_USER.into(),
            password: token.into(),
            bearer: true,
        })
    }

    /// Reads a cookie file (`--api-cookie FILE` or `<data-dir>/api.cookie`).
    ///
    /// Errors name the file and what to do: [`CookieError::Missing`],
    /// [`CookieError::PermissionDenied`], [`CookieError::Malformed`], [`CookieError::Read`].
    pub fn read(path: &Path) -> Result<Credentials, CookieError> {
        let f = std::fs::File::open(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => CookieError::Missing {
                path: path.to_owned(),
            },
            std::io::ErrorKind::PermissionDenied => CookieError::PermissionDenied {
                path: path.to_owned(),
            },
            _ => CookieError::Read {
                path: path.to_owned(),
                source,
            },
        })?;
        let mut text = String::new();
        f.take(MAX_COOKIE_FILE + 1)
            .read_to_string(&mut text)
            .map_err(|source| CookieError::Read {
                path: path.to_owned(),
                source,
            })?;
        let malformed = |reason: String| CookieError::Malformed {
            path: path.to_owned(),
            reason,
        };
        if text.len() as u64 > MAX_COOKIE_FILE {
            return Err(malformed(format!("longer than {MAX_COOKIE_FILE} bytes")));
        }
        Credentials::parse(&text).map_err(malformed)
    }

    /// Whether these are an API token's (sent as Bearer) rather than a cookie's.
    pub fn is_token(&self) -> bool {
        self.bearer
    }

    /// The secret (the password of the pair): what `Authorization: Bearer` carries, and what
    /// a Prometheus `bearer_token_file` holds.
    pub fn secret(&self) -> &str {
        &self.password
    }

    /// The `Authorization` header value: `Basic ...` for a cookie, `Bearer ...` for a token.
    pub fn header_value(&self) -> HeaderValue {
        let text = if self.bearer {
            format!("Bearer {}", self.password)
        } else {
            let b64 = base64::engine::general_purpose::STANDARD
                .encode(format!("{}:{}", self.user, self.password));
            format!("Basic {b64}")
        };
        // Both are checked to be visible ASCII (a token by `token`, base64 by construction).
        let mut v = HeaderValue::from_str(&text).expect("visible ASCII is a valid header value");
        v.set_sensitive(true);
        v
    }

    /// Headers to give a `reqwest::ClientBuilder::default_headers`, so that every request of
    /// that client carries the credentials.
    pub fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, self.header_value());
        h
    }

    /// Adds the credentials to one request.
    pub fn apply(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        req.header(header::AUTHORIZATION, self.header_value())
    }
}

/// The socket's own address, a request extension that [`crate::serve::serve`] inserts and
/// [`check_host`] reads.
pub use crate::serve::LocalAddr;

/// The guard of an API: the secret it requires and the names it answers to. Cheap to clone.
#[derive(Clone)]
pub struct Guard {
    inner: Arc<GuardInner>,
}

#[derive(Clone)]
struct GuardInner {
    secret: String,
    /// BLAKE3 hashes of the long-lived API tokens also accepted (`[api] token_hashes`).
    token_hashes: Vec<[u8; 32]>,
    /// Where the cookie is, for the 401's sentence.
    cookie_path: Option<PathBuf>,
    /// The address the service was bound to: stands in for the connection's local address
    /// when no [`LocalAddr`] came with the request.
    bound: SocketAddr,
    /// Configured names (`[api] hosts`), lowercase: `NAME` (any port of the socket) or
    /// `NAME:PORT`.
    hosts: Vec<String>,
}

/// Most configured host names (`[api] hosts`).
pub const MAX_HOSTS: usize = 64;

/// Most configured API tokens (`[api] token_hashes`).
pub const MAX_TOKENS: usize = 64;

/// The user name a token's [`Credentials`] carry (tokens go as Bearer; the name is for logs).
pub const TOKEN_USER: &str = "__token__";

/// A new API token and its hash: `(token, hash)`, the token 32 bytes from the OS RNG in hex,
/// the hash its BLAKE3 in hex. The hash goes in the service's config (`[api] token_hashes`), the
/// token to the client. A fast hash is enough because a token is 256 random bits, not a
/// password a person chose: no guess can be tried against the hash faster than against the
/// API. (bitcoind's `rpcauth` keeps a salted HMAC-SHA256 for the same reason.)
pub fn new_token() -> (String, String) {
    use rand::RngCore;
    let mut bytes = [0u8; SECRET_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let token = hex::encode(bytes);
    let hash = token_hash(&token);
    (token, hash)
}

/// The BLAKE3 hash, in hex, of an API token: what `[api] token_hashes` holds.
pub fn token_hash(token: &str) -> String {
    blake3::hash(token.trim().as_bytes()).to_hex().to_string()
}

/// Parses one `[api] token_hashes` entry: 64 hex digits. Errors say what was wrong.
pub fn parse_token_hash(text: &str) -> Result<[u8; 32], String> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut out)
        .map_err(|e| format!("{text:?} is not a token hash (64 hexadecimal digits): {e}"))?;
    Ok(out)
}

impl Guard {
    /// A guard that requires `cookie`, for a service bound to `bound`.
    pub fn new(cookie: &Cookie, bound: SocketAddr) -> Guard {
        Guard {
            inner: Arc::new(GuardInner {
                secret: cookie.secret.clone(),
                token_hashes: vec![],
                cookie_path: cookie.path.clone(),
                bound,
                hosts: vec![],
            }),
        }
    }

    /// Adds names the API also answers to (`[api] hosts`, as `NAME` or `NAME:PORT`), at most
    /// [`MAX_HOSTS`] (the rest are ignored, with a warning).
    pub fn with_hosts(self, hosts: &[String]) -> Guard {
        if hosts.len() > MAX_HOSTS {
            tracing::warn!(
                "only the first {MAX_HOSTS} of {} API host names are used",
                hosts.len()
            );
        }
        let inner = GuardInner {
            hosts: hosts
                .iter()
                .take(MAX_HOSTS)
                .map(|h| h.trim().to_ascii_lowercase())
                .filter(|h| !h.is_empty())
                .collect(),
            ..(*self.inner).clone()
        };
        Guard {
            inner: Arc::new(inner),
        }
    }

    /// Also accepts the API tokens whose BLAKE3 hashes are `hashes` (`[api] token_hashes`), as
    /// `Authorization: Bearer TOKEN`: for clients that cannot read the cookie file (another
    /// machine, a container, a monitoring system). At most [`MAX_TOKENS`] are used.
    pub fn with_token_hashes(self, hashes: &[[u8; 32]]) -> Guard {
        let inner = GuardInner {
            token_hashes: hashes.iter().take(MAX_TOKENS).copied().collect(),
            ..(*self.inner).clone()
        };
        Guard {
            inner: Arc::new(inner),
        }
    }

    /// `router` with both checks on every route (and on its fallback): the `Host`/`Origin`
    /// check first, then the cookie.
    pub fn protect<S: Clone + Send + Sync + 'static>(&self, router: Router<S>) -> Router<S> {
        // The last layer added runs first.
        router
            .layer(axum::middleware::from_fn_with_state(
                self.clone(),
                require_auth,
            ))
            .layer(axum::middleware::from_fn_with_state(
                self.clone(),
                check_host,
            ))
    }

    /// Whether `headers` carry this guard's secret (Basic with [`COOKIE_USER`], or Bearer).
    pub fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(v) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        else {
            return false;
        };
        let v = v.trim();
        let (scheme, rest) = v.split_once(' ').unwrap_or((v, ""));
        let rest = rest.trim();
        let given: Vec<u8> = if scheme.eq_ignore_ascii_case("bearer") {
            if self.token_matches(rest) {
                return true;
            }
            rest.as_bytes().to_vec()
        } else if scheme.eq_ignore_ascii_case("basic") {
            let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(rest) else {
                return false;
            };
            let Some(colon) = decoded.iter().position(|b| *b == b':') else {
                return false;
            };
            if &decoded[..colon] != COOKIE_USER.as_bytes() {
                return false;
            }
            decoded[colon + 1..].to_vec()
        } else {
            return false;
        };
        // Constant time in the secret's content (a length mismatch answers at once; the
        // length is public).
        given.ct_eq(self.inner.secret.as_bytes()).into()
    }

    /// Whether `host` (a `Host` header's value) names this API, reached on `local`.
    /// Whether `token` hashes to one of the configured token hashes. Every hash is compared,
    /// each in constant time, so the answer's timing says nothing of which one (or how much)
    /// matched.
    fn token_matches(&self, token: &str) -> bool {
        if self.inner.token_hashes.is_empty() {
            return false;
        }
        let h = blake3::hash(token.as_bytes());
        let mut hit = subtle::Choice::from(0);
        for t in &self.inner.token_hashes {
            hit |= h.as_bytes().ct_eq(t);
        }
        hit.into()
    }

    fn host_allowed(&self, host: &str, local: SocketAddr) -> bool {
        let host = host.trim().to_ascii_lowercase();
        // `Host` without a port means the scheme's default, 80 for http.
        let (name, given_port) = split_host_port(&host);
        let given_port = given_port.unwrap_or(80);
        // A configured `NAME` is answered on any port (a reverse proxy on 80 or 443 passes
        // its own), `NAME:PORT` on that port only.
        if self.inner.hosts.iter().any(|h| {
            let (n, p) = split_host_port(h);
            n == name && p.is_none_or(|p| p == given_port)
        }) {
            return true;
        }
        // The socket's own address and localhost: on the socket's port only.
        if given_port != local.port() {
            return false;
        }
        let ip_name = |ip: IpAddr| match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        };
        if name == ip_name(local.ip()) || name == "localhost" {
            return true;
        }
        local.ip().is_loopback() && (name == "127.0.0.1" || name == "[::1]")
    }

    /// The 401 answer: `WWW-Authenticate: Basic realm="meshwork"` and a JSON body that says
    /// where the cookie is.
    pub fn refusal(&self) -> Response {
        let where_ = match &self.inner.cookie_path {
            Some(p) => format!(
                "the secret is in {} (pass that file with --api-cookie, or run as its owner)",
                p.display()
            ),
            None => "the secret is held by the process that started this service".into(),
        };
        let body = serde_json::json!({
            "error": format!(
                "this API needs its cookie: send Authorization: Basic base64({COOKIE_USER}:SECRET) \
                 or Authorization: Bearer SECRET; {where_}"
            )
        });
        (
            StatusCode::UNAUTHORIZED,
            [(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"meshwork\""),
            )],
            axum::Json(body),
        )
            .into_response()
    }
}

/// Splits `name[:port]` (a bracketed IPv6 name keeps its brackets). A port that is not a
/// number yields `(name, None)` with the whole text as the name, which then matches nothing.
fn split_host_port(s: &str) -> (&str, Option<u16>) {
    let colon = if s.starts_with('[') {
        s.find(']').and_then(|i| s[i..].find(':').map(|j| i + j))
    } else {
        s.rfind(':')
    };
    match colon {
        Some(i) => match s[i + 1..].parse::<u16>() {
            Ok(p) => (&s[..i], Some(p)),
            Err(_) => (s, None),
        },
        None => (s, None),
    }
}

fn local_addr(g: &Guard, req: &Request) -> SocketAddr {
    if let Some(LocalAddr(a)) = req.extensions().get::<LocalAddr>() {
        return *a;
    }
    g.inner.bound
}

fn refuse(code: StatusCode, why: String) -> Response {
    (code, axum::Json(serde_json::json!({ "error": why }))).into_response()
}

/// Middleware: 421 for a foreign `Host`, 403 for a foreign `Origin` or a cross-site fetch.
/// Use with `axum::middleware::from_fn_with_state(guard, check_host)`, or [`Guard::protect`].
pub async fn check_host(State(g): State<Guard>, req: Request, next: Next) -> Response {
    let local = local_addr(&g, &req);
    let h = req.headers();
    // HTTP/2 carries the authority in the URI instead of a Host header.
    let host = h
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    let Some(host) = host else {
        return refuse(
            StatusCode::MISDIRECTED_REQUEST,
            "a request to this API must name it in its Host header".into(),
        );
    };
    if !g.host_allowed(&host, local) {
        return refuse(
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "this API does not answer to the host {:?}; use http://{local} or add the name to [api] hosts",
                host.chars().take(100).collect::<String>()
            ),
        );
    }
    if let Some(origin) = h.get(header::ORIGIN) {
        let ok = origin
            .to_str()
            .ok()
            .and_then(|o| o.strip_prefix("http://"))
            .is_some_and(|o| !o.contains('/') && g.host_allowed(o, local));
        if !ok {
            return refuse(
                StatusCode::FORBIDDEN,
                "requests from web pages of other origins are refused".into(),
            );
        }
    }
    if h.get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("cross-site"))
    {
        return refuse(
            StatusCode::FORBIDDEN,
            "cross-site requests are refused".into(),
        );
    }
    next.run(req).await
}

/// Middleware: 401 with `WWW-Authenticate: Basic realm="meshwork"` and a JSON body saying
/// where the cookie is, unless the request carries the secret. Use with
/// `axum::middleware::from_fn_with_state(guard, require_auth)`, or [`Guard::protect`].
pub async fn require_auth(State(g): State<Guard>, req: Request, next: Next) -> Response {
    if g.authorized(req.headers()) {
        next.run(req).await
    } else {
        g.refusal()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> (Cookie, Guard) {
        let c = Cookie::generate();
        let g = Guard::new(&c, "127.0.0.1:8650".parse().unwrap());
        (c, g)
    }

    #[test]
    fn hosts() {
        let (_, g) = guard();
        let lo: SocketAddr = "127.0.0.1:8650".parse().unwrap();
        for ok in [
            "127.0.0.1:8650",
            "localhost:8650",
            "LOCALHOST:8650",
            "[::1]:8650",
        ] {
            assert!(g.host_allowed(ok, lo), "{ok}");
        }
        for bad in [
            "attacker.example",
            "attacker.example:8650",
            "127.0.0.1:8651",
            "127.0.0.1",
            "localhost",
            "127.0.0.1:8650:1",
            "",
        ] {
            assert!(!g.host_allowed(bad, lo), "{bad}");
        }
        let wide: SocketAddr = "192.0.2.7:8650".parse().unwrap();
        assert!(g.host_allowed("192.0.2.7:8650", wide));
        assert!(!g.host_allowed("127.0.0.1:8650", wide));
        let v6: SocketAddr = "[2001:db8::1]:8650".parse().unwrap();
        assert!(g.host_allowed("[2001:db8::1]:8650", v6));
        let g = g.with_hosts(&["node.lan".into(), "other.lan:9".into()]);
        // A configured name answers on any port (a reverse proxy's own: 80 when omitted, 443),
        // a configured name:port on that port only.
        for ok in ["node.lan:8650", "node.lan", "node.lan:443", "other.lan:9"] {
            assert!(g.host_allowed(ok, wide), "{ok}");
        }
        for bad in [
            "other.lan:8650",
            "other.lan",
            "node.lan.attacker:8650",
            "lan:8650",
        ] {
            assert!(!g.host_allowed(bad, wide), "{bad}");
        }
    }

    #[test]
    fn basic_and_bearer() {
        let (c, g) = guard();
        let mut h = HeaderMap::new();
        assert!(!g.authorized(&h));
        h.insert(header::AUTHORIZATION, c.credentials().header_value());
        assert!(g.authorized(&h));
        let bearer = format!("Bearer {}", c.secret);
        h.insert(header::AUTHORIZATION, bearer.parse().unwrap());
        assert!(g.authorized(&h));
        let other = Cookie::generate();
        h.insert(header::AUTHORIZATION, other.credentials().header_value());
        assert!(!g.authorized(&h));
        // The right secret under another user name is refused.
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("root:{}", c.secret));
        h.insert(
            header::AUTHORIZATION,
            format!("Basic {b64}").parse().unwrap(),
        );
        assert!(!g.authorized(&h));
        h.insert(header::AUTHORIZATION, "Basic !!!".parse().unwrap());
        assert!(!g.authorized(&h));
    }

    #[test]
    fn cookie_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = Cookie::write(dir.path()).unwrap();
        let path = dir.path().join(COOKIE_FILE);
        assert_eq!(Credentials::read(&path).unwrap(), a.credentials());
        // Another start replaced it: the first one's removal leaves the new one.
        let b = Cookie::write(dir.path()).unwrap();
        assert_ne!(a.credentials(), b.credentials());
        a.remove().unwrap();
        assert!(path.exists());
        b.remove().unwrap();
        assert!(!path.exists());
        assert!(matches!(
            Credentials::read(&path),
            Err(CookieError::Missing { .. })
        ));
        std::fs::write(&path, "no colon").unwrap();
        assert!(matches!(
            Credentials::read(&path),
            Err(CookieError::Malformed { .. })
        ));
        assert!(Cookie::write(&dir.path().join("absent")).is_err());
    }
}
