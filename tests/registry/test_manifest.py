"""Manifests and the signature checks made before a worker sees a byte."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from gateway.errors import BadModelAnswer, InvalidInput
from gateway.registry import ManifestError, check_inputs, check_outputs, load_manifest
from gateway.registry.signature import ANSWER_HEAD_BYTES, answer_bound, check_answer
from gateway_client.protocol import RequestedOutput, Tensor


def _write(tmp: Path, **changes: object) -> Path:
    data = b"onnx bytes"
    manifest = {
        "name": "m", "version": "1",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2], "domain": {"min": 0, "max": 1}}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 1]}],
        "onnx": {"file": "model.onnx", "sha256": hashlib.sha256(data).hexdigest()},
    }
    manifest.update(changes)
    (tmp / "model.onnx").write_bytes(data)
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    return tmp


def test_demo_manifests_load_and_verify(models_root: Path) -> None:
    for name in ("digits", "resnetish"):
        m = load_manifest(models_root / name / "1")
        assert m.read_verified()[:2]  # the file matches its recorded SHA-256
    digits = load_manifest(models_root / "digits" / "1")
    assert digits.inputs[0].shape == (-1, 64) and (digits.inputs[0].min, digits.inputs[0].max) == (0.0, 16.0)
    assert 0.9 < digits.metrics["test_accuracy"] <= 1.0
    assert 11_000_000 < load_manifest(models_root / "resnetish" / "1").metrics["parameters"] < 12_500_000


def test_a_modified_model_file_is_refused(tmp_path: Path) -> None:
    m = load_manifest(_write(tmp_path))
    (tmp_path / "model.onnx").write_bytes(b"onnx bytez")
    with pytest.raises(ManifestError, match="SHA-256"):
        m.read_verified()


@pytest.mark.parametrize("changes,fragment", [
    ({"name": "../evil"}, "name"),
    ({"version": ".."}, "version"),
    ({"onnx": {"sha256": "abc"}}, "sha256"),
    ({"onnx": {"file": "../x.onnx", "sha256": "0" * 64}}, "model.onnx"),
    ({"inputs": []}, "at least one"),
    ({"inputs": [{"name": "x", "datatype": "FP8", "shape": [1]}]}, "datatype"),
    ({"device": "tpu"}, "device"),
    ({"batch": "yes"}, "batch must be true or false"),
    ({"batch": True, "outputs": [{"name": "y", "datatype": "FP32", "shape": [1]}]},
     r"first dimension must be -1 \(the batch\); y FP32 \[1\] has none"),
    # Read before the signature is checked: a planted manifest of gigabytes must not be parsed.
    ({"description": "x" * (2 << 20)}, "over 1048576 bytes"),
], ids=["name-traversal", "version-dots", "bad-digest", "file-escape", "no-inputs", "bad-dtype", "bad-device",
        "batch-not-bool", "batch-fixed-first", "oversized"])
def test_invalid_manifests_name_the_problem(tmp_path: Path, changes: dict[str, object], fragment: str) -> None:
    with pytest.raises(ManifestError, match=fragment):
        load_manifest(_write(tmp_path, **changes))


def test_a_batch_models_answer_is_bounded_and_checked_by_the_requests_rows(tmp_path: Path) -> None:
    outputs = [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}, {"name": "k", "datatype": "INT64", "shape": [-1]}]
    m = load_manifest(_write(tmp_path, batch=True, outputs=outputs))
    assert answer_bound(m, 5) == ANSWER_HEAD_BYTES + 5 * 3 * 4 + 5 * 8
    check_answer(m, [Tensor("y", np.zeros((5, 3), np.float32)), Tensor("k", np.zeros(5, np.int64))], 5)
    with pytest.raises(BadModelAnswer, match="answered 6 rows of k to 5 input rows"):
        check_answer(m, [Tensor("y", np.zeros((5, 3), np.float32)), Tensor("k", np.zeros(6, np.int64))], 5)
    # Nothing bounds it: not declared batch; a BYTES output; an open dimension past the first.
    assert answer_bound(load_manifest(_write(tmp_path, outputs=outputs)), 5) is None
    check_answer(load_manifest(_write(tmp_path, outputs=outputs)), [Tensor("k", np.zeros(6, np.int64))], 5)
    for spec in ({"name": "t", "datatype": "BYTES", "shape": [-1]}, {"name": "y", "datatype": "FP32", "shape": [-1, -1]}):
        assert answer_bound(load_manifest(_write(tmp_path, batch=True, outputs=[spec])), 5) is None


@pytest.mark.parametrize("array,fragment", [
    (np.zeros((1, 2), np.float64), "datatype"),
    (np.zeros((1, 3), np.float32), "shape"),
    (np.zeros((2,), np.float32), "shape"),
    (np.array([[np.nan, 0]], np.float32), "NaN"),
    (np.array([[np.inf, 0]], np.float32), "NaN or infinite"),
    (np.array([[2.0, 0]], np.float32), "domain"),
    (np.zeros((0, 2), np.float32), "empty"),
], ids=["dtype", "dim", "rank", "nan", "inf", "domain", "empty-batch"])
def test_signature_refusals(tmp_path: Path, array: np.ndarray, fragment: str) -> None:
    m = load_manifest(_write(tmp_path))
    with pytest.raises(InvalidInput, match=fragment):
        check_inputs(m, [Tensor("x", array)])


def test_signature_accepts_any_batch_and_checks_names(tmp_path: Path) -> None:
    m = load_manifest(_write(tmp_path))
    check_inputs(m, [Tensor("x", np.full((7, 2), 0.5, np.float32))])
    with pytest.raises(InvalidInput, match="unknown input"):
        check_inputs(m, [Tensor("x", np.zeros((1, 2), np.float32)), Tensor("z", np.zeros(1, np.float32))])
    with pytest.raises(InvalidInput, match="unknown output"):
        check_outputs(m, [RequestedOutput("nope")])


def test_domain_clip_policy_and_utf8_bytes() -> None:
    from gateway.registry.manifest import Manifest, TensorSpec

    def manifest(*specs: TensorSpec) -> Manifest:
        return Manifest("m", "1", Path("."), specs, (), "0" * 64)

    clip = manifest(TensorSpec("x", "FP32", (-1, 2), 0.0, 1.0, clip=True))
    out = check_inputs(clip, [Tensor("x", np.array([[-5.0, 0.5]], np.float32))])
    assert out[0].array.tolist() == [[0.0, 0.5]] and out[0].array.dtype == np.float32
    reject = manifest(TensorSpec("x", "FP32", (-1, 2), 0.0, 1.0))
    with pytest.raises(InvalidInput, match="outside the model's domain"):
        check_inputs(reject, [Tensor("x", np.array([[-5.0, 0.5]], np.float32))])
    with pytest.raises(InvalidInput, match="NaN"):  # clipping never launders NaN
        check_inputs(clip, [Tensor("x", np.array([[np.nan, 0.5]], np.float32))])
    text = manifest(TensorSpec("s", "BYTES", (-1,)))
    assert check_inputs(text, [Tensor("s", np.array([b"caf\xc3\xa9"], dtype=object))])
    with pytest.raises(InvalidInput, match="element 1 is not valid UTF-8"):
        check_inputs(text, [Tensor("s", np.array([b"ok", b"\xff\xfe"], dtype=object))])
    binary = manifest(TensorSpec("s", "BYTES", (-1,), text=False))
    assert check_inputs(binary, [Tensor("s", np.array([b"\xff\xfe"], dtype=object))])
