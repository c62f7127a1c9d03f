"""The mixture follows Megatron's blending rule exactly and resumes from its counts alone."""
import warnings

import numpy as np
import pytest

from megatron_code.data.mixture import Mixture


def megatron_blending(weights, size):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import helpers_cpp
    dataset_index = np.zeros(size, dtype=np.int16)
    sample_index = np.zeros(size, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    helpers_cpp.build_blending_indices(dataset_index, sample_index, w, len(w), size, False)
    return list(zip(dataset_index.tolist(), sample_index.tolist()))


@pytest.mark.parametrize("weights", [[2, 1], [5, 3], [0.7, 0.2, 0.1], [1, 0]])
def test_matches_megatron_blended_dataset(weights):
    mixture = Mixture([f"s{i}" for i in range(len(weights))], weights)
    picks = mixture.take(300) + mixture.take(701)  # batch boundaries do not matter
    assert picks == megatron_blending(weights, 1001)


def test_resume_from_counts():
    full = Mixture(["text", "code"], [5, 3])
    expected = full.take(64)
    first = Mixture(["text", "code"], [5, 3])
    head = first.take(24)
    resumed = Mixture(["text", "code"], [5, 3])
    resumed.load_state_dict(first.state_dict())
    assert head + resumed.take(40) == expected


def test_resume_rejects_unknown_source():
    saved = Mixture(["text", "code"], [1, 1])
    saved.take(3)
    with pytest.raises(ValueError, match=r"sources \['code'\] that this config lacks"):
        Mixture(["text"], [1]).load_state_dict(saved.state_dict())
