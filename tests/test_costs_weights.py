"""The GPU-seconds cost model, weight manifests and safetensors header checks, the tree view."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest

from pipeline.cli.treeview import render_html
from pipeline.errors import WeightVerificationError
from pipeline.treepo.costs import CostModel, StepConcurrency, Work, independent_work
from pipeline.weights.manifest import Manifest, check_compatible, safetensors_header, write_manifest
from pipeline.wire.messages import decode

DATA = Path(__file__).parent / "data"


def test_cost_model_recovers_known_coefficients() -> None:
    a, b, c = 2e-5, 1e-3, 4e-3  # prefill per token, decode per token, per engine step
    rng = random.Random(0)
    model = CostModel()
    for _ in range(200):
        w = Work(rng.randint(0, 5000), rng.randint(1, 800), rng.randint(1, 64))
        model.observe(w, a * w.prefill_tokens + b * w.decoded_tokens + c * w.steps)
    assert model.coef == pytest.approx((a, b, c), rel=1e-6)
    assert model.decode_tokens_per_second == pytest.approx(1 / b)
    assert model.estimate(Work(1000, 100, 10)) == pytest.approx(a * 1000 + b * 100 + c * 10)


def test_cost_model_never_goes_negative() -> None:
    model = CostModel()
    for n in range(1, 30):  # time depends on decode only, prefill anti-correlated noise
        model.observe(Work(100 - n, 10 * n, 8), 0.01 * n)
    assert all(x >= 0 for x in model.coef)
    assert model.estimate(Work(50, 100, 8)) > 0


def test_independent_work_of_one_prompt() -> None:
    """8 samples of a 5-token prompt: each computes the prompt, decodes the mean length, and the
    request's 12 steps are shared with the 3 other prompts in flight."""
    w = independent_work(5, 8, 10.5, 12, 4.0)
    assert (w.prefill_tokens, w.decoded_tokens, w.steps) == (40, 84, 3)
    assert independent_work(5, 8, 10.5, 12, 0.2).steps == 12  # never less than one prompt
    assert (w + w).vector() == (80, 168, 6)


def _safetensors(path: Path, tensors: dict[str, tuple[str, list[int], int]]) -> None:
    header, offset = {}, 0
    for name, (dtype, shape, nbytes) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


def test_step_concurrency_prices_an_engine_schedule_exactly() -> None:
    """A random schedule of groups on an engine that advances every running group one token per
    step: the steps it takes equal the sum of ``independent_work`` steps priced with the
    step-weighted number of groups growing (``StepConcurrency``), whatever the arrival pattern;
    engine steps with nothing growing (another job) do not count."""
    rng = random.Random(3)
    for _ in range(20):
        lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 30))]
        pending = list(lengths)
        limit = rng.randint(1, 8)
        conc = StepConcurrency()
        running: list[int] = []
        steps = 0
        while pending or running:
            while pending and len(running) < limit and rng.random() < 0.7:
                running.append(pending.pop())
                conc.started()
            conc.step()
            if not running:
                continue
            steps += 1
            running = [r - 1 for r in running]
            for _ in range(running.count(0)):
                conc.ended()
            running = [r for r in running if r > 0]
        assert conc.growing == 0
        priced = sum(independent_work(1, 1, 1.0, n, conc.mean).steps for n in lengths)
        assert priced == pytest.approx(steps)
    assert StepConcurrency().mean == 1.0  # nothing measured yet: one group alone


