"""``ids``: UUIDv7 generation, one at a time (``new_id``) and per read (``new_ids``).

1M IDs each way. ``records_per_s`` / ``cpu_us_per_record`` are for single IDs;
``batch_*`` for ``new_ids(1000)``, whose call durations give the latency percentiles
(``p50_ms`` … : the time one read's 1000 IDs take). The 1M single IDs are also checked
unique and strictly increasing.
"""

from __future__ import annotations

import itertools
import time

from bench.common import Window, percentiles_ms, report

N = 1_000_000
BATCH = 1000


def main() -> dict:
    from plantbus.broker.ids import new_id, new_ids

    w = Window()
    ids = [new_id() for _ in range(N)]
    single = w.stop()
    ok = len(set(ids)) == N and all(a < b for a, b in itertools.pairwise(ids))
    del ids

    calls = []
    pc = time.perf_counter
    w = Window()
    for _ in range(N // BATCH):
        t = pc()
        new_ids(BATCH)
        calls.append(pc() - t)
    batch = w.stop()

    return report(
        "ids",
        records_per_s=N / single.elapsed,
        cpu_us_per_record=single.cpu / N * 1e6,
        latency=percentiles_ms(calls),
        single_us_per_id=round(single.elapsed / N * 1e6, 3),
        batch_us_per_id=round(batch.elapsed / N * 1e6, 3),
        batch_ids_per_s=round(N / batch.elapsed),
        batch_size=BATCH,
        unique_increasing=ok,
        goal_us_per_id=1.0,
        goal_met=single.elapsed / N * 1e6 < 1.0,
    )
