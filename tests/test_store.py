"""The content-addressed store: keys, atomic commits, corruption, concurrent writers."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from unlearning_audit.store import MANIFEST, CorruptArtifact, Store


def _writer(files: dict[str, bytes]):
    def build(out: Path):
        for name, content in files.items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(content)
        return {"note": "built"}

    return build


def test_key_depends_on_inputs_config_and_version():
    base = Store.key_for("s", {"a": "1"}, {"x": 1}, "v1")
    assert base == Store.key_for("s", {"a": "1"}, {"x": 1}, "v1")
    assert base.startswith("s/")
    assert (
        len(
            {
                base,
                Store.key_for("s", {"a": "2"}, {"x": 1}, "v1"),
                Store.key_for("s", {"a": "1"}, {"x": 2}, "v1"),
                Store.key_for("s", {"a": "1"}, {"x": 1}, "v2"),
            }
        )
        == 4
    )


def test_cached_builds_once_then_serves(tmp_path):
    store = Store(str(tmp_path))
    calls = []
    build = _writer({"a.txt": b"hello", "sub/b.bin": b"\x00\x01"})

    def counting(out):
        calls.append(out)
        return build(out)

    ref, cached = store.cached("stage", {"in": "x"}, {"c": 1}, "v", counting)
    again, cached_again = store.cached("stage", {"in": "x"}, {"c": 1}, "v", counting)
    assert (cached, cached_again) == (False, True)
    assert ref == again and len(calls) == 1
    assert store.read_bytes(ref, "sub/b.bin") == b"\x00\x01"
    manifest = store.manifest(ref.key)
    assert manifest["meta"]["note"] == "built" and set(manifest["files"]) == {"a.txt", "sub/b.bin"}


def test_interrupted_write_leaves_nothing_that_reads_as_complete(tmp_path, monkeypatch):
    store = Store(str(tmp_path))

    def crash(path, data):
        raise OSError("killed before the manifest")

    monkeypatch.setattr(store, "_write_atomic", crash)
    with pytest.raises(OSError):
        store.cached("stage", {}, {}, "v", _writer({"a.txt": b"data"}))
    key = Store.key_for("stage", {}, {}, "v")
    assert list(tmp_path.glob("stage/*/*/a.txt"))  # the data was written...
    assert store.get(key) is None  # ...but nothing reads as complete
    monkeypatch.undo()
    ref, cached = Store(str(tmp_path)).cached("stage", {}, {}, "v", _writer({"a.txt": b"data"}))
    assert not cached and Store(str(tmp_path)).read_bytes(ref, "a.txt") == b"data"


def test_failed_build_stores_nothing(tmp_path):
    store = Store(str(tmp_path))

    def failing(out):
        (out / "half.txt").write_text("partial")
        raise RuntimeError("stage failed")

    with pytest.raises(RuntimeError):
        store.cached("stage", {}, {}, "v", failing)
    assert not list(tmp_path.rglob(MANIFEST))


def test_corrupted_object_is_detected_and_rebuilt(tmp_path):
    store = Store(str(tmp_path))
    ref, _ = store.cached("stage", {}, {}, "v", _writer({"a.txt": b"good"}))
    data_file = next(tmp_path.glob("stage/*/*/a.txt"))
    data_file.write_bytes(b"evil")
    fresh = Store(str(tmp_path))  # a new reader has not verified it yet
    with pytest.raises(CorruptArtifact, match="does not match"):
        fresh.read_bytes(ref, "a.txt")
    assert fresh.get(ref.key) is None
    # a manifest whose file list was tampered with is caught as well
    manifest_path = next(tmp_path.glob(f"stage/*/{MANIFEST}"))
    manifest = json.loads(manifest_path.read_text())
    data_file.write_bytes(b"good")
    manifest["files"]["a.txt"]["size"] = 99
    manifest_path.write_text(json.dumps(manifest))
    assert Store(str(tmp_path)).get(ref.key) is None


def test_two_writers_of_one_key_end_with_one_valid_artifact(tmp_path):
    first, second = Store(str(tmp_path)), Store(str(tmp_path))
    key = Store.key_for("stage", {}, {}, "v")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("same")
    meta = {"inputs": {}, "config": {}, "version": "v"}  # what derives the key (see cached)
    ref1 = first.put(key, src, meta)
    ref2 = second.put(key, src, meta)
    assert ref1 == ref2
    assert len(list(tmp_path.glob("stage/*/*/a.txt"))) == 1  # the loser removed its copy
    assert Store(str(tmp_path)).read_bytes(ref1, "a.txt") == b"same"


def test_unwritable_store_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="cannot be written"):
        Store(str(blocker / "store")).check_writable()


@pytest.mark.parametrize(
    ("field", "value"), [("data", "../../elsewhere"), ("files", {"../../etc/passwd": {}})]
)
def test_a_manifest_pointing_outside_the_store_is_corrupt(tmp_path, field, value):
    store = Store(str(tmp_path))
    ref, _ = store.cached("stage", {}, {}, "v", _writer({"a.txt": b"data"}))
    manifest_path = next(tmp_path.glob(f"stage/*/{MANIFEST}"))
    manifest = json.loads(manifest_path.read_text())
    manifest[field] = value
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CorruptArtifact, match="not a valid manifest"):
        Store(str(tmp_path)).manifest(ref.key)
    assert Store(str(tmp_path)).get(ref.key) is None


def test_the_code_version_of_a_package_covers_every_module_in_it(tmp_path, monkeypatch):
    """A package (unlearning_audit.checkpoints) is versioned by all of its modules' source."""
    import importlib

    from unlearning_audit.store import code_version

    for name, value in (("v1", 1), ("v2", 2)):
        (tmp_path / name / "inner").mkdir(parents=True)
        (tmp_path / name / "__init__.py").write_text("from .inner.part import X\n")
        (tmp_path / name / "inner" / "__init__.py").write_text("")
        (tmp_path / name / "inner" / "part.py").write_text(f"X = {value}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    v1, v2 = importlib.import_module("v1"), importlib.import_module("v2")
    assert code_version(v1) != code_version(v2)


def test_a_local_build_is_moved_into_place_not_copied(tmp_path):
    """A local store's build is written beside its writer folders and moved into place: the
    stored file is the very file the build wrote (same inode), with no second copy; while it
    builds, `verify` does not take the build folder for an orphan, however old."""
    store = Store(str(tmp_path / "store"))
    seen = {}

    def build(out: Path) -> None:
        (out / "weights.bin").write_bytes(b"w" * 4096)
        seen["inode"] = (out / "weights.bin").stat().st_ino
        seen["folder"] = out
        old = time.time() - 7200
        os.utime(out, (old, old))
        seen["findings"] = store.check_integrity()

    ref, cached = store.cached("unlearn", {"x": 1}, {}, "v", build)
    assert not cached
    stored = store.local_dir(ref) / "weights.bin"
    assert stored.stat().st_ino == seen["inode"] and stored.stat().st_nlink == 1
    assert seen["folder"].parent == stored.parent.parent  # in the key's own folder
    assert seen["findings"] == []  # a build at work is no orphan
    assert not seen["folder"].exists()
    store.verify(ref)
