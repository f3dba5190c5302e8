"""python -m bench: how much faster rnnkernels is than what you use today, on this machine.

Runs the suites on the device present (or --device), side by side with torch.nn and the naive
loops (and mamba_ssm for the selective scan when it is installed), prints a markdown report, and
writes it with the JSON results and PNG plots into --out (default bench/results/). Exits 1 when a
contender was refused (wrong results) or failed, or a suite could not run.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

from . import configs, env, plots, report, runner
from .core import dtype_name
from .suites import SUITES

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
DEFAULT_DTYPE = {"cpu": "float32", "cuda": "bfloat16"}


def _suites(text: str) -> list[str]:
    names = list(SUITES) if text == "all" else [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in SUITES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown suite(s) {', '.join(unknown) or text!r}; choose from {', '.join(SUITES)} "
            "or all (comma-separated)")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", type=_suites, default=list(SUITES),
                   help=f"comma-separated suites among {', '.join(SUITES)}, or all (default)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when a GPU is present, else cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="default: float32 on the CPU, bfloat16 on the GPU")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and short measurements: checks the plumbing, not the speed")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"directory for the .md, .json and .png files (default {DEFAULT_OUT})")
    p.add_argument("--list", action="store_true",
                   help="print the cases that would run and exit (needs no device)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or case lines")
    return p.parse_args(argv)


def file_tag(header: dict, suites: list[str], default_dtype: bool) -> str:
    """<device>-<date>[-<dtype>][-<suites>][-quick]: bench/results/<gpu>-<yyyy-mm-dd>.* for a
    full run in the device's default dtype."""
    tag = f"{header['slug']}-{datetime.date.today().isoformat()}"
    if not default_dtype:
        tag += f"-{header['dtype']}"
    if suites != list(SUITES):
        tag += "-" + "-".join(suites)
    if header["quick"]:
        tag += "-quick"
    return tag


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_text = args.dtype or DEFAULT_DTYPE[device]
    dtype = DTYPES[dtype_text]
    the_plan = runner.plan(args.suite, device, dtype, args.quick)
    if args.list:
        for _, spec in the_plan.cases:
            print(f"{spec.suite:15} {spec.label:22} {spec.mode:9} {dtype_name(dtype):9} "
                  f"{spec.describe()}{'' if spec.loops else '  (no loop baseline)'}")
        for t in the_plan.targets:
            print(f"target: {t.text}")
        for e in the_plan.errors:
            print(f"ERROR {e}")
        return 1 if the_plan.errors else 0
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2

    mamba_note = None
    if device == "cuda" and "selective_scan" in args.suite:
        from . import mamba

        fn, note = mamba.load()
        mamba_note = note if fn is not None else f"not used: {note}"
    header = env.header(device, dtype, args.suite, args.quick, mamba_note)
    profile = configs.profile_name(device, args.quick)
    results = runner.run(the_plan, configs.MIN_TIME_S[profile], header["copy_bandwidth_Bps"],
                         progress=not args.no_progress)
    targets = report.evaluate_targets(the_plan.targets, results)
    document = report.markdown(header, results, targets, the_plan.errors)
    print(document)

    tag = file_tag(header, args.suite, dtype_text == DEFAULT_DTYPE[device])
    written = report.write(args.out, tag, document,
                           report.to_json(header, results, targets, the_plan.errors))
    title = f"{header['device']}, {header['dtype']}, {header['threads']} threads"
    written += plots.write_all(results, title, args.out, tag)
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    failures = runner.failures(results, the_plan)
    for line in failures:
        print(f"FAILED: {line}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
