"""Every message that crosses a process boundary, and the one encode/decode pair for them.

Wire format: one msgpack map per message, never pickle. Every map carries ``type`` and
``schema_version``. Arrays of numbers travel as msgpack ``bin`` holding little-endian int32
(token ids, indices, versions), float32 (log-probs) or float64 (rewards). ``docs/wire-format.md``
describes each field so that a reader in another language can decode a ``TreeRollout``.

``decode`` trusts nothing: every malformed input raises ``MessageDecodeError`` naming the field,
input larger than the configured limits is refused before it is unpacked, and msgpack's own
length limits are bounded by the input size, so decoding never allocates far more than it reads.

This module does not know about Redis or engines; ``pipeline.wire.streams`` moves the bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, TypeVar

import msgpack
import numpy as np
from numpy.typing import NDArray

from pipeline.errors import MessageDecodeError

SCHEMA_VERSION = 4
"""Version of every message type defined here. Bump it on any change of fields or meaning."""

FINISH_REASONS = frozenset({"answer", "eos", "stop", "length", "depth", "repetition"})
"""Why a leaf's path ended: a closed boxed answer, EOS token, engine stop condition,
response-length cap, depth cap, repetition detector."""

ROLES = frozenset({"sampler", "learner"})

_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1
_I64_MAX = 2**63 - 1
_WIRE: dict[str, np.dtype[Any]] = {"i": np.dtype("<i4"), "f": np.dtype("<f4"), "d": np.dtype("<f8")}
"""Wire dtypes of number arrays: little-endian int32, float32, float64."""
_INT32, _FLOAT32 = np.dtype(np.int32), np.dtype(np.float32)


@dataclass(frozen=True)
class DecodeLimits:
    """Upper bounds that ``decode`` enforces; anything larger is refused, not unpacked."""

    max_bytes: int = 256 * 1024 * 1024
    max_tokens: int = 16_000_000
    max_nodes: int = 1_000_000
    max_string_chars: int = 1_000_000
    vocab_size: int = 2**31 - 1
    """Token ids must lie in ``[0, vocab_size)``; set it to the model's vocabulary size."""


DEFAULT_LIMITS = DecodeLimits()


# --------------------------------------------------------------------------------------------
# Message classes
# --------------------------------------------------------------------------------------------


@dataclass
class PromptTask:
    """One prompt to grow a tree for. learner -> samplers, stream ``<prefix>:prompts``."""

    TYPE: ClassVar[str] = "prompt_task"

    prompt_id: str
    prompt_token_ids: list[int]
    answer: str
    """Reference answer the reward function checks against (the task's answer key)."""
    dataset_position: int
    """Position of the prompt in the learner's dataset order (for resume and audits)."""
    admitted_version: int
    """Learner policy version when the prompt was admitted."""
    task: str = ""
    """Name of the reward function to apply (empty: the sampler's configured default)."""
    created_at: float = 0.0


def _int32_array(values: Any) -> NDArray[np.int32]:
    """``values`` as a 1-D int32 array; ValueError outside int32."""
    arr = np.asarray(values, dtype=np.int64).reshape(-1)
    if arr.size and (arr.min() < _I32_MIN or arr.max() > _I32_MAX):
        raise ValueError("token id out of range for int32")
    return arr.astype(np.int32)


def _float32_array(values: Any) -> NDArray[np.float32]:
    """``values`` as a 1-D float32 array."""
    return np.asarray(values, dtype=np.float32).reshape(-1)


