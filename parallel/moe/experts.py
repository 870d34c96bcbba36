"""Expert computation as a pure function of (rows sorted by expert, rows per expert, the experts' weights).

The weights are arguments, not module state, so that FSSDP can pass weights it materialized from other devices
and EP can pass only its local experts'. Three ways compute the same function (:data:`EXPERT_GEMMS`):
- ``loop``: one matmul chain per expert, never a loop over tokens. On this CPU one ``mm`` per expert beat
  ``torch._grouped_mm`` in fp32 (~150 vs ~105 GFLOP/s), so the CPU keeps it.
- ``grouped``: torch's grouped GEMM (``torch._grouped_mm``, rows cut by cumulative offsets), on GPUs that have it
  (compute capability 9.0 and later).
- ``padded``: each expert's rows padded with zero rows to the largest count, then one batched matmul; on other
  GPUs. Zero rows give zero hidden values (gelu(0) = silu(0) = 0), so they add nothing to any gradient.

Shapes: N rows sorted by expert, D model dim, F expert hidden dim, E experts, M the largest count of an expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hecate.parallel.moe.ffn import ffn, init_ffn_weights

EXPERT_GEMMS = ("loop", "grouped", "padded")
GROUPED_MM_CAPABILITY = (9, 0)  # torch's CUDA grouped GEMM kernels need Hopper or later
GROUPED_MM_ALIGN = 8  # its row strides must be multiples of 16 bytes: 8 bf16 values (and so 4 fp32 ones)


def expert_gemm_for(device: torch.device) -> str:
    """Which way computes the experts on ``device``: the loop on the CPU, grouped GEMM where the GPU has it,
    else the padded batched matmul."""
    if device.type != "cuda":
        return "loop"
    return "grouped" if torch.cuda.get_device_capability(device) >= GROUPED_MM_CAPABILITY else "padded"


class ExpertWeights:
    """The held experts' weights, stacked [E, ...]. A forward that computes its experts in several calls (overlap
    chunks) uses each expert's weights where its rows are; the loop reads them through one ``unbind`` per forward
    (not ``w[e]``) because its backward is one stack, where E indexings would be E full-size scatters."""

    def __init__(
        self,
        w1_EDF: torch.Tensor,
        w2_EFD: torch.Tensor,
        w3_EDF: torch.Tensor | None,
        activation: str,
        gemm: str | None = None,
    ):
        self.w1_EDF, self.w2_EFD, self.w3_EDF = w1_EDF, w2_EFD, w3_EDF
        self.activation = activation
        self.gemm = gemm if gemm is not None else expert_gemm_for(w1_EDF.device)
        self._unbound: tuple | None = None

    def __call__(self, x_ND: torch.Tensor, counts: list[int], first: int = 0) -> torch.Tensor:
        """y_ND for experts first, first + 1, ... with ``counts`` rows each (x_ND sorted by expert). An expert
        with no rows still takes part, so its weights get a (zero) gradient."""
        gemm = self.gemm
        if gemm == "grouped" and any(n % GROUPED_MM_ALIGN for n in self.w1_EDF.shape[1:]):
            gemm = "padded"  # shapes the grouped GEMM does not take
        if gemm == "loop":
            return self._loop(x_ND, counts, first)
        last = first + len(counts)
        w1, w2 = self.w1_EDF[first:last], self.w2_EFD[first:last]
        w3 = self.w3_EDF[first:last] if self.w3_EDF is not None else None
        compute = grouped_ffn if gemm == "grouped" else padded_ffn
        return compute(x_ND, counts, w1, w2, w3, self.activation)

    def _loop(self, x_ND: torch.Tensor, counts: list[int], first: int) -> torch.Tensor:
        if self._unbound is None:
            w3 = self.w3_EDF.unbind(0) if self.w3_EDF is not None else (None,) * self.w1_EDF.shape[0]
            self._unbound = (self.w1_EDF.unbind(0), self.w2_EFD.unbind(0), w3)
        w1, w2, w3 = self._unbound
        experts = range(first, first + len(counts))
        return torch.cat(
            [ffn(x, w1[e], w2[e], w3[e], self.activation) for x, e in zip(x_ND.split(counts), experts, strict=True)]
        )


def grouped_ffn(
    x_ND: torch.Tensor,
    counts: list[int],
    w1_EDF: torch.Tensor,
    w2_EFD: torch.Tensor,
    w3_EDF: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    """The experts' FFN as three grouped GEMMs. ``torch._grouped_mm`` is not on autocast's lists: under autocast
    its operands are cast to the autocast dtype here, as a matmul's would be."""
    dtype = torch.get_autocast_dtype(x_ND.device.type) if torch.is_autocast_enabled(x_ND.device.type) else x_ND.dtype
    offsets_E = torch.tensor(counts, device=x_ND.device).cumsum(0).to(torch.int32)
    x = x_ND.to(dtype)

    def gemm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch._grouped_mm(a, w.to(dtype), offs=offsets_E)

    h_NF = gemm(x, w1_EDF)
    h_NF = F.silu(h_NF) * gemm(x, w3_EDF) if activation == "swiglu" else F.gelu(h_NF)
    return gemm(h_NF, w2_EFD)


def padded_ffn(
    x_ND: torch.Tensor,
    counts: list[int],
    w1_EDF: torch.Tensor,
    w2_EFD: torch.Tensor,
    w3_EDF: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    """The experts' FFN as batched matmuls over [E, M, D], every expert's rows padded with zeros to M."""
    experts, rows = len(counts), max(counts, default=0)
    counts_E = torch.tensor(counts, device=x_ND.device)
    expert_N = torch.repeat_interleave(torch.arange(experts, device=x_ND.device), counts_E)
    slot_N = torch.arange(x_ND.shape[0], device=x_ND.device) - (counts_E.cumsum(0) - counts_E)[expert_N]
    x_EMD = x_ND.new_zeros(experts, rows, x_ND.shape[1]).index_put((expert_N, slot_N), x_ND)
    h_EMF = torch.bmm(x_EMD, w1_EDF)
    h_EMF = F.silu(h_EMF) * torch.bmm(x_EMD, w3_EDF) if activation == "swiglu" else F.gelu(h_EMF)
    return torch.bmm(h_EMF, w2_EFD)[expert_N, slot_N]


class Experts(nn.Module):
    """Holds the E experts' weights, stacked [E, ...]; the math is :class:`ExpertWeights`."""

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden: int,
        activation: str,
        init_std: float = 0.02,
        out_init_std: float | None = None,
    ):
        super().__init__()
        self.activation = activation
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, hidden)) if activation == "swiglu" else None
        init_ffn_weights(self.w1, self.w2, self.w3, init_std, out_init_std)

    def forward(
        self, x_ND: torch.Tensor, counts_E: torch.Tensor, first: int = 0, weights: ExpertWeights | None = None
    ) -> torch.Tensor:
        """Experts first, first + 1, ... on ``counts_E`` rows each. A forward that calls this several times
        (overlap chunks) passes the ``weights`` of one :meth:`unbound`."""
        return (weights or self.unbound())(x_ND, counts_E.tolist(), first)

    def unbound(self) -> ExpertWeights:
        return ExpertWeights(self.w1, self.w2, self.w3, self.activation)
