//! `meshwork lab run`, `lab report` and the client-server commands, from the built binary.

#[path = "../../../support/skip.rs"]
mod skip;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::Value;

fn meshwork() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_meshwork"));
    c.env_remove("MESHWORK_HOME")
        .env_remove("MESHWORK_SERVER")
        .env("RUST_LOG", "warn");
    c
}

fn ok(o: &Output) -> Result<String> {
    ensure!(
        o.status.success(),
        "exit {}: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// The plot is well-formed SVG; returns how many elements named `tag` it draws.
fn check_svg(path: &Path, tag: &str) -> Result<usize> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let doc = roxmltree::Document::parse(&text)
        .with_context(|| format!("{}: not well-formed XML", path.display()))?;
    ensure!(doc.root_element().tag_name().name() == "svg");
    Ok(doc.descendants().filter(|n| n.has_tag_name(tag)).count())
}

fn json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    Ok(serde_json::from_str(&text)?)
}

/// The report's line for `aspect`.
fn report_line(dir: &Path, aspect: &str) -> Result<String> {
    let report = ok(&meshwork().args(["lab", "report"]).arg(dir).output()?)?;
    report
        .lines()
        .find(|l| l.starts_with(&format!("| {aspect} |")))
        .map(str::to_owned)
        .with_context(|| format!("no {aspect} line in\n{report}"))
}

/// The in-process distribution scenario writes JSON, Markdown and a valid SVG; the report's
/// cost cell carries the numbers of that JSON.
#[test]
fn lab_report_reads_its_numbers_from_the_scenario_json() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("results");
    let o = meshwork()
        .args(["lab", "run", "distribution", "--runner", "inproc"])
        .args([
            "--ns",
            "1,3",
            "--file-mib",
            "2",
            "--upload-mbps",
            "80",
            "--out",
        ])
        .arg(&out)
        .output()?;
    let md = ok(&o)?;
    ensure!(md.contains("| 3 |"), "{md}");
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("distribution.json"))?)?;
    let rows = json["rows"].as_array().context("rows")?;
    ensure!(rows.len() == 2);
    for r in rows {
        let n = r["n"].as_u64().unwrap();
        ensure!(r["client_server"]["verified"].as_u64() == Some(n));
        ensure!(r["swarm"]["verified"].as_u64() == Some(n));
        // In process the caps are the services' own: they never let a transfer beat the
        // time its upload capacity allows.
        for ratio in ["cs_ratio", "swarm_ratio"] {
            let v = r[ratio].as_f64().context("a ratio")?;
            ensure!(v >= 1.0, "N={n}: {ratio} {v} is below the physical bound");
        }
    }
    ensure!(!md.contains("below the bound"), "{md}");
    ensure!(
        check_svg(&out.join("distribution.svg"), "polyline")? == 4,
        "two measured series and two bounds"
    );

    let report = ok(&meshwork().args(["lab", "report"]).arg(&out).output()?)?;
    let cost = report
        .lines()
        .find(|l| l.starts_with("| cost |"))
        .context("no cost line")?;
    let last = &rows[1];
    let want_cs = format!(
        "the server uploads {:.2} copies at N=3",
        last["cs_origin_copies"].as_f64().unwrap()
    );
    let want_p2p = format!(
        "the origin uploads {:.2} copies at N=3",
        last["swarm_origin_copies"].as_f64().unwrap()
    );
    ensure!(cost.contains(&want_cs), "{cost} lacks {want_cs}");
    ensure!(cost.contains(&want_p2p), "{cost} lacks {want_p2p}");
    ensure!(report.contains("distribution.svg"));

    // The report refuses what is not a result.
    let o = meshwork()
        .args(["lab", "report"])
        .arg(dir.path().join("missing"))
        .output()?;
    ensure!(!o.status.success());
    Ok(())
}

