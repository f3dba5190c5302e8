"""The run's header: device, dtype, threads, versions, commit, and the measured copy bandwidth
that the scans' achieved bandwidth is compared with."""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import re
import subprocess
from pathlib import Path

import torch

from .core import dtype_name
from .timing import median_time

ROOT = Path(__file__).resolve().parent.parent
# Bytes copied to measure the device's copy bandwidth (read + write counted).
COPY_BYTES = {"cpu": 256 << 20, "cuda": 1 << 30}
COPY_BYTES_QUICK = 8 << 20


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                             timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def commit() -> str:
    """The checkout's commit, with "-dirty" when tracked files differ from it."""
    head = _git("rev-parse", "--short=12", "HEAD")
    if head is None:
        return "unknown"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return head + ("-dirty" if dirty else "")


def cpu_model() -> str:
    """The CPU's model name, with its family and model numbers where /proc/cpuinfo gives them:
    a virtual machine's name can be as bare as "AMD EPYC" for Zen 4 (family 25) and Zen 5
    (family 26) alike, whose AVX-512 units differ in width (csrc/cpu/onednn_matmul.h)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()

    def field(name: str) -> str | None:
        match = re.search(rf"^{name}\s*:\s*(.+)$", text, re.MULTILINE)
        return match.group(1).strip() if match else None

    name = field("model name") or platform.machine()
    family, model = field("cpu family"), field("model")
    return f"{name}, family {family} model {model}" if family and model else name


def device_name(device: str) -> str:
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        return f"{torch.cuda.get_device_name()} (sm_{major}{minor})"
    return cpu_model()


def device_slug(device: str) -> str:
    """Short name for result files: "h100", "h200", "cpu"."""
    if device != "cuda":
        return "cpu"
    words = re.findall(r"[a-z0-9]+", torch.cuda.get_device_name().lower())
    words = [w for w in words if w not in ("nvidia", "tesla", "geforce")]
    return words[0] if words else "gpu"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def copy_bandwidth(device: str, quick: bool) -> float:
    """Measured bytes per second of a large tensor copy (bytes read + bytes written)."""
    nbytes = COPY_BYTES_QUICK if quick else COPY_BYTES[device]
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    timing = median_time(lambda: dst.copy_(src), device, 0.05 if quick else 0.3)
    return 2 * nbytes / timing.median_s


def header(device: str, dtype: torch.dtype, suites: list[str], quick: bool,
           mamba: str | None) -> dict:
    """Everything a reader needs to reproduce or compare the run."""
    import rnnkernels
    from rnnkernels.ops import _linear

    cuda = device == "cuda"
    return {
        "device": device_name(device),
        "device_type": device,
        "slug": device_slug(device),
        "dtype": dtype_name(dtype),
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "onednn": torch.backends.mkldnn.is_available(),
        # whether our recurrences' float32 CPU matmuls went through oneDNN (ops/_linear.py)
        "onednn_matmul": not cuda and _linear.onednn_preferred(),
        "python": platform.python_version(),
        "rnnkernels": rnnkernels.__version__,
        "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "copy_bandwidth_Bps": copy_bandwidth(device, quick),
        "mamba_ssm": mamba,
        "suites": suites,
        "quick": quick,
    }
