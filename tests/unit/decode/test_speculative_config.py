"""The decode worker's --speculative knobs: validated with the field named, wired to the engine's drafter, counted."""

import pytest

from kvmesh.services.common import metrics
from kvmesh.services.common.config import ConfigError
from kvmesh.services.decode.config import DecodeConfig
from kvmesh.services.decode.main import speculator


@pytest.mark.parametrize("fields, named", [({"speculative": "eagle"}, "speculative"),
                                           ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
                                           ({"ngram_min": 4, "ngram_max": 3}, "ngram_min")])
def test_bad_speculative_settings_are_refused_naming_the_knob(fields, named):
    with pytest.raises(ConfigError, match=named):
        DecodeConfig(model="m", **{"speculative": "ngram", **fields}).validate()


def test_speculation_is_off_by_default_and_ngram_builds_the_configured_drafter():
    assert DecodeConfig(model="m").speculative == "none" and speculator(DecodeConfig(model="m"), 128) is None
    config = DecodeConfig(model="m", speculative="ngram", num_speculative_tokens=6, ngram_min=3, ngram_max=4)
    config.validate()
    drafter = speculator(config, 128)
    assert (drafter.config.num_speculative_tokens, drafter.config.ngram_min, drafter.config.ngram_max) == (6, 3, 4)
    value = lambda name: metrics.REGISTRY.get_sample_value(name) or 0.0  # noqa: E731
    before = value("kvmesh:spec_decode_draft_tokens_total"), value("kvmesh:spec_decode_accepted_tokens_total")
    drafter.record(6, 2)
    after = value("kvmesh:spec_decode_draft_tokens_total"), value("kvmesh:spec_decode_accepted_tokens_total")
    assert (after[0] - before[0], after[1] - before[1]) == (6, 2)
