"""``make gpu-check``: one command that builds, tests and measures everything on a bare CUDA machine.

Written for an H100 lent for minutes, with no network: torch, Triton and nvcc are the
machine's own; galore-torch and bitsandbytes come as wheels from ``.whl/`` (``make
gpu-wheels`` on a networked machine), installed with ``pip --no-index --no-deps
--target .gpu-site`` and put on ``PYTHONPATH``. The stages, each a subprocess with
its own time limit (so one that hangs or crashes still lets the others report):

  wheels          install .whl/*.whl into .gpu-site
  build           the extension against this torch, MAX_JOBS = cores, arch = this GPU's
  roofline        matmul rate and copy bandwidth of the card (bench.roofline)
  step            step time at 4096×4096, 4096×11008, 11008×4096 bf16, ranks 128/512/1024,
                  against galore-torch 8-bit and fp32, bnb AdamW8bit, torch AdamW fused (bench.bench_step)
  svd             randomized_svd against torch.linalg.svd and torch.svd_lowrank at 4096×11008,
                  rank 512 (bench.bench_svd)
  model           the whole optimizer step of LLaMA-1B- and 7B-shaped parameter sets at ranks 128 and 512:
                  launches, host µs, step times against galore-torch 8-bit, bnb AdamW8bit and torch AdamW
                  fused, fraction of the summed roofline floor (bench.bench_model)
  profile         the device's busy time per kernel in steady 8-bit steps of LLaMA-1B and 7B, rank 512,
                  against the step's wall time (bench.bench_profile)
  llama7b_memory  peak memory of layerwise 8-bit training steps of a LLaMA-7B-shaped bf16 model
                  (random weights, activation checkpointing, batch 1, sequence 512)
  pytest          the GPU-relevant test files (GPU_TEST_FILES) natively on CUDA, JUnit XML, with
                  what is left of the run's BUDGET_S; each outcome is also written as the test ends

Writes ``<out>/<device>-<date>-gpu-check.md`` (every result), ``.log`` (every stage's
raw output), ``.json`` (the numbers), ``-junit.xml`` and ``-tests.txt`` (each test's outcome) into ``GPU_CHECK_OUT`` /
``--out`` (default bench/results/), and prints a one-screen summary last. Exit status
1 if any stage failed. ``--dry-run`` runs every stage at tiny sizes on the CPU (the
build stage only resolves setup.py's configuration); ``python_tests/test_gpu_check.py``
runs it in ``make test``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

REPO_ROOT = Path(__file__).resolve().parent.parent
SITE = REPO_ROOT / ".gpu-site"

# (name, time limit in seconds on the GPU), from the stage times of the first run
# (bench/results/nvidia-h200-2026-11-28-gpu-check.md), step and model with room for their
# CUDA-graph rows, added since. pytest runs last and gets what is
# left of BUDGET_S: the measurements are sure to run, and the native suite, which spends
# its time compiling kernels, takes whatever time they leave.
STAGES = (
    ("wheels", 20),
    ("build", 45),
    ("roofline", 15),
    ("step", 50),
    ("svd", 35),
    ("model", 100),
    ("profile", 40),
    ("llama7b_memory", 60),
    ("pytest", None),
)
BUDGET_S = 510  # the whole run: a device call of 540 s with room for the report
DRY_RUN_LIMIT = 240  # any stage, at tiny sizes on a slow shared CPU
MIN_STAGE_S = 5  # a stage with less of the budget left is skipped
# python_tests/conftest.py appends each test's outcome (and a failure's traceback) to the file this
# variable names, as the test ends: what a suite stopped at its limit ran is still known.
TEST_PROGRESS_VARIABLE = "GALORE_TEST_PROGRESS"
# The native pytest stage: kernels, optimizers and projectors on CUDA, those with the most
# GPU-only tests first. Left out: the CPU-only suites (gloo multi-process, the gpu-check dry
# run, bench smoke tests, packaging, the Trainer on CPU), which a GPU tells nothing new.
GPU_TEST_FILES = (
    "test_optim_capturable.py", "test_kernels_grouped_steps.py", "test_matmul_precision.py", "test_kernels_adamw8bit.py", "test_optim_backends.py",
    "test_kernels_galore_adamw8bit.py", "test_kernels_galore_adamw.py", "test_kernels_natural_galore.py",
    "test_kernels_multi_tensor.py", "test_kernels_nonfinite_stamp.py", "test_kernels_lomo.py",
    "test_kernels_galore_adafactor.py", "test_kernels_program_order.py", "test_launch_budget.py",
    "test_randomized_svd.py", "test_projector.py", "test_projector_storage.py", "test_quant.py",
    "test_optim_8bit_accuracy.py", "test_optim_layerwise.py", "test_optim_api.py", "test_optim_guardrails.py",
    "test_optim_two_pass.py", "test_optim_lomo.py", "test_natural_galore.py", "test_galore_adafactor.py",
    "test_refresh_options.py", "test_reference_parity.py", "test_optim_checkpoint_compat.py",
    "test_kernels_mutations.py",  # last: every planted defect is a kernel compiled anew
)
CPU_ONLY_TEST_FILES = (
    "test_kernels_sm90.py",  # compiles for sm_90 without running: the same on any machine
    "test_distributed_ddp.py", "test_distributed_fsdp2.py", "test_distributed_trainer.py", "test_gpu_check.py",
    "test_bench_smoke.py", "test_packaging.py", "test_integration_transformers.py",
)
INTERRUPT_GRACE_S = 10  # at most, of a stage's limit (a quarter of it at most), kept to answer SIGINT before SIGKILL

STEP_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))
STEP_RANKS = (128, 512, 1024)
LLAMA_RANK = 1024  # GaLore's LLaMA-7B rank


# ----------------------------------------------------------------- stages run in-process by a child


def _device(dry_run: bool):
    import torch

    return torch.device("cpu" if dry_run or not torch.cuda.is_available() else "cuda")


def stage_roofline(args) -> dict:
    from . import roofline

    result = roofline.measure(_device(args.dry_run), quick=args.dry_run)
    return dict(roofline=asdict(result), markdown=roofline.format_table(result))


def _measured_roofline(args, device):
    from . import roofline

    if args.roofline and Path(args.roofline).exists():
        return roofline.Roofline(**json.loads(Path(args.roofline).read_text())["roofline"])
    return roofline.measure(device, quick=True)  # the roofline stage failed: a quick measurement keeps the floors meaningful


def stage_step(args) -> dict:
    import torch

    from . import bench_step

    device = _device(args.dry_run)
    measured = _measured_roofline(args, device)
    if args.dry_run:
        config = bench_step.Config(((64, 96),), (8,), (torch.float32,), warmup=2, repeats=2)
    else:
        config = bench_step.Config(STEP_SHAPES, STEP_RANKS, (torch.bfloat16,), warmup=3, repeats=20)
    rows = bench_step.run(device, roofline=measured, config=config, progress=False)
    markdown = (bench_step.describe(device, config) + "\n\n" + bench_step.format_table(rows) + "\n\n"
                + bench_step.format_detail(rows))
    return dict(rows=rows, markdown=markdown, summary=bench_step.format_table(rows))


def stage_svd(args) -> dict:
    from . import bench_svd

    device = _device(args.dry_run)
    shapes, ranks, repeats = ([(96, 160)], [8], 1) if args.dry_run else ([(4096, 11008)], [512], 3)
    rows = bench_svd.run(device, shapes=shapes, ranks=ranks, repeats=repeats)
    return dict(rows=rows, markdown=bench_svd.format_table(rows))


def stage_model(args) -> dict:
    """The whole optimizer step of LLaMA-1B/7B-shaped parameter sets: launches, host µs, step times (bench.bench_model)."""
    from . import bench_model

    device = _device(args.dry_run)
    with tempfile.TemporaryDirectory() as out_dir:  # the section's own file; its tables go into this report
        result = bench_model.run(device, Path(out_dir), roofline=_measured_roofline(args, device), quick=args.dry_run,
                                 timed=True)
    summary = bench_model.format_time_table(result["times"])
    return dict(host=result["host"], times=result["times"], markdown=result["markdown"], summary=summary)


def stage_profile(args) -> dict:
    """Where the whole step's time goes: device busy time per kernel against the wall (bench.bench_profile)."""
    from . import bench_profile

    rows = bench_profile.run(_device(args.dry_run), quick=args.dry_run)
    return dict(rows=rows, markdown=bench_profile.format_markdown(rows), summary=bench_profile.summary(rows))


