"""The simulated NIC shares its bandwidth between the transfers in flight (processor sharing): a small message
issued during a large transfer finishes after its own share, not after the large one; alone, a transfer takes
bytes / bandwidth."""
from __future__ import annotations

import math
import time

from hecate.collectives.simulated_network import SharedLink

MB = 1_000_000


def test_a_lone_transfer_takes_bytes_over_bandwidth():
    link = SharedLink(bytes_per_s=10 * MB)
    now = time.monotonic()
    transfer = link.start(now, 2 * MB)
    assert math.isclose(link.done_at(transfer), now + 0.2, abs_tol=1e-9)


def test_concurrent_transfers_share_the_link():
    link = SharedLink(bytes_per_s=10 * MB)
    now = time.monotonic()
    big = link.start(now, 5 * MB)
    small = link.start(now, 1 * MB)
    # both at 5 MB/s until the small one is done (0.2 s), then the big one alone: 4 MB left at 10 MB/s
    assert math.isclose(link.done_at(small), now + 0.2, abs_tol=1e-9)
    assert math.isclose(link.done_at(big), now + 0.6, abs_tol=1e-9)


def test_a_later_transfer_slows_the_earlier_one_only_from_its_issue():
    link = SharedLink(bytes_per_s=10 * MB)
    now = time.monotonic()
    first = link.start(now, 3 * MB)
    second = link.start(now + 0.1, 1 * MB)  # first has 2 MB left; both at 5 MB/s for 0.2 s, then 1 MB alone
    assert math.isclose(link.done_at(second), now + 0.3, abs_tol=1e-9)
    assert math.isclose(link.done_at(first), now + 0.4, abs_tol=1e-9)
