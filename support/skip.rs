//! The workspace's one convention for a test that cannot run here (it needs root, network
//! namespaces, a tmpfs, `/proc`, a high file limit): it skips *visibly*, and where the
//! environment says every test must run, it fails instead of skipping.
//!
//! Included by path (`#[path = ".../support/skip.rs"] mod skip;`) into every test binary
//! that can skip, so that no library carries test support.
//!
//! - A skip writes one line, `SKIPPED: <test>: <why>`, straight to the process's stderr. It
//!   bypasses the test harness's output capture (which only takes `print!`/`eprint!`), so the
//!   line shows in `cargo test`'s output although the test passes; `.ci/run` counts these
//!   lines and prints `skipped: N tests (reasons)`.
//! - With `MESHWORK_NO_SKIP=1` (`.ci/run` sets it when it runs as root, where every
//!   capability is expected), a missing capability is a failure: [`skip`] panics.

/// The environment variable that turns skips into failures.
pub const NO_SKIP_ENV: &str = "MESHWORK_NO_SKIP";

/// The marker `.ci/run` counts.
pub const MARKER: &str = "SKIPPED:";

/// Records that the calling test cannot run here because of `why`; the test then returns
/// early. Panics instead when `MESHWORK_NO_SKIP=1`.
#[track_caller]
pub fn skip(why: &str) {
    // libtest names each test's thread after the test (tokio's test macro runs the body on
    // that thread too).
    let test = std::thread::current()
        .name()
        .unwrap_or("unnamed test")
        .to_string();
    if std::env::var(NO_SKIP_ENV).is_ok_and(|v| v == "1") {
        panic!("{test} cannot run here, and {NO_SKIP_ENV}=1 requires every test to run: {why}");
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{MARKER} {test}: {why}");
}
