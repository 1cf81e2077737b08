"""FRoD set-up: the projection decomposition and the per-layer U, lambda of a whole model.

A stack of blocks, each with four square nn.Linear (q/k/v/o: four categories), gets
FRoD on all of them: ours through spectral_kernels.inject, peft's through
get_peft_model; both decompose each category once and solve U, lambda per layer.
Timed as whole calls, interleaved, after one untimed pair at a small size (the
linear-algebra libraries' first-call set-up). CPU: 24 blocks of 1024 (6 with
--quick); CUDA: the same on the GPU (peft decomposes on the CPU whatever the device).
"""
import copy
import warnings

import torch
from torch import nn

import spectral_kernels

from . import timing
from .methods import configs, peft

CATEGORIES = ("q_proj", "k_proj", "v_proj", "o_proj")
SIZES = {True: (6, 1024), False: (24, 1024)}  # (blocks, width) by --quick
REPS = {True: 1, False: 3}


def blocks(count, width, device, dtype):
    torch.manual_seed(0)
    return nn.ModuleList(nn.ModuleDict({c: nn.Linear(width, width) for c in CATEGORIES})
                         for _ in range(count)).to(device, dtype)


def bench_frod_init(args):
    """The "frod_init" entry of the results: the model and the stats of ours and peft (ratio to peft)."""
    count, width = SIZES[args.quick]
    dtype = getattr(torch, args.dtype)
    ours_config, peft_config = configs("frod", args, target_modules=list(CATEGORIES))
    model = blocks(count, width, args.device, dtype)

    def ours(model=model):
        spectral_kernels.inject(copy.deepcopy(model), ours_config)

    def theirs(model=model):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning)
            peft.get_peft_model(copy.deepcopy(model), peft_config)

    small = blocks(2, 64, args.device, dtype)
    ours(small), theirs(small)
    print(f"frod_init: {count} blocks x {len(CATEGORIES)} categories at {width}x{width}", flush=True)
    # A call takes seconds: no warm-up beyond the small pair, REPS[quick] interleaved repetitions each.
    reps = REPS[args.quick]
    stats, elapsed, other_load = timing.measure({"ours": (ours, lambda: None), "peft": (theirs, lambda: None)},
                                                0.0, reps, args.device.type == "cuda", "peft", warmup=0,
                                                min_reps=reps)
    print(f"frod_init: ours {stats['ours']['median_ms'] / 1e3:.1f} s, peft {stats['peft']['median_ms'] / 1e3:.1f} s"
          f" ({stats['ours']['ratio']:.2f}x)", flush=True)
    return {"blocks": count, "width": width, "categories": list(CATEGORIES), "seconds": round(elapsed, 1),
            "other_load": round(other_load, 2), "impls": stats}