@dataclass(init=False, eq=False, slots=True)
class RolloutNode:
    """One segment of a tree: the tokens one request produced under its parent's context."""

    parent: int
    """Index of the parent node in ``TreeRollout.nodes``, or -1 when the parent is the prompt.
    Parents always come before their children."""
    token_ids: NDArray[np.int32]
    """The segment's token ids (1-D int32; any sequence given is converted)."""
    logprobs: NDArray[np.float32]
    """Behavior log-prob of each token under the sampling policy (1-D float32, same length)."""
    policy_version: int
    """Policy version of the weights that generated this segment."""

    def __init__(self, parent: int, token_ids: Any, logprobs: Any, policy_version: int) -> None:
        self.parent = parent
        # arrays of the right type (decode's views) are kept as they are; the rest is converted
        ok = type(token_ids) is np.ndarray and token_ids.dtype is _INT32
        self.token_ids = token_ids if ok else _int32_array(token_ids)
        ok = type(logprobs) is np.ndarray and logprobs.dtype is _FLOAT32
        self.logprobs = logprobs if ok else _float32_array(logprobs)
        self.policy_version = policy_version

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, RolloutNode)
            and (self.parent, self.policy_version) == (other.parent, other.policy_version)
            and np.array_equal(self.token_ids, other.token_ids)
            and np.array_equal(self.logprobs, other.logprobs)
        )


@dataclass
class RolloutLeaf:
    """A finished path: the node it ends at, its reward and why it ended."""

    node: int
    reward: float = math.nan
    """NaN until the sampler scores the leaf; a tree is encoded only when every leaf has one."""
    finish_reason: str = "eos"


@dataclass
class RolloutStats:
    """Accounting of one tree: what was decoded and what independent sampling of the same
    leaves would have decoded."""

    decoded_tokens: int = 0
    """Tokens generated: the sum of segment lengths over all nodes."""
    independent_tokens: int = 0
    """Tokens as many independent samples as the tree has leaves are expected to decode: the
    number of leaves times the probability-weighted mean leaf length (``recount``)."""
    prefill_tokens: int = 0
    """Context tokens submitted to the engine over all requests."""
    engine_calls: int = 0
    """Engine requests the tree opened (one per path start: root paths, forked siblings and
    fallback forks; a path that goes on past a boundary keeps its request)."""
    fallbacks: int = 0
    """Fallback forks (a leaf cut at a segment boundary, or a restart from the prompt)."""
    max_depth_reached: int = 0
    generation_seconds: float = 0.0
    """Wall seconds from the tree's first request to its last segment."""


