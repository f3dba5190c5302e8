"""The benchmark suite's plumbing on the CPU, with the tiny --quick configuration: it runs,
writes valid JSON, markdown and PNGs, refuses a wrong kernel, fails loudly when an op is missing;
its float64 references, correctness gate and memory meter are right; the README table and the
GPU pass script work. Timings are never asserted."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch

import rnnkernels
from bench import check, configs, loops, report, runner, timing
from bench.__main__ import main as bench_main
from bench.core import Result, Target
from bench.readme_table import BEGIN, END
from bench.readme_table import main as readme_main
from bench.recurrence import OPTION_VARIANTS, _Case
from bench.timing import peak_memory
from rnnkernels import keep_cpu_lane_buffers, ops

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"


@contextlib.contextmanager
def _one_thread():
    # Tiny ops on a shared 2-core machine: a second intra-op thread only adds waiting.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, *args: str) -> tuple[int, str]:
    stdout = io.StringIO()
    with _one_thread(), contextlib.redirect_stdout(stdout):
        rc = bench_main(["--quick", "--device", "cpu", "--out", str(out), "--no-progress", *args])
    return rc, stdout.getvalue()


def _results(out: Path) -> tuple[Path, dict]:
    (path,) = out.glob("*.json")
    return path, json.loads(path.read_text())


@pytest.fixture(scope="module")
def quick_lstm(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-lstm")
    rc, stdout = _run(out, "--suite", "lstm")
    return rc, out, stdout


def test_quick_run_writes_json_markdown_and_png(quick_lstm):
    rc, out, stdout = quick_lstm
    assert rc == 0
    path, data = _results(out)
    assert data["schema"] == report.SCHEMA and data["errors"] == []
    header = data["header"]
    for key in ("device", "dtype", "threads", "torch", "triton", "commit", "date",
                "copy_bandwidth_Bps"):
        assert key in header
    assert header["dtype"] == "float32" and header["quick"] is True
    assert header["copy_bandwidth_Bps"] > 0

    results = data["results"]
    assert {r["status"] for r in results} == {"ok"}
    train = {r["contender"]: r for r in results if r["case"] == "train"}
    assert set(train) == {"rnnkernels (cpu)", "torch.nn.LSTM", "nn.LSTMCell loop"}
    for r in results:
        assert r["median_s"] > 0 and r["runs"] >= 1 and r["peak_bytes"] >= 0
        assert r["err"] < check.tolerance("cpu", torch.float32)
        assert r["tflops"] > 0 and r["us_per_step"] > 0
    ours = train["rnnkernels (cpu)"]
    assert set(ours["speedups"]) == {"torch.nn.LSTM", "nn.LSTMCell loop"}
    ratio = train["torch.nn.LSTM"]["median_s"] / ours["median_s"]
    assert ours["speedups"]["torch.nn.LSTM"] == pytest.approx(ratio)
    labels = {r["case"] for r in results}
    assert {"train", "forward", "inference", "train-packed"} <= labels
    assert any(r["variant"] == "packed" for r in results)
    # the packed target's baseline: ours on the padded input, in the packed case itself (timed
    # in turns with the packed run), checked against the padded input's own references
    packed = {r["contender"]: r for r in results if r["case"] == "train-packed"}
    padded = packed["rnnkernels (cpu), padded input"]
    assert padded["kind"] == "padded" and padded["status"] == "ok"
    assert packed["rnnkernels (cpu)"]["speedups"]["rnnkernels (cpu), padded input"] == \
        pytest.approx(padded["median_s"] / packed["rnnkernels (cpu)"]["median_s"])
    assert {tuple(r["axes"]) for r in results if r["case"] == "train"} == {("T", "B", "H")}

    markdown = (out / f"{path.stem}.md").read_text()
    assert "## lstm" in markdown
    assert "| case | shape | contender | impl | median | vs torch.nn.LSTM |" in markdown
    assert markdown.strip() in stdout
    for name in (f"{path.stem}-lstm-scaling.png", f"{path.stem}-speedup.png"):
        assert (out / name).read_bytes()[:8] == PNG


def _option_plan(suites: list[str]) -> runner.Plan:
    the_plan = runner.plan(suites, "cpu", torch.float32, quick=True)
    the_plan.cases = [(suite, spec) for suite, spec in the_plan.cases
                      if spec.variant in OPTION_VARIANTS.get(spec.suite, ())]
    return the_plan


def test_cell_option_cases(quick_lstm):
    _, out, stdout = quick_lstm
    path, data = _results(out)
    cases: dict[str, dict] = {}
    for r in data["results"]:
        if r["variant"] in OPTION_VARIANTS["lstm"]:
            cases.setdefault(r["case"], {})[r["contender"]] = r
    assert set(cases) == {f"train {v}" for v in OPTION_VARIANTS["lstm"]}
    for rows in cases.values():
        assert set(rows) == {"rnnkernels (cpu)", "PyTorch loop (reference)"}
        assert all(r["status"] == "ok" and r["mode"] == "train" for r in rows.values())
        assert set(rows["rnnkernels (cpu)"]["speedups"]) == {"PyTorch loop (reference)"}
    # The option's cost: our time on the plain training case over our time with the option.
    markdown = (out / f"{path.stem}.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| case |"))
    column = [c.strip() for c in header.split("|")].index("vs no variant")
    plain = next(r for r in data["results"]
                 if r["case"] == "train" and r["contender"] == "rnnkernels (cpu)")
    for case, rows in cases.items():
        line = next(line for line in markdown.splitlines()
                    if line.startswith(f"| {case} |") and "| rnnkernels (cpu) |" in line)
        cost = plain["median_s"] / rows["rnnkernels (cpu)"]["median_s"]
        assert [c.strip() for c in line.split("|")][column] == report.fmt_ratio(cost)


def test_cell_option_expected_values_have_the_options():
    # Each option changes the float64 expected results, its parameters' gradients included.
    for suite, spec in _option_plan(["lstm", "gru"]).cases:
        case = _Case(suite, spec)
        names, with_option = case.names(True), case.expected_with_options()
        assert len(names) == len(with_option) >= len(case.names())
        assert not torch.allclose(with_option[0], case.expected()[0]), spec.label
        for name in names[len(case.names()):]:
            assert with_option[names.index(name)].abs().max() > 0, (spec.label, name)


def _recurrence_off_by_a_tenth_of_a_percent(monkeypatch) -> None:
    from rnnkernels.ops import recurrence as R

    real = R.run_layer  # every layer call, whichever op it takes

    def off_by_a_tenth_of_a_percent(*args, **kwargs):
        y, h_n, c_n = real(*args, **kwargs)
        backend = kwargs["backend"] if "backend" in kwargs else args[11]
        return (y if backend == "reference" else y * 1.001), h_n, c_n

    monkeypatch.setattr(R, "run_layer", off_by_a_tenth_of_a_percent)


def test_wrong_option_kernel_is_refused(monkeypatch):
    _recurrence_off_by_a_tenth_of_a_percent(monkeypatch)
    the_plan = _option_plan(["lstm", "gru"])
    with _one_thread():
        results = runner.run(the_plan, configs.MIN_TIME_S["quick"], 1e9, progress=False)
    assert {(r.suite, r.case) for r in results} == {
        (suite, f"train {v}") for suite, variants in OPTION_VARIANTS.items() for v in variants}
    for r in results:
        if r.kind == "ours":
            assert r.status == "refused" and r.reason.startswith("y: relative error")
        else:
            assert r.contender == "PyTorch loop (reference)" and r.status == "ok"


def test_wrong_kernel_is_refused(monkeypatch, tmp_path):
    _recurrence_off_by_a_tenth_of_a_percent(monkeypatch)
    rc, stdout = _run(tmp_path, "--suite", "rnn")
    assert rc == 1
    _, data = _results(tmp_path)
    ours = [r for r in data["results"] if r["kind"] == "ours"]
    assert ours and all(r["status"] == "refused" for r in ours)
    for r in ours:
        assert r["median_s"] is None and r["peak_bytes"] is None and r["speedups"] == {}
        assert r["reason"].startswith("y: relative error")
    others = [r for r in data["results"] if r["kind"] != "ours"]
    assert others and all(r["status"] == "ok" for r in others)
    assert all("rnnkernels (cpu)" not in r["speedups"] for r in others)
    assert "**REFUSED**: y: relative error" in stdout


def test_scan_suites_run_with_stand_in_ops(monkeypatch, tmp_path):
    # The plumbing of the scan suites, with the PyTorch loops standing in for our ops.
    monkeypatch.setattr(ops, "selective_scan", loops.selective_scan_loop, raising=False)
    monkeypatch.setattr(ops, "linear_scan", loops.linear_scan_loop, raising=False)
    rc, _ = _run(tmp_path, "--suite", "selective_scan,linear_scan")
    assert rc == 0
    _, data = _results(tmp_path)
    by_status: dict[str, list] = {}
    for r in data["results"]:
        by_status.setdefault(r["status"], []).append(r)
    assert set(by_status) == {"ok", "skipped"}
    assert {r["contender"] for r in by_status["skipped"]} == {"mamba_ssm"}
    assert {r["suite"] for r in by_status["ok"]} == {"selective_scan", "linear_scan"}
    for r in by_status["ok"]:
        assert r["gbps"] > 0 and r["bw_fraction"] > 0 and r["tflops"] is None
    train = [r for r in by_status["ok"] if r["suite"] == "selective_scan" and r["case"] == "train"]
    assert {r["contender"] for r in train} == {"rnnkernels (cpu)", "PyTorch loop"}


def test_missing_op_fails_the_run_loudly(monkeypatch, tmp_path):
    monkeypatch.delattr(ops, "linear_scan", raising=False)
    the_plan = runner.plan(["linear_scan"], "cpu", torch.float32, quick=True)
    assert the_plan.cases == []
    assert len(the_plan.errors) == 1 and "rnnkernels.ops.linear_scan" in the_plan.errors[0]
    rc, stdout = _run(tmp_path, "--suite", "linear_scan")
    assert rc == 1
    assert "## Suites that could not run" in stdout and "rnnkernels.ops.linear_scan" in stdout
    assert _results(tmp_path)[1]["errors"] == the_plan.errors


def test_gpu_plan_needs_no_gpu_and_measures_shared_points_once(monkeypatch):
    monkeypatch.setattr(ops, "selective_scan", loops.selective_scan_loop, raising=False)
    the_plan = runner.plan(["lstm", "selective_scan"], "cuda", torch.bfloat16, quick=False)
    specs = {(s.suite, s.label): s for _, s in the_plan.cases}
    assert specs[("lstm", "train")].dims == {"B": 16, "T": 1024, "I": 768, "H": 768}
    wide = specs[("selective_scan", "train-wide")]
    assert wide.dims == {"batch": 8, "dim": 3072, "L": 2048, "N": 16} and wide.axes == ("dim",)
    assert ("selective_scan", "train dim=3072") not in specs
    assert all(s.dtype == torch.bfloat16 and s.device == "cuda" for s in specs.values())
    assert the_plan.targets == []


def test_chunked_reference_equals_one_chunk():
    gen = torch.Generator().manual_seed(1)
    batch, dim, L, N = 2, 5, 6, 3

    def rand(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    inputs = [rand(batch, dim, L), rand(batch, dim, L), -rand(dim, N).abs() - 0.5,
              rand(batch, N, L), rand(batch, N, L), rand(dim), rand(batch, dim, L), rand(dim)]
    grad_out = rand(batch, dim, L)
    dims = (1, 1, 0, None, None, 0, 1, 0)

    def scan(*args):
        return loops.selective_scan_loop(*args, delta_softplus=True)

    whole = loops.chunked_float64(scan, inputs, dims, grad_out, chunk=dim)
    parts = loops.chunked_float64(scan, inputs, dims, grad_out, chunk=2)
    assert len(whole) == len(inputs) + 1
    for a, b in zip(whole, parts):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_scan_loops_match_the_recurrences_written_out():
    gen = torch.Generator().manual_seed(2)
    batch, dim, L, N = 2, 3, 4, 2

    def rand(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    u, delta, z, B, C = rand(batch, dim, L), rand(batch, dim, L), rand(batch, dim, L), \
        rand(batch, N, L), rand(batch, N, L)
    A, D, bias = -rand(dim, N).abs(), rand(dim), rand(dim)
    out = loops.selective_scan_loop(u, delta, A, B, C, D, z, bias, delta_softplus=True)
    for b in range(batch):
        for d in range(dim):
            x = [0.0] * N
            for t in range(L):
                dt = math.log1p(math.exp(delta[b, d, t].item() + bias[d].item()))
                y = 0.0
                for n in range(N):
                    x[n] = math.exp(dt * A[d, n].item()) * x[n] + dt * B[b, n, t].item() * \
                        u[b, d, t].item()
                    y += C[b, n, t].item() * x[n]
                zz = z[b, d, t].item()
                expected = (y + D[d].item() * u[b, d, t].item()) * zz / (1 + math.exp(-zz))
                assert out[b, d, t].item() == pytest.approx(expected, rel=1e-12, abs=1e-12)

    a, x, h0 = torch.rand(batch, dim, L, generator=gen, dtype=torch.float64), \
        rand(batch, dim, L), rand(batch, dim)
    h = loops.linear_scan_loop(a, x, h0)
    state = h0.clone()
    for t in range(L):
        state = a[..., t] * state + x[..., t]
        torch.testing.assert_close(h[..., t], state, rtol=1e-12, atol=1e-12)


def test_compare_refuses_wrong_shapes_nonfinite_and_local_garbage():
    expected = torch.randn(256, 256, dtype=torch.float64)
    tol = check.tolerance("cpu", torch.float32)
    good = check.compare(["y"], [expected.float()], [expected], tol)
    assert good.ok and good.err < tol
    assert not check.compare(["y"], [expected[:-1]], [expected], tol).ok
    nan = expected.clone()
    nan[3, 3] = float("nan")
    assert "non-finite" in check.compare(["y"], [nan], [expected], tol).reason
    # One garbage element: tiny norm-wise, caught element-wise.
    garbage = expected.clone()
    garbage[5, 7] += 2 * check.ELEMENT_FACTOR * tol * expected.abs().max()
    verdict = check.compare(["y"], [garbage], [expected], tol)
    assert verdict.err < tol and not verdict.ok and "largest deviation" in verdict.reason
    assert "returned 1 results" in check.compare(["y", "dx"], [expected], [expected, expected],
                                                 tol).reason
    # At bfloat16's norm-wise tolerance the element-wise bound is capped: one element off by
    # 0.6 max |expected| is refused although ELEMENT_FACTOR times the tolerance would be 1.
    tol16 = check.tolerance("cpu", torch.bfloat16)
    garbage = expected.clone()
    garbage[5, 7] += 0.6 * expected.abs().max()
    verdict = check.compare(["y"], [garbage], [expected], tol16)
    assert verdict.err < tol16 and not verdict.ok and "largest deviation" in verdict.reason


def test_peak_memory_counts_live_tensors_only():
    def step():
        a = torch.empty(1 << 20, dtype=torch.uint8)
        b = torch.empty(1 << 19, dtype=torch.uint8)
        del a
        c = torch.empty(1 << 19, dtype=torch.uint8)
        return b, c

    assert peak_memory(step, "cpu") == (1 << 20) + (1 << 19)


def _result(case: str, contender: str, median: float | None) -> Result:
    return Result(suite="lstm", case=case, mode="train", shape={}, variant="", headline=True,
                  axes=[], dtype="float32", device="cpu", contender=contender, kind="ours",
                  impl="", status="ok" if median else "refused", median_s=median)


def test_targets_report_met_missed_and_unmeasured():
    results = [_result("train", "ours", 1.0), _result("train", "torch", 1.2),
               _result("inference", "ours", None), _result("inference", "torch", 1.0)]
    targets = [Target("lstm", "met", ("train", "ours"), ("train", "torch"), 1.1),
               Target("lstm", "missed", ("train", "ours"), ("train", "torch"), 1.5),
               Target("lstm", "unmeasured", ("inference", "ours"), ("inference", "torch"), 2.0)]
    met, missed, unmeasured = report.evaluate_targets(targets, results)
    assert met["measured"] == pytest.approx(1.2) and met["status"] == "met (+9%)"
    assert missed["status"] == "missed by 20%"
    assert unmeasured["measured"] is None and unmeasured["status"].startswith("not measured")


def test_readme_table_rewrites_only_its_block(quick_lstm, tmp_path, capsys):
    _, out, _ = quick_lstm
    path, _ = _results(out)
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{BEGIN}\nold table\n{END}\nafter\n")
    assert readme_main([str(path), "--write", "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n") and text.endswith(f"{END}\nafter\n")
    assert "old table" not in text and "| lstm | train | B=3 T=6 I=5 H=8 | cpu |" in text
    readme.write_text("no markers\n")
    assert readme_main([str(path), "--write", "--readme", str(readme)]) == 2
    assert "no <!-- perf-table:begin -->" in capsys.readouterr().err


def _gpu_check(tmp_path: Path, python: str, *stages: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "PYTHON": python, "OUT": str(tmp_path)}
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), *stages], env=env,
                          capture_output=True, text=True, timeout=300)


def test_gpu_check_dry_run(tmp_path):
    assert subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")]).returncode == 0
    done = _gpu_check(tmp_path, sys.executable, "build", "sanitize")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "DRY RUN, would run:" in done.stdout and "[dry-run ok on cpu] recurrence" in done.stdout
    for stage in ("versions", "build", "sanitize"):
        assert f"{stage:9} PASS" in done.stdout
    assert (tmp_path / "log").read_text() == done.stdout


def test_gpu_check_fails_loudly(tmp_path):
    done = _gpu_check(tmp_path, "/nonexistent/python", "build")
    assert done.returncode == 1
    assert "FAILED: stage versions" in done.stdout and "aborting" in done.stdout
    assert "versions  FAIL" in done.stdout


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_backend_that_fell_back_posts_no_time():
    from bench.core import CaseSpec, Contender, Prepared

    expected = torch.randn(4, dtype=torch.float64)

    def build():
        def step():
            warnings.warn("rnnkernels: backend 'cuda' cannot run recurrence (test); using 'cpu'",
                          stacklevel=1)
            return [expected.float()]
        return step

    spec = CaseSpec("lstm", "train", "train", (("B", 1),), "cpu", torch.float32)
    prepared = Prepared(["y"], [expected], [])
    ours = runner.run_contender(spec, prepared, Contender("rnnkernels (cuda)", "ours", "cuda",
                                                          build), 0.001, 1e9)
    assert ours.status == "skipped" and ours.reason.startswith("fell back: rnnkernels:")
    assert ours.median_s is None
    baseline = runner.run_contender(spec, prepared, Contender("torch", "torch.nn", "", build),
                                    0.001, 1e9)
    assert baseline.status == "ok"


def test_ours_forces_its_backend_only_where_a_plain_call_picks_another():
    """A contender of ours times a user's plain call where an unforced call picks its backend
    (no use_backend context around the step), and forces its backend elsewhere."""
    from bench.recurrence import forcing

    assert forcing("selective_scan", "cpu", "cpu", torch.float32) is None
    assert forcing("recurrence", "cpu", "cpu", torch.float32) is None
    assert forcing("selective_scan", "reference", "cpu", torch.float32) == "reference"
    assert forcing("recurrence", None, "cpu", torch.float32) is None
    with rnnkernels.use_backend("reference"):
        assert forcing("selective_scan", "cpu", "cpu", torch.float32) == "cpu"


def _roofline_rows(out: str, prefix: str) -> dict[str, list[float]]:
    """The rows of bench.roofline's table whose case starts with prefix: case -> (floor ms,
    ours ms, floor / ours, baseline ms, our speed-up, largest speed-up, target), checked to
    agree with each other (and the round trips around the timing to be plausible, the page
    faults per call of ours and the baseline counts)."""
    rows = {}
    for line in out.splitlines():
        if not line.startswith(f"| {prefix}"):
            continue
        case, floor, _, _, ours, share, base, speedup, best, target, trips, faults = (
            c.strip() for c in line.split("|")[1:-1])
        assert all(int(f) >= 0 for f in faults.split(" / ")), faults
        if torch.get_num_threads() < 2:
            assert trips == "-"
        else:
            before, after = (float(t) for t in trips.removesuffix(" ns").split(" / "))
            assert 0 < before < 1e6 and 0 < after < 1e6
        values = [float(floor.removesuffix(" ms")), float(ours.removesuffix(" ms")),
                  float(share.removesuffix("%")) / 100, float(base.removesuffix(" ms")),
                  float(speedup.removesuffix("x")), float(best.removesuffix("x")),
                  float(target.removesuffix("x"))]
        floor_ms, ours_ms, share_v, base_ms, speedup_v, best_v, _ = values
        assert floor_ms > 0 and ours_ms > 0 and base_ms > 0
        assert share_v == pytest.approx(floor_ms / ours_ms, rel=0.05, abs=0.01)
        assert speedup_v == pytest.approx(base_ms / ours_ms, rel=0.05)
        assert best_v == pytest.approx(base_ms / floor_ms, rel=0.05)
        rows[case] = values
    return rows


def test_roofline_floors(capsys, tmp_path, monkeypatch):
    """python -m bench.roofline: the stream and multiply-add probes compile and measure; each
    case's row has the floor, our time, its share of the floor's speed, torch.nn's time, our
    speed-up and the largest (torch.nn's time over the floor), consistent with each other. The
    probes compile even where a run killed while building them left torch's lock in the shared
    extensions directory (a later run waited on it forever)."""
    from bench import roofline

    (tmp_path / "rnnkernels_bench_roofline").mkdir()
    (tmp_path / "rnnkernels_bench_roofline" / "lock").touch()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    roofline._probes = None  # compiled here, and kept for the tests after this one
    built = threading.Event()
    threading.Thread(target=lambda: (roofline._compiled_probes(), built.set()),
                     daemon=True).start()
    assert built.wait(timeout=600), "the probes' build waited on the stale lock"
    assert roofline.stream_rate(64 << 10, 1, min_bytes=1e7) > 1e9
    threads = torch.get_num_threads()
    trip = roofline.round_trip_seconds(2000)
    assert trip is None if threads < 2 else 0 < trip < 1e-3
    torch.set_num_threads(1)
    try:
        assert roofline.round_trip_seconds(2000) is None  # no probe that spins on one core
    finally:
        torch.set_num_threads(threads)
    assert roofline.fma_rate(1, fmas=1e8) > 1e9
    assert roofline.main(["--suite", "rnn"]) == 0
    rows = _roofline_rows(capsys.readouterr().out, "RNN")
    assert set(rows) == {"RNN train", "RNN inference"}
    assert rows["RNN train"][-1] == 1.5 and rows["RNN inference"][-1] == 4.0


def test_roofline_scan_floor(capsys, monkeypatch):
    """The selective scan's floor: the exp probe (the kernels' own exp, compiled) takes longer
    for more updates, and the row's times and ratios agree (at a small training shape, to keep
    the loop's steps short). A result of ours that differs from the baseline's is not timed."""
    from bench import configs, roofline

    assert roofline.exp_update_seconds(1 << 22, 1) > roofline.exp_update_seconds(1 << 16, 1) > 0
    small = configs.SuiteConfig(train={"batch": 1, "dim": 32, "L": 64, "N": 16},
                                inference={"batch": 1, "dim": 32, "L": 64, "N": 16}, sweeps={})
    monkeypatch.setitem(configs.SELECTIVE_SCAN, "cpu", small)
    assert roofline.main(["--suite", "selective_scan"]) == 0
    rows = _roofline_rows(capsys.readouterr().out, "Selective")
    assert list(rows) == ["Selective scan train"] and rows["Selective scan train"][-1] == 100
    good = torch.randn(64)
    roofline._check_close("scan", [good * (1 + 1e-5)], [good])
    with pytest.raises(RuntimeError, match="scan: ours differs from the baseline: result 0: "
                       "relative error"):
        roofline._check_close("scan", [good * 1.01], [good])


def test_contenders_are_timed_in_interleaved_rounds():
    """The contenders of a case take turns (ROUNDS rounds each), so a drift of the machine's
    speed reaches all of them alike; every one still gets MIN_CALLS calls at least."""
    calls: list[int] = []
    steps = [lambda i=i: calls.append(i) for i in range(3)]
    timings = timing.interleaved_times(steps, "cpu", 0.003)
    assert len(timings) == 3 and all(t.runs >= timing.MIN_CALLS for t in timings)
    turns = [i for k, i in enumerate(calls) if k == 0 or calls[k - 1] != i]
    warm_up = turns[:3]
    assert warm_up == [0, 1, 2]
    assert turns[3:] == [0, 1, 2] * timing.ROUNDS


def test_packed_target_compares_runs_of_one_case():
    """Packed against padded input: both timings come from the packed case (timed in turns),
    not from two cases timed minutes apart."""
    from bench.recurrence import RecurrenceSuite

    (packed,) = [t for t in RecurrenceSuite("lstm").targets("cpu", torch.float32, "cpu")
                 if "packed" in t.text]
    assert packed.fast == ("train-packed", "rnnkernels (cpu)")
    assert packed.slow == ("train-packed", "rnnkernels (cpu), padded input")


def test_page_faults_counted_over_the_timed_calls():
    """A step that takes 64 MiB of fresh memory from the kernel per call (above glibc's largest
    mmap threshold, so never recycled by malloc) and touches it faults on every timed call; one
    that only reuses a buffer does not fault more."""
    buffer = torch.empty(1 << 16)
    fresh, reused = timing.interleaved_times(
        [lambda: torch.empty(1 << 24).fill_(1.0), lambda: buffer.fill_(1.0)], "cpu", 0.05,
        rounds=2)
    assert fresh.faults_per_call >= (1 << 26) / 4096 * 0.9
    assert reused.faults_per_call < fresh.faults_per_call


def _table_rows(out: str) -> list[list[str]]:
    """The cells of each row of the Markdown table in a tool's output, its header left out."""
    return [[c.strip() for c in line.split("|")[1:-1]]
            for line in out.splitlines() if line.startswith("| ") and not line.startswith("| case")]


