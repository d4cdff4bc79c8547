"""`kvmesh up --flexible`: every engine worker is a `kvmesh worker --role auto` in its first role, and the
schedulers run the planner that flips them; `--*-tensor-parallel-size` reaches the workers of its role."""

from test_launcher_policy import parse

from kvmesh.services import launcher


def workers(children):
    return [c for c in children if c.name.startswith(("prefill-", "decode-", "worker-"))]


def flag(argv, name):
    return argv[argv.index(name) + 1] if name in argv else None


def scheduler(children):
    return next(c for c in children if c.name == "scheduler").argv


def test_flexible_workers_start_in_their_first_role_and_the_planner_runs():
    children = launcher.plan(parse("--flexible", "--prefill", "1", "--decode", "2"))
    engine = workers(children)
    assert [c.argv[0] for c in engine] == ["worker"] * 3
    assert [flag(c.argv, "--role") for c in engine] == ["auto"] * 3
    assert [flag(c.argv, "--initial-role") for c in engine] == ["prefill", "decode", "decode"]
    assert flag(scheduler(children), "--planner-interval-s") == "10.0"


def test_the_planner_interval_is_as_given_and_off_without_flexible_workers():
    assert flag(scheduler(launcher.plan(parse("--flexible", "--planner-interval-s", "3"))), "--planner-interval-s") == "3.0"
    assert "--planner-interval-s" not in scheduler(launcher.plan(parse("--flexible", "--planner-interval-s", "0")))
    plain = launcher.plan(parse())
    assert "--planner-interval-s" not in scheduler(plain)
    assert [c.argv[0] for c in workers(plain)] == ["prefill", "decode"]


def test_tensor_parallel_sizes_reach_the_workers_of_their_role_only():
    engine = workers(launcher.plan(parse("--prefill-tensor-parallel-size", "2", "--decode", "2")))
    assert [flag(c.argv, "--tensor-parallel-size") for c in engine] == ["2", None, None]
    colocated = workers(launcher.plan(parse("--colocated", "--workers", "2", "--worker-tensor-parallel-size", "3")))
    assert [flag(c.argv, "--tensor-parallel-size") for c in colocated] == ["3", "3"]


def test_colocated_and_flexible_together_are_refused(capsys):
    assert launcher.run(parse("--colocated", "--flexible")) == 2
    assert "choose one" in capsys.readouterr().err
