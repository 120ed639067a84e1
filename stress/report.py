"""Numbers and tables for the stress suite: percentiles, medians over runs, text tables, the chart."""
from __future__ import annotations

import math
import statistics
from array import array
from typing import Any, Iterable, Optional

NUMERIC = ("ops_per_s", "p50_ms", "p95_ms", "p99_ms", "mean_ms", "max_ms", "duration_s", "ops",
           "coord_cpu_pct", "coord_rss_mb", "pgpool_cpu_pct", "error_rate", "write_group_mean_size")


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile of an ascending list (q in 0..100)."""
    if not sorted_values:
        return math.nan
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def latency_summary(values_s: Iterable[float]) -> dict:
    values = sorted(v * 1000.0 for v in values_s)
    if not values:
        return {"p50_ms": math.nan, "p95_ms": math.nan, "p99_ms": math.nan, "mean_ms": math.nan,
                "max_ms": math.nan, "samples": 0}
    return {
        "p50_ms": percentile(values, 50), "p95_ms": percentile(values, 95), "p99_ms": percentile(values, 99),
        "mean_ms": sum(values) / len(values), "max_ms": values[-1], "samples": len(values),
    }


def merge_worker_results(results: list[dict], duration: float) -> dict:
    """One phase's numbers from its client processes' results."""
    ops = sum(r["ops"] for r in results)
    elapsed = max([r.get("elapsed", 0.0) for r in results] + [duration * 0.5, 1e-9])
    errors: dict[str, int] = {}
    messages: list[str] = []
    per_kind_values: dict[str, list] = {}
    per_kind_counts: dict[str, int] = {}
    everything: list[float] = []
    for r in results:
        for name, n in r["errors"].items():
            errors[name] = errors.get(name, 0) + n
        for m in r.get("messages", []):
            if len(messages) < 8 and m not in messages:
                messages.append(m)
        for kind, (count, raw) in r["samples"].items():
            values = array("d")
            values.frombytes(raw)
            per_kind_values.setdefault(kind, []).extend(values)
            per_kind_counts[kind] = per_kind_counts.get(kind, 0) + count
    # Each kind's reservoir stands for its count: weight kinds by count when pooling.
    for kind, values in per_kind_values.items():
        everything.extend(values)
    summary = latency_summary(everything)
    per_kind = {}
    for kind, values in per_kind_values.items():
        s = latency_summary(values)
        per_kind[kind] = {"ops": per_kind_counts[kind], "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"]}
    n_errors = sum(errors.values())
    return {
        "ops": ops,
        "duration_s": elapsed,
        "ops_per_s": ops / elapsed if elapsed > 0 else 0.0,
        **{k: summary[k] for k in ("p50_ms", "p95_ms", "p99_ms", "mean_ms", "max_ms")},
        "errors": n_errors,
        "error_rate": n_errors / ops if ops else 0.0,
        "error_types": errors,
        "error_messages": messages,
        "per_kind": per_kind,
        "hit_max_ops": any(r.get("hit_max_ops") for r in results),
    }


def median_of(runs: list[dict]) -> dict:
    """Medians of the numeric fields over runs; errors are summed, distributions taken from each run."""
    out: dict[str, Any] = {}
    for key in NUMERIC:
        values = [r[key] for r in runs if isinstance(r.get(key), (int, float)) and not _isnan(r.get(key))]
        if values:
            out[key] = statistics.median(values)
    out["errors"] = sum(r.get("errors", 0) for r in runs)
    types: dict[str, int] = {}
    for r in runs:
        for k, v in (r.get("error_types") or {}).items():
            types[k] = types.get(k, 0) + v
    out["error_types"] = types
    cpus = [r.get("cpu_pct") for r in runs if r.get("cpu_pct")]
    if cpus:
        out["cpu_pct"] = {k: statistics.median(c[k] for c in cpus if c.get(k) is not None)
                          for k in cpus[0] if any(c.get(k) is not None for c in cpus)}
    dist_keys = [r.get("read_distribution") for r in runs if r.get("read_distribution")]
    if dist_keys:
        names = list(dist_keys[0])
        out["read_distribution"] = {n: statistics.median(d.get(n, 0) for d in dist_keys) for n in names}
    kinds = {k for r in runs for k in (r.get("per_kind") or {})}
    if kinds:
        out["per_kind"] = {
            k: {f: statistics.median([r["per_kind"][k][f] for r in runs if k in (r.get("per_kind") or {})])
                for f in ("ops", "p50_ms", "p99_ms")}
            for k in sorted(kinds)
        }
    out["runs"] = len(runs)
    return out


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def fmt(v: Any, digits: int = 2) -> str:
    if v is None or _isnan(v):
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    return str(v)


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or _isnan(a) or _isnan(b) or not b:
        return None
    return a / b


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(str(c).rjust(widths[i]) if i else str(c).ljust(widths[i]) for i, c in enumerate(header))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(str(c).rjust(widths[i]) if i else str(c).ljust(widths[i]) for i, c in enumerate(r)))
    return "\n".join(lines)


def dist_text(dist: Optional[dict]) -> str:
    total = sum((dist or {}).values())
    if not total:
        return "-"
    return " ".join(f"{name}:{100.0 * n / total:.0f}%" for name, n in dist.items())


def cpu_text(cpu: Optional[dict]) -> str:
    if not cpu:
        return "-"
    parts = [fmt(cpu.get(k), 0) if cpu.get(k) is not None else "-"
             for k in ("clients", "coordinator", "postgres", "pgpool")]
    return "/".join(parts) + f" ({fmt(cpu.get('machine_busy_of_all_cores'), 0)}%)"


def phase_table(rows: list[dict]) -> str:
    """rows: phase results of ONE workload (every target), medians or a single run."""
    direct = next((r for r in rows if r["target"] == "direct"), None)
    pgpool = next((r for r in rows if r["target"] == "pgpool"), None)
    header = ["target", "clients", "ops/s", "p50 ms", "p95 ms", "p99 ms", "errors",
              "thr lb/direct", "p50 lb/direct", "vs pgpool thr", "reads per db", "write group", "coord CPU%",
              "coord RSS MB", "CPU% cli/coord/db/pool (machine)"]
    body = []
    for r in rows:
        m = r["metrics"]
        is_lb = r["target"] == "lb"
        body.append([
            r["label"], str(r["clients"]), fmt(m.get("ops_per_s"), 0), fmt(m.get("p50_ms"), 3),
            fmt(m.get("p95_ms"), 3), fmt(m.get("p99_ms"), 3), str(m.get("errors", 0)),
            fmt(ratio(m.get("ops_per_s"), direct["metrics"].get("ops_per_s")) if direct and r is not direct else None),
            fmt(ratio(m.get("p50_ms"), direct["metrics"].get("p50_ms")) if direct and r is not direct else None),
            fmt(ratio(m.get("ops_per_s"), pgpool["metrics"].get("ops_per_s")) if pgpool and is_lb else None),
            dist_text(m.get("read_distribution")) if is_lb else "-",
            fmt(m.get("write_group_mean_size"), 2) if is_lb and m.get("write_group_mean_size") else "-",
            fmt(m.get("coord_cpu_pct"), 0) if is_lb else (fmt(m.get("pgpool_cpu_pct"), 0) + " (pgpool)"
                                                          if r["target"] == "pgpool" else "-"),
            fmt(m.get("coord_rss_mb"), 1) if is_lb else "-",
            cpu_text(m.get("cpu_pct")),
        ])
    return text_table(header, body)


def scale_table(points: list[dict]) -> str:
    header = ["clients", "target", "ops/s", "p50 ms", "p99 ms", "errors", "thr vs direct"]
    body = []
    by_n: dict[int, dict[str, dict]] = {}
    for p in points:
        by_n.setdefault(p["clients"], {})[p["label"]] = p
    for n in sorted(by_n):
        direct = next((p for p in by_n[n].values() if p["target"] == "direct"), None)
        for label, p in by_n[n].items():
            m = p["metrics"]
            body.append([str(n), label, fmt(m.get("ops_per_s"), 0), fmt(m.get("p50_ms"), 3), fmt(m.get("p99_ms"), 3),
                         str(m.get("errors", 0)),
                         fmt(ratio(m.get("ops_per_s"), direct["metrics"].get("ops_per_s")))
                         if direct and p is not direct else "-"])
    return text_table(header, body)


def chart(path: str, data: dict) -> Optional[str]:
    """A PNG of the results; returns a message when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no chart written"
    summary = data.get("summary") or []
    scale = data.get("scale") or []
    soak = data.get("soak")
    panels = (1 if summary else 0) + (1 if scale else 0) + (1 if soak else 0)
    if not panels:
        return "nothing to chart (no phases, scale or soak): no chart written"
    fig, axes = plt.subplots(panels, 2, figsize=(13, 4.2 * panels), squeeze=False)
    workloads = []
    for r in summary:
        if r["workload"] not in workloads:
            workloads.append(r["workload"])
    labels = []
    for r in summary:
        if r["label"] not in labels:
            labels.append(r["label"])
    width = 0.8 / max(1, len(labels))
    row = 0
    for j, label in enumerate(labels):
        thr = [next((r["metrics"].get("ops_per_s", 0) for r in summary
                     if r["workload"] == w and r["label"] == label), 0) for w in workloads]
        p99 = [next((r["metrics"].get("p99_ms", 0) for r in summary
                     if r["workload"] == w and r["label"] == label), 0) for w in workloads]
        xs = [i + j * width for i in range(len(workloads))]
        axes[0][0].bar(xs, thr, width, label=label)
        axes[0][1].bar(xs, p99, width, label=label)
    if summary:
        for ax, title in ((axes[0][0], "throughput (ops/s, median)"), (axes[0][1], "p99 latency (ms, median)")):
            ax.set_xticks([i + width * (len(labels) - 1) / 2 for i in range(len(workloads))])
            ax.set_xticklabels(workloads)
            ax.set_title(title)
            ax.legend(fontsize=8)
        row = 1
    if scale:
        by_label: dict[str, list] = {}
        for p in scale:
            by_label.setdefault(p["label"], []).append(p)
        for label, pts in by_label.items():
            pts.sort(key=lambda p: p["clients"])
            xs = [p["clients"] for p in pts]
            axes[row][0].plot(xs, [p["metrics"].get("ops_per_s", 0) for p in pts], marker="o", label=label)
            axes[row][1].plot(xs, [p["metrics"].get("p99_ms", 0) for p in pts], marker="o", label=label)
        for ax, title in ((axes[row][0], "scale: throughput (ops/s)"), (axes[row][1], "scale: p99 (ms)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("client processes")
            ax.set_title(title)
            ax.legend(fontsize=8)
        row += 1
    if soak:
        samples = soak.get("samples", [])
        xs = [s["t_s"] for s in samples]
        axes[row][0].plot(xs, [s["rss_mb"] for s in samples], marker=".")
        axes[row][0].set_title("soak: coordinator RSS (MB)")
        axes[row][0].set_xlabel("seconds")
        axes[row][1].plot(xs[1:], [s.get("ops_per_s") or 0 for s in samples[1:]], marker=".")
        axes[row][1].set_title("soak: throughput (ops/s)")
        axes[row][1].set_xlabel("seconds")
    meta = data.get("meta", {})
    fig.suptitle(f"django_lb_shm stress — {meta.get('db')} x{meta.get('dbs')}, {meta.get('cpu_count')} cores, "
                 f"{meta.get('clients')} clients, median of {meta.get('runs')} run(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None
