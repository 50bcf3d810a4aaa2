"""NHGD's curvature updates in a second process (paper Algorithm 2), over
torch.distributed: rank 0 runs the inner SGD and pushes each step's gradient,
rank 1 owns the inverse empirical Fisher and answers the solve.

    torchrun --nproc-per-node 2 examples/pipeline_distributed.py            # gloo, CPU
    torchrun --nproc-per-node 2 examples/pipeline_distributed.py --cuda     # NCCL, one GPU per rank

or without torchrun: python examples/pipeline_distributed.py --spawn
(starts both processes with torch.multiprocessing on localhost).

The problem is a ridge regression, whose Hessian is known, so the example
prints how far the Fisher-based solve is from the exact H^-1 v.
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist

from nhgd_ext.curvature import DenseEFIM
from nhgd_ext.pipeline import Pipeline, serve

D, N, STEPS, BATCH = 20, 4000, 3000, 16


def data(device):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, D, generator=g, dtype=torch.float64)
    theta_true = torch.randn(D, generator=g, dtype=torch.float64)
    y = X @ theta_true + torch.randn(N, generator=g, dtype=torch.float64)  # unit noise: Fisher = Hessian
    return X.to(device), y.to(device)


def producer(device):
    X, y = data(device)
    theta = torch.zeros(D, dtype=torch.float64, device=device, requires_grad=True)
    g = torch.Generator().manual_seed(1)
    with Pipeline(None, transport="distributed", consumer_rank=1, producer=device) as pipe:
        for _ in range(STEPS):
            idx = torch.randint(0, N, (BATCH,), generator=g).to(device)
            loss = 0.5 * ((X[idx] @ theta - y[idx]) ** 2).mean()
            (grad,) = torch.autograd.grad(loss, theta)
            with torch.no_grad():
                theta -= 0.05 * grad
            pipe.push(grad, batch_size=BATCH)  # returns at once; rank 1 updates the inverse
        v = torch.ones(D, dtype=torch.float64, device=device)
        w = pipe.solve(v)  # answered by rank 1 after every pushed update
        exact = torch.linalg.solve(X.T @ X / N, v)
        print(f"rank 0: {pipe.num_updates} updates applied on rank 1; "
              f"|w - H^-1 v| / |H^-1 v| = {float((w - exact).norm() / exact.norm()):.3f}")


def consumer(device):
    stats = serve(DenseEFIM(D, beta=None, dtype=torch.float64, device=device), producer_rank=0)
    print(f"rank 1: served {stats['messages']} messages")


def main(rank=None, world=None, port=None, cuda=False):
    if rank is not None:  # started by --spawn
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    else:  # started by torchrun
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        (producer if rank == 0 else consumer)(device)
    finally:
        dist.destroy_process_group()


def _spawned(rank, port):
    main(rank, 2, port)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuda", action="store_true", help="NCCL, one GPU per rank (torchrun only)")
    parser.add_argument("--spawn", action="store_true", help="start both ranks here (gloo, CPU)")
    args = parser.parse_args()
    if args.spawn:
        import torch.multiprocessing as mp

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_spawned, args=(port,), nprocs=2)
    elif "RANK" in os.environ:
        main(cuda=args.cuda)
    else:
        parser.error("start it with torchrun --nproc-per-node 2, or pass --spawn")
