"""How the Triton kernels are launched: with 64-bit offsets, and on their tensors' device.

Triton computes in 32 bits what it is given in 32 bits (program ids, integer arguments below 2**31), so a row
offset such as row * tokens wrapped around to an address gigabytes before the tensor. Each offset test launches a
module's kernels on (mostly untouched, lazily allocated) half-precision tensors past that size, with a grid of a few
programs, some of whose offsets pass 2**31, and compares their rows with the same kernels on small tensors holding
the same rows.

Triton launches on the current CUDA device, not on the tensors' one: every launch runs under torch.cuda.device of its
first tensor (checked here with that context manager recorded, as this machine may have no GPU).
"""
import os

import pytest
import torch

triton = pytest.importorskip("triton")
from spectral_kernels.kernels import triton as launchers  # noqa: E402
from spectral_kernels.kernels.triton import fourierft, frod, oft  # noqa: E402
from test_triton_compile import CASES, jit_kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs a CUDA device or TRITON_INTERPRET=1")
BF16 = torch.bfloat16


def _randn(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device=DEVICE, dtype=BF16)


def test_frod_rows_past_2_31():
    """3 rows of 2**30 + 1 tokens: row 2 starts at element 2**31 + 2."""
    rows, tokens, width = 3, 2 ** 30 + 1, 256
    inp = torch.empty(1, tokens, dtype=BF16, device=DEVICE)
    inp[:, :width] = _randn(1, width)
    coef = torch.tensor([0.5, -1.25, 2.0], device=DEVICE)
    ptr = torch.arange(rows + 1, device=DEVICE)  # row i = coef[i] * inp[0]
    src = torch.zeros(rows, dtype=torch.long, device=DEVICE)
    perm = torch.arange(rows, device=DEVICE)
    out = torch.empty(rows, tokens, dtype=BF16, device=DEVICE)
    frod._mix_kernel[(rows, 1)](inp, coef, ptr, src, perm, out, tokens, ACC=triton.language.float32,
                                BLOCK_T=width)
    expected = frod.mix(inp[:, :width].contiguous(), coef, ptr, src, perm)
    torch.testing.assert_close(out[:, :width], expected, rtol=0, atol=0)

    dz = torch.empty(rows, tokens, dtype=BF16, device=DEVICE)
    partial = torch.zeros(1, rows, device=DEVICE)
    frod._mix_backward_kernel[(rows, 1)](inp, out, coef, ptr, src, perm, dz, partial, tokens, rows, NEED_DZ=True,
                                         ACC=triton.language.float32, BLOCK_T=width)
    expected_dz, expected_dcoef = frod.mix_backward(inp[:, :width].contiguous(), expected, coef, ptr, src, perm,
                                                    True)
    torch.testing.assert_close(dz[:, :width], expected_dz, rtol=0, atol=0)
    torch.testing.assert_close(partial[0], expected_dcoef, rtol=0, atol=0)


def test_oft_tokens_past_2_31():
    """64 tokens of 2**25 + 2**20 features: token 63 starts past element 2**31; one 32-wide block is rotated."""
    tokens, ld, b = 64, 2 ** 25 + 2 ** 20, 32
    x = torch.empty(tokens, ld, dtype=BF16, device=DEVICE)
    x[:, :b] = _randn(tokens, b)
    rot = torch.linalg.qr(torch.randn(1, b, b, generator=torch.Generator().manual_seed(1)))[0].to(DEVICE, BF16)
    small = x[:, :b].contiguous()
    acc, precision = oft._dot_args(x.dtype, rot.dtype)
    tile = oft._tile(b)

    out = torch.empty_like(x)
    oft._rotate_kernel[(1, 1)](x, rot.float(), out, tokens, b, ld, 1, 0, rot.stride(1), rot.stride(2),
                               ACC=acc, PRECISION=precision, BLOCK_T=oft.BLOCK_T, BLOCK=tile)
    torch.testing.assert_close(out[:, :b], oft.rotate(small, rot, False), rtol=0, atol=0)

    partial = torch.zeros(1, 1, b, b, device=DEVICE)
    oft._rotate_grad_kernel[(1, 1)](x, out, partial, tokens, b, ld, 1, 1, tokens,
                                    ACC=acc, PRECISION=precision, BLOCK_T=oft.BLOCK_T, BLOCK=tile)
    expected = oft._rotate_grad(small, out[:, :b].contiguous(), b, False)
    torch.testing.assert_close(partial[0], expected, rtol=0, atol=0)


def test_fourierft_mirror_rows_past_2_31():
    """ΔW's 3 rows of 2**30 + 1 columns from a half-spectrum: row 2 starts at element 2**31 + 2."""
    m, n, width = 3, 2 ** 30 + 1, 64
    bins = n // 2 + 1
    ft = torch.empty(bins, 1, dtype=torch.complex32, device=DEVICE)  # every row reads the same column
    ft[:width] = torch.randn(width, 1, dtype=torch.complex64, generator=torch.Generator().manual_seed(2)).to(ft)
    ft = ft.expand(bins, m)
    out = torch.empty(m, n, dtype=torch.float16, device=DEVICE)
    fourierft._real_mirror_kernel[(1, 1)](torch.view_as_real(ft), ft.stride(0), ft.stride(1), out, out, m, n, bins,
                                          HAS_BASE=False, BLOCK_P=fourierft.BLOCK_P, BLOCK_Q=width)
    torch.testing.assert_close(out[:, :width], torch.view_as_real(ft[:width]).select(-1, 0).t(), rtol=0, atol=0)


