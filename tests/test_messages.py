"""Wire messages: round trips, golden bytes, and decode's refusal of every malformed input."""

from __future__ import annotations

import contextlib
import math
import random
import struct
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import MessageDecodeError
from pipeline.wire.messages import (
    FINISH_REASONS,
    DecodeLimits,
    Heartbeat,
    PromptTask,
    RolloutLeaf,
    RolloutNode,
    RolloutStats,
    TreeRollout,
    WeightAnnouncement,
    decode,
    decode_as,
    encode,
)

DATA = Path(__file__).parent / "data"

# ---------------------------------------------------------------------------------------------
# Builders (also used to write the golden files)
# ---------------------------------------------------------------------------------------------


def golden_prompt() -> PromptTask:
    return PromptTask("p-000042", [5, 9, 3, 11], "17", 42, 3, "arith", 1_700_000_000.5)


def golden_rollout() -> TreeRollout:
    # prompt -> n0 -> {n1 (leaf, eos), n2 -> n3 (leaf, depth)}
    nodes = [
        RolloutNode(-1, [1, 2], [-0.5, -0.25], 3),
        RolloutNode(0, [3, 0], [-1.0, -0.125], 3),
        RolloutNode(0, [4, 5], [-2.0, -0.75], 4),
        RolloutNode(2, [6], [-0.0625], 4),
    ]
    leaves = [RolloutLeaf(1, 1.0, "eos"), RolloutLeaf(3, -1.0, "depth")]
    return TreeRollout(
        [5, 9, 3, 11],
        nodes,
        leaves,
        RolloutStats(7, 9, 26, 3, 0, 3, 0.25),
        tree_id="t-7",
        prompt_id="p-000042",
        sampler_id="sampler-a",
        dataset_position=42,
        created_at=1_700_000_001.0,
        temperature=0.75,
    )


def golden_announcement() -> WeightAnnouncement:
    return WeightAnnouncement(
        5, "http://127.0.0.1:9100/weights/5", "ab" * 32, 123456, 1_700_000_002.0
    )


def golden_heartbeat() -> Heartbeat:
    return Heartbeat("sampler-a", "sampler", "host1", 4242, 5, 1_700_000_003.0, "running")


GOLDEN = {
    "prompt_task": golden_prompt,
    "tree_rollout": golden_rollout,
    "weight_announcement": golden_announcement,
    "heartbeat": golden_heartbeat,
}


def write_golden() -> None:  # pragma: no cover - run by hand when the schema version changes
    for name, build in GOLDEN.items():
        (DATA / f"{name}.msgpack").write_bytes(encode(build()))


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_bytes_decode_and_encode_identically(name: str) -> None:
    raw = (DATA / f"{name}.msgpack").read_bytes()
    assert decode(raw) == GOLDEN[name]()
    assert encode(GOLDEN[name]()) == raw


def test_golden_rollout_is_readable_with_plain_msgpack_and_struct() -> None:
    """What docs/wire-format.md promises: a reader needs only msgpack and little-endian arrays."""
    m = msgpack.unpackb((DATA / "tree_rollout.msgpack").read_bytes(), raw=False)
    assert m["type"] == "tree_rollout" and m["schema_version"] == 4
    assert m["sampling"] == {"temperature": 0.75, "top_p": 1.0}
    parents = struct.unpack(f"<{len(m['node_parent']) // 4}i", m["node_parent"])
    lengths = struct.unpack(f"<{len(m['node_len']) // 4}i", m["node_len"])
    tokens = struct.unpack(f"<{len(m['tokens']) // 4}i", m["tokens"])
    assert parents == (-1, 0, 0, 2)
    assert sum(lengths) == len(tokens)
    assert tokens[lengths[0] : lengths[0] + lengths[1]] == (3, 0)
    assert struct.unpack("<2d", m["leaf_reward"]) == (1.0, -1.0)


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------

ids = st.text(min_size=0, max_size=20)
tokens = st.lists(st.integers(0, 2**31 - 2), max_size=30)
f32 = st.floats(-50, 0, width=32, allow_nan=False)
times = st.floats(0, 2e9, allow_nan=False)


@st.composite
def rollouts(draw: st.DrawFn) -> TreeRollout:
    n = draw(st.integers(1, 12))
    nodes = []
    for i in range(n):
        parent = draw(st.integers(-1, i - 1))
        toks = draw(tokens)
        lps = draw(st.lists(f32, min_size=len(toks), max_size=len(toks)))
        nodes.append(RolloutNode(parent, toks, lps, draw(st.integers(0, 1000))))
    childless = sorted(set(range(n)) - {nd.parent for nd in nodes})
    leaves = [
        RolloutLeaf(
            k,
            draw(st.floats(-10, 10, allow_nan=False)),
            draw(st.sampled_from(sorted(FINISH_REASONS))),
        )
        for k in childless
    ]
    stats = RolloutStats(*[draw(st.integers(0, 10**9)) for _ in range(6)], draw(times))
    return TreeRollout(
        draw(tokens),
        nodes,
        leaves,
        stats,
        tree_id=draw(ids),
        prompt_id=draw(ids),
        sampler_id=draw(ids),
        dataset_position=draw(st.integers(0, 2**40)),
        created_at=draw(times),
    )


