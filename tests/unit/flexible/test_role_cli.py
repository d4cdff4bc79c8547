"""`kvmesh role --tls-dir`: the call presents the folder's admin certificate; a folder without it is one line, exit 2."""

from kvmesh.services.cli import main
from kvmesh.services.common import certs


def test_kvmesh_role_without_the_admin_certificate_says_so_and_exits_2(tmp_path, capsys):
    folder = certs.init_dir(tmp_path / "tls", roles=("worker",))  # no admin certificate in it
    code = main(["role", "--tls-dir", str(folder), "--scheduler", "127.0.0.1:1", "127.0.0.1:2", "decode"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "admin.pem" in err[0] and "kvmesh certs renew" in err[0] and "--role admin" in err[0]
