"""Certificates renewed under a running mesh, with no restart: every service picks up the new files, presents the new
certificate on its port and on the channels it opens, and the mesh answers as before; a broken renewal is refused
and the old certificate stays in use.

The strongest case is a hard cut to a new CA (`kvmesh certs init --force`): once every service has reloaded, a
server trusts only certificates of the new CA, so a request that crosses the mesh after the cut proves that every
channel it took (gateway -> scheduler, decode, prefill; prefill -> decode) presented a new certificate.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import sys
import time

import pytest
from cryptography import x509

from mesh import make_certs, start_mesh
from kvmesh.services.common import certs
from kvmesh.v1 import scheduler_pb2

PROMPT = list(range(7, 45))
RELOAD_S = "0.5"
RELOADED = "presenting the renewed {role} certificate"


def _presented_serial(address: str, folder) -> int | None:
    """The serial of the certificate a service presents, dialling as admin with folder's certificates; None while
    the handshake fails (the service still trusts, or presents, another CA's certificate)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cafile=str(folder / "ca.pem"))
    context.load_cert_chain(str(folder / "admin.pem"), str(folder / "admin.key"))
    context.set_alpn_protocols(["h2"])
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname=host) as tls_socket:
            tls_socket.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")  # finish the handshake as a gRPC client would
            return x509.load_der_x509_certificate(tls_socket.getpeercert(binary_form=True)).serial_number
    except (ssl.SSLError, OSError):
        return None


def _serial_of(folder, role: str) -> int:
    return x509.load_pem_x509_certificate((folder / f"{role}.pem").read_bytes()).serial_number


def _internal(mesh):
    return {"scheduler": mesh.scheduler, "cache": mesh.cache, "prefill": mesh.prefills[0], "decode": mesh.decodes[0]}


def _instance(mesh, address: str) -> str | None:
    return next((w.instance_id for w in mesh.workers(scheduler_pb2.WORKER_ROLE_DECODE) if w.address == address),
                None)


def _wait_presenting(mesh, folder, timeout_s: float = 60.0) -> dict:
    """Wait until every internal service presents folder's certificate of its role; what each presents."""
    want = {role: _serial_of(folder, role) for role in _internal(mesh)}
    deadline = time.monotonic() + timeout_s
    while True:
        seen = {role: _presented_serial(proc.address, folder) for role, proc in _internal(mesh).items()}
        if seen == want or time.monotonic() > deadline:
            return seen
        time.sleep(0.25)


@pytest.fixture(scope="module")
def rotating(model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("rotating-certs")
    make_certs(folder)
    mesh = start_mesh(str(model_dir("llama")), transport="grpc", tls_dir=str(folder),
                      env={"KVMESH_TLS_RELOAD_S": RELOAD_S})
    yield mesh, folder
    mesh.close()


def test_renewed_certificates_are_presented_without_a_restart(rotating):
    mesh, folder = rotating
    before, _ = mesh.generate(PROMPT, 8, ignore_eos=True)
    old = {role: _serial_of(folder, role) for role in _internal(mesh)}
    assert _wait_presenting(mesh, folder) == old
    renewed = subprocess.run([sys.executable, "-m", "kvmesh.services.cli", "certs", "renew", str(folder)],
                             capture_output=True, text=True, timeout=60)
    assert renewed.returncode == 0, renewed.stderr
    new = {role: _serial_of(folder, role) for role in _internal(mesh)}
    assert all(new[r] != old[r] for r in new)
    assert _wait_presenting(mesh, folder) == new
    assert mesh.generate(PROMPT, 8, ignore_eos=True)[0] == before
    assert mesh.wait_blocks_free(10.0)


def test_a_broken_renewal_is_refused_and_the_old_certificate_stays(rotating):
    mesh, folder = rotating
    before, _ = mesh.generate(PROMPT, 8, ignore_eos=True)
    serving = _wait_presenting(mesh, folder)
    kept = folder / "kept"
    kept.mkdir()
    for name in ("decode.pem", "decode.key"):
        shutil.copy2(folder / name, kept / name)
    shutil.copy2(folder / "prefill.pem", folder / "decode.pem")  # another role's certificate, without its key
    try:
        deadline = time.monotonic() + 30
        while "still presenting the old decode certificate" not in mesh.decodes[0].stderr:
            assert time.monotonic() < deadline, mesh.decodes[0].stderr[-3000:]
            time.sleep(0.25)
        assert _presented_serial(mesh.decodes[0].address, folder) == serving["decode"]
        assert mesh.generate(PROMPT, 8, ignore_eos=True)[0] == before
    finally:
        for name in ("decode.pem", "decode.key"):
            shutil.copy2(kept / name, folder / name)


def test_a_cut_to_a_new_ca_reaches_every_channel(rotating):
    mesh, folder = rotating
    before, _ = mesh.generate(PROMPT, 8, ignore_eos=True)
    reloads = mesh.gateway.stderr.count(RELOADED.format(role="gateway"))
    certs.init_dir(folder, force=True)  # a new CA and every certificate from it: the old ones are trusted no more
    for channel in mesh.channels.values():  # the test's own admin channels dial with the new certificate too
        channel.close()
    mesh.channels.clear()
    seen = _wait_presenting(mesh, folder)
    assert seen == {role: _serial_of(folder, role) for role in _internal(mesh)}, seen
    deadline = time.monotonic() + 60  # the gateway's port is plaintext, nothing to probe: its log says
    while mesh.gateway.stderr.count(RELOADED.format(role="gateway")) == reloads:
        assert time.monotonic() < deadline, mesh.gateway.stderr[-3000:]
        time.sleep(0.25)
    assert mesh.generate(PROMPT, 8, ignore_eos=True)[0] == before
    # Connections opened before the cut stay up (TLS checks certificates at the handshake only). A restarted
    # decode worker on the same port makes every peer dial it again: the gateway's channel and the prefill
    # worker's KV link must now present the new CA's certificates, or the restarted worker refuses them.
    victim = mesh.decodes[0]
    old_instance = _instance(mesh, victim.address)
    victim.kill()
    reborn = mesh.procs.launch("decode", *victim.args[victim.args.index("--port") + 2:], env=victim.env,
                               port=victim.port)
    mesh.decodes[0] = reborn
    reborn.wait_serving(120)
    deadline = time.monotonic() + 60
    while _instance(mesh, reborn.address) in (None, old_instance):
        assert time.monotonic() < deadline, "the restarted decode worker did not register again"
        time.sleep(0.1)
    assert mesh.generate(PROMPT, 8, ignore_eos=True)[0] == before
    assert mesh.wait_blocks_free(10.0)
    for proc in [mesh.gateway, mesh.scheduler, mesh.cache, *mesh.prefills, *mesh.decodes]:
        assert "Traceback" not in proc.stderr, f"{proc.service}: {proc.stderr[-3000:]}"
