"""`kvmesh up` hands each child its own port: the kernel may offer a port again before the child that was given
it binds it, so free_port never hands out a port twice, nor one the user chose for the gateway."""

from kvmesh.services import ports as children


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
    monkeypatch.setattr(children, "_listen_range", lambda: range(0))  # the kernel's choice (no range known)
    monkeypatch.setattr(children.socket, "socket", FakeSocket)
    FakeSocket.offers = [5000, 5000, 6000, 6000, 7000]
    children.reserve_ports(6000)
    assert [children.free_port(), children.free_port()] == [5000, 7000]


class Picks:
    """ports._PICK whose successive choices are `ports`."""

    def __init__(self, *ports: int) -> None:
        self.ports = list(ports)

    def choice(self, _population):
        return self.ports.pop(0)


class BusySocket(FakeSocket):
    """A bind of a port in `busy` fails as a listened-on port's does."""

    busy: set[int] = set()

    def bind(self, address):
        if address[1] in BusySocket.busy:
            raise OSError(98, "Address already in use")
        self.port = address[1]


def test_ports_come_from_below_the_ephemeral_range_skipping_taken_ones(monkeypatch):
    monkeypatch.setattr(children, "_handed_out", set())
    monkeypatch.setattr(children, "_listen_range", lambda: range(16384, 32768))
    monkeypatch.setattr(children, "_PICK", Picks(20000, 20001, 20002, 20003))
    monkeypatch.setattr(children.socket, "socket", BusySocket)
    BusySocket.busy = {20001}
    children.reserve_ports(20000)
    assert children.free_port() == 20002  # 20000 reserved, 20001 listened on
    assert children.free_port() == 20003


def test_the_range_is_the_half_below_the_kernels_ephemeral_ports():
    ports = children._listen_range()
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except OSError:
        low = 0
    if low <= 4096:  # unknown, or too low to halve: the kernel chooses
        assert ports == range(0)
        return
    assert ports.stop == low and ports.start == max(1024, low // 2)
