#!/usr/bin/env python3
"""Summarise fault-suite reports as the markdown table of docs/choosing.md.

Usage: python3 scripts/fault_table.py RUN_DIR [RUN_DIR ...]

Each RUN_DIR holds the JSON reports of one run of the fault suite
(crates/distlock-cli/tests/cluster_faults.rs writes them to
target/tmp/fault-suite/<backend>.json; copy that directory once per run).
One row per backend and fault kind: the runs, the unavailability (the
longest stretch without a grant from the fault's start to the first grant
after its end) as the median and the maximum over the runs, and, per
backend, the cycles, double grants, stale writes accepted and unsignalled
losses summed over the runs.
"""

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

# The order and names the table uses.
BACKENDS = [
    ("etcd", "etcd, 3 members"),
    ("zookeeper", "ZooKeeper, 3 servers"),
    ("redlock", "Redlock, 3 instances"),
    ("sentinel", "Redis Sentinel"),
    ("sentinel-wait", "Redis Sentinel, `wait_replicas=1`"),
    ("redis-cluster", "Redis Cluster"),
    ("redis-cluster-wait", "Redis Cluster, `wait_replicas=1`"),
]
FAULTS = {
    "leader-kill": "leader (primary) kill -9; restarted once replaced",
    "leader-pause": "leader (primary) SIGSTOP",
    "leader-partition": "leader partitioned (iptables)",
    "member-partition": "follower partitioned (iptables)",
    "instance-kill": "one instance kill -9; back, empty, after 4 s",
    "pause": "the holding worker SIGSTOP (TTL 2 s)",
}


def main(run_dirs):
    if not run_dirs:
        sys.exit(__doc__)
    stalls = defaultdict(list)  # (backend, fault kind) -> [ms]
    lengths = defaultdict(list)  # (backend, fault kind) -> [ms]
    totals = defaultdict(lambda: defaultdict(int))  # backend -> counter -> n
    for run_dir in map(Path, run_dirs):
        if not run_dir.is_dir():
            sys.exit(f"fault_table.py: {run_dir} is not a directory of reports")
        for backend, _ in BACKENDS:
            path = run_dir / f"{backend}.json"
            if not path.exists():
                continue
            try:
                report = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                sys.exit(f"fault_table.py: {path}: not a report: {err}")
            counts = totals[backend]
            counts["runs"] += 1
            counts["cycles"] += report["cycles"]
            counts["double grants"] += len(report["double_grants"])
            counts["stale writes"] += len(report["stale_writes_accepted"])
            counts["unsignalled"] += len(report["unsignalled_losses"])
            counts["hangs"] += len(report["hangs"])
            for kind, stall in report["unavailability"].items():
                stalls[(backend, kind)].append(stall["max_ms"])
            for fault in report["faults"]:
                # started and ended are nanoseconds of the monotonic clock
                lengths[(backend, fault["kind"])].append((fault["ended"] - fault["started"]) / 1e6)

    print("| backend | fault | fault lasted | runs | unavailable, median | max |")
    print("|---|---|---|---|---|---|")
    for backend, label in BACKENDS:
        for kind, fault in FAULTS.items():
            values = stalls.get((backend, kind))
            if values:
                lasted = seconds(statistics.median(lengths[(backend, kind)]))
                print(
                    f"| {label} | {fault} | {lasted} | {len(values)} "
                    f"| {seconds(statistics.median(values))} | {seconds(max(values))} |"
                )
    print()
    print("| backend | runs | cycles | double grants | stale writes accepted | unsignalled losses | hangs |")
    print("|---|---|---|---|---|---|---|")
    for backend, label in BACKENDS:
        counts = totals.get(backend)
        if counts:
            print(
                f"| {label} | {counts['runs']} | {counts['cycles']} | {counts['double grants']} "
                f"| {counts['stale writes']} | {counts['unsignalled']} | {counts['hangs']} |"
            )


def seconds(ms):
    return f"{ms / 1000:.2f} s"


if __name__ == "__main__":
    main(sys.argv[1:])
