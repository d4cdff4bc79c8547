"""`kvmesh up`'s supervisor: the restart backoff as a pure schedule, and the loop over fake children."""

import signal
import time
from types import SimpleNamespace

import pytest
from kvmesh.services.common.config import ConfigError, from_args
from kvmesh.services.supervisor import (
    RestartBackoff,
    RestartConfig,
    Supervisor,
    describe_exit,
    wants_restart,
)

CONFIG = RestartConfig(restart_delay_s=0.5, restart_max_delay_s=4.0, restart_reset_s=30.0, restart_limit=5,
                       restart_window_s=60.0)


def test_delay_doubles_from_the_first_wait_up_to_the_cap():
    backoff = RestartBackoff(RestartConfig(restart_limit=100, restart_max_delay_s=4.0))
    delays = [backoff.next_delay(now=float(i), ran_s=0.1) for i in range(7)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0]


def test_a_healthy_run_resets_the_backoff():
    backoff = RestartBackoff(CONFIG)
    assert [backoff.next_delay(now=float(i), ran_s=1.0) for i in range(3)] == [0.5, 1.0, 2.0]
    assert backoff.next_delay(now=40.0, ran_s=30.0) == 0.5  # it served 30 s: healthy, start over
    assert backoff.next_delay(now=41.0, ran_s=1.0) == 1.0


def test_a_crash_loop_gives_up_after_the_limit_within_the_window():
    backoff = RestartBackoff(CONFIG)
    assert all(backoff.next_delay(now=float(i), ran_s=0.1) is not None for i in range(5))
    assert backoff.next_delay(now=5.0, ran_s=0.1) is None


def test_restarts_older_than_the_window_no_longer_count():
    backoff = RestartBackoff(CONFIG)
    for i in range(5):
        backoff.next_delay(now=float(i), ran_s=0.1)
    assert backoff.next_delay(now=61.0, ran_s=0.1) is not None  # the first two fell out of the window
    assert backoff.next_delay(now=61.5, ran_s=0.1) is not None
    assert backoff.next_delay(now=61.6, ran_s=0.1) is None


def test_restart_limit_zero_never_restarts():
    assert RestartBackoff(RestartConfig(restart_limit=0)).next_delay(now=0.0, ran_s=100.0) is None


@pytest.mark.parametrize("mode,returncode,expected", [
    ("on-failure", 1, True), ("on-failure", -signal.SIGKILL, True), ("on-failure", -signal.SIGSEGV, True),
    ("on-failure", 0, False), ("on-failure", -signal.SIGTERM, False), ("on-failure", -signal.SIGINT, False),
    ("always", 0, True), ("always", -signal.SIGTERM, True), ("no", 1, False), ("no", -signal.SIGKILL, False)])
def test_which_deaths_are_restarted_follows_systemd(mode, returncode, expected):
    assert wants_restart(mode, returncode) is expected


def test_a_death_is_told_by_status_or_signal_name():
    assert describe_exit(3) == "exit status 3"
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"


def test_config_rejects_values_out_of_range():
    with pytest.raises(ConfigError, match="restart_delay_s"):
        from_args(RestartConfig, "up", {"restart_delay_s": 0.0}, env={})
    with pytest.raises(ConfigError, match="restart_max_delay_s"):
        from_args(RestartConfig, "up", {"restart_delay_s": 2.0, "restart_max_delay_s": 1.0}, env={})
    with pytest.raises(ConfigError, match="not one of"):
        from_args(RestartConfig, "up", {"restart": "sometimes"}, env={})
    assert from_args(RestartConfig, "up", {}, env={"KVMESH_UP_RESTART_LIMIT": "2"}).restart_limit == 2


class FakeChild:
    """A child whose process dies when told to; start() gives it a new pid."""

    def __init__(self, name: str, pid: int) -> None:
        self.name = name
        self.process = SimpleNamespace(pid=pid, returncode=None)
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        self.process = SimpleNamespace(pid=self.process.pid + 100, returncode=None)

    def alive(self) -> bool:
        return self.process.returncode is None

    def die(self, returncode: int) -> None:
        self.process.returncode = returncode


