"""Micro-benchmarks of the fused layers of each method: ``pytest bench/ --benchmark-only``.

Small and medium shapes only, so they run in seconds; ``python -m bench`` is the real comparison.
Not part of ``pytest tests``: the test paths are tests/ only.
"""
import pytest
import torch
from torch import nn

import spectral_kernels as sk

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16}
CASES = [(256, 256, 64), (1024, 1024, 256)]  # (out_features, in_features, tokens)
# Each method's layer with a non-trivial adapter (peft's init_weights=False), as in python -m bench.
LAYERS = {
    "fourierft": lambda base: sk.FourierFTLinear(base, config=sk.FourierFTConfig(n_frequency=1000)),
    "oft": lambda base: sk.OFTLinear(base, config=sk.OFTConfig(init_weights=False)),
    "frod": lambda base: sk.FrodLinear(base, config=sk.FrodConfig(init_weights=False, progressbar=False)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_features,in_features,tokens", CASES)
@pytest.mark.parametrize("pass_", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("method", LAYERS)
def test_layer(benchmark, method, device, out_features, in_features, tokens, pass_):
    torch.manual_seed(0)
    dtype = DTYPES[device]
    base = nn.Linear(in_features, out_features, device=device, dtype=dtype).requires_grad_(False)
    layer = LAYERS[method](base)
    x = torch.randn(tokens, in_features, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(tokens, out_features, device=device, dtype=dtype)

    def step():
        if pass_ == "fwd":
            layer(x)
        else:
            x.grad = None
            layer.zero_grad(set_to_none=True)
            layer(x).backward(grad_out)
        if device == "cuda":
            torch.cuda.synchronize()  # time the kernels, not their launch

    step()  # the first call pays one-time costs (op registration, allocator growth)
    benchmark.group = f"{method} {out_features}x{in_features} T={tokens}"
    benchmark(step)
