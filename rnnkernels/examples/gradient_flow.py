"""Gradient flow through time: vanishing and exploding in the tanh RNN, the LSTM's forget-gate
highway, and what they mean for learning long dependencies.

1. |dL_T/dh_k| / |dL_T/dh_T| against T - k, measured by running each module one step at a time
   (T = 1 calls) and keeping the gradient of every state: the tanh RNN with its recurrent matrix
   an orthogonal matrix scaled to spectral norm 0.9 and 1.1 (the bound ~ ||W_hh||^(T-k)), the
   LSTM with forget-gate bias 0, +1, +2 and the GRU, with the mean product of their "keep" gates
   (the LSTM's forget gate f, the GRU's z), which is what the additive state update multiplies.
2. The consequence: a recall task (one of 8 tokens is shown, the label is asked for at the last
   step) trained with each cell, on lags 1-50 and on lag 50 alone; accuracy at a lag of 50
   steps against training steps.
3. Truncated BPTT with k = 10 and k = 100 on a task whose lag is 20: the gradient never spans
   20 steps when k = 10, so the dependency is not learned.

    python -m rnnkernels.examples.gradient_flow [--tiny] [--out docs]
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from rnnkernels.nn import GRU, LSTM, RNN

from . import _common

NAME = "gradient_flow"


@dataclass
class Settings:
    # Part 1: gradient norms (float64, so the smallest ratios do not underflow).
    grad_steps: int = 100
    grad_batch: int = 16
    grad_hidden: int = 64
    grad_input: int = 16
    small_input_gain: float = 1e-5   # keeps the RNN's |h| small: tanh' ~ 1, the linear regime
    # Part 2: recall at a long lag.
    classes: int = 8
    lag: int = 50
    hidden: int = 64
    batch: int = 64
    steps: int = 600
    lr: float = 3e-3
    eval_every: int = 25
    eval_batch: int = 512
    # Part 3: truncated BPTT.
    tbptt_length: int = 100
    tbptt_lag: int = 20
    tbptt_k: tuple[int, ...] = (10, 100)
    tbptt_steps: int = 400


TINY = Settings(grad_steps=30, grad_batch=4, grad_hidden=16, grad_input=4, lag=30, hidden=32,
                steps=400, eval_every=50, eval_batch=256, tbptt_length=50, tbptt_steps=250)


# ------------------------------------------------------------------ part 1: gradient norms

def scaled_orthogonal(n: int, norm: float, generator: torch.Generator) -> Tensor:
    """An orthogonal matrix times ``norm``: every singular value equals ``norm``, so
    ||W^m|| = norm^m exactly."""
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    return norm * q * torch.sign(torch.diagonal(r))


def keep_gate(module: nn.Module, x: Tensor, h_prev: Tensor) -> Tensor | None:
    """The gate that multiplies the previous state in the additive update: the LSTM's forget
    gate f (c = f c + i g), the GRU's z (h = (1 - z) n + z h); None for the tanh RNN."""
    H = module.hidden_size
    if isinstance(module, LSTM):
        rows = slice(H, 2 * H)           # gates (i, f, g, o)
    elif isinstance(module, GRU):
        rows = slice(H, 2 * H)           # gates (r, z, n)
    else:
        return None
    pre = (x @ module.weight_ih_l0[rows].t() + module.bias_ih_l0[rows]
           + h_prev @ module.weight_hh_l0[rows].t() + module.bias_hh_l0[rows])
    return torch.sigmoid(pre)


