"""Weight versions on disk and on the wire: manifests, checksums, safetensors header checks,
and the verified download a sampler does before it swaps.

A version directory holds safetensors files (Hugging Face layout) and ``manifest.json``::

    {"version": 3, "format": "safetensors",
     "files": [{"name": "model.safetensors", "size": 3170856, "sha256": "..."}]}

The learner announces ``sha256(manifest bytes)``; a sampler fetches the manifest, checks that
digest, then fetches each file and checks its size and sha256, and finally reads every
safetensors header (pure Python) to compare tensor names, dtypes and shapes with the weights the
engine already has. Anything that does not verify raises ``WeightVerificationError`` and leaves
nothing behind. No pickle: safetensors and JSON only.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import math
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import WeightVerificationError
from pipeline.wire.messages import WeightAnnouncement

MANIFEST = "manifest.json"
_MAX_HEADER = 100 * 1024 * 1024
RECEIVER_HEADER = "X-Treepo-Receiver"
"""Names the downloading sampler to a weight server (its slot is per receiver, not per piece)."""
CHUNK_BYTES = 64 << 20
"""Files are hashed (and downloaded, and verified) in pieces of this size."""


DIGESTS = ("xxh3-128", "blake3")
"""Piece digests a manifest may use. ``xxh3-128`` (the default) catches corruption at about ten
times blake3's speed on one core, so receiving never waits for hashing; it is not
cryptographic, which is enough where every party is trusted: the announcement is signed, the
manifest's sha256 is in it, and only holders of the run's token (the learner and its samplers)
serve pieces. ``blake3`` is cryptographic: a relaying sampler cannot forge a piece."""


@dataclass(frozen=True)
class FileEntry:
    name: str
    size: int
    digest: str
    """``<algorithm>:<hex>`` of the concatenated piece digests (a one-level hash list)."""
    pieces: tuple[str, ...] = ()
    """Digest (hex) of each ``chunk_bytes`` piece, with the algorithm of ``digest``: pieces are
    fetched in parallel, from any source, and each is verified on its own as it arrives."""

    @property
    def algorithm(self) -> str:
        return self.digest.split(":", 1)[0]


@dataclass(frozen=True)
class Delta:
    """The version as a delta against ``base`` (``pipeline.weights.delta``): one delta file per full
    file, ``delta_name(base, name)``, for receivers that hold the base version."""

    base: int
    files: tuple[FileEntry, ...]


@dataclass(frozen=True)
class Canary:
    """Proof that a version loaded: the publisher's log-probs of a short fixed token sequence
    under the version's weights (``logprobs[i]`` is token ``i + 1`` given the tokens before it,
    softmax at temperature 1). A sampler scores the same tokens with its engine after the swap
    and compares (``workers.canary``)."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.token_ids) < 2 or len(self.logprobs) != len(self.token_ids) - 1:
            raise ValueError(
                f"canary of {len(self.token_ids)} tokens needs {len(self.token_ids) - 1} "
                f"log-probs, has {len(self.logprobs)}"
            )
        if not all(math.isfinite(x) and x <= 0 for x in self.logprobs):
            raise ValueError("canary log-probs must be finite and <= 0")


