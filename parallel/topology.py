"""The parallel layout of a run: validated degrees, the rank groups they imply, and the DeviceMesh views.

World = PP x (dense: DP x TP) and, folded over the same ranks of each pipeline stage, PP x (MoE: EDP x EP x ETP)
(docs/ARCHITECTURE.md, "Folding"). Ranks are laid out with the pipeline stage outermost and tensor parallelism
innermost, so the TP and EP x ETP groups of a stage are contiguous ranks. Everything here is a pure function of the
degrees except :func:`build_meshes`, which creates the process groups once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hecate.parallel.config import ParallelConfig
from hecate.parallel.errors import LayoutError

DENSE_DIMS = ("pp", "dp", "tp")
MOE_DIMS = ("pp", "edp", "ep", "etp")


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of every dimension; ``edp`` (expert data parallelism) is derived: dp * tp / (ep * etp)."""

    world: int
    dp: int
    tp: int
    pp: int
    ep: int
    etp: int

    @property
    def edp(self) -> int:
        return self.dp * self.tp // (self.ep * self.etp)

    @classmethod
    def from_config(
        cls, cfg: ParallelConfig, world: int, num_experts: int, n_layers: int, n_heads: int
    ) -> ParallelDims:
        """Check that the layout fits the world and the model; every error names the fields involved."""
        if world < 1:
            raise LayoutError(f"world size must be >= 1, got {world}")
        stage = cfg.pp * cfg.tp
        if world % stage:
            raise LayoutError(
                f"parallel.pp={cfg.pp} x parallel.tp={cfg.tp} = {stage} must divide the world size {world}"
            )
        dp = world // stage if cfg.dp == -1 else cfg.dp
        if cfg.pp * dp * cfg.tp != world:
            raise LayoutError(
                f"parallel.pp={cfg.pp} x parallel.dp={dp} x parallel.tp={cfg.tp} = "
                f"{cfg.pp * dp * cfg.tp}, but the world size is {world} (set parallel.dp=-1 to derive it)"
            )
        if (dp * cfg.tp) % (cfg.ep * cfg.etp):
            raise LayoutError(
                f"parallel.ep={cfg.ep} x parallel.etp={cfg.etp} must divide the ranks of a pipeline "
                f"stage (dp x tp = {dp * cfg.tp})"
            )
        if num_experts % cfg.ep:
            raise LayoutError(f"moe.num_experts={num_experts} must be divisible by parallel.ep={cfg.ep}")
        if n_layers < cfg.pp:
            raise LayoutError(f"parallel.pp={cfg.pp} is larger than model.n_layers={n_layers}")
        if n_heads % cfg.tp:
            raise LayoutError(f"parallel.tp={cfg.tp} must divide model.n_heads={n_heads}")
        return cls(world=world, dp=dp, tp=cfg.tp, pp=cfg.pp, ep=cfg.ep, etp=cfg.etp)

    def dense_grid(self) -> np.ndarray:
        """Ranks as a [pp, dp, tp] array."""
        return np.arange(self.world).reshape(self.pp, self.dp, self.tp)

    def moe_grid(self) -> np.ndarray:
        """The same ranks as a [pp, edp, ep, etp] array (parallel folding)."""
        return np.arange(self.world).reshape(self.pp, self.edp, self.ep, self.etp)

    def groups(self, dim: str) -> list[list[int]]:
        """The rank groups along one dimension, e.g. ``groups('ep')`` -> [[0, 1], [2, 3]]."""
        if dim in DENSE_DIMS:
            grid, names = self.dense_grid(), DENSE_DIMS
        elif dim in MOE_DIMS:
            grid, names = self.moe_grid(), MOE_DIMS
        else:
            raise ValueError(f"unknown dimension {dim!r}")
        axis = names.index(dim)
        return np.moveaxis(grid, axis, -1).reshape(-1, grid.shape[axis]).tolist()

    def coordinates(self, rank: int) -> dict[str, int]:
        """Where ``rank`` sits along every dimension (e.g. its dp rank is ``coordinates(r)['dp']``)."""
        dense = dict(zip(DENSE_DIMS, np.argwhere(self.dense_grid() == rank)[0].tolist()))
        moe = dict(zip(MOE_DIMS, np.argwhere(self.moe_grid() == rank)[0].tolist()))
        return {**dense, **moe}


@dataclass
class Meshes:
    """The two views of the same ranks: dense layers use ``dense`` (pp, dp, tp), MoE layers ``moe``
    (pp, edp, ep, etp). Modules receive these, never raw rank arithmetic."""

    dims: ParallelDims
    dense: object
    moe: object


def build_meshes(dims: ParallelDims, device_type: str = "cpu") -> Meshes:
    """Create both DeviceMesh views (once per run; every rank must call this in the same order)."""
    from torch.distributed.device_mesh import DeviceMesh

    dense = DeviceMesh(device_type, dims.dense_grid().tolist(), mesh_dim_names=DENSE_DIMS)
    moe = DeviceMesh(device_type, dims.moe_grid().tolist(), mesh_dim_names=MOE_DIMS)
    return Meshes(dims=dims, dense=dense, moe=moe)
