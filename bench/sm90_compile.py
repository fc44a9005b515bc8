"""The sm_90 compile gate: every Triton launch the optimizers make, compiled for an H100 without one.

* ``record_launches()`` replaces ``JITFunction.run`` so that ``kernel[grid](...)``
  records what Triton would compile for an sm_90 target and launches nothing: the
  kernel, its signature, constexprs and specialization attributes (worked out by
  Triton's own binder and ``_pack_args``, so they are exactly a GPU launch's) and
  its options (``num_warps``, ``num_stages``). The launchers run on tensors of
  device "meta", which have shapes and strides but no storage: a 128256×4096 case
  costs nothing. Meta tensors have data pointer 0, i.e. aligned, as CUDA
  allocations are.
* The launches come from the optimizers' own step path (``_ensure_state`` makes the
  state, ``_update`` and ``_low_rank_grad`` call the launchers) over the case table
  ``cases()``, so no kernel, signature or state layout is written down here. Every
  launcher ``galore_kernels.kernels`` exports must be reached by some case.
* Each distinct launch is compiled with ``triton.compile(ASTSource(...),
  target=GPUTarget("cuda", 90, 64))`` through the ptxas that ships with Triton;
  registers and spills come from ptxas' own log, shared memory from the kernel's
  metadata. A launch fails the gate on a compile error, shared memory above the
  H100's 227 KB per block, any spill, or a 16-bit ``tt.dot`` reached from a LLaMA
  shape at rank >= 128 whose PTX has no ``wgmma``.

``python -m bench.sm90_compile [--triton-path DIR ...] [--out FILE]`` runs the gate
once per Triton (the project's, and each DIR put first on ``PYTHONPATH``, e.g. a
``pip install --target`` of ``triton==3.6.0``), in parallel subprocesses without
``TRITON_INTERPRET`` (under the interpreter ``triton.jit`` returns interpreter
objects), writes the resource table (default ``bench/results/sm90-compile.md``)
and exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

LLAMA_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 28672), (28672, 8192), (128256, 4096)]
ODD_SHAPES = [(37, 53), (4097, 1)]
RANKS = [1, 8, 128, 256, 512, 1024]
DTYPES = ("fp32", "bf16", "fp16")
SIDES = ("left", "right", "full")
# GaLoreAdamW, GaLoreAdamW8bit, GaLoreAdafactor (beta1=None, its default), NaturalGaLoreAdamW and
# NaturalGaLoreAdamW8bit (s = 20; the 8-bit one with a bf16 history, so both history dtypes compile).
STATES = ("fp32", "8bit", "adafactor", "natural", "natural8bit")
LOMO_KINDS = ("lomo", "adalomo")  # plain parameters only
# Plain (unprojected) steps: 1-D parameters and whole matrices.
PLAIN_SHAPES = [(4097,), (128256,), (37, 53), (4096, 4096), (4096, 11008), (128256, 4096)]
# The dry-run subset the gpu-check's CPU test uses.
TINY_SHAPES = [(37, 53)]

# H100 (sm_90) limits.
MAX_SHARED_PER_BLOCK = 227 * 1024
SHARED_PER_SM = 228 * 1024
SHARED_RESERVED_PER_BLOCK = 1024
REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32

DOT_16BIT = re.compile(r"tt\.dot\b.*:\s*tensor<[0-9x]+x(bf16|f16)>")


@dataclass(frozen=True)
class Case:
    """One optimizer step: ``rank`` None is a plain step (no projection); ``state`` names the optimizer."""

    state: str
    dtype: str
    shape: tuple[int, ...]
    rank: int | None = None
    side: str | None = None
    matmul_precision: str = "tf32x3"
    capturable: bool = False  # the per-step scalars read from device memory (STEP_ON_DEVICE)

    @property
    def label(self) -> str:
        size = "×".join(map(str, self.shape))
        suffix = " capturable" if self.capturable else ""
        if self.rank is None:
            return f"plain {self.state} {self.dtype} {size}{suffix}"
        precision = "" if self.matmul_precision == "tf32x3" else f" {self.matmul_precision}"
        return f"{self.state} {self.dtype} {size} r{self.rank} {self.side}{precision}{suffix}"

    @property
    def needs_wgmma(self) -> bool:
        """A LLaMA shape at rank >= 128: its 16-bit dots must run on Hopper's warpgroup MMA."""
        return self.rank is not None and self.shape in LLAMA_SHAPES and self.rank >= 128


