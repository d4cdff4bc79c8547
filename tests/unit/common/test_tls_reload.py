"""Which renewed certificates a service takes: only a pair that checks out (key matches, signed by a CA in the
bundle, its own role, valid now); anything else leaves the old certificate in use."""

from cryptography.hazmat.primitives import serialization

from kvmesh.services.common import certs, tls, tls_reload


def _pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def test_only_a_pair_that_checks_out_is_taken():
    ca_key, ca = certs.make_ca()
    other_key, other_ca = certs.make_ca()
    key, cert = certs.issue(ca_key, ca, "decode")
    good = tls.TlsIdentity("decode", _pem(ca), _pem(cert), _key(key))
    assert tls_reload.problem(good) is None
    stranger_key, stranger = certs.issue(other_key, other_ca, "decode")
    assert "not signed" in tls_reload.problem(tls.TlsIdentity("decode", _pem(ca), _pem(stranger), _key(stranger_key)))
    bundle = _pem(other_ca) + _pem(ca)  # moving between CAs: both trusted for a while
    assert tls_reload.problem(tls.TlsIdentity("decode", bundle, _pem(stranger), _key(stranger_key))) is None
    assert "does not belong" in tls_reload.problem(tls.TlsIdentity("decode", _pem(ca), _pem(cert), _key(stranger_key)))
    assert "role 'decode'" in tls_reload.problem(tls.TlsIdentity("prefill", _pem(ca), _pem(cert), _key(key)))
    old_key, expired = certs.issue(ca_key, ca, "decode", days=-0.001)  # ended 86 s ago
    assert "valid only" in tls_reload.problem(tls.TlsIdentity("decode", _pem(ca), _pem(expired), _key(old_key)))
    assert "unreadable" in tls_reload.problem(tls.TlsIdentity("decode", _pem(ca), b"garbage", _key(key)))


def test_a_watcher_takes_a_renewal_once_and_refuses_a_broken_one(tmp_path):
    certs.init_dir(tmp_path, roles=("decode", "prefill"))
    watcher = tls_reload.Watcher(tls.load(tmp_path, "decode"), str(tmp_path), 1.0)
    assert not watcher.check()  # nothing changed
    first = watcher.identity
    certs.renew_dir(tmp_path, roles=["decode"])
    assert watcher.check() and watcher.identity != first and tls.current() == watcher.identity
    assert watcher._fetch() is not None and watcher._fetch() is None  # handshakes get the new one, once
    assert not watcher.check()
    (tmp_path / "decode.pem").write_bytes((tmp_path / "prefill.pem").read_bytes())
    assert not watcher.check() and tls.current() == watcher.identity
    tls.use(None)