def _small_cache_effect_configs(monkeypatch):
    from bench import configs

    rec = configs.RECURRENCE["cpu"]
    monkeypatch.setitem(configs.RECURRENCE, "cpu", configs.SuiteConfig(
        train={"T": 5, "B": 3, "I": 7, "H": 9}, inference=rec.inference, sweeps={}))
    small = {"batch": 1, "dim": 16, "L": 9, "N": 4}
    monkeypatch.setitem(configs.SELECTIVE_SCAN, "cpu",
                        configs.SuiteConfig(train=small, inference=small, sweeps={}))


def test_cache_effect_rows(capsys, monkeypatch):
    """python -m bench.cache_effect at small shapes, its children run in this process: per
    allocator state, ours with and without the cache and torch.nn (recurrences), each checked,
    with times, faults and the ratio to ours without the cache."""
    import platform

    import rnnkernels
    from bench import cache_effect

    _small_cache_effect_configs(monkeypatch)
    children = []

    def child(cmd, env):
        children.append((cmd, env))
        assert cache_effect.main(cmd[3:]) == 0

    monkeypatch.setattr(cache_effect, "run_child", child)
    assert cache_effect.main(["--case", "gru,selective_scan", "--min-time", "0.02"]) == 0
    rows = _table_rows(capsys.readouterr().out)
    states = ["default", "returning"] if platform.libc_ver()[0] == "glibc" else ["default"]
    assert [(r[1], r[0], r[2]) for r in rows] == [
        (state, case, name) for state in states
        for case, names in (("gru", ("cached", "no cache", "GRU")),
                            ("selective_scan", ("cached", "no cache")))
        for name in (n if n == "GRU" else f"rnnkernels (cpu), {n}" for n in names)]
    ms = {(r[1], r[0], r[2]): float(r[3].removesuffix(" ms")) for r in rows}
    for case, state, name, _, faults, ratio in rows:
        assert ms[state, case, name] > 0 and float(faults) >= 0
        uncached = ms[state, case, "rnnkernels (cpu), no cache"]
        assert float(ratio.removesuffix("x")) == pytest.approx(uncached / ms[state, case, name],
                                                               rel=0.02, abs=0.01)
    for cmd, env in children:
        returning = cmd[cmd.index("--rows") + 1] == "returning"
        assert ("MALLOC_MMAP_THRESHOLD_" in env) == returning
    assert rnnkernels.set_cpu_cache_limit(256 << 20) == 256 << 20  # left at its default


