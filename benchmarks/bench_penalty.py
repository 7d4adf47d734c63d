"""Cost of one training step with the penalty, next to a naive step and Avalanche's EWCPlugin.

A step is: zero_grad, forward, cross-entropy, (+ penalty through the plugin's ``before_backward``),
backward, ``optimizer.step`` (SGD, momentum 0.9).

Variants (each with its own copy of the model and optimizer, all timed interleaved):

* ``naive``: no penalty;
* ``avalanche``: Avalanche 0.6 ``EWCPlugin`` (its real ``before_backward``), separate mode with
  T stored experiences (``saved_params[t]``/``importances[t]`` filled with ``ParamData``), and
  online mode;
* ``ours-compiled`` / ``ours-forloop`` / ``ours-foreach``: ``ParameterChangePlugin`` (one per
  ``impl``) whose state holds T consolidations of the same importances and anchors (separate), and
  online mode.

Also times the penalty alone (``before_backward`` on a zero loss + its backward), and checks
that our penalty value and gradient equal Avalanche's at T=5.

``--candidates`` times, in one interleaved run at one T, the kernels that were candidates for the
penalty step (the kept ones, the previous one and some that were not kept: flat buffers for A
and mu, a value-only forward with the gradient made in the backward) next to a floor: a penalty
whose forward is one ``addcmul`` pass per parameter and computes no value.

    python benchmarks/bench_penalty.py                    # CPU, MLP 784-400-400-10 (~1.5 min on 2 idle cores)
    python benchmarks/bench_penalty.py --quick            # smoke test
    python benchmarks/bench_penalty.py --device cuda      # MLP + ResNet-18 (3x3 stem), 100 classes
    python benchmarks/bench_penalty.py --resnet           # CPU with ResNet-18 as well (slow)
    python benchmarks/bench_penalty.py --profile          # + torch.profiler of ours at the largest T
    python benchmarks/bench_penalty.py --threads 1 --candidates --T 20   # the kernels' A/B table
    python benchmarks/bench_penalty.py --threads 1 --T 1 20 --impls compiled --ab-base ../previous   # against another checkout
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (apply_threads, ensure_malloc_env, load_base, load_note, HERE, base_parser, fake_strategy, fmt_spread, interleaved, machine_info, make_batch,  # noqa: E402
                    med_spread, print_table, ratios, resolve_device, save_figure, MODELS)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from avalanche.training.plugins import EWCPlugin  # noqa: E402
from avalanche.training.utils import ParamData  # noqa: E402

from avalanche_pcreg import ParameterChangePlugin  # noqa: E402
from avalanche_pcreg import penalty as penalty_mod  # noqa: E402
from avalanche_pcreg.selection import named_parameters  # noqa: E402

IMPLS = ("compiled", "forloop", "foreach")

FACTOR = 1.0
DECAY = 0.9
LR = 0.01
BATCH = 128
TARGET = 1.2
TARGET_FUSED = 1.05  # the fused kernel, CPU, 1 thread (RESULTS.md section 1e)
DEFAULT_CPU_IMPL = "compiled"
DEVICE_NOTE = ""


def make_pool(model, T, device, seed):
    """T (importance, anchor) pairs per parameter: random positive F, perturbed theta."""
    g = torch.Generator().manual_seed(seed + 1)
    pool = []
    for _ in range(T):
        imps, anchors = {}, {}
        for name, p in model.named_parameters():
            imps[name] = (torch.rand(p.shape, generator=g) + 0.01).to(device)
            anchors[name] = (p.detach().cpu() + 0.01 * torch.randn(p.shape, generator=g)).to(device)
        pool.append((imps, anchors))
    return pool


def avalanche_plugin(pool, T, device, online=False):
    if online:
        plugin = EWCPlugin(FACTOR, mode="online", decay_factor=DECAY)
        slots = [T - 1]  # online mode reads the last experience's entry only
    else:
        plugin = EWCPlugin(FACTOR, mode="separate")
        slots = range(T)
    for t in slots:
        imps, anchors = pool[t]
        plugin.importances[t] = {k: ParamData(f"imp_{k}", init_tensor=v, device=device) for k, v in imps.items()}
        plugin.saved_params[t] = {k: ParamData(f"{k}", init_tensor=v, device=device) for k, v in anchors.items()}
    return plugin


def our_plugin(pool, T, impl, online=False, plugin_cls=ParameterChangePlugin):
    mode = "online" if online else "separate"
    plugin = plugin_cls(FACTOR, importance="uniform", mode=mode, decay=DECAY if online else None,
                                   impl=impl)
    for t in range(T):
        imps, anchors = pool[t]
        plugin._state = plugin._state.consolidated(imps, anchors)
    return plugin


class Runner:
    """One variant: its own model copy, optimizer, and (optionally) plugin."""

    def __init__(self, base_model, x, y, device, plugin=None, exp_counter=0):
        self.model = copy.deepcopy(base_model)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=0.9)
        self.x, self.y, self.device = x, y, device
        self.plugin = plugin
        self.fake = fake_strategy(self.model, device, exp_counter)

    def step(self):
        self.opt.zero_grad()
        loss = F.cross_entropy(self.model(self.x), self.y)
        if self.plugin is not None:
            self.fake.loss = loss
            self.plugin.before_backward(self.fake)
            loss = self.fake.loss
        loss.backward()
        self.opt.step()
        return loss

    def penalty_only(self):
        self.model.zero_grad(set_to_none=True)
        self.fake.loss = torch.zeros((), device=self.device)
        self.plugin.before_backward(self.fake)
        self.fake.loss.backward()


# ---------------------------------------------------------------------------------------- candidates
# Kernels that were candidates for the penalty step, next to the kept ones (``ours-<impl>``). Each
# is a stand-in for the plugin's ``before_backward``: it adds its penalty of the same state to the
# loss. Those not kept live here only, to be re-measured.

class _PreviousPenalty(torch.autograd.Function):
    """The kernel before the fused ones: sub, mul, dot per parameter in the forward, saving
    ``A * (theta - mu)``; a mul per parameter in the backward."""

    @staticmethod
    def forward(ctx, factor, const, weights, anchors, *params):
        with torch.no_grad():
            wdiffs, dots = [], []
            for p, w, a in zip(params, weights, anchors):
                d = p - a
                wd = d * w
                wdiffs.append(wd)
                dots.append(torch.dot(wd.reshape(-1), d.reshape(-1)))
            value = dots[0] if len(dots) == 1 else torch.stack(dots).sum()
            value = (value + const) * factor
        ctx.factor = factor
        ctx.save_for_backward(*wdiffs)
        return value

    @staticmethod
    def backward(ctx, grad_out):
        scale = grad_out * (2.0 * ctx.factor)
        return (None, None, None, None, *[wd * scale for wd in ctx.saved_tensors])


class _ValueFirst(torch.autograd.Function):
    """Value-only forward (compiled: 3 passes, nothing saved but the inputs); the gradient
    ``2 f A (theta - mu)`` made in the backward by a compiled kernel (4 passes)."""

    @staticmethod
    def forward(ctx, factor, const, weights, anchors, *params):
        two_f = penalty_mod._scalar(2.0 * factor, weights[0].dtype, weights[0].device)
        v = _compiled_value()(list(params), list(weights), list(anchors), two_f)
        ctx.factor, ctx.weights, ctx.anchors, ctx.two_f = factor, weights, anchors, two_f
        ctx.save_for_backward(*params)
        return v + const

    @staticmethod
    def backward(ctx, grad_out):
        grads = _compiled_grad()(list(ctx.saved_tensors), list(ctx.weights), list(ctx.anchors), ctx.two_f * grad_out)
        return (None, None, None, None, *grads)


def _value_body(params, weights, anchors, two_f):
    return torch.stack([(w * (p - a) ** 2).sum() for p, w, a in zip(params, weights, anchors)]).sum() * (two_f * 0.5)


def _grad_body(params, weights, anchors, scale):
    return [w * (p - a) * scale for p, w, a in zip(params, weights, anchors)]


def _flat_body(params, A_flat, mu_flat, offsets, two_f, const):
    """The fused body with A and mu read from one flat buffer each (views per parameter)."""
    grads, parts = [], []
    for p, (o, n) in zip(params, offsets):
        d = p - mu_flat[o:o + n].view(p.shape)
        g = A_flat[o:o + n].view(p.shape) * d * two_f
        grads.append(g)
        parts.append((g.reshape(-1) * d.reshape(-1)).sum())
    return const + torch.stack(parts).sum() * 0.5, grads


_COMPILED_CANDIDATES = {}


def _compiled_value():
    return _COMPILED_CANDIDATES.setdefault("value", torch.compile(_value_body, fullgraph=True))


def _compiled_grad():
    return _COMPILED_CANDIDATES.setdefault("grad", torch.compile(_grad_body, fullgraph=True))


def _dynamo_kernel(params, weights, anchors, factor, const):
    """The kept fused body, through ``torch.compile`` (Dynamo guards on every call) instead of
    the library's direct Inductor kernel."""
    fn = _COMPILED_CANDIDATES.setdefault("dynamo", torch.compile(penalty_mod._fused_body, fullgraph=True))
    two_f = penalty_mod._scalar(2.0 * factor, weights[0].dtype, weights[0].device)
    v, grads = fn(list(params), list(weights), list(anchors), two_f, const)
    return v, grads, 1.0


