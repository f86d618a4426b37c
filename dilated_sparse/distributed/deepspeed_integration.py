"""DeepSpeed integration: take DeepSpeed's sequence-parallel process group when it has one.

DeepSpeed is never imported here: if the user's program has not imported it, it cannot have been
initialised, and importing it would only cost start-up time.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["deepspeed_available", "deepspeed_sequence_parallel_group"]


def deepspeed_available() -> bool:
    """Whether DeepSpeed is imported in this process and ``torch.distributed`` is initialised.

    DeepSpeed's own communication layer (``deepspeed.comm``) wraps ``torch.distributed``; its
    process groups (``deepspeed.utils.groups``) are plain ``torch.distributed`` groups.
    """
    if "deepspeed" not in sys.modules:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def deepspeed_sequence_parallel_group() -> Any | None:
    """DeepSpeed's sequence-parallel group, or ``None`` when DeepSpeed has none.

    DeepSpeed keeps it in ``deepspeed.utils.groups``: from the ``mpu`` passed to
    ``deepspeed.initialize`` (``mpu.get_sequence_parallel_group()``) or from the device mesh
    it builds for ``sequence_parallel_size``. ``None`` when DeepSpeed is not imported, the
    process group is not initialised, or DeepSpeed has no such group.
    """
    if not deepspeed_available():
        return None
    try:
        from deepspeed.utils import groups
    except Exception:  # noqa: BLE001
        return None
    try:
        return groups._get_sequence_parallel_group()
    except (KeyError, AssertionError, AttributeError, RuntimeError):
        return None