@dataclass(eq=False)
class TreeRollout:
    """The segment tree of one prompt, the one tree type from the engine to the loss.

    The sampler grows it (``add_node``, ``add_leaf``), scores its leaves, stamps its ids and
    publishes it: sampler -> learner, stream ``<prefix>:trees``. Token ids and log-probs are
    numpy arrays throughout (``decode`` hands out read-only views of the message's bytes).
    """

    TYPE: ClassVar[str] = "tree_rollout"

    prompt_token_ids: NDArray[np.int32]
    """The prompt's token ids (1-D int32; any sequence given is converted)."""
    nodes: list[RolloutNode] = field(default_factory=list)
    leaves: list[RolloutLeaf] = field(default_factory=list)
    stats: RolloutStats = field(default_factory=RolloutStats)
    tree_id: str = ""
    prompt_id: str = ""
    sampler_id: str = ""
    dataset_position: int = 0
    created_at: float = 0.0
    temperature: float = 1.0
    """Sampling temperature of the behavior policy: the learner divides its logits by it."""
    top_p: float = 1.0
    """Nucleus threshold of the behavior policy (the learner trains only on 1.0)."""

    def __post_init__(self) -> None:
        p = self.prompt_token_ids
        if not (type(p) is np.ndarray and p.dtype is _INT32):
            self.prompt_token_ids = _int32_array(p)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TreeRollout):
            return False
        return np.array_equal(self.prompt_token_ids, other.prompt_token_ids) and all(
            getattr(self, k) == getattr(other, k) for k in _PLAIN_FIELDS
        )

    def add_node(
        self, parent: int, token_ids: Sequence[int], logprobs: Sequence[float], version: int = 0
    ) -> int:
        """Append a segment under ``parent`` (-1: the prompt); returns its index."""
        self.nodes.append(RolloutNode(parent, token_ids, logprobs, version))
        return len(self.nodes) - 1

    def add_leaf(self, node: int, finish_reason: str) -> RolloutLeaf:
        """Mark ``node`` as the end of a finished path (reward NaN until scored)."""
        leaf = RolloutLeaf(node, math.nan, finish_reason)
        self.leaves.append(leaf)
        return leaf

    def path(self, node: int) -> list[int]:
        """Node indices from the depth-1 node down to ``node`` (empty for the prompt, -1)."""
        path = []
        while node != -1:
            path.append(node)
            node = self.nodes[node].parent
        return path[::-1]

    def depth(self, node: int) -> int:
        """Segments on the path to ``node`` (1 for nodes directly under the prompt)."""
        return len(self.path(node))

    def children(self, node: int) -> list[int]:
        """Indices of the nodes whose parent is ``node`` (-1: the prompt)."""
        return [i for i, n in enumerate(self.nodes) if n.parent == node]

    def response_tokens(self, node: int) -> NDArray[np.int32]:
        """Token ids of the path ending at ``node``, without the prompt."""
        tokens: NDArray[np.int32] = _concat(
            [self.nodes[n].token_ids for n in self.path(node)], np.int32
        )
        return tokens

    def response_logprobs(self, node: int) -> NDArray[np.float32]:
        """Behavior log-probs of the path ending at ``node``."""
        mus: NDArray[np.float32] = _concat(
            [self.nodes[n].logprobs for n in self.path(node)], np.float32
        )
        return mus

    def response_length(self, node: int) -> int:
        return sum(len(self.nodes[n].token_ids) for n in self.path(node))

    def mean_leaf_length(self) -> float:
        """Expected response length of one independent sample of the prompt, estimated from the
        tree: the leaves' mean length, each leaf weighted by its probability (every node splits
        its probability equally among its children, the prompt among the depth-1 nodes). The
        plain mean over-weights long answers: a long path passes more segment boundaries, so it
        branches more and leaves more leaves."""
        children: dict[int, int] = {}
        for n in self.nodes:
            children[n.parent] = children.get(n.parent, 0) + 1
        mass = np.zeros(len(self.nodes))
        length = np.zeros(len(self.nodes))
        for i, n in enumerate(self.nodes):  # parents come before their children
            above = 1.0 if n.parent == -1 else mass[n.parent]
            mass[i] = above / children[n.parent]
            length[i] = len(n.token_ids) + (0.0 if n.parent == -1 else length[n.parent])
        leaves = [leaf.node for leaf in self.leaves]
        total = float(mass[leaves].sum()) if leaves else 0.0
        return float((mass[leaves] * length[leaves]).sum()) / total if total > 0 else 0.0

    def recount(self) -> None:
        """Recompute the token counters and depth from nodes and leaves."""
        self.stats.decoded_tokens = sum(len(n.token_ids) for n in self.nodes)
        self.stats.independent_tokens = round(len(self.leaves) * self.mean_leaf_length())
        depths: list[int] = []
        for n in self.nodes:  # parents come before their children
            depths.append(1 if n.parent == -1 else depths[n.parent] + 1)
        self.stats.max_depth_reached = max(depths, default=0)


_PLAIN_FIELDS = (
    *("nodes", "leaves", "stats", "tree_id", "prompt_id", "sampler_id"),
    *("dataset_position", "created_at", "temperature", "top_p"),
)
"""TreeRollout fields compared with ``==`` (the prompt array is compared by value)."""


def _concat(parts: list[Any], dtype: type) -> NDArray[Any]:
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


@dataclass
class WeightAnnouncement:
    """A new policy version is ready to download. learner -> samplers, key + pub/sub channel
    ``<prefix>:weights``."""

    TYPE: ClassVar[str] = "weight_announcement"

    version: int
    url: str
    """Base URL of the version on the weight server; ``<url>/manifest.json`` lists the files."""
    manifest_sha256: str
    """sha256 (hex) of the manifest bytes, so a sampler can verify what it fetched."""
    total_bytes: int
    created_at: float = 0.0
    signature: str = ""
    """HMAC-SHA256 (hex) of the other fields under the run's weight token
    (``pipeline.weights.manifest.announcement_signature``); empty when no token is configured."""


