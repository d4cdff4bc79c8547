"""`kvmesh certs init`: a CA and one certificate per role, the role in the certificate, keys kept private."""

import stat

import pytest
from cryptography import x509

from kvmesh.services.cli import main
from kvmesh.services.common import certs, tls
from kvmesh.services.common.config import ConfigError


def _cert(folder, role) -> x509.Certificate:
    return x509.load_pem_x509_certificate(certs.cert_file(folder, role).read_bytes())


def test_init_makes_a_ca_and_a_certificate_per_role_signed_by_it(tmp_path):
    folder = certs.init_dir(tmp_path / "tls", hosts=["10.0.0.7", "scheduler.internal"])
    ca = x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for role in certs.ROLES:
        cert = _cert(folder, role)
        cert.verify_directly_issued_by(ca)  # raises when another key signed it
        assert certs.role_of(cert) == role
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert {"localhost", role, "scheduler.internal", certs.MESH_NAME} <= set(sans.get_values_for_type(x509.DNSName))
        assert {"127.0.0.1", "10.0.0.7"} <= {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    assert certs.role_of(ca) is None  # the CA is nobody's role


def test_keys_are_private_and_the_folder_too(tmp_path):
    folder = certs.init_dir(tmp_path / "tls")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for role in (*certs.ROLES, "ca"):
        assert stat.S_IMODE((folder / f"{role}.key").stat().st_mode) == 0o600


def test_init_never_overwrites_a_ca_unless_forced(tmp_path):
    folder = certs.init_dir(tmp_path / "tls")
    before = (folder / "ca.pem").read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        certs.init_dir(folder)
    assert (folder / "ca.pem").read_bytes() == before
    certs.init_dir(folder, force=True)
    assert (folder / "ca.pem").read_bytes() != before


def test_the_cli_makes_the_folder_and_refuses_a_second_time(tmp_path, capsys):
    assert main(["certs", "init", str(tmp_path / "tls"), "--host", "node-1"]) == 0
    assert certs.role_of(_cert(tmp_path / "tls", "decode")) == "decode"
    assert main(["certs", "init", str(tmp_path / "tls")]) == 2
    assert "exists: pass --force" in capsys.readouterr().err


def test_an_unknown_role_is_refused():
    key, ca = certs.make_ca()
    with pytest.raises(ValueError, match="unknown role 'root'"):
        certs.issue(key, ca, "root")


def test_a_temporary_folder_is_gone_after_use():
    with certs.temporary() as folder:
        assert tls.load(folder, "gateway").role == "gateway"
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert not folder.exists()


def test_a_missing_certificate_names_the_file_and_the_fix(tmp_path):
    certs.init_dir(tmp_path, roles=["decode"])
    assert tls.load(tmp_path, "decode").key.startswith(b"-----BEGIN PRIVATE KEY-----")
    with pytest.raises(ConfigError, match=r"missing .*prefill\.pem.*kvmesh certs init"):
        tls.load(tmp_path, "prefill")


def test_init_makes_the_flexible_workers_certificate_and_an_older_folder_gets_it_by_renew(tmp_path):
    folder = certs.init_dir(tmp_path / "tls", hosts=["10.0.0.7"])
    assert certs.role_of(_cert(folder, "worker")) == "worker"
    for suffix in ("pem", "key"):  # a folder made before flexible workers had a certificate
        (folder / f"worker.{suffix}").unlink()
    with pytest.raises(ConfigError, match=r"worker\.pem.*kvmesh certs renew .* --role worker"):
        tls.load(folder, "worker")
    assert certs.renew_dir(folder, hosts=["10.0.0.7"], roles=["worker"]) == ["worker"]
    cert = _cert(folder, "worker")
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes()))
    assert certs.role_of(cert) == "worker" and "10.0.0.7" in certs.hosts_of(cert)
    assert tls.load(folder, "worker").role == "worker"
