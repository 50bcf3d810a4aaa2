"""Where the sources, the CUDA toolkit and the compiler flags are.

The one build recipe (:func:`extension_arguments`), used by ``setup.py``
(ahead of time) and by ``nhgd_ext._build`` (on first import, where the
wheel was built without torch); both hand it to ``torch.utils.cpp_extension``.

This module must import without torch: ``setup.py`` loads it by file path
(``importlib.util.spec_from_file_location``) inside pip's isolated build
environment, where torch is usually absent. Every use of torch is a lazy
import inside a function.

Order matters for CUDA builds: ``torch.utils.cpp_extension`` reads
``CUDA_HOME`` once, when it is first imported. Call :func:`prepare_cuda_env`
*before* ``import torch.utils.cpp_extension`` (it also patches the module if
it was imported already, but the environment is what child processes see).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

_PKG_DIR = Path(__file__).resolve().parent

# No -std flag of ours: torch's extension builders add the standard that the
# installed torch was compiled with (C++20 for torch 2.14), and compiling
# against a torch in another standard than its own breaks at run time.

# Compute capability compiled when no GPU is visible and TORCH_CUDA_ARCH_LIST
# is unset: the GPUs this project targets are H100 / H200.
DEFAULT_CUDA_ARCH = "9.0"


# --------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------


def source_root() -> Path:
    """The directory holding the C++/CUDA sources (the one named ``csrc``).

    In a source checkout (also an editable install) this is ``<repo>/csrc``;
    in an installed wheel it is ``nhgd_ext/csrc`` inside the package, copied
    there by ``setup.py``'s ``build_py``. A checkout is recognised by the
    ``pyproject.toml`` next to the package, so a stale copy inside the
    package never shadows the real sources.
    """
    repo = _PKG_DIR.parent
    if (repo / "csrc").is_dir() and (repo / "pyproject.toml").is_file():
        return repo / "csrc"
    packaged = _PKG_DIR / "csrc"
    if packaged.is_dir():
        return packaged
    raise FileNotFoundError(
        f"nhgd_ext: C++ sources not found (looked in {repo / 'csrc'} and {packaged}); "
        "reinstall the package"
    )


def _glob(directory: Path, *patterns: str) -> list[Path]:
    found: list[Path] = []
    for pattern in patterns:
        found.extend(p for p in directory.glob(pattern) if p.is_file())
    return found


def sources(with_cuda: bool) -> list[str]:
    """Absolute, sorted paths of the translation units to compile.

    ``csrc/*.cpp``, ``csrc/cpu/*.cpp``, ``csrc/curvature/*.cpp`` and
    ``csrc/pipeline/*.cpp`` (the pipeline's CUDA route compiles to the
    CPU-only factory without ``NHGD_WITH_CUDA``), and with CUDA also
    ``csrc/cuda/*.cpp`` (host glue) and ``csrc/cuda/*.cu`` (kernels). Base
    names are unique across folders: torch's first-import build names each
    object after its source's.
    """
    root = source_root()
    files = _glob(root, "*.cpp") + _glob(root / "cpu", "*.cpp") + _glob(root / "curvature", "*.cpp")
    files += _glob(root / "pipeline", "*.cpp")
    if with_cuda:
        files += _glob(root / "cuda", "*.cpp", "*.cu")
    return sorted(str(p.resolve()) for p in files)


# --------------------------------------------------------------------------
# CUDA toolkit and the pip CUDA wheels
# --------------------------------------------------------------------------


def _cudart_dir(root: Path) -> Path | None:
    """The folder of ``libcudart.so*`` under a toolkit root, if any."""
    candidates = [root / "lib64", root / "lib"]
    candidates += sorted(Path(p) for p in glob.glob(str(root / "targets" / "*" / "lib")))
    for lib in candidates:
        if lib.is_dir() and any(lib.glob("libcudart.so*")):
            return lib
    return None


def _is_toolkit_root(path: str | os.PathLike | None) -> bool:
    if not path:
        return False
    root = Path(path)
    return (root / "include" / "cuda_runtime.h").is_file() and _cudart_dir(root) is not None


def _toolkit_root_of_nvcc(nvcc: str, depth: int = 0) -> str | None:
    """Follow symlinks and wrapper scripts from an ``nvcc`` to its toolkit."""
    if depth > 4:
        return None
    real = Path(os.path.realpath(nvcc))
    root = real.parent.parent
    if _is_toolkit_root(root):
        return str(root)
    # A wrapper script: look for an absolute path ending in /bin/nvcc in it.
    try:
        if real.stat().st_size < 64 * 1024:
            text = real.read_bytes().decode("utf-8", "replace")
            for target in re.findall(r"(/[^\s'\"`;:|&<>()$]*/bin/nvcc)\b", text):
                if Path(target).resolve() != real and Path(target).exists():
                    found = _toolkit_root_of_nvcc(target, depth + 1)
                    if found:
                        return found
    except OSError:
        pass
    if depth == 0:
        # Last resort: ask the driver where it lives (prints `#$ _HERE_=<dir>`).
        try:
            out = subprocess.run(
                [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            match = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.M)
            if match:
                root = Path(match.group(1).strip()).resolve().parent
                if _is_toolkit_root(root):
                    return str(root)
        except (OSError, subprocess.SubprocessError):
            pass
    return None


def cuda_home() -> str | None:
    """The CUDA toolkit root (holds ``include/cuda_runtime.h`` and ``lib64/libcudart.so``).

    A valid ``CUDA_HOME`` / ``CUDA_PATH`` wins; otherwise ``nvcc`` on ``PATH``
    is resolved through symlinks and wrapper scripts (a wrapper in
    ``/usr/local/bin`` would make torch guess ``/usr/local``, which has no
    ``libcudart``); otherwise ``/usr/local/cuda`` if valid; else ``None``.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value and _is_toolkit_root(value):
            return str(Path(value).resolve())
    nvcc = shutil.which("nvcc")
    if nvcc:
        found = _toolkit_root_of_nvcc(nvcc)
        if found:
            return found
    if _is_toolkit_root("/usr/local/cuda"):
        return str(Path("/usr/local/cuda").resolve())
    return None


def _site_dirs() -> list[Path]:
    """site-packages folders of the running interpreter (venv first)."""
    dirs: list[str] = []
    for key in ("purelib", "platlib"):
        dirs.append(sysconfig.get_paths().get(key, ""))
    try:
        import site

        dirs += list(site.getsitepackages())
        dirs.append(site.getusersitepackages())
    except (AttributeError, ImportError):  # some embedded interpreters
        pass
    dirs += [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    seen: list[Path] = []
    for d in dirs:
        if d and Path(d).is_dir() and Path(d).resolve() not in seen:
            seen.append(Path(d).resolve())
    return seen


def _nvidia_dirs(sub: str) -> list[str]:
    """``<site-packages>/nvidia/*/<sub>`` folders, the ``cu*`` bundles first."""
    found: list[str] = []
    for site_dir in _site_dirs():
        nvidia = site_dir / "nvidia"
        if not nvidia.is_dir():
            continue
        pkgs = sorted(p for p in nvidia.iterdir() if (p / sub).is_dir())
        # cu13 (the newest CUDA bundle) before cu12 before anything else.
        pkgs.sort(key=lambda p: (not re.fullmatch(r"cu\d+", p.name), -_num(p.name)))
        for pkg in pkgs:
            path = str((pkg / sub).resolve())
            if path not in found:
                found.append(path)
    return found


def _num(name: str) -> int:
    digits = re.sub(r"\D", "", name)
    return int(digits) if digits else 0


def nvidia_include_dirs() -> list[str]:
    """Header folders of the pip CUDA wheels (``nvidia/cu13/include`` first).

    They hold the CUDA library headers (``cublas_v2.h``, ``cusparse.h``, ...)
    that torch's ``ATen/cuda`` headers include and a bare toolkit may lack.
    """
    return _nvidia_dirs("include")


def ldflags() -> list[str]:
    """Extra linker arguments.

    ``-fopenmp`` records a need for ``libgomp.so.1``; the dynamic linker meets
    it with the copy torch has already loaded, so there is one OpenMP runtime
    and one thread pool. (The CUDA kernels call no CUDA library directly.)
    """
    return ["-fopenmp"]


# --------------------------------------------------------------------------
# decisions and flags
# --------------------------------------------------------------------------


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    if value:
        raise ValueError(f"nhgd_ext: {name} must be 0 or 1, got {os.environ[name]!r}")
    return None


def want_cuda() -> bool:
    """Whether to compile the CUDA kernels.

    ``NHGD_WITH_CUDA=1`` forces them (error if impossible), ``=0`` forbids
    them; unset: yes when torch is a CUDA build and a toolkit is found. A
    visible GPU is deliberately not required: a GPU-less CI must still
    compile (and so check) the CUDA sources.
    """
    import torch

    forced = _env_flag("NHGD_WITH_CUDA")
    if forced is False:
        return False
    torch_cuda = getattr(torch.version, "cuda", None)
    home = cuda_home()
    if forced:
        problems = []
        if torch_cuda is None:
            problems.append(f"torch {torch.__version__} is not a CUDA build")
        if home is None:
            problems.append(
                "no CUDA toolkit found (set CUDA_HOME to the folder holding "
                "include/cuda_runtime.h and lib64/libcudart.so, or put nvcc on PATH)"
            )
        elif not (Path(home) / "bin" / "nvcc").exists():
            problems.append(f"the CUDA toolkit at {home} has no bin/nvcc")
        if problems:
            raise RuntimeError(
                "nhgd_ext: NHGD_WITH_CUDA=1 but the CUDA kernels cannot be built: "
                + "; ".join(problems)
            )
        return True
    return torch_cuda is not None and home is not None and (Path(home) / "bin" / "nvcc").exists()


def prepare_cuda_env() -> str | None:
    """Point torch's extension builder at the real toolkit; returns it.

    Sets ``CUDA_HOME`` when it is unset or not a valid toolkit root, and
    ``TORCH_CUDA_ARCH_LIST`` to ``9.0`` when it is unset and no GPU is
    visible (so a GPU-less build compiles one architecture, not all).

    MUST run before ``torch.utils.cpp_extension`` is imported: that module
    reads ``CUDA_HOME`` at import time. If it was imported already, its
    ``CUDA_HOME`` attribute is corrected too.
    """
    home = cuda_home()
    if home is not None:
        if not _is_toolkit_root(os.environ.get("CUDA_HOME")):
            os.environ["CUDA_HOME"] = home
        module = sys.modules.get("torch.utils.cpp_extension")
        if module is not None and not _is_toolkit_root(getattr(module, "CUDA_HOME", None)):
            module.CUDA_HOME = home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not _gpu_visible():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH
    return home


def _gpu_visible() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available() and torch.cuda.device_count() > 0)
    except Exception:  # no torch, broken driver: treat as no GPU
        return False


def include_dirs(with_cuda: bool) -> list[str]:
    """``csrc`` (and ``csrc/cuda``); with CUDA the toolkit and pip CUDA headers.

    The toolkit's own ``include`` comes before the pip wheels' folders so the
    runtime headers are the ones matching ``nvcc``; the wheels add the
    library headers (cuBLAS, cuSPARSE, ...) that torch's CUDA headers include.
    """
    root = source_root()
    dirs = [str(root)]
    if with_cuda:
        if (root / "cuda").is_dir():
            dirs.append(str(root / "cuda"))
        home = cuda_home()
        if home is not None:
            dirs.append(str(Path(home) / "include"))
        dirs += nvidia_include_dirs()
    return dirs


def cxx_flags(with_cuda: bool) -> list[str]:
    """Host compiler flags. ``NHGD_PORTABLE=1`` drops ``-march=native``."""
    # at::parallel_for is inline OpenMP code: without -fopenmp the CPU kernels
    # would compile it into a serial loop.
    flags = ["-O3", "-fopenmp"]
    if not _env_flag("NHGD_PORTABLE"):
        flags.append("-march=native")
    if with_cuda:
        flags.append("-DNHGD_WITH_CUDA")
    return flags


def nvcc_flags() -> list[str]:
    """nvcc flags for ``csrc/cuda/*.cu`` (the arch list comes from TORCH_CUDA_ARCH_LIST)."""
    return ["-O3", "-DNHGD_WITH_CUDA", "--expt-relaxed-constexpr", "-lineinfo"]


def extension_arguments(with_cuda: bool) -> dict:
    """Sources, include folders and flags of the extension module, as
    ``torch.utils.cpp_extension`` names them for ``load`` (the ahead-of-time
    build maps them onto its Extension)."""
    return {
        "sources": sources(with_cuda),
        "extra_include_paths": include_dirs(with_cuda),
        "extra_cflags": cxx_flags(with_cuda),
        "extra_cuda_cflags": nvcc_flags() if with_cuda else None,
        "extra_ldflags": ldflags(),
    }


def describe() -> dict:
    """What this module found, for messages and ``python nhgd_ext/_toolchain.py``."""
    return {
        "source_root": str(source_root()),
        "cuda_home": cuda_home(),
        "nvidia_include_dirs": nvidia_include_dirs(),
        "ldflags": ldflags(),
    }


if __name__ == "__main__":  # `python nhgd_ext/_toolchain.py`: what a build here would use
    for key, value in describe().items():
        print(f"{key}: {value}")
