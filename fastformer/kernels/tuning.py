"""Self-tuning of kernel configurations: chosen on the user's GPU at first use, cached on disk.

    cfg = choose("attention.fwd:d128", "bfloat16|causal|L4096|BH64", default, candidates, run, device)

On a CUDA device, the first call for a (GPU name, Triton version, kernel, shape class) times `run(c)`
for the default and each candidate `c` that passed the kernel report's gates on this Triton version
and GPU generation (`gate_results/<family>.json`, written by `scripts/kernel_report.py
--write-gates`), keeps the fastest, writes it to a JSON file in the cache folder and returns it. Later
calls, in this process or any later one, return the cached choice without timing anything.

- `FASTFORMER_TUNE=0`, or `set_tuning(False)` / `with use_tuning(False):` in code (process wide),
  pins the built-in defaults (nothing is timed, the cache is not read).
- `FASTFORMER_TUNE_CACHE=DIR` puts the cache in DIR (default `$XDG_CACHE_HOME/fastformer/tuning`,
  i.e. `~/.cache/fastformer/tuning`). A folder shared by the machines of a cluster makes them all use
  the first choice written for their GPU: entries are never overwritten (the first writer wins, under
  a file lock), and a process that finds an entry on disk takes it instead of timing. The file's name
  holds a digest of the kernel sources (`kernels_tag`), so another version of fastformer tunes anew;
  an entry that is not the default or an allowed candidate (hand-edited, corrupted) is ignored.
- A candidate that fails (compile error, out of shared memory or registers) is skipped. Nothing is
  tuned on CPU (the Triton interpreter), while capturing launches for the kernel report, or inside a
  CUDA graph capture: those use the cached choice if this process already has one, else the default.
- Results are bitwise reproducible for the same choice (the same configuration gives the same bits:
  every kernel is deterministic), so runs that must match bit for bit should share the cache file or
  pin the defaults. Different configurations sum in different orders and differ by rounding.

No triton import at module import time (the reference path imports this module).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

TUNE_ENV = "FASTFORMER_TUNE"
CACHE_ENV = "FASTFORMER_TUNE_CACHE"
GATES_DIR = Path(__file__).resolve().parent / "gate_results"

_lock = threading.RLock()
_enabled: bool | None = None  # set_tuning: process wide (autograd's backward threads too)
_blocks: list = []  # use_tuning blocks in force, innermost last: [token, enabled]; they win over _enabled
_memory: dict = {}  # (gpu, triton, kernel, shape_class) -> config tuple
_log: list = []  # choices made or loaded in this process (for benchmark reports)
_forced: dict = {}  # kernel -> config, set by force_config() (the kernel report, tests)


# ----------------------------------------------------------------------------------------------
# switches
# ----------------------------------------------------------------------------------------------


def tuning_enabled() -> bool:
    """False when FASTFORMER_TUNE=0, set_tuning(False) or a `use_tuning(False)` block is in force."""
    with _lock:
        value = _blocks[-1][1] if _blocks else _enabled
    if value is not None:
        return value
    return os.environ.get(TUNE_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def set_tuning(enabled: bool | None) -> None:
    """Turn tuning on or off (None: back to FASTFORMER_TUNE). Process wide, not per thread: autograd
    runs a CUDA backward on its own device thread, which must see the switch too."""
    global _enabled
    with _lock:
        _enabled = None if enabled is None else bool(enabled)


@contextlib.contextmanager
def use_tuning(enabled: bool):
    """`with use_tuning(False):` pins the built-in defaults inside the block (process wide, the
    backward of a loss computed in the block included when it runs inside it). The innermost block
    in force decides; blocks of several threads may end in any order (each removes only itself)."""
    token = object()
    with _lock:
        _blocks.append([token, bool(enabled)])
    try:
        yield
    finally:
        with _lock:
            _blocks[:] = [b for b in _blocks if b[0] is not token]


@contextlib.contextmanager
def force_config(kernel: str, config: tuple):
    """Inside the block, choose() returns `config` for `kernel` (the kernel report compiles each
    candidate through the real launcher this way)."""
    with _lock:
        previous = _forced.get(kernel)
        _forced[kernel] = tuple(config)
    try:
        yield
    finally:
        with _lock:
            if previous is None:
                _forced.pop(kernel, None)
            else:
                _forced[kernel] = previous


def cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastformer" / "tuning"


def bucket(n: int, lo: int = 1, hi: int = 1 << 30) -> int:
    """The power of two at or above n, clamped to [lo, hi]: shape classes group similar sizes."""
    n = max(int(n), 1)
    return int(min(max(1 << (n - 1).bit_length(), lo), hi))


# ----------------------------------------------------------------------------------------------
# what is allowed: the kernel report's gate results
# ----------------------------------------------------------------------------------------------


def config_id(config: Sequence[int]) -> str:
    return ",".join(str(int(x)) for x in config)


def _load_gate_results(family: str) -> dict:
    path = GATES_DIR / f"{family}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def gates_allow(
    kernel: str, config: Sequence[int], arch: int | None, triton_version: str, results: dict | None = None
) -> bool:
    """Whether `config` of `kernel` ("family.kind:dNN") passed the report's gates for this Triton
    version and GPU generation. An unrecorded Triton version: it must have passed on every recorded
    one; an unrecorded arch: the nearest recorded one below it, or every recorded one. A candidate
    the report never compiled is not allowed."""
    family = kernel.split(".", 1)[0]
    data = results if results is not None else _load_gate_results(family)
    versions = data.get("triton", {})
    chosen = [versions[triton_version]] if triton_version in versions else list(versions.values())
    if not chosen:
        return False
    cid = config_id(config)
    for per_arch in chosen:
        archs = sorted(int(a.removeprefix("sm_")) for a in per_arch)
        below = [a for a in archs if arch is not None and a <= arch]
        use = [below[-1]] if below else archs
        if not use:
            return False
        for a in use:
            verdict = per_arch[f"sm_{a}"].get(kernel, {}).get(cid)
            if verdict is None or verdict.get("failed"):
                return False
    return True


# ----------------------------------------------------------------------------------------------
# the disk cache
# ----------------------------------------------------------------------------------------------


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80]


@functools.lru_cache(maxsize=1)
def kernels_tag() -> str:
    """A digest of this package's kernel sources and launchers (fastformer/kernels/*.py): part of the
    cache file's name, so that a choice made for other kernels, or for configuration tuples that meant
    something else, is never used after fastformer changes them (a new file is tuned instead)."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).resolve().parent.glob("*.py")):
        if f.name.startswith("."):  # an editor's lock or backup file, perhaps a dangling link
            continue
        try:
            data = f.read_bytes()
        except OSError:
            continue
        h.update(f.name.encode())
        h.update(data)
    return h.hexdigest()[:12]


