"""Running the runs of a plan: :func:`execute`, in this process or over a pool of worker processes
(one torch thread each), with progress bars and a stop flag (:data:`STOP`) that an interrupt handler sets.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Dict, List, Optional, Sequence

from .runner import RunSpec, resolve_device, run_guarded

__all__ = ["execute", "STOP"]


def _worker_init(progress_queue=None):
    import signal

    import torch

    # Ctrl-C reaches the whole process group: the parent stops the pool; a worker that took the
    # interrupt itself would print its traceback ("Process SpawnPoolWorker-N: ...") on the way out
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    global _PROGRESS_QUEUE
    _PROGRESS_QUEUE = progress_queue


_PROGRESS_QUEUE = None

# Set by an interrupt handler (the CLI's SIGINT handler): :func:`execute` stops before the next run
# even when the KeyboardInterrupt itself was swallowed (raised inside a finalizer, for instance).
STOP = threading.Event()


def _run_indexed(item):
    i, spec = item
    q = _PROGRESS_QUEUE
    report = None if q is None else (lambda text: q.put((i, text)))
    return i, run_guarded(spec, report=report)


def _describe(spec: RunSpec) -> str:
    f = "" if spec.factor is None else f" factor={spec.factor:.3g}"
    return f"{spec.scenario} {spec.method} seed={spec.seed}{f}"


def execute(plan: Sequence[RunSpec], workers: Optional[int] = None, progress: bool = True,
            desc: str = "runs", on_row=None) -> List[Dict[str, Any]]:
    """Run every spec of ``plan`` and return the rows in plan order.

    ``workers``: processes (None: one per CPU core, at most len(plan)); 1 runs in this process.
    Each worker process uses one torch thread. On a CUDA device the runs go one after the other
    in this process (``workers`` is ignored: one GPU is shared, not split). ``progress`` shows a
    tqdm bar over runs and, under it, the experience and epoch of the runs in progress.
    ``on_row(spec, row)`` is called as each run finishes (the results file appends it there), so
    an interrupted sweep keeps every finished run. A run that raises gives a failed row
    (:func:`~pcreg_experiments.runner.run_guarded`) and the others go on.
    """
    from tqdm.auto import tqdm

    plan = list(plan)
    if workers is None:
        workers = os.cpu_count() or 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int or None, got {workers!r}")
    if plan and resolve_device(plan[0].settings.device) != "cpu":
        workers = 1
    workers = max(1, min(workers, len(plan) or 1))
    rows: List[Optional[dict]] = [None] * len(plan)
    bar = tqdm(total=len(plan), desc=desc, disable=not progress, unit="run", dynamic_ncols=True)
    inner = tqdm(total=0, bar_format="{desc}", disable=not progress, position=1, leave=False)
    current: Dict[int, str] = {}

    def show(i, text):
        current[i] = f"{_describe(plan[i])}: {text}"
        inner.set_description_str("  " + " | ".join(current[k] for k in sorted(current))[:200])

    def done(i, row):
        rows[i] = row
        current.pop(i, None)
        if on_row is not None:
            on_row(plan[i], row)
        bar.update(1)

    try:
        if workers == 1:
            import torch

            threads = torch.get_num_threads()
            # one thread, as in the worker processes: step times comparable across --workers
            torch.set_num_threads(1)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    for i, spec in enumerate(plan):
                        if STOP.is_set():
                            raise KeyboardInterrupt
                        show(i, "starting")
                        done(i, run_guarded(spec, report=(lambda t, i=i: show(i, t)) if progress else None))
            finally:
                torch.set_num_threads(threads)
        else:
            import multiprocessing as mp
            import queue as _queue

            ctx = mp.get_context("spawn")  # no fork after torch initialised its thread pools
            q = ctx.Manager().Queue() if progress else None
            with ctx.Pool(workers, initializer=_worker_init, initargs=(q,)) as pool:
                it = pool.imap_unordered(_run_indexed, list(enumerate(plan)), chunksize=1)
                remaining = len(plan)
                while remaining:
                    if STOP.is_set():
                        raise KeyboardInterrupt
                    try:
                        i, row = it.next(timeout=0.5)
                    except mp.TimeoutError:
                        pass
                    else:
                        done(i, row)
                        remaining -= 1
                    while q is not None:
                        try:
                            j, text = q.get_nowait()
                        except _queue.Empty:
                            break
                        if rows[j] is None:
                            show(j, text)
    finally:
        inner.close()
        bar.close()
    return rows  # type: ignore[return-value]


