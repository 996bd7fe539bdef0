"""bundlerec.integrity: directories committed whole (staging + swap), sealed with a manifest, verified."""

import os

import pytest

from bundlerec.integrity import MANIFEST, IntegrityError, amend, require, staged, verify


def _write(root, files: dict):
    for rel, text in files.items():
        p = os.path.join(root, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "w") as f:
            f.write(text)


def _read_all(root):
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            if n != MANIFEST:
                out[os.path.relpath(os.path.join(d, n), root)] = open(os.path.join(d, n)).read()
    return out


def test_staged_swaps_in_a_complete_directory_and_a_crash_leaves_the_old_one(tmp_path):
    target = str(tmp_path / "export")
    with staged(target, kind="test") as tmp:
        assert tmp != target and not os.path.exists(target)
        _write(tmp, {"a.txt": "one", "sub/b.txt": "two"})
    assert verify(target) == (True, "ok")
    assert _read_all(target) == {"a.txt": "one", os.path.join("sub", "b.txt"): "two"}

    with pytest.raises(RuntimeError, match="boom"):
        with staged(target) as tmp:
            _write(tmp, {"a.txt": "NEW", "c.txt": "half"})
            raise RuntimeError("boom")
    assert _read_all(target) == {"a.txt": "one", os.path.join("sub", "b.txt"): "two"}  # old one, whole
    assert verify(target) == (True, "ok")
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no staging folder left behind

    with staged(target) as tmp:  # a second complete write replaces the first whole
        _write(tmp, {"c.txt": "three"})
    assert _read_all(target) == {"c.txt": "three"} and sorted(os.listdir(tmp_path)) == ["export"]


@pytest.mark.parametrize("damage, reason", [
    (lambda r: open(os.path.join(r, "a.txt"), "w").write("on"), "bytes, expected"),  # truncated
    (lambda r: open(os.path.join(r, "a.txt"), "w").write("ONE"), "content hash differs"),  # same size
    (lambda r: os.remove(os.path.join(r, "sub", "b.txt")), "missing"),
    (lambda r: open(os.path.join(r, "extra.npy"), "w").write("x"), "not in the manifest"),
    (lambda r: os.remove(os.path.join(r, MANIFEST)), "no MANIFEST.json"),
    (lambda r: open(os.path.join(r, MANIFEST), "w").write("{not json"), "unreadable"),
])
def test_every_kind_of_damage_is_refused_with_its_reason(tmp_path, damage, reason):
    root = str(tmp_path / "d")
    with staged(root) as tmp:
        _write(tmp, {"a.txt": "one", "sub/b.txt": "two"})
    damage(root)
    ok, why = verify(root)
    assert not ok and reason in why
    with pytest.raises(IntegrityError, match=reason):
        require(root, "export")


def test_amend_reseals_and_a_writer_that_stops_half_way_is_refused(tmp_path):
    root = str(tmp_path / "d")
    with staged(root, created="t0") as tmp:
        _write(tmp, {"a.txt": "one"})
    with amend(root):
        _write(root, {"pricing.json": "{}"})
    assert verify(root) == (True, "ok")
    assert '"created": "t0"' in open(os.path.join(root, MANIFEST)).read()  # extra fields kept

    with pytest.raises(KeyboardInterrupt):
        with amend(root):
            _write(root, {"rerank.json": "{}"})
            raise KeyboardInterrupt  # killed before re-sealing
    ok, why = verify(root)
    assert not ok and "rerank.json" in why
    with pytest.raises(IntegrityError):  # nor can a later stage build on it
        with amend(root):
            pass


@pytest.fixture(scope="module")
def s3_server():
    """A real local S3 server with one bucket (tests.support.moto_server); its client environment."""
    from tests.support import moto_server

    with moto_server() as (env, _):
        yield env


@pytest.mark.timeout(300)
def test_an_export_on_object_storage_is_committed_by_its_manifest_and_verified_when_read(s3_server, tmp_path,
                                                                                        monkeypatch):
    """Exports kept on s3:// (results_path there): built locally, uploaded with the manifest last;
    a re-publish leaves no object of the old one; a read (checkout) verifies sizes and hashes, and
    refuses a damaged object, an added one, and an upload that stopped before its manifest."""
    import boto3

    from bundlerec.integrity import checkout, publish, seal, workdir_for

    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    s3 = boto3.client("s3")
    uri = "s3://bundlerec-it/run/export"
    local = workdir_for(uri)
    assert local != uri and not local.startswith("s3:")
    os.makedirs(local)
    _write(local, {"a.txt": "alpha", "encoder/config.json": "{}", "old.bin": "x" * 100})
    seal(local)
    publish(local, uri)
    assert verify(uri) == (True, "ok")
    got = checkout(uri)
    assert got != local and _read_all(got) == _read_all(local) and verify(got) == (True, "ok")

    os.remove(os.path.join(local, "old.bin"))  # the next export has other files
    _write(local, {"a.txt": "alpha 2"})
    seal(local)
    publish(local, uri)
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="bundlerec-it", Prefix="run/export/")["Contents"]
                  if not o["Key"].endswith("/"))  # (pyarrow keeps empty "folder" markers; not content)
    assert keys == ["run/export/MANIFEST.json", "run/export/a.txt", "run/export/encoder/config.json"]
    assert _read_all(checkout(uri)) == {"a.txt": "alpha 2", os.path.join("encoder", "config.json"): "{}"}

    s3.put_object(Bucket="bundlerec-it", Key="run/export/a.txt", Body=b"ALPHA 2")  # same size, other bytes
    assert verify(uri) == (False, "a.txt: content hash differs")
    with pytest.raises(IntegrityError, match="content hash differs"):
        checkout(uri)
    publish(local, uri)
    s3.put_object(Bucket="bundlerec-it", Key="run/export/extra.bin", Body=b"?")  # a later writer that did not re-seal
    assert not verify(uri)[0] and "extra.bin" in verify(uri)[1]
    s3.delete_object(Bucket="bundlerec-it", Key="run/export/MANIFEST.json")  # an upload that stopped before its commit
    assert verify(uri) == (False, f"no {MANIFEST} (incomplete, or written before manifests)")
    with pytest.raises(ValueError, match="workdir_for"):
        publish(local, str(tmp_path / "elsewhere"))  # a local target is built in place, never copied
