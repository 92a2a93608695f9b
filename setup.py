"""setuptools entry point. Package metadata lives in pyproject.toml; this file adds the compiled
extension `fastformer._C` (sources in csrc/): the fused optimizer, and CPU training kernels:

- always the CPU part (OpenMP, -O3 -march=native so the loops vectorise): csrc/adam_cpu.cpp (fused
  Adam/AdamW, gradient norms), csrc/dropout_cpu.cpp (one-pass dropout for the BERT model on CPU),
  csrc/cross_entropy_cpu.cpp (the softmax cross-entropy rows of ff.linear_cross_entropy on CPU),
  csrc/cpu_env.cpp (flush-to-zero / denormals-are-zero on every CPU thread, for the trainer);
- plus the CUDA part (csrc/adam_cuda.cu + csrc/adam_cuda_binding.cpp) when torch was built with CUDA
  and nvcc is found (sm_80 and sm_90 code, and sm_90's PTX for newer GPUs; FASTFORMER_CUDA_ARCHS="80;90;100"
  to change).

If the extension cannot be compiled (no compiler, no torch headers) the install still succeeds and
fastformer.optim falls back to torch's optimizers with a warning (and the CPU kernels to torch
math). FASTFORMER_NO_EXT=1 skips the build.
"""

import os
import platform
import re
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name):
    """Whether the environment variable is on: unset, "", 0, false, off and no (any case) are off, so
    FASTFORMER_NO_EXT=0 still builds. The same rule as fastformer/_extension.py:env_flag (not imported:
    the package needs torch and is not installed yet when this runs)."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "off", "no")


def _cxx_flags():
    flags = ["-O3", "-fopenmp", "-fno-math-errno"]  # -std: torch's BuildExtension adds the one its headers need
    if platform.machine() in ("x86_64", "AMD64") and not _env_flag("FASTFORMER_PORTABLE"):
        flags.append("-march=native")  # AVX2/AVX-512 for the Adam loop; FASTFORMER_PORTABLE=1 for a generic build
    return flags


def _torch_arch(arch: str) -> str | None:
    """A FASTFORMER_CUDA_ARCHS entry ("80", "90a", "100") in TORCH_CUDA_ARCH_LIST's form ("8.0", "9.0a",
    "10.0"): the last digit is the minor version, a letter after it stays a suffix; None when it is not one."""
    m = re.fullmatch(r"(\d+)(\d)([a-z]?)", arch)
    return None if m is None else f"{m[1]}.{m[2]}{m[3]}"


def _ptx_arch(archs: list[str]) -> str | None:
    """The architecture whose PTX the build also carries: the highest one without a suffix ("90a" PTX
    runs on sm_90a only). A newer GPU (sm_100, sm_120) then JIT-compiles it at load time instead of
    finding no kernel image."""
    plain = [a for a in archs if a.isdigit()]
    return max(plain, key=int) if plain else None


def _gencode(archs: list[str]) -> list[str]:
    """nvcc's -gencode flags: SASS for every architecture, and the PTX of `_ptx_arch`."""
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    ptx = _ptx_arch(archs)
    if ptx is not None:
        flags += ["-gencode", f"arch=compute_{ptx},code=compute_{ptx}"]
    return flags


def _cuda_archs() -> list[str]:
    """FASTFORMER_CUDA_ARCHS (default "80;90") as a list; an entry that is no compute capability is left
    out with a message (a build setting never fails the install)."""
    archs = [a.strip() for a in os.environ.get("FASTFORMER_CUDA_ARCHS", "80;90").replace(",", ";").split(";")]
    bad = [a for a in archs if a and _torch_arch(a) is None]
    if bad:
        print(f"fastformer: FASTFORMER_CUDA_ARCHS: ignoring {bad} (not a compute capability such as 80, 90 or 90a)")
    return [a for a in archs if a and a not in bad]


def _ext_modules_and_cmdclass():
    if _env_flag("FASTFORMER_NO_EXT"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except Exception as e:  # noqa: BLE001 - no torch at build time: pure-Python install, torch fallback at run time
        print(f"fastformer: not building the fused-optimizer extension ({e})", file=sys.stderr)
        return [], {}
    csrc = os.path.join("csrc")
    cxx = _cxx_flags()
    cuda_home = getattr(ce, "CUDA_HOME", None)
    nvcc = shutil.which("nvcc") or (cuda_home and os.path.join(cuda_home, "bin", "nvcc"))
    with_cuda = bool(torch.version.cuda) and bool(nvcc) and os.path.exists(nvcc or "")
    cpu_sources = [
        os.path.join(csrc, f) for f in ("adam_cpu.cpp", "dropout_cpu.cpp", "cross_entropy_cpu.cpp", "cpu_env.cpp")
    ]
    cuda_sources = [os.path.join(csrc, "adam_cuda.cu"), os.path.join(csrc, "adam_cuda_binding.cpp")]
    archs = _cuda_archs()

    def cpu_extension():
        return ce.CppExtension(
            "fastformer._C",
            list(cpu_sources),
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )

    ext = cpu_extension()
    if with_cuda:
        gencode = _gencode(archs)
        try:
            ext = ce.CUDAExtension(
                "fastformer._C",
                cpu_sources + cuda_sources,
                include_dirs=[os.path.join(HERE, "csrc")],
                define_macros=[("FASTFORMER_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3", *gencode]},
                extra_link_args=["-fopenmp"],
            )
        except Exception as e:  # noqa: BLE001 - e.g. CUDA_HOME not found: the CPU part alone
            print(f"fastformer: CUDA part of the extension disabled ({e})", file=sys.stderr)

    class OptionalBuildExt(ce.BuildExtension):
        """Build the extension, but never fail the install because of it: when the CUDA build fails
        (nvcc / torch CUDA version mismatch, compile error) retry the CPU part alone, and when that
        fails too install without it (fastformer.optim then warns and uses torch's optimizers)."""

        def run(self):
            inplace = self.inplace  # setuptools clears it during run(); a retry needs it back
            try:
                super().run()
                return
            except Exception as e:  # noqa: BLE001
                print(f"fastformer: building the fused-optimizer extension failed ({e})", file=sys.stderr)
            if any(s.endswith(".cu") for x in self.extensions for s in x.sources):
                print("fastformer: retrying with the CPU part only", file=sys.stderr)
                for x in self.extensions:  # in place: setuptools has already annotated these objects
                    x.sources = [s for s in x.sources if s not in cuda_sources and not s.endswith(".cu")]
                    x.define_macros = [m for m in x.define_macros if m[0] != "FASTFORMER_WITH_CUDA"]
                self.compiler = None  # a fresh compiler object for the second run
                self.inplace = inplace
                try:
                    super().run()
                    return
                except Exception as e:  # noqa: BLE001
                    print(f"fastformer: CPU build failed too ({e})", file=sys.stderr)
            print("fastformer: installing without the extension; the torch fallback will be used", file=sys.stderr)

    # Arch list for torch's own flags (avoids a warning and a build for every arch torch knows).
    if with_cuda:
        ptx = _ptx_arch(archs)
        os.environ.setdefault(
            "TORCH_CUDA_ARCH_LIST", " ".join(_torch_arch(a) + ("+PTX" if a == ptx else "") for a in archs)
        )
    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=bool(shutil.which("ninja")))}


ext_modules, cmdclass = _ext_modules_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
