"""Checkpoint manifests: a half-written or damaged checkpoint is detected and an earlier intact one used."""

import json
import os
import shutil

import pytest

from bundlerec.train.checkpoints import (
    MANIFEST_DIR,
    newest_valid,
    verify,
    write_manifest,
)


def _ckpt(root, name, world=2, payload=b"x" * 1000):
    d = root / name
    for r in range(world):  # each rank writes its shard and its manifest (Ray merges the dirs)
        rank_dir = root / f".rank{r}-{name}"
        (rank_dir / "epoch1").mkdir(parents=True)
        (rank_dir / "epoch1" / f"zero_pp_rank_{r}_optim_states.pt").write_bytes(payload + bytes([r]))
        if r == 0:
            (rank_dir / "latest").write_text("epoch1")
        write_manifest(str(rank_dir), r, world)
        shutil.copytree(rank_dir, d, dirs_exist_ok=True)
    return d


def test_intact_checkpoint_verifies(tmp_path):
    d = _ckpt(tmp_path, "checkpoint_2026-01-01_00-00-01")
    assert verify(str(d), 2) == (True, "ok")


def test_damage_is_detected(tmp_path):
    d = _ckpt(tmp_path, "checkpoint_2026-01-01_00-00-01")
    f = d / "epoch1" / "zero_pp_rank_1_optim_states.pt"
    f.write_bytes(f.read_bytes()[:10])  # truncated
    ok, why = verify(str(d), 2)
    assert not ok and "zero_pp_rank_1" in why and "bytes" in why
    d2 = _ckpt(tmp_path, "checkpoint_2026-01-01_00-00-02")
    f = d2 / "epoch1" / "zero_pp_rank_0_optim_states.pt"
    f.write_bytes(b"y" * len(f.read_bytes()))  # same size, other content
    assert verify(str(d2), 2) == (False, "epoch1/zero_pp_rank_0_optim_states.pt: content hash differs")
    d3 = _ckpt(tmp_path, "checkpoint_2026-01-01_00-00-03")
    os.remove(d3 / MANIFEST_DIR / "rank1.json")  # a rank never finished
    assert not verify(str(d3), 2)[0]
    d4 = _ckpt(tmp_path, "checkpoint_2026-01-01_00-00-04", world=1)
    assert not verify(str(d4), 2)[0]  # written by another world size


def _newest(path, fs=None, root=None):
    """newest_valid on a ray.train.Checkpoint; the chosen checkpoint's name (None: none intact)."""
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    if fs is None:
        ckpt = Checkpoint(str(path), filesystem=pafs.LocalFileSystem())
    else:
        ckpt = Checkpoint(os.path.relpath(path, root), filesystem=fs)
    with newest_valid(ckpt, 2) as d:
        if d is None:
            return None
        assert verify(d, 2)[0]  # what the caller loads is the verified copy
        return json.load(open(os.path.join(d, MANIFEST_DIR, "rank0.json")))["name"]


def _named_ckpt(root, name):
    d = _ckpt(root, name)
    for r in (0, 1):  # tag each manifest with its checkpoint's name, so the test can tell which one was used
        m = d / MANIFEST_DIR / f"rank{r}.json"
        m.write_text(json.dumps({**json.loads(m.read_text()), "name": name}))
    return d


@pytest.mark.parametrize("storage", ["local", "remote"])
def test_newest_valid_falls_back_to_the_previous_good_one(tmp_path, storage):
    """Local storage, and storage Ray must download from (a pyarrow SubTreeFileSystem stands for
    s3/gcs: not a LocalFileSystem, so every candidate is fetched to a temp dir and verified there)."""
    import pyarrow.fs as pafs

    fs = None if storage == "local" else pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    a = _named_ckpt(tmp_path, "checkpoint_2026-01-01_00-00-01")
    b = _named_ckpt(tmp_path, "checkpoint_2026-01-01_00-00-02")
    c = _named_ckpt(tmp_path, "checkpoint_2026-01-01_00-00-03")
    assert _newest(c, fs, tmp_path) == c.name
    (c / "latest").unlink()  # half-written latest
    assert _newest(c, fs, tmp_path) == b.name
    (b / MANIFEST_DIR / "rank0.json").write_text("{not json")
    assert _newest(c, fs, tmp_path) == a.name
    (a / "epoch1" / "zero_pp_rank_0_optim_states.pt").unlink()
    assert _newest(c, fs, tmp_path) is None


def test_a_torn_ray_snapshot_resumes_from_the_newest_checkpoint_on_every_later_attempt(tmp_path):
    """A disk that filled while Ray Train wrote its snapshot leaves it torn: the next attempt moves it
    aside and resumes from the newest checkpoint. An attempt stopped before it reported a checkpoint
    writes no new snapshot; the attempt after it must still resume (not start the run over)."""
    from bundlerec.train.checkpoints import SNAPSHOT, recover_torn_snapshot

    run = tmp_path / "store" / "tiny-abc"
    assert recover_torn_snapshot(str(tmp_path / "store"), "tiny-abc") is None  # a new run
    run.mkdir(parents=True)
    assert recover_torn_snapshot(str(tmp_path / "store"), "tiny-abc") is None  # no checkpoints yet
    _named_ckpt(run, "checkpoint_2026-01-01_00-00-01")
    newest = _named_ckpt(run, "checkpoint_2026-01-01_00-00-02")
    (run / SNAPSHOT).write_text('{"checkpoint_results": [')  # torn
    for attempt in range(2):
        ckpt = recover_torn_snapshot(str(tmp_path / "store"), "tiny-abc")
        assert ckpt is not None and ckpt.path == str(newest), attempt
        assert not (run / SNAPSHOT).exists() and len(list(run.glob(f"{SNAPSHOT}.torn-*"))) == 1
    (run / SNAPSHOT).write_text("{}")  # a readable snapshot: Ray Train's own resume applies
    assert recover_torn_snapshot(str(tmp_path / "store"), "tiny-abc") is None
