"""Importance-pass throughput (samples/s) and peak memory, next to Avalanche's EWCPlugin pass.

Variants, all over the same Avalanche tensor dataset and DataLoader batch size:

* ``avalanche``: Avalanche 0.6 ``EWCPlugin.compute_importances`` (its real code: squared
  minibatch gradients, criterion + optimizer + dataset);
* ``ours <method>``: ``compute_importance(model, data, method)`` for ``empirical_fisher``,
  ``fisher``, ``expected_fisher``, ``mas``, ``minibatch_fisher``;
* ``ours <method>, batched conv paths`` (ResNet-18 on a GPU): the same with a policy whose
  convolutions take the batched paths instead of the GPU's one weight-gradient call per chunk;
* ``ours <method>, FIELD=VALUE`` (``--ab-policy FIELD=VALUE ...``): the same with the device's
  policy changed in one field (``Policy.replace``), for ``empirical_fisher`` and ``expected_fisher``;
* ``base <method>`` (``--ab-base PATH``): ``compute_importance`` of the ``avalanche_pcreg`` package
  in another checkout at PATH (e.g. a ``git worktree`` of the previous commit), imported under
  another name, so that both versions run interleaved in one process; ``base <method>, torch.mm
  products`` when that version has the CPU oneDNN products (``importance/rules/_gemm.py``), with
  them switched off;
* ``naive per-sample loop``: batch-size-1 forward + ``autograd.grad`` per sample, squared, summed;
* ``vmap(grad)``: ``torch.func.vmap(grad(loss))`` over each batch (``functional_call``), squared,
  summed (chunks of ``--vmap-chunk`` samples for ResNet-18, the whole batch for the MLP);
* ``loader only``: iterating the DataLoader, the floor every variant pays;
* ``floor``: a plain minibatch forward + backward of the mean loss over the same batches (the
  peer table's reference; ``--reference floor`` gives every variant's throughput against it).

Throughput: every variant runs one full pass per round, rounds interleaved; the median and
[min, max] over rounds, and the ratio to Avalanche's pass in the same round. Peak memory: each
variant in a fresh subprocess (warmed up on a copy of the model, then measured on a fresh one):
peak RSS growth on the CPU (``VmHWM`` reset via ``/proc/self/clear_refs``, glibc's mmap threshold
fixed so freed blocks go back to the OS), ``torch.cuda.max_memory_allocated`` growth on CUDA;
a training step's peak (forward, backward, SGD momentum step, from a model with no
gradients or optimizer state yet) is the reference.

    python benchmarks/bench_importance.py                  # CPU, MLP, N=2048, batch 128 (~2 min)
    python benchmarks/bench_importance.py --quick          # smoke test
    python benchmarks/bench_importance.py --device cuda    # MLP + ResNet-18 (N=2048 / 512)
    python benchmarks/bench_importance.py --resnet         # CPU with ResNet-18 as well (slow; N=128)
    python benchmarks/bench_importance.py --peers --peers-md benchmarks/RESULTS.md   # the peer table
    python benchmarks/bench_importance.py --ab-base ../previous --variants "ours empirical_fisher" \
        "base empirical_fisher"                            # this version against another checkout
    python benchmarks/bench_importance.py --models resnet18-tv --n 256 --batch 32 --threads 1 --no-memory \
        --ab-policy conv_sums=per_sample --reference floor \
        --variants floor "ours empirical_fisher" "ours empirical_fisher, conv_sums=per_sample"
                                                           # against the floor, per round

Models (``--models``): ``mlp``; ``resnet18``, torchvision's ResNet-18 with a 3×3 stride-1 stem and no
max-pool (the CIFAR stem; maps of 32×32 down to 4×4); ``resnet18-tv``, torchvision's ResNet-18 as it
is (7×7 stride-2 stem and max-pool) on the same 32×32 inputs (maps of 8×8 down to 1×1).

``--peers``: ours against BackPACK, Opacus and nngeometry (those installed; see ``peers.py``) and a
per-sample loop, for the empirical and the exact expected Fisher on the MLP and ResNet-18, as
throughput relative to the floor (a plain minibatch forward + backward of the mean loss over the
same data), on 1 thread unless ``--threads`` is given; every variant's result is checked against
ours first.
"""

from __future__ import annotations

import copy
import functools
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (apply_threads, cpu_model, ensure_malloc_env, load_base, load_note, MODELS, PeakMemory, base_parser, fmt_spread,  # noqa: E402
                    machine_info, print_table, ratios, resnet18_cifar, resolve_device, sync)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from avalanche.benchmarks.utils.classification_dataset import \
    _make_taskaware_tensor_classification_dataset as make_tensor_dataset  # noqa: E402
from avalanche.training.plugins import EWCPlugin  # noqa: E402

from avalanche_pcreg import compute_importance  # noqa: E402

OURS = ("empirical_fisher", "fisher", "expected_fisher", "mas", "minibatch_fisher")
MiB = 2 ** 20


def resnet18_torchvision(num_classes: int = 100, seed: int = 0) -> torch.nn.Module:
    """torchvision's ResNet-18 as it is (7x7 stride-2 stem, max-pool), for 32x32 inputs: its
    feature maps are 8x8, 4x4, 2x2 and 1x1, where most of its weights see few output positions."""
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=num_classes)


MODELS["resnet18-tv"] = dict(make=resnet18_torchvision, input_shape=(3, 32, 32), classes=100)
RESNETS = {"resnet18": resnet18_cifar, "resnet18-tv": resnet18_torchvision}


# ------------------------------------------------------------------------------------------ set-up
def make_data(model_name, n, seed):
    spec = MODELS[model_name]
    g = torch.Generator().manual_seed(seed + 7)
    x = torch.randn((n,) + spec["input_shape"], generator=g)
    y = torch.randint(0, spec["classes"], (n,), generator=g)
    return make_tensor_dataset(x, y)


def _classes(text: str) -> int:
    import argparse

    try:
        c = int(text)
    except ValueError:
        c = 0
    if c < 2:
        raise argparse.ArgumentTypeError(f"expected a number of classes >= 2, got {text!r}")
    return c


