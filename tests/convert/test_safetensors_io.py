"""ShardedWriter: planned tensors streamed into size-capped shards that safetensors itself reads
back bit for bit, with the plan enforced and a failed sync not lost."""

from __future__ import annotations

import json
import os
import weakref

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from drope_megatron.convert.safetensors_io import INDEX, SINGLE, ShardedWriter


def _write(folder, tensors, max_bytes):
    plan = [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    with ShardedWriter(folder, plan, max_bytes=max_bytes) as writer:
        for name, t in tensors.items():
            writer.add(name, t)


def test_shards_are_capped_indexed_and_hold_every_tensor(tmp_path):
    tensors = {f"t{i}": torch.full((250,), float(i)) for i in range(7)}  # 1000 bytes each
    _write(tmp_path, tensors, max_bytes=2500)
    index = json.loads((tmp_path / INDEX).read_text())
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert [s.name for s in shards] == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert index["metadata"]["total_size"] == 7000
    loaded = {}
    for shard in shards:
        part = load_file(shard)
        assert sum(t.numel() * 4 for t in part.values()) <= 2500
        assert all(index["weight_map"][name] == shard.name for name in part)
        loaded.update(part)
    assert set(index["weight_map"]) == set(tensors) and all(torch.equal(loaded[n], t) for n, t in tensors.items())


def test_safetensors_reads_back_every_dtype_and_shape(tmp_path):
    """Mixed dtypes, shapes (an empty tensor, a 3-d one, a non-contiguous view) and odd name
    lengths: safetensors' own reader returns each tensor, and its own writer names the same
    dtypes and shapes."""
    gen = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(3, 5, generator=gen).to(torch.bfloat16),
               "bb.bias": torch.randn(7, generator=gen).half(),
               "c": torch.randn(4, 6, generator=gen).t(),
               "empty": torch.zeros(0, 3),
               "ids": torch.arange(5, dtype=torch.int64),
               "deep.x": torch.randn(2, 3, 4, generator=gen)}
    _write(tmp_path, tensors, max_bytes=2**20)
    assert not (tmp_path / INDEX).exists()
    with safe_open(str(tmp_path / SINGLE), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        for name, t in tensors.items():
            back = f.get_tensor(name)
            assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t)
    header_len = int.from_bytes((tmp_path / SINGLE).read_bytes()[:8], "little")
    assert (8 + header_len) % 8 == 0
    ours = json.loads((tmp_path / SINGLE).read_bytes()[8:8 + header_len])
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp_path / "ref.safetensors"),
              metadata={"format": "pt"})
    ref_bytes = (tmp_path / "ref.safetensors").read_bytes()
    ref = json.loads(ref_bytes[8:8 + int.from_bytes(ref_bytes[:8], "little")])
    assert {n: (e["dtype"], e["shape"]) for n, e in ours.items() if n != "__metadata__"} == \
        {n: (e["dtype"], e["shape"]) for n, e in ref.items() if n != "__metadata__"}


def test_the_plan_is_enforced(tmp_path):
    with pytest.raises(ValueError, match="names a tensor twice"):
        ShardedWriter(tmp_path, [("a", (2,), torch.float32), ("a", (2,), torch.float32)])
    with pytest.raises(ValueError, match="no tensors to write"):
        ShardedWriter(tmp_path, [])
    plan = [("a", [2], torch.float32), ("b", (3,), torch.float32)]  # a list is a shape too
    for wrong in (("b", torch.zeros(3)), ("a", torch.zeros(2, dtype=torch.float16)), ("a", torch.zeros(3))):
        with pytest.raises(ValueError, match="not the next one planned"):
            with ShardedWriter(tmp_path, plan) as writer:
                writer.add(*wrong)
    (tmp_path / "y").mkdir()
    with pytest.raises(ValueError, match="1 planned tensor.*never written, e.g. b"):
        with ShardedWriter(tmp_path / "y", plan) as writer:  # leaving the block checks
            writer.add("a", torch.zeros(2))
    (tmp_path / "z").mkdir()
    with ShardedWriter(tmp_path / "z", plan) as writer:
        writer.add("a", torch.zeros(2))
        writer.add("b", torch.zeros(3))
        with pytest.raises(ValueError, match="c comes after the last one planned"):
            writer.add("c", torch.zeros(1))
    assert torch.equal(load_file(tmp_path / "z" / SINGLE)["b"], torch.zeros(3))


def test_a_failed_background_sync_is_raised_not_lost(tmp_path, monkeypatch):
    def failing_fsync(fd):
        raise OSError(f"disk gone under {os.readlink(f'/proc/self/fd/{fd}')}")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    plan = [("a", (250,), torch.float32), ("b", (250,), torch.float32)]
    with ShardedWriter(tmp_path, plan, max_bytes=1000) as writer:
        writer.add("a", torch.zeros(250))  # shard 1 full: its sync starts in the background
        with pytest.raises(OSError, match="disk gone under .*model-00001-of-00002"):
            writer.add("b", torch.zeros(250))  # shard 2 full: waits for shard 1's sync first


def test_a_shard_is_synced_as_it_is_written(tmp_path, monkeypatch):
    """Every `sync_bytes` (and at the shard's end) the open shard is fsynced while writing goes on."""
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.fstat(fd).st_size)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    plan = [(f"t{i}", (250,), torch.float32) for i in range(5)]  # 1000 bytes each, one shard
    with ShardedWriter(tmp_path, plan, sync_bytes=2000) as writer:
        for name, _, _ in plan:
            writer.add(name, torch.zeros(250))
    header = 8 + int.from_bytes((tmp_path / SINGLE).read_bytes()[:8], "little")
    # The first sync starts at 2000 bytes and ends before the writer passes 4000 (it waits for it
    # there); the last syncs the whole file.
    assert len(synced) == 3 and header + 2000 <= synced[0] <= header + 4000 and synced[-1] == header + 5000


def test_no_tensor_is_kept_once_written(tmp_path):
    """Each tensor's memory is free as soon as `add` returns: nothing in the writer (a view, a
    reshape, a numpy view of the bytes) still refers to it, so no shard builds up in memory."""
    plan = [(f"t{i}", (1000,), torch.float32) for i in range(4)]
    with ShardedWriter(tmp_path, plan, max_bytes=2**30) as writer:
        for name, _, _ in plan:
            array = np.ones(1000, dtype=np.float32)
            freed = weakref.ref(array)
            writer.add(name, torch.from_numpy(array))  # the tensor shares the array's memory
            del array
            assert freed() is None, f"{name} is still held"
    assert torch.equal(load_file(tmp_path / SINGLE)["t3"], torch.ones(1000))


def test_a_folder_with_both_layouts_is_read_as_transformers_loads_it(tmp_path):
    """model.safetensors beside an index (an old sharded copy left in the folder): transformers
    loads the single file, so the conversion reads it too."""
    from drope_megatron.convert.safetensors_io import SafetensorsReader

    _write(tmp_path, {"w": torch.zeros(250), "v": torch.zeros(250)}, max_bytes=1500)  # an index, two shards
    save_file({"w": torch.ones(3)}, str(tmp_path / SINGLE))
    reader = SafetensorsReader(tmp_path)
    assert reader.names() == ["w"] and torch.equal(reader.get("w"), torch.ones(3))
