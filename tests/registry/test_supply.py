"""Model supply chain: admission of hostile ONNX files, and encryption at rest."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from gateway.cli import main
from gateway.config import SupplyConfig
from gateway.registry.admission import AdmissionError, admit
from gateway.registry.loading import load_model_bytes
from gateway.registry.manifest import ManifestError, load_manifest
from gateway.registry.sealing import SEALED_NAME, LocalKey, SealError, rewrap, seal, unseal
from gateway.registry.signing import sign_model
from tests.conftest import onnx_reference, start_gateway

SUPPLY = SupplyConfig(max_initializer_bytes=1024 * 1024)


def _model(initializer: TensorProto | None = None, domain: str = "", op: str = "Relu",
           opset: int = 17) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    nodes = [helper.make_node(op, ["x"], ["y"], domain=domain)]
    inits = [initializer] if initializer is not None else []
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], initializer=inits), opset_imports=imports)


def _external(location: str) -> TensorProto:
    t = helper.make_tensor("w", TensorProto.FLOAT, [4], [0.0] * 4)
    t.ClearField("float_data")
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=location)
    return t


def _symlink_case(folder: Path) -> bytes:
    outside = folder.parent / "secret.bin"
    outside.write_bytes(b"\0" * 16)
    (folder / "weights.bin").symlink_to(outside)
    return _model(_external("weights.bin")).SerializeToString()


HOSTILE: list[tuple[str, Callable[[Path], bytes], str]] = [
    ("external data ../x", lambda f: _model(_external("../x.bin")).SerializeToString(), "climbs out"),
    ("absolute path", lambda f: _model(_external("/etc/passwd")).SerializeToString(), "absolute"),
    ("nested escape", lambda f: _model(_external("sub/../../x.bin")).SerializeToString(), "climbs out"),
    ("symlink out of the folder", _symlink_case, "symbolic link"),
    ("custom op domain", lambda f: _model(domain="com.evil", op="Backdoor").SerializeToString(),
     "operator domain 'com.evil'"),
    ("oversized initializer", lambda f: _model(helper.make_tensor(
        "w", TensorProto.FLOAT, [512, 1024], np.zeros(512 * 1024, np.float32).tobytes(), raw=True)).SerializeToString(),
     "max_initializer_bytes"),
    ("truncated protobuf", lambda f: _model().SerializeToString()[:-7], "not a valid ONNX model"),
    ("not a protobuf", lambda f: b"\xff" * 100, "not a valid ONNX model"),
    ("opset from the future", lambda f: _model(opset=99).SerializeToString(), "opset 99"),
]


@pytest.mark.parametrize("make,reason", [(h[1], h[2]) for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_models_are_refused_with_a_reason(tmp_path: Path, make: Callable[[Path], bytes], reason: str) -> None:
    folder = tmp_path / "m" / "1"
    folder.mkdir(parents=True)
    data = make(folder)
    with pytest.raises(AdmissionError, match=reason):
        admit(data, SUPPLY, folder)


def test_a_model_in_memory_may_not_use_external_data_at_all(tmp_path: Path) -> None:
    with pytest.raises(AdmissionError, match="served from memory"):
        admit(_model(_external("weights.bin")).SerializeToString(), SUPPLY, None)


def test_external_data_beside_the_model_is_refused_on_the_serving_path(models_root: Path, tmp_path: Path,
                                                                      pki: Path) -> None:
    """A model's bytes go to its worker through a pipe; ONNX Runtime would resolve a relative data
    file ("secret.bin") against the worker's working directory, not the model's folder. Even a
    signed model whose data file sits beside it is refused."""
    root = _copy_models(models_root, tmp_path / "models")
    folder = root / "digits" / "1"
    (folder / "secret.bin").write_bytes(b"\0" * 16)
    _replace_model(folder, _model(_external("secret.bin")).SerializeToString())
    sign_model(folder, pki / "keys" / "model-signing.key")
    supply = SupplyConfig(trusted_keys=(str(pki / "keys" / "model-signing.pub"),))
    with pytest.raises(ManifestError, match="external data cannot be used"):
        load_model_bytes(load_manifest(folder), supply)


def test_the_demo_models_are_admitted(models_root: Path) -> None:
    for name in ("digits", "resnetish"):
        report = admit((models_root / name / "1" / "model.onnx").read_bytes(), SupplyConfig(), models_root / name / "1")
        assert report.nodes > 0 and report.domains and set(report.domains) <= {"", "ai.onnx"}


def test_the_demo_models_agree_with_their_manifests(models_root: Path) -> None:
    for name in ("digits", "resnetish"):
        folder = models_root / name / "1"
        assert admit((folder / "model.onnx").read_bytes(), SupplyConfig(), folder, load_manifest(folder)).nodes > 0


DISAGREEING = [  # what the manifest of a Softmax over x [batch, 4] -> y [batch, 4] says instead
    ({"inputs": [{"name": "x", "datatype": "FP64", "shape": [-1, 4]}]}, "input 'x' is FP64 in the manifest, FP32 in the model"),
    ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]},
     "the manifest declares inputs ['input'], the model's graph has ['x']"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4, 1]}]}, "input 'x' has rank 3 in the manifest, 2 in"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, -1]}]}, "input 'x' dimension 1 is -1 in the manifest, 4"),
    ({"outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, 4]}]},
     "the manifest declares outputs ['probs'], the model's graph has ['y']"),
    ({"outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]},
                  {"name": "z", "datatype": "FP32", "shape": [-1, 4]}]}, "outputs ['y', 'z'], the model's graph has ['y']"),
]


@pytest.mark.parametrize(("change", "reason", "rows"), [*((c, r, "batch") for c, r in DISAGREEING), (
    {"batch": True}, "batch is true, but the graph's first dimensions are not one named dimension ('x': batch, "
                     "'y': rows)", "rows",
)], ids=["datatype", "name", "rank", "open-dimension", "output-name", "extra-output", "batch"])
def test_a_manifest_that_does_not_describe_its_model_is_refused(tmp_path: Path, change: dict[str, Any],
                                                                reason: str, rows: str) -> None:
    """Requests are checked against the manifest: one that disagrees with the model let them through
    to fail in ONNX Runtime (a 500 for a renamed input), or advertised outputs never answered; a
    worker's answers are bounded by the request's rows where it declares ``batch``."""
    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"], axis=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, 4])])
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    manifest = {"name": "m", "version": "1", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
                "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
                "onnx": {"file": "model.onnx", "sha256": hashlib.sha256(data).hexdigest()}}
    (tmp_path / "model.onnx").write_bytes(data)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert admit(data, SUPPLY, None, load_manifest(tmp_path)).nodes == 1
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, **change}))
    with pytest.raises(AdmissionError, match=re.escape(reason)):
        admit(data, SUPPLY, None, load_manifest(tmp_path))
    with pytest.raises(ManifestError, match="refused at admission: the manifest does not describe this model"):
        load_model_bytes(load_manifest(tmp_path), dataclasses.replace(SUPPLY, require_signature=False))


def test_a_gateway_refuses_to_start_a_hostile_model(models_root: Path, tmp_path: Path, pki: Path) -> None:
    root = _copy_models(models_root, tmp_path / "models")
    hostile = _model(domain="com.evil", op="Backdoor").SerializeToString()
    _replace_model(root / "digits" / "1", hostile)
    sign_model(root / "digits" / "1", pki / "keys" / "model-signing.key")  # signed, yet hostile
    from tests.conftest import free_port, write_config

    config = write_config(pki, tmp_path, root, free_port())
    result = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "digits/1: refused at admission: operator domain 'com.evil'" in result.stderr


def _copy_models(src: Path, dst: Path) -> Path:
    for name in ("digits", "resnetish"):
        shutil.copytree(src / name, dst / name)
    return dst


def _replace_model(folder: Path, data: bytes) -> None:
    import hashlib

    (folder / "model.onnx").write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["onnx"]["sha256"] = hashlib.sha256(data).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


# -- encryption at rest -------------------------------------------------------------------------

def test_seal_unseal_rewrap() -> None:
    old, new = LocalKey(os.urandom(32)), LocalKey(os.urandom(32))
    sealed = seal(b"model bytes", "digits", "1", old)
    assert b"model bytes" not in sealed
    assert unseal(sealed, "digits", "1", old) == b"model bytes"
    with pytest.raises(SealError, match="not"):
        unseal(sealed, "digits", "1", new)  # wrong key
    with pytest.raises(SealError, match="not digits/2"):
        unseal(sealed, "digits", "2", old)  # passed off as another version
    rewrapped = rewrap(sealed, old, new)
    ciphertext = len(b"model bytes") + 16  # plus the GCM tag
    assert rewrapped[-ciphertext:] == sealed[-ciphertext:]  # same ciphertext: only the wrapped key changed
    assert unseal(rewrapped, "digits", "1", new) == b"model bytes"
    tampered = bytearray(sealed)
    tampered[-1] ^= 1
    with pytest.raises(SealError, match="does not authenticate"):
        unseal(bytes(tampered), "digits", "1", old)


@pytest.mark.slow
def test_an_encrypted_model_serves_what_its_plaintext_does_and_leaves_no_plaintext_on_disk(
        models_root: Path, tmp_path: Path, pki: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    root = _copy_models(models_root, tmp_path / "models")
    plaintext = (root / "digits" / "1" / "model.onnx").read_bytes()
    kek = tmp_path / "kek.b64"
    kek.write_bytes(base64.b64encode(os.urandom(32)))
    from tests.conftest import free_port, write_config

    cli = tmp_path / "cli"
    cli.mkdir()
    gateway_toml = write_config(pki, cli, root, free_port(), supply=f'kek_file = "{kek}"')
    assert main(["models", "encrypt", str(root / "digits" / "1"), "--config", str(gateway_toml)]) == 0
    assert not (root / "digits" / "1" / "model.onnx").exists() and (root / "digits" / "1" / SEALED_NAME).exists()
    # The folder changed; the command signed it again with the configured key.
    assert main(["models", "verify", str(root / "digits" / "1"), "--config", str(gateway_toml)]) == 0
    capsys.readouterr()
    assert main(["models", "check", str(root / "digits" / "1"), "--config", str(gateway_toml)]) == 0
    assert "digits/1: admitted (" in (checked := capsys.readouterr().out), checked
    assert "; each answer held to the request's rows (batch)" in checked
    # Rotate the KEK, then serve with the new one only.
    new_kek = tmp_path / "kek2.b64"
    new_kek.write_bytes(base64.b64encode(os.urandom(32)))
    assert main(["models", "rewrap", str(root / "digits" / "1"), "--new-kek-file", str(new_kek),
                 "--config", str(gateway_toml)]) == 0
    with pytest.raises(ManifestError, match="cannot unseal"):
        load_model_bytes(load_manifest(root / "digits" / "1"), SupplyConfig(kek_file=str(kek), require_signature=False))
    gw_tmp = tmp_path / "gw"
    gw_tmp.mkdir()
    gw = start_gateway(pki, gw_tmp, root, supply=f'kek_file = "{new_kek}"')
    try:
        x = np.random.default_rng(5).uniform(0, 16, (3, 64)).astype(np.float32)
        with gw.client() as c:
            r = c.post("/v2/models/digits/infer", json={"inputs": [{"name": "input", "datatype": "FP32",
                                                                    "shape": [3, 64], "data": x.ravel().tolist()}]})
        assert r.status_code == 200, r.text
        got = np.array(r.json()["outputs"][0]["data"], np.float32).reshape(3, 10)
        np.testing.assert_allclose(got, onnx_reference(models_root, "digits", x), rtol=1e-5, atol=1e-6)
        # No plaintext copy anywhere a worker or the gateway could have written it.
        needle = plaintext[len(plaintext) // 2: len(plaintext) // 2 + 64]
        for place in (tmp_path, Path("/dev/shm"), Path("/var/tmp")):
            for path in place.rglob("*"):
                if path.is_file() and not path.is_symlink():
                    try:
                        assert needle not in path.read_bytes(), f"plaintext model bytes found in {path}"
                    except PermissionError:
                        continue
    finally:
        gw.stop()


# -- signatures -----------------------------------------------------------------------------------

def _signing_cases() -> list[tuple[str, Callable[[Path, Path], None], str]]:
    def tamper(folder: Path, pki: Path) -> None:
        data = bytearray((folder / "model.onnx").read_bytes())
        data[len(data) // 2] ^= 1
        (folder / "model.onnx").write_bytes(bytes(data))

    def extra(folder: Path, pki: Path) -> None:
        (folder / "notes.txt").write_text("an extra file")

    def wrong_key(folder: Path, pki: Path) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        other = folder.parent.parent.parent / "other.key"
        other.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        sign_model(folder, other)

    def unsigned(folder: Path, pki: Path) -> None:
        (folder / "model.sig").unlink()

    def huge_signature(folder: Path, pki: Path) -> None:  # parsed once per trusted key, had it been read
        with open(folder / "model.sig", "ab") as f:
            f.truncate(3 << 30)

    return [("one byte tampered", tamper, "does not match the files"), ("an extra file", extra, "notes.txt"),
            ("signed by another key", wrong_key, "not trusted"), ("unsigned", unsigned, "unsigned"),
            ("a signature of 3 GiB", huge_signature, "a signature bundle is at most 1048576")]


@pytest.mark.parametrize("change,reason", [(c[1], c[2]) for c in _signing_cases()], ids=[c[0] for c in _signing_cases()])
def test_a_gateway_refuses_a_model_whose_signature_fails(models_root: Path, tmp_path: Path, pki: Path,
                                                         change: Callable[[Path, Path], None], reason: str) -> None:
    from tests.conftest import free_port, write_config

    root = _copy_models(models_root, tmp_path / "models")
    folder = root / "digits" / "1"
    config = write_config(pki, tmp_path, root, free_port())
    assert main(["models", "verify", str(folder), "--config", str(config)]) == 0  # the copy verifies as it is
    change(folder, pki)
    assert main(["models", "verify", str(folder), "--config", str(config)]) == 1
    result = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "digits/1: refused:" in result.stderr and reason in result.stderr, result.stderr


class XorKey:
    """A stand-in for a KMS: any class with kek_id, wrap and unwrap can hold the KEK."""

    def __init__(self, config: SupplyConfig) -> None:
        self.key = LocalKey(bytes(range(32)))

    def kek_id(self) -> str:
        return "xor-" + self.key.kek_id()

    def wrap(self, data_key: bytes) -> bytes:
        return self.key.wrap(data_key)

    def unwrap(self, wrapped: bytes) -> bytes:
        return self.key.unwrap(wrapped)


def test_the_kek_can_come_from_the_environment_or_a_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.registry.sealing import key_provider

    monkeypatch.setenv("GATEWAY_MODEL_KEK", base64.b64encode(bytes(32)).decode())
    from_env = key_provider(SupplyConfig())
    assert unseal(seal(b"m", "a", "1", from_env), "a", "1", key_provider(SupplyConfig())) == b"m"
    provider = key_provider(SupplyConfig(kek_provider="tests.registry.test_supply:XorKey"))
    sealed = seal(b"weights", "a", "1", provider)
    assert unseal(sealed, "a", "1", provider) == b"weights" and provider.kek_id().startswith("xor-")
    with pytest.raises(SealError, match="sealed under key"):
        unseal(sealed, "a", "1", from_env)
    monkeypatch.delenv("GATEWAY_MODEL_KEK")
    with pytest.raises(SealError, match="no key-encryption key"):
        key_provider(SupplyConfig())
