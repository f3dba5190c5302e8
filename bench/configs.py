"""Sizes of every suite, per profile: "cpu" (the whole run in about 5 minutes on 2 cores),
"gpu" (sizes that fill an H100, and small latency-bound ones) and "quick" (tiny, for the tests).

Each suite has a training point (timed as forward + backward and as forward alone), an inference
point (batch 1, no autograd), optional extra cases, and sweeps of the training step along the
sequence length, the batch and the width, through the training point.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SuiteConfig:
    train: dict[str, int]
    inference: dict[str, int]
    sweeps: dict[str, tuple[int, ...]]
    # (label, mode, dims) of further headline cases.
    extra: tuple[tuple[str, str, dict[str, int]], ...] = ()
    # Whether the naive loops run at the sweep points too (on the GPU they are too slow there).
    sweep_loops: bool = True


# Seconds each measurement spans at least, per profile.
MIN_TIME_S = {"cpu": 0.25, "gpu": 0.2, "quick": 0.005}


RECURRENCE = {
    "cpu": SuiteConfig(
        train={"B": 32, "T": 128, "I": 256, "H": 256},
        inference={"B": 1, "T": 256, "I": 256, "H": 256},
        sweeps={"T": (32, 512), "B": (8, 128), "H": (128, 512)},
        # one token per call, as a decoding loop runs the layer: per-call overheads dominate
        extra=(("decode", "inference", {"B": 1, "T": 1, "I": 256, "H": 256}),),
        sweep_loops=False),
    "gpu": SuiteConfig(
        train={"B": 16, "T": 1024, "I": 768, "H": 768},
        inference={"B": 1, "T": 1024, "I": 768, "H": 768},
        sweeps={"T": (256, 4096), "B": (1, 64), "H": (256, 1536)},
        extra=(("train-small", "train", {"B": 8, "T": 256, "I": 256, "H": 256}),
               ("inference-small", "inference", {"B": 1, "T": 256, "I": 256, "H": 256})),
        sweep_loops=False),
    "quick": SuiteConfig(
        train={"B": 3, "T": 6, "I": 5, "H": 8},
        inference={"B": 1, "T": 5, "I": 5, "H": 8},
        sweeps={"T": (3,), "B": (1,), "H": (4,)}),
}

SELECTIVE_SCAN = {
    "cpu": SuiteConfig(
        train={"batch": 2, "dim": 256, "L": 512, "N": 16},
        inference={"batch": 1, "dim": 256, "L": 512, "N": 16},
        sweeps={"L": (128, 2048), "dim": (64, 1024), "batch": (1, 8)}),
    "gpu": SuiteConfig(
        train={"batch": 8, "dim": 1536, "L": 2048, "N": 16},
        inference={"batch": 1, "dim": 1536, "L": 2048, "N": 16},
        sweeps={"L": (512, 8192), "dim": (768, 3072), "batch": (1, 32)},
        extra=(("train-wide", "train", {"batch": 8, "dim": 3072, "L": 2048, "N": 16}),
               ("forward-wide", "forward", {"batch": 8, "dim": 3072, "L": 2048, "N": 16})),
        sweep_loops=False),
    "quick": SuiteConfig(
        train={"batch": 2, "dim": 6, "L": 7, "N": 4},
        inference={"batch": 1, "dim": 6, "L": 5, "N": 4},
        sweeps={"L": (3,), "dim": (3,), "batch": (1,)}),
}

LINEAR_SCAN = {
    "cpu": SuiteConfig(
        train={"batch": 8, "C": 512, "T": 1024},
        inference={"batch": 1, "C": 512, "T": 1024},
        sweeps={"T": (256, 4096), "C": (128, 2048), "batch": (2, 32)}),
    "gpu": SuiteConfig(
        train={"batch": 8, "C": 3072, "T": 2048},
        inference={"batch": 1, "C": 3072, "T": 2048},
        sweeps={"T": (512, 8192), "C": (768, 12288), "batch": (1, 32)},
        sweep_loops=False),
    "quick": SuiteConfig(
        train={"batch": 2, "C": 5, "T": 7},
        inference={"batch": 1, "C": 5, "T": 6},
        sweeps={"T": (3,), "C": (2,), "batch": (1,)}),
}


def profile_name(device: str, quick: bool) -> str:
    if quick:
        return "quick"
    return "gpu" if device == "cuda" else "cpu"
