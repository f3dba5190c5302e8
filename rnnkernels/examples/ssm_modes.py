"""A linear SSM three ways: recurrence, scan and FFT convolution, same output, different costs.

:class:`rnnkernels.nn.LinearSSM` computes one function in three modes: "recurrent" (a step loop
in PyTorch: O(L) sequential steps, O(state) memory, and :meth:`step` for one token at a time),
"scan" (``rnnkernels.ops.linear_scan``: the same O(L) recurrence in a compiled kernel) and
"conv" (the kernel K = (CB, CAB, CA^2B, ...) then an FFT convolution: O(L log L), every step in
parallel). The demo checks that the three agree (forward and gradients), then times a training
step (forward + backward) against sequence length, and the cost of producing one more token
after a prefix of L: one :meth:`step` against recomputing the convolution over the prefix.

    python -m rnnkernels.examples.ssm_modes [--tiny] [--out docs]
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from rnnkernels.nn import LinearSSM
from rnnkernels.nn.linear_ssm import MODES

from . import _common

NAME = "ssm_modes"


@dataclass
class Settings:
    channels: int = 32
    state_size: int = 16
    batch: int = 1
    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
    repeats: int = 3             # best of
    step_repeats: int = 200


TINY = Settings(channels=4, state_size=4, lengths=(64, 256), repeats=1, step_repeats=10)


def agreement(model: LinearSSM, u: torch.Tensor,
              modes: list[str]) -> dict[str, tuple[float, float]]:
    """Largest absolute difference of each mode from the recurrence: (output, gradient of u),
    in float64."""
    m = LinearSSM(model.channels, model.state_size, dtype=torch.float64)
    m.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    g = torch.randn(u.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    results = {}
    for mode in modes:
        x = u.double().requires_grad_()
        y = m(x, mode=mode)
        (y * g).sum().backward()
        results[mode] = (y.detach(), x.grad)
    y0, g0 = results["recurrent"]
    return {mode: (float((y - y0).abs().max()), float((gx - g0).abs().max()))
            for mode, (y, gx) in results.items() if mode != "recurrent"}


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def time_training(model: LinearSSM, u: torch.Tensor, mode: str, repeats: int) -> float:
    """Seconds for forward + backward of one batch (best of ``repeats`` after a warm-up)."""
    x = u.clone().requires_grad_()

    def once():
        model.zero_grad(set_to_none=True)
        model(x, mode=mode).sum().backward()

    once()
    return best_of(once, repeats)


def time_next_token(model: LinearSSM, u: torch.Tensor, s: Settings) -> tuple[float, float]:
    """Seconds to produce one more output after a prefix u: (one step() from the carried
    state, the convolution recomputed over the prefix plus the new input)."""
    with torch.no_grad():
        _, state = model(u, mode="conv", return_state=True)
        u_t = u[:, -1]
        step = best_of(lambda: model.step(u_t, state), s.step_repeats)
        extended = torch.cat([u, u[:, -1:]], 1)
        conv = best_of(lambda: model(extended, mode="conv"), s.repeats)
    return step, conv


def run(tiny: bool = False, out: str | Path = "docs", seed: int = 0,
        argv: Sequence[str] | None = None) -> dict:
    """Check agreement, time the modes, print the table, write the page and PNG. Returns
    {"agreement": {mode: (output diff, grad diff)}, "train": {mode: {L: s}},
     "next_token": {"step": {L: s}, "conv": {L: s}}, "files": [...]}."""
    s = TINY if tiny else Settings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    modes = list(MODES)
    torch.manual_seed(seed)
    model = LinearSSM(s.channels, s.state_size)
    g = torch.Generator().manual_seed(seed)
    agree = agreement(model, torch.randn(2, 300, s.channels, generator=g), modes)

    train = {mode: {} for mode in modes}
    step_t, conv_t = {}, {}
    for L in tqdm(s.lengths, desc="lengths", leave=False):
        u = torch.randn(s.batch, L, s.channels, generator=g)
        for mode in modes:
            train[mode][L] = time_training(model, u, mode, s.repeats)
        step_t[L], conv_t[L] = time_next_token(model, u, s)

    plt = _common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3))
    for mode in modes:
        axes[0].loglog(list(train[mode]), [1e3 * v for v in train[mode].values()], marker="o",
                       label=mode)
    axes[0].set(xlabel="sequence length L", ylabel="forward + backward (ms)",
                title=f"Training step, batch {s.batch}, {s.channels} channels x "
                      f"{s.state_size} states")
    axes[0].legend()
    axes[1].loglog(list(step_t), [1e6 * v for v in step_t.values()], marker="o",
                   label="step() from the carried state")
    axes[1].loglog(list(conv_t), [1e6 * v for v in conv_t.values()], marker="o",
                   label="conv over the prefix + 1")
    axes[1].set(xlabel="prefix length L", ylabel="time for one more token (us)",
                title="Generation: one new output")
    axes[1].legend()
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    png = out / f"{NAME}.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)

    t_agree = _common.table(["mode", "max abs diff of y from the recurrence",
                             "max abs diff of dL/du"],
                            [[m, f"{d[0]:.1e}", f"{d[1]:.1e}"] for m, d in agree.items()])
    t_time = _common.table(
        ["L"] + [f"{m}: fwd+bwd (ms)" for m in modes] + ["next token: step() (us)",
                                                          "next token: conv (ms)"],
        [[L] + [f"{1e3 * train[m][L]:.1f}" for m in modes]
         + [f"{1e6 * step_t[L]:.0f}", f"{1e3 * conv_t[L]:.2f}"] for L in s.lengths])
    print(t_agree, t_time, sep="\n\n")
    low, high = (f"{1e6 * f(step_t.values()):.0f}" for f in (min, max))
    step_range = low if low == high else f"{low} to {high}"
    fastest = ", ".join(f"{L}: {min(modes, key=lambda m: train[m][L])}" for L in s.lengths)
    page = f"""# Linear SSM: recurrence == convolution

Claim (seed document): a linear SSM is the same computation as a recurrence (for inference: O(1)
state per step) and as a global convolution (for training: parallel over the sequence).

Produced by `{_common.command(NAME, argv)}` (seed {seed}) with `rnnkernels.nn.LinearSSM`
(S4D-Real initialisation, {s.channels} channels x {s.state_size} states, float32, batch
{s.batch}). The machine is shared with other jobs, so the timings are noisy (best of
{s.repeats} runs after a warm-up); their trends, not their digits, are the result.

The modes agree (float64, L = 300, batch 2; gradient of a random projection of y):

{t_agree}

Timings against sequence length:

{t_time}

![time against sequence length for each mode]({png.name})

Reading it: the "recurrent" mode is a Python loop with one fused op per step, linear in L
with a large constant per step; the convolution costs O(L N) for the kernel and O(L log L) for
the FFTs, with every step in parallel. Fastest training step in this run, by L: {fastest}.

For generation the roles swap: one `step()` from the carried state took {step_range} us
whatever the prefix length, while recomputing the convolution over the prefix took
{1e3 * conv_t[s.lengths[0]]:.2f} ms at L = {s.lengths[0]} and
{1e3 * conv_t[s.lengths[-1]]:.2f} ms at L = {s.lengths[-1]}.
"""
    files = [png, _common.write_page(out, NAME, page)]
    return {"agreement": agree, "train": train, "next_token": {"step": step_t, "conv": conv_t},
            "files": files}


def main(argv: Sequence[str] | None = None) -> None:
    _common.main(__doc__, run, argv)


if __name__ == "__main__":
    main()
