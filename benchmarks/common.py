"""Shared pieces of the benchmark scripts: models, machine info, interleaved timing, memory probes.

Nothing here is part of the library; the scripts import it as ``from common import ...``
(they put their own folder on ``sys.path``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import types
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, ROOT)

warnings.filterwarnings("ignore", message=".*QP solver.*")
warnings.filterwarnings("ignore", category=UserWarning, module="avalanche")


# ---------------------------------------------------------------------------------------- CLI / info
def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="smoke test: a few steps, seconds")
    p.add_argument("--device", type=device_arg, default="cpu", metavar="{cpu,cuda}",
                   help="cpu, or cuda: the first GPU (cuda:0); refused here when CUDA is not available")
    p.add_argument("--resnet", action="store_true",
                   help="also run ResNet-18 (always on with --device cuda; slow on the CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--raw-malloc", action="store_true",
                   help="keep glibc malloc's defaults (by default the script re-runs itself with MALLOC_* "
                        "settings that keep freed memory for reuse, see MALLOC_ENV)")
    return p


# glibc malloc: serve large tensors from the heap and never give freed memory back, so a step's
# temporaries reuse warm pages, as a caching allocator (CUDA's, jemalloc, tcmalloc) would. With the
# defaults, tensors above the (dynamic) mmap threshold are mmap'd and unmapped on free, and on this
# VM every fresh page costs a fault that shows in wall time but not in CPU time (1 thread, T=50: we
# measured ours' step at 1.9x naive in wall time but 1.28x in CPU time that way; 1.29x / 1.29x with
# these settings, and the spread over rounds went from 1.35-2.07 to 1.29-1.33).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "4294967296",
              "MALLOC_TOP_PAD_": "268435456"}


def ensure_malloc_env(argv=None) -> None:
    """Re-run this script under :data:`MALLOC_ENV` (once) unless ``--raw-malloc`` is given."""
    argv = sys.argv if argv is None else argv
    if "--raw-malloc" in argv or os.environ.get("PCREG_BENCH_MALLOC") == "1":
        return
    env = dict(os.environ, PCREG_BENCH_MALLOC="1", **MALLOC_ENV)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable] + argv, env)


def malloc_note() -> str:
    if os.environ.get("PCREG_BENCH_MALLOC") == "1":
        return "glibc malloc: " + " ".join(f"{k}={os.environ.get(k)}" for k in MALLOC_ENV)
    return "glibc malloc: defaults" + (" (--raw-malloc)" if "--raw-malloc" in sys.argv else "")


def apply_threads(args) -> None:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def device_arg(value: str) -> str:
    """The ``--device`` type: ``cpu``, or ``cuda`` (also ``cuda:0``, ``gpu``), which argparse refuses
    (before any work) on a machine where torch sees no CUDA device."""
    v = str(value).strip().lower()
    if v == "cpu":
        return "cpu"
    if v in ("cuda", "cuda:0", "gpu"):
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"{value!r}: no CUDA device is available (torch {torch.__version__}, CUDA build "
                f"{torch.version.cuda or 'none'}, torch.cuda.is_available() is False); run it on a machine "
                "with an NVIDIA GPU, or use --device cpu")
        return "cuda"
    raise argparse.ArgumentTypeError(f"invalid device {value!r}: choose cpu or cuda")


def resolve_device(name: str) -> torch.device:
    """``cuda`` is the first GPU, made the current device, so that every CUDA call (synchronize,
    memory statistics, new tensors) refers to it."""
    if name == "cuda":
        if not torch.cuda.is_available():  # device_arg refuses this at parse time already
            raise SystemExit("--device cuda: torch.cuda.is_available() is False")
        torch.cuda.set_device(0)
        return torch.device("cuda", 0)
    return torch.device("cpu")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device) -> str:
    import avalanche

    lines = [
        f"python {platform.python_version()}, torch {torch.__version__}, avalanche {avalanche.__version__}",
        f"CPU: {cpu_model()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
    ]
    if device.type == "cuda":
        lines.append(f"GPU: {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}")
    lines.append("command: " + " ".join([os.path.basename(sys.executable)] + sys.argv))
    lines.append(malloc_note())
    lines.append(load_note("at start"))
    return "\n".join(lines)


def load_note(when: str) -> str:
    """The 1/5/15-minute load averages: above the core count, other processes shared the CPU."""
    try:
        la = os.getloadavg()
    except OSError:
        return f"load average {when}: unknown"
    return f"load average {when}: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} ({os.cpu_count()} cores)"


# ---------------------------------------------------------------------------------------- models
def load_base(path: str):
    """The ``avalanche_pcreg`` package of the checkout at ``path``, imported as ``pcreg_base`` (its
    imports are relative), next to this one."""
    import importlib.util

    if "pcreg_base" in sys.modules:
        return sys.modules["pcreg_base"]
    init = os.path.join(os.path.abspath(path), "avalanche_pcreg", "__init__.py")
    if not os.path.exists(init):
        raise SystemExit(f"--ab-base: no avalanche_pcreg package in {path}")
    spec = importlib.util.spec_from_file_location("pcreg_base", init, submodule_search_locations=[os.path.dirname(init)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["pcreg_base"] = module
    spec.loader.exec_module(module)
    importlib.import_module("pcreg_base.importance")
    return module


def mlp(seed: int = 0) -> nn.Module:
    """784-400-400-10 MLP (model A)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 400), nn.ReLU(),
                         nn.Linear(400, 10))


