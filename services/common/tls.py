"""mTLS credentials from a `kvmesh certs init` folder, and the role of the peer of an RPC.

A service started with `--tls-dir DIR` serves with `server_credentials` (a client certificate from DIR's CA is
required: a caller without one fails the handshake, UNAVAILABLE at its end) and, through `use()`, makes every
channel this process opens (`channels.open_channel`, health checks, KV transfer peers) present its own role's
certificate. One identity per process: a process is one service.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import grpc

from kvmesh.services.common.config import ConfigError

CA_FILE = "ca.pem"


@dataclass(frozen=True)
class TlsIdentity:
    """A role's certificate and key and the CA that signed every certificate of the mesh (PEM bytes)."""

    role: str
    ca: bytes
    cert: bytes
    key: bytes
    #: The name every server's certificate is checked against, instead of the host of the address dialled (for
    #: peers known by addresses no certificate can list, e.g. pod IPs); empty: the address's host.
    server_name: str = ""

    def server_credentials(self) -> grpc.ServerCredentials:
        """Serve with this certificate; require a client certificate signed by the CA."""
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Trust only the CA's servers; present this certificate."""
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)

    def channel_options(self) -> list[tuple[str, str]]:
        """Options a channel needs beside the credentials (the server name override, if any)."""
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def load(directory: str | Path, role: str, server_name: str = "") -> TlsIdentity:
    """The identity of `role` from a certs folder; ConfigError naming the missing file and the fix."""
    folder = Path(directory)
    files = [folder / CA_FILE, folder / f"{role}.pem", folder / f"{role}.key"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        fix = f"make the folder with `kvmesh certs init {folder}`"
        if files[0].is_file():  # a folder made before this role had a certificate (e.g. `worker`)
            fix = f"add them from its CA with `kvmesh certs renew {folder} --role {role}` (needs ca.key), or {fix}"
        raise ConfigError(f"--tls-dir {folder}: missing {', '.join(missing)}; {fix}")
    try:
        ca, cert, key = (f.read_bytes() for f in files)
    except OSError as exc:
        raise ConfigError(f"--tls-dir {folder}: cannot read {exc.filename}: {exc.strerror}") from None
    return TlsIdentity(role, ca, cert, key, server_name)


_current: TlsIdentity | None = None
_generation = 0


def use(identity: TlsIdentity | None) -> None:
    """Make every channel this process opens from now on present `identity` (None: plaintext channels)."""
    global _current, _generation
    _current, _generation = identity, _generation + 1


def generation() -> int:
    """Counts `use` calls: a channel opened under an older generation presents an older certificate."""
    return _generation


class _Live:
    """Stands for this process's identity whichever it is when a channel opens (for parts that keep `tls` objects,
    such as the KV transports' senders): certificates renewed later reach their new channels."""

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return _current.channel_credentials()

    def channel_options(self) -> list[tuple[str, str]]:
        return _current.channel_options()

    @property
    def generation(self) -> int:
        """Changes when the certificate does: a sender's channels opened before then are replaced."""
        return _generation


LIVE = _Live()


def current() -> TlsIdentity | None:
    """The identity this process's channels present, or None without TLS."""
    return _current


def channel_credentials() -> grpc.ChannelCredentials | None:
    """Credentials for a new channel: this process's identity, or None (an insecure channel)."""
    return _current.channel_credentials() if _current is not None else None


#: open_channel's default identity: this process's (`use`), whichever it is when the channel opens.
CURRENT = object()


def open_channel(address: str, options=None, interceptors=None, aio: bool = True, identity=CURRENT):
    """A channel to address: over mTLS presenting `identity` (a TlsIdentity; by default this process's, if any),
    plaintext when it is None. `aio=False` gives a blocking channel (no interceptors)."""
    identity = _current if identity is CURRENT else identity
    module = grpc.aio if aio else grpc
    kwargs = {"interceptors": interceptors} if aio else {}
    if identity is None:
        return module.insecure_channel(address, options=options, **kwargs)
    options = [*(options or ()), *identity.channel_options()]
    return module.secure_channel(address, identity.channel_credentials(), options=options, **kwargs)


def peer_role(context) -> str | None:
    """The role in the client certificate of the RPC being served (None: no certificate, or no role in it)."""
    auth = getattr(context, "auth_context", None)  # a servicer called directly (tests) has no context
    pems = ((auth() if auth else None) or {}).get("x509_pem_cert") or ()
    return _role_of_pem(bytes(pems[0])) if pems else None


@functools.lru_cache(maxsize=256)
def _role_of_pem(pem: bytes) -> str | None:
    """Parsed once per distinct certificate: a mesh has a handful."""
    from cryptography import x509

    from kvmesh.services.common.certs import role_of

    try:
        return role_of(x509.load_pem_x509_certificate(pem))
    except ValueError:
        return None
