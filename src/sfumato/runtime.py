"""Where computations run: the default device and torch's CPU thread count."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

__all__ = ["default_device", "torch_threads"]


def default_device() -> torch.device:
    """CUDA (this process's ``LOCAL_RANK`` under torchrun) if available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op CPU threads to ``n`` (small tensors run fastest, and
    reproducibly, on one thread; several threads on a busy machine mostly spin). ``None`` or
    0 leaves the count alone."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(old)