def resnet18_cifar(num_classes: int = 100, seed: int = 0) -> nn.Module:
    """torchvision ResNet-18 with a 3x3 stride-1 stem and no max-pool (model B), for 32x32 inputs."""
    import torchvision

    torch.manual_seed(seed)
    m = torchvision.models.resnet18(num_classes=num_classes)
    m.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    m.maxpool = nn.Identity()
    return m


MODELS = {
    "mlp": dict(make=mlp, input_shape=(784,), classes=10),
    "resnet18": dict(make=resnet18_cifar, input_shape=(3, 32, 32), classes=100),
}


def make_batch(model_name: str, n: int, device, seed: int = 0):
    spec = MODELS[model_name]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n,) + spec["input_shape"], generator=g)
    y = torch.randint(0, spec["classes"], (n,), generator=g)
    return x.to(device), y.to(device)


def fake_strategy(model, device, exp_counter: int, loss=None):
    """The few attributes ``before_backward`` of both plugins read."""
    return types.SimpleNamespace(model=model, loss=loss, device=device,
                                 clock=types.SimpleNamespace(train_exp_counter=exp_counter))


# ---------------------------------------------------------------------------------------- timing
def sync(device) -> None:
    """Wait for the GPU's queued work (CUDA kernels run asynchronously); no-op on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device) -> float:
    """Wall time of one call in seconds, synchronised on CUDA."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def timed2(fn: Callable[[], object], device) -> tuple:
    """(wall seconds, process CPU seconds) of one call, synchronised on CUDA.

    The CPU time (all threads of this process) does not count time spent descheduled, so it is
    the steadier figure when other processes share the cores; OpenMP spin-waits do count.
    """
    sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def interleaved(variants: Dict[str, Callable[[], object]], device, *, rounds: int, steps: int,
                block: int = 10, warmup: int = 5, budget_s: Optional[float] = None,
                min_steps: int = 20, log=None) -> Dict[str, Dict[str, List[float]]]:
    """Per-round median seconds per call of each variant, variants interleaved in blocks.

    Each round runs ``block`` calls of variant A, then of B, ... (ABAB...), until every variant
    has ``steps`` timed calls (a variant whose estimated cost would take it over ``budget_s``
    seconds per round gets fewer, but at least ``min_steps``). The order of variants is rotated
    every round. Returns ``{name: {"wall": [round medians], "cpu": [round medians]}}``.
    """
    names = list(variants)
    for name in names:  # warm-up, and a first cost estimate
        for _ in range(warmup):
            variants[name]()
    est = {n: statistics.median([timed(variants[n], device) for _ in range(min(3, steps))]) for n in names}
    quota = {}
    for n in names:
        q = steps
        if budget_s is not None:
            q = max(min_steps, min(steps, int(budget_s / max(est[n], 1e-9))))
        quota[n] = q
    out: Dict[str, Dict[str, List[float]]] = {n: {"wall": [], "cpu": []} for n in names}
    t_start = time.time()
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        samples: Dict[str, List[tuple]] = {n: [] for n in names}
        while any(len(samples[n]) < quota[n] for n in names):
            for n in order:
                todo = min(block, quota[n] - len(samples[n]))
                for _ in range(todo):
                    samples[n].append(timed2(variants[n], device))
        for n in names:
            out[n]["wall"].append(statistics.median(w for w, _ in samples[n]))
            out[n]["cpu"].append(statistics.median(c for _, c in samples[n]))
        if log:
            log(f"  round {r + 1}/{rounds} done ({time.time() - t_start:.0f} s)")
    return out


def med_spread(xs: Sequence[float]) -> tuple:
    """(median, min, max)."""
    return statistics.median(xs), min(xs), max(xs)


def fmt_spread(xs: Sequence[float], scale: float = 1.0, digits: int = 3) -> str:
    m, lo, hi = med_spread([x * scale for x in xs])
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def ratios(xs: Sequence[float], refs: Sequence[float]) -> List[float]:
    """Per-round ratios (the baseline ran in the same round)."""
    return [a / b for a, b in zip(xs, refs)]


def print_table(header: Sequence[str], rows: Sequence[Sequence], out=None) -> str:
    """A Markdown table, printed and returned."""
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for r in cells[1:]:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    text = "\n".join(lines)
    print(text, file=out or sys.stdout, flush=True)
    return text


# ---------------------------------------------------------------------------------------- memory
def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_hwm() -> bool:
    """Reset the peak-RSS mark (Linux ``clear_refs`` 5). False when the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory growth of a block: CUDA max_memory_allocated, or peak RSS on the CPU."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.peak = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            import gc

            gc.collect()
            self.ok = reset_hwm()
            self.base = rss_bytes()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            if not self.ok:  # fall back to the lifetime peak
                import resource

                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            else:
                peak = hwm_bytes()
            self.peak = peak - self.base
        return False


def save_figure(fig, path: str) -> None:
    """tight_layout, save at 120 dpi, say where."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"saved {path}")
