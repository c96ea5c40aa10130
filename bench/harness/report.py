"""
Turn a run's results into the Markdown table, the JSON file and the PNG
chart of ratios to the direct path.
"""

from __future__ import annotations

import json
import os
import statistics
from typing import Any

__all__ = ["FIGURES", "PATHS", "chart", "compare", "markdown", "summarize", "targets"]

#: (key, label) of each path, in table order.
PATHS: list[tuple[str, str]] = [
    ("direct", "direct"),
    ("http", "txtunnel http (ws)"),
    ("wss", "txtunnel http (wss)"),
    ("tcp", "txtunnel tcp (udp)"),
    ("ssh", "ssh -R"),
    ("sshnd", "ssh -R -tt (nodelay)"),
]

#: key -> (label, unit, higher is better)
FIGURES: dict[str, tuple[str, str, bool]] = {
    "rps_c50": ("req/s, 100 B, c=50", "req/s", True),
    "p50_c50": ("p50 latency, c=50", "ms", False),
    "p99_c50": ("p99 latency, c=50", "ms", False),
    "rps_c1": ("req/s, 100 B, c=1", "req/s", True),
    "p50_c1": ("p50 latency, c=1", "ms", False),
    "p99_c1": ("p99 latency, c=1", "ms", False),
    "download": ("download {big}", "MB/s", True),
    "upload": ("upload {big}", "MB/s", True),
    "iperf_up": ("TCP iperf3, visitor sends", "MB/s", True),
    "iperf_down": ("TCP iperf3, visitor receives", "MB/s", True),
    "udp": ("UDP datagrams/s, 512 B", "dgram/s", True),
    "udp_loss": ("UDP loss at 20,000 dgram/s offered", "%", False),
}


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "ms":
        return f"{value:.2f} ms" if value < 10 else f"{value:.1f} ms"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}"


def summarize(figures: dict[str, dict[str, dict[str, Any]]]) -> None:
    """
    Fill in, for every figure and path, the median of its samples and its
    ratios to the direct path and to ``ssh -R``.
    """
    for _key, row in figures.items():
        for cell in row.values():
            samples = [s for s in cell.get("samples", []) if s is not None]
            cell["median"] = statistics.median(samples) if samples else None
            loads = cell.get("loads", [])
            cell["load"] = round(statistics.median(loads), 2) if loads else None
        direct = row.get("direct", {}).get("median")
        ssh = row.get("ssh", {}).get("median")
        for cell in row.values():
            m = cell.get("median")
            cell["ratio_direct"] = round(m / direct, 3) if m is not None and direct else None
            cell["ratio_ssh"] = round(m / ssh, 3) if m is not None and ssh else None


