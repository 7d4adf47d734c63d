"""Penalty kernels on large tensors: the value stays right for logging (float32 accumulation drift)."""

import pytest
import torch

from avalanche_pcreg.penalty import Workspace, quadratic_penalty


@pytest.mark.parametrize("impl", ["forloop", "foreach"])
@pytest.mark.parametrize("use_workspace", [False, True])
def test_value_and_gradient_on_millions_of_entries(impl, use_workspace):
    g = torch.Generator().manual_seed(0)
    shapes = [(256, 256, 3, 3), (512, 256, 3, 3), (10,)]
    p = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
    a = [x.detach() + 0.01 * torch.randn(x.shape, generator=g) for x in p]
    w = [torch.rand(x.shape, generator=g) + 0.01 for x in p]
    ref = sum((wi.double() * (pi.detach().double() - ai.double()) ** 2).sum() for pi, ai, wi in zip(p, a, w))
    ws = Workspace() if use_workspace else None
    value = quadratic_penalty(p, w, a, 0.5, impl=impl, workspace=ws)
    assert value.dtype == torch.float32
    assert abs(value.item() - 0.5 * ref.item()) / (0.5 * ref.item()) < 2e-5
    grads = torch.autograd.grad(value, p)
    for gi, pi, ai, wi in zip(grads, p, a, w):
        torch.testing.assert_close(gi.double(), wi.double() * (pi.detach().double() - ai.double()),
                                   rtol=1e-6, atol=1e-9)
