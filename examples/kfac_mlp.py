"""Learn per-class loss weights for a small MLP trained on class-imbalanced
digits, with NHGD keeping a K-FAC inverse Fisher of the network, in a plain
PyTorch loop.

The training set of scikit-learn's 8x8 digits is made imbalanced: classes
0-4 keep many samples, classes 5-9 only a few. Validation and test sets are
balanced. Trained on the plain mean loss, the network (``nn.Sequential`` of
``nn.Linear`` and ``nn.Tanh``) leans towards the frequent classes; the outer
problem learns one loss weight per class (a softmax of an outer tensor,
scaled so the weights average 1) that lowers the balanced validation loss.

NHGD with ``curvature="kfac", modules=model`` tracks Kronecker-factored Fisher
blocks of every ``nn.Linear`` through forward/backward hooks, so the cost
grows with the layer widths, not with the parameter count squared. With
``--fisher sampled`` the Fisher comes from targets drawn from the network's
own predictions instead of the training labels; the loop is unchanged, since
``inner_step`` already gets the logits (``outputs=logits``).

Run:  python examples/kfac_mlp.py [--fisher empirical|sampled] [--outer-steps 40] [--seed 0]
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

FREQUENT, RARE = range(0, 5), range(5, 10)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outer-steps", type=int, default=40)
    parser.add_argument("--inner-steps", type=int, default=10, help="inner SGD steps per outer step")
    parser.add_argument("--frequent", type=int, default=100, help="training samples of each class 0-4")
    parser.add_argument("--rare", type=int, default=4, help="training samples of each class 5-9")
    parser.add_argument("--n-val", type=int, default=15, help="validation samples per class")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="inner mini-batch size (default: the whole training set, a deterministic inner loop)")
    parser.add_argument("--inner-lr", type=float, default=0.2)
    parser.add_argument("--outer-lr", type=float, default=0.1)
    parser.add_argument("--fisher", choices=("empirical", "sampled"), default="empirical")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def imbalanced_digits(args, generator: torch.Generator):
    """{"train", "val", "test"}: (x, y) pairs; the training set imbalanced,
    validation and test balanced (as many test samples per class as the
    smallest class has left)."""
    digits = load_digits()
    x = torch.as_tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(digits.target, dtype=torch.long)
    parts = {"train": [], "val": [], "test": []}
    n_test = min(int((y == c).sum()) for c in range(10)) - args.frequent - args.n_val
    if n_test < 1:
        raise ValueError("--frequent plus --n-val leave no test samples")
    for c in range(10):
        own = torch.nonzero(y == c).squeeze(1)
        own = own[torch.randperm(len(own), generator=generator)]
        n_train = args.frequent if c in FREQUENT else args.rare
        parts["val"].append(own[:args.n_val])
        parts["test"].append(own[args.n_val:args.n_val + n_test])
        parts["train"].append(own[args.n_val + n_test:args.n_val + n_test + n_train])
    return {name: (x[torch.cat(idx)], y[torch.cat(idx)]) for name, idx in parts.items()}


def fit(args, data, learn_weights: bool) -> dict:
    """The user's loop. ``learn_weights=False`` is the baseline: the same
    inner steps on the plain mean loss, no outer step."""
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(64, args.hidden), nn.Tanh(), nn.Linear(args.hidden, 10))
    class_logits = torch.zeros(10, requires_grad=True)
    train_x, train_y = data["train"]
    val_x, val_y = data["val"]
    batches = torch.Generator().manual_seed(args.seed)

    def class_weights() -> torch.Tensor:
        # a softmax keeps the total fixed: the outer step can only move weight
        # between classes, not scale the whole loss (that would act as a step size)
        return 10 * torch.softmax(class_logits, 0)

    def weighted_loss(x, y) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        return class_weights()[y] * F.cross_entropy(logits, y, reduction="none"), logits

    inner_opt = torch.optim.SGD(model.parameters(), lr=args.inner_lr, momentum=0.9)
    outer_opt = torch.optim.Adam([class_logits], lr=args.outer_lr)
    if learn_weights:
        # K-FAC hooks every nn.Linear of `model`; seed: of the targets fisher="sampled" draws
        est = NHGD(list(model.parameters()), [class_logits], curvature="kfac", modules=model,
                   fisher=args.fisher, seed=args.seed)

    def fresh_batch():
        if args.batch_size is None:
            return train_x, train_y
        index = torch.randperm(len(train_y), generator=batches)[:args.batch_size]
        return train_x[index], train_y[index]

    for outer in range(args.outer_steps):
        for _ in range(args.inner_steps):
            losses, logits = weighted_loss(*fresh_batch())
            if learn_weights:
                est.inner_step(losses, inner_opt, outputs=logits)  # the logits serve fisher="sampled"
            else:
                inner_opt.zero_grad()
                losses.mean().backward(inputs=list(model.parameters()))
                inner_opt.step()
        if learn_weights:
            outer_opt.zero_grad()
            est.backward(F.cross_entropy(model(val_x), val_y), lambda: weighted_loss(*fresh_batch())[0].mean())
            outer_opt.step()
            if outer % max(1, args.outer_steps // 4) == 0 or outer == args.outer_steps - 1:
                with torch.no_grad():
                    print(f"outer step {outer:4d}  validation loss {float(F.cross_entropy(model(val_x), val_y)):.4f}"
                          f"  class weights {' '.join(f'{w:.2f}' for w in class_weights().tolist())}")
    if learn_weights:
        est.close()  # takes K-FAC's hooks off the model

    test_x, test_y = data["test"]
    with torch.no_grad():
        predicted = model(test_x).argmax(1)
        rare = torch.isin(test_y, torch.tensor(list(RARE)))
        weights = class_weights()
        return {"val_loss": float(F.cross_entropy(model(val_x), val_y)),
                "test_accuracy": float((predicted == test_y).float().mean()),
                "test_accuracy_rare": float((predicted == test_y)[rare].float().mean()),
                "weight_rare": float(weights[list(RARE)].mean()), "weight_frequent": float(weights[list(FREQUENT)].mean())}


def main(argv=None) -> dict:
    args = parse_args(argv)
    data = imbalanced_digits(args, torch.Generator().manual_seed(args.seed))
    start = time.perf_counter()
    baseline = fit(args, data, learn_weights=False)
    learned = fit(args, data, learn_weights=True)
    result = {"val_loss_before": baseline["val_loss"], "val_loss_after": learned["val_loss"],
              "test_accuracy_before": baseline["test_accuracy"], "test_accuracy_after": learned["test_accuracy"],
              "test_accuracy_rare_before": baseline["test_accuracy_rare"],
              "test_accuracy_rare_after": learned["test_accuracy_rare"],
              "weight_rare": learned["weight_rare"], "weight_frequent": learned["weight_frequent"],
              "seconds": time.perf_counter() - start}
    print(f"plain mean loss:       validation loss {baseline['val_loss']:.4f}  test accuracy "
          f"{baseline['test_accuracy']:.3f} (rare classes {baseline['test_accuracy_rare']:.3f})")
    print(f"learned class weights: validation loss {learned['val_loss']:.4f}  test accuracy "
          f"{learned['test_accuracy']:.3f} (rare classes {learned['test_accuracy_rare']:.3f})")
    print(f"mean weight of a rare class {learned['weight_rare']:.2f}, of a frequent one {learned['weight_frequent']:.2f}"
          f"  (fisher={args.fisher}; {result['seconds']:.1f} s)")
    return result


if __name__ == "__main__":
    main()
