"""The model store: atomic pointers, pending rollback, pruning, and recovery from interruptions."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from edge_agent.models.store import ModelStore, StoreError, atomic_write, is_sha256
from tests.data import DM05


def add(store: ModelStore, data: bytes, name: str, at: float) -> str:
    sha = hashlib.sha256(data).hexdigest()
    temp = store.incoming_file(name)
    temp.write_bytes(data)
    assert store.place(temp, sha)
    store.write_manifest(sha, {"name": name, "deployed_at": at, "labels": ["a", "b"], "source": "test"})
    return sha


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore.open(str(tmp_path / "state"), keep=2)


def leftovers(store: ModelStore):
    return sorted(p.name for p in store.root.iterdir() if p.name.startswith("."))


def test_entries_manifest_and_pointers(store):
    a = add(store, b"model-a", "a", 1.0)
    b = add(store, b"model-b", "b", 2.0)
    assert [e.name for e in store.entries()] == ["a", "b"]
    entry = store.get(a)
    assert entry.path.read_bytes() == b"model-a" and entry.labels == ["a", "b"]
    assert entry.manifest["size"] == 7 and entry.manifest["sha256"] == a
    store.set_pointers(b, a)
    assert (store.current(), store.previous()) == (b, a)
    assert (store.root / "current").read_text() == b + "\n"
    assert leftovers(store) == []
    desc = store.describe()
    assert desc["current"] == b and [m["role"] for m in desc["models"]] == ["current", "previous"]


def test_place_twice_keeps_one_copy(store):
    a = add(store, b"same", "x", 1.0)
    temp = store.incoming_file("again")
    temp.write_bytes(b"same")
    assert store.place(temp, a) is False
    assert not temp.exists() and store.get(a).name == "x"


def test_bad_sha_refused(store):
    with pytest.raises(StoreError, match="invalid sha256"):
        store.model_path("../../etc/passwd")
    assert not is_sha256("A" * 64) and is_sha256("a" * 64)


def test_pending_confirm(store):
    a = add(store, b"a", "a", 1.0)
    b = add(store, b"b", "b", 2.0)
    store.set_pointers(a, None)
    store.begin_switch(b)
    assert (store.current(), store.previous()) == (b, a) and store.pending()["sha256"] == b
    assert store.confirm() == b
    assert store.pending() is None and store.current() == b
    # a restart now changes nothing
    assert store.recover() == [] and (store.current(), store.previous()) == (b, a)


def test_unconfirmed_switch_rolled_back_on_restart(store, tmp_path):
    a = add(store, b"a", "a", 1.0)
    b = add(store, b"b", "b", 2.0)
    c = add(store, b"c", "c", 3.0)
    store.set_pointers(b, a)
    store.begin_switch(c)
    assert store.current() == c
    # the agent dies here; the next start opens the store again
    again = ModelStore.open(str(tmp_path / "state"), keep=2)
    assert (again.current(), again.previous()) == (b, a)
    assert again.pending() is None
    assert "not confirmed" in again.get(c).manifest["rolled_back_reason"]


def test_prune_keeps_current_previous_and_newest(store):
    shas = [add(store, f"m{i}".encode(), f"m{i}", float(i)) for i in range(5)]
    store.set_pointers(shas[0], shas[1])  # the two oldest are in use
    removed = store.prune(keep=3)
    assert sorted(removed) == sorted(shas[2:4])
    assert {e.sha256 for e in store.entries()} == {shas[0], shas[1], shas[4]}
    assert store.prune(keep=1) == [shas[4]]
    assert {e.sha256 for e in store.entries()} == {shas[0], shas[1]}  # never below current+previous


def test_recover_removes_half_written_and_corrupt(store):
    a = add(store, b"good", "good", 1.0)
    b = add(store, b"other", "other", 2.0)
    store.set_pointers(b, a)
    (store.root / ".incoming-dep1.abc.part").write_bytes(b"half a transfer")
    (store.root / ".tmp-current.xyz").write_bytes(b"half a pointer")
    orphan = hashlib.sha256(b"orphan").hexdigest()
    (store.root / f"{orphan}.tflite").write_bytes(b"orphan")  # placed, manifest never written
    lonely = hashlib.sha256(b"lonely").hexdigest()
    (store.root / f"{lonely}.json").write_text("{}")
    (store.root / f"{b}.tflite").write_bytes(b"bit rot")  # the current model got corrupted
    actions = store.recover()
    assert len(actions) == 6, actions
    assert leftovers(store) == []
    assert {p.name for p in store.root.iterdir()} == {f"{a}.tflite", f"{a}.json", "current"}
    assert store.current() == a and store.previous() is None  # fell back to the intact one


def test_recover_unreadable_pointer_and_pending(store):
    a = add(store, b"a", "a", 1.0)
    store.set_pointers(a, None)
    (store.root / "previous").write_text("garbage")
    (store.root / "pending.json").write_text("{not json")
    actions = store.recover()
    assert any("pointer previous" in x for x in actions) and any("pending" in x for x in actions)
    assert not (store.root / "previous").exists() and not (store.root / "pending.json").exists()
    assert store.current() == a


def test_adopt_real_model(store):
    entry = store.adopt(str(DM05), {"name": "dm05", "source": f"config:{DM05}"})
    assert entry.sha256 == hashlib.sha256(DM05.read_bytes()).hexdigest()
    assert store.adopt(str(DM05), {"name": "again"}).name == "dm05"  # already there: kept as is
    assert leftovers(store) == []


def test_atomic_write_leaves_old_content_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "p"
    atomic_write(target, b"old")

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["p"]
