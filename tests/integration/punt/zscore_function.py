"""A function container for the punt tests: a rolling z-score anomaly scorer over HTTP.

Run as its own process (``python zscore_function.py PORT [--window N] [--anomalies Z]``); it
prints ``listening on PORT`` once it accepts requests.

``POST /score`` takes a JSON array of records (plantbus's JSON record shape) and scores every
numeric field of each record against the last ``--window`` values of that field of the same
topic: ``z = (value - mean) / stdev`` (0 until two values are known, or when stdev is 0).

* default: one result per input, in order, with no ``parent``, ``topic``, ``uid`` or ``time``
  (plantbus fills them in): ``{"measurement": "zscore", "tags": {...}, "fields": {"<field>_z":
  z, ...}}``;
* ``--anomalies Z``: only results with some ``|z| >= Z``, each naming its ``parent`` and its
  ``time`` (the source's time + 1 ns), on the topic ``anomalies/<source topic>``.

Faults on demand, for the breaker tests: ``POST /mode`` with ``ok``, ``fail`` (HTTP 500 with
a message), ``hang`` (no answer until the mode changes) or ``garbage`` (HTTP 200 with an HTML
page). ``GET /stats`` gives the counts: ``requests`` by mode, ``records`` scored (each record
counted once however often its batch is sent) and ``hanging`` (requests held right now).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
from collections import deque

from aiohttp import web

GARBAGE = (
    "<html><head><title>502 Bad Gateway</title></head><body><h1>Bad Gateway</h1>"
    + "<p>The proxy in front of the function could not reach it. " * 20
    + "</p></body></html>"
)


class Scorer:
    """Rolling mean and standard deviation per (topic, field) over the last ``window`` values."""

    def __init__(self, window: int):
        self.window = window
        self.history: dict[tuple[str, str], deque[float]] = {}

    def z(self, topic: str, field: str, value: float) -> float:
        past = self.history.setdefault((topic, field), deque(maxlen=self.window))
        z = 0.0
        if len(past) >= 2:
            mean = sum(past) / len(past)
            var = sum((x - mean) ** 2 for x in past) / (len(past) - 1)
            if var > 0:
                z = (value - mean) / math.sqrt(var)
        past.append(value)
        return z


class Function:
    def __init__(self, window: int, anomalies: float | None):
        self.scorer = Scorer(window)
        self.anomalies = anomalies
        self.mode = "ok"
        self.mode_changed = asyncio.Event()
        self.requests: dict[str, int] = {}
        self.scored: set[str] = set()
        self.hanging = 0

    async def score(self, request: web.Request) -> web.Response:
        mode = self.mode
        self.requests[mode] = self.requests.get(mode, 0) + 1
        body = await request.read()
        if mode == "fail":
            return web.Response(status=500, text="scorer crashed: simulated failure")
        if mode == "garbage":
            return web.Response(status=200, text=GARBAGE, content_type="text/html")
        if mode == "hang":
            self.hanging += 1
            try:
                while self.mode == "hang":
                    await self.mode_changed.wait()
            finally:
                self.hanging -= 1
            return web.Response(status=503, text="was hanging")
        records = json.loads(body)
        results = [r for r in map(self._score_one, records) if r is not None]
        return web.json_response(results)

    def _score_one(self, record: dict) -> dict | None:  # type: ignore[type-arg]
        uid = record["uid"]
        fresh = uid not in self.scored  # a batch sent again must not move the window twice
        self.scored.add(uid)
        zs = {}
        for name, value in record["fields"].items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if fresh:
                zs[f"{name}_z"] = self.scorer.z(record["topic"], name, float(value))
            else:
                zs[f"{name}_z"] = 0.0
        tags = dict(record.get("tags", {}))
        if self.anomalies is None:
            return {"measurement": "zscore", "tags": tags, "fields": zs}
        if not any(abs(z) >= self.anomalies for z in zs.values()):
            return None
        return {
            "parent": uid,
            "topic": f"anomalies/{record['topic']}",
            "time": record["time"] + 1,
            "measurement": "anomaly",
            "tags": tags,
            "fields": zs,
        }

    async def set_mode(self, request: web.Request) -> web.Response:
        mode = (await request.text()).strip()
        if mode not in ("ok", "fail", "hang", "garbage"):
            return web.Response(status=400, text=f"unknown mode {mode!r}")
        self.mode = mode
        self.mode_changed.set()
        self.mode_changed = asyncio.Event()
        return web.Response(text=mode)

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"requests": self.requests, "records": len(self.scored), "hanging": self.hanging}
        )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--anomalies", type=float, default=None)
    args = parser.parse_args()
    function = Function(args.window, args.anomalies)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/score", function.score)
    app.router.add_post("/mode", function.set_mode)
    app.router.add_get("/stats", function.stats)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port).start()
    print(f"listening on {args.port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
