"""The streamed backward: each hooked layer's δ is handed over as the backward reaches it.

Asking ``torch.autograd.grad`` for every layer's δ at once would hold a second copy of the
activations until the backward ends. Instead a pre-hook on each layer's output node
(``Node.register_prehook``) receives the fully accumulated δ just before autograd runs that node;
the caller turns it into sums there, and δ is freed as the backward goes on.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch
from torch import Tensor

__all__ = ["grads", "stream"]


def grads(root: Tensor, cot: Tensor, inputs: list, batched: bool, retain: bool) -> List:
    """``torch.autograd.grad`` of ``<root, cot>`` with respect to ``inputs`` (tensors or gradient
    edges; None where unused). ``batched``: ``cot`` holds K cotangents in front, backpropagated in
    one vmapped backward, or one at a time where an op has no batching rule."""
    if not inputs:
        return []
    if not root.requires_grad:
        raise ValueError("the per-sample losses (or outputs) do not require grad")
    if not batched:
        return list(torch.autograd.grad(root, inputs, grad_outputs=cot, retain_graph=retain, allow_unused=True))
    try:
        return list(torch.autograd.grad(root, inputs, grad_outputs=cot, retain_graph=True,
                                        allow_unused=True, is_grads_batched=True))
    except RuntimeError:  # an op without a batching rule: one backward per cotangent
        cols = []
        for k in range(cot.shape[0]):
            cols.append(torch.autograd.grad(root, inputs, grad_outputs=cot[k], allow_unused=True,
                                            retain_graph=retain or k < cot.shape[0] - 1))
        out = []
        for j in range(len(inputs)):
            gj = [c[j] for c in cols]
            out.append(None if all(g is None for g in gj) else torch.stack(
                [g if g is not None else torch.zeros_like(next(x for x in gj if x is not None)) for g in gj]))
        return out


def _reaches(root: Tensor, hooked: set) -> dict:
    """{node: whether a hooked gradient edge lies below it} for every node of ``root``'s backward
    graph (iterative post-order walk; the graph is a DAG)."""
    reach: dict = {}
    start = root.grad_fn
    if start is None:
        return reach
    stack = [(start, False)]
    while stack:
        node, done = stack.pop()
        if done:
            reach[node] = any(nxt is not None and ((nxt, nr) in hooked or reach.get(nxt, False))
                              for nxt, nr in node.next_functions)
            continue
        if node in reach:
            continue
        reach[node] = False  # visited; final value set when its children are done
        stack.append((node, True))
        stack.extend((nxt, False) for nxt, _ in node.next_functions if nxt is not None and nxt not in reach)
    return reach


def stream(root: Tensor, cot: Tensor, edges: Dict, inputs: list, on_delta: Callable, retain: bool) -> list:
    """One backward of ``<root, cot>`` that hands δ at each module's output edge (``edges``:
    {module: gradient edge}) to ``on_delta(module, δ)`` as soon as the backward reaches it.

    Only the modules below which no other module lies are requested from ``autograd.grad`` (that
    makes the engine run every other hooked node); their δ comes back at the end, unless their
    node runs anyway (to reach ``inputs``) and its hook delivers it first. A module whose output
    does not reach ``root`` gets δ = None. Returns the gradients of ``inputs``."""
    by_node: dict = {}
    for m, e in edges.items():
        by_node.setdefault(e.node, []).append((m, e.output_nr))
    reach = _reaches(root, {(e.node, e.output_nr) for e in edges.values()})
    targets = [m for m, e in edges.items() if e.node in reach and not reach[e.node]]
    delivered: set = set()

    def make_hook(node):
        def hook(grad_outputs):
            for m, nr in by_node[node]:
                if m not in delivered:
                    delivered.add(m)
                    on_delta(m, grad_outputs[nr])
        return hook

    handles = []
    try:
        for node in by_node:
            if node in reach:  # a target's hook fires too when its node runs (for `inputs`)
                handles.append(node.register_prehook(make_hook(node)))
        wanted = list(inputs) + [edges[m] for m in targets]
        out = grads(root, cot, wanted, False, retain) if wanted else []
    finally:
        for h in handles:
            h.remove()
    for m, g in zip(targets, out[len(inputs):]):
        if m not in delivered:
            delivered.add(m)
            on_delta(m, g)
    for m in edges:
        if m not in delivered:
            on_delta(m, None)
    return out[:len(inputs)]
