"""Checkpoint states are stored as is, compressed, or as a bounded preview, by the seed's limits."""

from __future__ import annotations

from kneo_events.checkpoints import CheckpointLimits, pack, unpack

LIMITS = CheckpointLimits(compress_bytes=200, max_bytes=2000, preview_chars=5, max_list_items=2, max_dict_items=3)


def test_small_states_are_kept_as_they_are() -> None:
    state = {"step_outputs": {"a": "short"}, "visited_steps": ["a"]}
    assert pack(state, LIMITS) is state and unpack(state) == state


def test_large_states_are_compressed_and_come_back_whole() -> None:
    state = {"step_outputs": {"a": "word " * 300}, "visited_steps": ["a"]}
    stored = pack(state, LIMITS)
    assert stored["_encoding"] == "zlib+base64" and stored["bytes"] > 1500 and len(stored["data"]) < 300
    assert unpack(stored) == state


def test_states_past_the_cap_after_compression_become_a_preview() -> None:
    import secrets

    noise = secrets.token_hex(3000)  # incompressible
    state = {"step_outputs": {"a": noise, "b": "x"}, "visited_steps": ["a", "b", "c"]}
    stored = pack(state, LIMITS)
    assert stored["_truncated"] is True and stored["bytes"] > 6000
    back = unpack(stored)
    assert back["step_outputs"] == {"a": noise[:5] + "…", "b": "x"} and back["visited_steps"] == ["a", "b"]
    assert back["_truncated"] is True and back["_bytes"] == stored["bytes"]


def test_defaults_are_the_seeds() -> None:
    d = CheckpointLimits.from_settings(object())
    assert (d.compress_bytes, d.max_bytes, d.preview_chars, d.max_list_items, d.max_dict_items) == (
        65536,
        1048576,
        1200,
        20,
        50,
    )
