"""The kernel registry: what `scripts/kernel_report.py` compiles and checks, and what the tuner may try.

Each kernel family declares, in a module next to its kernels (`attention_registry.py` for the
attention kernels), one `Family`:

- `cases()`: report configurations. A `Case` runs the family's real host launcher on "meta" tensors
  inside `launch.capture_launches()` and returns the launches it made, so the report builds exactly
  what a call of that shape launches. `ci=True` (`ci_archs`) marks the representative set `make test` checks.
- `gates`: facts every build must have (`Gate`: a predicate over one report row, and where it
  applies). Today's truth first: a gate states what holds now, so a change that loses it fails CI.
- `candidates()`: tuning candidates (`Candidate`: the tuner's kernel name, a configuration and a
  Case that launches with it). The report compiles them, applies the gates marked `candidates=True`,
  and writes the verdicts to `gate_results/<family>.json`, which `tuning.gates_allow` reads.

To add a family: write `<name>_registry.py` with `FAMILY = Family(...)` and add its module name to
`FAMILIES` below. Nothing here imports triton.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

FAMILIES = ("fastformer.kernels.attention_registry", "fastformer.kernels.cross_entropy_registry")


@dataclasses.dataclass(frozen=True)
class Case:
    """One report configuration. launches(): the Launch list of one call (captured, nothing runs).
    name: unique in the family (the report's `config`); dtype / head_dim / variant: for the table.
    archs: the GPU generations it is built for; ci_archs: those `make test` builds (the representative
    set: empty for cases built only on demand)."""

    name: str
    launches: Callable[[], list]
    dtype: str
    head_dim: int
    variant: str
    ci_archs: tuple = ()
    archs: tuple = (90, 80)


@dataclasses.dataclass(frozen=True)
class Gate:
    """check(row) must hold for every report row that applies(row). row: the report's dict for one
    kernel build (`kernel`, `arch`, `dtype`, `head_dim`, `variant`, and the facts of aot.analyze).
    candidates: the gate also decides which tuning candidates the tuner may time."""

    name: str
    description: str
    check: Callable[[dict], bool]
    applies: Callable[[dict], bool] = lambda row: True
    candidates: bool = False


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A tuning candidate: `tune_name` (tuning.choose's kernel name), `config`, and the case whose
    launches use it (the kernels named in `kernels` among them are the ones the gates judge: a
    candidate may run more than one kernel)."""

    tune_name: str
    config: tuple
    kernels: tuple
    case: Case


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    cases: Callable[[], list]
    gates: tuple
    candidates: Callable[[], list] = lambda: []


def families(names: list | None = None) -> list:
    """The registered families (optionally only those named)."""
    out = [importlib.import_module(m).FAMILY for m in FAMILIES]
    if names:
        unknown = set(names) - {f.name for f in out}
        if unknown:
            raise ValueError(f"unknown kernel family {sorted(unknown)}; known: {[f.name for f in out]}")
        out = [f for f in out if f.name in names]
    return out


def evaluate(gates, rows: list) -> list:
    """[{gate, kernel, config, arch, ok}] for every (gate, row) pair the gate applies to."""
    out = []
    for row in rows:
        if row.get("error"):
            out.append(
                {
                    "gate": "compiles",
                    "kernel": row["kernel"],
                    "config": row["config"],
                    "arch": row["arch"],
                    "ok": False,
                    "detail": row["error"][:300],
                }
            )
            continue
        for gate in gates:
            try:
                if not gate.applies(row):
                    continue
                ok = bool(gate.check(row))
                detail = ""
            except Exception as exc:  # noqa: BLE001 - a gate that cannot read its row fails
                ok, detail = False, f"{type(exc).__name__}: {exc}"
            out.append(
                {
                    "gate": gate.name,
                    "kernel": row["kernel"],
                    "config": row["config"],
                    "arch": row["arch"],
                    "ok": ok,
                    "detail": detail,
                }
            )
    return out