def test_cache_effect_refuses_a_wrong_result(monkeypatch):
    from bench import cache_effect

    _small_cache_effect_configs(monkeypatch)
    expected = cache_effect.case_steps("lstm")[1]()
    with pytest.raises(RuntimeError, match="is wrong"):
        cache_effect.measure("lstm", 0.01, [expected[0] + 1, *expected[1:]])
    import rnnkernels

    assert rnnkernels.set_cpu_cache_limit(256 << 20) == 256 << 20  # restored after the refusal


def test_projection_effect_rows(capsys, monkeypatch):
    """python -m bench.projection_effect at a small shape: per cell and hidden size, ours in the
    default form (named by the form whose results it equals bit for bit), forced to units and to
    blocks, and torch.nn, each checked, with times and the ratio to torch.nn."""
    from bench import projection_effect

    monkeypatch.setitem(configs.RECURRENCE, "cpu", configs.SuiteConfig(
        train=configs.RECURRENCE["cpu"].train, inference={"B": 1, "T": 40, "I": 24, "H": 24},
        sweeps={}))
    monkeypatch.setenv("RNNKERNELS_CPU_PROJECTION", "units")  # restored after each call
    assert projection_effect.main(["--case", "gru,rnn", "--hidden", "24,40",
                                   "--min-time", "0.02"]) == 0
    assert os.environ["RNNKERNELS_CPU_PROJECTION"] == "units"
    rows = _table_rows(capsys.readouterr().out)
    assert [(r[0], r[1], r[2], r[3].rsplit(" (", 1)[0] if "default" in r[3] else r[3])
            for r in rows] == [
        (case, h, h, name) for case, torch_name in (("gru", "GRU"), ("rnn", "RNN"))
        for h in ("24", "40")
        for name in ("rnnkernels (cpu), default", "rnnkernels (cpu), units",
                     "rnnkernels (cpu), blocks", torch_name)]
    for case, _i, h, name, median, ratio in rows:
        if "default" in name:  # I = H, and small slices fit any L2: both rules take units
            assert name.endswith("(units)"), name
        seconds = float(median.removesuffix(" ms"))
        theirs = next(float(r[4].removesuffix(" ms")) for r in rows
                      if (r[0], r[2]) == (case, h) and not r[3].startswith("rnnkernels"))
        assert float(ratio.removesuffix("x")) == pytest.approx(theirs / seconds, rel=0.02,
                                                               abs=0.01)
    # --input: that many inputs for every hidden size
    assert projection_effect.main(["--case", "lstm", "--hidden", "16", "--input", "40",
                                   "--min-time", "0.02"]) == 0
    rows = _table_rows(capsys.readouterr().out)
    assert [r[:3] for r in rows] == [["lstm", "40", "16"]] * 4