def stage_llama7b_memory(args) -> dict:
    """Peak memory of layerwise GaLoreAdamW8bit training steps of a LLaMA-7B-shaped bf16 model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from . import synchronize
    from .bench_train import galore_param_groups

    import galore_kernels

    from .bench_model import MODELS, TINY_MODEL

    device = _device(args.dry_run)
    shape = TINY_MODEL["tiny"] if args.dry_run else MODELS["LLaMA-7B"]
    heads = shape["hidden"] // 128 if not args.dry_run else 4  # LLaMA's head dimension is 128
    seq, steps, rank = (32, 2, 8) if args.dry_run else (512, 3, LLAMA_RANK)
    config = LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=seq, tie_word_embeddings=False, use_cache=False,
    )
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the device: no fp32 copy of 7B weights
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    groups = galore_param_groups(model, SimpleNamespace(rank=rank, update_proj_gap=200, galore_scale=0.25))
    optimizer = galore_kernels.GaLoreAdamW8bit(groups, lr=1e-3, layerwise=True)
    generator = torch.Generator().manual_seed(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step_s = []
    for _ in range(steps):
        tokens = torch.randint(0, shape["vocab"], (1, seq), generator=generator).to(device)
        synchronize(device)
        started = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()  # the layerwise hooks update every parameter and free its gradient
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        step_s.append(time.perf_counter() - started)
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite loss {loss.item()}")
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    peak_text = f"{peak / 1e9:.2f} GB" if peak is not None else "n/a (CPU)"
    markdown = "\n".join([
        f"LLaMA {shape['hidden']}×{shape['layers']} layers, vocab {shape['vocab']}, bf16 random weights "
        f"({weights / 1e9:.2f} GB), activation checkpointing, batch 1, sequence {seq}, "
        f"GaLoreAdamW8bit layerwise rank {rank}, {steps} steps (the first refreshes every projector).",
        "",
        "| quantity | value |", "|---|---|",
        f"| peak allocated over the steps | {peak_text} |",
        f"| weights | {weights / 1e9:.2f} GB |",
        f"| optimizer state (codes, absmaxes, projectors) | {state / 1e9:.3f} GB |",
        f"| step time, first / last | {step_s[0]:.2f} s / {step_s[-1]:.2f} s |",
        f"| final loss | {loss.item():.3f} |",
    ])
    return dict(peak_bytes=peak, weights_bytes=weights, state_bytes=state, step_s=step_s, loss=loss.item(),
                markdown=markdown, summary=f"peak {peak_text}, weights {weights / 1e9:.2f} GB, state {state / 1e9:.3f} GB, "
                                           f"steps {step_s[0]:.2f}/{step_s[-1]:.2f} s")


IN_PROCESS = {
    "roofline": stage_roofline, "step": stage_step, "svd": stage_svd,
    "model": stage_model, "profile": stage_profile, "llama7b_memory": stage_llama7b_memory,
}


# ----------------------------------------------------------------- the orchestrator


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _run(command: list[str], *, log, timeout: float, env: dict) -> tuple[str, float]:
    """Run ``command`` with output appended to ``log``; ``(status, seconds)``, the whole process group stopped at the limit."""
    started = time.perf_counter()
    log.flush()
    # SIGINT back to its default in the stage: a check started in the background (nohup, `cmd &` in a
    # script) inherits it ignored, and pytest would then never see the interrupt below.
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True, preexec_fn=_default_sigint)
    grace = min(INTERRUPT_GRACE_S, timeout / 4)
    try:
        status = "ok" if process.wait(timeout=timeout - grace) == 0 else f"failed (exit {process.returncode})"
    except subprocess.TimeoutExpired:
        # SIGINT first: pytest answers it by writing its JUnit XML and summary of the tests run so far.
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        status = f"timeout ({timeout:.0f} s)"
    return status, time.perf_counter() - started


def _junit_counts(path: Path) -> dict | None:
    if not path.exists():
        return None
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {key: sum(int(suite.get(key, 0)) for suite in suites) for key in ("tests", "failures", "errors", "skipped")}
    counts["failed_tests"] = [f"{case.get('classname')}::{case.get('name')}" for suite in suites
                              for case in suite.iter("testcase") if case.find("failure") is not None
                              or case.find("error") is not None]
    return counts


def _progress_counts(path: Path) -> dict | None:
    """``_junit_counts``' figures from the progress file: one "outcome seconds nodeid" line per test."""
    if not path.exists():
        return None
    lines = [line.split(" ", 2) for line in path.read_text().splitlines() if line and not line.startswith(" ")]
    outcomes = [(outcome, nodeid) for outcome, _, nodeid in lines]
    return dict(tests=len(outcomes), failures=sum(o == "failed" for o, _ in outcomes), errors=sum(o == "error" for o, _ in outcomes),
                skipped=sum(o == "skipped" for o, _ in outcomes),
                failed_tests=[nodeid for o, nodeid in outcomes if o in ("failed", "error")])


