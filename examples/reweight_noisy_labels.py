"""Learn one weight per training sample so that a model trained on noisy labels
does well on a small clean validation set, with NHGD dropped into a plain
PyTorch training loop.

The data are scikit-learn's 8x8 digits: a training set with 40% of its labels
replaced by a wrong class (seeded), a small clean validation set, and the rest
for testing. The model is a softmax regression (one ``nn.Linear``). The inner
problem trains it on the weighted training loss; the outer problem moves the
per-sample weights (a clip of an outer tensor to [0, 1]) to lower the
validation loss. The only nhgd_ext object is the estimator:

    est = NHGD(list(model.parameters()), [raw_weights], ...)
    est.inner_step(per_sample_losses, inner_opt)        # instead of loss.backward(); opt.step()
    est.backward(val_loss, closure); outer_opt.step()   # instead of val_loss.backward()

Per-sample losses go to ``inner_step`` as a 1-D tensor, so NHGD builds its
Fisher from per-sample gradients (the dense inverse empirical Fisher).

Run:  python examples/reweight_noisy_labels.py [--outer-steps 60] [--seed 0]
(the tensors are tiny: on a busy machine OMP_NUM_THREADS=1 runs it several times faster)
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from nhgd_ext.estimators import NHGD


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outer-steps", type=int, default=60)
    parser.add_argument("--inner-steps", type=int, default=10, help="inner SGD steps per outer step")
    parser.add_argument("--n-train", type=int, default=600, help="noisy training samples")
    parser.add_argument("--n-val", type=int, default=100, help="clean validation samples")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--noise", type=float, default=0.4, help="fraction of training labels made wrong")
    parser.add_argument("--inner-lr", type=float, default=0.5)
    parser.add_argument("--outer-lr", type=float, default=10.0)
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def noisy_digits(n_train: int, n_val: int, noise: float, generator: torch.Generator):
    """(train_x, noisy train_y, corrupted mask), (val_x, val_y), (test_x, test_y)."""
    digits = load_digits()
    x = torch.as_tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=generator)
    train, val, test = order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]
    corrupted = torch.rand(n_train, generator=generator) < noise
    # adding 1..9 modulo 10 gives a uniformly drawn *wrong* class
    offsets = torch.randint(1, 10, (n_train,), generator=generator)
    noisy_y = torch.where(corrupted, (y[train] + offsets) % 10, y[train])
    return (x[train], noisy_y, corrupted), (x[val], y[val]), (x[test], y[test])


def train_uniformly(model: nn.Linear, x, y, steps: int, batch_size: int, lr: float, weight_decay: float,
                    generator: torch.Generator) -> None:
    """The baseline: the same SGD on the noisy set, every sample weighted 1/2
    (the reweighting's starting point), for as many steps as the reweighted run."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        batch = torch.randperm(len(y), generator=generator)[:batch_size]
        loss = 0.5 * F.cross_entropy(model(x[batch]), y[batch]) + weight_decay * sum(
            p.square().sum() for p in model.parameters())
        opt.zero_grad()
        loss.backward()
        opt.step()


@torch.no_grad()
def accuracy(model: nn.Module, x, y) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    (train_x, train_y, corrupted), (val_x, val_y), (test_x, test_y) = noisy_digits(
        args.n_train, args.n_val, args.noise, generator)
    start = time.perf_counter()

    model = nn.Linear(64, 10)
    with torch.no_grad():  # zero is the unique start of a strongly convex problem: no seed dependence
        model.weight.zero_()
        model.bias.zero_()
    baseline = nn.Linear(64, 10)
    baseline.load_state_dict(model.state_dict())

    # Weights are clip(v, 0, 1). They start at 1/2, not 1: clip has zero
    # derivative at the boundary, and a weight stuck at 1 could never fall.
    raw_weights = torch.full((args.n_train,), 0.5, requires_grad=True)

    def sample_weights() -> torch.Tensor:
        return raw_weights.clamp(0.0, 1.0)

    def weighted_losses(batch) -> torch.Tensor:
        """Per-sample inner losses; the regularizer is added to each, so their mean is the inner objective."""
        regularizer = args.weight_decay * sum(p.square().sum() for p in model.parameters())
        losses = F.cross_entropy(model(train_x[batch]), train_y[batch], reduction="none")
        return sample_weights()[batch] * losses + regularizer

    def validation_loss() -> torch.Tensor:
        return F.cross_entropy(model(val_x), val_y)

    inner_opt = torch.optim.SGD(model.parameters(), lr=args.inner_lr)
    outer_opt = torch.optim.SGD([raw_weights], lr=args.outer_lr)
    # damping 0.05: above the regularizer's curvature 2 * weight_decay, which the
    # empirical Fisher (gradients of the data term) does not see; beta = 0.8
    # forgets the curvature of points the inner loop has left behind.
    est = NHGD(list(model.parameters()), [raw_weights], beta=0.8, damping=0.05)

    every_sample = torch.arange(args.n_train)
    for outer in range(args.outer_steps):
        for _ in range(args.inner_steps):
            batch = torch.randperm(args.n_train, generator=generator)[:args.batch_size]
            est.inner_step(weighted_losses(batch), inner_opt)
        outer_opt.zero_grad()
        # The cross term is taken over the whole training set, so that every
        # sample's weight gets a hypergradient at every outer step.
        est.backward(validation_loss(), lambda: weighted_losses(every_sample).mean())
        outer_opt.step()
        with torch.no_grad():
            val_loss = float(validation_loss())
        if outer % max(1, args.outer_steps // 5) == 0 or outer == args.outer_steps - 1:
            print(f"outer step {outer:4d}  validation loss {val_loss:.4f}  "
                  f"test accuracy {accuracy(model, test_x, test_y):.3f}")

    train_uniformly(baseline, train_x, train_y, args.outer_steps * args.inner_steps, args.batch_size,
                    args.inner_lr, args.weight_decay, generator)
    with torch.no_grad():
        weights = sample_weights()
        clean_mass = float(weights[~corrupted].sum() / weights.sum())
        val_loss_before = float(F.cross_entropy(baseline(val_x), val_y))
        val_loss_after = float(validation_loss())
    result = {
        "val_loss_before": val_loss_before,  # the uniformly weighted model, same number of inner steps
        "val_loss_after": val_loss_after,
        "test_accuracy_before": accuracy(baseline, test_x, test_y),
        "test_accuracy_after": accuracy(model, test_x, test_y),
        "clean_fraction_of_samples": float((~corrupted).float().mean()),
        "clean_fraction_of_weight": clean_mass,
        "seconds": time.perf_counter() - start,
    }
    print(f"uniform weights: validation loss {val_loss_before:.4f}, test accuracy {result['test_accuracy_before']:.3f}")
    print(f"learned weights: validation loss {val_loss_after:.4f}, test accuracy {result['test_accuracy_after']:.3f}")
    print(f"weight mass on clean samples: {clean_mass:.3f} (they are {result['clean_fraction_of_samples']:.3f} "
          f"of the samples); {result['seconds']:.1f} s")
    return result


if __name__ == "__main__":
    main()