def test_chunk_effect_rows(capsys, monkeypatch):
    """python -m bench.chunk_effect at a small shape: per state size, the default chunk and each
    chunk asked for (the default's own size once), each checked, with times and the ratio to
    chunk 64; the production chunk restored afterwards."""
    from bench import chunk_effect
    from rnnkernels.ops.selective_scan import CHUNK_SIZE

    monkeypatch.setitem(configs.SELECTIVE_SCAN, "cpu", configs.SuiteConfig(
        train={"batch": 1, "dim": 9, "L": 70, "N": 4},
        inference=configs.SELECTIVE_SCAN["cpu"].inference, sweeps={}))
    monkeypatch.setitem(CHUNK_SIZE, "cpu", 16)
    assert chunk_effect.main(["--states", "4,5", "--chunks", "64,16,8",
                              "--min-time", "0.02"]) == 0
    assert CHUNK_SIZE["cpu"] == 16
    rows = [r for r in _table_rows(capsys.readouterr().out) if r[0] != "N"]  # header left out
    assert [r[:2] for r in rows] == [[n, c] for n in ("4", "5")
                                     for c in ("default (16)", "64", "8")]
    for n, _chunk, median, ratio in rows:
        base = next(float(r[2].removesuffix(" ms")) for r in rows if r[:2] == [n, "64"])
        assert float(ratio.removesuffix("x")) == pytest.approx(
            base / float(median.removesuffix(" ms")), rel=0.02, abs=0.01)