def cache_file(gpu: str, triton_version: str) -> Path:
    return cache_dir() / f"{_safe(gpu)}__triton-{_safe(triton_version)}__kernels-{kernels_tag()}.json"


def _read(path: Path) -> dict:
    """The cache file's entries ({} for a missing, unreadable or malformed file)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    entries = data.get("entries") if isinstance(data, dict) else None
    return entries if isinstance(entries, dict) else {}


def _valid_config(entry, allowed: list[tuple]) -> tuple | None:
    """An entry's configuration when it is one this process may launch (the default, or a candidate
    the gates allow on this GPU and Triton): anything else (a hand-edited or corrupted entry) is
    treated as missing, never launched."""
    config = entry.get("config") if isinstance(entry, dict) else None
    if not isinstance(config, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in config):
        return None
    return tuple(config) if tuple(config) in allowed else None


def _write_entry(path: Path, key: str, entry: dict, allowed: list[tuple]) -> dict:
    """Add `entry` under `key` unless another process wrote a valid one first; returns the entry on
    disk. A cache that cannot be written (read-only folder) is not an error: the choice stays in memory."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "a+") as lock:
            try:
                import fcntl

                fcntl.flock(lock, fcntl.LOCK_EX)
            except (ImportError, OSError):
                pass
            if path.exists() and not os.access(path, os.R_OK):
                return entry  # rewriting a file we cannot read would drop everyone else's entries
            entries = _read(path)
            if _valid_config(entries.get(key), allowed) is not None:
                return entries[key]
            entries[key] = entry
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            try:
                tmp.write_text(json.dumps({"entries": entries}, indent=1, sort_keys=True))
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)  # a failed replace leaves no stray file
    except OSError:
        pass
    return entry


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------


