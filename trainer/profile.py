"""``--profile-step K`` (``logging.profile_step``): a Chrome/Perfetto timeline of step K.

For that one step, module hooks mark compute on the ``compute`` track - each block's attention and each MoE
layer's router and experts, in forward and in backward - and the transports (``collectives/simulated_network.py``)
put each collective on a track of its own. Every rank writes ``profile/stepK.rankR.json`` in the run folder; rank 0
merges them into ``profile_stepK.json``, one process per rank. Open it in https://ui.perfetto.dev.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import nn
from torch.utils.hooks import RemovableHandle

from hecate.collectives.timeline import COMPUTE, Timeline, merge_traces, now_ns
from hecate.parallel.moe import MoE
from hecate.parallel.parallelize import Parallel

MERGE_WAIT_S = 30.0  # how long rank 0 waits for the other ranks' files after the barrier


def compute_modules(model: nn.Module) -> dict[str, tuple[nn.Module, bool]]:
    """The spans on the compute track: attention and every MoE layer's experts (forward and backward), and the
    routers (forward: their output is a Routing record, which module backward hooks cannot follow)."""
    marked = {}
    for name, module in model.named_modules():
        if name.endswith(".attn") or name == "attn":
            marked[name] = (module, True)
        if isinstance(module, MoE):
            marked[f"{name}.router"] = (module.router, False)
            marked[f"{name}.experts"] = (module.experts, True)
    return marked


def mark_compute(model: nn.Module, timeline: Timeline) -> list[RemovableHandle]:
    """Forward and backward hooks that put each compute module's work on the compute track."""
    started: dict[tuple[str, str], int] = {}

    def begin(key: tuple[str, str]):
        return lambda *_: started.__setitem__(key, now_ns())

    def end(key: tuple[str, str]):
        return lambda *_: timeline.add(COMPUTE, " ".join(key), started.pop(key, now_ns()), now_ns())

    hooks = []
    for name, (module, backward) in compute_modules(model).items():
        hooks += [
            module.register_forward_pre_hook(begin((name, "forward"))),
            module.register_forward_hook(end((name, "forward"))),
        ]
        if backward:
            hooks += [
                module.register_full_backward_pre_hook(begin((name, "backward"))),
                module.register_full_backward_hook(end((name, "backward"))),
            ]
    return hooks


@contextmanager
def profiled_step(model: nn.Module, parallel: Parallel, run_dir: Path, step: int, profile_step: int) -> Iterator[None]:
    """Record step ``step`` (1-based) when it is ``profile_step``; else do nothing."""
    if step != profile_step:
        yield
        return
    if parallel.timeline is None:
        parallel.timeline = Timeline(parallel.rank)
    timeline = parallel.timeline
    hooks = mark_compute(model, timeline)
    timeline.recording = True
    try:
        with timeline.span(f"step {step}", track="step"):
            yield
    finally:
        timeline.recording = False
        for hook in hooks:
            hook.remove()
    own = timeline.write(run_dir / "profile" / f"step{step}.rank{parallel.rank}.json")
    parallel.barrier()
    if parallel.is_main:
        paths = [own.with_name(f"step{step}.rank{r}.json") for r in range(parallel.dims.world)]
        deadline = time.monotonic() + MERGE_WAIT_S  # a shared filesystem may show the files late
        while not all(p.is_file() for p in paths) and time.monotonic() < deadline:
            time.sleep(0.1)
        merge_traces([p for p in paths if p.is_file()], run_dir / f"profile_step{step}.json")
