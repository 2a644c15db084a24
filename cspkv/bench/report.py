"""csp-bench's outputs: a Markdown table, the JSON, and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

from cspkv.durable import write_atomic

MIB = 2**20


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(result: dict) -> str:
    m, bw = result["machine"], result["bandwidth"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; torch {m['torch']}, "
             f"onnxruntime {m['onnxruntime']}; load average at start {m['load_average'][0]:.2f}. "
             f"Copy bandwidth {bw['gb_per_s']:.1f} GB/s (read + write).",
             "",
             "| runtime | prompt | budget | precision | step median ms | p90 ms | tokens/s | TTFT ms "
             "| of it vision ms | KV MiB | peak RSS MiB | step × HF full | floor ms | × floor |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        rss = r.get("peak_rss_bytes")
        lines.append(
            f"| {r['runtime']} | {r['length']} | {r['budget']} | {r['precision']} | {r['step_median_ms']:.1f} "
            f"| {r['step_p90_ms']:.1f} | {r['tokens_per_s']:.1f} | {r['ttft_ms']:.0f} "
            f"| {_fmt(r.get('vision_ms'), '.0f')} | {r['kv_bytes'] / MIB:.1f} "
            f"| {_fmt(rss and rss / MIB, '.0f')} | {_fmt(r.get('step_vs_hf_full'), '.2f')} "
            f"| {r['floor_ms']:.1f} | {r['x_floor']:.1f} |")
    if result["scaling"]:
        lines += ["", "Scaling (decode step median over each window; K/V held):", "",
                  "| runtime | generated | step ms | KV MiB | RSS MiB |", "|---|---:|---:|---:|---:|"]
        for runtime, points in result["scaling"].items():
            for p in points:
                lines.append(f"| {runtime} | {p['generated']} | {p['step_ms']:.1f} | {p['kv_bytes'] / MIB:.1f} "
                             f"| {p['rss_bytes'] / MIB:.0f} |")
    if result["notes"]:
        lines += ["", "Notes:", *[f"- {n}" for n in result["notes"]]]
    return "\n".join(lines) + "\n"


def plots(result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if result["scaling"]:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for runtime, points in result["scaling"].items():
            x = [p["generated"] for p in points]
            ax1.plot(x, [p["step_ms"] for p in points], marker="o", label=runtime)
            ax2.plot(x, [p["kv_bytes"] / MIB for p in points], marker="o", label=runtime)
        ax1.set(xlabel="generated tokens", ylabel="decode step (ms, median)", title="Decode latency")
        ax2.set(xlabel="generated tokens", ylabel="K/V held (MiB)", title="K/V memory")
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        paths.append(out / "bench_scaling.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    series: dict[str, list] = {}
    for r in result["rows"]:
        if r["precision"] == "fp32" and r["budget"] in (1.0, 0.5) or r["runtime"] == "transformers full":
            series.setdefault(f"{r['runtime']} b={r['budget']}", []).append((r["length"], r["step_median_ms"]))
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set(xlabel="prompt tokens", ylabel="decode step (ms, median)", title="Decode latency by prompt length (fp32)")
    ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "bench_latency.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write(result: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "bench.json", "markdown": out / "bench.md"}
    write_atomic(files["json"], json.dumps(result, indent=1, sort_keys=True) + "\n")
    write_atomic(files["markdown"], markdown(result))
    for path in plots(result, out):
        files[path.stem] = path
    return files