def _flat_kernel(layout):
    """A kernel for ``penalty._KERNELS`` reading A and mu from flat buffers (``layout``: the
    buffers and each parameter's (offset, numel)), compiled by Inductor like the kept one."""
    from torch._inductor import compile as inductor_compile
    from torch.fx.experimental.proxy_tensor import make_fx

    A_flat, mu_flat, offsets = layout
    n = len(offsets)
    state = {}

    def flat(*args):
        v, grads = _flat_body(args[:n], args[n], args[n + 1], offsets, args[n + 2], args[n + 3])
        return [v, *grads]

    def kernel(params, weights, anchors, factor, const):
        two_f = penalty_mod._scalar(2.0 * factor, A_flat.dtype, A_flat.device)
        if "fn" not in state:
            example = [p.detach() for p in params] + [A_flat, mu_flat, two_f, const]
            with torch.no_grad():
                state["fn"] = inductor_compile(make_fx(flat)(*example), example)
        out = state["fn"](*params, A_flat, mu_flat, two_f, const)
        return out[0], list(out[1:]), 1.0
    return kernel


class _Floor(torch.autograd.Function):
    """Not a penalty: the least an autograd-visible term with a gradient can cost. One pass per
    parameter writes a fresh gradient-sized tensor from theta, mu and A (``addcmul``, 4 memory
    passes), no value is computed, the backward hands the tensor out; autograd then adds it to the
    loss's gradient (3 passes), as for every candidate."""

    @staticmethod
    def forward(ctx, weights, anchors, *params):
        ctx.grads = [torch.addcmul(a, w, p) for p, w, a in zip(params, weights, anchors)]
        return params[0].new_zeros(())

    @staticmethod
    def backward(ctx, grad_out):
        grads, ctx.grads = ctx.grads, None
        return (None, None, *grads)


class CandidatePlugin:
    """``before_backward`` of one candidate over the state of ``plugin`` (a ParameterChangePlugin):
    the penalty added to the loss, without the plugin's per-step bookkeeping (the epoch's penalty
    log, the finiteness check), which the ``ours-*`` rows include."""

    def __init__(self, name, plugin):
        self.name, self.plugin, self.state = name, plugin, plugin._state
        self._layout = None

    def _lists(self, model):
        bound = self.state.bind(model)
        return bound.parameters(), bound.weights, bound.anchors, bound

    def before_backward(self, strategy):
        state, f = self.state, FACTOR
        if self.name == "previous":  # as before: the name matching and the lists every step
            params = named_parameters(strategy.model)
            thetas, weights, anchors = state._matched(params)
            const = state._const_on(thetas[0].device, thetas[0].dtype, 1.0)
            pen = _PreviousPenalty.apply(f, const, tuple(weights), tuple(anchors), *thetas)
        elif self.name == "value-first":
            thetas, weights, anchors, bound = self._lists(strategy.model)
            const = state._const_on(thetas[0].device, thetas[0].dtype, f)
            pen = _ValueFirst.apply(f, const, weights, anchors, *thetas)
        elif self.name in ("compiled", "forloop"):  # the kept kernels, without the plugin's bookkeeping
            pen = state.bind(strategy.model)(f, impl=self.name)
        elif self.name == "torch.compile":
            thetas, weights, anchors, bound = self._lists(strategy.model)
            penalty_mod._KERNELS["torch.compile"] = _dynamo_kernel
            const = state._const_on(thetas[0].device, thetas[0].dtype, f)
            pen = penalty_mod.apply_penalty(thetas, weights, anchors, f, const, "torch.compile")
        elif self.name == "flat-compiled":
            thetas, weights, anchors, bound = self._lists(strategy.model)
            if self._layout is None:
                offsets, o = [], 0
                for w in weights:
                    offsets.append((o, w.numel()))
                    o += w.numel()
                A_flat = torch.cat([w.reshape(-1) for w in weights])
                mu_flat = torch.cat([a.reshape(-1) for a in anchors])
                self._layout = (A_flat, mu_flat, tuple(offsets))
                penalty_mod._KERNELS["flat-compiled"] = _flat_kernel(self._layout)
            const = state._const_on(thetas[0].device, thetas[0].dtype, f)
            pen = penalty_mod.apply_penalty(thetas, weights, anchors, f, const, "flat-compiled")
        elif self.name == "floor":
            thetas, weights, anchors, bound = self._lists(strategy.model)
            pen = _Floor.apply(weights, anchors, *thetas)
        else:
            raise ValueError(self.name)
        strategy.loss += pen

    def parameters_note(self):
        return ""


CANDIDATES = ("previous", "forloop", "compiled", "torch.compile", "flat-compiled", "value-first", "floor")


def candidate_plugin(name, plugin):
    return CandidatePlugin(name, plugin)


def memory_floor(model, device, args, naive_ms, log):
    """What the memory traffic alone costs: one pass that reads three parameter-sized tensors and
    writes one (the fused forward: theta, mu, A in, the gradient out), and one that reads two and
    writes one (autograd adding the penalty's gradient to the loss's), over the model's shapes."""
    params = [p.detach() for p in model.parameters()]
    n = sum(p.numel() for p in params)
    A = [torch.rand_like(p) for p in params]
    mu = [p + 0.01 for p in params]
    out = [torch.empty_like(p) for p in params]
    parts = {"read 3, write 1 (addcmul, out=)":
             lambda: [torch.addcmul(a, w, p, out=o) for p, w, a, o in zip(params, A, mu, out)],
             "read 2, write 1 (add, out=)": lambda: [torch.add(p, a, out=o) for p, a, o in zip(params, mu, out)]}
    res = interleaved(parts, device, rounds=args.rounds, steps=max(args.steps, 50), block=args.block,
                      warmup=args.warmup, log=None)
    ms = {k: statistics.median(v["wall"]) * 1e3 for k, v in res.items()}
    rows = []
    for k, t in ms.items():
        passes = 4 if k.startswith("read 3") else 3
        rows.append([k, f"{t:.3f}", f"{passes * n * params[0].element_size() / (t * 1e-3) / 1e9:.1f}"])
    floor_ms = sum(ms.values())
    rows.append(["both: the least a penalty term with its gradient moves (7 passes)", f"{floor_ms:.3f}",
                 f"{floor_ms / naive_ms:.3f} of the naive step"])
    log(f"\nmemory floor over the model's {n:,} parameters (median of {args.rounds} rounds)")
    print_table(["pass", "ms", "GB/s"], rows)


def run_candidates(base, x, y, device, pool, T, args, log):
    """The A/B table: every candidate and kept kernel at one T, interleaved in one run."""
    runners = {"naive": Runner(base, x, y, device)}
    for impl in IMPLS:
        runners[f"ours-{impl}"] = Runner(base, x, y, device, our_plugin(pool, T, impl), T)
    for c in CANDIDATES:
        runners[f"cand-{c}"] = Runner(base, x, y, device, candidate_plugin(c, our_plugin(pool, T, "forloop")), T)
    runners[f"avalanche T={T}"] = Runner(base, x, y, device, avalanche_plugin(pool, T, device), T)
    for r in runners.values():  # compile before timing
        r.step()
    log(f"timing {len(runners)} candidates at T={T}: {args.rounds} rounds x up to {args.steps} steps, interleaved ...")
    t0 = time.time()
    steps = interleaved({k: r.step for k, r in runners.items()}, device, rounds=args.rounds, steps=args.steps,
                        block=args.block, warmup=args.warmup, budget_s=args.budget, min_steps=args.min_steps, log=log)
    log(f"  ({time.time() - t0:.0f} s)")
    pens = interleaved({k: r.penalty_only for k, r in runners.items() if r.plugin is not None}, device,
                       rounds=args.rounds, steps=args.steps, block=args.block, warmup=args.warmup,
                       budget_s=args.budget / 2, min_steps=args.min_steps, log=None)
    metrics = ["wall"] + (["cpu"] if device.type == "cpu" else [])
    rows = []
    naive_ms = statistics.median(steps["naive"]["wall"]) * 1e3
    for k, ts in steps.items():
        rat = ratios(ts["wall"], steps["naive"]["wall"])
        extra = [(a - b) * 1e3 for a, b in zip(ts["wall"], steps["naive"]["wall"])]
        row = [k, fmt_spread(ts["wall"], 1e3, 3), fmt_spread(rat, 1, 3), fmt_spread(extra, 1, 3)]
        if "cpu" in metrics:
            row.append(fmt_spread(ratios(ts["cpu"], steps["naive"]["cpu"]), 1, 3))
        row.append(fmt_spread(pens[k]["wall"], 1e3, 3) if k in pens else "-")
        rows.append(row)
    header = ["variant", "wall ms/step", "wall ratio to naive", "added ms/step (wall)"]
    header += ["CPU-time ratio"] if "cpu" in metrics else []
    header += ["penalty alone, wall ms"]
    print(f"\ncandidates, T={T}, {device.type}, {torch.get_num_threads()} threads: median [min, max] over "
          f"{args.rounds} rounds of the per-round median; naive step {naive_ms:.3f} ms")
    table = print_table(header, rows)
    memory_floor(runners["naive"].model, device, args, naive_ms, log)
    summary = {m: {k: med_spread(ratios(v[m], steps["naive"][m]))[0] for k, v in steps.items()} for m in metrics}
    return table, summary, runners


def check_value(base_model, pool, device, T=5, candidates=False):
    """Penalty value and gradient at T stored experiences (same F, theta*): Avalanche, ours, and a
    float64 reference straight from the definition ``factor * sum_t sum F_t (theta - theta*_t)**2``."""
    g = torch.Generator().manual_seed(123)
    moved = copy.deepcopy(base_model)
    with torch.no_grad():  # move away from the anchors so that the gradient is not tiny
        for p in moved.parameters():
            p.add_((0.05 * torch.randn(p.shape, generator=g)).to(device))
    out = {}
    plugins = [("avalanche", avalanche_plugin(pool, T, device))]
    plugins += [(f"ours-{impl}", our_plugin(pool, T, impl)) for impl in IMPLS]
    if candidates:
        plugins += [(f"cand-{c}", candidate_plugin(c, our_plugin(pool, T, "forloop"))) for c in CANDIDATES]
    for name, plugin in plugins:
        model = copy.deepcopy(moved)
        fake = fake_strategy(model, device, T, loss=torch.zeros((), device=device))
        plugin.before_backward(fake)
        fake.loss.backward()
        grads = torch.cat([p.grad.reshape(-1).double().cpu() for p in model.parameters()])
        out[name] = (fake.loss.detach().double().item(), grads)
    value, grads = 0.0, []
    for name, p in moved.named_parameters():
        th = p.detach().double().cpu()
        gsum = torch.zeros_like(th)
        for t in range(T):
            F_, a = pool[t][0][name].double().cpu(), pool[t][1][name].double().cpu()
            value += (F_ * (th - a) ** 2).sum().item()
            gsum += 2 * F_ * (th - a)
        grads.append(gsum.reshape(-1) * FACTOR)
    out["float64 reference"] = (FACTOR * value, torch.cat(grads))
    return out


def run_model(model_name, args, device, Ts, log):
    base = MODELS[model_name]["make"](seed=args.seed).to(device)
    base.train()
    x, y = make_batch(model_name, BATCH, device, seed=args.seed)
    nparams = sum(p.numel() for p in base.parameters())
    log(f"\n## {model_name}: {nparams:,} parameters, batch {BATCH}, device {device}")
    Tmax = max(Ts)
    pool = make_pool(base, Tmax, device, args.seed)

    # -- correctness at T=5 (or the largest T in a quick run)
    Tc = 5 if Tmax >= 5 else Tmax
    torch.manual_seed(123)
    vals = check_value(base, pool, device, Tc, candidates=args.candidates)
    av_val, av_grad = vals["avalanche"]
    ref_val, ref_grad = vals["float64 reference"]
    for name in [k for k in vals if k.startswith(("ours", "cand"))] + ["avalanche"]:
        v, gr = vals[name]
        rel = abs(v - av_val) / abs(av_val)
        grel = ((gr - av_grad).norm() / av_grad.norm()).item()
        rrel = abs(v - ref_val) / abs(ref_val)
        rgrel = ((gr - ref_grad).norm() / ref_grad.norm()).item()
        if name.startswith("cand-") and not args.candidates:
            continue
        log(f"value check T={Tc}: {name:20s} penalty {v:.9g} (Avalanche {av_val:.9g}): rel diff vs Avalanche "
            f"{rel:.2e}, vs float64 {rrel:.2e}; gradient rel diff vs Avalanche {grel:.2e}, vs float64 {rgrel:.2e}")

    # -- variants
    if args.candidates:
        return run_candidates(base, x, y, device, pool, Tmax, args, log)
    runners = {"naive": Runner(base, x, y, device)}
    for T in Ts:
        runners[f"avalanche T={T}"] = Runner(base, x, y, device, avalanche_plugin(pool, T, device), T)
    runners["avalanche online"] = Runner(base, x, y, device, avalanche_plugin(pool, Tmax, device, online=True), Tmax)
    plugins = {"ours": ParameterChangePlugin}
    if args.ab_base:  # the previous version's plugin on the same model, state and batch
        plugins["base"] = load_base(args.ab_base).ParameterChangePlugin
    for who, cls in plugins.items():
        for impl in (args.impls or IMPLS):
            for T in Ts:
                runners[f"{who}-{impl} T={T}"] = Runner(base, x, y, device, our_plugin(pool, T, impl, plugin_cls=cls), T)
            runners[f"{who}-{impl} online"] = Runner(base, x, y, device,
                                                     our_plugin(pool, Tmax, impl, online=True, plugin_cls=cls), Tmax)
    del pool

    log(f"timing {len(runners)} step variants: {args.rounds} rounds x up to {args.steps} steps, interleaved ...")
    t0 = time.time()
    steps = interleaved({k: r.step for k, r in runners.items()}, device, rounds=args.rounds, steps=args.steps,
                        block=args.block, warmup=args.warmup, budget_s=args.budget, min_steps=args.min_steps, log=log)
    log(f"  ({time.time() - t0:.0f} s)")
    pen_variants = {k: r.penalty_only for k, r in runners.items() if r.plugin is not None}
    log(f"timing penalty only ({len(pen_variants)} variants) ...")
    t0 = time.time()
    pens = interleaved(pen_variants, device, rounds=args.rounds, steps=args.steps, block=args.block,
                       warmup=args.warmup, budget_s=args.budget / 2, min_steps=args.min_steps, log=log)
    log(f"  ({time.time() - t0:.0f} s)")
    for k, r in runners.items():  # the runs stayed finite
        if not torch.isfinite(r.step()).item():
            log(f"WARNING: {k} diverged (loss not finite); its timings may be off")

    metrics = ["wall"] + (["cpu"] if device.type == "cpu" else [])
    rows, summary = [], {m: {} for m in metrics}
    for k, ts in steps.items():
        variant, _, T = k.partition(" ")
        T = T.replace("T=", "") if T else "-"
        if T == "online":
            variant, T = variant + " online", f"{Tmax}"
        row = [variant, T]
        for m in metrics:
            rat = ratios(ts[m], steps["naive"][m])
            row += [fmt_spread(ts[m], 1e3, 2), fmt_spread(rat, 1, 3)]
            summary[m][k] = med_spread(rat)[0]
        for m in metrics:
            row.append(fmt_spread(pens[k][m], 1e3, 2) if k in pens else "-")
        row.append(f"{statistics.median(ratios(pens[k][metrics[-1]], steps['naive'][metrics[-1]])):.3f}"
                   if k in pens else "-")
        rows.append(row)
    header = ["variant", "T"]
    for m in metrics:
        header += [f"{m} ms/step", f"{m} ratio to naive"]
    header += [f"penalty-only {m} ms" for m in metrics] + [f"penalty-only / naive step ({metrics[-1]})"]
    print(f"\n{model_name}, {device.type}: median [min, max] over {args.rounds} rounds of the per-round median; "
          "ratios are taken within each round" + ("; cpu = process CPU time (all threads)" if "cpu" in metrics else ""))
    table = print_table(header, rows)
    for k in [k for k in steps if k.startswith("base-")]:  # --ab-base: ours over the previous version, per round
        ours = "ours-" + k[len("base-"):]
        print(f"A/B {ours} / {k} ({metrics[-1]} time, per-round ratios): "
              f"{fmt_spread(ratios(steps[ours][metrics[-1]], steps[k][metrics[-1]]), 1, 3)}")
    return table, summary, runners


def profile(runners, T, device, args, log=print):
    """Where our penalty's cost goes: an interleaved breakdown, then torch.profiler op tables."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    naive = runners["naive"]
    params = [p for p in naive.model.parameters()]
    for p in params:  # every variant below accumulates into existing gradients, as in a step
        p.grad = torch.zeros_like(p)

    parts = {"naive step": naive.step}
    for impl in IMPLS:
        r = runners[f"ours-{impl} T={T}"]
        mparams = dict(r.model.named_parameters())
        for p in mparams.values():
            p.grad = torch.zeros_like(p)

        def fwd(r=r, mparams=mparams, impl=impl):
            with torch.no_grad():
                r.plugin._state.penalty(r.model, FACTOR, impl=impl)

        def fwd_bwd(r=r, mparams=mparams, impl=impl):
            r.plugin._state.penalty(r.model, FACTOR, impl=impl).backward()

        def plugin_fwd_bwd(r=r):
            r.fake.loss = torch.zeros((), device=device)
            r.plugin.before_backward(r.fake)
            r.fake.loss.backward()

        parts[f"{impl}: penalty forward only (no_grad)"] = fwd
        parts[f"{impl}: penalty forward + backward (accumulate into .grad)"] = fwd_bwd
        parts[f"{impl}: plugin.before_backward + backward"] = plugin_fwd_bwd
        parts[f"{impl}: full step"] = r.step
    grads = [p.grad for p in params]
    parts["floor: one pass, p.grad.add_(p) over all params"] = lambda: [g.add_(p.detach()) for g, p in zip(grads, params)]
    parts["floor: one fused-like pass, g.addcmul_(p, p)"] = lambda: [g.addcmul_(p.detach(), p.detach())
                                                                     for g, p in zip(grads, params)]
    res = interleaved(parts, device, rounds=args.rounds, steps=max(args.steps, 50), block=args.block,
                      warmup=args.warmup, log=None)
    metrics = ["wall"] + (["cpu"] if device.type == "cpu" else [])
    rows = []
    for k, v in res.items():
        rows.append([k] + [fmt_spread(v[m], 1e3, 3) for m in metrics]
                    + [f"{statistics.median(ratios(v[metrics[-1]], res['naive step'][metrics[-1]])):.3f}"])
    log(f"\n### breakdown at T={T} ({torch.get_num_threads()} threads): median [min, max] over {args.rounds} rounds")
    print_table(["part"] + [f"{m} ms" for m in metrics] + [f"/ naive step ({metrics[-1]})"], rows)

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    n = 20 if args.quick else 200

    def op_times(fn):
        for _ in range(5):
            fn()
        with tprofile(activities=acts) as prof:
            for _ in range(n):
                fn()
        out = {}
        for e in prof.key_averages():
            t = e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total
            out[e.key] = (t / n, e.count / n)  # us per step, calls per step
        return out

    base = op_times(naive.step)
    for impl in IMPLS:
        ours = op_times(runners[f"ours-{impl} T={T}"].step)
        rows = []
        for k in set(base) | set(ours):
            tb, cb = base.get(k, (0.0, 0.0))
            to, co = ours.get(k, (0.0, 0.0))
            rows.append((to - tb, k, tb, to, cb, co))
        rows.sort(reverse=True)
        total_b = sum(v[0] for v in base.values())
        total_o = sum(v[0] for v in ours.values())
        log(f"\n### torch.profiler, step of ours-{impl} T={T} minus naive step ({n} steps each, self "
            f"{'device' if device.type == 'cuda' else 'CPU'} time per step; profiler overhead included): "
            f"total {total_o:.0f} us vs {total_b:.0f} us, +{total_o - total_b:.0f} us")
        print_table(["op", "extra us/step", "naive us/step", "ours us/step", "naive calls/step", "ours calls/step"],
                    [[k, f"{d:+.0f}", f"{tb:.0f}", f"{to:.0f}", f"{cb:.0f}", f"{co:.0f}"]
                     for d, k, tb, to, cb, co in rows[:14]])

    for name in [f"{impl}: penalty forward + backward (accumulate into .grad)" for impl in IMPLS]:
        fn = parts[name]
        for _ in range(5):
            fn()
        with tprofile(activities=acts) as prof:
            for _ in range(n):
                fn()
        log(f"\n### torch.profiler: {name}, T={T}, {n} calls, sorted by {key}")
        log(prof.key_averages().table(sort_by=key, row_limit=12))


def plot(summaries, Ts, path, metric="wall"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summaries), figsize=(6 * len(summaries), 4.2), squeeze=False)
    for ax, (model_name, s) in zip(axes[0], summaries.items()):
        for label, prefix, style in (("Avalanche EWCPlugin (separate)", "avalanche", "o-"),
                                     ("ours, compiled (separate)", "ours-compiled", "D-"),
                                     ("ours, forloop (separate)", "ours-forloop", "s-"),
                                     ("ours, foreach (separate)", "ours-foreach", "^-")):
            if f"{prefix} T={Ts[0]}" in s:  # --impls may leave kernels out
                ax.plot(Ts, [s[f"{prefix} T={T}"] for T in Ts], style, label=label)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.axhline(TARGET, color="red", lw=0.8, ls="--", label=f"target {TARGET}x")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(Ts)
        ax.set_xticklabels([str(t) for t in Ts])
        ax.set_xlabel("T (stored experiences)")
        ax.set_ylabel(f"step time / naive step time ({metric} time)")
        ax.set_title(f"{model_name} ({DEVICE_NOTE})")
        ax.legend(fontsize=8)
    save_figure(fig, path)


def main():
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--T", type=int, nargs="+", default=None, help="stored experiences (default 1 5 10 20 50)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant per round")
    p.add_argument("--budget", type=float, default=None, help="seconds per variant per round (caps slow ones)")
    p.add_argument("--min-steps", type=int, default=None, help="timed steps per variant per round at least "
                   "(when --budget caps a slow variant)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per variant before timing")
    p.add_argument("--block", type=int, default=None, help="consecutive calls of one variant when interleaving")
    p.add_argument("--profile", action="store_true", help="torch.profiler table of ours at the largest T")
    p.add_argument("--candidates", action="store_true",
                   help="the A/B table of the penalty kernels (kept and not kept) at the largest T, instead of the T sweep")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=None, help=f"our kernels to time (default: {' '.join(IMPLS)})")
    p.add_argument("--ab-base", default=None, metavar="PATH",
                   help="also time the plugin of the avalanche_pcreg checkout at PATH ('base-<impl>' rows, interleaved "
                        "with ours on the same state), e.g. a git worktree of the previous main")
    p.add_argument("--plot", default=None, help="figure path (default: benchmarks/step_time_vs_T.png, "
                   "not written by --quick or --ab-base runs unless given)")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None,
                   help="models to run (default: mlp; mlp resnet18 with --resnet or --device cuda)")
    args = p.parse_args()
    if args.device == "cpu":
        ensure_malloc_env()
    device = resolve_device(args.device)
    apply_threads(args)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the same for every variant
    torch.manual_seed(args.seed)
    print(machine_info(device))
    global DEVICE_NOTE
    DEVICE_NOTE = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU, {torch.get_num_threads()} threads")

    models = args.models or (["mlp"] + (["resnet18"] if (args.resnet or device.type == "cuda") else []))
    summaries, tables = {}, {}
    for model_name in models:
        slow_cpu = model_name == "resnet18" and device.type == "cpu"
        a = copy.copy(args)
        Ts = args.T or ([1, 5] if args.quick else ([1, 10, 50] if slow_cpu else [1, 5, 10, 20, 50]))
        if args.quick:
            defaults = dict(rounds=2, steps=10, budget=2.0, block=5, warmup=2, min_steps=3)
        elif slow_cpu:
            defaults = dict(rounds=3, steps=5, budget=15.0, block=1, warmup=1, min_steps=2)
        elif model_name == "resnet18":
            defaults = dict(rounds=3, steps=100, budget=4.0, block=10, warmup=5, min_steps=20)
        elif device.type == "cuda":
            defaults = dict(rounds=5, steps=300, budget=2.0, block=20, warmup=10, min_steps=30)
        else:
            defaults = dict(rounds=5, steps=100, budget=1.5, block=3, warmup=5, min_steps=20)
        for k, v in defaults.items():
            if getattr(a, k, None) is None:
                setattr(a, k, v)
        table, summary, runners = run_model(model_name, a, device, Ts, print)
        tables[model_name] = table
        if args.candidates:
            for m, summ in summary.items():
                best = min((k for k in summ if k.startswith("ours")), key=summ.get)
                print(f"{m} time: fastest kept kernel {best} at {summ[best]:.3f}x naive; floor "
                      f"{summ['cand-floor']:.3f}x; previous kernel {summ['cand-previous']:.3f}x")
            del runners
            continue
        for m, summ in summary.items():
            ours = {k: v for k, v in summ.items() if k.startswith("ours")}
            worst, best = max(ours, key=ours.get), min(ours, key=ours.get)
            met = all(v <= TARGET for v in ours.values())
            what = (f"target ours <= {TARGET}x naive ({model_name}, {device.type}, step wall time): "
                    f"{'MET' if met else 'MISSED'}") if m == "wall" else \
                f"diagnostic, process CPU time ratio ({model_name}): {'all' if met else 'not all'} <= {TARGET}"
            print(f"{what}; ours from {ours[best]:.3f}x ({best}) to {ours[worst]:.3f}x ({worst})")
            fused = {k: v for k, v in ours.items() if k.startswith(f"ours-{DEFAULT_CPU_IMPL}")}
            if m == "wall" and fused and device.type == "cpu":
                print(f"target ours-{DEFAULT_CPU_IMPL} <= {TARGET_FUSED}x naive ({model_name}, cpu, wall): "
                      f"{'MET' if all(v <= TARGET_FUSED for v in fused.values()) else 'MISSED'}; "
                      f"{min(fused.values()):.3f}x to {max(fused.values()):.3f}x")
            print(f"  Avalanche separate ({m} time): {summ[f'avalanche T={min(Ts)}']:.2f}x at T={min(Ts)} ... "
                  f"{summ[f'avalanche T={max(Ts)}']:.2f}x at T={max(Ts)}; online {summ['avalanche online']:.2f}x")
        summaries[model_name] = summary
        if args.profile:
            profile(runners, max(Ts), device, a)
        del runners
    print(load_note("at end"))
    if args.plot is None and (args.quick or args.ab_base):
        return
    args.plot = args.plot or os.path.join(HERE, "step_time_vs_T.png")
    metric = "wall"
    per_model = {m: s[metric] for m, s in summaries.items()}
    Ts_of = {m: sorted({int(k.split("T=")[1]) for k in s if "T=" in k}) for m, s in per_model.items()}
    root, ext = os.path.splitext(args.plot)
    for m, s in per_model.items():  # one figure per model: step_time_vs_T.png (MLP), ..._resnet18.png
        if len(Ts_of[m]) > 1:
            plot({m: s}, Ts_of[m], args.plot if m == "mlp" else f"{root}_{m}{ext}", metric)


if __name__ == "__main__":
    main()
