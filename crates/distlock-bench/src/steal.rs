//! CPU time the hypervisor gave to other guests while a scenario ran.
//!
//! On a virtual machine whose host is oversubscribed, every figure of a
//! run can double from one hour to the next. Linux counts that time as
//! "steal" in `/proc/stat`; the bench reports the share of the run's CPU
//! time it took, so a reader can tell a slow protocol from a busy host.

/// The machine's cumulative CPU times (all CPUs), in clock ticks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CpuTimes {
    steal: u64,
    total: u64,
}

impl CpuTimes {
    /// Now; `None` where `/proc/stat` is missing or unreadable.
    pub(crate) fn now() -> Option<Self> {
        Self::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// Reads the aggregate `cpu` line: user, nice, system, idle, iowait,
    /// irq, softirq, steal (guest time is already inside user and nice).
    fn parse(stat: &str) -> Option<Self> {
        let mut fields = stat.lines().next()?.split_whitespace();
        if fields.next()? != "cpu" {
            return None;
        }
        let ticks: Vec<u64> = fields
            .take(8)
            .map(|field| field.parse().ok())
            .collect::<Option<_>>()?;
        Some(CpuTimes {
            steal: *ticks.get(7)?,
            total: ticks.iter().sum(),
        })
    }

    /// The percentage of CPU time stolen between `earlier` and `self`;
    /// `None` if no tick passed.
    pub(crate) fn steal_pct_since(self, earlier: CpuTimes) -> Option<f64> {
        let total = self.total.checked_sub(earlier.total)?;
        let steal = self.steal.checked_sub(earlier.steal)?;
        (total > 0).then(|| 100.0 * steal as f64 / total as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_aggregate_line_and_takes_the_steal_share() {
        let before =
            CpuTimes::parse("cpu  100 0 50 800 10 0 5 35 0 0\ncpu0 50 0 25 400 5 0 2 18 0 0\n")
                .unwrap();
        let after = CpuTimes::parse("cpu  150 0 70 900 10 0 5 65 0 0\n").unwrap();
        // 200 ticks passed, 30 of them stolen.
        assert_eq!(after.steal_pct_since(before), Some(15.0));
        assert_eq!(before.steal_pct_since(before), None);
        assert_eq!(CpuTimes::parse("intr 1 2 3\n"), None);
        assert_eq!(CpuTimes::parse("cpu  1 2 3\n"), None);
    }
}
