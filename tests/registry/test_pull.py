"""``gateway models pull``: signed versions delivered into the serving root, verified on the copy,
whole or not at all; and signatures that hold whatever path they were made through."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.registry.pull import pull_models
from gateway.registry.signing import sign_model, verify_model


@pytest.fixture()
def delivery(tmp_path: Path, models_root: Path, pki: Path) -> Path:
    source = tmp_path / "delivery"
    shutil.copytree(models_root / "digits", source / "digits")
    sign_model(source / "digits" / "1", pki / "keys" / "model-signing.key")
    return source


def _keys(pki: Path) -> list[Path]:
    return [pki / "keys" / "model-signing.pub"]


def test_a_signature_made_through_a_relative_path_verifies_through_an_absolute_one(
        tmp_path: Path, models_root: Path, pki: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(models_root / "digits" / "1", tmp_path / "m" / "digits" / "1")
    monkeypatch.chdir(tmp_path)
    relative = Path("m/digits/1")
    sign_model(relative, pki / "keys" / "model-signing.key")
    sign_model(relative, pki / "keys" / "model-signing.key")  # signing again must not hash the old signature
    assert verify_model((tmp_path / relative).resolve(), _keys(pki)) == _keys(pki)[0]
    assert verify_model(relative, _keys(pki)) == _keys(pki)[0]


def test_pull_delivers_a_verified_version_once(delivery: Path, tmp_path: Path, pki: Path) -> None:
    root = tmp_path / "serving"
    seen = pull_models(delivery, root, _keys(pki))
    assert [(r.name, r.version, r.outcome) for r in seen] == [("digits", "1", "pulled")]
    assert verify_model(root / "digits" / "1", _keys(pki))
    again = pull_models(delivery, root, _keys(pki))
    assert [r.outcome for r in again] == ["present"]
    assert sorted(p.name for p in (root / "digits").iterdir()) == ["1"]  # no staging folder left behind


@pytest.mark.parametrize("tamper", ["changed-byte", "unsigned", "link", "foreign-key"])
def test_pull_refuses_what_does_not_verify_and_leaves_nothing(delivery: Path, tmp_path: Path, pki: Path,
                                                              tamper: str) -> None:
    folder = delivery / "digits" / "1"
    if tamper == "changed-byte":
        data = bytearray((folder / "model.onnx").read_bytes())
        data[-1] ^= 1
        (folder / "model.onnx").write_bytes(bytes(data))
    elif tamper == "unsigned":
        (folder / "model.sig").unlink()
    elif tamper == "link":
        os.symlink("/etc/passwd", folder / "extra")
    else:
        from cryptography.hazmat.primitives.asymmetric import ec

        from gateway.devsetup import _write_key_pair

        _write_key_pair(tmp_path / "other.key", tmp_path / "other.pub", ec.generate_private_key(ec.SECP256R1()))
        sign_model(folder, tmp_path / "other.key")
    root = tmp_path / "serving"
    (result,) = pull_models(delivery, root, _keys(pki))
    assert result.outcome.startswith("refused"), result
    assert not (root / "digits" / "1").exists()
    assert not (root / "digits").exists() or not any((root / "digits").iterdir())


def test_pull_refuses_a_different_version_under_a_number_already_served(delivery: Path, tmp_path: Path,
                                                                         pki: Path) -> None:
    root = tmp_path / "serving"
    pull_models(delivery, root, _keys(pki))
    (delivery / "digits" / "1" / "notes.txt").write_text("changed after release")
    sign_model(delivery / "digits" / "1", pki / "keys" / "model-signing.key")
    (result,) = pull_models(delivery, root, _keys(pki))
    assert result.outcome.startswith("refused") and "immutable" in result.outcome
    assert not (root / "digits" / "1" / "notes.txt").exists()


def test_the_command_exits_non_zero_on_a_refusal(delivery: Path, tmp_path: Path, pki: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    config = pki / "gateway.toml"  # read only: its supply.trusted_keys
    key = str(pki / "keys" / "model-signing.pub")
    assert main(["models", "pull", "--from", str(delivery), "--to", str(tmp_path / "serving"), "--trusted-key", key]) == 0
    assert "digits/1: pulled" in capsys.readouterr().out
    (delivery / "digits" / "1" / "model.sig").unlink()
    shutil.rmtree(tmp_path / "serving")
    assert main(["models", "pull", "--from", str(delivery), "--to", str(tmp_path / "serving"), "--config", str(config)]) == 1
    assert "refused" in capsys.readouterr().out
    assert main(["models", "pull", "--from", str(tmp_path / "nowhere"), "--to", str(tmp_path / "serving"),
                 "--trusted-key", key]) == 1
