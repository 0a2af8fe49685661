//! This process's resource use, read from `/proc` (Linux), for the lab's figures: memory per
//! node and idle CPU. Elsewhere the readings are `None`.

use std::time::{Duration, Instant};

/// Raises the limit on open files as far as allowed: a few hundred in-process nodes hold tens
/// of thousands of sockets (both ends of every connection live in this process), more than the
/// usual soft limit of 1024 or even a hard limit of 20 000. A privileged process raises the
/// hard limit too; any other takes the soft limit up to the hard one. Returns the soft limit
/// now in force.
// `rlim_t` is u64 on Linux but not on every platform, hence the casts.
#[allow(clippy::unnecessary_cast)]
pub fn raise_fd_limit() -> u64 {
    #[cfg(unix)]
    // SAFETY: getrlimit/setrlimit read and write a properly sized local struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        const WANTED: libc::rlim_t = 1 << 18;
        if lim.rlim_max < WANTED {
            let higher = libc::rlimit {
                rlim_cur: WANTED,
                rlim_max: WANTED,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &higher) == 0 {
                return WANTED as u64;
            }
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        lim.rlim_cur as u64
    }
    #[cfg(not(unix))]
    0
}

/// Resident memory of this process, in bytes.
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// CPU time (user + system) this process has used.
pub fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let (utime, stime): (u64, u64) = (fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?);
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks <= 0 {
        return None;
    }
    Some(Duration::from_secs_f64(
        (utime + stime) as f64 / ticks as f64,
    ))
}

/// The share of one core this process used over `window`, measured while the caller sleeps.
pub async fn cpu_share_over(window: Duration) -> Option<f64> {
    let (t0, c0) = (Instant::now(), cpu_time()?);
    tokio::time::sleep(window).await;
    let (t1, c1) = (Instant::now(), cpu_time()?);
    Some((c1 - c0).as_secs_f64() / (t1 - t0).as_secs_f64())
}

/// (busy, total) CPU time of the whole machine in clock ticks, all cores together, from the
/// first line of `/proc/stat`: busy is everything but idle and iowait.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).unwrap_or(&0);
    Some((total - idle, total))
}

/// How many cores the whole machine kept busy over `window` (the nodes of a netns runner are
/// other processes, which [`cpu_share_over`] does not see).
pub async fn machine_cores_busy_over(window: Duration) -> Option<f64> {
    let (b0, t0) = machine_ticks()?;
    tokio::time::sleep(window).await;
    let (b1, t1) = machine_ticks()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    Some((b1 - b0) as f64 / (t1 - t0).max(1) as f64 * cores)
}

#[cfg(test)]
mod tests {
    #[test]
    fn readings_are_plausible_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(super::rss_bytes().unwrap() > 1024 * 1024);
            assert!(super::cpu_time().is_some());
        }
    }
}
