"""`gateway init`: the development PKI, configuration and credentials it writes."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import shutil
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.config import load_config
from gateway.devsetup import init


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_pki_shape(pki: Path) -> None:
    certs = pki / "certs"
    ca, server, client = _cert(certs / "ca.pem"), _cert(certs / "server.pem"), _cert(certs / "client-demo.pem")
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey) and ca.public_key().curve.name == "secp256r1"
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(sans.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
    assert server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
    assert client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    assert server.not_valid_after_utc - server.not_valid_before_utc <= dt.timedelta(days=90, minutes=5)
    for c in (server, client):
        c.verify_directly_issued_by(ca)


def test_private_keys_are_owner_only(pki: Path) -> None:
    keys = list((pki / "certs").glob("*.key"))
    assert {"ca.key", "server.key", "client-demo.key", "client-admin.key"} <= {k.name for k in keys}
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((pki / "credentials.json").stat().st_mode) == 0o600


def test_credentials_and_config(pki: Path) -> None:
    creds = json.loads((pki / "credentials.json").read_text())
    assert set(creds["principals"]) == {"demo", "admin"}
    assert Path(creds["principals"]["demo"]["cert"]).exists() and Path(creds["ca"]).exists()
    config = load_config(pki / "gateway.toml", environ={})
    assert config.tls.client_auth == "required" and config.tls.min_version == "1.3"
    assert {m.name for m in config.models} == {"digits", "resnetish"}
    assert config.insecure_settings() == []


def test_existing_secrets_are_kept_unless_forced(tmp_path: Path, models_root: Path) -> None:
    init(tmp_path, models_root)
    ca_key = (tmp_path / "certs" / "ca.key").read_bytes()
    (tmp_path / "gateway.toml").write_text((tmp_path / "gateway.toml").read_text() + "\n# mine\n")
    report = init(tmp_path, models_root)
    assert (tmp_path / "certs" / "ca.key").read_bytes() == ca_key
    assert (tmp_path / "gateway.toml").read_text().endswith("# mine\n")
    assert str(tmp_path / "certs" / "ca.key") not in report.created
    init(tmp_path, models_root, force=True)
    assert (tmp_path / "certs" / "ca.key").read_bytes() != ca_key


def test_a_missing_client_certificate_is_reissued_by_the_existing_ca(tmp_path: Path, models_root: Path) -> None:
    init(tmp_path, models_root)
    (tmp_path / "certs" / "client-admin.pem").unlink()
    init(tmp_path, models_root)
    _cert(tmp_path / "certs" / "client-admin.pem").verify_directly_issued_by(_cert(tmp_path / "certs" / "ca.pem"))


@pytest.mark.parametrize("principal", ["demo", "admin"])
def test_client_certificates_name_their_principal(pki: Path, principal: str) -> None:
    cert = _cert(pki / "certs" / f"client-{principal}.pem")
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == principal


def test_models_without_calibration_get_a_configuration_that_loads_with_their_guards_off(
        tmp_path: Path, models_root: Path, pki: Path) -> None:
    """`gateway init` over someone else's model repository (no held-out data to calibrate with)."""
    bare = tmp_path / "models"
    shutil.copytree(models_root / "digits", bare / "digits", ignore=shutil.ignore_patterns("calibration.json"))
    init(tmp_path / "run", bare)
    text = (tmp_path / "run" / "gateway.toml").read_text()
    assert "# digits has no calibration, so its guard and extraction monitor are off" in text
    assert "\n[models.digits.guard]" not in text and "\n# [models.digits.guard]" in text
    config = load_config(tmp_path / "run" / "gateway.toml", environ={})
    digits = next(m for m in config.models if m.name == "digits")
    assert not digits.guard.enabled and not digits.extraction.enabled
    assert not (bare / "digits" / "1" / "calibration.json").exists()
    # with the held-out data there, the same command calibrated and kept the guard on
    guarded = load_config(pki / "gateway.toml", environ={})
    assert next(m for m in guarded.models if m.name == "digits").guard.enabled
