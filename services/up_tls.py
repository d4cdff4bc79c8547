"""`kvmesh up --tls`: a private CA and certificates for the mesh `kvmesh up` starts, handed to every child.

The folder is made 0700 under the temporary directory and deleted when the launcher returns (after a signal too);
only a launcher killed outright (SIGKILL) leaves it behind. The launcher's own health checks present the `admin`
certificate.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from kvmesh.services.common import certs, tls


@contextlib.contextmanager
def mesh_certs(enabled: bool) -> Iterator[str]:
    """The certs folder of a mesh with mTLS (while the block runs), or "" without."""
    if not enabled:
        yield ""
        return
    with certs.temporary() as folder:
        yield str(folder)


def wire(children: list, folder: str) -> None:
    """Every child serves and dials with its role's certificate from `folder`; the launcher checks the internal
    services' health with the admin one."""
    if not folder:
        return
    admin = tls.load(folder, "admin")
    for child in children:
        child.argv += ["--tls-dir", folder]
        child.tls = admin if child.name != "gateway" else None  # the gateway's own port stays plaintext
