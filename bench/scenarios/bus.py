"""``bus``: publish → 3 subscribers, throughput and latency.

The publisher plays ``DEVICES`` devices, each read a batch of 100 fresh records of the
shape (a fresh ``Record`` per record, stamped with the publish time; that construction,
about 0.1 µs, is part of the measured CPU). Three subscriptions (``block``, 100k records,
as sinks have by default) are drained by three consumer tasks.

Two phases of ``min(BENCH_SECONDS, 10) / 2`` s each:

* flat out: the publisher publishes as fast as back-pressure lets it → ``records_per_s``
  and ``cpu_us_per_record`` (process CPU per record published, all three deliveries);
* paced at ``OFFERED`` records/s on a fixed-rate 10 ms schedule → ``p50_ms`` / ``p99_ms`` /
  ``max_ms``: from publish to a subscriber holding the batch (per batch taken, the age of
  its oldest record). The flat-out phase's latencies are reported as ``flat_out_*``:
  there they are queueing time in full queues.
"""

from __future__ import annotations

import asyncio
import time

from bench.common import (
    DEVICES,
    Window,
    bench_seconds,
    log,
    make_series,
    percentiles_ms,
    report,
    run_loop,
)

RECORDS_PER_READ = 100
OFFERED = 100_000
TICK = DEVICES * RECORDS_PER_READ / OFFERED  # one read of every device per tick: 10 ms
SUBSCRIBERS = 3


async def _phase(paced: bool, seconds: float) -> tuple[int, Window, list[float]]:
    from plantbus.broker.bus import Bus
    from plantbus.broker.ids import new_ids
    from plantbus.broker.record import Record

    bus = Bus()
    subs = [bus.subscribe(["bench/#"], size=100_000, name=f"s{i}") for i in range(SUBSCRIBERS)]
    series = make_series()
    fields = [
        {"temp": 21.5 + i, "pressure": 1.01, "level": 50.0, "n": i, "running": True}
        for i in range(RECORDS_PER_READ)
    ]
    lat: list[float] = []
    got = [0] * SUBSCRIBERS

    async def consume(i: int) -> None:
        sub = subs[i]
        tns = time.time_ns
        while True:
            recs = await sub.get()
            if not recs:
                return
            lat.append((tns() - recs[0].time_ns) / 1e9)
            got[i] += len(recs)

    consumers = [asyncio.create_task(consume(i)) for i in range(SUBSCRIBERS)]
    published = 0
    tns = time.time_ns
    ids = new_ids(RECORDS_PER_READ)  # the bus does not care; fresh IDs would only add cost

    async def publish_round() -> None:
        nonlocal published
        for s in series:
            now = tns()
            await bus.publish([Record(s, f, now, u) for f, u in zip(fields, ids, strict=True)])
            published += RECORDS_PER_READ

    # warm-up: fill caches, routes and allocator before measuring
    for _ in range(20):
        await publish_round()
        await asyncio.sleep(0)
    await asyncio.sleep(0.05)
    lat.clear()
    p0 = published
    w = Window()
    loop = asyncio.get_running_loop()
    start = loop.time()
    k = 0
    while True:
        await publish_round()
        k += 1
        now = loop.time()
        if now - start >= seconds:
            break
        if paced:
            await asyncio.sleep(max(0.0, start + k * TICK - now))
        else:
            await asyncio.sleep(0)
    w.stop()
    for s in subs:
        s.close()
    await asyncio.gather(*consumers)
    assert all(g == published for g in got), (got, published)
    return published - p0, w, lat


async def _run() -> dict:
    seconds = max(1.0, min(bench_seconds(), 10.0) / 2)
    n, w, flat_lat = await _phase(False, seconds)
    log(f"bus flat out: {n / w.elapsed:,.0f} records/s")
    n2, w2, paced_lat = await _phase(True, seconds)
    log(f"bus paced: {n2 / w2.elapsed:,.0f} records/s")
    flat = percentiles_ms(flat_lat)
    return report(
        "bus",
        records_per_s=n / w.elapsed,
        cpu_us_per_record=w.cpu / n * 1e6,
        latency=percentiles_ms(paced_lat),
        subscribers=SUBSCRIBERS,
        records_per_read=RECORDS_PER_READ,
        offered_per_s=OFFERED,
        paced_records_per_s=round(n2 / w2.elapsed),
        paced_cpu_us_per_record=round(w2.cpu / n2 * 1e6, 3),
        **{f"flat_out_{k}": v for k, v in flat.items()},
    )


def main() -> dict:
    return run_loop(_run())
