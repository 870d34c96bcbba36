"""Expert and data parallelism reproduce the single-process reference: per-step losses, the gradients of every
step (gathered) and the final parameters, for EP=N, DP=2 x EP=2 and DP=N on 2 and 4 real processes (gloo),
dropless and with capacity dropping. Every layout trains the same global batch of the same samples per step.
Tolerances: tests/parity.py.
"""

from __future__ import annotations

import pytest
from parity import assert_matches, small_config, train

from hecate.launch.simulate import run_workers

pytestmark = pytest.mark.slow  # starts processes

STEPS = 5
LAYOUTS = [  # (world, parallel overrides)
    (2, ["parallel.ep=2"]),
    (2, []),  # DP=2, no EP
    (4, ["parallel.ep=4"]),
    (4, ["parallel.ep=2"]),  # DP=4 over the dense layers, folded as EDP=2 x EP=2 for the experts
    (4, []),  # DP=4, no EP
]
MODES = {"dropless": ["moe.capacity_factor=0"], "capacity": ["moe.capacity_factor=1.0"]}


@pytest.fixture(scope="module")
def reference(small_data, tmp_path_factory):
    """Single-process results per mode."""
    cfgs = [
        small_config(small_data, tmp_path_factory.mktemp(f"ref-{mode}"), extra, STEPS).to_dict()
        for mode, extra in MODES.items()
    ]
    return dict(zip(MODES, train(cfgs, distributed=False)))


@pytest.mark.parametrize("world, layout", LAYOUTS, ids=[f"world{w}-{'-'.join(o) or 'dp'}" for w, o in LAYOUTS])
def test_layout_matches_single_process(world, layout, reference, small_data, tmp_path):
    cfgs = [small_config(small_data, tmp_path / mode, extra + layout, STEPS).to_dict() for mode, extra in MODES.items()]
    results = run_workers(train, world, cfgs, True, timeout_s=300)[0]
    for mode, got in zip(MODES, results):
        assert_matches(got, reference[mode], mode)


def test_capacity_mode_drops_pairs(reference):
    """Without drops the capacity case would not test the global dropping rule."""
    assert all(d > 0 for d in reference["capacity"]["dropped"])
    assert not any(reference["dropless"]["dropped"])
