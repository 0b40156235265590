"""fedrac.wire.records decodes Flower arrays exactly as ``Array.numpy()`` does."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedrac.wire.records import array_to_numpy, to_array_record, to_shared_state_dict, to_state_dict

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


TENSORS = {"w": torch.randn(4, 3), "b": torch.randn(4), "n": torch.tensor(7),
           "t": torch.randn(3, 5).T, "h": torch.arange(6, dtype=torch.float16).reshape(2, 3),
           "e": torch.zeros(0, 2, dtype=torch.int64), "f": torch.tensor([True, False])}


def test_encoding_is_byte_identical_to_flower():
    ours, flowers = to_array_record(TENSORS), ArrayRecord(TENSORS)
    assert list(ours) == list(flowers)
    for key in flowers:
        a, b = ours[key], flowers[key]
        assert (a.data, a.dtype, tuple(a.shape), a.stype) == (b.data, b.dtype, tuple(b.shape),
                                                              b.stype), key
    assert to_array_record(TENSORS)["w"].data == flowers["w"].data  # cached header


def test_shared_decoding_reuses_the_same_arrays_only():
    record = to_array_record({"w": torch.randn(3, 2), "b": torch.randn(3)})
    first = to_shared_state_dict(record)
    same_arrays = ArrayRecord()  # another record holding the same Array objects
    for key, array in record.items():
        same_arrays[key] = array
    again = to_shared_state_dict(same_arrays)
    assert all(again[k] is first[k] for k in first) and again is not first
    fresh = to_shared_state_dict(ArrayRecord({"w": torch.ones(3, 2), "b": torch.ones(3)}))
    assert torch.equal(fresh["w"], torch.ones(3, 2))  # new Arrays: decoded, not reused
    reordered = ArrayRecord()
    reordered["b"], reordered["w"] = record["b"], record["w"]
    assert list(to_shared_state_dict(reordered)) == ["b", "w"]


def test_to_array_record_release_frees_as_it_encodes():
    state = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4)}
    expected = {k: v.clone() for k, v in state.items()}
    record = to_array_record(state, release=True)
    assert state == {}  # each tensor dropped once encoded: never two copies of the weights
    assert list(record.keys()) == ["a", "b"]
    for key, value in to_state_dict(record).items():
        assert torch.equal(value, expected[key])