/// Namespaces, links, root routes and qdiscs of runners started by process `pid`, and processes whose
/// command line mentions `marker`.
fn leftovers(pid: u32, marker: &str) -> Vec<String> {
    let prefix = format!("mwl{:04x}", pid & 0xffff);
    let mut out = meshwork_lab::netns::leftovers(&prefix);
    let qdiscs = Command::new("tc")
        .args(["qdisc", "show"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.extend(
        qdiscs
            .lines()
            .filter(|l| l.contains(&prefix))
            .map(|l| format!("qdisc {l}")),
    );
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(marker) && !cmd.contains("lab run") {
                out.push(format!(
                    "process {}: {cmd}",
                    e.file_name().to_string_lossy()
                ));
            }
        }
    }
    out
}

#[test]
fn the_netns_runner_leaves_nothing_after_a_run_or_an_interrupt() -> Result<()> {
    if let Some(why) = meshwork_lab::netns::unavailable() {
        skip::skip(&why);
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let marker = dir.path().display().to_string();

    // A normal run.
    let out = dir.path().join("normal");
    let child = meshwork()
        .args(["lab", "run", "distribution", "--runner", "netns"])
        .args([
            "--ns",
            "2",
            "--file-mib",
            "2",
            "--upload-mbps",
            "50",
            "--out",
        ])
        .arg(&out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let o = child.wait_with_output()?;
    let md = ok(&o)?;
    ensure!(md.contains("| 2 |"), "{md}");
    let left = leftovers(pid, &marker);
    ensure!(left.is_empty(), "left after a normal run: {left:?}");

    // A long run, started to be stopped while its processes run.
    let long_run = |name: &str| -> Result<(std::process::Child, u32)> {
        let child = meshwork()
            .args(["lab", "run", "distribution", "--runner", "netns"])
            .args([
                "--ns",
                "4",
                "--file-mib",
                "64",
                "--upload-mbps",
                "5",
                "--out",
            ])
            .arg(dir.path().join(name))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(60);
        // Wait until the runner has hosts with processes in them.
        loop {
            let left = leftovers(pid, &marker);
            if left.iter().filter(|l| l.starts_with("process")).count() >= 3 {
                return Ok((child, pid));
            }
            ensure!(
                Instant::now() < deadline,
                "the runner never started: {left:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };

    // Interrupted (Ctrl-C): the runner cleans up after itself.
    let (mut child, pid) = long_run("interrupted")?;
    // SAFETY: kill(2) of our own child.
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let st = child.wait()?;
    ensure!(!st.success(), "an interrupted run must not report success");
    let left = leftovers(pid, &marker);
    ensure!(left.is_empty(), "left after an interrupt: {left:?}");

    // Killed (SIGKILL: no chance to clean up): `lab clean` removes what it left, processes
    // inside its namespaces included, and names the runner it cleaned up after.
    let (mut child, pid) = long_run("killed")?;
    // SAFETY: kill(2) of our own child.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    child.wait()?;
    let left = leftovers(pid, &marker);
    ensure!(
        left.iter().any(|l| l.starts_with("namespace")),
        "a SIGKILLed runner left no namespace, so this case tests nothing: {left:?}"
    );
    let o = meshwork().args(["lab", "clean"]).output()?;
    let said = ok(&o)?;
    let prefix = format!("mwl{:04x}", pid & 0xffff);
    ensure!(
        said.contains(&prefix),
        "`lab clean` did not name runner {prefix}: {said}"
    );
    let left = leftovers(pid, &marker);
    ensure!(left.is_empty(), "left after `lab clean`: {left:?}");
    Ok(())
}

/// `failure`, in process: client-server service stops when the server crashes; with half the
/// peers crashed, the swarm and the ledger go on. The report's failure cell is that run's.
#[test]
fn failure_the_server_is_a_single_point_and_half_the_peers_are_not() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("results");
    let o = meshwork()
        .args([
            "lab", "run", "failure", "--runner", "inproc", "--nodes", "6",
        ])
        .args(["--file-mib", "4", "--secs", "5", "--out"])
        .arg(&out)
        .output()?;
    ok(&o)?;
    let r = json(&out.join("failure.json"))?;
    let (cs, p2p) = (&r["client_server"], &r["peer_to_peer"]);
    let n = |v: &Value| v.as_u64().unwrap_or(u64::MAX);
    ensure!(
        n(&cs["before"]["all"]) > 0 && cs["before"]["ok"] == cs["before"]["all"],
        "{cs}"
    );
    ensure!(
        n(&cs["after"]["all"]) > 0 && n(&cs["after"]["ok"]) == 0,
        "{cs}"
    );
    ensure!(cs["kept_after_restart"] == cs["acknowledged"], "{cs}");
    ensure!(
        p2p["crashed_users"].as_array().map(Vec::len) == Some(3),
        "{p2p}"
    );
    ensure!(
        n(&p2p["after"]["ok"]) * 100 >= 95 * n(&p2p["after"]["all"]) && n(&p2p["after"]["all"]) > 0,
        "{p2p}"
    );
    ensure!(
        n(&p2p["accepted_after"]) > 0 && p2p["confirmed_after"] == p2p["accepted_after"],
        "{p2p}"
    );
    ensure!(n(&p2p["blocks_after"]) > 0, "{p2p}");
    ensure!(
        n(&p2p["downloads"]) > 0 && p2p["completed"] == p2p["downloads"],
        "{p2p}"
    );
    ensure!(check_svg(&out.join("failure.svg"), "rect")? >= 4);
    let line = report_line(&out, "failure risk")?;
    let want = format!(
        "{} of {} later transfers confirmed",
        p2p["confirmed_after"], p2p["accepted_after"]
    );
    ensure!(line.contains(&want), "{line} lacks {want}");
    Ok(())
}

/// `partition`: the swarm forks while apart, heals once the halves meet again, and loses no
/// transfer; client-server, the half without the server is refused.
fn partition_run(runner: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("results");
    let child = meshwork()
        .args(["lab", "run", "partition", "--runner", runner])
        .args(["--nodes", "6", "--secs", "10", "--out"])
        .arg(&out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let o = child.wait_with_output()?;
    ok(&o)?;
    if runner == "netns" {
        // The test bed's nodes, clients, server and blackhole routes are all gone.
        let left = leftovers(pid, &dir.path().display().to_string());
        ensure!(
            left.is_empty(),
            "left after the partition scenario: {left:?}"
        );
    }
    let r = json(&out.join("partition.json"))?;
    let (cs, p2p) = (&r["client_server"], &r["peer_to_peer"]);
    let n = |v: &Value| v.as_u64().unwrap_or(u64::MAX);
    let fork = &p2p["fork"];
    let split = n(&fork["split_height"]);
    ensure!(fork["appeared_secs"].is_f64(), "no fork appeared: {p2p}");
    ensure!(
        n(&fork["heights"][0]) > split && n(&fork["heights"][1]) > split,
        "both halves grew: {p2p}"
    );
    ensure!(p2p["heal_secs"].is_f64(), "never healed: {p2p}");
    ensure!(n(&p2p["accepted"]) > 0 && n(&p2p["lost"]) == 0, "{p2p}");
    for half in 0..2 {
        let d = &p2p["during"][half];
        ensure!(
            n(&d["all"]) > 0 && n(&d["ok"]) * 10 >= 9 * n(&d["all"]),
            "{p2p}"
        );
    }
    ensure!(cs["during"][0]["ok"] == cs["during"][0]["all"], "{cs}");
    ensure!(
        n(&cs["during"][1]["all"]) > 0 && n(&cs["during"][1]["ok"]) == 0,
        "{cs}"
    );
    ensure!(n(&cs["lost"]) == 0 && cs["fork"].is_null(), "{cs}");
    ensure!(check_svg(&out.join("partition.svg"), "rect")? >= 4);
    let line = report_line(&out, "under a partition")?;
    let want = format!("0 of {} accepted transfers lost", p2p["accepted"]);
    ensure!(line.contains(&want), "{line} lacks {want}");
    Ok(())
}

#[test]
fn partition_in_process_forks_heals_and_loses_nothing() -> Result<()> {
    partition_run("inproc")
}

#[test]
fn partition_in_namespaces_forks_heals_and_loses_nothing() -> Result<()> {
    if let Some(why) = meshwork_lab::netns::unavailable() {
        skip::skip(&why);
        return Ok(());
    }
    partition_run("netns")
}
