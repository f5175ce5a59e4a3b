#!/usr/bin/env python3
"""Draws the soak's CSV (bench/src/bin/soak.rs): one panel per figure, minutes across."""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

source, target = sys.argv[1], sys.argv[2]
with open(source, newline="") as f:
    rows = list(csv.DictReader(f))
minutes = [int(r["minute"]) for r in rows]
panels = [
    ("worker_cpu_percent", "worker CPU, % of a core"),
    ("worker_rss_mb", "worker private memory, MB"),
    ("table_mb", "extension's tables and indexes, MB"),
    ("dead_tuples", "dead tuples in them"),
    ("wal_bytes_per_event", "the cluster's WAL (signups included) per delivered event, bytes (minutes delivering 100 or more)"),
    ("pending", "events pending"),
]
fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.1 * len(panels)), sharex=True)
# WAL per event over a minute that delivered almost nothing (an outage) says nothing of
# an event's cost, and would flatten the curve: left out.
FEW = 100
for ax, (column, title) in zip(axes, panels):
    values = [float(r[column]) if r[column] not in ("", "NaN", "nan") else float("nan") for r in rows]
    if column == "wal_bytes_per_event":
        values = [v if float(r["delivered"] or 0) >= FEW else float("nan") for v, r in zip(values, rows)]
    ax.plot(minutes, values, linewidth=1.2)
    ax.set_title(title, fontsize=9, loc="left")
    ax.grid(True, alpha=0.3)
    ax.set_ylim(bottom=0)
axes[-1].set_xlabel("minute")
fig.tight_layout()
fig.savefig(target, dpi=110)
print(f"soak plot: {target}")
