"""Ahead-of-time builds of captured launches, through Triton's own launcher path, and what their
SASS / PTX / TTGIR say. Used by `scripts/kernel_report.py`; needs triton with its NVIDIA backend, no GPU.

    with capture_launches() as launches:          # fastformer.kernels.launch
        attention_forward(q_meta, k_meta, v_meta, spec)
    result = build(launches[0], arch=90)          # {"registers": ..., "spill_bytes": ..., ...}

Faithful to the runtime: `build` calls `kernel.warmup(*args, grid=grid, **kwargs)` under a driver
that names the target GPU, so Triton's runtime binder decides the specialization (16-byte divisibility
of pointers and integers, integers equal to 1 made constants, `do_not_specialize`) with the same code
as a real launch, on the same argument list. The launcher's "meta" tensors become device pointers as
the CUDA caching allocator hands them out (512-byte aligned) plus each view's offset.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .launch import Launch

ANALYSIS_VERSION = 2  # part of every cache key: bump when `analyze` changes
ALLOC_BASE = 1 << 21  # any multiple of 512: the caching allocator's block alignment
MMA_OPS = ("HGMMA", "HMMA", "IMMA", "QGMMA", "UTCHMMA", "UTCQMMA", "UTCOMMA")

# per-SM limits for the occupancy estimate: (registers, shared bytes usable by blocks, threads, blocks,
# shared bytes one block may use, shared bytes reserved per block by the system)
ARCH_LIMITS = {
    80: (65536, 167936, 2048, 32, 166912, 1024),
    90: (65536, 233472, 2048, 32, 232448, 1024),
}


# ----------------------------------------------------------------------------------------------
# building through the launcher path
# ----------------------------------------------------------------------------------------------


class _TargetDriver:
    """The part of a Triton driver that JITFunction.run needs to pick a target and compile (warmup:
    nothing is launched). The device id is the arch, so each arch keeps its own binder."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.arch = arch

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


class DevicePointer:
    """A device tensor as Triton's binder sees it: a dtype and an address."""

    def __init__(self, dtype: torch.dtype, address: int):
        self.dtype = dtype
        self._address = address

    def data_ptr(self) -> int:
        return self._address