def _commands(name: str, args, paths: dict) -> list[str] | None:
    python = sys.executable
    if name == "wheels":
        wheels = sorted(str(w) for w in Path(args.wheels).glob("*.whl"))
        if not wheels:
            return None
        return [python, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--upgrade",
                "--target", str(paths["site"]), *wheels]
    if name == "build":
        if args.dry_run:  # resolves the toolchain and prints the build it would do, compiles nothing
            return [python, "setup.py", "--name"]
        return [python, "setup.py", "build_ext", "--inplace"]
    if name == "pytest":
        command = [python, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", "--durations=30",
                   f"--junitxml={paths['junit']}"]
        if args.dry_run:
            return command + ["python_tests/test_quant.py"]
        # Where the machine has them: test files spread over cores, and a hanging test fails alone.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        if importlib.util.find_spec("xdist") is not None:
            command += ["-n", str(min(8, cores)), "--dist", "loadfile"]
        if importlib.util.find_spec("pytest_timeout") is not None:
            command += ["--timeout", "120"]
        return command + [f"python_tests/{name}" for name in GPU_TEST_FILES]
    command = [python, "-m", "bench.gpu_check", "--stage", name, "--json", str(paths["json_dir"] / f"{name}.json"),
               "--roofline", str(paths["json_dir"] / "roofline.json")]
    return command + (["--dry-run"] if args.dry_run else [])