def _supervisor(children, config=CONFIG):
    logs, reclaims = [], []
    supervisor = Supervisor(children, config, reclaim=lambda: reclaims.append(1) or ["kvmesh-7-abc"],
                            log=logs.append)
    return supervisor, logs, reclaims


def test_a_killed_child_is_restarted_after_its_delay_and_the_others_are_left_alone():
    decode, gateway = FakeChild("decode-0", 7), FakeChild("gateway", 8)
    supervisor, logs, reclaims = _supervisor([decode, gateway])
    decode.die(-signal.SIGKILL)
    supervisor.tick(now=100.0)
    assert reclaims == [1]  # at the death, not at the restart
    assert "decode-0 (pid 7) killed by SIGKILL" in logs[0] and "kvmesh-7-abc" in logs[0]
    assert "restarting in 0.5 s" in logs[0]
    supervisor.tick(now=100.4)
    assert decode.starts == 0
    supervisor.tick(now=100.5)
    assert decode.starts == 1 and decode.process.pid == 107 and "restarted (pid 107)" in logs[-1]
    assert gateway.starts == 0 and gateway.process.pid == 8


def test_a_crash_looping_child_is_given_up_on_and_reported():
    decode, gateway = FakeChild("decode-0", 7), FakeChild("gateway", 8)
    supervisor, logs, _ = _supervisor([decode, gateway], RestartConfig(restart_limit=2))
    for now in (0.0, 10.0, 20.0):  # each run lasts under restart_reset_s: consecutive failures
        decode.die(1)
        supervisor.tick(now=now)
        supervisor.tick(now=now + 5.0)  # past its delay
    assert decode.starts == 2
    assert "gave up" in logs[-1] and "--restart-limit" in logs[-1]
    assert supervisor.running() == 1  # the gateway still runs, the launcher keeps it
    supervisor.tick(now=100.0)
    assert decode.starts == 2


def test_a_clean_exit_is_not_restarted_under_on_failure():
    decode = FakeChild("decode-0", 7)
    supervisor, logs, _ = _supervisor([decode])
    decode.die(0)
    supervisor.tick(now=1.0)
    supervisor.tick(now=100.0)
    assert decode.starts == 0 and "not restarted (--restart on-failure)" in logs[0]
    assert supervisor.running() == 0


def test_a_rolling_restart_stops_one_child_at_a_time_and_waits_for_it_to_serve():
    from kvmesh.services.supervisor import RollingRestart

    children = [FakeChild("prefill-0", 10), FakeChild("decode-0", 20), FakeChild("decode-1", 30)]
    signals = []
    for child in children:
        child.process.send_signal = lambda sig, c=child: signals.append((c.name, sig))
    served = []
    logs = []
    supervisor = Supervisor(children, RestartConfig(restart="on-failure"), reclaim=lambda: [], log=logs.append,
                            await_serving=lambda c: served.append(c.name))
    rolling = RollingRestart(supervisor, ["prefill-0", "decode-0", "decode-1"])
    now = 0.0
    for name in ("prefill-0", "decode-0", "decode-1"):
        rolling.tick()
        assert signals[-1] == (name, signal.SIGTERM) and len(signals) == len(served) + 1  # one at a time
        rolling.tick()
        assert len(signals) == len(served) + 1  # nothing more until it is back
        child = next(c for c in children if c.name == name)
        child.die(0)  # drained and exited cleanly: restarted all the same, at once, no backoff
        now += 1.0
        supervisor.tick(now=now)
        supervisor.tick(now=now)
        assert child.starts == 1
        deadline = time.monotonic() + 5
        while name not in supervisor.serving_pid and time.monotonic() < deadline:
            time.sleep(0.01)  # await_serving runs on its own thread
        rolling.tick()
    assert rolling.done and served == ["prefill-0", "decode-0", "decode-1"]
    assert supervisor.running() == 3 and "rolling restart" in " ".join(logs)
