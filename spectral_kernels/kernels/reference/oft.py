"""OFT exactly as peft 0.21 computes it (peft/tuners/oft/layer.py, OFTRotationModule).

``cayley`` builds the rotation blocks as peft does, in differentiable torch code: for the
exact Cayley transform, for the reference backend and for blocks past the kernels' limits
(the Neumann series of the other backends runs in their own kernels, ops/oft.py). ``oft_linear``
is the baseline the other backends are tested and benchmarked against: it rotates x
with peft's einsum, expanding a shared block with ``repeat`` as peft does.
"""
import torch
import torch.nn.functional as F


def skew(params, block_size):
    """(n, b(b-1)/2) -> (n, b, b) skew-symmetric: the upper triangle in triu_indices order, Q = A - A^T."""
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=params.device)
    upper = params.new_zeros(params.shape[0], block_size, block_size)
    upper[:, rows, cols] = params
    return upper - upper.transpose(-2, -1)


def neumann_coefficients(num_neumann_terms):
    """c of peft's truncated series R = sum_p c[p] Q^p (``cayley`` below): [1] for one term,
    [1, 2] for two, else 1, then 2 up to the power m - 1, then 1 at m = max(3, k - 1)."""
    if num_neumann_terms <= 2:
        return [1.0, 2.0][:num_neumann_terms]
    last = max(3, num_neumann_terms - 1)
    return [1.0] + [2.0] * (last - 1) + [1.0]


def cayley(params, block_size, use_cayley_neumann=True, num_neumann_terms=5):
    """peft's _cayley_batch: R = (I - Q)(I + Q)^-1, exact or as its truncated Neumann series.

    Neumann with k terms: I + 2Q + 2Q^2 + ... + 2Q^(k-2) + Q^(k-1) (the last power once) for k >= 4; k = 3 gives
    the series of k = 4, k = 2 gives I + 2Q and k = 1 gives I (see ``neumann_coefficients``).
    The exact solve runs in float32 or wider (peft's float32 identity promotes Q).
    """
    n = params.shape[0]
    q = skew(params, block_size)
    if use_cayley_neumann:
        rot = torch.eye(block_size, device=params.device, dtype=params.dtype).repeat(n, 1, 1)
        if num_neumann_terms > 1:
            rot.add_(q, alpha=2.0)
            if num_neumann_terms > 2:
                power = torch.bmm(q, q)
                rot.add_(power, alpha=2.0)
                for _ in range(3, num_neumann_terms - 1):
                    power = torch.bmm(power, q)
                    rot.add_(power, alpha=2.0)
                rot.add_(torch.bmm(power, q))
    else:
        eye = torch.eye(block_size, device=params.device).expand(n, block_size, block_size)
        rot = torch.linalg.solve(eye + q, eye - q, left=False)
    return rot.to(params.dtype)


def project(params, block_size, eps):
    """peft's _project_batch (COFT): blocks with ||Q||_F > eps' are scaled onto ||Q||_F = eps'.

    eps' = eps / sqrt(n blocks), computed in float32 as peft does.
    """
    q = skew(params, block_size)
    eps = eps * 1 / torch.sqrt(torch.tensor(q.shape[0]))
    norm = torch.norm(q, dim=(1, 2), keepdim=True)
    q = torch.where(norm <= eps, q, eps * (q / norm))
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=params.device)
    return q[:, rows, cols]


def rotate(x, rot):
    """x · blockdiag(R) over the last dimension, with peft's einsum (in rot's dtype)."""
    n_blocks = x.shape[-1] // rot.shape[-1]
    if rot.shape[0] == 1:
        rot = rot.repeat(n_blocks, 1, 1)
    blocks = x.to(rot.dtype).reshape(*x.shape[:-1], n_blocks, rot.shape[-1])
    return torch.einsum("...rk,rkc->...rc", blocks, rot).reshape(x.shape)


def oft_linear(x, weight, bias, rot):
    """peft's Linear.forward for one adapter: rotate in the adapter's dtype, then the base layer."""
    return F.linear(rotate(x, rot).to(x.dtype), weight, bias).to(x.dtype)


def block_diagonal(rot, n_blocks):
    """peft's get_weight: the dense (n b, n b) blockdiag(R), a shared block repeated."""
    return torch.block_diag(*[rot[0 if rot.shape[0] == 1 else j] for j in range(n_blocks)])