def test_chunk_effect_shape(capsys):
    """--shape BATCH,DIM,L replaces the suite's shape (named in the header); a malformed one is
    refused with the expected form."""
    from bench import chunk_effect

    assert chunk_effect.main(["--states", "3", "--chunks", "8", "--shape", "1,5,21",
                              "--min-time", "0.02"]) == 0
    out = capsys.readouterr().out
    assert "batch 1, dim 5, L 21," in out
    assert [r[:2] for r in _table_rows(out) if r[0] != "N"][1] == ["3", "8"]
    for bad in ("1,5", "1,x,3"):
        with pytest.raises(SystemExit):
            chunk_effect.main(["--shape", bad])
        assert "three positive sizes BATCH,DIM,L" in capsys.readouterr().err


def test_chunk_effect_refuses_a_wrong_result(monkeypatch):
    """A chunk whose results are wrong stops the tool before any timing."""
    from bench import chunk_effect
    from rnnkernels import ops

    monkeypatch.setitem(configs.SELECTIVE_SCAN, "cpu", configs.SuiteConfig(
        train={"batch": 1, "dim": 3, "L": 9, "N": 2},
        inference=configs.SELECTIVE_SCAN["cpu"].inference, sweeps={}))
    real = ops.selective_scan
    monkeypatch.setattr(ops, "selective_scan",
                        lambda *args, **kwargs: real(*args, **kwargs) * 1.01)
    with pytest.raises(RuntimeError, match="is wrong"):
        chunk_effect.measure(2, [4], 0.01)


