"""Data-parallel inner training: what the ranks of a process group combine so
that every rank's estimator sees the step of the union of their batches.

``DistributedDataParallel`` averages gradients in the hooks of
``loss.backward()``; the estimators take theirs with ``torch.autograd.grad``,
which those hooks never see, so they average themselves: the mean gradient,
Hessian-vector and cross products, the outer gradients (means over the
ranks), and the per-sample rows a curvature learns from (gathered: the
union's rows, in rank order). With equal per-rank batches, every rank then
holds the state and the hypergradient of one process stepping on the union.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class DataParallel:
    """The ranks of ``group`` (a ``torch.distributed`` process group)."""

    def __init__(self, group):
        import torch.distributed as dist

        self.dist, self.group = dist, group
        self.world = dist.get_world_size(group)

    @classmethod
    def of(cls, process_group) -> DataParallel | None:
        """``None`` for ``None``; ``"world"`` for the default group (which must
        be initialized); else the group given."""
        if process_group is None:
            return None
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("argument 'process_group': torch.distributed is not initialized "
                             "(call torch.distributed.init_process_group first)")
        return cls(dist.group.WORLD if process_group == "world" else process_group)

    def mean(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The mean over the ranks of each tensor (one all-reduce for all)."""
        tensors = list(tensors)
        if not tensors:
            return tensors
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        self.dist.all_reduce(flat, group=self.group)
        flat /= self.world
        out, start = [], 0
        for t in tensors:
            out.append(flat[start:start + t.numel()].view_as(t))
            start += t.numel()
        return out

    def check_equal_batches(self, batch: int, device: torch.device) -> None:
        """Raises ValueError on every rank (all see the same sums) unless all
        ranks hold ``batch`` samples: the union's mean is the mean of the
        ranks' means, and its rows gather, only for equal batches."""
        sums = torch.tensor([batch, batch * batch], dtype=torch.int64, device=device)
        self.dist.all_reduce(sums, group=self.group)
        total, squares = int(sums[0]), int(sums[1])
        if squares * self.world != total * total:
            raise ValueError(f"inner_step: data-parallel ranks hold batches of different sizes ({total} samples "
                             f"over {self.world} ranks, this one {batch}); give every rank an equal share of "
                             "each batch")

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's rows, stacked in rank order (equal row counts)."""
        found = [torch.empty_like(rows) for _ in range(self.world)]
        self.dist.all_gather(found, rows.detach().contiguous(), group=self.group)
        return torch.cat(found)


def group_of(model) -> object | None:
    """The process group of a ``DistributedDataParallel`` model, else ``None``."""
    return model.process_group if isinstance(model, torch.nn.parallel.DistributedDataParallel) else None
