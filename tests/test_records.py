"""fedrac.records decodes Flower arrays exactly as ``Array.numpy()`` does."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedrac.records import array_to_numpy, to_state_dict

CASES = [np.arange(12, dtype=np.float32).reshape(3, 4), np.arange(12.0).reshape(3, 4).T,
         np.array(3.5), np.zeros((0, 5), dtype=np.int64), np.array([True, False]),
         np.arange(6, dtype=np.float16).reshape(1, 2, 3), np.arange(5, dtype=">i4")]


@pytest.mark.parametrize("value", CASES, ids=range(len(CASES)))
def test_same_as_flower(value):
    arr = Array(value)
    want, got = arr.numpy(), array_to_numpy(arr)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(got, want)
    assert got.flags.writeable and got.flags.f_contiguous == want.flags.f_contiguous
    assert array_to_numpy(arr).tobytes() == want.tobytes()  # second call: cached header


def test_state_dict_matches_flower():
    state = {"w": torch.randn(4, 3), "b": torch.randn(4), "n": torch.tensor(7)}
    record = ArrayRecord(state)
    ours, flowers = to_state_dict(record), record.to_torch_state_dict()
    assert list(ours) == list(flowers)
    assert all(torch.equal(ours[k], flowers[k]) and ours[k].dtype == flowers[k].dtype
               for k in ours)