prompts = st.builds(
    PromptTask,
    ids,
    tokens,
    st.text(max_size=50),
    st.integers(0, 2**40),
    st.integers(0, 2**31 - 1),
    ids,
    times,
)
announcements = st.builds(
    WeightAnnouncement,
    st.integers(0, 2**31 - 1),
    st.from_regex(r"https?://[a-z0-9.:/]{1,40}", fullmatch=True),
    st.from_regex(r"[0-9a-f]{64}", fullmatch=True),
    st.integers(0, 2**50),
    times,
)
heartbeats = st.builds(
    Heartbeat,
    ids,
    st.sampled_from(["sampler", "learner"]),
    ids,
    st.integers(0, 2**31 - 1),
    st.integers(0, 2**31 - 1),
    times,
    ids,
)


@given(st.one_of(prompts, rollouts(), announcements, heartbeats))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_every_message_round_trips(msg: object) -> None:
    data = encode(msg)  # type: ignore[arg-type]
    assert decode(data) == msg
    assert encode(decode(data)) == data


def test_decode_as_checks_the_type() -> None:
    data = encode(golden_prompt())
    assert decode_as(data, PromptTask) == golden_prompt()
    with pytest.raises(MessageDecodeError, match="expected tree_rollout"):
        decode_as(data, TreeRollout)


# ---------------------------------------------------------------------------------------------
# Malformed input: each names its field
# ---------------------------------------------------------------------------------------------


def _mutated(name: str, **changes: object) -> bytes:
    m = msgpack.unpackb(encode(GOLDEN[name]()), raw=False)
    for k, v in changes.items():
        if v is ...:
            del m[k]
        else:
            m[k] = v
    return msgpack.packb(m, use_bin_type=True)


@pytest.mark.parametrize(
    ("name", "changes", "field"),
    [
        ("prompt_task", {"schema_version": 2}, "schema_version"),
        ("prompt_task", {"schema_version": "1"}, "schema_version"),
        ("prompt_task", {"type": "nope"}, "type"),
        ("prompt_task", {"prompt_id": 5}, "prompt_id"),
        ("prompt_task", {"answer": ...}, "answer"),
        ("prompt_task", {"dataset_position": -1}, "dataset_position"),
        ("prompt_task", {"dataset_position": True}, "dataset_position"),
        ("prompt_task", {"prompt": b"\x01\x02\x03"}, "prompt"),
        ("prompt_task", {"prompt": struct.pack("<2i", 1, -5)}, "prompt[1]"),
        ("prompt_task", {"created_at": float("nan")}, "created_at"),
        ("prompt_task", {"extra": 1}, "extra"),
        ("tree_rollout", {"node_len": struct.pack("<4i", 2, 2, 2, 2)}, "tokens"),
        ("tree_rollout", {"node_len": struct.pack("<3i", 2, 2, 3)}, "node_len"),
        ("tree_rollout", {"node_parent": struct.pack("<4i", -1, 0, 3, 2)}, "node_parent[2]"),
        ("tree_rollout", {"node_version": struct.pack("<4i", 0, 0, -1, 0)}, "node_version[2]"),
        (
            "tree_rollout",
            {"logprobs": struct.pack("<7f", -1, -1, math.inf, -1, -1, -1, -1)},
            "logprobs[2]",
        ),
        (
            "tree_rollout",
            {"logprobs": struct.pack("<7f", -1, -1, 0.5, -1, -1, -1, -1)},
            "logprobs[2]",
        ),
        ("tree_rollout", {"logprobs": struct.pack("<6f", *[-1.0] * 6)}, "logprobs"),
        ("tree_rollout", {"leaf_node": struct.pack("<2i", 1, 9)}, "leaf_node[1]"),
        ("tree_rollout", {"leaf_node": struct.pack("<2i", 1, 2)}, "leaf_node[1]"),
        ("tree_rollout", {"leaf_node": struct.pack("<2i", 3, 3)}, "leaf_node[1]"),
        ("tree_rollout", {"leaf_node": struct.pack("<2i", -1, 3)}, "leaf_node[0]"),
        ("tree_rollout", {"node_len": struct.pack("<4i", 2, -2, 2, 5)}, "node_len[1]"),
        ("tree_rollout", {"tokens": struct.pack("<7i", 1, 2, 3, 0, 4, -5, 6)}, "tokens[5]"),
        ("tree_rollout", {"leaf_node": struct.pack("<1i", 1)}, "leaf_reward"),
        ("tree_rollout", {"leaf_reward": struct.pack("<2d", 1.0, math.nan)}, "leaf_reward[1]"),
        ("tree_rollout", {"leaf_finish": ["eos", "bogus"]}, "leaf_finish[1]"),
        ("tree_rollout", {"stats": {"decoded_tokens": 1}}, "stats.independent_tokens"),
        ("tree_rollout", {"stats": [1, 2]}, "stats"),
        ("tree_rollout", {"sampling": {"temperature": 0.0, "top_p": 1.0}}, "sampling.temperature"),
        ("tree_rollout", {"sampling": {"temperature": 1.0, "top_p": 1.5}}, "sampling.top_p"),
        ("tree_rollout", {"sampling": {"temperature": 1.0}}, "sampling.top_p"),
        ("tree_rollout", {"sampling": ...}, "sampling"),
        ("weight_announcement", {"url": "ftp://x"}, "url"),
        ("weight_announcement", {"manifest_sha256": "XYZ"}, "manifest_sha256"),
        ("weight_announcement", {"version": 2**40}, "version"),
        ("heartbeat", {"role": "boss"}, "role"),
    ],
)
def test_malformed_fields_are_named(name: str, changes: dict[str, object], field: str) -> None:
    with pytest.raises(MessageDecodeError) as err:
        decode(_mutated(name, **changes))
    assert err.value.field == field, str(err.value)


