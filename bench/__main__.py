"""``python -m bench``: the benchmark suite, written to ``<out>/<device>-<date>.md`` with PNG plots.

With no flags it runs the full suite on a GPU, or a reduced one (about 10
minutes on a 2-core machine) on CPU: roofline, optimizer step throughput,
projector refresh (SVD), end-to-end training, and Natural GaLore against GaLore
(its own results file, ``<device>-<date>-natural-galore.md``). ``--quick`` runs tiny sizes
(the smoke test's configuration; not a measurement), ``--only`` picks sections.
The tables are printed last.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

SECTIONS = ("step", "svd", "train", "natural")
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
    return parser.parse_args(argv)


def main(argv=None) -> Path:
    from . import bench_step, bench_train, device_name, device_slug, report, roofline as roofline_module

    args = parse_args(argv)
    sections = tuple(section for section in SECTIONS if not args.only or section in args.only)
    progress = not args.no_progress
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    today = datetime.date.today().isoformat()

    print(f"[bench] {device_name(device)}: measuring the roofline", file=sys.stderr)
    roofline = roofline_module.measure(device, quick=args.quick)
    section_s = {"roofline": time.perf_counter() - started}
    step_rows = svd_rows = train = None
    svd_table = step_method = ""
    if "step" in sections:
        section_start = time.perf_counter()
        config = bench_step.default_config(device, args.quick)
        step_method = bench_step.describe(device, config)
        step_rows = bench_step.run(device, roofline=roofline, config=config, progress=progress)
        section_s["step"] = time.perf_counter() - section_start
    if "svd" in sections:
        from . import bench_svd

        print("[bench] projector refresh (bench_svd)", file=sys.stderr)
        section_start = time.perf_counter()
        svd_rows = bench_svd.run(device, **(QUICK_SVD if args.quick else {}))
        svd_table = bench_svd.format_table(svd_rows)
        section_s["svd"] = time.perf_counter() - section_start
    if "train" in sections:
        section_start = time.perf_counter()
        train = bench_train.run(device, quick=args.quick, progress=progress)
        section_s["train"] = time.perf_counter() - section_start

    natural = None
    if "natural" in sections:
        from . import bench_natural

        section_start = time.perf_counter()
        natural = bench_natural.run(device, out=args.out, quick=args.quick, progress=progress)
        section_s["natural"] = time.perf_counter() - section_start

    suffix = ("-quick" if args.quick else "") + ("".join(f"-{s}" for s in sections) if args.only else "")
    path = args.out / f"{device_slug(device)}-{today}{suffix}.md"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    meta = dict(
        device=device_name(device), date=today, command="python -m " + " ".join(["bench", *(argv or sys.argv[1:])]),
        wall_s=time.perf_counter() - started, torch=torch.__version__, triton=triton_version,
        galore_torch=_version("galore-torch"), bitsandbytes=_version("bitsandbytes"),
        transformers=_version("transformers"), python=platform.python_version(), threads=torch.get_num_threads(),
        sections=sections, section_s=section_s, quick=args.quick,
        load=(load_at_start, os.getloadavg()[0] if hasattr(os, "getloadavg") else None),
    )
    written = report.write(path, meta=meta, roofline=roofline, step_rows=step_rows, step_method=step_method,
                           svd_rows=svd_rows, svd_table=svd_table, train=train)

    if natural is not None:
        written.append(natural["path"])
    print(f"\nwrote {', '.join(str(p) for p in written)} ({meta['wall_s']:.0f} s)\n")
    print(f"Device: {meta['device']}\n\nRoofline\n{roofline_module.format_table(roofline)}")
    if step_rows is not None:
        print(f"\nOptimizer step: ms (speedup vs {bench_step.BASELINE})\n{bench_step.format_table(step_rows)}")
    if svd_rows is not None:
        print(f"\nProjector refresh\n{svd_table}")
    if natural is not None:
        print(f"\nNatural GaLore vs GaLore: step and state\n{bench_natural.format_step_table(natural['step'])}")
        print(f"\nNatural GaLore vs GaLore: training\n{bench_natural.format_train_table(natural['train'])}")
    if train is not None:
        print(f"\nTraining\n{bench_train.format_table(train)}\n{bench_train.format_acceptance(train['acceptance'])}")
    return path


if __name__ == "__main__":
    main()
