"""``encode``: ``plantbus.codecs.line_protocol.encode`` on the shape, against ``r_enc``.

500k records of the shape (pre-built ``Record`` objects over ``DEVICES`` series, so each
series' cached prefix is reused as in the daemon) are encoded in 5000-record batches, as
an outlet does, best of 3 passes. ``p50_ms`` … are the durations of one 5000-record
``encode`` call: the time it holds the event loop. ``vs_r_enc`` is the codec's rate over
the raw f-string loop's; ``same_bytes`` says whether both produced identical lines.
"""

from __future__ import annotations

import time

from bench.common import (
    BATCH_LINES,
    DEVICES,
    Window,
    encode_tuples,
    env_baselines,
    make_series,
    make_tuples,
    percentiles_ms,
    report,
    series_prefix,
)

N = 500_000
PASSES = 3


def main() -> dict:
    from plantbus.broker.record import Record
    from plantbus.codecs import line_protocol as lp

    tuples = make_tuples(N)
    series = make_series()
    records = [
        Record(series[s], {"temp": a, "pressure": p, "level": lv, "n": c, "running": ok}, ts, uid)
        for s, a, p, lv, c, ok, uid, ts in tuples
    ]
    batches = [records[i : i + BATCH_LINES] for i in range(0, N, BATCH_LINES)]
    pc = time.perf_counter
    best: Window | None = None
    calls: list[float] = []
    payloads: list[bytes] = []
    for _ in range(PASSES):
        pass_calls = []
        out = []
        w = Window()
        for b in batches:
            t = pc()
            out.append(lp.encode(b, lp.EncodeStats(), uid_field="uid"))
            pass_calls.append(pc() - t)
        w.stop()
        if best is None or w.elapsed < best.elapsed:
            best, calls, payloads = w, pass_calls, out
    assert best is not None
    raw = encode_tuples(tuples, [series_prefix(i) for i in range(DEVICES)])
    rate = N / best.elapsed
    r_enc = env_baselines()["r_enc"]
    return report(
        "encode",
        records_per_s=rate,
        cpu_us_per_record=best.cpu / N * 1e6,
        latency=percentiles_ms(calls),
        batch_records=BATCH_LINES,
        vs_r_enc=round(rate / r_enc, 3) if r_enc == r_enc else None,
        bytes_per_line=round(sum(map(len, payloads)) / N, 1),
        # a trailing newline (or not) is the codec's choice; the lines must be identical
        same_bytes=[p.rstrip(b"\n") for p in payloads] == raw,
    )
