"""The run as markdown (header, one table per suite, targets) and as JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from .core import Result, Target

SCHEMA = 1
EXPLANATION = (
    "Median time after warm-up (compilation and autotuning excluded); `vs X` = time of X / time"
    " of the row (above 1: the row is faster); `vs no variant`: the same contender's time on "
    "the case of the same shape without the row's variant (unpacked input, no cell option) / "
    "the row's time (below 1: what the variant costs). Every row was checked against a float64 "
    "reference before it was timed (`err`: norm-wise relative error of the worst result); a row"
    " whose results are wrong is REFUSED and posts no time. `peak mem`: peak memory allocated "
    "during one call; `faults`: minor page faults per timed call (CPU: memory malloc got fresh "
    "from the kernel, zeroed on first touch, which the step pays for; counted over the timed "
    "calls, in the allocator state the case's interleaved contenders leave). Recurrences: useful "
    "FLOPs per second and time per step; scans: bytes that must move (inputs read once, outputs "
    "written once) per second, and that rate over the measured copy bandwidth.")


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return ""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return ""
    if n < 2**20:
        return f"{n / 2**10:.1f} KiB"
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def cell(text: object) -> str:
    """Text safe inside a markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def fmt_ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}x" if x < 100 else f"{x:.0f}x"


def evaluate_targets(targets: Sequence[Target], results: Sequence[Result]) -> list[dict]:
    """Each target with its measured speed-up and whether it was met (or by how much missed)."""
    ok = {(r.suite, r.case, r.contender): r for r in results if r.status == "ok"}
    rows = []
    for t in targets:
        fast, slow = ok.get((t.suite, *t.fast)), ok.get((t.suite, *t.slow))
        row = {"suite": t.suite, "target": t.text, "minimum": t.minimum, "measured": None}
        if fast is None or slow is None:
            missing = " and ".join(f"{c} on {case}" for (case, c), r in ((t.fast, fast),
                                                                       (t.slow, slow)) if r is None)
            row["status"] = f"not measured ({missing} has no timing)"
        else:
            measured = slow.median_s / fast.median_s
            row["measured"] = measured
            if measured >= t.minimum:
                row["status"] = f"met (+{(measured / t.minimum - 1) * 100:.0f}%)"
            else:
                row["status"] = f"missed by {(1 - measured / t.minimum) * 100:.0f}%"
        rows.append(row)
    return rows


def _header_table(h: dict) -> list[str]:
    bw = h["copy_bandwidth_Bps"] / 1e9
    versions = " / ".join(str(h[k] or "-") for k in ("torch", "triton", "cuda", "cudnn"))
    rows = [
        ("device", h["device"]),
        ("dtype", h["dtype"]),
        ("threads", h["threads"]),
        ("torch / triton / CUDA / cuDNN", versions),
        ("oneDNN", ("yes" if h["onednn"] else "no")
         + ("; our recurrences' float32 matmuls through it" if h.get("onednn_matmul") else "")),
        ("CPU", f"{h['cpu']} ({h['cpu_capability']})"),
        ("python", h["python"]),
        ("rnnkernels", f"{h['rnnkernels']}, commit {h['commit']}"),
        ("mamba_ssm", h["mamba_ssm"] or "-"),
        ("date", h["date"]),
        ("measured copy bandwidth", f"{bw:.1f} GB/s (read + write)"),
    ]
    if h.get("quick"):
        rows.append(("profile", "--quick (plumbing check; timings meaningless)"))
    return ["| | |", "|---|---|"] + [f"| {k} | {cell(v)} |" for k, v in rows]


def _plain_key(r: Result) -> tuple:
    """What a variant's row shares with the row of the case without it."""
    return (r.mode, tuple(r.shape.items()), r.contender)