def gradient_ratios(module: nn.Module, x: Tensor, readout: Tensor
                    ) -> tuple[Tensor, Tensor | None, float]:
    """Run ``module`` one step at a time over x (T, B, I) from a zero state, backpropagate
    L_T = readout . h_T and return, indexed by T - k (0..T-1):
    the geometric mean over the batch of |dL_T/dh_k| / |dL_T/dh_T|, the mean over batch and
    units of the product of keep gates from step k+1 to T (None for the RNN), and max |h|."""
    T, B, _ = x.shape
    H = module.hidden_size
    zero = x.new_zeros(1, B, H)
    state = (zero, zero) if isinstance(module, LSTM) else zero
    hs, gates = [], []
    for t in range(T):
        h_prev = state[0] if isinstance(state, tuple) else state
        _, state = module(x[t:t + 1], state)
        h = state[0] if isinstance(state, tuple) else state
        h.retain_grad()
        hs.append(h)
        with torch.no_grad():
            gates.append(keep_gate(module, x[t], h_prev[0]))
    (hs[-1][0] @ readout).sum().backward()
    norms = torch.stack([h.grad[0].norm(dim=1) for h in hs])          # (T, B), index k
    ratios = (norms / norms[-1]).log().mean(1).exp().flip(0)           # index T - k
    products = None
    if gates[0] is not None:
        g = torch.stack(gates)                                         # (T, B, H), index t
        # prod_{t=k+1}^{T} g_t for every k: a reversed cumulative product, shifted by one.
        suffix = torch.cumprod(g.flip(0), 0)                           # index T - 1 - t
        products = torch.cat([torch.ones_like(suffix[:1]), suffix[:-1]]).mean((1, 2))
    max_h = max(float(h.detach().abs().max()) for h in hs)
    return ratios.detach(), products, max_h


def part1(s: Settings, seed: int) -> dict[str, dict]:
    g = torch.Generator().manual_seed(seed)
    T, B, H, I = s.grad_steps, s.grad_batch, s.grad_hidden, s.grad_input
    x = torch.randn(T, B, I, dtype=torch.float64, generator=g)
    readout = torch.randn(H, dtype=torch.float64, generator=g)
    configs: list[tuple[str, Callable[[], nn.Module], float | None]] = []
    for norm in (0.9, 1.1):
        for gain, regime in ((s.small_input_gain, "small inputs"), (1.0, "unit inputs")):
            def make(norm=norm, gain=gain):
                m = RNN(I, H, dtype=torch.float64)
                with torch.no_grad():
                    m.weight_hh_l0.copy_(scaled_orthogonal(H, norm, g))
                    m.weight_ih_l0.mul_(gain)
                    m.bias_ih_l0.zero_()
                    m.bias_hh_l0.zero_()
                return m
            configs.append((f"RNN, ||W_hh|| = {norm}, {regime}", make, norm))
    for bias in (0.0, 1.0, 2.0):
        configs.append((f"LSTM (forget bias {bias:+g})" if bias else "LSTM (forget bias 0)",
                        lambda bias=bias: LSTM(I, H, dtype=torch.float64, forget_bias=bias), None))
    configs.append(("GRU", lambda: GRU(I, H, dtype=torch.float64), None))
    results = {}
    for label, make, norm in tqdm(configs, desc="gradient norms", leave=False):
        torch.manual_seed(seed)
        ratios, products, max_h = gradient_ratios(make(), x, readout)
        bound = None if norm is None else norm ** torch.arange(T, dtype=torch.float64)
        results[label] = {"ratios": ratios, "gates": products, "bound": bound, "max_h": max_h}
    return results


# ------------------------------------------------------------------ parts 2 and 3: training

class RecallTask:
    """One token of ``classes`` (one-hot) at step T-1-lag of an otherwise zero sequence; the
    label is that token, asked for at the last step."""

    def __init__(self, classes: int, length: int, seed: int) -> None:
        self.classes, self.length = classes, length
        self.generator = torch.Generator().manual_seed(seed)

    def batch(self, n: int, lag_low: int, lag_high: int) -> tuple[Tensor, Tensor]:
        """x (T, n, classes), labels (n,); lags uniform in [lag_low, lag_high]."""
        g = self.generator
        labels = torch.randint(0, self.classes, (n,), generator=g)
        lags = torch.randint(lag_low, lag_high + 1, (n,), generator=g)
        x = torch.zeros(self.length, n, self.classes)
        x[self.length - 1 - lags, torch.arange(n)] = F.one_hot(labels, self.classes).float()
        return x, labels


class Recaller(nn.Module):
    """A recurrent layer and a linear readout of its last state."""

    def __init__(self, rnn: nn.Module, classes: int) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size, classes)

    def forward(self, x: Tensor, truncate: int | None = None) -> Tensor:
        """x (T, B, C) -> logits (B, C). ``truncate`` = k runs the sequence in chunks of k steps
        and detaches the state between them: truncated BPTT, no gradient spans more than k."""
        k = x.shape[0] if truncate is None else truncate
        state = None
        for t0 in range(0, x.shape[0], k):
            if state is not None:
                state = tuple(v.detach() for v in state) if isinstance(state, tuple) \
                    else state.detach()
            y, state = self.rnn(x[t0:t0 + k], state)
        return self.head(y[-1])