def set_resnet_classes(c: int) -> None:
    """The ResNet-18s with ``c`` classes for data, models and table titles."""
    for name, make in RESNETS.items():
        if c != MODELS[name]["classes"]:
            MODELS[name] = dict(MODELS[name], classes=c, make=functools.partial(make, num_classes=c))
            MODEL_TITLES[name] = f"{MODEL_TITLES[name]}, {c} classes"


def make_model(model_name, device, seed):
    m = MODELS[model_name]["make"](seed=seed).to(device)
    m.train()
    return m


def loader(data, batch):
    return DataLoader(data, batch_size=batch, shuffle=False, collate_fn=getattr(data, "collate_fn", None))


def interleaved_times(names, run, rounds, device, log, clock=time.perf_counter) -> dict:
    """{name: [seconds of one ``run(name)`` per round]}: every round runs each name once, the
    order rotated by one each round; the device is synchronised around every run. ``clock``:
    ``time.perf_counter`` (wall time) or ``time.process_time`` (this process's CPU time, which a
    machine shared with other processes inflates less, at 1 thread)."""
    times = {k: [] for k in names}
    t0 = time.time()
    for r in range(rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:
            sync(device)
            t = clock()
            run(k)
            sync(device)
            times[k].append(clock() - t)
        log(f"  round {r + 1}/{rounds} done ({time.time() - t0:.0f} s): "
            + ", ".join(f"{k} {times[k][-1]:.3g} s" for k in names))
    return times


# ------------------------------------------------------------------------------------------ variants
def v_avalanche(model, data, batch, device, **_):
    plugin = EWCPlugin(1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    imps = plugin.compute_importances(model, torch.nn.CrossEntropyLoss(), opt, data, device, batch)
    return {k: v.data for k, v in imps.items()}


def v_ours(method, policy=None):
    """``compute_importance`` with ``policy`` (a function of the device), else the library's default."""
    def run(model, data, batch, device, chunk=None, **_):
        kw = {} if chunk is None else {"chunk_size": chunk}  # default: the library's own
        if policy is not None:
            kw["policy"] = policy(device)
        return compute_importance(model, data, method, batch_size=batch, device=device, **kw)

    run.__name__ = f"ours_{method}"
    return run


def v_ours_batched_conv(method):
    """``ours <method>`` with a policy whose convolutions take the batched path (unfold + bmm) where
    a GPU's takes one weight-gradient call per chunk: the A/B of that choice (on the CPU the policy
    is the device's)."""
    from avalanche_pcreg.importance import Policy

    def policy(device):
        base = Policy.for_device(device)
        return base if torch.device(device).type == "cpu" else base.replace(conv_path="batched")

    return v_ours(method, policy)


def parse_policy_change(text: str) -> dict:
    """``"FIELD=VALUE"`` -> ``{FIELD: value}`` for ``Policy.replace`` (VALUE: an int, True/False, None
    or a word)."""
    import argparse

    from avalanche_pcreg.importance import Policy

    field, sep, value = text.partition("=")
    if not sep or field not in Policy.__dataclass_fields__:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE with a field of Policy, got {text!r}")
    words = {"None": None, "True": True, "False": False}
    value = words[value] if value in words else (int(value) if value.lstrip("-").isdigit() else value)
    try:
        Policy().replace(**{field: value})
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(str(err))
    return {field: value}


def v_ours_policy(method, change: dict):
    """``ours <method>`` with the device's policy changed by ``change``."""
    from avalanche_pcreg.importance import Policy

    return v_ours(method, lambda device: Policy.for_device(device).replace(**change))


def v_base(method, torch_mm=False):
    """``compute_importance`` of the package loaded by :func:`load_base`; ``torch_mm``: with that
    version's oneDNN products switched off (its one-time operator check answered "no")."""
    def run(model, data, batch, device, chunk=None, **_):
        base = sys.modules["pcreg_base"]
        kw = {} if chunk is None else {"chunk_size": chunk}
        gemm = sys.modules.get("pcreg_base.importance.rules._gemm") if torch_mm else None
        saved = gemm._checked.get("ok") if gemm is not None else None
        if gemm is not None:
            gemm._checked["ok"] = False
        try:
            return base.compute_importance(model, data, method, batch_size=batch, device=device, **kw)
        finally:
            if gemm is not None:
                if saved is None:
                    gemm._checked.pop("ok", None)
                else:
                    gemm._checked["ok"] = saved

    return run


# the estimators with an A/B variant, and those variants (they only differ from ``ours <method>`` on a GPU)
BATCHED_CONV_AB = ("empirical_fisher", "expected_fisher")
GPU_ONLY = tuple(f"ours {m}, batched conv paths" for m in BATCHED_CONV_AB)


def _per_sample_loop(model, data, batch, device, add):
    """Mean over samples of what ``add(x_i, y_i, params, sums)`` adds per sample (eval mode,
    trainable parameters), one sample at a time: the brute-force references."""
    was = model.training
    model.eval()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [dict(model.named_parameters())[n] for n in names]
    sums = [torch.zeros_like(p) for p in params]
    n = 0
    for x, y, _t in loader(data, batch):
        x, y = x.to(device), y.to(device)
        for i in range(x.shape[0]):
            add(x[i:i + 1], y[i:i + 1], params, sums)
        n += x.shape[0]
    model.train(was)
    return {k: s / n for k, s in zip(names, sums)}


def v_naive_loop(model, data, batch, device, **_):
    """Per-sample gradients the slow, obvious way: one forward/backward per sample."""

    def add(x, y, params, sums):
        for s, g in zip(sums, torch.autograd.grad(F.cross_entropy(model(x), y), params)):
            s.add_(g.square())

    return _per_sample_loop(model, data, batch, device, add)


def v_vmap(model, data, batch, device, vmap_chunk=None, **_):
    """Plain torch.func: vmap(grad(loss)) over the batch, squared and summed."""
    from torch.func import functional_call, grad, vmap

    was = model.training
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v for k, v in model.named_buffers()}

    def loss_fn(p, x, y):
        out = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return F.cross_entropy(out, y.unsqueeze(0))

    per_sample = vmap(grad(loss_fn), in_dims=(None, 0, 0))
    sums = {k: torch.zeros_like(v) for k, v in params.items()}
    n = 0
    for x, y, _t in loader(data, batch):
        x, y = x.to(device), y.to(device)
        step = vmap_chunk or x.shape[0]
        for i in range(0, x.shape[0], step):
            gs = per_sample(params, x[i:i + step], y[i:i + step])
            for k, g in gs.items():
                sums[k] += g.square().sum(0)
            del gs
        n += x.shape[0]
    model.train(was)
    return {k: s / n for k, s in sums.items()}


def v_loader_only(model, data, batch, device, **_):
    for x, y, _t in loader(data, batch):
        x.to(device), y.to(device)
    return {}


def v_train_step(model, data, batch, device, **_):
    """One training step on the first batch (forward, CE, backward, SGD momentum step)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y, _t = next(iter(loader(data, batch)))
    x, y = x.to(device), y.to(device)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return {}


AB_METHODS = ("empirical_fisher", "expected_fisher")


def variants(args=None):
    """{name: variant}; with ``args``, also the ``--ab-policy`` and ``--ab-base`` variants."""
    out = {"avalanche EWCPlugin (minibatch)": v_avalanche}
    for m in OURS:
        out[f"ours {m}"] = v_ours(m)
    for m, name in zip(BATCHED_CONV_AB, GPU_ONLY):
        out[name] = v_ours_batched_conv(m)
    for text in getattr(args, "ab_policy", None) or ():
        change = parse_policy_change(text)
        (field, value), = change.items()
        for m in AB_METHODS:
            out[f"ours {m}, {field}={value}"] = v_ours_policy(m, change)
    if getattr(args, "ab_base", None):
        load_base(args.ab_base)
        gemm = "pcreg_base.importance.rules._gemm" in sys.modules
        for m in OURS:
            out[f"base {m}"] = v_base(m)
            if gemm:
                out[f"base {m}, torch.mm products"] = v_base(m, torch_mm=True)
    out["naive per-sample loop"] = v_naive_loop
    out["vmap(grad)"] = v_vmap
    out["loader only"] = v_loader_only
    out["floor"] = v_floor
    return out


# ------------------------------------------------------------------------------------------ checks
def rel(a: dict, b: dict) -> float:
    num = sum(((a[k].double() - b[k].double()) ** 2).sum() for k in b) ** 0.5
    den = sum((b[k].double() ** 2).sum() for k in b) ** 0.5
    return float(num / den)


def expected_fisher_loop(model, data, n):
    """sum_c p_c g_c**2, one sample and one class at a time (float64 accumulation)."""
    model.eval()
    names = [k for k, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    sums = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    x_all = torch.stack([data[i][0] for i in range(n)]).to(params[0].device)
    for i in range(n):
        logp = torch.log_softmax(model(x_all[i:i + 1]), -1)[0]
        for c in range(logp.shape[0]):
            gs = torch.autograd.grad(-logp[c], params, retain_graph=True)
            for s, g in zip(sums, gs):
                s += logp[c].detach().exp().double() * g.double() ** 2
    model.train()
    return {k: s / n for k, s in zip(names, sums)}


def checks(model_name, device, batch, seed, log, n=None):
    model = make_model(model_name, device, seed)
    n = n or (256 if model_name == "mlp" else 32)
    data = make_data(model_name, n, seed)
    loop = v_naive_loop(model, data, batch, device)
    log(f"check ({n} samples): ours empirical_fisher vs naive loop: rel diff "
        f"{rel(v_ours('empirical_fisher')(model, data, batch, device), loop):.2e}; "
        f"vmap(grad) vs naive loop: {rel(v_vmap(model, data, batch, device, vmap_chunk=32), loop):.2e}; "
        f"ours minibatch_fisher vs Avalanche: "
        f"{rel(v_ours('minibatch_fisher')(model, data, batch, device), v_avalanche(model, data, batch, device)):.2e}")
    if "pcreg_base" in sys.modules:  # --ab-base: the two versions on the same data and model
        for m in AB_METHODS if model_name == "mlp" else AB_METHODS[:1]:
            log(f"check ({n} samples): ours {m} vs base {m}: rel diff "
                f"{rel(v_ours(m)(model, data, batch, device), v_base(m)(model, data, batch, device)):.2e}")
    if model_name == "mlp":
        k = min(16, n)
        sub = make_data(model_name, k, seed)
        log(f"check ({k} samples): ours expected_fisher vs per-sample per-class loop: rel diff "
            f"{rel(v_ours('expected_fisher')(model, sub, batch, device), expected_fisher_loop(model, sub, k)):.2e}")


def profile_pass(table, models, data, kw, device, log):
    from torch.profiler import ProfilerActivity, profile as tprofile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for k in ("avalanche EWCPlugin (minibatch)", "ours empirical_fisher"):
        if k not in table:
            continue
        with tprofile(activities=acts, profile_memory=device.type == "cpu") as prof:
            table[k](models[k], data, **kw)
        log(f"\n### torch.profiler: one pass of {k} ({len(data)} samples), sorted by {key}")
        log(prof.key_averages().table(sort_by=key, row_limit=16))


# ------------------------------------------------------------------------------------------ memory child
def child(args):
    device = resolve_device(args.device)
    apply_threads(args)
    name = args._child
    table = dict(variants(args), **{"training step": v_train_step})
    fn = table[name]
    data = make_data(args.model, args.n, args.seed)
    kw = dict(batch=args.batch, device=device, vmap_chunk=args.vmap_chunk, chunk=args.chunk)
    # warm-up on a throw-away copy and one batch: library initialisation is not the variant's memory
    warm = make_model(args.model, device, args.seed)
    fn(warm, data.subset(list(range(min(args.batch, len(data))))) if name != "training step" else data, **kw)
    del warm
    gc.collect()
    model = make_model(args.model, device, args.seed)
    sync(device)
    with PeakMemory(device) as pm:
        fn(model, data, **kw)
        sync(device)
    print("RESULT " + json.dumps({"variant": name, "peak_bytes": pm.peak}))


def measure_memory(name, args, model_name, n):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    # Fixed, low mmap threshold: large blocks are mmap'd and unmapped on free, so RSS follows live
    # tensors (the opposite of the parent's timing settings, which keep freed memory).
    env.update(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072", MALLOC_TOP_PAD_="0")
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", name, "--model", model_name, "--n", str(n),
           "--batch", str(args.batch), "--device", args.device, "--seed", str(args.seed)]
    if args.vmap_chunk:
        cmd += ["--vmap-chunk", str(args.vmap_chunk)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.chunk:
        cmd += ["--chunk", str(args.chunk)]
    cmd += ["--resnet-classes", str(args.resnet_classes)]
    if args.ab_base:
        cmd += ["--ab-base", args.ab_base]
    if args.ab_policy:
        cmd += ["--ab-policy", *args.ab_policy]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])["peak_bytes"]
    print(f"memory child for {name!r} failed (rc {r.returncode}):\n{r.stderr[-2000:]}")
    return float("nan")


# ------------------------------------------------------------------------------------------ peers
PEER_COLUMNS = ("ours", "backpack", "opacus", "nngeometry", "per-sample loop")
PEER_TITLES = {"ours": "ours", "backpack": "BackPACK", "opacus": "Opacus", "nngeometry": "nngeometry",
               "per-sample loop": "per-sample loop"}
MODEL_TITLES = {"mlp": "MLP 784-400-400-10", "resnet18": "ResNet-18 32×32",
                "resnet18-tv": "ResNet-18 (torchvision stem) 32×32"}
EST_TITLES = {"empirical_fisher": "empirical Fisher", "expected_fisher": "exact expected Fisher",
              "fisher": "sampled Fisher (1 label/sample)"}
# (model, estimator) -> (N, batch): sized so that one pass of the slowest variant takes seconds on one core
PEER_SIZES = {("mlp", "empirical_fisher"): (1024, 128), ("mlp", "expected_fisher"): (512, 128),
              ("mlp", "fisher"): (1024, 128), ("resnet18", "empirical_fisher"): (256, 32),
              ("resnet18", "expected_fisher"): (8, 8), ("resnet18", "fisher"): (256, 32),
              ("resnet18-tv", "empirical_fisher"): (256, 32), ("resnet18-tv", "expected_fisher"): (8, 8),
              ("resnet18-tv", "fisher"): (256, 32)}
PEERS_MD_BEGIN = "<!-- peer table: begin (generated by bench_importance.py --peers) -->"
PEERS_MD_END = "<!-- peer table: end -->"


def v_floor(model, data, batch, device, **_):
    """The floor: a plain minibatch forward + backward of the mean loss (no per-sample work)."""
    for x, y, _t in loader(data, batch):
        x, y = x.to(device), y.to(device)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return {}


def v_columns_only(model, data, batch, device, **_):
    """The exact expected Fisher's columns without the per-sample work: one forward, then C - 1
    backward passes to the output of the first layer with parameters (no weight gradients), a
    batch at a time. What any method that backpropagates the columns pays at least."""
    from avalanche_pcreg.importance.fisher import softmax_sqrt_hessian

    first = next(m for m in model.modules() if not list(m.children()) and list(m.parameters(recurse=False)))
    seen = {}
    handle = first.register_forward_hook(lambda mod, inp, out: seen.__setitem__("out", out))
    try:
        model.eval()
        for x, _y, _t in loader(data, batch):
            out = model(x.to(device))
            cot = softmax_sqrt_hessian(out)
            for k in range(cot.shape[0]):
                torch.autograd.grad(out, seen["out"], grad_outputs=cot[k], retain_graph=k < cot.shape[0] - 1)
    finally:
        handle.remove()
        model.train()
    return {}


def run_columns_bound(args, device, log=print):
    """Forward + the C - 1 column backward passes alone against the floor, interleaved rounds."""
    model_name = (args.models or ["resnet18"])[0]
    n = args.n or 8
    batch = args.batch_peers or n
    data = make_data(model_name, n, args.seed)
    models = {k: make_model(model_name, device, args.seed) for k in ("floor", "columns")}
    fns = {"floor": v_floor, "columns": v_columns_only}
    for k in fns:  # warm-up
        fns[k](models[k], data, batch, device)
    log(f"## {MODEL_TITLES[model_name]}: exact expected Fisher's columns alone, N = {n}, batch {batch}, "
        f"{args.rounds} rounds ({load_note('at start')})")
    times = interleaved_times(list(fns), lambda k: fns[k](models[k], data, batch, device), args.rounds, device, log)
    per = [f / c for f, c in zip(times["floor"], times["columns"])]
    log(f"forward + {MODELS[model_name]['classes'] - 1} column backward passes alone: "
        f"{statistics.median(per):#.3g}x the floor (rounds: {', '.join(f'{r:#.3g}' for r in per)})")


def _gemm_rate(device, clock) -> float:
    """Multiply-adds a second of one large float32 matrix product ([512, 4096] × [4096, 2304]),
    the median of 5: the unit of the convolution cost model."""
    a, b = torch.randn(512, 4096, device=device), torch.randn(4096, 2304, device=device)
    out = torch.zeros(512, 2304, device=device)
    times = []
    for _ in range(6):
        sync(device)
        t = clock()
        out.addmm_(a, b)
        sync(device)
        times.append(clock() - t)
    return 512 * 4096 * 2304 / statistics.median(times[1:])


def run_conv_layers(args, device, log=print):
    """Each distinct convolution of the models, on its own: Σ g² of its weight in the per-sample
    form (the policy's path) and in the position-Gram form, interleaved rounds, and the cost
    model's choice (``Policy.conv_sums_for``) with the ratio of its two costs. The Gram form is
    not timed where the model puts it above 20× the per-sample form (large maps: minutes a call).
    The per-sample form's time, in multiply-adds of a large product, less its products'
    multiply-adds, over the values it forms: the price of a value that ``Policy.value_macs``
    stands for."""
    from avalanche_pcreg.importance import Policy
    from avalanche_pcreg.importance.persample import PowerSum, Request
    from avalanche_pcreg.importance.persample.policy import conv_sums_costs
    from avalanche_pcreg.importance.rules import rule_for

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    batch = args.batch_peers or 32
    rounds = args.rounds or (1 if args.quick else 5)
    policy = Policy.for_device(device)
    rate = _gemm_rate(device, clock)
    log(f"large float32 matrix product: {rate / 1e9:.1f} G multiply-adds/s; batch {batch}, {rounds} rounds, "
        f"{'CPU' if args.clock == 'cpu' else 'wall'} time ({load_note('at start')})")
    prices = []
    for model_name in args.models or ["resnet18-tv", "resnet18"]:
        model = make_model(model_name, device, args.seed).eval()
        seen = {}

        def hook(mod, inp, out, name):
            key = (mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                   mod.groups, tuple(inp[0].shape[2:]))
            if key in seen:
                seen[key]["count"] += 1
            else:
                seen[key] = dict(name=name, module=mod, a=inp[0].detach(), out=tuple(out.shape), count=1)

        handles = [m.register_forward_hook(functools.partial(hook, name=n)) for n, m in model.named_modules()
                   if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d))]
        g = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            model(torch.randn((batch,) + MODELS[model_name]["input_shape"], generator=g).to(device))
        for h in handles:
            h.remove()
        rows = []
        totals = {"per_sample": 0.0, "gram": 0.0, "auto": 0.0, "best": 0.0}
        for layer in seen.values():
            m, a = layer["module"], layer["a"]
            d = torch.randn(layer["out"], generator=g).to(device)
            positions, width, cout = math.prod(layer["out"][2:]), m.weight[0].numel(), m.out_channels
            cost_ps, cost_gram = conv_sums_costs(batch, positions, width, cout, 1, policy.value_macs)
            forms = ("per_sample", "gram") if cost_gram <= 20 * cost_ps else ("per_sample",)
            reqs = {f: Request(PowerSum(2), frozenset({"weight"}), policy=policy.replace(conv_sums=f))
                    for f in forms}
            rule = rule_for(m)
            for req in reqs.values():  # warm-up
                rule.sums(m, a, d, req)
            times = interleaved_times(list(reqs), lambda f: rule.sums(m, a, d, reqs[f]), rounds, device,
                                      lambda *_: None, clock)
            t = {f: statistics.median(v) for f, v in times.items()}
            t.setdefault("gram", float("inf"))
            choice = policy.conv_sums_for(batch, positions, width, cout)
            macs = conv_sums_costs(batch, positions, width, cout, 1, 0)[0]
            price = (t["per_sample"] * rate - macs) / (batch * cout * width)
            prices.append((positions, price))
            count = layer["count"]
            for f in ("per_sample", "gram"):
                totals[f] += count * t[f]
            totals["auto"] += count * t[choice]
            totals["best"] += count * min(t.values())
            faster = min(t, key=t.get)
            rows.append([layer["name"], count, f"{'×'.join(map(str, layer['out'][2:]))}", cout, width,
                         f"{t['per_sample'] * 1e3:.2f}", f"{t['gram'] * 1e3:.2f}" if "gram" in reqs else "-",
                         f"{t['gram'] / t['per_sample']:.2f}" if "gram" in reqs else "-", f"{cost_gram / cost_ps:.2f}",
                         choice + ("" if choice == faster else " (slower)"), f"{price:.0f}"])
        log(f"\n## {MODEL_TITLES[model_name]}: each distinct convolution's Σ g², batch {batch}")
        print_table(["layer (first of its kind)", "layers", "output map", "C_out", "C_in/G·kernel",
                     "per-sample ms", "Gram ms", "Gram / per-sample", "model's Gram / per-sample", "policy's choice",
                     "price of a value (MACs)"],
                    rows)
        log("all layers, ms a batch: " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in totals.items()
                                                 if v != float("inf")))
    if not prices:
        log("no convolutions in these models")
        return
    small = [p for L, p in prices if L <= 16] or [p for _, p in prices]
    log(f"price of a value in the per-sample form, median over the layers: "
        f"{statistics.median(p for _, p in prices):.0f} multiply-adds; over those of at most 16 output positions "
        f"(where the two forms are close): {statistics.median(small):.0f} (Policy.value_macs = {policy.value_macs})")


def v_expected_loop(model, data, batch, device, **_):
    """The exact expected Fisher, one sample at a time: one forward, C backward passes."""

    def add(x, _y, params, sums):
        logp = torch.log_softmax(model(x), -1)[0]
        for c in range(logp.shape[0]):
            gs = torch.autograd.grad(-logp[c], params, retain_graph=c < logp.shape[0] - 1)
            pc = logp[c].detach().exp()
            for s, g in zip(sums, gs):
                s.add_(g.square().mul_(pc))

    return _per_sample_loop(model, data, batch, device, add)


def max_rel(a: dict, b: dict) -> tuple:
    """(max over the parameter tensors both hold of ||a - b|| / ||b||, how many were compared)."""
    keys = [k for k in b if k in a]
    worst = max(float((a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp_min(1e-300))
                for k in keys)
    return worst, len(keys)


def peer_variants(est):
    """column -> [(label, fn)] for one estimator: ours, installed peers, the per-sample loop."""
    import peers

    cols = {"ours": [("compute_importance", v_ours(est))]}
    for peer in ("backpack", "opacus", "nngeometry"):
        lst = peers.PEER_VARIANTS.get(est, {}).get(peer)
        if lst and peers.available(peer):
            cols[peer] = lst
    loop = {"empirical_fisher": v_naive_loop, "expected_fisher": v_expected_loop}.get(est)
    if loop is not None:
        cols["per-sample loop"] = [("batch-1 autograd", loop)]
    return cols


def run_peer_row(model_name, est, args, device, log):
    """One row of the peer table: every variant checked against ours, then timed interleaved."""
    n, batch = PEER_SIZES[(model_name, est)]
    n, batch = args.n or n, args.batch_peers or batch
    data = make_data(model_name, n, args.seed)
    log(f"\n## {MODEL_TITLES[model_name]}, {EST_TITLES[est]}: N = {n}, batch {batch}, {args.rounds} rounds "
        f"({load_note('at start of row')})")
    cols = peer_variants(est)
    fns = {"floor": v_floor}
    col_of = {"floor": "floor"}
    for col, lst in cols.items():
        for label, fn in lst:
            fns[f"{col}: {label}"] = fn
            col_of[f"{col}: {label}"] = col
    models = {k: make_model(model_name, device, args.seed) for k in fns}
    ours_key = next(k for k in fns if col_of[k] == "ours")
    # the check doubles as the warm-up: one full pass of each variant
    results, checks, failed = {}, {}, {}
    for k, fn in fns.items():
        try:
            results[k] = fn(models[k], data, batch, device)
        except Exception as e:  # a peer that does not support the model: reported, not timed
            failed[k] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            log(f"  {k}: FAILED, not timed ({failed[k]})")
    ref = results[ours_key]
    if est == "fisher":  # Monte Carlo: compare ours and the peers with the exact expected Fisher
        ref = v_ours("expected_fisher")(make_model(model_name, device, args.seed), data, batch, device)
        log("  (sampled Fisher: every variant is compared with ours expected_fisher; the difference is "
            "sampling noise, different draws give different figures)")
    P = len([p for p in models[ours_key].parameters()])
    for k, r in results.items():
        if k == "floor" or (k == ours_key and est != "fisher"):
            continue
        worst, cnt = max_rel(r, ref)
        checks[k] = (worst, cnt, P)
        log(f"  check {k}: max relative difference vs {'ours expected_fisher' if est == 'fisher' else 'ours'} "
            f"{worst:.2e} over {cnt}/{P} parameter tensors")
    names = [k for k in fns if k not in failed]
    times = interleaved_times(names, lambda k: fns[k](models[k], data, batch, device), args.rounds, device, log)
    out = {"n": n, "batch": batch, "load_end": os.getloadavg()[0], "floor": [n / t for t in times["floor"]],
           "variants": {}, "failed": failed}
    for k in names:
        if k == "floor":
            continue
        out["variants"][k] = dict(col=col_of[k], sps=[n / t for t in times[k]],
                                  ratio=ratios(times["floor"], times[k]), check=checks.get(k))
    def digits(xs):
        return 0 if min(xs) >= 100 else 2

    rows = [["floor (minibatch forward+backward, mean loss)", fmt_spread(out["floor"], 1.0, digits(out["floor"])),
             "1.000", "-"]]
    for k, v in out["variants"].items():
        rows.append([k, fmt_spread(v["sps"], 1.0, digits(v["sps"])),
                     fmt_spread(v["ratio"], 1.0, 3 if min(v["ratio"]) >= 0.01 else 4),
                     f"{v['check'][0]:.1e} ({v['check'][1]}/{v['check'][2]})" if v["check"] else "(reference)"])
    print_table(["variant", "samples/s median [min, max]", "throughput / floor [min, max]",
                 "max rel diff vs ours (tensors)"], rows)
    return out


def rate_txt(x: float) -> str:
    """samples/s with enough digits for slow variants (a ResNet-18 expected Fisher runs < 1/s)."""
    return f"{x:,.0f}" if x >= 100 else (f"{x:.1f}" if x >= 10 else f"{x:.2g}")


def ratio_txt(r: float) -> str:
    return f"{r:.2f}" if r >= 0.1 else f"{r:#.2g}"


def peers_markdown(results, args, device, started, load_start) -> str:
    """The peer table as Markdown: one figure per cell, its checks, the machine and the loads."""
    import avalanche
    import peers

    def cell(row, col):
        vs = [(k, v) for k, v in row["variants"].items() if v["col"] == col]
        failed = [k for k in row["failed"] if k.startswith(col + ":")]
        if not vs:
            return "failed" if failed else "–"
        parts = []
        for k, v in vs:
            label = k.split(": ", 1)[1]
            r = statistics.median(v["ratio"])
            sps = statistics.median(v["sps"])
            txt = f"{ratio_txt(r)}× ({rate_txt(sps)}/s)"
            if col in ("backpack",) and len(vs) > 1 or col == "opacus" and "passes" in label:
                txt = f"{label}: {txt}"
            parts.append(txt)
        return "<br>".join(parts)

    lines = []
    versions = ", ".join(f"{PEER_TITLES[p]} {peers.peer_version(p) or 'not installed'}"
                         for p in ("backpack", "opacus", "nngeometry"))
    lines.append(f"Throughput relative to the floor (a plain minibatch forward + backward of the mean loss "
                 f"over the same data), median over {args.rounds} interleaved rounds, with samples/s; "
                 f"device {device.type}, {torch.get_num_threads()} thread(s).")
    lines.append("")
    lines.append("| model, estimator | N, batch | floor samples/s | " +
                 " | ".join(PEER_TITLES[c] for c in PEER_COLUMNS) + " | load avg (1 min) at end of row |")
    lines.append("|---" * (len(PEER_COLUMNS) + 4) + "|")
    for (model_name, est), row in results.items():
        lines.append(f"| {MODEL_TITLES[model_name]}, {EST_TITLES[est]} | {row['n']}, {row['batch']} | "
                     f"{rate_txt(statistics.median(row['floor']))} | "
                     + " | ".join(cell(row, c) for c in PEER_COLUMNS) + f" | {row['load_end']:.2f} |")
    lines.append("")
    lines.append("Opacus keeps one forward's activations per backward, so its exact expected Fisher takes one "
                 "forward and one backward per class; it has no per-sample rule for BatchNorm, whose affine "
                 "parameters are frozen in its run (and left out of its check). BackPACK runs on ResNet-18 "
                 "through its torch.fx converter (`extend(model, use_converter=True)`).")
    lines.append("")
    lines.append("Checks (same work): max over parameter tensors of ‖peer − ours‖ / ‖ours‖ "
                 "(sampled Fisher: against ours `expected_fisher`, so the figure is sampling noise):")
    lines.append("")
    for (model_name, est), row in results.items():
        items = [f"{k} {v['check'][0]:.1e}" + (f" ({v['check'][1]}/{v['check'][2]} tensors)"
                                               if v['check'][1] != v['check'][2] else "")
                 for k, v in row["variants"].items() if v["check"]]
        items += [f"{k} failed ({msg})" for k, msg in row["failed"].items()]
        lines.append(f"- {MODEL_TITLES[model_name]}, {EST_TITLES[est]}: " + "; ".join(items))
    lines.append("")
    lines.append(f"Machine: CPU {cpu_model()}, {os.cpu_count()} logical cores"
                 + (f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
                 + f". Software: Python {platform.python_version()}, torch {torch.__version__}, avalanche-lib "
                 f"{avalanche.__version__}, {versions}. Load average (1/5/15 min) at start "
                 f"{' '.join(f'{x:.2f}' for x in load_start)}, at end "
                 f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; {time.time() - started:.0f} s.")
    lines.append("")
    lines.append("Command: `" + " ".join(["python", "benchmarks/bench_importance.py"] + sys.argv[1:]) + "`")
    return "\n".join(lines)


def write_between_markers(path: str, text: str) -> None:
    """Replace the block between the peer-table markers in ``path`` (appended when absent)."""
    block = f"{PEERS_MD_BEGIN}\n{text}\n{PEERS_MD_END}"
    old = open(path).read() if os.path.exists(path) else ""
    if PEERS_MD_BEGIN in old and PEERS_MD_END in old:
        head, rest = old.split(PEERS_MD_BEGIN, 1)
        tail = rest.split(PEERS_MD_END, 1)[1]
        new = head + block + tail
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + block + "\n"
    with open(path, "w") as f:
        f.write(new)
    print(f"peer table written to {path}")


def run_peers(args, device):
    import peers

    started, load_start = time.time(), os.getloadavg()
    for p in ("backpack", "opacus", "nngeometry"):
        v = peers.peer_version(p)
        print(f"{PEER_TITLES[p]}: {v}" if v else
              f"{PEER_TITLES[p]}: not installed, skipped (pip install {peers.PEERS[p]})")
    if args.rounds is None:
        args.rounds = 1 if args.quick else 5
    models = args.models or ["mlp", "resnet18"]
    ests = args.estimators or ["empirical_fisher", "expected_fisher"]
    results = {}
    for model_name in models:
        for est in ests:
            results[(model_name, est)] = run_peer_row(model_name, est, args, device, print)
    md = peers_markdown(results, args, device, started, load_start)
    print("\n" + md)
    if args.peers_md:
        write_between_markers(args.peers_md, md)


# ------------------------------------------------------------------------------------------ main
def run_model(model_name, args, device, log):
    n, batch = args.n, args.batch
    P = sum(p.numel() for p in make_model(model_name, "cpu", 0).parameters())
    log(f"\n## {model_name}: {P:,} parameters; N = {n} samples, batch {batch}, device {device}")
    checks(model_name, device, batch, args.seed, log, args.check_n)

    data = make_data(model_name, n, args.seed)
    table = {k: v for k, v in variants(args).items() if k in args.variants}
    models = {k: make_model(model_name, device, args.seed) for k in table}
    kw = dict(batch=batch, device=device, vmap_chunk=args.vmap_chunk, chunk=args.chunk)
    warm = data.subset(list(range(min(batch, n))))
    for k, fn in table.items():
        fn(models[k], warm, **kw)
    names = list(table)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = interleaved_times(names, lambda k: table[k](models[k], data, **kw), args.rounds, device, log, clock)

    mem = {}
    av = "avalanche EWCPlugin (minibatch)"
    if not args.no_memory:
        log("peak memory, one fresh subprocess per variant ...")
        mem_names = ["training step"] + names
        if args.quick:  # a smoke test: the reference and two variants
            mem_names = [k for k in mem_names if k in ("training step", av, "ours empirical_fisher")]
        for k in mem_names:
            mem[k] = measure_memory(k, args, model_name, n)

    av = "avalanche EWCPlugin (minibatch)"
    ref = args.reference or av

    def reference_of(k):  # --reference base: each variant against "base <its method>"
        if ref != "base":
            return ref
        method = k.split(",")[0].split(" ")[-1]
        return f"base {method}" if k.split(" ")[0] in ("ours", "base") else None

    rows = []
    for k in names:
        thr = [n / t for t in times[k]]
        r_k = reference_of(k)
        rat = ratios(thr, [n / t for t in times[r_k]]) if r_k in times else None
        rows.append([k, fmt_spread(times[k], 1.0, 3), fmt_spread(thr, 1.0, 0),
                     fmt_spread(rat, 1.0, 3) if rat else "-",
                     f"{mem[k] / MiB:.1f}" if k in mem else "-",
                     f"{mem[k] / mem['training step']:.2f}" if k in mem else "-"])
    if "training step" in mem:
        rows.append(["training step (reference)", "-", "-", "-", f"{mem['training step'] / MiB:.1f}", "1.00"])
    print()
    print_table(["variant", f"s/pass median [min, max]{' (CPU time)' if args.clock == 'cpu' else ''}",
                 "samples/s median [min, max]",
                 f"throughput / {'Avalanche' if ref == av else 'base <method>' if ref == 'base' else repr(ref)} "
                 "[min, max]", "peak mem growth MiB",
                 "peak / training step"], rows)

    if args.profile:
        profile_pass(table, models, data, kw, device, log)

    # targets
    C = MODELS[model_name]["classes"]
    if av in times:
        av_med = [n / t for t in times[av]]
        for m in ("empirical_fisher", "fisher"):
            k = f"ours {m}"
            if k in times:
                r = statistics.median(ratios([n / t for t in times[k]], av_med))
                print(f"target {k} >= 0.5x Avalanche throughput: {'MET' if r >= 0.5 else 'MISSED'} ({r:.2f}x)")
        k = "ours expected_fisher"
        if k in times:
            r = statistics.median(ratios(times[k], times[av]))
            print(f"target {k} time ~ C={C} minibatch passes: {r:.2f}x Avalanche's pass time "
                  f"({r / C:.2f} C); {'MET' if r <= C else 'MISSED'} (criterion: <= C)")
    if "training step" in mem:
        for k in names:
            if k.startswith("ours") and k in mem:
                r = mem[k] / mem["training step"]
                print(f"target {k} peak <= 2x training step: {'MET' if r <= 2 else 'MISSED'} ({r:.2f}x)")


def main():
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=None, help="samples in the pass (default 2048 MLP)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--vmap-chunk", type=int, default=None)
    p.add_argument("--chunk", type=int, default=None, help="our chunk_size (default: the library's, 16 samples on the CPU, 256 on a GPU)")
    p.add_argument("--profile", action="store_true", help="torch.profiler of one pass of ours empirical_fisher "
                   "and of Avalanche's pass")
    p.add_argument("--variants", nargs="+", default=None, help="subset of variant names")
    p.add_argument("--ab-policy", nargs="+", default=None, metavar="FIELD=VALUE",
                   help="variants 'ours <method>, FIELD=VALUE' (empirical and expected Fisher) with the device's "
                        "policy changed in that field, e.g. gram_fold=1 column_accumulators=False")
    p.add_argument("--reference", default=None, metavar="VARIANT",
                   help="the variant of the throughput-ratio column, taken within each round (default: Avalanche's; "
                        "'base': each variant against 'base <its method>' of --ab-base)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="time passes by wall clock (default) or by this process's CPU time (steadier on a "
                        "shared machine at 1 thread)")
    p.add_argument("--ab-base", default=None, metavar="PATH",
                   help="variants 'base <method>': the avalanche_pcreg package of the checkout at PATH, run "
                        "interleaved with this one (e.g. a git worktree of the previous commit)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--check-n", type=int, default=None,
                   help="samples of the correctness checks before timing (default 256 MLP, 32 ResNet-18)")
    p.add_argument("--_child", default=None, help=argparse_hidden())
    p.add_argument("--model", default="mlp")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None,
                   help="models to run (default: mlp; mlp resnet18 with --resnet or --device cuda; "
                        "with --peers: mlp resnet18)")
    p.add_argument("--peers", action="store_true",
                   help="the peer table instead: ours against BackPACK, Opacus and nngeometry (those installed) "
                        "and a per-sample loop, as throughput relative to a minibatch forward+backward; "
                        "1 thread unless --threads is given")
    p.add_argument("--estimators", nargs="+", choices=sorted(EST_TITLES), default=None,
                   help="rows of the peer table (default: empirical_fisher expected_fisher)")
    p.add_argument("--batch-peers", type=int, default=None, help="batch size of the peer table (default per row)")
    p.add_argument("--columns-bound", action="store_true",
                   help="time one forward + the exact expected Fisher's C - 1 column backward passes alone (no "
                        "per-sample work) against the floor; --models (default resnet18), --n (default 8); "
                        "1 thread unless --threads is given")
    p.add_argument("--conv-layers", action="store_true",
                   help="time each distinct convolution of --models (default resnet18-tv resnet18) on its own: "
                        "Σ g² in the per-sample and the position-Gram form, and the policy's choice; batch "
                        "--batch-peers (default 32); 1 thread unless --threads is given")
    p.add_argument("--resnet-classes", type=_classes, default=100, metavar="C",
                   help="classes of the ResNet-18 (default 100); the exact expected Fisher backpropagates "
                        "C - 1 columns")
    p.add_argument("--peers-md", default=None, metavar="FILE",
                   help="write the peer table into FILE (e.g. benchmarks/RESULTS.md), between its markers")
    args = p.parse_args()
    for text in args.ab_policy or ():
        try:
            parse_policy_change(text)
        except Exception as err:  # noqa: BLE001 - argparse's own error message
            p.error(f"--ab-policy {text}: {err}")
    set_resnet_classes(args.resnet_classes)
    if args._child:
        return child(args)
    if args.device == "cpu":
        ensure_malloc_env()
    device = resolve_device(args.device)
    one_thread = args.peers or args.columns_bound or args.conv_layers
    if one_thread and args.threads is None and device.type == "cpu":
        args.threads = 1
    apply_threads(args)
    print(machine_info(device))
    if args.peers:
        run_peers(args, device)
        print(load_note("at end"))
        return
    if args.conv_layers:
        run_conv_layers(args, device)
        print(load_note("at end"))
        return
    if args.columns_bound:
        args.rounds = args.rounds or (1 if args.quick else 3)
        run_columns_bound(args, device)
        print(load_note("at end"))
        return
    models = args.models or (["mlp"] + (["resnet18"] if (args.resnet or device.type == "cuda") else []))
    for model_name in models:
        a = copy.copy(args)
        cpu_resnet = model_name in RESNETS and device.type == "cpu"
        if a.n is None:
            a.n = (256 if args.quick else 2048) if model_name == "mlp" else (128 if (args.quick or cpu_resnet) else 512)
        if a.rounds is None:
            a.rounds = 2 if args.quick else (2 if cpu_resnet else 5)
        if model_name in RESNETS and a.vmap_chunk is None:
            a.vmap_chunk = 32
        all_names = list(variants(a))
        if a.variants is None:
            # ResNet-18 on the CPU: the expected Fisher is 100 backward passes a batch; leave it to the GPU run
            a.variants = [k for k in all_names if not (cpu_resnet and k == "ours expected_fisher")
                          and not ((device.type == "cpu" or model_name == "mlp") and k in GPU_ONLY)]
        run_model(model_name, a, device, print)
    print(load_note("at end"))


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
