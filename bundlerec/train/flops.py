"""Model FLOPs of a training step and the device's matmul rate: the two halves of MFU.

FLOPs are counted the PaLM way, from the weights a token passes through: 2 per weight in the forward
pass, 2 more in backward for the activation gradient and 2 more for the weight gradient. Per block of
the item tower's transformer:

* skipped (its output cached, ``train.cache_frozen``): 0
* frozen with nothing trainable below it: 2 x params (forward only)
* frozen with something trainable below (LoRA, trainable embeddings): 4 x params
* trainable (fully or through LoRA adapters): 6 x params

The attention-score FLOPs (4 x seq_len x width per layer forward) are left out: on item texts of
<= 64 tokens they are a few per cent of the weight FLOPs (64 / (6 x 384) = 2.8 % for MiniLM), so MFU
here is slightly conservative. Embedding lookups are not matmuls and count 0.
"""

from __future__ import annotations

import time


def _numel(p) -> int:
    return int(getattr(p, "ds_numel", 0) or p.numel())  # ZeRO-3 partitions leave numel() == 0


def train_flops_per_token(encoder) -> float:
    """Model FLOPs per encoded (padded) token of one optimizer step, forward + backward, of the item
    tower ``encoder`` as it is now (frozen blocks, LoRA, cached prefix)."""
    from bundlerec.model.two_tower import input_embeddings, transformer_blocks

    grad_below = any(p.requires_grad for p in input_embeddings(encoder).parameters())
    flops = 0.0
    for block in transformer_blocks(encoder):
        params = dict(block.named_parameters())
        trainable = any(p.requires_grad for p in params.values())
        if "forward" in block.__dict__:  # replaced by the frozen-prefix cache: not computed per step
            continue
        n = sum(_numel(p) for name, p in params.items() if "lora_" not in name)  # adapters: negligible
        flops += n * (6 if trainable else 4 if grad_below else 2)
        grad_below = grad_below or trainable
    return flops


def matmul_tflops(use_gpu: bool, dtype: str = "bf16", n: int = 0, seconds: float = 2.0) -> float:
    """The dense matmul rate (TFLOP/s) this process reaches on its device: square ``n`` x ``n``
    matrices (8192 on a GPU, 1024 on a CPU by default) multiplied for about ``seconds``. The
    denominator of MFU, measured rather than taken from a data sheet."""
    import torch

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    dev = torch.device("cuda") if use_gpu else torch.device("cpu")
    n = n or (8192 if use_gpu else 1024)
    a, b = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
    sync = torch.cuda.synchronize if use_gpu else (lambda: None)
    for _ in range(3):  # warm-up (kernels chosen, caches filled)
        a @ b
    sync()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            a @ b
        reps += 10
        sync()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12