def test_an_old_schema_tree_names_both_versions() -> None:
    """A schema-3 tree (the list-based wire of the previous release) is refused with both
    version numbers, so the operator knows which side to upgrade."""
    with pytest.raises(MessageDecodeError, match="unknown version 3; this build reads 4") as err:
        decode(_mutated("tree_rollout", schema_version=3))
    assert err.value.field == "schema_version"


def test_decoded_arrays_are_views_of_the_message_bytes() -> None:
    """No per-token Python objects: token ids and log-probs come back as read-only int32 /
    float32 numpy views of the received bytes."""
    data = encode(golden_rollout())
    tree = decode_as(data, TreeRollout)
    for node in tree.nodes:
        assert node.token_ids.dtype == np.int32 and node.logprobs.dtype == np.float32
        assert not node.token_ids.flags.writeable and node.token_ids.base is not None
    assert np.shares_memory(tree.nodes[0].token_ids, tree.nodes[1].token_ids.base)
    assert tree.response_tokens(3).tolist() == [1, 2, 4, 5, 6]
    assert tree.response_logprobs(3).tolist() == [-0.5, -0.25, -2.0, -0.75, -0.0625]


def test_a_tree_with_an_unscored_leaf_is_not_encoded() -> None:
    tree = golden_rollout()
    tree.add_node(1, [9], [-0.5])
    tree.leaves[0] = RolloutLeaf(4, finish_reason="eos")  # reward NaN until scored
    with pytest.raises(ValueError, match=r"leaves \[0\] have no finite reward"):
        encode(tree)


def test_limits_refuse_before_unpacking() -> None:
    data = encode(golden_rollout())
    with pytest.raises(MessageDecodeError, match="bytes > limit"):
        decode(data, DecodeLimits(max_bytes=len(data) - 1))
    with pytest.raises(MessageDecodeError, match="token id 11 outside"):
        decode(encode(golden_prompt()), DecodeLimits(vocab_size=10))
    with pytest.raises(MessageDecodeError, match="nodes > limit"):
        decode(data, DecodeLimits(max_nodes=3))
    with pytest.raises(MessageDecodeError, match="tokens > limit"):
        decode(data, DecodeLimits(max_tokens=6))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        b"\x92\x01",
        msgpack.packb([1, 2]),
        msgpack.packb({1: 2}),
        msgpack.packb(msgpack.ExtType(5, b"x")),
        b"\xdb\xff\xff\xff\xff",
        b"\x81" * 100_000,
        encode(golden_prompt())[:-3],
        encode(golden_prompt()) + b"\x00",
        "text",
    ],
)
def test_garbage_raises_only_decode_error(data: object) -> None:
    with pytest.raises(MessageDecodeError):
        decode(data)  # type: ignore[arg-type]


def _expect_decode_error_or_message(data: bytes) -> None:
    with contextlib.suppress(MessageDecodeError):
        decode(data)


@given(st.binary(max_size=2000))
@settings(max_examples=2000)
def test_random_bytes_raise_only_decode_error(data: bytes) -> None:
    _expect_decode_error_or_message(data)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_mutated_bytes_raise_only_decode_error(name: str) -> None:
    """Flip, insert and delete bytes of every golden sample: decode returns a message or raises
    MessageDecodeError, nothing else."""
    rng = random.Random(name)
    base = (DATA / f"{name}.msgpack").read_bytes()
    for _ in range(3000):
        b = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            op, pos = rng.randrange(3), rng.randrange(len(b))
            if op == 0:
                b[pos] = rng.randrange(256)
            elif op == 1:
                b.insert(pos, rng.randrange(256))
            elif len(b) > 1:
                del b[pos]
        _expect_decode_error_or_message(bytes(b))


def test_huge_declared_lengths_do_not_allocate() -> None:
    # bin32 header declaring 4 GiB with 5 bytes of payload, inside a valid-looking map
    evil = b"\x81\xa4type\xc6\xff\xff\xff\xf0" + b"abcde"
    with pytest.raises(MessageDecodeError):
        decode(evil)
    deep = b"\x91" * 100_000 + b"\x00"
    with pytest.raises(MessageDecodeError):
        decode(deep)