def test_fourierft_mirror_columns_past_2_31():
    """A half-spectrum read at column stride 2**26 (the column FFT's layout, stride m, at m = 2**26): bin 32 of
    ΔW's 64 columns lies 2**31 complex elements in."""
    n, stride_q = 64, 2 ** 26
    bins = n // 2 + 1
    ft = torch.empty(bins, stride_q, dtype=torch.complex32, device=DEVICE)[:, :1]
    ft[:, 0] = torch.randn(bins, dtype=torch.complex64, generator=torch.Generator().manual_seed(3)).to(ft)
    real = torch.view_as_real(ft[:, 0]).select(-1, 0)
    q = torch.arange(n, device=DEVICE)
    expected = real[torch.minimum(q, n - q)][None]
    torch.testing.assert_close(fourierft.real_mirror(ft, None, n), expected, rtol=0, atol=0)


def test_grids_within_cuda_limits(monkeypatch):
    """No launch asks for more than 65535 programs on a grid's second axis (CUDA's limit): FourierFT's mix of 2**23 + 1
    coefficients goes in one axis, and OFT's and FRoD's launches past the limit raise, as the CUDA backend's do.
    (The launches are recorded, not run.)"""
    grids = []

    class Recorded:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: grids.append(grid)

    for module, kernel in ((fourierft, "_mix_kernel"), (oft, "_rotate_kernel"), (frod, "_mix_kernel"),
                           (frod, "_mix_backward_kernel")):
        monkeypatch.setattr(module, kernel, Recorded())
    nnz = 2 ** 23 + 1
    fourierft.mix(torch.zeros(1, 5, dtype=torch.complex64, device=DEVICE), torch.ones(nnz, device=DEVICE),
                  torch.zeros(nnz, dtype=torch.long, device=DEVICE), torch.zeros(nnz, dtype=torch.long, device=DEVICE),
                  8, 8, 1.0)
    x = torch.zeros(1, 2 * 65536, device=DEVICE)
    with pytest.raises(RuntimeError, match="oft_rotate: too many blocks for one launch"):
        oft.rotate(x, torch.eye(2, device=DEVICE)[None], False)
    oft.rotate(x[:, :-2], torch.eye(2, device=DEVICE)[None], False)
    tokens = 65535 * frod.BLOCK_T + 1
    z, ptr, index = (torch.empty(1, tokens, dtype=BF16, device=DEVICE), torch.tensor([0, 1], device=DEVICE),
                     torch.zeros(1, dtype=torch.long, device=DEVICE))
    with pytest.raises(RuntimeError, match="frod_mix: too many tokens for one launch"):
        frod.mix(z, torch.ones(1, device=DEVICE), ptr, index, index)
    with pytest.raises(RuntimeError, match="frod_mix_backward: too many tokens for one launch"):
        frod.mix_backward(z, z, torch.ones(1, device=DEVICE), ptr, index, index, True)
    frod.mix(z[:, :-1], torch.ones(1, device=DEVICE), ptr, index, index)
    assert len(grids) == 3 and all(axis <= 65535 for grid in grids for axis in grid[1:])


class _CurrentDevice:
    """Stands in for torch.cuda.device, recording the device made current (``outside`` where none is)."""
    outside = object()
    current = outside

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        self.saved, _CurrentDevice.current = _CurrentDevice.current, self.device

    def __exit__(self, *exc):
        _CurrentDevice.current = self.saved


@pytest.mark.parametrize("name", CASES)
def test_every_launch_makes_its_tensors_device_current(name, monkeypatch):
    """Each wrapper of the module (all its kernels) launches under torch.cuda.device (here of CPU tensors: -1, none)."""
    module, calls = CASES[name]
    devices = {}

    class Grid:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: devices.setdefault(self.kernel, set()).add(_CurrentDevice.current)

    kernels = jit_kernels(module)
    monkeypatch.setattr(torch.cuda, "device", _CurrentDevice)
    for kernel in kernels:
        monkeypatch.setattr(module, kernel, Grid(kernel))
    calls()
    assert devices == {kernel: {-1} for kernel in kernels}


def test_launches_go_to_the_first_tensor_s_cuda_device(monkeypatch):
    """A CUDA tensor's device is made current (cuda:1 while cuda:0 is, as with accelerate's device_map="auto")."""
    monkeypatch.setattr(torch.cuda, "device", _CurrentDevice)
    seen = []
    launch = launchers.on_tensors_device(lambda first, *args: seen.append((_CurrentDevice.current, args)))
    on_gpu = type("OnGpu", (), {"is_cuda": True, "device": torch.device("cuda", 1)})()
    launch(on_gpu, 2)
    launch(torch.zeros(1), 3)
    assert seen == [(torch.device("cuda", 1), (2,)), (-1, (3,))] and _CurrentDevice.current is _CurrentDevice.outside