@dataclass(frozen=True)
class Manifest:
    version: int
    files: tuple[FileEntry, ...]
    format: str = "safetensors"
    chunk_bytes: int = CHUNK_BYTES
    origin: tuple[str, str] | None = None
    """(machine id, directory) where the publisher wrote the version: a sampler on the same
    machine hard-links the files instead of downloading them."""
    delta: Delta | None = None
    canary: Canary | None = None

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def served_names(self) -> set[str]:
        names = {f.name for f in self.files}
        if self.delta is not None:
            names |= {f.name for f in self.delta.files}
        return names

    def to_bytes(self) -> bytes:
        body: dict[str, Any] = {
            "version": self.version,
            "format": self.format,
            "chunk_bytes": self.chunk_bytes,
            "files": [asdict(f) for f in self.files],
        }
        if self.origin is not None:
            body["origin"] = {"machine": self.origin[0], "path": self.origin[1]}
        if self.delta is not None:
            body["delta"] = {
                "base": self.delta.base,
                "files": [asdict(f) for f in self.delta.files],
            }
        if self.canary is not None:
            body["canary"] = {
                "token_ids": list(self.canary.token_ids),
                "logprobs": list(self.canary.logprobs),
            }
        return json.dumps(body, sort_keys=True, indent=1).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        try:
            body = json.loads(data)
            files = _entries(body["files"])
            origin = body.get("origin")
            delta = body.get("delta")
            canary = body.get("canary")
            manifest = cls(
                int(body["version"]),
                files,
                str(body.get("format", "safetensors")),
                int(body.get("chunk_bytes", CHUNK_BYTES)),
                (str(origin["machine"]), str(origin["path"])) if origin else None,
                Delta(int(delta["base"]), _entries(delta["files"])) if delta else None,
                Canary(
                    tuple(int(t) for t in canary["token_ids"]),
                    tuple(float(x) for x in canary["logprobs"]),
                )
                if canary
                else None,
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise WeightVerificationError(f"manifest is malformed: {exc}") from None
        for f in (*files, *(manifest.delta.files if manifest.delta else ())):
            if (
                "/" in f.name
                or "\\" in f.name
                or f.name.startswith(".")
                or not f.name.endswith(".safetensors")
            ):
                raise WeightVerificationError(
                    f"manifest file name {f.name!r} is not a plain .safetensors name"
                )
            if f.algorithm not in DIGESTS or len(f.pieces) != pieces_of(
                f.size, manifest.chunk_bytes
            ):
                raise WeightVerificationError(f"manifest entry {f.name!r} has no valid digests")
        if manifest.format != "safetensors" or not files or manifest.chunk_bytes <= 0:
            raise WeightVerificationError("manifest must list safetensors files")
        return manifest


def _entries(raw: Any) -> tuple[FileEntry, ...]:
    return tuple(
        FileEntry(str(f["name"]), int(f["size"]), str(f["digest"]), tuple(map(str, f["pieces"])))
        for f in raw
    )


def pieces_of(size: int, chunk_bytes: int) -> int:
    return max(1, -(-size // chunk_bytes))


def delta_name(base: int, name: str) -> str:
    """The delta file of full file ``name`` against version ``base``."""
    return f"delta{base}-{name}"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def piece_hasher(algorithm: str) -> Any:
    """A new hasher (``update``, ``hexdigest``) of one of ``DIGESTS``; both release the GIL
    while they hash, so pieces are hashed in parallel threads."""
    if algorithm == "xxh3-128":
        import xxhash

        return xxhash.xxh3_128()
    if algorithm == "blake3":
        import blake3

        return blake3.blake3(max_threads=1)
    raise WeightVerificationError(
        f"unknown piece digest {algorithm!r} (known: {', '.join(DIGESTS)})"
    )


def digest_of(pieces: tuple[str, ...], algorithm: str) -> str:
    """A file's digest from its piece digests."""
    h = piece_hasher(algorithm)
    h.update(b"".join(bytes.fromhex(p) for p in pieces))
    return f"{algorithm}:{h.hexdigest()}"


def hash_piece(data: bytes | memoryview, algorithm: str) -> str:
    h = piece_hasher(algorithm)
    h.update(data)
    return str(h.hexdigest())


def hash_file(path: Path, chunk_bytes: int = CHUNK_BYTES, algorithm: str = DIGESTS[0]) -> FileEntry:
    """Size, digest and piece digests of one file (pieces hashed in parallel threads)."""
    import mmap
    from concurrent.futures import ThreadPoolExecutor

    size = path.stat().st_size
    if size == 0:
        pieces: tuple[str, ...] = (hash_piece(b"", algorithm),)
    else:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            view = memoryview(m)
            try:
                spans = [(a, min(a + chunk_bytes, size)) for a in range(0, size, chunk_bytes)]
                with ThreadPoolExecutor(min(4, len(spans))) as pool:
                    pieces = tuple(
                        pool.map(lambda s: hash_piece(view[s[0] : s[1]], algorithm), spans)
                    )
            finally:
                view.release()
    return FileEntry(path.name, size, digest_of(pieces, algorithm), pieces)


def announcement_signature(ann: WeightAnnouncement, token: str) -> str:
    """HMAC-SHA256 (hex) under ``token`` of every field of ``ann`` but the signature."""
    body = json.dumps(
        [ann.version, ann.url, ann.manifest_sha256, ann.total_bytes, repr(float(ann.created_at))]
    ).encode()
    return hmac.new(token.encode(), body, hashlib.sha256).hexdigest()


def check_announcement(ann: WeightAnnouncement, token: str | None, trusted_url: str) -> None:
    """Refuse an announcement before anything is downloaded: with a token, its signature must
    verify (so a forged one never triggers a download, nor receives the token); with a trusted
    base URL, the version must be served under it."""
    if token is not None and not hmac.compare_digest(
        ann.signature, announcement_signature(ann, token)
    ):
        raise WeightVerificationError(
            f"announcement of v{ann.version} is not signed with the run's weight token"
        )
    base = trusted_url.rstrip("/")
    if base and not ann.url.startswith(base + "/"):
        raise WeightVerificationError(
            f"announcement of v{ann.version} points at {ann.url}, outside the configured "
            f"learner URL {base}"
        )


def write_manifest(
    directory: Path,
    version: int,
    *,
    origin: tuple[str, str] | None = None,
    delta: Delta | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    algorithm: str = DIGESTS[0],
    canary: Canary | None = None,
) -> tuple[Manifest, bytes]:
    """Describe every full ``*.safetensors`` file of ``directory`` (delta files are described
    by ``delta``) in its ``manifest.json``, pieces hashed with ``algorithm``."""
    skip = {f.name for f in delta.files} if delta else set()
    files = tuple(
        hash_file(p, chunk_bytes, algorithm)
        for p in sorted(directory.glob("*.safetensors"))
        if p.name not in skip
    )
    manifest = Manifest(
        version, files, chunk_bytes=chunk_bytes, origin=origin, delta=delta, canary=canary
    )
    data = manifest.to_bytes()
    (directory / MANIFEST).write_bytes(data)
    return manifest, data


def machine_id() -> str:
    """What identifies this machine (and boot) to a sampler deciding whether the learner's
    directory is its own: a sampler in another container or host never matches."""
    for p in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            text = Path(p).read_text().strip()
        except OSError:
            continue
        if text:
            boot = ""
            with contextlib.suppress(OSError):
                boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
            return f"{text}:{boot}:{_mount_ns()}"
    import socket

    return f"host:{socket.gethostname()}:{_mount_ns()}"


def _mount_ns() -> str:
    try:
        return os.readlink("/proc/self/ns/mnt")
    except OSError:
        return ""


def safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape) from a safetensors file's header, checking that the header
    is well formed and that every tensor's bytes lie inside the file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise WeightVerificationError(f"{path.name}: too short for a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, size - 8):
            raise WeightVerificationError(f"{path.name}: header length {n} is impossible")
        try:
            header: dict[str, Any] = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as exc:
            raise WeightVerificationError(f"{path.name}: header is not JSON ({exc})") from None
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    data_len = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            shape = tuple(int(d) for d in info["shape"])
            dtype = str(info["dtype"])
        except (KeyError, TypeError, ValueError):
            raise WeightVerificationError(
                f"{path.name}: tensor {name!r} has a malformed entry"
            ) from None
        if not 0 <= start <= end <= data_len:
            raise WeightVerificationError(f"{path.name}: tensor {name!r} lies outside the file")
        out[name] = (dtype, shape)
    return out


def tensor_specs(directory: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """All tensors of all safetensors files in ``directory``."""
    specs: dict[str, tuple[str, tuple[int, ...]]] = {}
    for p in sorted(directory.glob("*.safetensors")):
        specs.update(safetensors_header(p))
    if not specs:
        raise WeightVerificationError(f"{directory}: no safetensors tensors")
    return specs


def check_compatible(
    candidate: dict[str, tuple[str, tuple[int, ...]]],
    reference: dict[str, tuple[str, tuple[int, ...]]],
) -> None:
    """Refuse weights whose tensor names, dtypes or shapes differ from the engine's."""
    missing = sorted(set(reference) - set(candidate))
    extra = sorted(set(candidate) - set(reference))
    if missing or extra:
        raise WeightVerificationError(
            f"tensor names differ: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    for name, spec in reference.items():
        if candidate[name] != spec:
            raise WeightVerificationError(f"tensor {name}: {candidate[name]} != expected {spec}")
