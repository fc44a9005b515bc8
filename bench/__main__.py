"""``python -m bench``: the benchmark suite, written to ``<out>/<device>-<date>.md`` with PNG plots.

With no flags it runs the full suite on a GPU, or a reduced one (about 10
minutes on a 2-core machine) on CPU: roofline, optimizer step throughput,
projector refresh (SVD), the whole step of LLaMA-1B/7B parameter sets
(launches and host time; step times on GPU), end-to-end training, Natural GaLore against GaLore (its own
results file, ``<device>-<date>-natural-galore.md``), and the training-quality study of
refresh options (about 7 more minutes; its own results file, ``*-refresh-study.md``). ``--quick`` runs tiny sizes
(the smoke test's configuration; not a measurement), ``--only`` picks sections.
``--budget-minutes N`` shortens the training section so the whole run fits in about
N minutes. The results file is rewritten as each section ends, marked partial until
the last one, so an interrupted run still leaves what it measured. The tables are
printed last.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

SECTIONS = ("step", "model", "svd", "layerwise", "distributed", "train", "natural", "quality")
QUICK_SVD = dict(shapes=[(96, 160)], ranks=[8], repeats=1)


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    parser.add_argument("--only", action="append", choices=SECTIONS,
                        help="run only this section (repeatable); the roofline is always measured")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="results directory")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="scale the training section down so the whole run takes about this long")
    args = parser.parse_args(argv)
    if args.budget_minutes is not None and not args.budget_minutes > 0:
        parser.error(f"--budget-minutes must be > 0, got {args.budget_minutes}")
    return args


def main(argv=None) -> Path:
    from . import bench_step, bench_train, device_name, device_slug, report, roofline as roofline_module

    args = parse_args(argv)
    sections = tuple(section for section in SECTIONS if not args.only or section in args.only)
    progress = not args.no_progress
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    today = datetime.date.today().isoformat()

    suffix = ("-quick" if args.quick else "") + ("".join(f"-{s}" for s in sections) if args.only else "")
    path = args.out / f"{device_slug(device)}-{today}{suffix}.md"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    meta = dict(
        device=device_name(device), date=today, command="python -m " + " ".join(["bench", *(argv or sys.argv[1:])]),
        torch=torch.__version__, triton=triton_version,
        galore_torch=_version("galore-torch"), bitsandbytes=_version("bitsandbytes"),
        transformers=_version("transformers"), python=platform.python_version(), threads=torch.get_num_threads(),
        sections=sections, quick=args.quick,
    )
    section_s: dict[str, float] = {}
    results: dict = dict(step_rows=None, step_method="", svd_rows=None, svd_table="", train=None)

    def write_report(done: tuple[str, ...]) -> list[Path]:
        """(Re)write the results file with what has run; partial until every section has."""
        pending = tuple(section for section in sections if section not in done)
        meta.update(wall_s=time.perf_counter() - started, section_s=dict(section_s), pending=pending,
                    load=(load_at_start, os.getloadavg()[0] if hasattr(os, "getloadavg") else None))
        written = report.write(path, meta=meta, roofline=roofline, **results)
        if pending:
            print(f"[bench] partial results in {path} (still to run: {', '.join(pending)})", file=sys.stderr)
        return written

    print(f"[bench] {device_name(device)}: measuring the roofline", file=sys.stderr)
    roofline = roofline_module.measure(device, quick=args.quick)
    section_s["roofline"] = time.perf_counter() - started
    done: list[str] = []
    written = write_report(())

    @contextlib.contextmanager
    def section(name: str):
        """Times a section; as it ends, the results file is rewritten with it."""
        nonlocal written
        section_start = time.perf_counter()
        yield
        section_s[name] = time.perf_counter() - section_start
        done.append(name)
        written = write_report(tuple(done))

    if "step" in sections:
        with section("step"):
            config = bench_step.default_config(device, args.quick)
            results["step_method"] = bench_step.describe(device, config)
            results["step_rows"] = bench_step.run(device, roofline=roofline, config=config, progress=progress)
    model = None
    if "model" in sections:
        from . import bench_model

        print("[bench] the whole step of LLaMA-1B/7B parameter sets (bench_model)", file=sys.stderr)
        with section("model"):
            model = bench_model.run(device, args.out, roofline=roofline, quick=args.quick)
    if "svd" in sections:
        from . import bench_svd

        print("[bench] projector refresh (bench_svd)", file=sys.stderr)
        with section("svd"):
            results["svd_rows"] = bench_svd.run(device, **(QUICK_SVD if args.quick else {}))
            results["svd_table"] = bench_svd.format_table(results["svd_rows"])
    results_layerwise = None
    if "layerwise" in sections:
        from . import bench_layerwise

        print("[bench] layerwise optimizers: step time and memory (bench_layerwise)", file=sys.stderr)
        with section("layerwise"):
            results_layerwise = bench_layerwise.run(device, args.out, quick=args.quick)
    results_distributed = None
    if "distributed" in sections:
        from . import bench_distributed

        print("[bench] 2 processes: single, DDP, DDP + low-rank hook, FSDP2 (bench_distributed)", file=sys.stderr)
        with section("distributed"):
            results_distributed = bench_distributed.run(device, args.out, quick=args.quick)
    if "train" in sections:
        with section("train"):
            budget_s = None
            if args.budget_minutes is not None:
                budget_s = 60 * args.budget_minutes - (time.perf_counter() - started)
            results["train"] = bench_train.run(device, quick=args.quick, progress=progress, budget_s=budget_s)
    natural = None
    if "natural" in sections:
        from . import bench_natural

        print("[bench] Natural GaLore against GaLore (bench_natural)", file=sys.stderr)
        with section("natural"):
            natural = bench_natural.run(device, out=args.out, quick=args.quick, progress=progress)
    quality = None
    if "quality" in sections:
        from . import bench_quality

        print("[bench] training quality at refreshes (bench_quality)", file=sys.stderr)
        with section("quality"):
            quality = bench_quality.run(device, quick=args.quick, progress=progress)
    if quality is not None:
        quality_path = args.out / f"{device_slug(device)}-{today}{'-quick' if args.quick else ''}-refresh-study.md"
        written = [*written, *bench_quality.write(quality_path, quality, device, meta)]
    step_rows, svd_rows, svd_table, train = (results[key] for key in ("step_rows", "svd_rows", "svd_table", "train"))

    if natural is not None:
        written.append(natural["path"])
    print(f"\nwrote {', '.join(str(p) for p in written)} ({meta['wall_s']:.0f} s)\n")
    print(f"Device: {meta['device']}\n\nRoofline\n{roofline_module.format_table(roofline)}")
    if step_rows is not None:
        print(f"\nOptimizer step: ms (speedup vs {bench_step.BASELINE})\n{bench_step.format_table(step_rows)}")
    if model is not None:
        print(f"\nThe whole step of LLaMA-shaped parameter sets (also in {model['path']})\n{model['markdown']}")
    if svd_rows is not None:
        print(f"\nProjector refresh\n{svd_table}")
    if results_layerwise is not None:
        print(f"\nLayerwise optimizers (also in {args.out / ('layerwise-' + device.type + ('-smoke' if args.quick else '') + '.md')})\n{results_layerwise}")
    if results_distributed is not None:
        print(f"\nAcross 2 processes (also in {args.out / ('distributed-' + device.type + ('-smoke' if args.quick else '') + '.md')})\n{results_distributed}")
    if natural is not None:
        print(f"\nNatural GaLore vs GaLore: step and state\n{bench_natural.format_step_table(natural['step'])}")
        print(f"\nNatural GaLore vs GaLore: training\n{bench_natural.format_train_table(natural['train'])}")
    if quality is not None:
        rows = bench_quality.summarize(quality)
        print(f"\nTraining quality at refreshes\n{bench_quality.format_table(rows)}")
        print("\n".join(bench_quality.verdicts(rows)))
    if train is not None:
        print(f"\nTraining\n{bench_train.format_table(train)}\n{bench_train.format_acceptance(train['acceptance'])}")
    return path


if __name__ == "__main__":
    main()
