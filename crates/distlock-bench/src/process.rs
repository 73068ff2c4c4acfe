//! This process's own CPU time and resident memory, from `/proc` (Linux;
//! `None` elsewhere), for the `hold` scenario.

use std::time::Duration;

/// CPU time used so far by every thread of this process: the sum of each
/// thread's run time in `/proc/self/task/*/schedstat` (nanoseconds, unlike
/// `/proc/self/stat`'s 10 ms ticks).
pub(crate) fn cpu_time() -> Option<Duration> {
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let Ok(task) = task else { continue };
        // A thread that ended meanwhile has no file any more.
        let Ok(schedstat) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        total += schedstat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(Duration::from_nanos(total))
}

/// Resident memory of this process in bytes (`VmRSS`).
pub(crate) fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_grows_and_memory_is_resident() {
        let Some(before) = cpu_time() else {
            return; // not Linux
        };
        let start = std::time::Instant::now();
        let mut spin = 0u64;
        while start.elapsed() < Duration::from_millis(20) {
            spin = spin.wrapping_add(1);
        }
        assert!(spin > 0);
        let after = cpu_time().unwrap();
        assert!(after > before, "{before:?} -> {after:?}");
        assert!(resident_bytes().unwrap() > 0);
    }
}
