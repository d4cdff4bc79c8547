"""Certificates renewed without a restart: a service with `--tls-dir` watches its certificate files and, when they
change (`kvmesh certs renew`, cert-manager, a mounted secret updated in place), checks the new pair and presents it.

- The server's port serves through dynamic credentials: every handshake from then on gets the new certificate.
- Channels the process opens from then on present it (`tls.use`); kvmesh's channel caches reopen their channels at
  the next call and close the old ones after a grace (`channels.ChannelCache`). Connections already open keep the
  certificate they were opened with, which stays valid until it expires.
- A pair that does not check out — key and certificate do not match, not signed by the CA, another role's, not
  valid now — is refused with a warning naming why, and the old certificate stays in use. A key written before its
  certificate is such a pair for a moment; the next check, once the certificate is written, takes both.

The CA file may be a bundle: to move to a new CA, put old and new CA in `ca.pem`, renew the certificates from the
new one, then drop the old CA from the bundle.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import threading
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from kvmesh.services.common import tls
from kvmesh.services.common.config import ConfigError

log = logging.getLogger(__name__)


def problem(identity: tls.TlsIdentity) -> str | None:
    """Why identity cannot be presented (its key does not match, its CA did not sign it, another role's, not
    valid now), or None when it can."""
    from kvmesh.services.common.certs import role_of

    try:
        cert = x509.load_pem_x509_certificate(identity.cert)
        key = serialization.load_pem_private_key(identity.key, password=None)
        cas = x509.load_pem_x509_certificates(identity.ca)
    except ValueError as exc:
        return f"unreadable PEM ({exc})"
    spki = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        return "the key does not belong to the certificate"
    if not any(_issued_by(cert, ca) for ca in cas):
        return "the certificate is not signed by a CA in ca.pem"
    if role_of(cert) != identity.role:
        return f"the certificate is for role {role_of(cert)!r}, not {identity.role!r}"
    now = datetime.datetime.now(datetime.timezone.utc)
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        return f"the certificate is valid only from {cert.not_valid_before_utc} to {cert.not_valid_after_utc}"
    return None


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
        return True
    except (ValueError, TypeError, InvalidSignature):  # another issuer, another key type, another CA's signature
        return False


class Watcher:
    """The certificate a process presents, reloaded from its folder when the files change."""

    def __init__(self, identity: tls.TlsIdentity, directory: str, period_s: float = 5.0) -> None:
        self.identity = identity
        self.directory, self.period_s = directory, period_s
        self._seen = self._stamp()
        self._served = identity
        self._lock = threading.Lock()  # the fetcher runs on gRPC's threads, check() on the event loop

    def _files(self) -> list[Path]:
        folder = Path(self.directory)
        return [folder / tls.CA_FILE, folder / f"{self.identity.role}.pem", folder / f"{self.identity.role}.key"]

    def _stamp(self) -> tuple | None:
        try:
            return tuple((s.st_mtime_ns, s.st_size, s.st_ino) for s in map(os.stat, self._files()))
        except OSError:
            return None

    def check(self) -> bool:
        """Reload when the files changed and the new pair checks out; True when a new certificate is now in use."""
        stamp = self._stamp()
        if stamp is None or stamp == self._seen:
            return False
        self._seen = stamp
        try:
            new = tls.load(self.directory, self.identity.role, self.identity.server_name)
        except ConfigError as exc:
            log.warning("certificate files changed but cannot be read (%s); still presenting the old one", exc)
            return False
        why = problem(new)
        if why is not None:
            log.warning("certificate files in %s changed, but %s; still presenting the old %s certificate",
                        self.directory, why, new.role)
            return False
        if new == self.identity:
            return False
        with self._lock:
            self.identity = new
        tls.use(new)
        log.info("presenting the renewed %s certificate from %s", new.role, self.directory)
        return True

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials whose certificate follows the reloads: each new handshake gets the one in use."""
        return grpc.dynamic_ssl_server_credentials(_configuration(self.identity), self._fetch,
                                                   require_client_authentication=True)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            if self._served is self.identity:
                return None
            self._served = self.identity
            return _configuration(self.identity)

    async def run(self, _server=None) -> None:
        """Check every period_s until cancelled (a MeshServer background task)."""
        while True:
            await asyncio.sleep(self.period_s)
            self.check()


def watch(server) -> Watcher | None:
    """The watcher of a MeshServer's certificate files (None without TLS), checking as one of its background tasks."""
    if server.tls is None:
        return None
    watcher = Watcher(server.tls, server.config.tls_dir, server.config.tls_reload_s)
    server.add_task(watcher.run)
    return watcher


def _configuration(identity: tls.TlsIdentity) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(identity.key, identity.cert)], root_certificates=identity.ca)
