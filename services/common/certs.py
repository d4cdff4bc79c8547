"""`kvmesh certs init DIR`: a private CA and one certificate per role, for mTLS between the mesh's services.

The folder holds `ca.pem` (the CA's certificate, the trust root of every server and channel), and for each role
`<role>.pem` (its certificate, signed by the CA) and `<role>.key` (its private key, mode 0600). The CA's own key
is `ca.key` (0600): keep it offline once the certificates are made. A certificate names its role in a URI SAN
`kvmesh:role:<role>` (what the access table checks) and the hosts it may serve from in DNS and IP SANs (localhost,
127.0.0.1, ::1, the role's name, every `--host` given, and `MESH_NAME`: the name channels check instead of the
host dialled where peers are known by addresses no certificate can list — container host names, pod IPs — with
`--tls-server-name kvmesh.mesh`).
Keys are EC P-256; certificates last `days` (default a year).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: Every role a certificate may carry: the five services, `worker` for flexible workers (`kvmesh worker --role auto`:
#: the rights of prefill and decode together), and `admin` for operators' tools (launcher, tests, `kvmesh role`).
ROLES = ("gateway", "scheduler", "prefill", "decode", "worker", "cache", "admin")
ROLE_URI_PREFIX = "kvmesh:role:"
CA_FILE = "ca.pem"
MESH_NAME = "kvmesh.mesh"
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1", MESH_NAME)
DEFAULT_DAYS = 365


def cert_file(directory: str | Path, role: str) -> Path:
    """The certificate of `role` in `directory`."""
    return Path(directory) / f"{role}.pem"


def key_file(directory: str | Path, role: str) -> Path:
    """The private key of `role` in `directory`."""
    return Path(directory) / f"{role}.key"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kvmesh"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return x509.DNSName(host)


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))  # a peer's clock a little behind still agrees
            .not_valid_after(now + datetime.timedelta(days=days)))


def make_ca(days: int = DEFAULT_DAYS) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new self-signed CA: (key, certificate), allowed to sign leaf certificates only."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name("kvmesh CA")
    cert = (_builder(name, name, key.public_key(), days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def issue(ca_key, ca_cert: x509.Certificate, role: str, hosts: Iterable[str] = (),
          days: int = DEFAULT_DAYS) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new key and a certificate for `role`, signed by the CA, valid as server and client, serving `hosts`
    (plus the defaults and the role's name)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    key = ec.generate_private_key(ec.SECP256R1())
    names = list(dict.fromkeys([*DEFAULT_HOSTS, role, *hosts]))
    sans = [x509.UniformResourceIdentifier(ROLE_URI_PREFIX + role), *(_san(h) for h in names)]
    cert = (_builder(_name(f"kvmesh {role}"), ca_cert.subject, key.public_key(), days)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def role_of(cert: x509.Certificate) -> str | None:
    """The role a certificate names (its `kvmesh:role:` URI SAN), or None."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    roles = [u[len(ROLE_URI_PREFIX):] for u in sans.get_values_for_type(x509.UniformResourceIdentifier)
             if u.startswith(ROLE_URI_PREFIX)]
    return roles[0] if len(roles) == 1 and roles[0] in ROLES else None


def _write(path: Path, data: bytes, mode: int) -> None:
    """Replace path with data atomically (a running service reloading its certificate never reads half a file)."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def _key_bytes(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def init_dir(directory: str | Path, hosts: Iterable[str] = (), roles: Iterable[str] = ROLES,
             days: int = DEFAULT_DAYS, force: bool = False) -> Path:
    """Make a CA and one certificate + key per role in `directory` (created 0700); refuse to overwrite a CA
    unless `force`. Returns the folder."""
    folder = Path(directory)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if (folder / CA_FILE).exists() and not force:
        raise FileExistsError(f"{folder / CA_FILE} exists: pass --force to replace every certificate in {folder}")
    hosts = tuple(hosts)
    ca_key, ca_cert = make_ca(days)
    _write(folder / "ca.key", _key_bytes(ca_key), 0o600)
    _write(folder / CA_FILE, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    for role in roles:
        key, cert = issue(ca_key, ca_cert, role, hosts, days)
        _write(key_file(folder, role), _key_bytes(key), 0o600)
        _write(cert_file(folder, role), cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return folder


def hosts_of(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a certificate serves (its SANs)."""
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [*sans.get_values_for_type(x509.DNSName), *(str(ip) for ip in sans.get_values_for_type(x509.IPAddress))]


def renew_dir(directory: str | Path, hosts: Iterable[str] = (), roles: Iterable[str] = (),
              days: int = DEFAULT_DAYS) -> list[str]:
    """Issue new keys and certificates from the folder's CA (its ca.key must be there) for `roles` (default: every
    role with a certificate in the folder), keeping each one's hosts unless `hosts` are given. Each key and then
    its certificate replace the old files atomically; running services pick them up within their reload period.
    Returns the roles renewed."""
    folder = Path(directory)
    if not (folder / "ca.key").is_file():
        raise FileNotFoundError(f"{folder / 'ca.key'} is missing: renewing needs the CA's key (bring it back from "
                                f"where it is kept offline), or make a new CA with `kvmesh certs init --force`")
    ca_key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificates((folder / CA_FILE).read_bytes())[-1]
    roles = list(roles) or [r for r in ROLES if cert_file(folder, r).is_file()]
    for role in roles:
        old = cert_file(folder, role)
        keep = hosts_of(x509.load_pem_x509_certificate(old.read_bytes())) if old.is_file() else []
        key, cert = issue(ca_key, ca_cert, role, tuple(hosts) or keep, days)
        _write(key_file(folder, role), _key_bytes(key), 0o600)
        _write(cert_file(folder, role), cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return roles


@contextlib.contextmanager
def temporary(hosts: Iterable[str] = ()) -> Iterator[Path]:
    """A fresh CA and certificates in a private (0700) temporary folder, deleted on exit (`kvmesh up --tls`)."""
    folder = Path(tempfile.mkdtemp(prefix="kvmesh-tls-"))
    try:
        yield init_dir(folder, hosts, force=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