def _environment(args, site: Path) -> dict:
    env = dict(os.environ)
    python_path = [str(site), str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(python_path)
    env["PYTHONUNBUFFERED"] = "1"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    env["MAX_JOBS"] = str(cores)
    import torch

    if torch.cuda.is_available() and not args.dry_run:
        env.pop("TRITON_INTERPRET", None)
        major, minor = torch.cuda.get_device_capability()
        env.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    else:
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, whatever the machine
    return env


def _summary(results: dict, meta: dict, files: list[Path]) -> str:
    lines = [f"gpu-check on {meta['device']} ({meta['date']}, torch {meta['torch']}, Triton {meta['triton']}, "
             f"{meta['wall_s']:.0f} s{', DRY RUN' if meta['dry_run'] else ''})"]
    for name, _ in STAGES:
        stage = results[name]
        line = f"  {name:<15} {stage['status']:<22} {stage['seconds']:6.1f} s"
        junit = stage.get("junit")
        if junit:
            line += (f"  {junit['tests']} tests: {junit['failures']} failed, {junit['errors']} errors, "
                     f"{junit['skipped']} skipped")
        if name == "roofline" and "roofline" in stage:
            r = stage["roofline"]
            line += f"  {r['peak_flops'] / 1e12:.1f} TFLOP/s {r['matmul_dtype']}, {r['copy_bandwidth'] / 1e9:.0f} GB/s"
        lines.append(line)
        for failed in (junit or {}).get("failed_tests", [])[:10]:
            lines.append(f"      FAILED {failed}")
    for name, title in (("step", "Step ms (× vs galore-torch 8-bit)"), ("model", "Whole step, LLaMA-shaped parameter sets"),
                        ("profile", "Device busy time in the whole step"), ("llama7b_memory", "LLaMA-7B layerwise 8-bit")):
        if results[name].get("summary"):
            lines += ["", title, results[name]["summary"]]
    lines += ["", "wrote " + ", ".join(str(f) for f in files)]
    return "\n".join(lines)


def _markdown(results: dict, meta: dict) -> str:
    lines = [f"# gpu-check: {meta['device']}, {meta['date']}", "",
             f"`{meta['command']}`: torch {meta['torch']}, Triton {meta['triton']}, Python {meta['python']}, "
             f"{meta['wall_s']:.0f} s in all{' (dry run: tiny sizes on the CPU, not a measurement)' if meta['dry_run'] else ''}.",
             "", "| stage | status | seconds | limit |", "|---|---|---|---|"]
    lines += [f"| {name} | {results[name]['status']} | {results[name]['seconds']:.1f} | {results[name]['limit']:.0f} |"
              for name, _ in STAGES]
    junit = results["pytest"].get("junit")
    if junit:
        lines += ["", "## pytest", "", f"{junit['tests']} tests: {junit['failures']} failed, {junit['errors']} errors, "
                  f"{junit['skipped']} skipped."]
        lines += [f"- FAILED `{name}`" for name in junit["failed_tests"]]
    for name, title in (("roofline", "Roofline"), ("step", "Optimizer step"), ("svd", "Projector refresh (SVD)"),
                        ("model", "Whole optimizer step, LLaMA-shaped parameter sets"),
                        ("profile", "Where the whole step's time goes"),
                        ("llama7b_memory", "Peak memory, layerwise 8-bit training of a LLaMA-7B-shaped model")):
        if results[name].get("markdown"):
            lines += ["", f"## {title}", "", results[name]["markdown"]]
    return "\n".join(lines) + "\n"


def orchestrate(args) -> int:
    import torch

    from . import device_name, device_slug

    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    today = datetime.date.today().isoformat()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{device_slug(device)}-{today}-gpu-check" + ("-dry-run" if args.dry_run else "")
    files = dict(md=out / f"{stem}.md", log=out / f"{stem}.log", json=out / f"{stem}.json",
                 junit=out / f"{stem}-junit.xml", tests=out / f"{stem}-tests.txt")
    results = {}
    with tempfile.TemporaryDirectory() as scratch, open(files["log"], "w") as log:
        # The dry run installs into a scratch directory: it must not leave a .gpu-site behind.
        paths = dict(site=Path(scratch) / "site" if args.dry_run else SITE, json_dir=Path(scratch),
                     junit=files["junit"])
        env = _environment(args, paths["site"])
        env[TEST_PROGRESS_VARIABLE] = str(files["tests"])
        for name, limit in STAGES:
            left = BUDGET_S - (time.perf_counter() - started)
            limit = DRY_RUN_LIMIT if args.dry_run else (left if limit is None else min(limit, left))
            if limit < MIN_STAGE_S:
                results[name] = dict(status=f"skipped (the {BUDGET_S} s budget is spent)", seconds=0.0, limit=limit)
                continue
            command = _commands(name, args, paths)
            print(f"[gpu-check] {name} (limit {limit} s)", file=sys.stderr, flush=True)
            log.write(f"\n===== {name}: {' '.join(command) if command else 'skipped'}\n")
            if command is None:
                results[name] = dict(status=f"skipped (no wheels in {args.wheels}: run make gpu-wheels)",
                                     seconds=0.0, limit=limit)
                continue
            status, seconds = _run(command, log=log, timeout=limit, env=env)
            results[name] = dict(status=status, seconds=seconds, limit=limit)
            stage_json = paths["json_dir"] / f"{name}.json"
            if stage_json.exists():
                results[name].update(json.loads(stage_json.read_text()))
            if name == "pytest":
                # A suite stopped at its limit may not have written its XML: the progress file has every test it ran.
                results[name]["junit"] = _junit_counts(files["junit"]) or _progress_counts(files["tests"])
                if not files["junit"].exists():
                    files.pop("junit")
            log.write(f"===== {name}: {status} in {seconds:.1f} s\n")
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    meta = dict(device=device_name(device), date=today, torch=torch.__version__, triton=triton_version,
                python=sys.version.split()[0], dry_run=args.dry_run, wall_s=time.perf_counter() - started,
                command="make gpu-check" + (" GPU_CHECK_ARGS=--dry-run" if args.dry_run else ""))
    files["md"].write_text(_markdown(results, meta))
    files["json"].write_text(json.dumps(dict(meta=meta, stages=results), indent=1, default=str))
    print(_summary(results, meta, list(files.values())))
    return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in results.values()) else 1


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="every stage at tiny sizes on the CPU")
    parser.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT") or str(REPO_ROOT / "bench" / "results"),
                        help="results directory (default: $GPU_CHECK_OUT, else bench/results/)")
    parser.add_argument("--wheels", default=str(REPO_ROOT / ".whl"), help="directory of wheels to install (default .whl/)")
    parser.add_argument("--stage", choices=sorted(IN_PROCESS), help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("--roofline", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.stage:
        result = IN_PROCESS[args.stage](args)
        Path(args.json).write_text(json.dumps(result, default=str))
        print(result.get("markdown", ""))
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
