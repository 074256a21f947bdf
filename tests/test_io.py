"""The streaming safetensors writer: files read back by safetensors itself, order enforced."""

import pytest
import torch
from safetensors.torch import load_file

from rmm.io import StreamingWriter


def test_streamed_file_reads_back_with_safetensors(tmp_path):
    tensors = {
        "w": torch.randn(3, 4),
        "col": torch.randn(5, 1),  # a size-1 last dimension
        "half": torch.randn(2, 2, 2).bfloat16(),
        "f64": torch.randn(7, dtype=torch.float64),
        "empty": torch.zeros(0, 3),
        "t": torch.randn(4, 3).T,  # not contiguous
    }
    writer = StreamingWriter(
        tmp_path / "x.safetensors", {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}, {"format": "pt"}
    )
    for k, v in tensors.items():
        writer.write(k, v)
    writer.close()
    back = load_file(tmp_path / "x.safetensors")
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert writer.numbers == sum(v.numel() for v in tensors.values())
    assert writer.bytes == sum(v.numel() * v.element_size() for v in tensors.values())


def test_out_of_order_wrong_shape_and_missing_tensors_are_caught(tmp_path):
    specs = {"a": (torch.float32, (2,)), "b": (torch.float32, (3,))}
    w = StreamingWriter(tmp_path / "x.safetensors", specs)
    with pytest.raises(ValueError, match="expected a"):
        w.write("b", torch.zeros(3))
    w = StreamingWriter(tmp_path / "y.safetensors", specs)
    with pytest.raises(ValueError, match="expected a"):
        w.write("a", torch.zeros(4))
    w = StreamingWriter(tmp_path / "z.safetensors", specs)
    w.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="b was declared but never written"):
        w.close()