@dataclass
class Heartbeat:
    """Liveness of one process. any process -> key ``<prefix>:heartbeat:<worker_id>`` with TTL."""

    TYPE: ClassVar[str] = "heartbeat"

    worker_id: str
    role: str
    host: str
    pid: int
    policy_version: int
    sent_at: float
    state: str = "running"


Message = PromptTask | TreeRollout | WeightAnnouncement | Heartbeat
M = TypeVar("M", PromptTask, TreeRollout, WeightAnnouncement, Heartbeat)


# --------------------------------------------------------------------------------------------
# Packing helpers
# --------------------------------------------------------------------------------------------


def _wire_bytes(values: Any, code: str) -> memoryview:
    """The little-endian bytes of ``values`` as a buffer msgpack packs as ``bin`` (no copy when
    ``values`` already is a contiguous array of the wire type)."""
    return np.ascontiguousarray(np.asarray(values, dtype=_WIRE[code])).data.cast("B")


def _int32(values: Any) -> memoryview:
    return _wire_bytes(values, "i")


def _float32(values: Any) -> memoryview:
    return _wire_bytes(values, "f")


def _float64(values: Any) -> memoryview:
    return _wire_bytes(values, "d")


def _header(msg: Message) -> dict[str, Any]:
    return {"type": msg.TYPE, "schema_version": SCHEMA_VERSION}


def _encode_prompt(msg: PromptTask) -> dict[str, Any]:
    return {
        "prompt_id": msg.prompt_id,
        "prompt": _int32(msg.prompt_token_ids),
        "answer": msg.answer,
        "dataset_position": msg.dataset_position,
        "admitted_version": msg.admitted_version,
        "task": msg.task,
        "created_at": float(msg.created_at),
    }


def _encode_rollout(msg: TreeRollout) -> dict[str, Any]:
    nodes = msg.nodes
    s = msg.stats
    rewards = [leaf.reward for leaf in msg.leaves]
    unscored = [i for i, r in enumerate(rewards) if not math.isfinite(r)]
    if unscored:
        raise ValueError(f"tree {msg.tree_id!r}: leaves {unscored} have no finite reward")
    return {
        "tree_id": msg.tree_id,
        "prompt_id": msg.prompt_id,
        "sampler_id": msg.sampler_id,
        "dataset_position": msg.dataset_position,
        "created_at": float(msg.created_at),
        "prompt": _int32(msg.prompt_token_ids),
        "node_parent": _int32([n.parent for n in nodes]),
        "node_len": _int32([len(n.token_ids) for n in nodes]),
        "node_version": _int32([n.policy_version for n in nodes]),
        "tokens": _int32(_concat([n.token_ids for n in nodes], np.int32)),
        "logprobs": _float32(_concat([n.logprobs for n in nodes], np.float32)),
        "leaf_node": _int32([leaf.node for leaf in msg.leaves]),
        "leaf_reward": _float64(rewards),
        "leaf_finish": [leaf.finish_reason for leaf in msg.leaves],
        "sampling": {"temperature": float(msg.temperature), "top_p": float(msg.top_p)},
        "stats": {
            "decoded_tokens": s.decoded_tokens,
            "independent_tokens": s.independent_tokens,
            "prefill_tokens": s.prefill_tokens,
            "engine_calls": s.engine_calls,
            "fallbacks": s.fallbacks,
            "max_depth_reached": s.max_depth_reached,
            "generation_seconds": float(s.generation_seconds),
        },
    }


def _encode_announcement(msg: WeightAnnouncement) -> dict[str, Any]:
    return {
        "version": msg.version,
        "url": msg.url,
        "manifest_sha256": msg.manifest_sha256,
        "total_bytes": msg.total_bytes,
        "created_at": float(msg.created_at),
        "signature": msg.signature,
    }


