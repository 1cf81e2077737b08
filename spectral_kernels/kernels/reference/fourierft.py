"""FourierFT exactly as peft 0.21 computes it: a dense complex ifft2 per call.

This is the baseline every other backend is tested and benchmarked against.
"""
import torch
import torch.nn.functional as F


def fourierft_delta_weight(spectrum, indices, out_features, in_features, scaling):
    """peft's FourierFTLayer.get_delta_weight: scaling * Re(ifft2(S)), in spectrum.dtype.

    peft assigns S[indices] = spectrum; for repeated positions (which its random indices
    never have) that assignment is undefined in torch, so here they add, as in the
    fused kernels. For distinct positions the two are the same, bit for bit.

    The 1 / (M N) of the inverse transform is applied here, not by ifft2: torch 2.13's CPU
    build returns ifft2 of a 2048 x 2048 float32 input 2048² times too small when it runs
    on two threads or more (and peft's ΔW with it)."""
    dense = torch.zeros(out_features, in_features, device=spectrum.device,
                        dtype=torch.float64 if spectrum.dtype == torch.float64 else torch.float32)
    dense.index_put_((indices[0, :], indices[1, :]), spectrum.to(dense.dtype), accumulate=True)
    inverse = torch.fft.ifft2(dense, norm="forward").real
    return (inverse * (scaling / (out_features * in_features))).to(spectrum.dtype)


def fourierft_linear(x, weight, bias, spectrum, indices, scaling):
    """peft's FourierFTLinear.forward for one active adapter (weight is (out, in))."""
    result = F.linear(x, weight, bias)
    delta_w = fourierft_delta_weight(spectrum, indices, weight.shape[0], weight.shape[1], scaling)
    result = result + F.linear(x.to(delta_w.dtype), delta_w)
    return result.to(x.dtype)
