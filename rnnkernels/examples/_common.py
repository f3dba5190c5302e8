"""What every demo shares: its command line, seeding, markdown tables, the page it writes and the
plotting backend (Agg: files only, no display needed)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tiny", action="store_true",
                   help="a setting small enough for the tests (seconds, not minutes)")
    p.add_argument("--out", default="docs", help="folder for the markdown page and the PNGs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    return p


def start(args: argparse.Namespace) -> Path:
    """Seed, set the thread count, create the output folder; returns it."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def main(doc: str, run: Callable[..., object], argv: Sequence[str] | None) -> None:
    """A demo's command line: parse (the first line of its docstring as the description),
    seed and set up, then run(tiny, out, seed, argv)."""
    args = parser(doc.splitlines()[0]).parse_args(argv)
    start(args)
    run(args.tiny, args.out, args.seed, argv)


def command(module: str, argv: Sequence[str] | None) -> str:
    """The command line that reproduces a run, for the page."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python -m", f"rnnkernels.examples.{module}", *args])


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; numbers appear as given (format them before). A "|" inside a cell (a
    norm, ||W||) is escaped so it does not split the cell."""
    def line(cells: Sequence[object]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), "|" + "|".join("---" for _ in headers) + "|"]
                     + [line(row) for row in rows])


def write_page(out: Path, name: str, text: str) -> Path:
    path = out / f"{name}.md"
    path.write_text(text.rstrip() + "\n")
    return path