def test_step_effect_rows(capsys, monkeypatch):
    """python -m bench.step_effect at small shapes: per shape, the default, the Python Function,
    plain stores, fresh lane buffers and the kernels alone, each checked, with times and the
    default's speed-up over each; inside python_autograd the op records the Python Function,
    and the C++ node again after it; inside fresh_lane_buffers keeping is off, and on again after
    it; the stream variable restored."""
    from bench import step_effect
    from rnnkernels import ops

    monkeypatch.setitem(configs.SELECTIVE_SCAN, "cpu", configs.SuiteConfig(
        train={"batch": 1, "dim": 9, "L": 70, "N": 4},
        inference=configs.SELECTIVE_SCAN["cpu"].inference, sweeps={}))
    monkeypatch.setattr(step_effect, "SMALL_SHAPE", {"batch": 2, "dim": 3, "L": 5, "N": 2})
    monkeypatch.setenv("RNNKERNELS_CPU_STREAM", "1")
    assert step_effect.main(["--min-time", "0.02"]) == 0
    assert os.environ["RNNKERNELS_CPU_STREAM"] == "1"
    rows = [r for r in _table_rows(capsys.readouterr().out) if r[0] != "batch"]
    assert [r[:5] for r in rows] == [
        [*shape, name] for shape in (["1", "9", "70", "4"], ["2", "3", "5", "2"])
        for name in ("default", "Python Function", "plain stores", "fresh lane buffers",
                     "kernels alone")]
    for row in rows:
        base = next(float(r[5].removesuffix(" ms")) for r in rows
                    if r[:4] == row[:4] and r[4] == "default")
        assert float(row[6].removesuffix("x")) == pytest.approx(
            float(row[5].removesuffix(" ms")) / base, rel=0.02, abs=0.01)

    # --between: the same rows, the writes' time subtracted (named in the header); a negative
    # size refused
    assert step_effect.main(["--min-time", "0.02", "--between", "1"]) == 0
    out = capsys.readouterr().out
    assert "writes to 1 MB of other memory" in out
    assert [r[4] for r in _table_rows(out) if r[0] != "batch"] == [r[4] for r in rows]
    with pytest.raises(SystemExit):
        step_effect.main(["--between", "-1"])
    assert "0 or more" in capsys.readouterr().err

    u = torch.randn(1, 3, 4, requires_grad=True)
    args = (u, torch.rand(1, 3, 4), -torch.rand(3, 2), torch.randn(3, 2), torch.randn(3, 2))
    with step_effect.python_autograd():
        assert "SelectiveScanFunction" not in ops.selective_scan(*args).grad_fn.name()
    assert "SelectiveScanFunction" in ops.selective_scan(*args).grad_fn.name()
    with step_effect.fresh_lane_buffers():
        assert keep_cpu_lane_buffers(True) is False
        keep_cpu_lane_buffers(False)
    assert keep_cpu_lane_buffers(True) is True