def cases(tiny: bool = False) -> list[Case]:
    """The case table; ranks above min(m, n) clamp (as the optimizers do) and are dropped as duplicates."""
    shapes = TINY_SHAPES if tiny else LLAMA_SHAPES + ODD_SHAPES
    plain_shapes = [(4097,)] + TINY_SHAPES if tiny else PLAIN_SHAPES
    table = []
    for state in STATES:
        for dtype in DTYPES:
            for shape in shapes:
                clamped = sorted({min(rank, *shape) for rank in RANKS})
                table += [Case(state, dtype, shape, rank, side) for rank in clamped for side in SIDES]
            table += [Case(state, dtype, shape) for shape in plain_shapes]
    # matmul_precision="ieee", the option the fp32 default "tf32x3" replaced: fp32 dots only.
    for shape in shapes:
        clamped = sorted({min(rank, *shape) for rank in RANKS})
        table += [Case("fp32", "fp32", shape, rank, side, "ieee") for rank in clamped for side in SIDES]
    for kind in LOMO_KINDS:
        table += [Case(kind, dtype, shape) for dtype in DTYPES for shape in plain_shapes]
    return table + capturable_cases(tiny)


def capturable_cases(tiny: bool = False) -> list[Case]:
    """``capturable=True`` steps of the two Adam classes: the same tiles with pointer scalars
    (``STEP_ON_DEVICE``). A subset, to keep the gate's time: a 7B shape and an odd one at two
    ranks (the 7B shapes at ranks 8, 128, 512 and both odd shapes passed too, 188 launches, when added)."""
    shapes = TINY_SHAPES if tiny else [(4096, 11008), (37, 53)]
    plain_shapes = [(4097,)] + TINY_SHAPES if tiny else [(4097,), (4096, 4096)]
    table = []
    for state in ("fp32", "8bit"):
        for dtype in DTYPES:
            for shape in shapes:
                clamped = sorted({min(rank, *shape) for rank in (128, 512)})
                table += [Case(state, dtype, shape, rank, side, capturable=True) for rank in clamped for side in SIDES]
            table += [Case(state, dtype, shape, capturable=True) for shape in plain_shapes]
    return table


@dataclass
class Launch:
    """One distinct compile: what ``triton.compile`` needs, and the cases that launch it."""

    fn: object
    signature: dict
    constexprs: dict
    attrs: dict
    options: object
    cases: list = field(default_factory=list)

    @property
    def kernel(self) -> str:
        return self.fn.__name__

    @property
    def spec(self) -> str:
        """Pointer dtypes and the kernel's declared constexprs, e.g. ``*fp32 *bf16; BLOCK_M=128``."""
        pointers = " ".join(ty for ty in self.signature.values() if ty.startswith("*"))
        names = [p.name for p in self.fn.params]
        declared = [f"{names[path[0]]}={_short(value)}" for path, value in sorted(self.constexprs.items())
                    if self.fn.params[path[0]].is_constexpr]
        return f"{pointers}; {' '.join(declared)}"


def _short(value) -> str:
    text = str(value)
    return text.removeprefix("triton.language.").removeprefix("tl.")


class Recording(list):
    """The distinct ``Launch``es so far; ``case`` is the case the next launches belong to."""

    case: Case | None = None


