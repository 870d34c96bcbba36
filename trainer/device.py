"""Where a rank computes: ``train.device`` (auto | cpu | cuda) resolved to one torch.device, checked before any
worker starts, and the precision rule that depends on it.

A rank on CUDA uses ``cuda:LOCAL_RANK``; that device is made current before any CUDA work, so that NCCL, cupy and
every tensor created with ``device=`` land on it. More ranks than GPUs on a node is refused, except in the
simulated mode (``--simulate N`` on a machine with fewer GPUs), where ranks share a GPU, each capped to its share
of the GPU's memory. Weights are initialised on the CPU from the run's seed and then moved, so a run starts from
the same weights on every device.
"""

from __future__ import annotations

import math
import os

import torch

from hecate.collectives.errors import ConfigError
from hecate.trainer.config import DEVICES


def cuda_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def check_device(setting: str) -> None:
    """Refuse ``train.device=cuda`` on a machine without a usable GPU (called before any worker starts)."""
    if setting not in DEVICES:
        raise ConfigError("train.device", f"must be one of {DEVICES}, got {setting!r}")
    if setting == "cuda" and not cuda_available():
        why = "this torch is a CPU build" if torch.version.cuda is None else "no CUDA device is visible"
        raise ConfigError("train.device", f"is cuda but {why}: set train.device=cpu (or auto) to train on the CPU")


def device_type(setting: str) -> str:
    """'cuda' or 'cpu': what ``auto`` means on this machine."""
    check_device(setting)
    return "cuda" if setting == "cuda" or (setting == "auto" and cuda_available()) else "cpu"


def ranks_per_gpu(local_world_size: int, simulated: bool) -> int:
    """How many ranks of this node share one GPU: 1, or in the simulated mode as many as needed."""
    gpus = torch.cuda.device_count()
    if local_world_size <= gpus:
        return 1
    if not simulated:
        raise ConfigError(
            "train.device",
            f"is cuda but this node starts {local_world_size} ranks for {gpus} GPU(s): start at most one rank "
            f"per GPU (torchrun --nproc-per-node {gpus}), or use hecate train --simulate on one machine",
        )
    return math.ceil(local_world_size / gpus)


def given_own_gpu(local_world_size: int, simulated: bool) -> bool:
    """Whether the launcher gave this process one GPU of its own through CUDA_VISIBLE_DEVICES (Ray's GPU actors,
    ``srun --gpus-per-task=1``): it then sees one device, cuda:0, whatever its local rank."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    one_listed = bool(visible) and len(visible.split(",")) == 1
    return one_listed and not simulated and local_world_size > 1 and torch.cuda.device_count() == 1


def select_device(
    setting: str, local_rank: int = 0, local_world_size: int = 1, simulated: bool = False
) -> torch.device:
    """This rank's device, made current on CUDA (call before any other CUDA work): ``cuda:LOCAL_RANK``, or in the
    simulated mode ``cuda:LOCAL_RANK // ranks_per_gpu`` with this process capped to 1/ranks_per_gpu of its
    memory."""
    if device_type(setting) == "cpu":
        return torch.device("cpu")
    if given_own_gpu(local_world_size, simulated):
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        return device
    sharing = ranks_per_gpu(local_world_size, simulated)
    device = torch.device("cuda", local_rank // sharing)
    torch.cuda.set_device(device)
    if sharing > 1:
        torch.cuda.set_per_process_memory_fraction(1.0 / sharing, device)
    return device


def set_parity_precision(device: torch.device, dtype: str) -> None:
    """fp32 runs compute in true fp32 on the GPU too (no TF32 matmuls or convolutions), so that their losses can be
    compared with the CPU's; bf16 runs leave torch's defaults."""
    if device.type == "cuda" and dtype == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
