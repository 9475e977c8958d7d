"""The dead-letter file (format, size limit, unwritable path) and how the influxdb sink cuts
a line-protocol payload into lines for it."""

from __future__ import annotations

import logging
import re

from plantbus.broker.sinks.deadletter import DeadLetterFile
from plantbus.broker.sinks.influxdb import split_lines

_COMMENT = re.compile(r"# \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z sink=s batch=3 ")


def test_each_line_follows_a_comment_with_time_owner_and_reason(tmp_path):
    dl = DeadLetterFile(tmp_path / "dl" / "s.lp", 10_000, "sink=s")
    n = dl.append([(b"m f=1 1\n", "HTTP 400: bad\nreason"), (b"m f=2 2", "other")], "batch=3")
    assert n == 2 and (dl.lines, dl.dropped) == (2, 0)
    lines = (tmp_path / "dl" / "s.lp").read_text().split("\n")
    assert _COMMENT.match(lines[0]) and lines[0].endswith("HTTP 400: bad reason")
    assert lines[1] == "m f=1 1"
    assert _COMMENT.match(lines[2]) and lines[2].endswith(" other")
    assert lines[3:] == ["m f=2 2", ""]


def test_past_max_size_lines_are_counted_not_written(tmp_path, caplog):
    path = tmp_path / "s.lp"
    dl = DeadLetterFile(path, 60, "sink=s")  # one entry is 44 bytes
    assert dl.append([(b"m f=1 1\n", "r")]) == 1
    size = path.stat().st_size
    with caplog.at_level(logging.ERROR):
        assert dl.append([(b"m f=2 2\n", "r"), (b"m f=3 3\n", "r")]) == 0
        assert dl.append([(b"m f=4 4\n", "r")]) == 0
    assert path.stat().st_size == size and (dl.lines, dl.dropped) == (1, 3)
    assert caplog.text.count("is full") == 1  # logged once
    path.unlink()  # the operator moves the file away: lines are kept again
    assert dl.append([(b"m f=5 5\n", "r")]) == 1


def test_an_unwritable_path_is_logged_and_counted(tmp_path, caplog):
    (tmp_path / "file").write_text("")
    dl = DeadLetterFile(tmp_path / "file" / "s.lp", 10_000, "sink=s")
    with caplog.at_level(logging.ERROR):
        assert dl.append([(b"m f=1 1\n", "r")]) == 0
    assert (dl.lines, dl.dropped) == (0, 1)
    assert "cannot write 1 refused lines to the dead-letter file" in caplog.text


def test_split_lines_keeps_raw_newlines_inside_string_values():
    payload = (
        b'm,t=a\\ b f=1,s="x\ny" 1\nm f="q\\"\n" 2\nm,t=a"b f=2 3\nm a"b=1,s="u\nv" 4\nm f=3 5'
    )
    assert split_lines(payload) == [
        b'm,t=a\\ b f=1,s="x\ny" 1\n',
        b'm f="q\\"\n" 2\n',
        b'm,t=a"b f=2 3\n',  # a quote in a tag value is just a character
        b'm a"b=1,s="u\nv" 4\n',  # and in a field key
        b"m f=3 5",
    ]
    assert split_lines(b"") == []
    assert b"".join(split_lines(payload)) == payload