def accuracy(model: Recaller, x: Tensor, labels: Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == labels).float().mean().item()


def train_recall(model: Recaller, task: RecallTask, s: Settings, steps: int,
                 lags: tuple[int, int], eval_set: tuple[Tensor, Tensor],
                 truncate: int | None, label: str) -> list[tuple[int, float]]:
    """Adam with gradient clipping; returns (step, accuracy on eval_set) every s.eval_every."""
    opt = torch.optim.Adam(model.parameters(), lr=s.lr)
    curve = [(0, accuracy(model, *eval_set))]
    for step in tqdm(range(1, steps + 1), desc=label, leave=False):
        x, labels = task.batch(s.batch, *lags)
        loss = F.cross_entropy(model(x, truncate), labels)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % s.eval_every == 0 or step == steps:
            curve.append((step, accuracy(model, *eval_set)))
    return curve


def part2(s: Settings, seed: int) -> dict[str, dict[str, dict]]:
    """Train every cell twice: on lags uniform in 1..s.lag ("mixed") and on s.lag only
    ("fixed"); both evaluated at lag s.lag, and at the end at shorter lags too."""
    C, H = s.classes, s.hidden
    cells = {"RNN (tanh)": lambda: RNN(C, H),
             "LSTM (forget bias 0)": lambda: LSTM(C, H),
             "LSTM (forget bias +1)": lambda: LSTM(C, H, forget_bias=1.0),
             "LSTM (forget bias +2)": lambda: LSTM(C, H, forget_bias=2.0),
             "GRU": lambda: GRU(C, H)}
    length = s.lag + 1
    eval_set = RecallTask(C, length, seed + 100).batch(s.eval_batch, s.lag, s.lag)
    by_lag_lags = sorted({1, s.lag // 5, s.lag // 2, s.lag})
    results: dict[str, dict[str, dict]] = {"mixed": {}, "fixed": {}}
    for regime, low in (("mixed", 1), ("fixed", s.lag)):
        for label, make in cells.items():
            torch.manual_seed(seed)
            model = Recaller(make(), C)
            curve = train_recall(model, RecallTask(C, length, seed), s, s.steps, (low, s.lag),
                                 eval_set, None, f"{label} ({regime})")
            probe = RecallTask(C, length, seed + 200)
            by_lag = {lag: accuracy(model, *probe.batch(s.eval_batch, lag, lag))
                      for lag in by_lag_lags}
            results[regime][label] = {"curve": curve, "by_lag": by_lag}
    return results


def part3(s: Settings, seed: int) -> dict[int, dict]:
    C, H, T = s.classes, s.hidden, s.tbptt_length
    eval_set = RecallTask(C, T, seed + 100).batch(s.eval_batch, s.tbptt_lag, s.tbptt_lag)
    results = {}
    for k in s.tbptt_k:
        torch.manual_seed(seed)
        model = Recaller(LSTM(C, H, forget_bias=2.0), C)
        curve = train_recall(model, RecallTask(C, T, seed), s, s.tbptt_steps,
                             (s.tbptt_lag, s.tbptt_lag), eval_set, k, f"TBPTT k={k}")
        results[k] = {"curve": curve}
    return results


# ------------------------------------------------------------------ report

def plot(out: Path, s: Settings, grads: dict, recall: dict, tbptt: dict) -> list[Path]:
    plt = _common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    dist = list(range(s.grad_steps))
    rnn = [k for k in grads if k.startswith("RNN")]
    gated = [k for k in grads if not k.startswith("RNN")]
    for ax, labels in ((axes[0], rnn), (axes[1], gated)):
        for color, label in zip(colors, labels):
            r = grads[label]
            ax.semilogy(dist, r["ratios"].numpy(), color=color, label=label)
            if r["bound"] is not None and "small" in label:
                ax.semilogy(dist, r["bound"].numpy(), color="black", ls=":", lw=1.5)
            if r["gates"] is not None:
                ax.semilogy(dist, r["gates"].numpy(), color=color, ls="--", lw=1)
        ax.set(xlabel="T - k (steps back)", title=("tanh RNN (black dotted: ||W_hh||^(T-k))"
               if ax is axes[0] else "gated cells (dashed: mean product of keep gates)"))
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("|dL_T/dh_k| / |dL_T/dh_T|")
    fig.tight_layout()
    first = out / f"{NAME}.png"
    fig.savefig(first, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.3))
    for ax, regime, what in ((axes[0], "mixed", f"trained on lags 1-{s.lag}"),
                             (axes[1], "fixed", f"trained on lag {s.lag} only")):
        for label, r in recall[regime].items():
            ax.plot(*zip(*[(st, 100 * a) for st, a in r["curve"]]), label=label)
        ax.axhline(100 / s.classes, color="gray", ls=":", label="chance")
        ax.set(xlabel="training step", ylabel=f"accuracy at lag {s.lag} (%)", ylim=(-3, 103),
               title=f"Recall after {s.lag} steps, {what}")
        ax.legend(fontsize=8)
    for k, r in tbptt.items():
        axes[2].plot(*zip(*[(st, 100 * a) for st, a in r["curve"]]),
                     label=f"k = {k}" + (" (full BPTT)" if k >= s.tbptt_length else ""))
    axes[2].axhline(100 / s.classes, color="gray", ls=":", label="chance")
    axes[2].set(xlabel="training step", ylabel=f"accuracy at lag {s.tbptt_lag} (%)",
                ylim=(-3, 103), title=f"Truncated BPTT, LSTM (forget bias +2), lag "
                f"{s.tbptt_lag}, length {s.tbptt_length}")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    second = out / f"{NAME}_training.png"
    fig.savefig(second, dpi=110)
    plt.close(fig)
    return [first, second]


def first_reaching(curve: list[tuple[int, float]], level: float) -> str:
    return next((str(step) for step, a in curve if a >= level), "never")


def run(tiny: bool = False, out: str | Path = "docs", seed: int = 0,
        argv: Sequence[str] | None = None) -> dict:
    """All three parts; prints the tables, writes the page and PNGs. Returns
    {"gradients": {label: {"ratios", "gates", "bound", "max_h"}}, "recall": {"mixed" | "fixed":
    {label: {"curve", "by_lag"}}}, "tbptt": {k: {"curve"}}, "files": [...]}."""
    s = TINY if tiny else Settings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    grads = part1(s, seed)
    recall = part2(s, seed)
    tbptt = part3(s, seed)
    files = plot(out, s, grads, recall, tbptt)

    dists = [d for d in (1, 10, 25, 50, 99) if d < s.grad_steps]
    t1 = _common.table(
        ["configuration", "max abs(h)"] + [f"T-k = {d}" for d in dists]
        + [f"||W_hh||^(T-k) or mean keep-gate product, T-k = {dists[-1]}"],
        [[label, f"{r['max_h']:.2f}"] + [f"{float(r['ratios'][d]):.2e}" for d in dists]
         + [f"{float((r['bound'] if r['bound'] is not None else r['gates'])[dists[-1]]):.2e}"]
         for label, r in grads.items()])
    lags = [lag for lag in next(iter(recall["mixed"].values()))["by_lag"] if lag != s.lag]

    def recall_table(regime: str) -> str:
        return _common.table(
            ["cell", f"first step with >= 90% at lag {s.lag}", f"final, lag {s.lag}"]
            + [f"final, lag {lag}" for lag in lags],
            [[label, first_reaching(r["curve"], 0.9), f"{100 * r['curve'][-1][1]:.0f}%"]
             + [f"{100 * r['by_lag'][lag]:.0f}%" for lag in lags]
             for label, r in recall[regime].items()])

    t2, t2_fixed = recall_table("mixed"), recall_table("fixed")

    def summary(regime: str) -> str:
        learned = [label for label, r in recall[regime].items() if r["curve"][-1][1] >= 0.9]
        failed = [label for label in recall[regime] if label not in learned]
        return (f"{', '.join(learned) or 'no cell'} reached 90% at lag {s.lag}; "
                f"{', '.join(failed) or 'none'} did not in {s.steps} steps")

    mixed_summary, fixed_summary = summary("mixed"), summary("fixed")
    mixed_final = {label: r["curve"][-1][1] for label, r in recall["mixed"].items()}
    holds = (mixed_final["RNN (tanh)"] < 0.9 and mixed_final["GRU"] >= 0.9
             and mixed_final["LSTM (forget bias +2)"] >= 0.9)
    verdict = "as claimed" if holds else "not as claimed"
    t3 = _common.table(
        ["truncation k", f"first step with >= 90% at lag {s.tbptt_lag}",
         f"final accuracy, lag {s.tbptt_lag}"],
        [[k, first_reaching(r["curve"], 0.9), f"{100 * r['curve'][-1][1]:.0f}%"]
         for k, r in tbptt.items()])
    print(t1, t2, t2_fixed, t3, sep="\n\n")
    total = time.perf_counter() - t0
    page = f"""# Gradient flow through time

Claims (seed document): in the tanh RNN, |dL_T/dh_k| ~ ||W_hh||^(T-k), vanishing below 1 and
exploding above; the LSTM's additive cell update turns the product of Jacobians into a product of
forget gates, a "gradient highway" that a forget-gate bias of +1 or +2 opens at initialisation;
hence LSTM and GRU learn long dependencies that the RNN does not; truncated BPTT cannot learn
dependencies longer than its window k.

Produced by `{_common.command(NAME, argv)}` (seed {seed}, {total:.0f} s on the CPU), with
`rnnkernels.nn.RNN / LSTM / GRU`.

## 1. |dL_T/dh_k| against T - k

Each module runs one step at a time (T = 1 calls) from a zero state over {s.grad_steps} random
inputs (batch {s.grad_batch}, hidden {s.grad_hidden}, float64); L_T is a random readout of h_T.
The figure shows the geometric mean over the batch of |dL_T/dh_k| / |dL_T/dh_T|. The RNN's
W_hh is an orthogonal matrix times 0.9 or 1.1, so every singular value is the spectral norm.
With *small inputs* (input weights times {s.small_input_gain:g}, max |h| in the table) tanh'
stays at 1 and the gradient follows ||W_hh||^(T-k) exactly, down or up. With *unit inputs* the
units saturate, tanh' < 1 shrinks every factor, and even the 1.1 matrix's gradient vanishes: the
norm bounds the growth, it does not force it. The LSTM and GRU use torch's initialisation
(plus the forget bias); their dashed lines are the mean over units of the product of the gate
that multiplies the old state (LSTM f, GRU z) from step k+1 to T. The gradient is not that
product alone (h_k also reaches the loss through W_hh and the gates, and a norm follows its
slowest-decaying units, so at +2 it decays more slowly than the mean product), but both order the
same way: each unit of forget bias buys orders of magnitude of gradient at long distances.

![gradient ratios against distance]({files[0].name})

{t1}

## 2. Learning a lag of {s.lag} steps

A recall task: one of {s.classes} tokens (one-hot) appears once, then zeros; at the last step
the model must name it. Hidden {s.hidden}, batch {s.batch}, Adam (lr {s.lr}, clip 1.0),
{s.steps} steps, for each cell in two regimes. The curves are the accuracy on {s.eval_batch}
held-out sequences at lag exactly {s.lag} (chance: {100 / s.classes:.1f}%); the last columns
test the trained model at shorter lags.

**Lags 1-{s.lag} in training** (the distance to the token varies, as dependencies in data do):

{t2}

**Lag {s.lag} only in training:**

{t2_fixed}

With the lag varying ({verdict}): {mixed_summary}.
With a single fixed lag: {fixed_summary}. The shorter lags tell what was learned: a model that
scores at lag {s.lag} but near chance at lags {", ".join(str(lag) for lag in lags)} does not
remember the token; it decodes where its deterministic, input-free trajectory stands after
exactly {s.lag} steps, a solution that exists only because every training sequence had the same
lag.

![recall accuracy against training steps, and truncated BPTT]({files[1].name})

## 3. Truncated BPTT on a lag-{s.tbptt_lag} task

The same recall task with the lag fixed at {s.tbptt_lag} in sequences of {s.tbptt_length}
steps, an LSTM with forget bias +2, trained with truncated BPTT: the sequence runs in chunks of k
steps with the state detached between chunks, so no gradient spans more than k steps.
{s.tbptt_steps} steps each; accuracy at lag {s.tbptt_lag}.

{t3}
"""
    files.append(_common.write_page(out, NAME, page))
    return {"gradients": grads, "recall": recall, "tbptt": tbptt, "files": files}


def main(argv: Sequence[str] | None = None) -> None:
    _common.main(__doc__, run, argv)


if __name__ == "__main__":
    main()