def _cuda_timer(fn: Callable[[], None]) -> float:
    """Median milliseconds of fn() on the current CUDA stream (fn runs once first: compile, errors)."""
    import triton.testing

    fn()
    return float(triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median"))


_timer: Callable[[Callable[[], None]], float] = _cuda_timer


def set_timer(timer: Callable[[Callable[[], None]], float] | None) -> None:
    """Replace the timer (tests use a fake one); None restores the CUDA timer."""
    global _timer
    _timer = timer if timer is not None else _cuda_timer


@functools.lru_cache(maxsize=16)
def _facts_of(index: int) -> tuple:
    import torch

    major, minor = torch.cuda.get_device_capability(index)
    try:
        import triton

        version = triton.__version__
    except Exception:  # noqa: BLE001
        version = "none"
    return torch.cuda.get_device_name(index), major * 10 + minor, version


def _device_facts(device) -> tuple:
    """(GPU name, compute capability as 90, Triton version), cached per device: choose() runs on
    every launch."""
    import torch

    index = device.index if getattr(device, "index", None) is not None else torch.cuda.current_device()
    return _facts_of(index)


def _can_time(device) -> bool:
    if getattr(device, "type", None) != "cuda":
        return False
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return False
    from .launch import capturing

    if capturing():
        return False
    import torch

    return not torch.cuda.is_current_stream_capturing()


# ----------------------------------------------------------------------------------------------
# the choice
# ----------------------------------------------------------------------------------------------


def choose(
    kernel: str,
    shape_class: str,
    default: tuple,
    candidates: Iterable[tuple],
    run: Callable[[tuple], None],
    device,
    *,
    facts: tuple | None = None,
) -> tuple:
    """The configuration to launch `kernel` with for this shape class on `device`.

    default: the built-in configuration (always a candidate, and the answer whenever nothing is
    tuned); candidates: the declared alternatives; run(cfg): launches the kernel once with cfg on the
    real inputs (it must be safe to repeat: every output is overwritten), with `device` current (the
    launchers call choose() inside launch.on_tensor_device). facts: (gpu name, compute capability as
    an int such as 90, Triton version), for tests; read from the device otherwise."""
    default = tuple(default)
    with _lock:
        forced = _forced.get(kernel)
    if forced is not None:
        return forced
    if not tuning_enabled():
        return default
    if facts is None and getattr(device, "type", None) != "cuda":
        return default
    gpu, arch, tver = facts if facts is not None else _device_facts(device)
    mkey = (gpu, tver, kernel, shape_class)
    with _lock:
        if mkey in _memory:
            return _memory[mkey]
    path = cache_file(gpu, tver)
    dkey = f"{kernel}|{shape_class}"
    allowed = [default] + [tuple(c) for c in candidates if tuple(c) != default and gates_allow(kernel, c, arch, tver)]
    allowed = list(dict.fromkeys(allowed))
    entry = _read(path).get(dkey)
    cfg = _valid_config(entry, allowed)
    if cfg is not None:
        _remember(mkey, cfg, entry, "disk")
        return cfg
    if facts is None and not _can_time(device):
        return default
    if len(allowed) == 1:
        _remember(mkey, default, {"config": list(default), "timings_ms": {}}, "default only")
        return default
    timings, skipped = {}, {}
    for cfg in allowed:
        try:
            ms = float(_timer(lambda cfg=cfg: run(cfg)))
            if not math.isfinite(ms):
                raise RuntimeError(f"timer returned {ms}")
            timings[config_id(cfg)] = ms
        except Exception as exc:  # noqa: BLE001 - a failing candidate is skipped, never fatal
            skipped[config_id(cfg)] = f"{type(exc).__name__}: {str(exc)[:200]}"
    if not timings:
        cfg = default
    else:
        best = min(timings, key=timings.get)
        cfg = next(c for c in allowed if config_id(c) == best)
    entry = {
        "config": list(cfg),
        "default": list(default),
        "timings_ms": timings,
        "skipped": skipped,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if timings:
        entry = _write_entry(path, dkey, entry, allowed)
        cfg = tuple(entry["config"])
    _remember(mkey, cfg, entry, "tuned")
    return cfg


def _remember(mkey: tuple, cfg: tuple, entry: dict, source: str) -> None:
    with _lock:
        _memory[mkey] = cfg
        gpu, tver, kernel, shape_class = mkey
        _log.append(
            {
                "gpu": gpu,
                "triton": tver,
                "kernel": kernel,
                "shape_class": shape_class,
                "config": list(cfg),
                "default": entry.get("default", list(cfg)),
                "timings_ms": entry.get("timings_ms", {}),
                "skipped": entry.get("skipped", {}),
                "source": source,
            }
        )


def chosen() -> list[dict]:
    """Every choice this process made or loaded (kernel, shape class, config, timings, source)."""
    with _lock:
        return [dict(x) for x in _log]


def reset() -> None:
    """Forget the in-memory choices (the disk cache stays): for tests."""
    with _lock:
        _memory.clear()
        _log.clear()
