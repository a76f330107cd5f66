"""UniSparseConfig: the fields and defaults of SPEC section 2, validated at construction."""

import dataclasses

import pytest

from unisparse_ref import UniSparseConfig


def test_defaults_match_spec():
    c = UniSparseConfig()
    assert (c.block_size, c.c_q, c.c_k, c.c_h) == (128, 16, 16, 1)
    assert c.threshold == 0.9
    assert (c.n_sink_blocks, c.n_local_blocks) == (1, 1)
    assert c.causal is True and c.softmax_scale is None
    assert [f.name for f in dataclasses.fields(c)] == [
        "block_size", "c_q", "c_k", "c_h", "threshold", "n_sink_blocks", "n_local_blocks",
        "causal", "softmax_scale",
        # research variants (issue 15), all defaulting to SPEC's behaviour:
        "threshold_mode", "sink_tokens", "diagonal_correction",
    ]
    assert (c.threshold_mode, c.sink_tokens, c.diagonal_correction) == ("total", 0, False)


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        UniSparseConfig().threshold = 0.5  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"block_size": 96}, "block_size"),
        ({"block_size": 8}, "block_size"),
        ({"c_q": 3}, "c_q"),
        ({"c_k": 256}, "c_k"),
        ({"c_q": 0}, "c_q"),
        ({"c_h": 0}, "c_h"),
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": 1.01}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"n_sink_blocks": -1}, "n_sink_blocks"),
        ({"n_local_blocks": -2}, "n_local_blocks"),
        ({"softmax_scale": -1.0}, "softmax_scale"),
        ({"softmax_scale": float("inf")}, "softmax_scale"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        UniSparseConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"block_size": 128.0}, "block_size"), ({"causal": 1}, "causal"), ({"threshold": "0.9"}, "threshold"),
     ({"c_q": True}, "c_q")],
)
def test_wrong_types_name_the_field(kwargs, field):
    with pytest.raises(TypeError, match=field):
        UniSparseConfig(**kwargs)


def test_scale():
    assert UniSparseConfig().scale_for(64) == 0.125
    assert UniSparseConfig(softmax_scale=0.5).scale_for(64) == 0.5