def _encode_heartbeat(msg: Heartbeat) -> dict[str, Any]:
    return {
        "worker_id": msg.worker_id,
        "role": msg.role,
        "host": msg.host,
        "pid": msg.pid,
        "policy_version": msg.policy_version,
        "sent_at": float(msg.sent_at),
        "state": msg.state,
    }


def encode(msg: Message) -> bytes:
    """Serialize one message to msgpack bytes. Raises ValueError on a message that cannot be
    represented (for example a token id outside int32)."""
    encoders: dict[type, Callable[[Any], dict[str, Any]]] = {
        PromptTask: _encode_prompt,
        TreeRollout: _encode_rollout,
        WeightAnnouncement: _encode_announcement,
        Heartbeat: _encode_heartbeat,
    }
    try:
        body = encoders[type(msg)](msg)
    except KeyError:
        raise ValueError(f"not a wire message: {type(msg).__name__}") from None
    except OverflowError as exc:
        raise ValueError(f"{type(msg).__name__}: number out of range for the wire: {exc}") from exc
    packed: bytes = msgpack.packb({**_header(msg), **body}, use_bin_type=True)
    return packed


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


class _Fields:
    """Typed, bounded access to one decoded msgpack map; every failure names the field."""

    def __init__(self, data: Any, prefix: str, limits: DecodeLimits) -> None:
        if not isinstance(data, dict):
            raise MessageDecodeError(prefix or "message", f"expected a map, got {_kind(data)}")
        self.data: dict[str, Any] = data
        self.prefix = prefix
        self.limits = limits
        self.used: set[str] = set()

    def name(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def get(self, key: str) -> Any:
        if key not in self.data:
            raise MessageDecodeError(self.name(key), "missing")
        self.used.add(key)
        return self.data[key]

    def no_extra(self) -> None:
        extra = sorted(str(k) for k in self.data if k not in self.used)
        if extra:
            raise MessageDecodeError(self.name(extra[0]), "unknown field for this schema version")

    def text(self, key: str, max_chars: int | None = None) -> str:
        value = self.get(key)
        if not isinstance(value, str):
            raise MessageDecodeError(self.name(key), f"expected a string, got {_kind(value)}")
        limit = self.limits.max_string_chars if max_chars is None else max_chars
        if len(value) > limit:
            raise MessageDecodeError(self.name(key), f"string of {len(value)} chars > {limit}")
        return value

    def integer(self, key: str, lo: int = 0, hi: int = _I64_MAX) -> int:
        value = self.get(key)
        if type(value) is not int:
            raise MessageDecodeError(self.name(key), f"expected an integer, got {_kind(value)}")
        if not lo <= value <= hi:
            raise MessageDecodeError(self.name(key), f"{value} outside [{lo}, {hi}]")
        return value

    def real(self, key: str, lo: float = -math.inf, hi: float = math.inf) -> float:
        value = self.get(key)
        if type(value) is int:
            value = float(value)
        if type(value) is not float:
            raise MessageDecodeError(self.name(key), f"expected a float, got {_kind(value)}")
        if not math.isfinite(value) or not lo <= value <= hi:
            raise MessageDecodeError(
                self.name(key), f"{value} is not finite or outside [{lo}, {hi}]"
            )
        return value

    def array(self, key: str, code: str, count: int | None = None) -> NDArray[Any]:
        """A read-only 1-D native-order view of the little-endian bin field ``key``."""
        raw = self.get(key)
        if not isinstance(raw, bytes):
            raise MessageDecodeError(self.name(key), f"expected bin bytes, got {_kind(raw)}")
        dtype = _WIRE[code]
        if len(raw) % dtype.itemsize:
            raise MessageDecodeError(
                self.name(key), f"{len(raw)} bytes is not a multiple of {dtype.itemsize}"
            )
        n = len(raw) // dtype.itemsize
        if count is not None and n != count:
            raise MessageDecodeError(self.name(key), f"has {n} values, expected {count}")
        arr: NDArray[Any] = np.frombuffer(raw, dtype=dtype)
        return arr if dtype.isnative else arr.astype(dtype.newbyteorder("="))

    def token_array(self, key: str, count: int | None = None) -> NDArray[np.int32]:
        values = self.array(key, "i", count)
        if len(values) > self.limits.max_tokens:
            raise MessageDecodeError(
                self.name(key), f"{len(values)} tokens > limit {self.limits.max_tokens}"
            )
        vocab = self.limits.vocab_size
        if values.size and (values.min() < 0 or values.max() >= vocab):  # fast path, then locate
            bad = int(np.argmax((values < 0) | (values >= vocab)))
            raise MessageDecodeError(
                f"{self.name(key)}[{bad}]",
                f"token id {values[bad]} outside [0, {vocab})",
                "bad_token",
            )
        return values

    def token_ids(self, key: str, count: int | None = None) -> list[int]:
        values: list[int] = self.token_array(key, count).tolist()
        return values

    def finite_array(self, key: str, code: str, count: int, hi: float = math.inf) -> NDArray[Any]:
        values = self.array(key, code, count)
        # NaN propagates through min; -inf shows in min, +inf and values above hi in max
        if values.size and not (np.isfinite(values.min()) and values.max() <= hi):
            bad = int(np.argmax(~(np.isfinite(values) & (values <= hi))))
            raise MessageDecodeError(
                f"{self.name(key)}[{bad}]", f"{values[bad]} is not finite or > {hi}"
            )
        return values

    def sub(self, key: str) -> _Fields:
        return _Fields(self.get(key), self.name(key), self.limits)


def _kind(value: Any) -> str:
    return type(value).__name__


def _decode_prompt(f: _Fields) -> PromptTask:
    return PromptTask(
        prompt_id=f.text("prompt_id", 256),
        prompt_token_ids=f.token_ids("prompt"),
        answer=f.text("answer"),
        dataset_position=f.integer("dataset_position"),
        admitted_version=f.integer("admitted_version", 0, _I32_MAX),
        task=f.text("task", 256),
        created_at=f.real("created_at"),
    )


_LOGPROB_MAX = 1e-3  # log-probs are <= 0; allow float rounding noise above zero


def _decode_nodes(f: _Fields) -> tuple[list[RolloutNode], NDArray[np.int32]]:
    """The nodes, and their parents as an array (for the leaf checks)."""
    parents = f.array("node_parent", "i")
    n = len(parents)
    if n > f.limits.max_nodes:
        raise MessageDecodeError("node_parent", f"{n} nodes > limit {f.limits.max_nodes}")
    lengths = f.array("node_len", "i", n)
    versions = f.array("node_version", "i", n)
    if n and (parents.min() < -1 or not (parents < np.arange(n)).all()):
        bad = int(np.argmax((parents < -1) | (parents >= np.arange(n))))
        raise MessageDecodeError(
            f"node_parent[{bad}]", f"{parents[bad]} is not -1 or an earlier node"
        )
    for name, values in (("node_len", lengths), ("node_version", versions)):
        if n and values.min() < 0:
            bad = int(np.argmax(values < 0))
            raise MessageDecodeError(f"{name}[{bad}]", f"negative value {values[bad]}")
    total = int(lengths.sum(dtype=np.int64))
    if total > f.limits.max_tokens:
        raise MessageDecodeError("node_len", f"{total} tokens > limit {f.limits.max_tokens}")
    tokens = f.token_array("tokens", total)
    logprobs = f.finite_array("logprobs", "f", total, hi=_LOGPROB_MAX)
    ends = np.cumsum(lengths).tolist()
    starts = [0, *ends[:-1]]
    nodes = [
        RolloutNode(p, tokens[a:b], logprobs[a:b], v)
        for p, a, b, v in zip(parents.tolist(), starts, ends, versions.tolist())
    ]
    return nodes, parents


def _decode_leaves(f: _Fields, parents: NDArray[np.int32]) -> list[RolloutLeaf]:
    n = len(parents)
    leaf_nodes = f.array("leaf_node", "i")
    m = len(leaf_nodes)
    rewards = f.finite_array("leaf_reward", "d", m)
    finishes = f.get("leaf_finish")
    if not isinstance(finishes, list) or len(finishes) != m:
        raise MessageDecodeError("leaf_finish", f"expected a list of {m} strings")
    for i, reason in enumerate(finishes):
        if reason not in FINISH_REASONS:
            raise MessageDecodeError(
                f"leaf_finish[{i}]", f"{reason!r} not in {sorted(FINISH_REASONS)}"
            )
    if m and (leaf_nodes.min() < 0 or leaf_nodes.max() >= n):
        bad = int(np.argmax((leaf_nodes < 0) | (leaf_nodes >= n)))
        raise MessageDecodeError(f"leaf_node[{bad}]", f"{leaf_nodes[bad]} is not a node below {n}")
    uses = np.bincount(parents + 1, minlength=n + 1)[1:]  # children per node
    uses[leaf_nodes] += n + 1  # a leaf adds n + 1: leaves have uses == n + 1 exactly once
    if m and ((uses[leaf_nodes] != n + 1).any() or int((uses > n).sum()) != m):
        seen: set[int] = set()
        for bad, node in enumerate(leaf_nodes.tolist()):
            if node in seen or uses[node] != n + 1:
                raise MessageDecodeError(
                    f"leaf_node[{bad}]", f"node {node} is repeated or has children"
                )
            seen.add(node)
    if (uses == 0).any():
        raise MessageDecodeError("leaf_node", "every childless node must be a leaf")
    return [
        RolloutLeaf(node, reward, finish)
        for node, reward, finish in zip(leaf_nodes.tolist(), rewards.tolist(), finishes)
    ]


def _decode_stats(s: _Fields) -> RolloutStats:
    stats = RolloutStats(
        decoded_tokens=s.integer("decoded_tokens"),
        independent_tokens=s.integer("independent_tokens"),
        prefill_tokens=s.integer("prefill_tokens"),
        engine_calls=s.integer("engine_calls"),
        fallbacks=s.integer("fallbacks"),
        max_depth_reached=s.integer("max_depth_reached"),
        generation_seconds=s.real("generation_seconds", 0.0),
    )
    s.no_extra()
    return stats


def _decode_rollout(f: _Fields) -> TreeRollout:
    tree_id = f.text("tree_id", 256)
    prompt_id = f.text("prompt_id", 256)
    sampler_id = f.text("sampler_id", 256)
    dataset_position = f.integer("dataset_position")
    created_at = f.real("created_at")
    prompt = f.token_array("prompt")
    nodes, parents = _decode_nodes(f)
    leaves = _decode_leaves(f, parents)
    sampling = f.sub("sampling")
    temperature = sampling.real("temperature", 1e-3, 100.0)
    top_p = sampling.real("top_p", 1e-6, 1.0)
    sampling.no_extra()
    return TreeRollout(
        tree_id=tree_id,
        prompt_id=prompt_id,
        sampler_id=sampler_id,
        prompt_token_ids=prompt,
        nodes=nodes,
        leaves=leaves,
        stats=_decode_stats(f.sub("stats")),
        dataset_position=dataset_position,
        created_at=created_at,
        temperature=temperature,
        top_p=top_p,
    )


def _decode_announcement(f: _Fields) -> WeightAnnouncement:
    url = f.text("url", 4096)
    if not url.startswith(("http://", "https://")):
        raise MessageDecodeError("url", f"{url[:80]!r} is not an http(s) URL")
    digest = f.text("manifest_sha256", 64)
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise MessageDecodeError("manifest_sha256", "expected 64 lowercase hex characters")
    return WeightAnnouncement(
        version=f.integer("version", 0, _I32_MAX),
        url=url,
        manifest_sha256=digest,
        total_bytes=f.integer("total_bytes"),
        created_at=f.real("created_at"),
        signature=f.text("signature", 64),
    )


def _decode_heartbeat(f: _Fields) -> Heartbeat:
    role = f.text("role", 32)
    if role not in ROLES:
        raise MessageDecodeError("role", f"{role!r} not in {sorted(ROLES)}")
    return Heartbeat(
        worker_id=f.text("worker_id", 256),
        role=role,
        host=f.text("host", 256),
        pid=f.integer("pid", 0, _I32_MAX),
        policy_version=f.integer("policy_version", 0, _I32_MAX),
        sent_at=f.real("sent_at"),
        state=f.text("state", 64),
    )


_DECODERS: dict[str, Callable[[_Fields], Any]] = {
    PromptTask.TYPE: _decode_prompt,
    TreeRollout.TYPE: _decode_rollout,
    WeightAnnouncement.TYPE: _decode_announcement,
    Heartbeat.TYPE: _decode_heartbeat,
}


def _reject_ext(code: int, data: bytes) -> Any:
    raise MessageDecodeError("message", f"msgpack extension type {code} is not allowed")


def decode(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> Message:
    """Parse bytes from the wire into a message object.

    Raises ``MessageDecodeError`` (and nothing else) for every malformed input; the error's
    ``field`` names what is wrong.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageDecodeError("message", f"expected bytes, got {_kind(data)}")
    if len(data) > limits.max_bytes:
        raise MessageDecodeError("message", f"{len(data)} bytes > limit {limits.max_bytes}")
    try:
        raw = msgpack.unpackb(
            bytes(data),
            raw=False,
            strict_map_key=True,
            ext_hook=_reject_ext,
        )
    except MessageDecodeError:
        raise
    except Exception as exc:  # msgpack raises many types on bad bytes
        raise MessageDecodeError(
            "message", f"not valid msgpack: {type(exc).__name__}: {exc}"
        ) from None
    try:
        return _decode_fields(raw, limits)
    except MessageDecodeError:
        raise
    except Exception as exc:  # defensive: the contract is that nothing else escapes
        raise MessageDecodeError("message", f"malformed: {type(exc).__name__}: {exc}") from None


def _decode_fields(raw: Any, limits: DecodeLimits) -> Message:
    f = _Fields(raw, "", limits)
    kind = f.text("type", 64)
    version = f.get("schema_version")
    if type(version) is not int:
        raise MessageDecodeError("schema_version", f"expected an integer, got {_kind(version)}")
    if version != SCHEMA_VERSION:
        raise MessageDecodeError(
            "schema_version", f"unknown version {version}; this build reads {SCHEMA_VERSION}"
        )
    if kind not in _DECODERS:
        raise MessageDecodeError("type", f"unknown message type {kind!r}")
    msg: Message = _DECODERS[kind](f)
    f.no_extra()
    return msg


def decode_as(data: bytes, cls: type[M], limits: DecodeLimits = DEFAULT_LIMITS) -> M:
    """``decode`` that also checks the message type."""
    msg = decode(data, limits)
    if not isinstance(msg, cls):
        raise MessageDecodeError("type", f"expected {cls.TYPE}, got {msg.TYPE}")
    return msg


def to_jsonable(msg: Message) -> dict[str, Any]:
    """A JSON-friendly dict of a message (for the CLI and logs); arrays become lists."""

    def plain(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    return {"type": msg.TYPE, "schema_version": SCHEMA_VERSION, **plain(asdict(msg))}


__all__ = [
    "DEFAULT_LIMITS",
    "FINISH_REASONS",
    "SCHEMA_VERSION",
    "DecodeLimits",
    "Heartbeat",
    "Message",
    "PromptTask",
    "RolloutLeaf",
    "RolloutNode",
    "RolloutStats",
    "TreeRollout",
    "WeightAnnouncement",
    "decode",
    "decode_as",
    "encode",
    "to_jsonable",
]
