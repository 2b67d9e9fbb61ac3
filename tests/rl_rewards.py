"""Reward functions the RL tests name as `tests.rl_rewards:NAME` (a user's module:function)."""

import math

LIKED = set("你好世界今天天气很")


def liked_share(reply: str, record: dict) -> float:
    """Share of the reply's characters in LIKED: a dense signal that a random tiny model can climb."""
    return sum(c in LIKED for c in reply) / max(1, len(reply))


def flaky(reply: str, record: dict):
    """Raises, or returns NaN, None or text, by the reply's length: every failure kind a run must survive."""
    kind = len(reply) % 4
    if kind == 0:
        raise ValueError("cannot score")
    return [math.nan, None, "high"][kind - 1]


def long_reply(reply: str, record: dict) -> float:
    """The reply's length in characters over 24, at most 1: varies from the first samples of a random model."""
    return min(1.0, len(reply) / 24)