@contextlib.contextmanager
def record_launches():
    """Inside, every ``kernel[grid](...)`` appends a ``Launch`` to the yielded list instead of running.

    Identical compiles (same kernel, signature, constexprs, attributes, options)
    are one ``Launch``; the list's ``case``, set by the caller, is added to the
    launch's ``cases``.
    """
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    backend = make_backend(GPUTarget("cuda", 90, 64))
    binders: dict = {}
    launches = Recording()
    by_key: dict = {}

    def record(self, *args, grid, warmup, **kwargs):
        kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug
        if self not in binders:
            binders[self] = create_function_from_signature(self.signature, self.params, backend)
        bound_args, specialization, options = binders[self](*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound_args, specialization, options)
        key = (self.fn.__module__, self.fn.__qualname__, repr(signature), repr(sorted(constexprs.items())),
               repr(sorted(attrs.items())), repr(sorted(options.__dict__.items())))
        if key not in by_key:
            by_key[key] = Launch(self, signature, constexprs, attrs, options)
            launches.append(by_key[key])
        if launches.case not in by_key[key].cases:
            by_key[key].cases.append(launches.case)

    original = JITFunction.run
    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = original


# aten ops that allocate without writing: no device kernel.
_NO_KERNEL_OPS = ("aten.empty.memory_format", "aten.empty_strided.default", "aten.empty_like.default",
                  "aten.new_empty.default", "aten.new_empty_strided.default")


@dataclass
class LaunchCount:
    """Every launch inside ``count_launches()``, in order: Triton kernel names and torch ops
    that would run a device kernel (views and bare allocations run none)."""

    triton: list = field(default_factory=list)
    torch_ops: list = field(default_factory=list)

    def clear(self) -> None:
        self.triton.clear()
        self.torch_ops.clear()


@contextlib.contextmanager
def count_launches(torch_ops: bool = True):
    """Inside, every ``kernel[grid](...)`` is appended to ``triton`` and launches nothing (no
    binding either: the cheapest stand-in for a launch, so host time measured inside is the
    launchers' and the optimizer's own), and every torch op on meta tensors that would launch
    a device kernel is appended to ``torch_ops`` (unless ``torch_ops=False``: the dispatch
    mode that sees them costs host time of its own). Drive the optimizer on meta tensors.
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime.jit import JITFunction

    counted = LaunchCount()

    class TorchLaunches(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            if not func.is_view and name not in _NO_KERNEL_OPS and not name.startswith("profiler."):
                counted.torch_ops.append(name)
            return func(*args, **(kwargs or {}))

    def record(self, *args, grid, warmup, **kwargs):
        counted.triton.append(self.fn.__name__)

    original = JITFunction.run
    JITFunction.run = record
    try:
        with TorchLaunches() if torch_ops else contextlib.nullcontext():
            yield counted
    finally:
        JITFunction.run = original


def _drive(case: Case, torch, optim) -> None:
    """One optimizer step of ``case`` on meta tensors, through the optimizer's own state and step path."""
    from galore_kernels.projector import projector_dtype

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[case.dtype]
    param = torch.empty(case.shape, dtype=dtype, device="meta")
    group = {"params": [param]}
    if case.rank is not None:
        # A twin of the same shape, for the grouped launches (stepped only where the class groups).
        group.update(params=[param, torch.empty_like(param)], rank=case.rank, update_proj_gap=200, scale=0.25,
                     proj_type=case.side)
    if case.state in LOMO_KINDS:
        _drive_lomo(case, param, torch)
        return
    if case.state == "adafactor":
        # No weight decay: with scale_parameter it reads the parameter's RMS on the host.
        optimizer = optim.GaLoreAdafactor([group], lr=1e-3, relative_step=False, backend="triton",
                                          matmul_precision=case.matmul_precision)
    else:
        optimizer_cls = {"8bit": optim.GaLoreAdamW8bit, "natural": optim.NaturalGaLoreAdamW,
                         "natural8bit": optim.NaturalGaLoreAdamW8bit}.get(case.state, optim.GaLoreAdamW)
        history = {"history_dtype": torch.bfloat16} if case.state == "natural8bit" else {}
        capturable = {"capturable": True} if case.capturable else {}
        optimizer = optimizer_cls([group], lr=1e-3, weight_decay=0.01, backend="triton",
                                  matmul_precision=case.matmul_precision, **history, **capturable)
    group = optimizer.param_groups[0]
    state = optimizer._ensure_state(group, param)
    if case.capturable:  # what step() does before the launches: the device scalars they read
        optimizer._device_steps.prepare([(group, param)])
    grad = torch.empty_like(param)
    rank = optimizer._galore_rank(group, param)
    if rank is None:
        optimizer._update(group, param, grad, grad_is_projected=False)
        # The multi-tensor launch that step() uses for small plain parameters (none for Adafactor).
        optimizer._update_small_together([(group, param, grad, False)])
        return
    m, n = param.shape
    proj_dtype = projector_dtype(param.dtype)  # as a refresh stores it
    if case.side in ("left", "full"):
        state["proj_left"] = torch.empty(m, rank, dtype=proj_dtype, device="meta")
    if case.side in ("right", "full"):
        state["proj_right"] = torch.empty(rank, n, dtype=proj_dtype, device="meta")
    optimizer._update(group, param, grad, grad_is_projected=False)
    # The layerwise/accumulation path: the optimizer projects, then steps on R.
    optimizer._update(group, param, optimizer._low_rank_grad(param, state, grad), grad_is_projected=True)
    if not case.capturable and optimizer._grouped_launch_key(group, param, grad, False) is not None:
        # Two same-shape matrices of one group: the grouped launches of step() (kernels/grouped_steps.py).
        twin = group["params"][1]
        twin_state = optimizer._ensure_state(group, twin)
        twin_state.update({key: torch.empty_like(state[key]) for key in ("proj_left", "proj_right") if key in state})
        twin_state["step"] = state["step"]
        left = optimizer._update_galore_together([(group, param, grad, False), (group, twin, torch.empty_like(grad), False)])
        assert not left, "the twins did not share a grouped launch"


