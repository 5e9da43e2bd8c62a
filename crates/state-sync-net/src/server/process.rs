//! The serving process's CPU time and resident memory, for `status`: so an
//! operator (or `statesync bench`) sees what the hub itself costs.

use serde::{Deserialize, Serialize};

/// The hub process's resources, in a [`HubStatus`](crate::HubStatus).
/// Read from `/proc/self` on Linux; absent elsewhere.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
#[non_exhaustive]
pub struct ProcessStats {
    /// CPU time used so far, user plus system, over every thread, in
    /// milliseconds (10 ms resolution).
    pub cpu_ms: u64,
    /// Resident memory, in bytes.
    pub rss_bytes: u64,
}

impl ProcessStats {
    /// This process's figures, or `None` where they cannot be read.
    #[must_use]
    pub fn current() -> Option<ProcessStats> {
        if !cfg!(target_os = "linux") {
            return None;
        }
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        Some(ProcessStats {
            cpu_ms: cpu_ms_of_stat(&stat)?,
            rss_bytes: rss_bytes_of_status(&status)?,
        })
    }
}

/// `utime + stime` of `/proc/<pid>/stat`, counted in `USER_HZ` ticks,
/// which Linux fixes at 100 per second for every architecture.
fn cpu_ms_of_stat(stat: &str) -> Option<u64> {
    // The command name, in parentheses, may hold spaces: count fields
    // after its closing parenthesis, where the state is field 3.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) * 10)
}

/// `VmRSS` of `/proc/<pid>/status`, which is given in kB.
fn rss_bytes_of_status(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_after_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (tokio rt) (x)) S 1 4242 4242 0 -1 4194560 1500 0 0 0 \
                    123 45 0 0 20 0 3 0 1000 2000000 500 18446744073709551615";
        assert_eq!(cpu_ms_of_stat(stat), Some((123 + 45) * 10));
        assert_eq!(cpu_ms_of_stat("4242 (cut"), None);
    }

    #[test]
    fn resident_memory_is_read_in_bytes() {
        let status = "Name:\tstatesync\nVmPeak:\t  9000 kB\nVmRSS:\t  1234 kB\nThreads:\t3\n";
        assert_eq!(rss_bytes_of_status(status), Some(1234 * 1024));
        assert_eq!(rss_bytes_of_status("Name:\tx\n"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_has_used_cpu_and_memory() {
        let stats = ProcessStats::current().expect("readable on Linux");
        assert!(stats.rss_bytes > 1 << 20, "{stats:?}");
        // Spin until the 10 ms clock moves; bounded, so a reading that
        // never moves fails rather than hangs.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        loop {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
            let later = ProcessStats::current().expect("readable on Linux");
            if later.cpu_ms > stats.cpu_ms {
                break;
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(10),
                "CPU time did not move in 10 s of spinning: {stats:?} then {later:?}"
            );
        }
    }
}
