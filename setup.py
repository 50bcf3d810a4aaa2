"""Build script for nhgd_ext (metadata lives in pyproject.toml).

Two ways to install:

* ``pip install .`` (build isolation, no torch in the build environment):
  nothing is compiled now. The wheel carries the C++/CUDA sources as
  ``nhgd_ext/csrc`` and ``nhgd_ext._build`` compiles them on first import.
* ``pip install --no-build-isolation [-e] .`` with torch installed: the
  extension ``nhgd_ext._C`` is compiled ahead of time, with the CUDA kernels
  when torch is a CUDA build and a CUDA toolkit is found (GPU or not), or as
  ``NHGD_WITH_CUDA=0/1`` says.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
SOURCE_SUFFIXES = {".h", ".hpp", ".cuh", ".cpp", ".cc", ".cu", ".inl"}


def load_toolchain():
    """nhgd_ext/_toolchain.py, loaded by path: importing the package needs torch."""
    spec = importlib.util.spec_from_file_location(
        "_nhgd_ext_toolchain", ROOT / "nhgd_ext" / "_toolchain.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class build_py_with_sources(build_py):
    """Also copies ``<repo>/csrc`` into the package as ``nhgd_ext/csrc``.

    The installed package then compiles itself on first import when no
    ahead-of-time extension was built. Editable installs keep using the
    checkout's ``csrc`` and copy nothing.
    """

    def _source_files(self) -> list[Path]:
        if not CSRC.is_dir():
            raise FileNotFoundError(f"nhgd_ext: missing C++ sources in {CSRC}")
        return sorted(p for p in CSRC.rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES)

    def _target(self) -> Path:
        return Path(self.build_lib) / "nhgd_ext" / "csrc"

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = self._target()
        if target.exists():
            shutil.rmtree(target)
        for src in self._source_files():
            dst = target / src.relative_to(CSRC)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = list(super().get_outputs(include_bytecode))
        if not getattr(self, "editable_mode", False):
            target = self._target()
            outputs += [str(target / p.relative_to(CSRC)) for p in self._source_files()]
        return outputs


def extension_modules(toolchain) -> tuple[list, dict]:
    """The ahead-of-time extension when torch is importable, else nothing."""
    try:
        import torch  # noqa: F401
    except ImportError:
        print(
            "nhgd_ext: torch is not importable here (build isolation?); the wheel "
            "carries the C++ sources and compiles them on first import",
            file=sys.stderr,
        )
        return [], {}

    with_cuda = toolchain.want_cuda()
    # Before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
    toolchain.prepare_cuda_env()
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    kind = CUDAExtension if with_cuda else CppExtension
    print(
        f"nhgd_ext: compiling nhgd_ext._C ahead of time "
        f"({'C++ and CUDA' if with_cuda else 'C++ only'}"
        + (
            f"; CUDA_HOME={os.environ.get('CUDA_HOME')}, "
            f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')}"
            if with_cuda
            else ""
        )
        + ")",
        file=sys.stderr,
    )
    recipe = toolchain.extension_arguments(with_cuda)  # the same as the first-import build's
    ext = kind(
        name="nhgd_ext._C",
        sources=[os.path.relpath(s, ROOT) for s in recipe["sources"]],
        include_dirs=recipe["extra_include_paths"],
        extra_compile_args={"cxx": recipe["extra_cflags"], "nvcc": recipe["extra_cuda_cflags"] or []},
        extra_link_args=recipe["extra_ldflags"],
        py_limited_api=False,
    )
    return [ext], {"build_ext": _cached_build_ext(BuildExtension, with_cuda)}


def _cached_build_ext(base, with_cuda: bool):
    """BuildExtension without -g, whose editable builds keep their objects in ``build/``.

    setuptools puts the objects of an editable build in a fresh temporary
    folder, so every ``pip install -e .`` would recompile everything (minutes
    for the CUDA sources); a fixed folder lets ninja rebuild only what
    changed (it tracks both the command lines and the headers).
    """

    class build_ext(base):
        def build_extensions(self) -> None:
            # Python's own CFLAGS carry -g; with the torch headers that makes
            # every translation unit several times slower to compile (and the
            # module much larger). NHGD_DEBUG=1 keeps it.
            if os.environ.get("NHGD_DEBUG") != "1":
                for attr in ("compiler_so", "compiler_cxx", "linker_so"):
                    cmd = getattr(self.compiler, attr, None)
                    if isinstance(cmd, list) and "-g" in cmd:
                        self.compiler.set_executable(attr, [f for f in cmd if f != "-g"])
            super().build_extensions()

        def finalize_options(self) -> None:
            super().finalize_options()
            if getattr(self, "editable_mode", False):
                tag = f"{sys.implementation.cache_tag}-{'cuda' if with_cuda else 'cpu'}"
                self.build_temp = str(ROOT / "build" / f"editable-{tag}")

    return build_ext


toolchain = load_toolchain()
ext_modules, ext_cmdclass = extension_modules(toolchain)

setup(
    packages=find_packages(include=["nhgd_ext", "nhgd_ext.*"]),
    ext_modules=ext_modules,
    cmdclass={"build_py": build_py_with_sources, **ext_cmdclass},
    zip_safe=False,
)
