"""The inner step of NHGD-K-FAC on the small CNN of examples/cnn_noisy_labels.py
against a plain SGD step, at batches 32, 256 and 1,024.

    .venv/bin/python bench/bench_kfac_cnn.py [--threads 2] [--repeats 15] [--batches 32,256,1024] [--json PATH]

Both steps: the forward pass of a batch of 28x28 digits, the backward pass
and ``SGD.step``; K-FAC's adds its hooks' captures (both convolutions' input
patches and output gradients, the head's inputs and output gradients) and
the factor updates. The two alternate call by call on the same model and
batch; medians, thread count pinned and printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _report import add_json_argument, write_json

from nhgd_ext.estimators import NHGD

ROOT = Path(__file__).resolve().parent.parent


def small_cnn():
    spec = importlib.util.spec_from_file_location("cnn_example", ROOT / "examples" / "cnn_noisy_labels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.small_cnn()


def measure(batch: int, repeats: int) -> tuple[list[float], list[float]]:
    """(SGD step times, K-FAC inner step times), seconds, one per repeat."""
    torch.manual_seed(0)
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    v = torch.zeros(1, requires_grad=True)
    est = NHGD(list(model.parameters()), [v], curvature="kfac", modules=model, beta=0.9, damping=0.05)

    def sgd_step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def kfac_step():
        est.inner_step(F.cross_entropy(model(x), y, reduction="none"), opt)

    times = {sgd_step: [], kfac_step: []}
    try:
        for step in times:  # warm-up
            step()
        for _ in range(repeats):
            for step, found in times.items():
                start = time.perf_counter()
                step()
                found.append(time.perf_counter() - start)
    finally:
        est.close()
    return times[sgd_step], times[kfac_step]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batches", default="32,256,1024")
    add_json_argument(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    parameters = sum(p.numel() for p in small_cnn().parameters())
    print(f"small CNN (2 conv + linear, {parameters} parameters), "
          f"{torch.get_num_threads()} threads, medians of {args.repeats}")
    print("| batch | SGD step [ms] | NHGD-K-FAC inner step [ms] | ratio |")
    print("|---|---|---|---|")
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        times = dict(zip(("sgd", "kfac"), measure(batch, args.repeats)))
        medians = {name: statistics.median(found) for name, found in times.items()}
        # one value for the table and the JSON: the test recomputes it from the medians
        ratio = medians["kfac"] / medians["sgd"]
        print(f"| {batch} | {medians['sgd'] * 1e3:.2f} | {medians['kfac'] * 1e3:.2f} | {ratio:.2f} |")
        rows.append({"batch": batch, "medians": medians, "times": times, "ratios": {"kfac / sgd": ratio}})
    write_json(args.json, {"device": "cpu", "repeats": args.repeats, "batches": [row["batch"] for row in rows],
                           "parameters": parameters}, batches=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
