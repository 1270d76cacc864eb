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

import hashlib
import hmac
import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import WeightDownloadError, WeightVerificationError
from pipeline.fsutil import staged_dir
from pipeline.messages import WeightAnnouncement

MANIFEST = "manifest.json"
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class FileEntry:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    version: int
    files: tuple[FileEntry, ...]
    format: str = "safetensors"

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_bytes(self) -> bytes:
        body = {
            "version": self.version,
            "format": self.format,
            "files": [asdict(f) for f in self.files],
        }
        return json.dumps(body, sort_keys=True, indent=1).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        try:
            body = json.loads(data)
            files = tuple(
                FileEntry(str(f["name"]), int(f["size"]), str(f["sha256"])) for f in body["files"]
            )
            manifest = cls(int(body["version"]), files, str(body.get("format", "safetensors")))
        except (ValueError, KeyError, TypeError) as exc:
            raise WeightVerificationError(f"manifest is malformed: {exc}") from None
        for f in files:
            if (
                "/" in f.name
                or "\\" in f.name
                or f.name.startswith(".")
                or not f.name.endswith(".safetensors")
            ):
                raise WeightVerificationError(
                    f"manifest file name {f.name!r} is not a plain .safetensors name"
                )
        if manifest.format != "safetensors" or not files:
            raise WeightVerificationError("manifest must list safetensors files")
        return manifest


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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


def write_manifest(directory: Path, version: int) -> tuple[Manifest, bytes]:
    """Describe every ``*.safetensors`` file of ``directory`` in its ``manifest.json``."""
    files = tuple(
        FileEntry(p.name, p.stat().st_size, sha256_file(p))
        for p in sorted(directory.glob("*.safetensors"))
    )
    manifest = Manifest(version, files)
    data = manifest.to_bytes()
    (directory / MANIFEST).write_bytes(data)
    return manifest, data


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


async def download_version(
    url: str,
    manifest_sha256: str,
    dest_root: Path,
    *,
    reference: dict[str, tuple[str, tuple[int, ...]]] | None = None,
    token: str | None = None,
    timeout_s: float = 600.0,
) -> tuple[Manifest, Path]:
    """Fetch and verify one version from the weight server into ``dest_root/v<version>``."""
    import aiohttp

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with aiohttp.ClientSession(timeout=timeout, headers=headers) as http:
            async with http.get(f"{url}/{MANIFEST}") as resp:
                if resp.status != 200:
                    raise WeightVerificationError(f"GET {url}/{MANIFEST}: HTTP {resp.status}")
                data = await resp.read()
            if sha256_bytes(data) != manifest_sha256:
                raise WeightVerificationError("manifest sha256 does not match the announcement")
            manifest = Manifest.from_bytes(data)
            final = dest_root / f"v{manifest.version}"
            with staged_dir(final) as tmp:
                for entry in manifest.files:
                    await _fetch_file(http, f"{url}/{entry.name}", tmp / entry.name, entry)
                if reference is not None:
                    check_compatible(tensor_specs(tmp), reference)
                (tmp / MANIFEST).write_bytes(data)
        return manifest, final
    except WeightVerificationError:
        raise
    except (OSError, aiohttp.ClientError, TimeoutError) as exc:
        raise WeightDownloadError(f"download from {url} failed: {exc}") from exc


async def _fetch_file(http: Any, url: str, path: Path, entry: FileEntry) -> None:
    h, size = hashlib.sha256(), 0
    async with http.get(url) as resp:
        if resp.status != 200:
            raise WeightVerificationError(f"GET {url}: HTTP {resp.status}")
        with path.open("wb") as f:
            async for block in resp.content.iter_chunked(1 << 20):
                size += len(block)
                if size > entry.size:
                    raise WeightVerificationError(
                        f"{entry.name}: more than the {entry.size} bytes announced"
                    )
                h.update(block)
                f.write(block)
    if size != entry.size:
        raise WeightVerificationError(f"{entry.name}: {size} bytes, manifest says {entry.size}")
    if h.hexdigest() != entry.sha256:
        raise WeightVerificationError(f"{entry.name}: sha256 mismatch")
