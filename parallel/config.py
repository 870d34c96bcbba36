"""The parts of the run config that ``parallel/`` reads. They are plain dataclasses so that the trainer's
config (``hecate.trainer.config``) can nest them and validate them with the rest, before any worker starts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hecate.collectives.errors import ConfigError
from hecate.collectives.factory import TRANSPORT_KINDS
from hecate.parallel.fssdp.planner import check_budget
from hecate.parallel.fssdp.policies import POLICIES as FSSDP_POLICIES

ACTIVATIONS = ("gelu", "swiglu")
SCORES = ("softmax", "sigmoid")


def require_finite(field: str, value: float) -> None:
    """NaN passes every range check written as a comparison (``nan < 0`` is False) and inf is never a sensible
    setting: every float field goes through this first."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(field, f"must be a finite number, got {value}")


@dataclass
class MoEConfig:
    """Mixture-of-Experts FFN settings (one MoE layer every ``every`` transformer blocks)."""

    num_experts: int = 8
    top_k: int = 2
    every: int = 1  # block i is MoE when (i + 1) % every == 0 and i >= first_moe_block; the others are dense
    first_moe_block: int = 0  # blocks before this one have a dense FFN (DeepSeek's first dense blocks)
    ffn_dim: int = 256  # hidden size of one expert
    activation: str = "gelu"  # gelu: two matrices; swiglu: three
    score: str = "softmax"  # softmax over experts, or independent sigmoid scores (DeepSeek-V3 style)
    renormalize: bool = True  # rescale the k chosen weights to sum to 1 (Mixtral); false: the raw scores (OLMoE)
    aux_loss_coef: float = 0.01  # Switch/GShard load-balancing loss
    z_loss_coef: float = 0.001  # router z-loss (ST-MoE)
    bias_update_rate: float = 0.0  # aux-loss-free balancing (expert bias on selection only); 0 = off
    capacity_factor: float = 0.0  # 0 = dropless; else each expert keeps ceil(cf * tokens * k / E) pairs
    shared_experts: int = 0  # always-on experts added to every token's output
    shared_ffn_dim: int = 0  # hidden size of one shared expert; 0 = ffn_dim
    shared_gate: bool = False  # scale the shared experts' output by sigmoid(x w_gate), w_gate [1, D] (Qwen2-MoE)
    overlap_chunks: int = 1  # chunks (runs of experts) pipelined through dispatch / experts / combine; 1 = off
    # the block's batch split in this many sub-batches: each one's tokens travel to the experts while the next
    # one's attention computes; 1 = off; dropless only (capacity ranks the whole batch's pairs)
    overlap_sub_batches: int = 1

    def is_moe_block(self, index: int) -> bool:
        """Block ``index`` (0-based) is an MoE block from ``first_moe_block`` on, every ``every`` blocks (the last of
        each group of ``every``)."""
        return index >= self.first_moe_block and (index + 1) % self.every == 0

    @property
    def shared_hidden(self) -> int:
        """Hidden size of the shared experts together: k experts of F are one FFN of k F (their outputs add)."""
        return self.shared_experts * (self.shared_ffn_dim or self.ffn_dim)

    def validate(self, prefix: str = "moe") -> None:
        if self.num_experts < 1:
            raise ConfigError(f"{prefix}.num_experts", f"must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"{prefix}.top_k", f"must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.every < 1:
            raise ConfigError(f"{prefix}.every", f"must be >= 1 (1 = every block is MoE), got {self.every}")
        if self.ffn_dim < 1:
            raise ConfigError(f"{prefix}.ffn_dim", f"must be >= 1, got {self.ffn_dim}")
        for name in ("first_moe_block", "shared_experts", "shared_ffn_dim"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{prefix}.{name}", f"must be >= 0, got {getattr(self, name)}")
        if self.shared_gate and not self.shared_experts:
            raise ConfigError(f"{prefix}.shared_gate", f"gates the shared experts: set {prefix}.shared_experts >= 1")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"{prefix}.activation", f"must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.score not in SCORES:
            raise ConfigError(f"{prefix}.score", f"must be one of {SCORES}, got {self.score!r}")
        if self.overlap_chunks < 1:
            raise ConfigError(f"{prefix}.overlap_chunks", f"must be >= 1 (1 = no overlap), got {self.overlap_chunks}")
        if self.overlap_sub_batches < 1:
            raise ConfigError(
                f"{prefix}.overlap_sub_batches", f"must be >= 1 (1 = off), got {self.overlap_sub_batches}"
            )
        if self.overlap_sub_batches > 1 and self.capacity_factor > 0:
            raise ConfigError(
                f"{prefix}.overlap_sub_batches",
                f"needs dropless routing ({prefix}.capacity_factor=0): "
                f"capacity drops pairs by their rank in the whole batch, got capacity_factor="
                f"{self.capacity_factor}",
            )
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate", "capacity_factor"):
            require_finite(f"{prefix}.{name}", getattr(self, name))
            if getattr(self, name) < 0:
                raise ConfigError(f"{prefix}.{name}", f"must be >= 0, got {getattr(self, name)}")


@dataclass
class ParallelConfig:
    """How the world is split. dp = -1 means 'whatever is left of the world'."""

    dp: int = -1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    pp_virtual: int = 1  # pipeline stages per pipeline rank; > 1 runs interleaved 1F1B instead of 1F1B
    # blocks of each pipeline stage in order, e.g. [3, 1]; empty = contiguous stages balanced by cost
    pp_stage_blocks: list[int] = field(default_factory=list)

    def validate(self, prefix: str = "parallel") -> None:
        if self.dp == 0 or self.dp < -1:
            raise ConfigError(f"{prefix}.dp", f"must be >= 1 or -1 (derived from the world size), got {self.dp}")
        for name in ("tp", "pp", "ep", "etp", "pp_virtual"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name}", f"must be >= 1, got {getattr(self, name)}")
        if any(n < 1 for n in self.pp_stage_blocks):
            raise ConfigError(f"{prefix}.pp_stage_blocks", f"every stage needs >= 1 block, got {self.pp_stage_blocks}")


POLICIES = ("off", *FSSDP_POLICIES)  # "off": the experts are held as parallel.ep says
AUTO = "auto"  # a budget derived from measurements (``hecate.parallel.fssdp.budgets``)
TRANSPORTS = tuple(TRANSPORT_KINDS)


@dataclass
class FssdpConfig:
    """Fully sharded sparse data parallelism for the MoE layers. With a policy other than
    ``off``, each expert is owned by one rank of the data-parallel group and the policy decides, every step,
    which experts are materialized where: ``ep`` none, ``fsdp`` all everywhere, ``shadow`` the
    ``memory_budget`` hottest everywhere, ``fssdp`` the Hecate planner."""

    policy: str = "off"
    window: int = 5  # steps in the sliding-window mean of per-expert token counts
    # expert copies that can arrive while a block's attention runs (per device); "auto": measured (budgets.py)
    overlap_budget: int | str = 2
    memory_budget: int | str = 2  # extra expert slots per device (per layer) for replicas; "auto": measured
    rematerialize: bool = False  # free replicas after forward, gather them again in backward
    reshard_every: int = 0  # heterogeneous re-sharding of ownership every K steps; 0 = off
    devices_per_node: int = 0  # ranks per node, for placement preferences; 0 = all ranks on one node
    min_imbalance: float = 1.05  # fssdp plans no replicas while the owners' max / mean expert load is at most this
    # memory_budget=auto: MiB per device the replicas may use; 0 = half of the device's measured free memory
    memory_cap_mib: int = 0
    calibrate: bool = False  # correct each forward's plan with the router's real counts when the saving pays

    def validate(self, prefix: str = "fssdp") -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"{prefix}.policy", f"must be one of {POLICIES}, got {self.policy!r}")
        for name in ("window",):
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name}", f"must be >= 1, got {getattr(self, name)}")
        for name in ("overlap_budget", "memory_budget"):
            if getattr(self, name) != AUTO:
                check_budget(f"{prefix}.{name}", getattr(self, name), also=f" or {AUTO!r} (derived from measurements)")
        for name in ("reshard_every", "devices_per_node", "memory_cap_mib"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{prefix}.{name}", f"must be >= 0, got {getattr(self, name)}")
        require_finite(f"{prefix}.min_imbalance", self.min_imbalance)
        if self.min_imbalance < 1:
            raise ConfigError(
                f"{prefix}.min_imbalance", f"must be >= 1 (a max / mean load ratio), got {self.min_imbalance}"
            )

    @property
    def enabled(self) -> bool:
        return self.policy != "off"


@dataclass
class CollectivesConfig:
    """Which transport carries the MoE token exchanges (pair counts, dispatch and combine all-to-alls on the ep and
    edp groups): ``torch`` (torch.distributed: gloo on CPU, NCCL on GPU), ``mpi`` (mpi4py; workers started by
    ``mpirun``) or ``cupy`` (NCCL through cupy; GPU only). Router sums, FSSDP's sparse collectives and dense
    gradients use torch.distributed."""

    transport: str = "torch"

    def validate(self, prefix: str = "collectives") -> None:
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"{prefix}.transport", f"must be one of {TRANSPORTS}, got {self.transport!r}")
