import functools

import torch

MAX_GRID_Y = 65535  # programs along a launch grid's second and third axes (CUDA's limit)


def on_tensors_device(launcher):
    """``launcher`` run with the CUDA device of its first argument, a tensor, current. Triton launches on the
    current device and its current stream, not on the tensors' device, and a model spread over GPUs (accelerate's
    device_map="auto") leaves the current device as it is: the kernels ran on another GPU than their tensors',
    unordered with the work on the tensors' own stream. (No-op on the CPU, under TRITON_INTERPRET=1.)"""
    @functools.wraps(launcher)
    def run(first, *args, **kwargs):
        with torch.cuda.device(first.device if first.is_cuda else -1):
            return launcher(first, *args, **kwargs)

    return run