def test_matmul_effect_rows(capsys, monkeypatch):
    """python -m bench.matmul_effect at a small shape with enough rows (T * B = 1024) for the
    panels: per cell, ours in the default choice (named by the forced one it equals bit for bit:
    panels on a build without AVX-512, vendor elsewhere), forced to each and torch.nn, each
    checked, with the ratio to torch.nn; the variable restored."""
    from bench import matmul_effect

    monkeypatch.setitem(configs.RECURRENCE, "cpu", configs.SuiteConfig(
        train={"B": 32, "T": 32, "I": 8, "H": 8}, inference=configs.RECURRENCE["cpu"].inference,
        sweeps={}))
    monkeypatch.setenv("RNNKERNELS_PANEL_MATMUL", "0")
    assert matmul_effect.main(["--case", "lstm,rnn", "--hidden", "8", "--min-time", "0.02"]) == 0
    assert os.environ["RNNKERNELS_PANEL_MATMUL"] == "0"
    rows = _table_rows(capsys.readouterr().out)
    assert [(r[0], r[3].rsplit(" (", 1)[0] if "default" in r[3] else r[3]) for r in rows] == [
        (case, name) for case, torch_name in (("lstm", "LSTM"), ("rnn", "RNN"))
        for name in ("rnnkernels (cpu), default", "rnnkernels (cpu), panels",
                     "rnnkernels (cpu), vendor", torch_name)]
    for _case, _i, _h, name, _median, ratio in rows:
        if "default" in name:
            assert name.endswith("(panels)") or name.endswith("(vendor)"), name
        assert float(ratio.removesuffix("x")) > 0


