"""Learn one weight-decay coefficient per weight of a linear regression by
hypergradient descent on the validation loss, in a plain PyTorch loop; and
swap NHGD for conjugate gradients by changing one line.

The data are synthetic and built to overfit: fewer training samples than
features, and only a few of the features carry signal. With one small decay
for all weights the model fits the noise; learning a decay per weight (the
outer variable is its log, so it stays positive) shrinks the useless
features and lowers the validation and test loss.

The estimator is the only nhgd_ext object; the two methods are called
identically:

    est = NHGD(list(model.parameters()), [log_decay])       # or ConjugateGradient(...)
    est.inner_step(per_sample_losses, inner_opt)
    est.backward(val_loss, closure); outer_opt.step()

Run:  python examples/learn_weight_decay.py [--outer-steps 100] [--seed 0]
(the tensors are tiny: on a busy machine OMP_NUM_THREADS=1 runs it several times faster)
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch
from torch import nn

from nhgd_ext.estimators import NHGD, ConjugateGradient

#: the one line that differs between the two runs. NHGD's damping stands in
#: for the decay term's own curvature, which the empirical Fisher (gradients
#: of the per-sample losses) does not see; beta = 0.9 forgets the curvature of
#: points the inner loop has left behind.
ESTIMATORS: dict[str, Callable] = {
    "NHGD": lambda inner, outer: NHGD(inner, outer, beta=0.9, damping=0.05),
    "ConjugateGradient": lambda inner, outer: ConjugateGradient(inner, outer, iters=20),
}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outer-steps", type=int, default=100)
    parser.add_argument("--inner-steps", type=int, default=10, help="inner gradient steps per outer step")
    parser.add_argument("--n-train", type=int, default=40)
    parser.add_argument("--n-val", type=int, default=200)
    parser.add_argument("--features", type=int, default=60)
    parser.add_argument("--informative", type=int, default=6, help="features with a nonzero true weight")
    parser.add_argument("--noise", type=float, default=1.0, help="standard deviation of the label noise")
    parser.add_argument("--initial-decay", type=float, default=1e-2)
    parser.add_argument("--max-decay", type=float, default=10.0,
                        help="upper bound on every decay, for a stable inner step size")
    parser.add_argument("--inner-lr", type=float, default=0.05)
    parser.add_argument("--outer-lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def synthetic_regression(args, generator: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    true_weight = torch.zeros(args.features)
    true_weight[:args.informative] = torch.randn(args.informative, generator=generator)

    def draw(n: int):
        x = torch.randn(n, args.features, generator=generator)
        return x, x @ true_weight + args.noise * torch.randn(n, generator=generator)

    return {"train": draw(args.n_train), "val": draw(args.n_val), "test": draw(1000)}


def fit(args, data, make_estimator: Callable | None, label: str = "") -> dict:
    """The user's loop: inner SGD on the decayed training loss, and (unless
    ``make_estimator`` is None, the fixed-decay baseline) an Adam step on the
    log-decays after every ``inner_steps`` inner steps."""
    torch.manual_seed(args.seed)
    model = nn.Linear(args.features, 1)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    log_decay = torch.full((args.features,), math.log(args.initial_decay), requires_grad=True)
    train_x, train_y = data["train"]

    def per_sample_losses() -> torch.Tensor:
        # The decay term goes into every sample's loss, so that the mean of
        # the 1-D tensor handed to the estimator is the whole inner objective.
        squared_error = 0.5 * (model(train_x).squeeze(1) - train_y).square()
        return squared_error + 0.5 * (log_decay.exp() * model.weight.squeeze(0).square()).sum()

    def mse(split: str) -> torch.Tensor:
        x, y = data[split]
        return 0.5 * (model(x).squeeze(1) - y).square().mean()

    inner_opt = torch.optim.SGD(model.parameters(), lr=args.inner_lr, momentum=0.9)
    outer_opt = torch.optim.Adam([log_decay], lr=args.outer_lr)
    est = None if make_estimator is None else make_estimator(list(model.parameters()), [log_decay])

    for outer in range(args.outer_steps):
        for _ in range(args.inner_steps):
            if est is None:
                inner_opt.zero_grad()
                per_sample_losses().mean().backward(inputs=list(model.parameters()))
                inner_opt.step()
            else:
                est.inner_step(per_sample_losses(), inner_opt)
        if est is not None:
            outer_opt.zero_grad()
            # full batch: the closure is the same training loss, with its graph
            est.backward(mse("val"), lambda: per_sample_losses().mean())
            outer_opt.step()
            with torch.no_grad():
                # The decays of useless features grow without bound (their best
                # value is infinite); past about 2 (1 + momentum) / inner_lr
                # the inner SGD would diverge. A decay of 10 already removes a feature.
                log_decay.clamp_(max=math.log(args.max_decay))
                if outer % max(1, args.outer_steps // 4) == 0:
                    print(f"{label:>17}  outer step {outer:4d}  validation loss {float(mse('val')):.4f}")
    with torch.no_grad():
        decay = log_decay.exp()
        return {"val_loss": float(mse("val")), "test_loss": float(mse("test")),
                "decay_informative": float(decay[:args.informative].mean()),
                "decay_other": float(decay[args.informative:].mean())}


def main(argv=None) -> dict:
    args = parse_args(argv)
    data = synthetic_regression(args, torch.Generator().manual_seed(args.seed))
    fixed = fit(args, data, None)
    print(f"fixed decay {args.initial_decay:g}:  validation loss {fixed['val_loss']:.4f}  "
          f"test loss {fixed['test_loss']:.4f}")
    result = {"val_loss_before": fixed["val_loss"], "test_loss_before": fixed["test_loss"]}
    for name, make_estimator in ESTIMATORS.items():
        start = time.perf_counter()
        learned = fit(args, data, make_estimator, label=name)
        seconds = time.perf_counter() - start
        print(f"{name:>17}:  validation loss {learned['val_loss']:.4f}  test loss {learned['test_loss']:.4f}  "
              f"mean decay: informative {learned['decay_informative']:.3g}, "
              f"other {learned['decay_other']:.3g}  ({seconds:.1f} s)")
        key = name.lower()
        result.update({f"val_loss_after_{key}": learned["val_loss"], f"test_loss_after_{key}": learned["test_loss"],
                       f"decay_informative_{key}": learned["decay_informative"],
                       f"decay_other_{key}": learned["decay_other"], f"seconds_{key}": seconds})
    result["val_loss_after"] = result["val_loss_after_nhgd"]
    return result


if __name__ == "__main__":
    main()
