"""pytest configuration for the op microbenchmarks (bench/bench_ops.py)."""

from __future__ import annotations

import platform

import torch


def pytest_report_header(config):
    lines = [f"torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.get_num_threads()} CPU threads, "
             f"{platform.processor() or platform.machine()}"]
    if torch.cuda.is_available():
        lines.append(f"GPU: {torch.cuda.get_device_name()}")
    try:
        import nhgd_ext

        lines.append(f"nhgd_ext backend: cpu={nhgd_ext.backend('cpu')} default={nhgd_ext.backend()} "
                     f"compiled_with_cuda={nhgd_ext.compiled_with_cuda()}")
    except Exception as err:  # noqa: BLE001 - a header must not break collection
        lines.append(f"nhgd_ext import failed: {err!r}")
    return lines


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        machine_info["gpu"] = torch.cuda.get_device_name()
    try:
        import nhgd_ext

        machine_info["nhgd_ext_backend"] = {"cpu": nhgd_ext.backend("cpu"), "default": nhgd_ext.backend()}
    except Exception:  # noqa: BLE001
        pass