def device_args(args) -> list:
    """The launcher's arguments with each tensor replaced by the pointer a fresh CUDA allocation (plus
    the view's storage offset) would have."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(DevicePointer(a.dtype, ALLOC_BASE + a.storage_offset() * a.element_size()))
        else:
            out.append(a)
    return out


@contextlib.contextmanager
def _target(arch: int):
    from triton.runtime.driver import driver

    previous = driver._active
    driver.set_active(_TargetDriver(arch))
    try:
        yield
    finally:
        driver._active = previous


def triton_version() -> str:
    import triton

    return triton.__version__


def build_key(item: Launch, arch: int) -> tuple[dict, str]:
    """(what Triton decided: signature / constants / attributes / options, a hash naming this build).
    Runs the launcher path up to the compile and stops there."""
    from triton import knobs

    seen = {}

    def hook(*, key, fn, compile, **_):
        seen["key"] = key
        seen["fn"] = fn.jit_function
        seen["compile"] = compile
        return True  # skip the compile

    with _target(arch), _knob(knobs.runtime, "jit_cache_hook", hook):
        item.kernel.device_caches.pop(arch, None)
        item.kernel.warmup(*device_args(item.args), grid=item.grid, **item.kwargs)
    comp = seen["compile"]
    data = json.loads(comp["specialization_data"])
    h = hashlib.sha256(
        "|".join([str(ANALYSIS_VERSION), triton_version(), str(arch), seen["fn"].cache_key, str(seen["key"])]).encode()
    ).hexdigest()[:24]
    spec = {
        "signature": data["signature"],
        "attrs": dict(zip(map(str, data["attrs_keys"]), data["attrs_vals"])),
        "constants": dict(zip(map(str, data["constant_keys"]), map(str, data["constant_vals"]))),
        "num_warps": comp["num_warps"],
        "num_stages": comp["num_stages"],
    }
    return spec, h


@contextlib.contextmanager
def _knob(obj, name, value):
    previous = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, previous)


def compile_launch(item: Launch, arch: int):
    """(CompiledKernel, ptxas log) of the launch for sm_<arch>, compiled now (not from Triton's
    cache: the log of ptxas is part of the result)."""
    from triton import knobs

    out = io.StringIO()
    with (
        _target(arch),
        _knob(knobs.compilation, "always_compile", True),
        _knob(knobs.nvidia, "dump_ptxas_log", True),
        contextlib.redirect_stdout(out),
    ):
        item.kernel.device_caches.pop(arch, None)
        compiled = item.kernel.warmup(*device_args(item.args), grid=item.grid, **item.kwargs)
    return compiled, out.getvalue()


def build(item: Launch, arch: int, cache: Path | None = None) -> dict:
    """Compile the launch for sm_<arch> exactly as the runtime would and read off its facts
    (`analyze`). cache: a folder of earlier results, keyed by Triton version, arch, the kernel's source
    hash (with every function it calls) and the specialization."""
    spec, h = build_key(item, arch)
    path = cache / f"{h}.json" if cache is not None else None
    if path is not None and path.exists():
        try:
            result = json.loads(path.read_text())
            result["cached"] = True
            return result
        except ValueError:
            pass
    compiled, log = compile_launch(item, arch)
    result = analyze(compiled, log, item, arch)
    result["specialization"] = _specialization_summary(spec, {p.name for p in item.kernel.params if p.is_constexpr})
    result["build_hash"] = h
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, path)
    result["cached"] = False
    return result


def _specialization_summary(spec: dict, declared: set) -> dict:
    """Which runtime arguments Triton specialised on: 16-divisible ('D') and integers equal to 1 made
    compile-time constants (declared tl.constexpr parameters are not listed)."""
    names = list(spec["signature"])
    div16 = [
        names[int(k.strip("[]()").split(",")[0])] for k, v in spec["attrs"].items() if v and "tt.divisibility" in str(v)
    ]
    ones = [
        names[int(k.strip("[]()").split(",")[0])]
        for k, v in spec["constants"].items()
        if v == "1" and names[int(k.strip("[]()").split(",")[0])] not in declared
    ]
    return {
        "divisible_by_16": div16,
        "equal_to_1": ones,
        "num_warps": spec["num_warps"],
        "num_stages": spec["num_stages"],
    }


# ----------------------------------------------------------------------------------------------
# reading the build
# ----------------------------------------------------------------------------------------------


def _find_tool(name: str) -> tuple[str, str]:
    """(path, where it came from) of cuobjdump / nvdisasm: FASTFORMER_<NAME>, else PATH, else the CUDA
    toolkit, else the copy that ships with Triton."""
    env = os.environ.get(f"FASTFORMER_{name.upper()}")
    if env:
        return env, f"FASTFORMER_{name.upper()}"
    found = shutil.which(name)
    if found:
        return found, "PATH"
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", name)):
            return os.path.join(home, "bin", name), "CUDA toolkit"
    from triton import knobs

    return getattr(knobs.nvidia, name).path, "Triton's wheel"


def _tool(name: str) -> str:
    return _find_tool(name)[0]


def tool_versions() -> dict:
    """{"nvdisasm": "13.1 (Triton's wheel)", ...}: the disassemblers' versions and where they came from."""
    out = {}
    for name in ("nvdisasm", "cuobjdump"):
        try:
            path, origin = _find_tool(name)
            text = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
            m = re.search(r"release (\d+\.\d+)", text)
            out[name] = f"{m.group(1) if m else '?'} ({origin})"
        except Exception as exc:  # noqa: BLE001
            out[name] = f"unavailable: {exc}"
    return out


