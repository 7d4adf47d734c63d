"""State memory vs number of experiences: ours (consolidated) vs Avalanche's EWCPlugin.

Ours: ``ConsolidatedState.nbytes()`` after T consolidations, separate and online: A and mu, 2P
floats whatever T. Avalanche separate: the bytes of every ``saved_params[t]`` and
``importances[t]`` it keeps (``ParamData``), 2TP floats; Avalanche online (its default
``keep_importance_data=False``) keeps 2P. Both sides are filled for real, one experience at a
time, and the bytes counted from the stored tensors.

    python benchmarks/bench_memory.py            # MLP 784-400-400-10, T = 1..100 (~1 min)
    python benchmarks/bench_memory.py --quick    # T = 1..10
    python benchmarks/bench_memory.py --resnet   # ResNet-18 (3x3 stem), T = 1..10 on the CPU
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import apply_threads, HERE, MODELS, base_parser, machine_info, print_table, resolve_device, save_figure  # noqa: E402

import torch  # noqa: E402

from avalanche.training.plugins import EWCPlugin  # noqa: E402
from avalanche.training.utils import ParamData, copy_params_dict  # noqa: E402

from avalanche_pcreg import ConsolidatedState  # noqa: E402

MB = 2 ** 20


def paramdata_bytes(d) -> int:
    return sum(pd.data.numel() * pd.data.element_size() for pd in d.values())


def avalanche_bytes(plugin: EWCPlugin) -> int:
    return sum(paramdata_bytes(d) for d in plugin.saved_params.values()) + \
        sum(paramdata_bytes(d) for d in plugin.importances.values())


def run(model_name, Tmax, device, seed, show):
    model = MODELS[model_name]["make"](seed=seed).to(device)
    P = sum(p.numel() for p in model.parameters())
    elem = next(model.parameters()).element_size()
    print(f"\n## {model_name}: P = {P:,} parameters ({elem} bytes each); 2P floats = {2 * P * elem / MB:.2f} MiB")
    g = torch.Generator().manual_seed(seed)
    av_sep = EWCPlugin(1.0, mode="separate")
    av_onl = EWCPlugin(1.0, mode="online", decay_factor=0.9)  # keep_importance_data=False (default)
    ours_sep, ours_onl = ConsolidatedState("separate"), ConsolidatedState("online", 0.9)
    rows, series = [], {"T": [], "ours separate": [], "ours online": [], "avalanche separate": [],
                        "avalanche online": []}
    t0 = time.time()
    for t in range(Tmax):
        with torch.no_grad():  # "train": move the parameters, then store importances and anchors
            for p in model.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g).to(device))
        imps = {n: (torch.rand(p.shape, generator=g) + 0.01).to(device) for n, p in model.named_parameters()}
        params = {n: p.detach() for n, p in model.named_parameters()}
        # Avalanche: exactly what after_training_exp stores (update_importances + copy_params_dict)
        for plugin in (av_sep, av_onl):
            plugin.update_importances({n: ParamData(f"imp_{n}", init_tensor=v.clone(), device=device)
                                       for n, v in imps.items()}, t)
            plugin.saved_params[t] = copy_params_dict(model)
            if t > 0 and not plugin.keep_importance_data:
                del plugin.saved_params[t - 1]
        ours_sep = ours_sep.consolidated(imps, params)
        ours_onl = ours_onl.consolidated(imps, params)
        T = t + 1
        series["T"].append(T)
        series["ours separate"].append(ours_sep.nbytes())
        series["ours online"].append(ours_onl.nbytes())
        series["avalanche separate"].append(avalanche_bytes(av_sep))
        series["avalanche online"].append(avalanche_bytes(av_onl))
        if T in show or T == Tmax:
            s = {k: v[-1] for k, v in series.items()}
            rows.append([T, f"{s['ours separate'] / MB:.2f}", f"{s['ours online'] / MB:.2f}",
                         f"{s['avalanche separate'] / MB:.2f}", f"{s['avalanche online'] / MB:.2f}",
                         f"{s['ours separate'] / (P * elem):.2f}", f"{s['avalanche separate'] / (P * elem):.1f}",
                         f"{s['avalanche separate'] / s['ours separate']:.1f}"])
    print(f"(filled in {time.time() - t0:.1f} s)")
    print_table(["T", "ours separate MiB", "ours online MiB", "Avalanche separate MiB", "Avalanche online MiB",
                 "ours sep. / P floats", "Avalanche sep. / P floats", "Avalanche sep. / ours sep."], rows)
    last = {k: v[-1] for k, v in series.items()}
    flat = all(b == 2 * P * elem for b in series["ours separate"])
    linear = all(b == 2 * T * P * elem for T, b in zip(series["T"], series["avalanche separate"]))
    print(f"ours separate flat at 2P floats for every T in 1..{Tmax}: {flat}; "
          f"Avalanche separate = 2TP floats for every T: {linear}")
    print(f"at T={Tmax}: Avalanche separate / ours separate = {last['avalanche separate'] / last['ours separate']:.1f}x "
          f"(ours also keeps one float64 scalar, the constant c)")
    return series


def plot(all_series, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_series), figsize=(6 * len(all_series), 4.2), squeeze=False)
    for ax, (name, s) in zip(axes[0], all_series.items()):
        for key, style in (("avalanche separate", "-"), ("avalanche online", ":"), ("ours separate", "--"),
                           ("ours online", "-.")):
            ax.plot(s["T"], [b / MB for b in s[key]], style, label=key)
        ax.set_xlabel("T (experiences)")
        ax.set_ylabel("state memory (MiB)")
        ax.set_title(name)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def main():
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=None, help="largest T (default 100; 10 with --quick)")
    p.add_argument("--plot", default=os.path.join(HERE, "state_memory_vs_T.png"))
    args = p.parse_args()
    device = resolve_device(args.device)
    apply_threads(args)
    print(machine_info(device))
    Tmax = args.T or (10 if args.quick else 100)
    show = {1, 2, 5, 10, 20, 50, 100}
    out = {"mlp": run("mlp", Tmax, device, args.seed, show)}
    if args.resnet or device.type == "cuda":
        Tr = args.T or (3 if args.quick else (10 if device.type == "cpu" else 50))
        out["resnet18"] = run("resnet18", Tr, device, args.seed, show)
    plot(out, args.plot)


if __name__ == "__main__":
    main()
