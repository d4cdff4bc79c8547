"""deploy/systemd: `systemd-analyze verify` on every unit, their required settings, env files and install.sh."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
ROLES = ("gateway", "scheduler", "prefill", "decode", "cache")


def _settings(path: Path) -> dict[str, list[str]]:
    """Key -> every value it is given (systemd keys may repeat)."""
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def _verify(tmp_path: Path, unit_text: dict[str, str]) -> subprocess.CompletedProcess:
    """Run systemd-analyze verify on units written into tmp_path (ExecStart swapped for a binary that exists)."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install -y systemd)")
    for name, text in unit_text.items():
        (tmp_path / name).write_text(text.replace("/opt/kvmesh/bin/kvmesh", "/bin/true"))
    return subprocess.run([tool, "verify", "--man=no", *(str(tmp_path / n) for n in unit_text)],
                          capture_output=True, text=True, timeout=60)


def _units() -> dict[str, str]:
    names = [f"kvmesh-{role}@.service" for role in ROLES] + ["kvmesh.target"]
    return {name: (SYSTEMD / name).read_text() for name in names}


def test_systemd_analyze_verify_accepts_every_unit_without_a_warning(tmp_path):
    result = _verify(tmp_path, _units())
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_systemd_analyze_verify_flags_a_misspelt_key(tmp_path):
    units = {"kvmesh-decode@.service": _units()["kvmesh-decode@.service"].replace("Restart=", "Restrat=")}
    result = _verify(tmp_path, units)
    assert "Unknown key 'Restrat'" in result.stderr


@pytest.mark.parametrize("role", ROLES)
def test_unit_is_notify_watchdog_restart_hardened(role):
    unit = _settings(SYSTEMD / f"kvmesh-{role}@.service")
    assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"]
    assert float(unit["WatchdogSec"][0]) > 0
    assert unit["Restart"] == ["on-failure"]
    assert unit["EnvironmentFile"] == [f"/etc/kvmesh/{role}-%i.env"]
    assert unit["ExecStart"] == [f"/opt/kvmesh/bin/kvmesh {role}"]
    assert unit["User"] == ["kvmesh"] and unit["ProtectSystem"] == ["strict"]
    assert unit["NoNewPrivileges"] == ["yes"] and unit["PrivateTmp"] == ["yes"]
    assert unit["WantedBy"] == ["kvmesh.target"] and unit["PartOf"] == ["kvmesh.target"]


@pytest.mark.parametrize("role", ROLES)
def test_unit_restarts_and_gives_up_as_kvmesh_up_does(role):
    from kvmesh.services.supervisor import RestartConfig

    unit, launcher = _settings(SYSTEMD / f"kvmesh-{role}@.service"), RestartConfig()
    assert unit["Restart"] == ["on-failure"] == [launcher.restart]
    assert float(unit["RestartSec"][0]) > 0
    assert unit["StartLimitBurst"] == [str(launcher.restart_limit)]
    assert float(unit["StartLimitIntervalSec"][0]) == launcher.restart_window_s


def test_cache_keeps_its_ssd_tier_in_the_state_directory():
    unit = _settings(SYSTEMD / "kvmesh-cache@.service")
    assert unit["StateDirectory"] == ["kvmesh/cache-%i"]
    assert "KVMESH_CACHE_SSD_DIR=%S/kvmesh/cache-%i" in unit["Environment"]


@pytest.mark.parametrize("role", ROLES)
def test_example_env_files_set_only_kvmesh_and_otel_variables(role):
    lines = [l for l in (SYSTEMD / "env" / f"{role}-0.env").read_text().splitlines() if l and not l.startswith("#")]
    assert lines
    for line in lines:
        assert re.fullmatch(r"(KVMESH|OTEL)_[A-Z0-9_]+=\S+", line), line


def test_install_sh_lays_out_units_and_env_files_under_a_root(tmp_path):
    script = SYSTEMD / "install.sh"
    subprocess.run(["sh", str(script), "--root", str(tmp_path), "--no-venv", "prefill@0", "decode@2"],
                   check=True, capture_output=True, timeout=30)
    units = sorted(p.name for p in (tmp_path / "etc/systemd/system").iterdir())
    assert units == sorted([f"kvmesh-{r}@.service" for r in ROLES] + ["kvmesh.target"])
    assert (tmp_path / "etc/kvmesh/decode-2.env").read_text() == (SYSTEMD / "env/decode-0.env").read_text()
    (tmp_path / "etc/kvmesh/prefill-0.env").write_text("KVMESH_PORT=1\n")
    subprocess.run(["sh", str(script), "--root", str(tmp_path), "--no-venv", "prefill@0"], check=True,
                   capture_output=True, timeout=30)
    assert (tmp_path / "etc/kvmesh/prefill-0.env").read_text() == "KVMESH_PORT=1\n", "never overwrites"
    bad = subprocess.run(["sh", str(script), "--root", str(tmp_path), "--no-venv", "router@0"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "no role 'router'" in bad.stderr
