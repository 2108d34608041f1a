"""agent.ota.model_store: install/activate/rollback and crash safety via an injected fault hook."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.atomic import StateFileError
from agent.ota.model_store import ModelStore, StoreError, verify_installed
from protocol import encode_manifest
from tests.bundle_factory import blazeface_manifest, with_files


class Crash(Exception):
    pass


def make_bundle_dir(parent: Path, version: str) -> Path:
    files = {"blazeface-short-int8.tflite": f"model {version}".encode() * 100}
    manifest = with_files(blazeface_manifest(version=version), files)
    folder = parent / f"extracted-{version}"
    folder.mkdir()
    (folder / "manifest.json").write_bytes(encode_manifest(manifest))
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def version_of(manifest_path: Path | None) -> str | None:
    if manifest_path is None:
        return None
    return str(verify_installed(manifest_path.parent).version)


def install_and_activate(store: ModelStore, tmp_path: Path, version: str) -> Path:
    return store.activate("cam", store.install("cam", make_bundle_dir(tmp_path, version)))


def test_activate_makes_new_current_and_old_previous(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    assert store.current("cam") is None and store.previous("cam") is None
    install_and_activate(store, tmp_path, "1.0.0")
    assert version_of(store.current("cam")) == "1.0.0"
    assert store.previous("cam") is None
    install_and_activate(store, tmp_path, "2.0.0")
    assert version_of(store.current("cam")) == "2.0.0"
    assert version_of(store.previous("cam")) == "1.0.0"
    state = json.loads((tmp_path / "store" / "cam" / "state.json").read_text())
    assert state["schema"] == 1
    assert store.streams() == ["cam"]


def test_only_current_and_previous_are_kept(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    for version in ("1.0.0", "2.0.0", "3.0.0"):
        install_and_activate(store, tmp_path, version)
    slots = sorted(p.name for p in (tmp_path / "store" / "cam").iterdir() if p.is_dir())
    assert len(slots) == 2
    assert version_of(store.previous("cam")) == "2.0.0"


def test_rollback_swaps_back_to_previous(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    install_and_activate(store, tmp_path, "1.0.0")
    install_and_activate(store, tmp_path, "2.0.0")
    path = store.rollback("cam")
    assert version_of(path) == "1.0.0"
    assert version_of(store.current("cam")) == "1.0.0"
    assert version_of(store.previous("cam")) == "2.0.0"
    reopened = ModelStore(tmp_path / "store")
    assert version_of(reopened.current("cam")) == "1.0.0"


def test_rollback_without_previous_is_an_error(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    install_and_activate(store, tmp_path, "1.0.0")
    with pytest.raises(StoreError) as info:
        store.rollback("cam")
    assert info.value.reason == "no_previous"


def test_install_rejects_a_bundle_dir_that_does_not_match_its_manifest(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    folder = make_bundle_dir(tmp_path, "1.0.0")
    (folder / "blazeface-short-int8.tflite").write_bytes(b"truncated")
    with pytest.raises(StoreError) as info:
        store.install("cam", folder)
    assert info.value.reason == "install_invalid"
    assert not any(p.name.startswith("staging-") for p in (tmp_path / "store" / "cam").iterdir())


def test_install_with_move_takes_the_extracted_dir(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    folder = make_bundle_dir(tmp_path, "1.0.0")
    staged = store.install("cam", folder, move=True)
    assert not folder.exists() and staged.name == "staging-blazeface-short-int8@1.0.0"


def test_bad_stream_name_is_rejected(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    with pytest.raises(StoreError) as info:
        store.install("../etc", make_bundle_dir(tmp_path, "1.0.0"))
    assert info.value.reason == "bad_stream"


def test_corrupt_state_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "store" / "cam").mkdir(parents=True)
    (tmp_path / "store" / "cam" / "state.json").write_text("{nope")
    with pytest.raises(StateFileError, match="model store state"):
        ModelStore(tmp_path / "store")


@pytest.mark.parametrize("step", ["copied", "staged", "renamed", "state_written", "cleaned"])
def test_crash_at_any_step_leaves_a_complete_current_and_no_garbage(
    tmp_path: Path, step: str
) -> None:
    root = tmp_path / "store"
    store = ModelStore(root)
    install_and_activate(store, tmp_path, "1.0.0")
    install_and_activate(store, tmp_path, "2.0.0")

    def fault(at: str) -> None:
        if at == step:
            raise Crash(at)

    crashing = ModelStore(root, fault=fault)
    with pytest.raises(Crash):
        install_and_activate(crashing, tmp_path, "3.0.0")

    reopened = ModelStore(root)
    current = version_of(reopened.current("cam"))
    expected_new = step in ("state_written", "cleaned")
    assert current == ("3.0.0" if expected_new else "2.0.0")
    assert version_of(reopened.previous("cam")) == ("2.0.0" if expected_new else "1.0.0")
    entries = sorted(p.name for p in (root / "cam").iterdir())
    assert len(entries) == 3 and "state.json" in entries  # two slots, nothing else
    (tmp_path / "again").mkdir()
    install_and_activate(reopened, tmp_path / "again", "4.0.0")
    assert version_of(reopened.current("cam")) == "4.0.0"


def test_crash_during_rollback_state_write_keeps_a_valid_current(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = ModelStore(root)
    install_and_activate(store, tmp_path, "1.0.0")
    install_and_activate(store, tmp_path, "2.0.0")

    def fault(at: str) -> None:
        raise Crash(at)

    with pytest.raises(Crash):
        ModelStore(root, fault=fault).rollback("cam")
    assert version_of(ModelStore(root).current("cam")) == "1.0.0"


def test_leftovers_of_interrupted_installs_are_removed_on_open(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = ModelStore(root)
    install_and_activate(store, tmp_path, "1.0.0")
    folder = root / "cam"
    (folder / ".staging-dead.tmp").mkdir()
    (folder / ".staging-dead.tmp" / "half.tflite").write_bytes(b"half")
    (folder / "staging-x@9").mkdir()
    (folder / "slot-orphan-1234").mkdir()
    (folder / ".state.json.abcd.tmp").write_text("{}")
    reopened = ModelStore(root)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["state.json", reopened.current("cam").parent.name]  # type: ignore[union-attr]
    )
    assert version_of(reopened.current("cam")) == "1.0.0"


def test_revert_goes_back_to_the_baseline_and_forth(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    with pytest.raises(StoreError) as info:
        store.revert("cam")
    assert info.value.reason == "no_previous"
    install_and_activate(store, tmp_path, "1.0.0")
    slot = store.slots("cam")[0]
    assert slot is not None and store.slots("cam")[1] is None
    assert store.revert("cam") is None  # previous None = the baseline
    assert store.slots("cam") == (None, slot)
    assert store.current("cam") is None and version_of(store.previous("cam")) == "1.0.0"
    assert version_of(store.revert("cam")) == "1.0.0"
    assert store.slots("cam") == (slot, None)
    # Survives a reopen (nothing referenced is cleaned away).
    assert ModelStore(tmp_path / "store").slots("cam") == (slot, None)


def test_deactivate_keeps_the_current_as_previous_and_drops_the_old_previous(
    tmp_path: Path,
) -> None:
    store = ModelStore(tmp_path / "store")
    install_and_activate(store, tmp_path, "1.0.0")
    install_and_activate(store, tmp_path, "2.0.0")
    store.deactivate("cam")
    assert store.current("cam") is None
    assert version_of(store.previous("cam")) == "2.0.0"
    slots = [p for p in (tmp_path / "store" / "cam").iterdir() if p.is_dir()]
    assert len(slots) == 1  # 1.0.0 is gone
    store.deactivate("cam")  # already on the baseline: a no-op
    assert version_of(store.previous("cam")) == "2.0.0"


def test_discard_removes_a_staged_install_only(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    install_and_activate(store, tmp_path, "1.0.0")
    (tmp_path / "b").mkdir()
    staged = store.install("cam", make_bundle_dir(tmp_path / "b", "2.0.0"))
    current = store.current("cam")
    assert current is not None
    store.discard("cam", current.parent)  # not staged: left alone
    store.discard("cam", staged)
    assert not staged.exists() and current.exists()
