"""Overlap of the curvature updates with the inner SGD (paper Algorithm 2).

    python bench/bench_pipeline.py [--dim 1024] [--steps 1000] [--repeats 5] [--device cpu|cuda]
                                   [--consumer-process] [--json PATH]

An inner step (logistic regression, d parameters, its batch sized so that one
step costs about one DenseEFIM update) is timed over the same steps: SGD
alone, SGD with the curvature updated synchronously after every step, and
SGD pushing every gradient into a Pipeline whose consumer updates the
curvature beside it (the final flush included; with the compiled extension
the consumer applies DenseEFIM's updates in C++ without the GIL); then the
pipelined loop again with the curvature behind a Python wrapper ("consumer
in Python": each update is a Python call under the GIL, as for any
curvature without a compiled core); with ``--consumer-process`` also SGD pushing
to a consumer in a second process (``transport="distributed"``, gloo),
which shares no GIL with the producer. Reported: wall time of each / SGD alone
(medians over interleaved repeats), the producer's time per push, and on a
CPU what the two sides' work costs each other (``contention``).

CPU: the producer and the consumer get one intra-op thread each
(torch.set_num_threads(1), consumer_threads=1): two cores, one per side. The
synchronous run gets the same single thread. On a GPU: one device, the
consumer on its own stream.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _report import add_json_argument, write_json

from nhgd_ext.curvature import DenseEFIM
from nhgd_ext.pipeline import Pipeline, serve

WARM_UP = 1100  # samples fed before timing: no refresh in the next 3 * WARM_UP updates


def make_problem(d: int, batch: int, device):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(batch, d, generator=g).to(device)
    y = (torch.rand(batch, generator=g) < 0.5).float().to(device)
    theta = torch.zeros(d, device=device, requires_grad=True)
    return X, y, theta


def warmed_up(d, device="cpu"):
    """A DenseEFIM (the paper's running average, its default) fed WARM_UP
    samples: past the early exact refreshes (at 4, 16, 64, 256, 1024 samples;
    the next is at 4 x WARM_UP), so what is timed next sees the steady
    per-update cost."""
    cur = DenseEFIM(d, device=device)
    cur.update_many(torch.randn(WARM_UP, d, device=device, generator=torch.Generator(device).manual_seed(0)))
    return cur


def sgd_step(X, y, theta, lr=0.1):
    loss = torch.nn.functional.binary_cross_entropy_with_logits(X @ theta, y)
    (grad,) = torch.autograd.grad(loss, theta)
    with torch.no_grad():
        theta.sub_(grad, alpha=lr)
    return grad


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run(mode, d, batch, steps, device, slots):
    X, y, theta = make_problem(d, batch, device)
    if mode.endswith("process"):
        cur = None  # the consumer process owns it (warmed up the same way there)
    else:
        cur = warmed_up(d, device)
        if mode.endswith("in Python"):
            cur = _ThroughPython(cur)
    pipelined = mode.startswith("pipelined")
    push_time = 0.0
    if mode.endswith("process"):
        pipe = Pipeline(None, transport="distributed", consumer_rank=1, producer=device, slots=slots)
    elif pipelined:
        pipe = Pipeline(cur, producer=device, consumer=device, slots=slots, consumer_threads=1)
    else:
        pipe = None
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        grad = sgd_step(X, y, theta)
        if mode.startswith("synchronous"):
            cur.update(grad, batch_size=batch)
        elif pipelined:
            tp = time.perf_counter()
            pipe.push(grad, batch_size=batch)
            push_time += time.perf_counter() - tp
    if pipe is not None:
        pipe.flush()
    sync(device)
    wall = time.perf_counter() - t0
    if pipe is not None:
        assert pipe.num_messages == steps
        route = pipe.route
        pipe.close()
    else:
        route = ""
    return wall, push_time / steps, route


class _ThroughPython:
    """The same DenseEFIM, but without its ``compiled_core`` in sight: the
    consumer calls its ``update`` from Python, under the GIL."""

    def __init__(self, curvature):
        self.dim, self._curvature = curvature.dim, curvature

    def update(self, g, batch_size=1):
        self._curvature.update(g, batch_size)

    def update_many(self, rows, per_step=False):
        self._curvature.update_many(rows, per_step=per_step)

    def solve(self, v):
        return self._curvature.solve(v)


def push_cost(d, device, n=2000):
    """Producer's time per push when no slot is full (one slot per push), the
    consumer busy with the DenseEFIM updates meanwhile (on a CPU: on the
    other core; without the GIL where the extension is compiled)."""
    grad = torch.randn(d, device=device)
    cur = warmed_up(d, device)
    with Pipeline(cur, producer=device, consumer=device, slots=n + 1, consumer_threads=1) as pipe:
        for _ in range(2):  # the first pass allocates every slot's buffer
            sync(device)
            t0 = time.perf_counter()
            for _ in range(n):
                pipe.push(grad, batch_size=8)
            elapsed = time.perf_counter() - t0
            pipe.flush()
    return elapsed / n


def parallelism(d, n=200):
    """How much of a second core this process gets right now: two threads of a
    GIL-free kernel (a matrix-vector product) against one. 2.0 = a free
    second core; 1.0 = none (the machine is busy with other work)."""
    X, t = torch.randn(900, d), torch.randn(d)

    def work():
        for _ in range(n):
            torch.mv(X, t)

    t0 = time.perf_counter()
    work()
    one = time.perf_counter() - t0
    threads = [threading.Thread(target=work) for _ in range(2)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return 2 * one / (time.perf_counter() - t0)


def sleeping_producer(d, device, update_cost, steps=200):
    """The same loop with a producer that waits instead of computing (sleeps
    for one update's time, holding neither the GIL nor a core): separates the
    pipeline's overlap from the machine's free cores. Returns the wall times
    (seconds) of the producer alone, synchronous and pipelined."""
    G = torch.randn(steps, d, device=device)

    def loop(target):
        cur = warmed_up(d, device)
        pipe = Pipeline(cur, producer=device, consumer=device, consumer_threads=1) if target == "pipelined" else None
        t0 = time.perf_counter()
        for i in range(steps):
            time.sleep(update_cost)
            if target == "synchronous":
                cur.update(G[i])
            elif target == "pipelined":
                pipe.push(G[i])
        if pipe is not None:
            pipe.flush()
            pipe.close()
        sync(device)
        return time.perf_counter() - t0

    return loop("alone"), loop("synchronous"), loop("pipelined")


def contention(d, batch, n, repeats=3):
    """What each side's work costs the other on this machine (a shared core
    or its clock, the caches, the memory bandwidth): n updates are queued at
    once (slots for all) and the consumer thread drains them while the
    producer thread sleeps, or runs SGD steps; and the SGD step alone. No
    overlap hides this share. CPU only. Returns medians in seconds: the
    consumer's time per update with the producer sleeping and busy, the SGD
    step's alone and while the consumer drains."""
    X, y, theta = make_problem(d, batch, "cpu")
    G = torch.randn(n, d)

    def drain(producer_busy):
        with Pipeline(warmed_up(d), slots=n, consumer_threads=1) as pipe:
            t0 = time.perf_counter()
            for g in G:
                pipe.push(g)
            # flush waits without the GIL: this thread keeps the producer's work going
            flusher = threading.Thread(target=pipe.flush)
            flusher.start()
            steps, t_steps = 0, 0.0
            while flusher.is_alive():
                if producer_busy:
                    ts = time.perf_counter()
                    sgd_step(X, y, theta)
                    t_steps += time.perf_counter() - ts
                    steps += 1
                else:
                    time.sleep(0.0005)
            flusher.join()
            return (time.perf_counter() - t0) / n, t_steps / max(steps, 1)

    rows = []
    for _ in range(repeats):
        sleeping, _ = drain(False)
        busy, step_during = drain(True)
        step_alone = run("sgd", d, batch, 200, "cpu", slots=1)[0] / 200
        rows.append((sleeping, busy, step_alone, step_during))
    return tuple(statistics.median(column) for column in zip(*rows))


def after_sleep(d, device, pause, n=500):
    """Median time of a small piece of work (a clone and an add of one
    gradient) right after sleeping ``pause`` seconds, and in a tight loop: how
    much slower anything a sleeping producer does after waking runs on this
    machine, pipeline or not."""
    g = torch.randn(d, device=device)

    def median(sleep):
        times = []
        for _ in range(n):
            if sleep:
                time.sleep(pause)
            t0 = time.perf_counter()
            g.clone().add_(1.0)
            sync(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return median(True), median(False)


def _consumer_process(d: int, runs: int) -> None:
    """Rank 1 of ``--consumer-process``: one warmed-up DenseEFIM served per
    pipelined run, all warmed up before the first (so this process is idle
    while the producer times its other modes)."""
    curvatures = [warmed_up(d) for _ in range(runs)]
    dist.barrier()
    for cur in curvatures:
        serve(cur, producer_rank=0)


def _process_worker(rank: int, port: int, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        if rank == 1:
            _consumer_process(args.dim, args.repeats)
        else:
            dist.barrier()
            measure(args)
    finally:
        dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=1000,
                        help=f"at most {3 * WARM_UP}: no refresh falls inside the timing")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--consumer-process", action="store_true",
                        help="also time the consumer in a second process (transport='distributed', gloo)")
    add_json_argument(parser)
    args = parser.parse_args()
    if args.steps > 3 * WARM_UP:
        parser.error(f"--steps must be at most {3 * WARM_UP}")
    if args.consumer_process:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        mp.spawn(_process_worker, args=(port, args), nprocs=2, join=True)
    else:
        measure(args)


def measure(args):
    device = args.device
    if torch.device(device).type == "cpu":
        torch.set_num_threads(1)
    d = args.dim
    before = parallelism(d) if torch.device(device).type == "cpu" else 0.0
    # The batch whose step costs about one update, measured inside the loop
    # (the step's data and the curvature's matrix evict each other from the
    # caches, so isolated timings of either are too optimistic).
    # The update's cost in the loop grows with the batch (more data to evict
    # the matrix), so the batch is refitted a few times and both costs are
    # reported as measured at the batch used.
    def costs(batch):
        sgd_alone = statistics.median(run("sgd", d, batch, 200, device, args.slots)[0] for _ in range(3))
        with_updates = statistics.median(run("synchronous", d, batch, 200, device, args.slots)[0] for _ in range(3))
        # a difference of two noisy medians: on a busy machine it can come out
        # at or below zero, which no sleep below can mimic; 1 us is the floor
        return max((with_updates - sgd_alone) / 200, 1e-6), sgd_alone / 200

    batch = 256
    for _ in range(4):
        update, step = costs(batch)
        batch = max(1, round(batch * update / step))
    update, step = costs(batch)
    # Every ratio printed is computed once, for the line and the JSON alike:
    # the test recomputes each from the times it is made of.
    ratios = {"update / step": update / step}
    # A consumer that needs longer per update than the producer per step sets
    # the pace: the pipelined loop cannot beat max(1, update / step) of SGD alone.
    print(f"d = {d}, device = {device}, SGD batch {batch}: one DenseEFIM update in the loop "
          f"{update * 1e3:.3f} ms, one SGD step {step * 1e3:.3f} ms (update / step {ratios['update / step']:.2f})")
    walls = {"sgd": [], "synchronous": [], "pipelined": [], "pipelined, in Python": []}
    if args.consumer_process:
        walls["pipelined, process"] = []
    pushes, route = [], ""
    for _ in range(args.repeats):
        for mode in walls:
            wall, push, r = run(mode, d, batch, args.steps, device, args.slots)
            walls[mode].append(wall)
            if mode == "pipelined":
                pushes.append(push)
                route = r
    medians = {mode: statistics.median(values) for mode, values in walls.items()}
    base = medians["sgd"]
    print(f"{'mode':<24}{'wall (s)':>10}{'/ SGD alone':>13}")
    for mode in walls:
        ratio = ratios[f"{mode} / sgd"] = medians[mode] / base
        print(f"{mode:<24}{medians[mode]:>10.3f}{ratio:>13.2f}")
    # The timed runs' own ratio of one update to one step: the calibration
    # above can drift on a busy machine, and past 1 the consumer sets the pace.
    update_per_step = medians["synchronous"] / base - 1
    print(f"update / step in these runs (synchronous / SGD alone - 1): {update_per_step:.2f}")
    push = {"route": route, "times": pushes, "median": statistics.median(pushes), "no_slot_full": push_cost(d, device)}
    print(f"route {route}; producer's time per push in the pipelined loop (waits on full slots "
          f"included): {push['median'] * 1e6:.1f} us")
    print(f"producer's time per push, no slot full, the consumer updating meanwhile: "
          f"{push['no_slot_full'] * 1e6:.1f} us (one gradient of {d} float32)")
    asleep = dict(zip(("alone", "synchronous", "pipelined"), sleeping_producer(d, device, update)))
    ratio_sync = ratios["sleeping: synchronous / alone"] = asleep["synchronous"] / asleep["alone"]
    ratio_pipe = ratios["sleeping: pipelined / alone"] = asleep["pipelined"] / asleep["alone"]
    print(f"producer that sleeps {update * 1e3:.3f} ms per step instead of computing: "
          f"synchronous / alone {ratio_sync:.2f}, pipelined / alone {ratio_pipe:.2f}")
    woken, warm = after_sleep(d, device, update)
    print(f"a clone and an add of one gradient right after such a sleep: {woken * 1e6:.1f} us, "
          f"in a tight loop: {warm * 1e6:.1f} us")
    report = {"calibration": {"update": update, "step": step}, "medians": medians, "times": walls,
              "ratios": ratios, "update_per_step_in_runs": update_per_step, "push": push,
              "sleeping_producer": {"sleep": update, **asleep}, "after_sleep": {"woken": woken, "warm": warm}}
    if torch.device(device).type == "cpu":
        queued = 600
        sleeping, busy, step_alone, step_during = contention(d, batch, queued)
        ratio_busy = ratios["contention: consumer busy / sleeping"] = busy / sleeping
        ratio_during = ratios["contention: step during / alone"] = step_during / step_alone
        print(f"consumer's time per update, {queued} queued at once: producer sleeping {sleeping * 1e6:.1f} us, "
              f"producer running SGD steps {busy * 1e6:.1f} us ({ratio_busy:.2f} x)")
        print(f"SGD step alone {step_alone * 1e6:.1f} us, while the consumer drains them "
              f"{step_during * 1e6:.1f} us ({ratio_during:.2f} x)")
        after = parallelism(d)
        print(f"second core available to this process (2 threads / 1 thread of GIL-free work, "
              f"measured before and after): {before:.2f}, {after:.2f}")
        report["contention"] = {"queued": queued, "consumer_sleeping": sleeping, "consumer_busy": busy,
                                "step_alone": step_alone, "step_during": step_during}
        report["parallelism"] = {"before": before, "after": after}
    write_json(args.json, {"device": device, "dim": d, "steps": args.steps, "repeats": args.repeats,
                           "slots": args.slots, "batch": batch, "consumer_process": args.consumer_process},
               **report)


if __name__ == "__main__":
    main()
