"""`kvmesh up --policy` reaches the scheduler's command line; an unknown policy is refused by name."""

import argparse

import pytest

from kvmesh.services import launcher


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


def test_an_unknown_policy_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse("--policy", "random")
    assert "invalid choice" in capsys.readouterr().err