def _drive_lomo(case: Case, param, torch) -> None:
    """LOMO's and AdaLomo's launchers, called as their hooks call them: plain, then with both clips."""
    from galore_kernels import kernels

    grad = torch.empty_like(param)
    coef = torch.empty((), dtype=torch.float32, device="meta")
    for clips in ({}, dict(clip_coef=coef, clip_grad_value=1.0)):
        if case.state == "lomo":
            kernels.lomo_step(param, grad, lr=1e-3, **clips)
            continue
        statistics = dict(exp_avg_sq_row=None, exp_avg_sq_col=None, exp_avg_sq=None)
        if param.dim() == 2:
            statistics.update(exp_avg_sq_row=torch.empty(param.shape[0], device="meta"),
                              exp_avg_sq_col=torch.empty(param.shape[1], device="meta"))
        else:
            statistics.update(exp_avg_sq=torch.empty(param.shape, device="meta"))
        kernels.adalomo_step(param, grad, *statistics.values(), lr=1e-3, step=1, weight_decay=0.01, **clips)


def record_cases(table: list[Case], *, every_launcher: bool = True) -> list[Launch]:
    """The distinct launches of every case; with ``every_launcher``, raises if an exported launcher was never called."""
    import torch

    from galore_kernels import kernels, optim

    calls: Counter = Counter()

    def counted(name, launcher):
        def call(*args, **kwargs):
            calls[name] += 1
            return launcher(*args, **kwargs)

        return call

    originals = {name: getattr(kernels, name) for name in kernels.__all__}
    for name, launcher in originals.items():
        setattr(kernels, name, counted(name, launcher))
    try:
        with record_launches() as launches, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for case in table:
                launches.case = case
                _drive(case, torch, optim)
    finally:
        for name, launcher in originals.items():
            setattr(kernels, name, launcher)
    missing = [name for name in kernels.__all__ if calls[name] == 0]
    if missing and every_launcher:
        raise RuntimeError(f"no case reaches the launcher(s) {missing}: extend the case table")
    return list(launches)


PTXAS_USED = re.compile(r"Used (\d+) registers")
PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_STACK = re.compile(r"(\d+) bytes stack frame")