def test_manifest_and_header_checks(tmp_path: Path) -> None:
    _safetensors(tmp_path / "model.safetensors", {"w": ("F32", [2, 3], 24), "b": ("F32", [3], 12)})
    manifest, data = write_manifest(tmp_path, 7)
    assert (
        Manifest.from_bytes(data) == manifest
        and manifest.total_bytes == (tmp_path / "model.safetensors").stat().st_size
    )
    spec = safetensors_header(tmp_path / "model.safetensors")
    assert spec == {"w": ("F32", (2, 3)), "b": ("F32", (3,))}
    check_compatible(spec, dict(spec))
    with pytest.raises(WeightVerificationError, match="tensor w"):
        check_compatible({**spec, "w": ("F32", (3, 2))}, spec)
    with pytest.raises(WeightVerificationError, match="missing"):
        check_compatible({"w": spec["w"]}, spec)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(WeightVerificationError, match="impossible"):
        safetensors_header(bad)
    _safetensors(bad, {"w": ("F32", [2], 8)})
    bad.write_bytes(bad.read_bytes()[:-4])  # data cut short
    with pytest.raises(WeightVerificationError, match="outside the file"):
        safetensors_header(bad)
    for evil in ("../x.safetensors", "model.bin", ".hidden.safetensors"):
        body = json.dumps(
            {
                "version": 1,
                "files": [{"name": evil, "size": 1, "digest": "blake3:0", "pieces": ["0"]}],
            }
        ).encode()
        with pytest.raises(WeightVerificationError, match="not a plain"):
            Manifest.from_bytes(body)
    with pytest.raises(WeightVerificationError, match="malformed"):
        Manifest.from_bytes(b"not json")
    piece_count_wrong = json.loads(data)
    piece_count_wrong["files"][0]["pieces"] = []
    with pytest.raises(WeightVerificationError, match="no valid digests"):
        Manifest.from_bytes(json.dumps(piece_count_wrong).encode())
    unknown_digest = json.loads(data)
    unknown_digest["files"][0]["digest"] = "crc32:" + unknown_digest["files"][0]["digest"]
    with pytest.raises(WeightVerificationError, match="no valid digests"):
        Manifest.from_bytes(json.dumps(unknown_digest).encode())


def test_tree_view_shows_segments_and_rewards() -> None:
    tree = decode((DATA / "tree_rollout.msgpack").read_bytes())
    page = render_html(tree, lambda ids: "".join(chr(96 + t) for t in ids))  # type: ignore[arg-type]
    assert page.count('class="node"') == 4
    assert "#c8f7c5" in page and "#f7c5c5" in page  # one rewarded leaf, one punished
    assert "<code>ab</code>" in page  # node 0's tokens [1, 2] through the decoder
    assert "22% saved" in page


def test_staged_dir_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    from pipeline.fsutil import staged_dir

    final = tmp_path / "v1"
    with staged_dir(final) as tmp:
        (tmp / "a").write_text("new")
        assert not final.exists()
    assert (final / "a").read_text() == "new"
    with pytest.raises(RuntimeError), staged_dir(final) as tmp:
        (tmp / "a").write_text("half")
        raise RuntimeError("crash while writing")
    assert (final / "a").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["v1"]  # no temporary left behind


def test_announcements_are_signed_and_checked_before_any_download() -> None:
    from pipeline.errors import WeightVerificationError
    from pipeline.weights.manifest import announcement_signature, check_announcement
    from pipeline.wire.messages import WeightAnnouncement

    ann = WeightAnnouncement(7, "http://learner:5100/weights/7", "ab" * 32, 123, 1.5)
    ann.signature = announcement_signature(ann, "tok")
    check_announcement(ann, "tok", "http://learner:5100")
    check_announcement(ann, None, "")  # no token, no trusted URL: nothing to check
    for changed in (
        {"version": 8},
        {"url": "http://evil:80/weights/7"},
        {"manifest_sha256": "cd" * 32},
        {"total_bytes": 124},
        {"created_at": 1.6},
        {"signature": ""},
    ):
        forged = WeightAnnouncement(**{**ann.__dict__, **changed})
        with pytest.raises(WeightVerificationError, match="not signed"):
            check_announcement(forged, "tok", "")
    with pytest.raises(WeightVerificationError, match="not signed"):
        check_announcement(ann, "other-token", "")
    with pytest.raises(WeightVerificationError, match="outside the configured learner URL"):
        check_announcement(ann, "tok", "http://learner:5101")
    with pytest.raises(WeightVerificationError, match="outside"):
        check_announcement(ann, None, "http://learner:51")  # a prefix is not the same host
