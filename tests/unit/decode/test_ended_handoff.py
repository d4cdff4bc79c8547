"""A request whose KV handoff ended before its stream did (lease lapsed, aborted, worker stopping) ends with the
status that says why, never a KeyError from the state machine."""

import grpc
import pytest

from kvmesh.services.common import errors
from kvmesh.services.decode.worker import ended_error
from kvmesh.services.worker.handoff import Handoff, HandoffState


@pytest.mark.parametrize("state, reason, code", [
    (HandoffState.EXPIRED, "lease of 5 s lapsed", grpc.StatusCode.DEADLINE_EXCEEDED),
    (HandoffState.FAILED, "aborted", grpc.StatusCode.CANCELLED),
    (HandoffState.FAILED, "worker stopping", grpc.StatusCode.UNAVAILABLE),
])
def test_an_ended_handoff_becomes_the_status_that_says_why(state, reason, code):
    error = ended_error(Handoff("req-1", 5.0, state=state, reason=reason))
    assert errors.status_for(error) == code
    assert "req-1" in str(error) and reason in str(error)