def test_matmul_effect_refuses_a_wrong_result(monkeypatch):
    from bench import matmul_effect, projection_effect

    monkeypatch.setitem(configs.RECURRENCE, "cpu", configs.SuiteConfig(
        train={"B": 2, "T": 3, "I": 4, "H": 4}, inference=configs.RECURRENCE["cpu"].inference,
        sweeps={}))
    monkeypatch.setattr(projection_effect, "compare",
                        lambda names, got, expected, tol: check.Verdict(False, 1.0, 1.0, "off"))
    with pytest.raises(RuntimeError, match="is wrong: off"):
        matmul_effect.measure("gru", 4, 4, 0.01)


def test_projection_effect_refuses_a_wrong_result(monkeypatch):
    from bench import projection_effect

    monkeypatch.setitem(configs.RECURRENCE, "cpu", configs.SuiteConfig(
        train=configs.RECURRENCE["cpu"].train, inference={"B": 1, "T": 9, "I": 8, "H": 8},
        sweeps={}))
    monkeypatch.setattr(projection_effect, "compare",
                        lambda names, got, expected, tol: check.Verdict(False, 1.0, 1.0, "off"))
    with pytest.raises(RuntimeError, match="is wrong: off"):
        projection_effect.measure("lstm", 8, 8, 0.01)
