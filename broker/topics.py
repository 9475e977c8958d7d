"""MQTT-style topic filters: ``+`` matches one level, a trailing ``#`` the rest.

As in MQTT, a topic starting with ``$`` (system topics such as ``$cmd/...``) is never
matched by a filter whose first level is a wildcard.
"""

from __future__ import annotations

__all__ = ["covers", "matches", "validate_filter", "validate_topic"]


def validate_topic(topic: str) -> None:
    """Raise ValueError if ``topic`` cannot be published to."""
    if not topic:
        raise ValueError("topic is empty")
    if "+" in topic or "#" in topic:
        raise ValueError(f"topic {topic!r} holds a wildcard (+ or #); only filters may")
    if "\x00" in topic:
        raise ValueError(f"topic {topic!r} holds a NUL character")


def validate_filter(flt: str) -> None:
    """Raise ValueError if ``flt`` is not a valid MQTT topic filter."""
    if not flt:
        raise ValueError("topic filter is empty")
    levels = flt.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"filter {flt!r}: '#' must be a whole level and the last one")
        if "+" in level and level != "+":
            raise ValueError(f"filter {flt!r}: '+' must be a whole level")


def matches(flt: str, topic: str) -> bool:
    """True if ``topic`` matches the MQTT filter ``flt``."""
    if topic.startswith("$") and flt[:1] in ("+", "#"):
        return False
    f_levels = flt.split("/")
    t_levels = topic.split("/")
    for i, f in enumerate(f_levels):
        if f == "#":
            return True  # also matches the parent: "a/#" matches "a"
        if i >= len(t_levels):
            return False
        if f != "+" and f != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


def covers(outer: str, inner: str) -> bool:
    """True if every topic the filter ``inner`` matches is matched by the filter ``outer``.

    What an access list needs: a client may subscribe to ``inner`` when one of its allowed
    filters covers it (``plant/#`` covers ``plant/+/press7``; ``plant/+`` does not cover
    ``plant/#``). As in ``matches``, a wildcard first level never covers ``$`` topics.
    """
    if inner.startswith("$") and outer[:1] in ("+", "#"):
        return False
    o_levels = outer.split("/")
    i_levels = inner.split("/")
    for i, o in enumerate(o_levels):
        if o == "#":
            return True
        if i >= len(i_levels):
            return False
        level = i_levels[i]
        if level == "#":
            return False  # the rest of a tree, where `outer` asks for more levels
        if o == "+":
            continue
        if level != o:  # a literal covers only itself (not "+")
            return False
    return len(o_levels) == len(i_levels)