def blocks_per_sm(registers: int, num_warps: int, shared: int) -> int:
    """Resident CTAs per H100 SM: registers (8 per thread granularity), shared memory, warps, 32 blocks."""
    registers_per_warp = -(-max(registers, 1) // 8) * 8 * 32
    by_registers = (REGISTERS_PER_SM // registers_per_warp) // num_warps
    by_shared = SHARED_PER_SM // (shared + SHARED_RESERVED_PER_BLOCK)
    return min(by_registers, by_shared, MAX_WARPS_PER_SM // num_warps, MAX_BLOCKS_PER_SM)


def compile_launch(launch: Launch) -> dict:
    """Compile one launch for sm_90; registers, spills, shared memory, wgmma, and the gate's verdict."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = dict(
        kernel=launch.kernel, spec=launch.spec, case=launch.cases[0].label, more_cases=len(launch.cases) - 1,
        warps=launch.options.num_warps, stages=launch.options.num_stages,
        needs_wgmma=any(case.needs_wgmma for case in launch.cases), error=None,
    )
    log = io.StringIO()
    started = time.perf_counter()
    try:
        # Triton prints ptxas' -v log only when asked, and runs ptxas only on a cache miss.
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(launch.fn, launch.signature, launch.constexprs, launch.attrs),
                target=GPUTarget("cuda", 90, 64), options=launch.options.__dict__,
            )
    except Exception as error:  # a compile error is a gate failure, reported with the others
        row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        row["failures"] = [f"compile error: {row['error']}"]
        return row
    row["compile_s"] = time.perf_counter() - started
    ptxas = log.getvalue()
    used, spills, stack = PTXAS_USED.search(ptxas), PTXAS_SPILLS.findall(ptxas), PTXAS_STACK.findall(ptxas)
    if used is None:
        raise RuntimeError(f"no ptxas register report for {launch.kernel}:\n{ptxas[-2000:]}")
    row["registers"] = int(used.group(1))
    row["spill_bytes"] = sum(int(stores) + int(loads) for stores, loads in spills)
    row["stack_bytes"] = sum(int(s) for s in stack)
    row["shared"] = int(compiled.metadata.shared)
    row["dot16"] = bool(DOT_16BIT.search(compiled.asm["ttir"]))
    row["wgmma"] = "wgmma" in compiled.asm["ptx"]
    row["ctas_per_sm"] = blocks_per_sm(row["registers"], row["warps"], row["shared"])
    failures = []
    if row["shared"] > MAX_SHARED_PER_BLOCK:
        failures.append(f"shared memory {row['shared']} B > {MAX_SHARED_PER_BLOCK} B")
    if row["spill_bytes"]:
        failures.append(f"{row['spill_bytes']} bytes of register spills")
    if row["needs_wgmma"] and row["dot16"] and not row["wgmma"]:
        failures.append("16-bit dot at a LLaMA shape with rank >= 128 did not lower to wgmma")
    row["failures"] = failures
    return row


_FORKED_LAUNCHES: list[Launch] = []


def _compile_index(index: int) -> dict:
    return compile_launch(_FORKED_LAUNCHES[index])


def run_gate(*, tiny: bool = False, jobs: int = 1) -> dict:
    """Record and compile every case under the Triton this process imports; JSON-ready results."""
    import triton

    started = time.perf_counter()
    table = cases(tiny)
    launches = record_cases(table)
    recorded_s = time.perf_counter() - started
    _FORKED_LAUNCHES[:] = launches
    if jobs > 1:
        # fork: the workers inherit the recorded launches (JIT functions do not pickle).
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            rows = pool.map(_compile_index, range(len(launches)), chunksize=1)
    else:
        rows = [compile_launch(launch) for launch in launches]
    return dict(
        triton=triton.__version__, cases=len(table), launches=len(launches), rows=rows,
        record_s=recorded_s, wall_s=time.perf_counter() - started, jobs=jobs,
    )


def format_markdown(results: list[dict]) -> str:
    lines = [
        "# sm_90 compile gate",
        "",
        "Every distinct Triton launch of the optimizers' step path over the case table of",
        "`bench/sm90_compile.py`, compiled for `GPUTarget(\"cuda\", 90, 64)` on a machine without a GPU",
        "(`python -m bench.sm90_compile`). Registers and spills from ptxas' log; shared memory from the",
        "kernel's metadata; CTAs/SM estimated from the H100's limits (64K registers, 228 KB shared, 64 warps).",
        "wgmma: `req` marks launches reached from a LLaMA shape at rank >= 128; `-` no 16-bit dot.",
        "",
    ]
    for result in results:
        failures = sum(bool(row["failures"]) for row in result["rows"])
        lines += [
            f"## Triton {result['triton']}",
            "",
            f"{result['cases']} cases, {result['launches']} distinct launches, {failures} failing; "
            f"{result['wall_s']:.0f} s with {result['jobs']} jobs.",
            "",
            "| kernel | case | registers | spill bytes | shared (B) | warps | stages | CTAs/SM | wgmma | spec | verdict |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |",
        ]
        for row in sorted(result["rows"], key=lambda r: (r["kernel"], r["spec"], r["case"])):
            case = row["case"] + (f" (+{row['more_cases']})" if row["more_cases"] else "")
            verdict = "; ".join(row["failures"]) or "ok"
            if row["error"]:
                resources, wgmma = "| - | - | - |", "-"
            else:
                resources = f"| {row['registers']} | {row['spill_bytes']} | {row['shared']} |"
                wgmma = ("yes" if row["wgmma"] else "no") if row["dot16"] else "-"
                wgmma += " (req)" if row["needs_wgmma"] and row["dot16"] else ""
            lines.append(
                f"| `{row['kernel']}` | {case} {resources} {row['warps']} | {row['stages']} "
                f"| {row.get('ctas_per_sm', '-')} | {wgmma} | `{row['spec']}` | {verdict} |"
            )
        lines.append("")
    return "\n".join(lines)


def _worker(args) -> None:
    result = run_gate(tiny=args.tiny, jobs=args.jobs)
    Path(args.json).write_text(json.dumps(result))


def run_versions(triton_paths: list[str | None], *, tiny: bool, jobs: int, timeout: float) -> list[dict]:
    """``run_gate`` in one subprocess per Triton (None: the project's), all at once."""
    procs = []
    with tempfile.TemporaryDirectory() as scratch:
        for i, path in enumerate(triton_paths):
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            python_path = [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
            if path is not None:
                python_path.insert(0, str(Path(path).resolve()))
            env["PYTHONPATH"] = os.pathsep.join(python_path)
            # A fresh cache: every launch goes through ptxas, whose log the gate reads.
            env["TRITON_CACHE_DIR"] = os.path.join(scratch, f"cache{i}")
            out = os.path.join(scratch, f"result{i}.json")
            command = [sys.executable, "-m", "bench.sm90_compile", "--worker", "--json", out, "--jobs", str(jobs)]
            command += ["--tiny"] if tiny else []
            procs.append((path, out, subprocess.Popen(command, cwd=REPO_ROOT, env=env,
                                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
        results = []
        for path, out, proc in procs:
            try:
                output, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                output, _ = proc.communicate()
                raise RuntimeError(f"the gate under Triton {path or '(project)'} ran past {timeout:.0f} s:\n{output[-4000:]}")
            if proc.returncode != 0:
                raise RuntimeError(f"the gate under Triton {path or '(project)'} failed:\n{output[-4000:]}")
            results.append(json.loads(Path(out).read_text()))
    return results


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.sm90_compile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--triton-path", action="append", default=[],
                        help="a directory holding another triton, put first on PYTHONPATH (repeatable)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "sm90-compile.md")
    parser.add_argument("--jobs", type=int, default=0, help="compile processes per Triton (default: cores / Tritons)")
    parser.add_argument("--tiny", action="store_true", help="a 37×53 subset (the gpu-check dry run)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds allowed per Triton")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    paths = [None] + args.triton_path
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    jobs = args.jobs or max(1, cores // len(paths))
    results = run_versions(paths, tiny=args.tiny, jobs=jobs, timeout=args.timeout)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(format_markdown(results))
    failed = 0
    for result in results:
        bad = [row for row in result["rows"] if row["failures"]]
        failed += len(bad)
        print(f"Triton {result['triton']}: {result['cases']} cases, {result['launches']} launches, "
              f"{len(bad)} failing, {result['wall_s']:.0f} s")
        for row in bad:
            print(f"  FAIL {row['kernel']} [{row['case']}] {row['spec']}: {'; '.join(row['failures'])}")
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