def disassemble(cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run(
            [_tool("nvdisasm"), "-c", path], capture_output=True, text=True, check=True, timeout=300
        ).stdout


def resource_usage(cubin: bytes) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run(
            [_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True, timeout=300
        ).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if not m:
        return {}
    return {"REG": int(m.group(1)), "STACK": int(m.group(2)), "SHARED": int(m.group(3)), "LOCAL": int(m.group(4))}


def parse_ptxas_log(log: str) -> dict:
    out = {}
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if m:
        out.update(stack_bytes=int(m.group(1)), spill_store_bytes=int(m.group(2)), spill_load_bytes=int(m.group(3)))
    m = re.search(r"Used (\d+) registers", log)
    if m:
        out["registers"] = int(m.group(1))
    return out


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+|\.L_\w+):")
_TARGET = re.compile(r"`\((\.L_\w+)\)")


def parse_sass(text: str) -> tuple[list, dict]:
    """[(address, opcode, predicated, text)], {label: address} of one kernel's SASS (nvdisasm -c)."""
    instrs, labels, pending = [], {}, []
    for line in text.splitlines():
        lm = _LABEL.match(line)
        if lm:
            pending.append(lm.group(1))
            continue
        m = _INSTR.search(line)
        if not m:
            continue
        addr, body = int(m.group(1), 16), m.group(2).strip()
        pred = body.startswith("@")
        if pred:
            body = body.split(None, 1)[1] if " " in body else body
        opcode = body.split()[0] if body else ""
        for name in pending:
            labels[name] = addr
        pending = []
        instrs.append((addr, opcode, pred, body))
    return instrs, labels


def sass_cfg(instrs: list, labels: dict) -> dict:
    """The SASS control-flow graph and its natural loops: {"blocks": [range of instruction indices],
    "succ": [set], "dom": [set], "loops": [{"header": block, "blocks": set}]}. A loop is found from
    each back edge (a branch to a block that dominates it); loops with one header are merged."""
    if not instrs:
        return {"blocks": [], "succ": [], "dom": [], "loops": []}
    addr_index = {a: i for i, (a, *_r) in enumerate(instrs)}
    starts = {0}
    for i, (_a, op, _pred, _body) in enumerate(instrs):
        if op.startswith(("BRA", "EXIT", "RET", "BRX", "JMX", "JMP")) and i + 1 < len(instrs):
            starts.add(i + 1)
    for a in labels.values():
        if a in addr_index:
            starts.add(addr_index[a])
    starts = sorted(starts)
    block_of = {}
    blocks = []
    for b, s in enumerate(starts):
        e = starts[b + 1] if b + 1 < len(starts) else len(instrs)
        blocks.append(range(s, e))
        for i in range(s, e):
            block_of[i] = b
    succ = [set() for _ in blocks]
    for b, rng in enumerate(blocks):
        a, op, pred, body = instrs[rng[-1]]
        falls = True
        if op.startswith("BRA"):
            t = _TARGET.search(body)
            if t and t.group(1) in labels and labels[t.group(1)] in addr_index:
                succ[b].add(block_of[addr_index[labels[t.group(1)]]])
            falls = pred or ".DIV" in op or not t
        elif op.startswith(("EXIT", "RET", "JMP")) and not pred:
            falls = False
        if falls and b + 1 < len(blocks):
            succ[b].add(b + 1)
    pred_of = [set() for _ in blocks]
    for b, ss in enumerate(succ):
        for x in ss:
            pred_of[x].add(b)
    n = len(blocks)
    dom = [set(range(n)) for _ in range(n)]
    dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for b in range(1, n):
            ps = [dom[p] for p in pred_of[b]]
            new = (set.intersection(*ps) if ps else set()) | {b}
            if new != dom[b]:
                dom[b] = new
                changed = True
    loops: dict = {}
    for b in range(n):
        for x in succ[b]:
            if x in dom[b]:  # back edge b -> x
                body = loops.setdefault(x, {x})
                stack = [b]
                while stack:
                    y = stack.pop()
                    if y not in body:
                        body.add(y)
                        stack.extend(pred_of[y])
    return {
        "blocks": blocks,
        "succ": succ,
        "dom": dom,
        "loops": [{"header": h, "blocks": body} for h, body in sorted(loops.items())],
    }


def heaviest_path(cfg: dict, loop: dict, weight) -> int:
    """The largest sum of weight(block) along one trip through the loop body (header to a back edge),
    back edges removed: what one iteration executes on its costliest path. A branch inside the loop
    (T5 far or near tile) counts once, not both sides."""
    body, succ, dom = loop["blocks"], cfg["succ"], cfg["dom"]
    edges = {b: [x for x in succ[b] if x in body and x not in dom[b]] for b in body}
    order, seen = [], set()

    def visit(b):  # iterative post-order DFS
        stack = [(b, iter(edges[b]))]
        seen.add(b)
        while stack:
            node, it = stack[-1]
            nxt = next((x for x in it if x not in seen), None)
            if nxt is None:
                order.append(node)
                stack.pop()
            else:
                seen.add(nxt)
                stack.append((nxt, iter(edges[nxt])))

    visit(loop["header"])
    best = {}
    for b in reversed(order):  # topological order
        best.setdefault(b, weight(b))
        for x in edges[b]:
            best[x] = max(best.get(x, weight(x)), best[b] + weight(x))
    return max(best.values()) if best else 0


def _is_local(op: str) -> bool:
    return op.startswith(("LDL", "STL")) or (op.startswith(("LD.", "ST.")) and ".LOCAL" in op)


def ttgir_loops(ttgir: str) -> list[dict]:
    """Every scf.for of the TTGIR with the dot operations directly in it (nested loops excluded) and
    whether it holds another loop: [{"dots": n, "inner": bool}] in program order."""
    dot = re.compile(r"=\s*(tt\.dot|ttng\.warp_group_dot|ttng\.tc_gen5_mma|tt\.dot_scaled)(?![\w_])")
    stack: list = []  # per open region: index into loops, or None
    loops: list = []
    for line in ttgir.splitlines():
        s = line.strip()
        if s.startswith("}"):
            if stack:
                stack.pop()
            if s.endswith("{"):
                stack.append(None)
            continue
        if dot.search(s):
            for entry in reversed(stack):
                if entry is not None:
                    loops[entry]["dots"] += 1
                    break
        if s.endswith("{"):
            if re.search(r"\bscf\.for\b", s):
                for entry in reversed(stack):
                    if entry is not None:
                        loops[entry]["inner"] = True
                        break
                loops.append({"dots": 0, "inner": False})
                stack.append(len(loops) - 1)
            else:
                stack.append(None)
    return loops


def ttgir_compute_warps(ttgir: str) -> int | None:
    """Warps of the warp-specialised regions that hold the GEMMs (the consumers), or None when the
    kernel is not warp specialised. A region is the `default {` block (the module's num-warps) or a
    `partitionN(...) num_warps(W) {` block of `ttg.warp_specialize`."""
    if "ttg.warp_specialize" not in ttgir:
        return None
    m = re.search(r'"ttg\.num-warps" = (\d+)', ttgir)
    default_warps = int(m.group(1)) if m else 0
    dot = re.compile(r"=\s*(tt\.dot|ttng\.warp_group_dot|ttng\.tc_gen5_mma)(?![\w_])")
    head = re.compile(r"^(\s*)(default \{|partition\d+\(.*\) num_warps\((\d+)\) \{)\s*$")
    total, region = 0, None  # region: [indent, warps, has_dot]
    for line in ttgir.splitlines():
        if region is None:
            hm = head.match(line)
            if hm:
                region = [hm.group(1), int(hm.group(3)) if hm.group(3) else default_warps, False]
            continue
        if line.startswith(region[0] + "}"):
            total += region[1] if region[2] else 0
            region = None
        elif dot.search(line):
            region[2] = True
    return total or None


def blocks_per_sm(arch: int, registers: int, shared: int, warps: int) -> int | None:
    """Resident blocks per SM from registers (allocated per warp in units of 256), shared memory
    (plus the system's reserve per block) and threads, as CUDA's occupancy calculator counts them."""
    lim = ARCH_LIMITS.get(arch)
    if lim is None:
        return None
    regs_sm, smem_sm, threads_sm, blocks_sm, smem_block, reserve = lim
    if shared > smem_block:
        return 0
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = (regs_sm // per_warp) // warps
    by_smem = smem_sm // (shared + reserve) if shared + reserve > 0 else blocks_sm
    by_threads = threads_sm // (warps * 32)
    return int(min(by_regs, by_smem, by_threads, blocks_sm))


GLOBAL_LOADS = ("LDG", "LDGSTS", "UTMALDG", "UBLKCP")


def analyze(compiled, ptxas_log: str, item: Launch, arch: int) -> dict:
    """The facts of one build: resources from ptxas and cuobjdump, the loops from the SASS control flow
    graph, GEMMs per tile from the TTGIR, TMA / async copies / warp specialization.

    Tile loops: the loops with matrix instructions and no inner loop that has them. A row kernel
    (no matrix instructions, a BLOCK_V block of a row per step: cross-entropy) has *stream loops*
    instead: the loops with global loads and no inner loop that has them (a row loop, or the block
    loops inside it). Its loop facts count the loops that enclose them too (the persistent row loop),
    `ex2_per_element` is the largest over them per element of BLOCK_V, and `loop_async_copies` /
    `loop_tma_loads` count the asynchronous copies inside them."""
    asm = compiled.asm
    meta = compiled.metadata
    ptxas = parse_ptxas_log(ptxas_log)
    res = resource_usage(asm["cubin"])
    sass = disassemble(asm["cubin"])
    instrs, labels = parse_sass(sass)
    cfg = sass_cfg(instrs, labels)
    blocks = cfg["blocks"]
    warps = int(meta.num_warps)

    def n_in(loop, prefixes):
        return sum(1 for blk in loop["blocks"] for i in blocks[blk] if instrs[i][1].startswith(prefixes))

    def per_iter(loop, prefixes):
        return heaviest_path(cfg, loop, lambda blk: sum(1 for i in blocks[blk] if instrs[i][1].startswith(prefixes)))

    mma_loops = [lp for lp in cfg["loops"] if n_in(lp, MMA_OPS)]
    stream = not mma_loops and bool(item.kwargs.get("BLOCK_V"))
    with_work = [lp for lp in cfg["loops"] if n_in(lp, GLOBAL_LOADS)] if stream else mma_loops
    # tile loops: loops with matrix instructions (stream loops: global loads) and no inner loop that has them
    tile = [lp for lp in with_work if not any(o is not lp and o["blocks"] < lp["blocks"] for o in with_work)]
    # the main loop: the tile loop with the shortest iteration (the unmasked steady state)
    main = min(tile, key=lambda lp: per_iter(lp, ("",))) if tile else None
    counted = with_work if stream else tile  # stream loops: with the row loop around them
    in_tiles = sorted({i for lp in counted for blk in lp["blocks"] for i in blocks[blk]})
    all_idx = range(len(instrs))
    ttg = asm.get("ttgir", "")
    tloops = [lp for lp in ttgir_loops(ttg) if lp["dots"] and not lp["inner"]]
    BM, BN = item.kwargs.get("BLOCK_M"), item.kwargs.get("BLOCK_N")
    # score elements per thread of the warps that compute them (warp specialised: the consumer groups)
    compute_warps = ttgir_compute_warps(ttg) or warps
    elems = (BM * BN) / (32 * compute_warps) if BM and BN else None
    if stream:
        elems = item.kwargs["BLOCK_V"] / (32 * warps)
    if stream and tile:
        ex2 = round(max(per_iter(lp, ("MUFU.EX2",)) for lp in tile) / elems, 3)
    else:
        ex2 = round(per_iter(main, ("MUFU.EX2",)) / elems, 3) if main and elems else None
    registers = ptxas.get("registers", res.get("REG"))
    shared = int(meta.shared)
    result = {
        "registers": registers,
        "spill_bytes": ptxas.get("spill_store_bytes"),
        "spill_load_bytes": ptxas.get("spill_load_bytes"),
        "stack_bytes": ptxas.get("stack_bytes", res.get("STACK")),
        "shared_bytes": shared,
        "num_warps": warps,
        "num_stages": int(meta.num_stages),
        "blocks_per_sm": blocks_per_sm(arch, registers or 0, shared, warps),
        "local_mem_ops": sum(1 for i in all_idx if _is_local(instrs[i][1])),
        "loop_local_mem_ops": sum(1 for i in in_tiles if _is_local(instrs[i][1])) if tile else None,
        "tile_loops": len(tile),
        "mma_instructions_per_tile": per_iter(main, MMA_OPS) if main else 0,
        "gemms_per_tile": tloops[0]["dots"] if tloops else 0,
        "tma_loads": sum(1 for i in all_idx if instrs[i][1].startswith(("UTMALDG", "UBLKCP"))),
        "async_copies": sum(1 for i in all_idx if instrs[i][1].startswith("LDGSTS")),
        "warp_specialized": "ttg.warp_specialize" in ttg,
        "ex2_per_element": ex2,
        "barriers_per_iteration": per_iter(main, ("BAR.",)) if main else None,
        "main_loop_instructions": per_iter(main, ("",)) if main else None,
        "sass_instructions": len(instrs),
        "wide_global_loads": sum(1 for i in all_idx if instrs[i][1].startswith("LDG") and ".128" in instrs[i][1]),
        "narrow_global_loads": sum(
            1
            for i in all_idx
            if instrs[i][1].startswith("LDG.E") and not any(w in instrs[i][1] for w in (".64", ".128"))
        ),
    }
    if stream:
        result["loop_tma_loads"] = sum(1 for i in in_tiles if instrs[i][1].startswith(("UTMALDG", "UBLKCP")))
        result["loop_async_copies"] = sum(1 for i in in_tiles if instrs[i][1].startswith("LDGSTS"))
    return result
