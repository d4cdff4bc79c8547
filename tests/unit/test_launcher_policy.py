"""`kvmesh up --policy` reaches the scheduler's command line; the scheduler refuses an unknown policy by name
(the launcher imports no service, so the scheduler's own config check speaks)."""

import argparse

import pytest

from kvmesh.services import launcher
from kvmesh.services.common.config import ConfigError
from kvmesh.services.scheduler.config import SchedulerConfig


def parse(*argv):
    parser = argparse.ArgumentParser()
    launcher.add_arguments(parser)
    return parser.parse_args(["--model", "/models/tiny", *argv])


def scheduler_argv(args):
    return next(c for c in launcher.plan(args) if c.name == "scheduler").argv


def test_the_scheduler_runs_the_policy_kvmesh_up_was_given():
    for given, expected in (((), "slo_aware"), (("--policy", "round_robin"), "round_robin")):
        argv = scheduler_argv(parse(*given))
        assert argv[argv.index("--policy") + 1] == expected


def test_an_unknown_policy_is_refused_by_the_scheduler_naming_the_known_ones():
    argv = scheduler_argv(parse("--policy", "random"))
    assert argv[argv.index("--policy") + 1] == "random"
    with pytest.raises(ConfigError, match="slo_aware"):
        SchedulerConfig(policy="random").validate()


def test_kvmesh_up_kv_pool_reaches_every_engine_worker_and_only_them():
    children = launcher.plan(parse("--kv-pool", "local"))
    workers = [c for c in children if c.argv[0] in ("prefill", "decode")]
    assert workers and all(c.argv[c.argv.index("--kv-pool") + 1] == "local" for c in workers)
    assert all("--kv-pool" not in c.argv for c in children if c not in workers)
    assert all("--kv-pool" not in c.argv for c in launcher.plan(parse()))  # unset: each worker's default
