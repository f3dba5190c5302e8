"""Suites lstm, gru, rnn: one layer, one direction, the drop-in modules against torch.nn.

Contenders: ``rnnkernels.nn.<X>`` on each backend of ours the device allows, ``torch.nn.<X>``
(oneDNN or the native loop on the CPU, cuDNN on the GPU), and an ``nn.<X>Cell`` loop. All share
the same weights, input and initial state; the expected results are the float64 references of
:mod:`rnnkernels.reference`. The lstm suite also times PackedSequence input (unsorted lengths)
against padded input of the same shape. Each cell option with a cost (issue 11) is a training
case of its own: ours with the option, the same module on the PyTorch reference (the loop a user
would otherwise write; torch.nn has no such options); the report sets it against the plain case
at the same shape (the option's cost).
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import rnnkernels
from rnnkernels import _backend
from rnnkernels.reference import gru_reference, lstm_reference, rnn_reference

from . import configs
from .core import CaseSpec, Contender, Prepared, Step, Target, standard_specs


@dataclass(frozen=True)
class Family:
    title: str
    gates: int
    ours: type[nn.Module]
    torch: type[nn.Module]
    cell: type[nn.Module]


FAMILIES = {
    "lstm": Family("LSTM", 4, rnnkernels.nn.LSTM, nn.LSTM, nn.LSTMCell),
    "gru": Family("GRU", 3, rnnkernels.nn.GRU, nn.GRU, nn.GRUCell),
    "rnn": Family("RNN", 1, rnnkernels.nn.RNN, nn.RNN, nn.RNNCell),
}
# Speed-ups over torch.nn the project aims for on the CPU in float32 (issues 3, 4 and 11).
CPU_TARGETS = {"lstm": (1.05, 2.5), "gru": (1.4, 6.0), "rnn": (1.5, 4.0)}
PACKED_MAX_SLOWDOWN = 1.2
# The cell options timed as spec variants, per suite: "name" (a flag) or "name=p" (a
# probability), the module's keyword argument.
OPTION_VARIANTS = {"lstm": ("layer_norm", "zoneout=0.1", "recurrent_dropout=0.25", "peephole"),
                   "gru": ("layer_norm",)}
CELL_OPTIONS = ("peephole", "zoneout", "recurrent_dropout", "layer_norm")


def option_kwargs(variant: str) -> dict[str, bool | float]:
    """The module keyword arguments of a cell-option variant ({} for any other variant)."""
    name, _, value = variant.partition("=")
    if name not in CELL_OPTIONS:
        return {}
    return {name: float(value) if value else True}


def padded_name(ours: str) -> str:
    """The contender of the packed case that runs ``ours`` on the padded input (the packed
    target's baseline, timed in turns with the packed run)."""
    return f"{ours}, padded input"


def our_backends(device: str) -> tuple[str, ...]:
    """The backends of ours that run on ``device`` (Triton on the CPU would be interpreted)."""
    return ("cpu",) if device == "cpu" else ("triton", "cuda")


def unavailable_reason(family: str, backend: str, device: str, dtype: torch.dtype) -> str | None:
    return _backend._available(family, torch.device(device), dtype)[backend]


def forcing(family: str, backend: str | None, device: str, dtype: torch.dtype) -> str | None:
    """The backend a contender of ours forces (rnnkernels.use_backend) to run ``family`` on
    ``backend``: None where an unforced call picks ``backend`` already, so that the timed step
    is a user's plain call (entering and leaving the context is a fixed cost of every step,
    which a user who leaves the choice to rnnkernels does not pay)."""
    if backend is not None and _backend.choose(family, torch.device(device), dtype) == backend:
        return None
    return backend


def seed_of(spec: CaseSpec) -> int:
    return zlib.crc32(repr(spec.key()).encode())


def torch_impl(suite: str, device: str, dtype: torch.dtype, packed: bool) -> str:
    """Which implementation torch.nn runs for this input (informational, for the tables)."""
    if device == "cuda":
        return "cuDNN" if torch.backends.cudnn.is_available() and torch.backends.cudnn.enabled \
            else "native"
    onednn = (suite == "lstm" and not packed and torch.backends.mkldnn.is_available()
              and torch.backends.mkldnn.enabled and dtype in (torch.float32, torch.bfloat16))
    return "oneDNN" if onednn else "native"


class RecurrenceSuite:
    """lstm, gru or rnn (tanh)."""

    couple: ClassVar[dict[str, tuple[str, ...]]] = {"H": ("I", "H")}

    def __init__(self, name: str) -> None:
        self.name = name
        self.family = FAMILIES[name]

    def unavailable(self) -> str | None:
        return None

    def specs(self, device: str, dtype: torch.dtype, profile: str) -> list[CaseSpec]:
        config = configs.RECURRENCE[profile]
        specs = standard_specs(self.name, device, dtype, config, self.couple)
        if self.name == "lstm":
            specs.append(CaseSpec(self.name, "train-packed", "train", tuple(config.train.items()),
                                  device, dtype, headline=True, variant="packed", loops=False))
        specs += [CaseSpec(self.name, f"train {variant}", "train", tuple(config.train.items()),
                           device, dtype, headline=True, variant=variant)
                  for variant in OPTION_VARIANTS.get(self.name, ())]
        return specs

    def targets(self, device: str, dtype: torch.dtype, profile: str) -> list[Target]:
        if profile != "cpu" or dtype != torch.float32:
            return []
        title = self.family.title
        ours, theirs = "rnnkernels (cpu)", f"torch.nn.{title}"
        train, infer = CPU_TARGETS[self.name]
        targets = [
            Target(self.name, f"{title} training step >= {train}x {theirs}", ("train", ours),
                   ("train", theirs), train),
            Target(self.name, f"{title} inference (B=1) >= {infer}x {theirs}", ("inference", ours),
                   ("inference", theirs), infer),
        ]
        if self.name == "lstm":
            targets.append(Target(self.name, f"LSTM packed input <= {PACKED_MAX_SLOWDOWN}x padded",
                                  ("train-packed", ours), ("train-packed", padded_name(ours)),
                                  1 / PACKED_MAX_SLOWDOWN))
        return targets

    def prepare(self, spec: CaseSpec) -> Prepared:
        return _Case(self, spec).prepared()


class _Case:
    """Inputs, expected results and contenders of one recurrence case."""

    def __init__(self, suite: RecurrenceSuite, spec: CaseSpec) -> None:
        self.suite, self.spec = suite, spec
        self.lstm = suite.name == "lstm"
        d = spec.dims
        self.T, self.B, self.I, self.H = d["T"], d["B"], d["I"], d["H"]
        self.device, self.dtype = spec.device, spec.dtype
        self.train = spec.mode == "train"
        self.packed = spec.variant == "packed"
        self.options = option_kwargs(spec.variant)
        self.seed = seed_of(spec)
        gen = torch.Generator().manual_seed(self.seed)
        G, H, I = suite.family.gates, self.H, self.I

        def rand(*shape: int, scale: float = 1.0) -> Tensor:
            # Rounded to the run's dtype, so float64 copies hold exactly the values every
            # contender sees.
            values = (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * scale
            return values.to(self.dtype).to(self.device)

        k = H ** -0.5
        self.weights = {"weight_ih": rand(G * H, I, scale=k), "weight_hh": rand(G * H, H, scale=k),
                        "bias_ih": rand(G * H, scale=k), "bias_hh": rand(G * H, scale=k)}
        self.x = rand(self.T, self.B, I, scale=2.0).requires_grad_(self.train)
        self.h0 = rand(self.B, H)
        self.c0 = rand(self.B, H) if self.lstm else None
        self.gy = rand(self.T, self.B, H) if self.train else None
        self.lengths = None
        if self.packed:
            # Unsorted lengths, the longest equal to T so that the padded shape is (T, B, I).
            lengths = torch.randint(max(1, self.T // 4), self.T + 1, (self.B,), generator=gen)
            lengths[torch.randint(0, self.B, (1,), generator=gen)] = self.T
            self.lengths = lengths
            packed = pack_padded_sequence(self.x.detach(), lengths, enforce_sorted=False)
            data = packed.data.detach().requires_grad_(self.train)
            self.packed_input = PackedSequence(data, packed.batch_sizes, packed.sorted_indices,
                                               packed.unsorted_indices)
            if self.train:
                self.gy_packed = pack_padded_sequence(self.gy, lengths, enforce_sorted=False).data
        # The cell options' parameters by state_dict key, in the module's parameter order:
        # random, never their initial ones and zeros. Layer-norm gains lie around 1, except the
        # recurrent one: normalising h W_hh^T removes W_hh's scale, so that gain sets the
        # recurrent Jacobian's, and around 1 the LSTM at random weights is chaotic over 128
        # steps (fp32 rounding grows to 3e-4 of y against float64); around 0.5 it is not.
        self.option_weights: dict[str, Tensor] = {}
        if self.options:
            shapes = suite.family.ours(I, H, device="meta", **self.options).named_parameters()
            for key, p in shapes:
                if key.removesuffix("_l0") in self.weights:
                    continue
                if key.startswith("layer_norm_weight"):
                    centre = 0.5 if key.startswith("layer_norm_weight_hh") else 1.0
                    self.option_weights[key] = centre + rand(*p.shape, scale=centre / 2)
                else:
                    self.option_weights[key] = rand(*p.shape, scale=k)

    # ---------------------------------------------------------------- expected results

    def names(self, options: bool = False) -> list[str]:
        """The results' names; with the cell options', the gradients of their parameters too."""
        names = ["y", "h_n"] + (["c_n"] if self.lstm else [])
        if self.train:
            names += ["dx", "dw_ih", "dw_hh", "db_ih", "db_hh"]
            if options:
                names += [f"d{key}" for key in self.option_weights]
        return names

    def expected_with_options(self) -> list[Tensor]:
        """Our module with the cell options in float64 on the reference backend (training
        cases), under the seed of every contender's step: the masks are drawn in fp32, so the
        draws are the same for any dtype."""
        module = self._module(self.suite.family.ours, torch.float64, options=True)
        x = self.x.detach().double().requires_grad_()
        run = self._seeded(lambda: module(x, self._state(torch.float64)))
        step = self._step(run, [x, *module.parameters()], self.gy.double(), "reference", False)
        return [t.detach() for t in step()]

    def expected(self, padded: bool = False) -> list[Tensor]:
        """The float64 references of :mod:`rnnkernels.reference`, without cell options; with
        ``padded``, of the padded input in full (no lengths)."""
        f64 = {k: w.detach().double().requires_grad_(self.train) for k, w in self.weights.items()}
        x = self.x.detach().double().requires_grad_(self.train)
        h0 = self.h0.double()
        lengths = None if padded else self.lengths
        args = (f64["weight_ih"], f64["weight_hh"], f64["bias_ih"], f64["bias_hh"])
        with torch.set_grad_enabled(self.train):
            if self.lstm:
                y, h, c = lstm_reference(x, h0, self.c0.double(), *args, None, lengths)
                outs = [y, h, c]
            elif self.suite.name == "gru":
                y, h = gru_reference(x, h0, *args, True, lengths)
                outs = [y, h]
            else:
                y, h = rnn_reference(x, h0, *args, "tanh", lengths)
                outs = [y, h]
        if not self.train:
            return outs
        grads = torch.autograd.grad(y, [x, *f64.values()], self.gy.double())
        return [t.detach() for t in outs] + list(grads)

    # ---------------------------------------------------------------- contenders

    def _state(self, dtype: torch.dtype):
        h0 = self.h0.unsqueeze(0).to(dtype)
        return (h0, self.c0.unsqueeze(0).to(dtype)) if self.lstm else h0

    def _finals(self, state) -> list[Tensor]:
        if isinstance(state, tuple):
            return [s.squeeze(0) if s.dim() == 3 else s for s in state]
        return [state.squeeze(0) if state.dim() == 3 else state]

    def _step(self, run: Callable[[], tuple[Tensor, object]], inputs: list[Tensor],
              gy: Tensor | None, backend: str | None, packed: bool) -> Step:
        """The timed step around ``run`` (one forward): backward too when training, of output
        gradient ``gy`` to ``inputs`` (the input tensor, then the parameters)."""
        backend = forcing("recurrence", backend, self.device, self.dtype)
        context = (lambda: rnnkernels.use_backend(backend)) if backend else contextlib.nullcontext
        if not self.train:
            def step() -> list[Tensor]:
                with torch.no_grad(), context():
                    y, state = run()
                return [y.data if packed else y, *self._finals(state)]
            return step

        def step() -> list[Tensor]:
            with context():
                y, state = run()
                y = y.data if packed else y
                grads = torch.autograd.grad(y, inputs, gy)
            return [y, *self._finals(state), *grads]
        return step

    def _module(self, cls: type[nn.Module], dtype: torch.dtype, options: bool) -> nn.Module:
        """A ``cls`` module in ``dtype`` holding the case's weights (with the cell options and
        their parameters if ``options``)."""
        module = cls(self.I, self.H, device=self.device, dtype=dtype,
                     **(self.options if options else {}))
        weights = {f"{k}_l0": w for k, w in self.weights.items()}
        if options:
            weights |= self.option_weights
        module.load_state_dict({k: w.to(dtype) for k, w in weights.items()})
        return module.requires_grad_(self.train)

    def _seeded(self, run: Callable[[], tuple[Tensor, object]]
                ) -> Callable[[], tuple[Tensor, object]]:
        """``run`` under the case's seed: every call of every contender draws the same masks."""
        def seeded() -> tuple[Tensor, object]:
            torch.manual_seed(self.seed)
            return run()
        return seeded

    def _module_contender(self, cls: type[nn.Module], name: str, kind: str, impl: str,
                          backend: str | None = None, options: bool = False,
                          padded: bool = False) -> Contender:
        """``cls`` on the case's input; with ``padded``, on the padded form of a packed case's
        input (checked against the padded input's own references)."""
        packed = self.packed and not padded

        def build() -> Step:
            module = self._module(cls, self.dtype, options)
            inp = self.packed_input if packed else self.x
            state = self._state(self.dtype)
            run = lambda: module(inp, state)  # noqa: E731
            x = self.packed_input.data if packed else self.x
            gy = self.gy_packed if packed else self.gy
            return self._step(self._seeded(run) if options else run, [x, *module.parameters()],
                              gy, backend, packed)
        return Contender(name, kind, impl, build, canon=self._unpack if packed else None,
                         expected=self.expected(padded=True) if padded else None)

    def _loop_contender(self) -> Contender:
        cls = self.suite.family.cell

        def build() -> Step:
            from .loops import cell_loop

            cell = cls(self.I, self.H, device=self.device, dtype=self.dtype)
            cell.load_state_dict(self.weights)
            cell.requires_grad_(self.train)
            state = (self.h0, self.c0) if self.lstm else self.h0
            return self._step(lambda: cell_loop(cell, self.x, state),
                              [self.x, *cell.parameters()], self.gy, None, False)
        return Contender(f"nn.{cls.__name__} loop", "loop", "PyTorch ops", build)

    def _unpack(self, results: list[Tensor]) -> list[Tensor]:
        """Packed y (and dx) back to padded (T, B, *) for the comparison."""
        p = self.packed_input

        def pad(data: Tensor) -> Tensor:
            seq = PackedSequence(data, p.batch_sizes, p.sorted_indices, p.unsorted_indices)
            return pad_packed_sequence(seq, total_length=self.T)[0]

        out = list(results)
        out[0] = pad(out[0])
        if self.train:
            dx = self.names().index("dx")
            out[dx] = pad(out[dx])
        return out

    def contenders(self) -> list[Contender]:
        fam, title = self.suite.family, self.suite.family.title
        options = bool(self.options)
        out = []
        for backend in our_backends(self.device):
            name = f"rnnkernels ({backend})"
            reason = unavailable_reason("recurrence", backend, self.device, self.dtype)
            if reason is not None:
                out.append(Contender(name, "ours", backend, unavailable=reason))
            else:
                out.append(self._module_contender(fam.ours, name, "ours", backend, backend,
                                                  options))
                if self.packed:  # the packed target's baseline, timed in turns with it
                    out.append(self._module_contender(fam.ours, padded_name(name), "padded",
                                                      backend, backend, padded=True))
        if options:
            # torch.nn has no cell options; ours without the option is the plain case ("train").
            return [*out, self._module_contender(fam.ours, "PyTorch loop (reference)", "loop",
                                                 "PyTorch ops", "reference", True)]
        out.append(self._module_contender(fam.torch, f"torch.nn.{title}", "torch.nn",
                                          torch_impl(self.suite.name, self.device, self.dtype,
                                                     self.packed)))
        if self.spec.loops:
            out.append(self._loop_contender())
        return out

    def prepared(self) -> Prepared:
        steps = int(self.lengths.sum()) if self.packed else self.T * self.B
        G = self.suite.family.gates
        flops = 2.0 * steps * G * self.H * (self.I + self.H) * (3 if self.train else 1)
        options = bool(self.options)
        expected = self.expected_with_options() if options else self.expected()
        return Prepared(self.names(options), expected, self.contenders(), flops=flops,
                        steps=self.T)
