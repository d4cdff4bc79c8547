"""`kvmesh up` hands each child its own port: the kernel may offer a port again before the child that was given
it binds it, so free_port never hands out a port twice, nor one the user chose for the gateway."""

from kvmesh.services import children


class FakeSocket:
    """socket.socket whose successive binds get the ports of `offers`."""

    offers: list[int] = []

    def __enter__(self):
        return self

    def __exit__(self, *_):
        return False

    def bind(self, _address):
        self.port = FakeSocket.offers.pop(0)

    def getsockname(self):
        return ("127.0.0.1", self.port)


def test_a_port_offered_again_or_reserved_is_skipped(monkeypatch):
    monkeypatch.setattr(children, "_handed_out", set())
    monkeypatch.setattr(children.socket, "socket", FakeSocket)
    FakeSocket.offers = [5000, 5000, 6000, 6000, 7000]
    children.reserve_ports(6000)
    assert [children.free_port(), children.free_port()] == [5000, 7000]
