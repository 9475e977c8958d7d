"""Retry-After as the InfluxDB, Kapacitor and punt sinks read it."""

from __future__ import annotations

import email.utils
import time

import pytest

from plantbus.broker.sinks.base import retry_after_seconds


@pytest.mark.parametrize(
    ("header", "seconds"),
    [(None, None), ("", None), ("7", 7.0), (" 2.5 ", 2.5), ("-3", 0.0), ("soon", None)],
)
def test_delta_seconds_and_unreadable_values(header: str | None, seconds: float | None) -> None:
    assert retry_after_seconds(header) == seconds


def test_an_http_date_is_the_seconds_until_then() -> None:
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert retry_after_seconds(later) == pytest.approx(30, abs=1.5)
    earlier = email.utils.formatdate(time.time() - 30, usegmt=True)
    assert retry_after_seconds(earlier) == 0.0
