"""Stage 8, the report: Markdown with PNG plots beside it, and one self-contained HTML page (plots inlined)."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from matplotlib.figure import Figure  # a bare Figure renders with Agg and keeps no global pyplot state
from prefect import task

from tasks.common import CACHE, build, output_dir

CURVES = [  # (title, [(metric key, label)])
    ("clip fraction", [("clip_frac", "all"), ("clip_frac_low", "low"), ("clip_frac_high", "high")]),
    ("importance ratio", [("ratio_mean", "mean"), ("ratio_min", "min"), ("ratio_max", "max")]),
    ("KL to reference", [("kl", "k3 KL")]),
    ("entropy", [("entropy", "mean per token")]),
    ("completion length", [("completion_len_mean", "mean"), ("completion_len_max", "max")]),
]


def _rows(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _plot(ax, rows: list[dict], series: list[tuple[str, str]], title: str) -> None:
    drawn = False
    for key, label in series:
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None, label=label)
            drawn = True
    if not drawn:
        ax.text(0.5, 0.5, "not measured" + (" (gspo.beta = 0)" if series[0][0] == "kl" else ""),
                ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_title(title)
    ax.set_xlabel("step")
    if drawn and len(series) > 1:
        ax.legend(fontsize="small")


def _reward_series(rows: list[dict]) -> list[tuple[str, str]]:
    tasks = sorted({k for r in rows for k in r if k.startswith("reward/")})
    return [(k, k.split("/", 1)[1]) for k in tasks] + [("eval_reward", "held-out (greedy)")]


def training_figure(rows: list[dict], path: Path) -> None:
    fig = Figure(figsize=(15, 8), layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    _plot(axes[0], rows, _reward_series(rows), "reward per task")
    for ax, (title, series) in zip(axes[1:], CURVES):
        _plot(ax, rows, series, title)
    fig.savefig(path, dpi=80)


def comparison_figure(runs: dict[str, list[dict]], path: Path) -> None:
    """One column per algorithm, one row per signal, y shared along a row."""
    signals = [("reward", [("reward_mean", "batch mean"), ("eval_reward", "held-out")])] + CURVES
    fig = Figure(figsize=(5 * len(runs), 2.6 * len(signals)), layout="constrained")
    axes = fig.subplots(len(signals), len(runs), sharey="row", squeeze=False)
    for col, (name, rows) in enumerate(runs.items()):
        for row, (title, series) in enumerate(signals):
            _plot(axes[row][col], rows, series, f"{name}: {title}")
    fig.savefig(path, dpi=80)


def scores_figure(results: dict, path: Path) -> None:
    fig = Figure(figsize=(max(4, 2.2 * len(results)), 3.5), layout="constrained")
    ax = fig.subplots()
    names = list(results)
    for i, which in enumerate(("base", "trained")):
        vals = [results[t][which]["score"] for t in names]
        bars = ax.bar([j + (i - 0.5) * 0.38 for j in range(len(names))], vals, 0.38, label=which)
        if which == "trained":
            deltas = [results[t]["trained"]["score"] - results[t]["base"]["score"] for t in names]
            ax.bar_label(bars, [f"{d:+.3f}" for d in deltas], fontsize="small")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("score")
    ax.set_ylim(0, 1.1)
    ax.legend()
    fig.savefig(path, dpi=80)


def score_rows(results: dict) -> list[list[str]]:
    """task | metric | base | trained | delta, for the score and every other numeric metric."""
    out = []
    for t, m in results.items():
        keys = ["score"] + [k for k, v in m["trained"].items()
                            if k not in ("score", "n") and isinstance(v, (int, float)) and not isinstance(v, bool)]
        for k in keys:
            b, tr = m["base"][k], m["trained"][k]
            out.append([t, k, f"{b:.4f}", f"{tr:.4f}", f"{tr - b:+.4f}"])
    return out


def render(blocks: list[tuple], images: dict[str, str] | None) -> tuple[str, str]:
    """(markdown, html) of blocks ("h", text) ("p", text) ("ul", items) ("table", header, rows) ("img", file).
    `images` maps a file to its PNG as base64 for the HTML; None leaves images out of the markdown too."""
    md, page = [], []
    for kind, *rest in blocks:
        if kind == "h":
            md.append(f"## {rest[0]}")
            page.append(f"<h2>{html.escape(rest[0])}</h2>")
        elif kind == "p":
            md.append(rest[0])
            page.append(f"<p>{html.escape(rest[0])}</p>")
        elif kind == "ul":
            md.append("\n".join(f"- {x}" for x in rest[0]))
            page.append("<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in rest[0]) + "</ul>")
        elif kind == "table":
            header, rows = rest
            md.append("\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                                + ["| " + " | ".join(r) + " |" for r in rows]))
            page.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
                        + "</table>")
        elif kind == "img" and images is not None:
            md.append(f"![{rest[0]}]({rest[0]})")
            page.append(f'<img alt="{html.escape(rest[0])}" src="data:image/png;base64,{images[rest[0]]}">')
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}img{max-width:100%}")
    doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>GSPO report</title><style>{style}</style>"
           f"</head><body><h1>GSPO train-and-evaluate report</h1>{''.join(page)}</body></html>\n")
    return "# GSPO train-and-evaluate report\n\n" + "\n\n".join(md) + "\n", doc


def blocks(facts: list[str], training: dict, results: dict, compared: bool) -> list[tuple]:
    out = [("ul", facts),
           ("h", "Scores: base (reference) model vs trained checkpoint"),
           ("table", ["task", "metric", "base", "trained", "delta"], score_rows(results)),
           ("img", "scores.png"),
           ("h", "Training"),
           ("ul", [f"steps: {training['steps']}", f"registered checkpoint: {training['selected']}",
                   f"best held-out reward: {training['best_eval']}", f"skipped updates: {training['skipped_updates']}",
                   f"stopped early: {training['stopped_early']}"]),
           ("img", "training.png")]
    if compared:
        out += [("h", "GSPO vs GRPO (token-level ratio, eps 0.2), same data and reference"), ("img", "comparison.png")]
    return out


@task(name="report", cache_policy=CACHE, persist_result=True, result_serializer="json")
def build_report(facts: list[str], training: dict, grpo: dict | None, results: dict, root: str) -> dict:
    """{"dir", "markdown", "html"}: `facts` head the report as a list; `training` (and `grpo`) are train-stage
    results; `results` is {task: {"base": metrics, "trained": metrics}}. The Markdown without plots is
    `markdown_text` in the result, for places that cannot show the PNG files (the Prefect artifact)."""
    def make(work: Path) -> dict:
        rows = _rows(training["metrics"])
        training_figure(rows, work / "training.png")
        if results:
            scores_figure(results, work / "scores.png")
        if grpo is not None:
            comparison_figure({"GSPO": rows, "GRPO": _rows(grpo["metrics"])}, work / "comparison.png")
        b = [x for x in blocks(facts, training, results, grpo is not None) if x[0] != "img" or (work / x[1]).exists()]
        images = {x[1]: base64.b64encode((work / x[1]).read_bytes()).decode() for x in b if x[0] == "img"}
        md, page = render(b, images)
        (work / "report.md").write_text(md)
        (work / "report.html").write_text(page)
        return {"dir": str(work), "markdown": str(work / "report.md"), "html": str(work / "report.html"),
                "markdown_text": render(b, None)[0]}

    return build(output_dir(root, "report"), make)
