//! Helpers of the black-box tests that start the built binary as long-running processes
//! (`cli`, `slow_clients`, `tracker_answer`).

#![allow(dead_code)] // each test binary uses its own part

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

/// `node start` on loopback with an ephemeral port and API port.
pub const NODE_START: [&str; 6] = [
    "node",
    "start",
    "--listen",
    "/ip4/127.0.0.1/tcp/0",
    "--api",
    "127.0.0.1:0",
];

/// Runs `cmd` (an `init` or another short command) and fails with its stderr unless it
/// succeeds; its stdout.
pub fn run_ok(mut cmd: Command) -> Result<String> {
    let o = cmd.output()?;
    ensure!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// The built binary on data dir `dir`, with `RUST_LOG=warn` and no `MESHWORK_HOME`.
pub fn meshwork(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_meshwork"));
    c.arg("--data-dir")
        .arg(dir)
        .env_remove("MESHWORK_HOME")
        .env_remove("MESHWORK_API_COOKIE")
        .env("RUST_LOG", "warn");
    c
}

/// Runs the binary in `dir` with `args` to completion.
pub fn run(dir: &Path, args: &[&str]) -> Result<std::process::Output> {
    Ok(meshwork(dir).args(args).output()?)
}

pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

/// Runs the binary in `dir` with `args` and returns its stdout (trimmed), failing with its
/// stderr unless it succeeded.
pub fn ok(dir: &Path, args: &[&str]) -> Result<String> {
    let o = run(dir, args)?;
    ensure!(o.status.success(), "{args:?} failed: {}", stderr(&o));
    Ok(stdout(&o))
}

/// Any long-running command run in `dir` with `args`, once it printed `ready` (its stderr, at
/// `RUST_LOG=info`, in `<dir>/proc.log`).
pub fn spawn(dir: &Path, args: &[&str], ready: &str) -> Result<Proc> {
    std::fs::create_dir_all(dir)?;
    let mut c = meshwork(dir);
    c.args(args).env("RUST_LOG", "info");
    Proc::start(c, &dir.join("proc.log"), ready)
}

/// A minimal HTTP/1.0 GET of `path` at `addr`: the whole answer, head and body. With `cookie`
/// (the API cookie file's `user:secret`), the secret is sent as a bearer token.
pub fn http_get(addr: &str, path: &str, cookie: Option<&str>) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let auth = match cookie.and_then(|c| c.trim().split_once(':')) {
        Some((_, secret)) => format!("Authorization: Bearer {secret}\r\n"),
        None => String::new(),
    };
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}\r\n")?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    Ok(answer)
}

/// A child whose stdout lines are read on a thread (stderr goes to a log file); killed when
/// dropped, so that a failing test leaves no process behind.
pub struct Proc {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl Proc {
    /// Spawns `cmd` and waits (at most 60 s) for a stdout line containing `ready`.
    pub fn start(mut cmd: Command, log: &Path, ready: &str) -> Result<Self> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log)?)
            .spawn()?;
        let out = child.stdout.take().context("stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut p = Self {
            child,
            lines,
            seen: vec![],
        };
        p.wait_line(ready, Duration::from_secs(60))?;
        Ok(p)
    }

    /// Waits for a stdout line containing `needle` (failing early if the process exits).
    pub fn wait_line(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(l) = self.lines.recv_timeout(Duration::from_millis(100)) {
                let hit = l.contains(needle);
                self.seen.push(l);
                if hit {
                    return Ok(());
                }
            }
            if let Some(st) = self.child.try_wait()? {
                bail!("exited ({st}) before {needle:?}: {:?}", self.seen);
            }
        }
        bail!("no line with {needle:?}; saw {:?}", self.seen)
    }

    /// The address of the first `listening` line.
    pub fn listen_addr(&self) -> Result<String> {
        self.seen
            .iter()
            .find_map(|l| l.strip_prefix("listening").map(|a| a.trim().to_owned()))
            .context("no listening line")
    }

    /// SIGTERM, then the exit status (killed after 30 s).
    pub fn terminate(mut self) -> Result<std::process::ExitStatus> {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        let rc = unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        ensure!(rc == 0, "kill failed");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("the process did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The `host:port` of the first `http://` URL on a line starting with `prefix`.
    pub fn url_addr(&self, prefix: &str) -> Result<SocketAddr> {
        let line = self
            .seen
            .iter()
            .find(|l| l.starts_with(prefix))
            .with_context(|| format!("no {prefix:?} line in {:?}", self.seen))?;
        let rest = line.split("http://").nth(1).context("no URL on the line")?;
        Ok(rest.split('/').next().context("no host")?.parse()?)
    }

    /// The process's resident memory (`VmRSS`), in bytes.
    pub fn rss(&self) -> Result<u64> {
        let pid = self.child.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .context("no VmRSS")?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()?;
        Ok(kb * 1024)
    }
}

/// A test that fails part-way must not leave processes behind.
impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
