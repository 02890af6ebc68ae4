"""ShardedWriter: size-capped shards written in the background, loadable, and errors not lost."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from drope_megatron.convert.safetensors_io import INDEX, ShardedWriter


def test_shards_are_capped_indexed_and_hold_every_tensor(tmp_path):
    tensors = {f"t{i}": torch.full((250,), float(i)) for i in range(7)}  # 1000 bytes each
    with ShardedWriter(tmp_path, max_bytes=2500) as writer:
        for name, t in tensors.items():
            writer.add(name, t)
        writer.close()
    index = json.loads((tmp_path / INDEX).read_text())
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert [s.name for s in shards] == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert index["metadata"]["total_size"] == 7000
    loaded = {}
    for shard in shards:
        part = load_file(shard)
        assert sum(t.numel() * 4 for t in part.values()) <= 2500
        loaded.update(part)
    assert set(index["weight_map"]) == set(tensors) and all(torch.equal(loaded[n], t) for n, t in tensors.items())
    assert not list(tmp_path.glob("part-*"))


def test_a_failed_background_write_is_raised_not_lost(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    with ShardedWriter(folder, max_bytes=1000) as writer:
        writer.add("a", torch.zeros(250))
        shutil.rmtree(folder)  # the shard's folder is gone when the write starts
        writer.add("b", torch.zeros(250))  # starts writing shard 1
        with pytest.raises(Exception, match="No such file or directory"):
            writer.close()
