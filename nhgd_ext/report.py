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
    keys = set().union(*(row.keys() for h in histories for row in h.rows[-1:]))
    return next((m for m in PREFERRED_METRICS if m in keys), None)


def summary(history: History, metric: str | None, last: int) -> dict[str, Any]:
    final = history.final
    out = {
        "final_outer_loss": final.get("outer_loss"),
        f"outer_loss_mean_last_{last}": history.mean_over_last("outer_loss", last),
        "wall_time_seconds": final.get("wall_time"),
        "outer_steps": final.get("step"),
        "setup_seconds": history.setup_seconds,
        "warmup_seconds": history.warmup_seconds,
        "peak_memory_bytes": history.peak_memory_bytes,
        "peak_memory_kind": history.memory_kind,
        "final_metrics": {k: v for k, v in final.items() if k not in ("step", "wall_time")},
    }
    if metric is not None:
        out[metric] = final.get(metric)
        out[f"{metric}_mean_last_{last}"] = history.mean_over_last(metric, last)
    return out


def table(histories: list[History], references: dict[str, dict[str, float]], metric: str | None,
          last: int) -> str:
    """A plain-text table, one line per method, then the reference runs."""
    head = ["method", "outer loss", f"mean last {last}"]
    if metric:
        head += [metric, f"mean last {last}"]
    head += ["time [s]", "warm-up [s]", "peak mem [MB]"]
    lines = [head]
    for h in histories:
        row = [h.method, _num(h.final.get("outer_loss")), _num(h.mean_over_last("outer_loss", last))]
        if metric:
            row += [_num(h.final.get(metric)), _num(h.mean_over_last(metric, last))]
        mem = h.peak_memory_bytes
        row += [f"{h.final.get('wall_time', 0.0):.2f}", f"{h.warmup_seconds:.2f}",
                "-" if mem is None else f"{mem / 2**20:.1f}"]
        lines.append(row)
    for name, values in references.items():
        row = [name, _num(values.get("outer_loss")), "-"]
        if metric:
            row += [_num(values.get(metric)), "-"]
        lines.append(row + ["-", "-", "-"])
    widths = [max(len(str(r[i])) for r in lines if i < len(r)) for i in range(len(head))]
    rendered = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in lines]
    rendered.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(rendered)


def write_all(out: Path, histories: list[History], references: dict[str, dict[str, float]],
              config: dict[str, Any], last: int) -> list[Path]:
    """results.json, history.csv and the plots in ``out``; returns the paths."""
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
    keys = ["method", "step", "wall_time", "outer_loss"]
    for h in histories:
        for row in h.rows:
            keys += [k for k in row if k not in keys]
    with open(written[1], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for h in histories:
            for row in h.rows:
                writer.writerow({"method": h.method, **row})
    written += plot(out, histories, ["outer_loss"] + ([metric] if metric else []))
    return written


def plot(out: Path, histories: list[History], keys: list[str]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key in keys:
        fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        for h in histories:
            rows = [r for r in h.rows if key in r]
            by_step.plot([r["step"] for r in rows], [r[key] for r in rows], label=h.method)
            by_time.plot([r["wall_time"] for r in rows], [r[key] for r in rows], label=h.method)
        by_step.set_xlabel("outer step")
        by_time.set_xlabel("wall time [s]")
        by_step.set_ylabel(key.replace("_", " "))
        if key in ("outer_loss", "grad_norm_sq", "test_error", "exact_objective") and all(
                r[key] > 0 for h in histories for r in h.rows if key in r):
            by_step.set_yscale("log")
        by_time.legend()
        fig.suptitle(f"{histories[0].problem}: {key.replace('_', ' ')}")
        fig.tight_layout()
        path = out / f"{key}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


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
