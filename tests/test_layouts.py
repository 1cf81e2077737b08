"""Inputs that are not plain contiguous rows: every backend gives the reference's outputs and gradients when x is
a transposed view, a slice with a step, a broadcast row (stride 0) or a non-contiguous 3-D tensor."""
import pytest
import torch

from conftest import assert_close, device_backends
from test_autograd import CASES, D_IN, TOKENS

pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")  # FRoD's reference (peft's)


def step_slice(x):
    wide = x.new_zeros(x.shape[0], 2 * x.shape[1])
    wide[:, ::2] = x
    return wide[:, ::2]


# Each takes the leaf (TOKENS, D_IN) and returns the op's input, built from it differentiably.
LAYOUTS = {
    "transposed": lambda x: x.t().contiguous().t(),
    "step-slice": step_slice,
    "broadcast": lambda x: x[:1].expand(TOKENS, D_IN),
    "3d": lambda x: torch.stack([x, 2 * x], dim=1).transpose(0, 1),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("make,path", CASES)
def test_strided_inputs_match_reference(device, backend, make, path, layout, dtype):
    results = []
    for name in ("reference", backend):
        g = torch.Generator().manual_seed(0)
        params, fn = make(name, path, device, dtype, g)
        leaves = [t.to(device, dtype).requires_grad_() for t in (torch.randn(TOKENS, D_IN, generator=g), *params)]
        x = LAYOUTS[layout](leaves[0])
        assert not x.is_contiguous()
        y = fn(x, *leaves[1:])
        results.append((y, torch.autograd.grad(y.square().sum(), leaves)))
    (y_ref, grads_ref), (y, grads) = results
    assert y.shape == y_ref.shape
    assert_close(y, y_ref, dtype)
    for got, expected in zip(grads, grads_ref):
        assert_close(got, expected, dtype)
