"""What a run leaves behind: the terminal table, ``results.json``,
``history.csv`` and the PNG plots (outer loss and the test metric against
outer steps and against wall time)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from .runner import History

#: the metric a problem is judged by, first one present wins
PREFERRED_METRICS = ("test_accuracy", "test_error", "exact_objective", "grad_norm_sq")


def headline_metric(histories: list[History]) -> str | None:
    """The first of PREFERRED_METRICS the histories' last rows hold, or None."""
    keys = set().union(*(row.keys() for h in histories for row in h.rows[-1:]))
    return next((m for m in PREFERRED_METRICS if m in keys), None)


def summary(history: History, metric: str | None, last: int) -> dict[str, Any]:
    """One method's figures. A diverged method's figures are ``None`` (the
    steps before its divergence are in history.csv); an interrupted one's are
    those of the steps it finished."""
    final = {} if history.diverged else history.final
    out = {
        "status": history.status,
        "diverged": history.diverged,
        "final_outer_loss": final.get("outer_loss"),
        f"outer_loss_mean_last_{last}": _mean_over_last(history, "outer_loss", last),
        "wall_time_seconds": history.final.get("wall_time"),
        "outer_steps": history.final.get("step"),
        "setup_seconds": history.setup_seconds,
        "warmup_seconds": history.warmup_seconds,
        "peak_memory_bytes": history.peak_memory_bytes,
        "peak_memory_kind": history.memory_kind,
        "final_metrics": {k: v for k, v in final.items() if k not in ("step", "wall_time")},
    }
    if metric is not None:
        out[metric] = final.get(metric)
        out[f"{metric}_mean_last_{last}"] = _mean_over_last(history, metric, last)
    return out


def _mean_over_last(history: History, key: str, last: int) -> float | None:
    return None if history.diverged else history.mean_over_last(key, last)


def _note(history: History) -> str:
    if history.diverged:
        return f"diverged at step {history.diverged['step']} ({history.diverged['quantity']})"
    if history.interrupted:
        return f"interrupted after step {history.final.get('step', 0)}"
    return ""


def _memory_heading(histories: list[History]) -> str:
    kinds = {h.memory_kind for h in histories}
    if kinds == {"cuda max_memory_allocated"}:
        return "peak CUDA mem [MB]"
    if kinds == {"resident set growth"}:
        return "RSS growth [MB]"
    return "memory [MB]"


def table(histories: list[History], references: dict[str, dict[str, float]], metric: str | None,
          last: int) -> str:
    """A plain-text table, one line per method, then the reference runs."""
    head = ["method", "outer loss", f"mean last {last}"]
    if metric:
        head += [metric, f"mean last {last}"]
    head += ["time [s]", "warm-up [s]", _memory_heading(histories), "status"]
    lines = [head]
    for h in histories:
        figures = summary(h, metric, last)
        row = [h.method, _num(figures["final_outer_loss"]), _num(figures[f"outer_loss_mean_last_{last}"])]
        if metric:
            row += [_num(figures[metric]), _num(figures[f"{metric}_mean_last_{last}"])]
        mem = h.peak_memory_bytes
        row += [f"{h.final.get('wall_time', 0.0):.2f}", f"{h.warmup_seconds:.2f}",
                "-" if mem is None else f"{mem / 2**20:.1f}", _note(h)]
        lines.append(row)
    for name, values in references.items():
        row = [name, _num(values.get("outer_loss")), "-"]
        if metric:
            row += [_num(values.get(metric)), "-"]
        lines.append(row + ["-", "-", "-", "reference"])
    widths = [max(len(str(r[i])) for r in lines if i < len(r)) for i in range(len(head))]
    rendered = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in lines]
    rendered.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(rendered)


def write_all(out: Path, histories: list[History], references: dict[str, dict[str, float]],
              config: dict[str, Any], last: int, *, plots: bool = True) -> list[Path]:
    """results.json, history.csv and (``plots``) the plots in ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    metric = headline_metric(histories)
    results = {
        "config": config,
        "headline_metric": metric,
        "methods": {h.method: summary(h, metric, last) for h in histories},
        "references": references,
    }
    written = [out / "results.json", out / "history.csv"]
    # strict JSON: a NaN or infinite figure (a diverged method) is null, not a bare NaN
    written[0].write_text(json.dumps(_finite_or_null(results), indent=2, default=_json_default, allow_nan=False) + "\n")
    keys = ["method", "status", "step", "wall_time", "outer_loss"]
    for h in histories:
        for row in h.rows:
            keys += [k for k in row if k not in keys]
    with open(written[1], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for h in histories:
            for row in h.rows:
                writer.writerow({"method": h.method, "status": h.status, **row})
    if plots:
        written += plot(out, histories, ["outer_loss"] + ([metric] if metric else []), references)
    return written


#: axis labels of the figures a problem reports
LABELS = {
    "outer_loss": "outer loss (validation)",
    "test_accuracy": "test accuracy",
    "test_error": "test error",
    "exact_objective": "exact outer objective",
    "grad_norm_sq": "squared hypergradient norm",
}


def plot(out: Path, histories: list[History], keys: list[str],
         references: dict[str, dict[str, float]] | None = None) -> list[Path]:
    """One PNG per key: against outer steps and against wall time, every
    method in its own colour and line style, the references as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key in keys:
        fig = figure(histories, key, references)
        path = out / f"{key}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def figure(histories: list[History], key: str, references: dict[str, dict[str, float]] | None = None):
    """The matplotlib figure of :func:`plot` for one key."""
    import matplotlib.pyplot as plt

    label = LABELS.get(key, key.replace("_", " "))
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for h, style in zip(histories, _styles(len(histories))):
        rows = [r for r in h.rows if key in r]
        name = h.method + ("" if h.status == "finished" else f" ({h.status})")
        by_step.plot([r["step"] for r in rows], [r[key] for r in rows], label=name, **style)
        by_time.plot([r["wall_time"] for r in rows], [r[key] for r in rows], label=name, **style)
    for i, (name, values) in enumerate((references or {}).items()):
        if values.get(key) is not None and math.isfinite(values[key]):
            for ax in (by_step, by_time):
                ax.axhline(values[key], color="0.3", linestyle=("--", ":", "-.")[i % 3], linewidth=1,
                           label=name if ax is by_time else None)
    by_step.set_xlabel("outer step")
    by_time.set_xlabel("wall time [s]")
    by_step.set_ylabel(label)
    shown = [r[key] for h in histories for r in h.rows if key in r]
    if key in ("outer_loss", "grad_norm_sq", "test_error", "exact_objective") and shown and min(shown) > 0:
        by_step.set_yscale("log")
    by_time.legend(fontsize="small")
    fig.suptitle(f"{histories[0].problem}: {label}")
    fig.tight_layout()
    return fig


def _styles(n: int) -> list[dict[str, Any]]:
    """n distinct (colour, line style) pairs: the ten tab10 colours, then
    the same colours dashed, then dotted."""
    import matplotlib

    colours = matplotlib.colormaps["tab10"].colors
    dashes = ("-", "--", ":", "-.")
    return [{"color": colours[i % 10], "linestyle": dashes[(i // 10) % len(dashes)]} for i in range(n)]


def _num(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.4g}"


def _finite_or_null(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite_or_null(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_null(v) for v in x]
    return x


def _json_default(x):
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serializable: {type(x).__name__}")
