"""`dump` previews a pickled value only in a store that is the current
user's, or with --trust: loading a pickle runs code. A pickle planted in
someone else's store is not loaded (its code does not run) and the preview
says why."""
from __future__ import annotations

import os

import pytest

from runtime_helpers import flowmagic, flowmagic_json, write_notebook
from flowmagic.store import open_store
from flowmagic.store.serializers import save_artifact

NOBODY = 65534


class _Payload:
    """Unpickling this writes a file: proof that code ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _store_with_a_pickle(tmp_path):
    store = tmp_path / "store"
    nb = write_notebook(tmp_path / "pickled.ipynb", [
        "%%step start\nfrom fractions import Fraction\nvalue = {Fraction(1, 3): 'a third'}\nn = 3"])
    flowmagic_json("run", nb, store=store)
    return nb, store


def test_your_own_store_previews_pickles(tmp_path):
    nb, store = _store_with_a_pickle(tmp_path)
    text = flowmagic("dump", nb, "1/start", store=store).stdout
    assert "Fraction(1, 3)" in text and "not loaded" not in text


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs chown to another user")
def test_someone_elses_store_does_not_load_a_planted_pickle_unless_trusted(tmp_path):
    nb, store = _store_with_a_pickle(tmp_path)
    s = open_store(store)
    try:
        [ref] = [r for t in s.meta.tasks("Pickled", 1) for r in s.meta.artifacts(t.task_id) if r.name == "value"]
        assert ref.serializer == "pickle"
        path = s.objects.path(ref.hash)
        ran = tmp_path / "code-ran"
        planted = save_artifact(s.objects, "value", _Payload(str(ran)))   # the store's own framing
        evil = s.objects.get_bytes(planted.hash)
    finally:
        s.close()
    # An attacker with write access replaces the object (the hash check is theirs to fake: skip it here).
    os.chmod(path, 0o644)
    path.write_bytes(evil)
    for p in (store, path):
        os.chown(p, NOBODY, NOBODY)

    env_skip = {"FLOWMAGIC_VERIFY_OBJECTS": "0"}
    text = _dump(nb, store, env_skip)
    assert "value" in text and "not loaded: the store belongs to user" in text and "--trust" in text
    assert "3" in text   # the inline value is still shown
    assert not ran.exists()

    os.chown(store, os.getuid(), os.getgid())   # a store of yours holding a foreign object: still refused
    assert "not loaded: its object belongs to" in _dump(nb, store, env_skip)
    assert not ran.exists()

    _dump(nb, store, env_skip, "--trust")
    assert ran.exists()   # with --trust the pickle is loaded, and its code runs


def _dump(nb, store, env, *extra):
    import subprocess

    from runtime_helpers import command, env_for

    proc = subprocess.run([*command(), "dump", str(nb), "1/start", *extra], capture_output=True, text=True,
                          env={**env_for(store), **env}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout
