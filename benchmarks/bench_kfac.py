"""Cost of the Kronecker-factored (KFAC) importance and penalty, next to the diagonal ones.

Four tables:

1. **step**: one training step (zero_grad, forward, cross-entropy, + penalty, backward, SGD step)
   with no penalty (``naive``), the diagonal penalty (``diag``, T consolidated experiences), the
   KFAC penalty in online mode (one pair a layer: two matrix products), and in separate mode with
   every pair kept (``kfac-exact``: 2T products a layer) and with one nearest pair (``kfac-nearest``).
   Interleaved rounds; ratios to ``naive`` per round, median [min, max].
2. **memory**: the state's bytes for T experiences, against the parameters'.
3. **pass**: the importance pass, ``kfac`` against the diagonal ``expected_fisher`` (same data,
   same exact expected Fisher), interleaved.
4. **merge error**: on small layers, the relative error of the single nearest pair
   (``kfac_merge="nearest"``) against the exact sum of pairs, over T tasks of permuted correlated
   inputs (the input statistics change between tasks: the hard case for one pair).

    python benchmarks/bench_kfac.py                # CPU, MLP 784-400-400-10 (~2 min on 2 idle cores)
    python benchmarks/bench_kfac.py --resnet       # ResNet-18 (3x3 stem) as well (slow on the CPU)
    python benchmarks/bench_kfac.py --quick        # smoke test
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (apply_threads, base_parser, ensure_malloc_env, fmt_spread, interleaved, machine_info,  # noqa: E402
                    make_batch, MODELS, print_table, ratios, resolve_device)

from avalanche_pcreg.importance import compute_importance  # noqa: E402
from avalanche_pcreg.importance.kfac import kfac  # noqa: E402
from avalanche_pcreg.kron_state import KronState  # noqa: E402
from avalanche_pcreg.state import ConsolidatedState  # noqa: E402


def _states(model, x, y, T: int):
    """(diagonal, kfac online, kfac exact, kfac nearest) states of T experiences, anchors perturbed."""
    ds = torch.utils.data.TensorDataset(x, y)
    kimp = compute_importance(model, ds, "kfac", batch_size=len(x))
    dimp = compute_importance(model, ds, "expected_fisher", batch_size=len(x))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator(device=x.device).manual_seed(0)
    states = {"diag": ConsolidatedState("separate"), "kfac-online": ConsolidatedState("online", decay=1.0),
              "kfac-exact": ConsolidatedState("separate"), "kfac-nearest": ConsolidatedState("separate", kfac_merge="nearest")}
    for _ in range(T):
        anchors = {n: p + 1e-3 * torch.randn(p.shape, generator=g, device=p.device) for n, p in params.items()}
        for k, st in states.items():
            states[k] = st.consolidated(dimp if k == "diag" else kimp, anchors)
    return states


def step_table(args, device, model_name: str, Ts):
    spec = MODELS[model_name]
    rows = []
    x, y = make_batch(model_name, args.batch, device, seed=args.seed)
    for T in Ts:
        models, opts = {}, {}
        base = spec["make"]().to(device)
        states = _states(base, x, y, T)
        variants = {}
        for name in ("naive",) + tuple(states):
            m = spec["make"]().to(device)
            m.load_state_dict(base.state_dict())
            opt = torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9)
            st = states.get(name)
            models[name], opts[name] = m, opt

            def step(m=m, opt=opt, st=st):
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(m(x), y)
                if st is not None:
                    loss = loss + st.penalty(m, 1.0)
                loss.backward()
                opt.step()

            variants[name] = step
        res = interleaved(variants, device, rounds=args.rounds, steps=args.steps, warmup=2)
        for name in variants:
            if name == "naive":
                continue
            rows.append([model_name, T, name, fmt_spread(ratios(res[name]["cpu"], res["naive"]["cpu"]), digits=2),
                         f"{states[name].nbytes() / 2**20:.1f}"])
    nparam = sum(p.numel() * p.element_size() for p in spec["make"]().parameters()) / 2**20
    print(f"\n## step with the penalty / naive step ({model_name}, batch {args.batch}, CPU time; parameters "
          f"{nparam:.1f} MiB)\n")
    print_table(["model", "T", "penalty", "step ratio", "state MiB"], rows)


def pass_table(args, device, model_name: str):
    spec = MODELS[model_name]
    model = spec["make"]().to(device)
    x, y = make_batch(model_name, args.n, device, seed=args.seed)
    ds = torch.utils.data.TensorDataset(x, y)
    variants = {m: (lambda m=m: compute_importance(model, ds, m, batch_size=args.batch))
                for m in ("expected_fisher", "kfac")}
    res = interleaved(variants, device, rounds=args.rounds, steps=1, warmup=1, block=1)
    print(f"\n## importance pass ({model_name}, N = {args.n}, batch {args.batch}, CPU time)\n")
    print_table(["estimator", "seconds", "kfac / expected_fisher"],
                [["expected_fisher", fmt_spread(res["expected_fisher"]["cpu"]), "1"],
                 ["kfac", fmt_spread(res["kfac"]["cpu"]),
                  fmt_spread(ratios(res["kfac"]["cpu"], res["expected_fisher"]["cpu"]), digits=2)]])


def merge_error_table(args):
    """Relative error of the nearest pair against the exact pairs, on permuted correlated inputs."""
    torch.manual_seed(args.seed)
    d, h, c, n = 20, 16, 5, 256
    mix = torch.randn(d, d, dtype=torch.float64) / d ** 0.5 + torch.eye(d, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, c)).double()
    names = [n_ for n_, _ in model.named_parameters()]
    rows = []
    exact, nearest = KronState("separate"), KronState("separate", merge="nearest")
    g = torch.Generator().manual_seed(1)
    for t in range(args.tasks):
        perm = torch.randperm(d, generator=g)
        x = (torch.randn(n, d, generator=g, dtype=torch.float64) @ mix)[:, perm]
        y = torch.randint(0, c, (n,), generator=g)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        imp = kfac(model, [(x, y)], names=names)
        params = dict(model.named_parameters())
        exact, nearest = exact.merged(imp, params), nearest.merged(imp, params)
        errs = []
        for _ in range(20):
            probe = {k: v.detach() + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}
            e, s = exact.penalty(probe, 1.0).item(), nearest.penalty(probe, 1.0).item()
            errs.append(abs(s - e) / e)
        errs.sort()
        rows.append([t + 1, f"{errs[len(errs) // 2]:.3f}", f"{errs[-1]:.3f}"])
    print(f"\n## merge error: kfac_merge='nearest' against 'exact' (MLP {d}-{h}-{c}, permuted correlated inputs, "
          "20 random probes a task)\n")
    print_table(["tasks", "median relative error", "max"], rows)


def main():
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--T", type=int, nargs="+", default=[1, 5, 20])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--n", type=int, default=512, help="samples of the importance pass")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--tasks", type=int, default=5, help="tasks of the merge-error table")
    args = p.parse_args()
    ensure_malloc_env()
    apply_threads(args)
    if args.quick:
        args.T, args.rounds, args.steps, args.n, args.batch, args.tasks = [1, 2], 1, 3, 64, 32, 2
    device = resolve_device(args.device)
    print(machine_info(device))
    t0 = time.time()
    models = ["mlp"] + (["resnet18"] if args.resnet or device.type == "cuda" else [])
    for name in models:
        step_table(args, device, name, args.T)
        pass_table(args, device, name)
    merge_error_table(args)
    print(f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