def suite_table(results: Sequence[Result]) -> list[str]:
    """One suite's rows: a column of speed-up per baseline, and the metric of the family."""
    baselines = list(dict.fromkeys(r.contender for r in results
                                   if r.kind != "ours" and r.status == "ok"))
    plain = {_plain_key(r): r.median_s for r in results if r.status == "ok" and not r.variant}
    costs = any(r.status == "ok" and r.variant and _plain_key(r) in plain for r in results)
    flops = any(r.tflops is not None for r in results)
    bandwidth = any(r.gbps is not None for r in results)
    cols = ["case", "shape", "contender", "impl", "median"] + [f"vs {b}" for b in baselines]
    if costs:
        cols.append("vs no variant")
    if flops:
        cols += ["TFLOP/s", "us/step"]
    if bandwidth:
        cols += ["GB/s", "of copy bw"]
    faults = any(r.faults_per_call is not None for r in results)
    cols += ["peak mem"] + (["faults"] if faults else []) + ["err"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        if r.status == "skipped":
            continue
        shape = " ".join(f"{k}={v}" for k, v in r.shape.items())
        if r.variant:
            shape += f" ({r.variant})"
        head = [r.case, shape, r.contender, r.impl]
        if r.status != "ok":
            cells = [f"**{r.status.upper()}**: {cell(r.reason)}"]
            cells += [""] * (len(cols) - len(head) - 1)
            lines.append("| " + " | ".join(head + cells) + " |")
            continue
        cells = [fmt_time(r.median_s)]
        cells += ["" if b == r.contender else fmt_ratio(r.speedups.get(b)) for b in baselines]
        if costs:
            base = plain.get(_plain_key(r)) if r.variant else None
            cells.append(fmt_ratio(base / r.median_s) if base is not None else "")
        if flops:
            cells += [f"{r.tflops:.3g}" if r.tflops is not None else "",
                      f"{r.us_per_step:.3g}" if r.us_per_step is not None else ""]
        if bandwidth:
            cells += [f"{r.gbps:.3g}" if r.gbps is not None else "",
                      f"{r.bw_fraction * 100:.0f}%" if r.bw_fraction is not None else ""]
        cells.append(fmt_bytes(r.peak_bytes))
        if faults:
            cells.append(f"{r.faults_per_call:.0f}" if r.faults_per_call is not None else "")
        cells.append(f"{r.err:.1e}")
        lines.append("| " + " | ".join(head + cells) + " |")
    skipped = dict.fromkeys(f"{r.contender}: {r.reason}" for r in results if r.status == "skipped")
    if skipped:
        lines += ["", "Not run here: " + "; ".join(skipped) + "."]
    return lines


def markdown(header: dict, results: Sequence[Result], targets: Sequence[dict],
             errors: Sequence[str]) -> str:
    lines = [f"# rnnkernels benchmark: {header['device']}, {header['dtype']}", ""]
    lines += _header_table(header)
    lines += ["", EXPLANATION]
    for suite in dict.fromkeys(r.suite for r in results):
        lines += ["", f"## {suite}", ""]
        lines += suite_table([r for r in results if r.suite == suite])
    if targets:
        lines += ["", "## Targets", "", "| target | measured | status |", "|---|---|---|"]
        lines += [f"| {cell(t['target'])} | {fmt_ratio(t['measured'])} | {cell(t['status'])} |"
                  for t in targets]
    if errors:
        lines += ["", "## Suites that could not run", ""] + [f"- **ERROR** {e}" for e in errors]
    return "\n".join(lines) + "\n"


def to_json(header: dict, results: Sequence[Result], targets: Sequence[dict],
            errors: Sequence[str]) -> dict:
    return {"schema": SCHEMA, "header": header, "results": [asdict(r) for r in results],
            "targets": list(targets), "errors": list(errors)}


def write(out_dir: Path, tag: str, document: str, data: dict) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / f"{tag}.md", out_dir / f"{tag}.json"
    md.write_text(document)
    js.write_text(json.dumps(data, indent=1) + "\n")
    return [md, js]


def load(path: Path) -> tuple[dict, list[Result], list[dict], list[str]]:
    """Read a result file written by :func:`write`."""
    data = json.loads(Path(path).read_text())
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: unknown result schema {data.get('schema')!r}, expected {SCHEMA}")
    results = [Result(**r) for r in data["results"]]
    return data["header"], results, data["targets"], data["errors"]
