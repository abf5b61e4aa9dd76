"""Process-wide compute settings: device, precision, torch threads and seeds, set deliberately.

Two torch threads on a shared 2-core machine ran 30x slower in one trial here, so the thread count
(torch's, and the BLAS and OpenMP pools numpy and scikit-learn use) defaults to half the cores
(one on such a machine) and can be set with UNLEARNING_AUDIT_THREADS.
"""

from __future__ import annotations

import os
import random
import threading

import numpy as np
import torch
from threadpoolctl import threadpool_limits

# Environment defaults for every Prefect process this package starts (CLI runs, against a temporary
# local server (local_prefect.LocalAPI) where none is configured; the local server and its
# workers): a patient temporary-server start, no telemetry, our logs shown.
PREFECT_ENV = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "unlearning_audit",
}


def threads() -> int:
    """The torch intra-op thread count to use."""
    env = os.environ.get("UNLEARNING_AUDIT_THREADS")
    return int(env) if env else max(1, (os.cpu_count() or 2) // 2)


SEEDING = threading.RLock()
"""Held while seeding the process-wide generators and drawing from them (a model's random
initialisation), so that stages running in two threads at once never interleave draws."""


def setup(seed: int, device: str = "auto") -> torch.device:
    """Seed every generator, set torch and BLAS threads, and return the device to compute on."""
    torch.set_num_threads(threads())
    threadpool_limits(threads())
    with SEEDING:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
    return resolve_device(device)


def resolve_device(device: str = "auto") -> torch.device:
    """The device ``device`` names; auto: the CUDA GPU where torch sees one, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def supports_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16: a CUDA GPU of compute capability 8.0 or more
    (older ones only emulate it, slowly), or a CPU or MPS device whose matrix products autocast
    to bfloat16 (the CPU's do in torch 2)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            x = torch.ones(2, 2, device=device)
            return (x @ x).dtype == torch.bfloat16
    except RuntimeError:
        return False


def resolve_precision(precision: str, device: str = "auto") -> str:
    """The precision the training stages run in on ``device`` (a device name, as in setup):
    auto is bf16-mixed on a CUDA GPU that computes in bf16 (half the activation memory, fast
    matrix units), else fp32 (CPU runs, the embedded model's included, compute as before)."""
    if precision != "auto":
        return precision
    resolved = resolve_device(device)
    return "bf16-mixed" if resolved.type == "cuda" and supports_bf16(resolved) else "fp32"