def _cell(cell: dict[str, Any] | None, unit: str, path: str) -> str:
    if not cell:
        return "-"
    if cell.get("na"):
        return f"n/a ({cell['na']})"
    m = cell.get("median")
    if m is None:
        err = (cell.get("errors") or ["no result"])[-1]
        return f"error: {err[:60]}"
    parts = []
    if path != "direct" and cell.get("ratio_direct") is not None:
        parts.append(f"{cell['ratio_direct']:.2f}× direct")
    if path != "ssh" and cell.get("ratio_ssh") is not None:
        parts.append(f"{cell['ratio_ssh']:.2f}× ssh")
    text = _fmt(m, unit)
    return f"{text} ({', '.join(parts)})" if parts else text


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    figures = results["figures"]
    lines = [
        f"# txtunnel benchmark, {meta['date']} ({meta['mode']} mode)",
        "",
        f"Machine: {meta['machine']}. txtunnel: {meta['txtunnel']}.",
        f"Each figure: median of {meta['reps']} run(s), paths alternated within the run; "
        f"ratios are to the direct path and to plain `ssh -R` in this same run (latency: lower is better, "
        f"so a ratio above 1 is slower). MB = 10^6 bytes. Load = median 1-minute load average at the start of "
        f"the row's runs.",
        "",
    ]
    header = ["figure"] + [label for _k, label in PATHS] + ["load"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for key, (label, unit, _higher) in FIGURES.items():
        row = figures.get(key, {})
        loads = [c.get("load") for c in row.values() if c.get("load") is not None]
        name = label.format(big=meta["big_label"])
        if unit != "ms":
            name = f"{name} ({unit})"
        cells = [_cell(row.get(p), unit, p) for p, _l in PATHS]
        load = f"{statistics.median(loads):.2f}" if loads else "-"
        lines.append("| " + " | ".join([name, *cells, load]) + " |")
    mem = results.get("memory", {})
    lines += ["", "## Memory and long transfers", ""]
    lines.append("| figure | relay | agent | note |")
    lines.append("|---|---|---|---|")
    peak = mem.get("peak")
    if peak:
        lines.append(
            f"| peak RSS during the runs above | {peak.get('relay_mb')} MB (VmHWM {peak.get('relay_hwm_mb')}) "
            f"| {peak.get('agent_mb')} MB (VmHWM {peak.get('agent_hwm_mb')}) | sampled every 0.2 s |"
        )
    for key in ("gib_download", "gib_upload"):
        g = mem.get(key)
        if not g:
            continue
        what = "download" if key == "gib_download" else "upload"
        if g.get("error") or "seconds" not in g:
            error = g.get("error") or "the http path is not available"
            lines.append(f"| {g['label']} {what}, http tunnel | - | - | error: {error[:80]} |")
            continue
        ref = "; ".join(f"{p}: {v['seconds']:.1f} s" for p, v in g.get("reference", {}).items() if v.get("seconds"))
        lines.append(
            f"| {g['label']} {what}, http tunnel: {g['seconds']:.1f} s, {g['mbps']:.0f} MB/s "
            f"| {g.get('relay_peak_mb')} MB | {g.get('agent_peak_mb')} MB | {ref} |"
        )
    t = mem.get("idle_tunnels")
    if t:
        if t.get("error"):
            lines.append(f"| idle tunnels | - | - | error: {t['error'][:100]} |")
        else:
            lines.append(
                f"| {t['tunnels']:,} idle {t['kind']} tunnels ({t['agents']} agents) | {t['relay_rss_mb']} MB "
                f"(from {t['relay_rss_before_mb']}, {t['relay_kb_per_tunnel']} KB/tunnel) "
                f"| {t['agent_rss_median_mb']} MB median, {t['agent_rss_max_mb']} max (per agent) "
                f"| all ready in {t['seconds_to_ready']} s |"
            )
    s = mem.get("idle_streams")
    if s:
        if s.get("error"):
            lines.append(f"| idle streams | - | - | error: {s['error'][:100]} |")
        else:
            errs = "; ".join(s["errors"])[:160] or "no error"
            lines.append(
                f"| {s['streams']:,} idle streams on one link (of {s['wanted']:,}) | {s['relay_rss_mb']} MB "
                f"(from {s['relay_rss_before_mb']}, {s['relay_kb_per_stream']} KB/stream) "
                f"| {s['agent_rss_mb']} MB (from {s['agent_rss_before_mb']}, {s['agent_kb_per_stream']} KB/stream) "
                f"| opened in {s['seconds_to_open']} s, closed in {s['seconds_to_close']} s; {errs} |"
            )
    tg = results.get("targets")
    if tg:
        lines += ["", "## Targets (issue 3)", ""]
        lines.append("| target | measured | |")
        lines.append("|---|---|---|")
        for item in tg:
            lines.append(f"| {item['target']} | {item['measured']} | {item['verdict']} |")
    notes = results.get("notes") or []
    if notes:
        lines += ["", "## Notes", ""]
        lines += [f"* {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _median(row: dict[str, Any], path: str, field: str = "median") -> float | None:
    return (row.get(path) or {}).get(field)


def targets(results: dict[str, Any]) -> list[dict[str, str]]:
    """
    The issue's targets, each with what this run measured and whether it
    is met (for the txtunnel http path, the one the targets name).
    """
    f = results["figures"]
    mem = results.get("memory", {})
    out: list[dict[str, str]] = []

    def add(target: str, value: float | None, limit: float, higher: bool, text: str) -> None:
        if value is None:
            out.append({"target": target, "measured": "not measured", "verdict": "?"})
            return
        met = value >= limit if higher else value < limit
        if met:
            verdict = "met"
        elif higher:
            verdict = f"not met: short by {(limit - value) / limit:.0%}"
        else:
            verdict = f"not met: {value / limit:.1f}x the limit"
        out.append({"target": target, "measured": text, "verdict": verdict})

    r = _median(f.get("rps_c50", {}), "http", "ratio_direct")
    add("HTTP req/s c=50 >= 0.11x direct", r, 0.11, True, f"{r:.3f}x" if r is not None else "")
    p = _median(f.get("p99_c50", {}), "http")
    add("HTTP p99 c=50 < 10 ms", p, 10.0, False, f"{p:.1f} ms" if p is not None else "")
    for key in ("download", "upload"):
        r = _median(f.get(key, {}), "http", "ratio_ssh")
        add(f"{key} MB/s >= 1.0x ssh -R", r, 1.0, True, f"{r:.2f}x ssh" if r is not None else "")
    t = mem.get("idle_tunnels") or {}
    v = t.get("relay_rss_mb")
    add(f"{t.get('tunnels', 1000):,} idle tunnels: relay RSS < 150 MB", v, 150.0, False, f"{v} MB" if v else "")
    s = mem.get("idle_streams") or {}
    if s and not s.get("error"):
        n = s.get("streams", 0)
        errs = s.get("errors") or []
        out.append(
            {
                "target": f"{s.get('wanted', 0):,} idle streams on one link: no error",
                "measured": f"{n:,} held; " + ("; ".join(errs)[:120] or "no error"),
                "verdict": "met" if not errs and n == s.get("wanted") else "not met",
            }
        )
        for side in ("relay", "agent"):
            v = s.get(f"{side}_rss_mb")
            add(f"idle streams: {side} RSS < 300 MB", v, 300.0, False, f"{v} MB" if v else "")
    return out


def compare(results: dict[str, Any], previous: dict[str, Any] | None) -> list[str]:
    """
    Figures whose ratio to direct moved by more than 10% since the previous
    recorded run (ratios, because absolute figures drift between runs).
    """
    if not previous:
        return []
    notes = []
    for key, (label, _unit, higher) in FIGURES.items():
        for path, plabel in PATHS:
            if path == "direct":
                continue
            now = _median(results["figures"].get(key, {}), path, "ratio_direct")
            then = _median(previous.get("figures", {}).get(key, {}), path, "ratio_direct")
            if now is None or then is None or then == 0:
                continue
            change = now / then - 1
            if abs(change) > 0.10:
                better = (change > 0) == higher
                notes.append(
                    f"{label.format(big='')} / {plabel}: {then:.3f}x -> {now:.3f}x direct "
                    f"({'better' if better else 'WORSE'}, {change:+.0%}) since {previous['meta'].get('date')}"
                )
    return notes


def chart(results: dict[str, Any], path: str) -> str | None:
    """
    Bars of each path's ratio to direct, per figure (log scale); returns
    an error message instead if matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib, or tox -e bench): no chart"
    figures = results["figures"]
    groups = [
        ("throughput (higher is better)", ["rps_c50", "rps_c1", "download", "upload", "iperf_up", "iperf_down", "udp"]),
        ("latency (lower is better)", ["p50_c50", "p99_c50", "p50_c1", "p99_c1"]),
    ]
    colors = {"http": "tab:blue", "wss": "tab:cyan", "tcp": "tab:green", "ssh": "tab:red", "sshnd": "tab:purple"}
    measured = {p for row in figures.values() for p, cell in row.items() if cell.get("median") is not None}
    paths = [(k, lbl) for k, lbl in PATHS if k != "direct" and k in measured]
    fig, axes = plt.subplots(2, 1, figsize=(11, 8.5))
    width = 0.8 / max(1, len(paths))
    for ax, (title, keys) in zip(axes, groups, strict=True):
        for i, (pkey, plabel) in enumerate(paths):
            xs, ys = [], []
            for j, key in enumerate(keys):
                r = _median(figures.get(key, {}), pkey, "ratio_direct")
                if r:
                    xs.append(j + (i - (len(paths) - 1) / 2) * width)
                    ys.append(r)
            ax.bar(xs, ys, width, label=plabel, color=colors.get(pkey))
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([FIGURES[k][0].format(big=results["meta"]["big_label"]) for k in keys], fontsize=8)
        ax.set_ylabel("ratio to direct")
        ax.set_title(title)
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0].legend(fontsize=8, ncol=3)
    fig.suptitle(f"txtunnel vs direct and ssh -R, {results['meta']['date']} ({results['meta']['mode']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_json(results: dict[str, Any], path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def _rst_escape(text: str) -> str:
    return text.replace("*", "\\*").replace("`", "'").replace("|", "\\|")


def rst(results: dict[str, Any]) -> str:
    """
    The main table and the memory table as reStructuredText list-tables,
    ready to paste into ``docs/performance.rst``.
    """
    meta = results["meta"]
    figures = results["figures"]
    out = [
        f".. Generated by bench/run.py on {meta['date']} ({meta['mode']} mode, median of {meta['reps']} rounds).",
        "",
        ".. list-table::",
        "   :header-rows: 1",
        "   :stub-columns: 1",
        "",
        "   * - figure",
    ]
    out += [f"     - {label}" for _k, label in PATHS]
    out.append("     - load")
    for key, (label, unit, _higher) in FIGURES.items():
        row = figures.get(key, {})
        name = label.format(big=meta["big_label"]) + ("" if unit == "ms" else f" ({unit})")
        out.append(f"   * - {_rst_escape(name)}")
        for p, _l in PATHS:
            out.append(f"     - {_rst_escape(_cell(row.get(p), unit, p))}")
        loads = [c.get("load") for c in row.values() if c.get("load") is not None]
        out.append(f"     - {statistics.median(loads):.2f}" if loads else "     - \\-")
    md = markdown(results).split("## Memory and long transfers", 1)
    if len(md) == 2:
        rows = [line for line in md[1].splitlines() if line.startswith("| ") and not line.startswith("| figure")]
        rows = [r for r in rows if not r.startswith("|---")]
        out += [
            "",
            ".. list-table::",
            "   :header-rows: 1",
            "",
            "   * - figure",
            "     - relay",
            "     - agent",
            "     - note",
        ]
        for r in rows:
            if "## Targets" in r:
                break
            cells = [c.strip() for c in r.strip().strip("|").split("|")]
            if len(cells) != 4 or cells[0].startswith("HTTP req/s") or cells[0] == "target":
                continue
            out.append(f"   * - {_rst_escape(cells[0])}")
            out += [f"     - {_rst_escape(c)}" for c in cells[1:]]
    return "\n".join(out) + "\n"
