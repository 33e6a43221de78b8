"""Hardened input handling: checkpoint writes that cannot leave a broken ``last``, checkpoints that cannot
run code, recipes and overrides that fail only with a recipe error, archives that cannot escape their
folder, a download that is checked before it is opened, and run dirs that fail before training."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import socket
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microtrain import CheckpointError, atomic_save, load_checkpoint
from microtrain.cli import main
from microtrain.errors import DataError, MicrotrainError
from microtrain.plugin_manager import create_plugin_manager
from microtrain.recipe import apply_overrides, dump_recipe, parse_recipe_text, resolve_recipe
from microtrain_plugins.data import cifar10
from microtrain_plugins.data.safe_archive import extract_tar_safely

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """In-process runs set torch's thread count and determinism: put them back afterwards."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def small_checkpoint() -> dict:
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    return {"format": 1, "epoch": 1, "batch_index": 0, "step": 4, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "history": [{"epoch": 1, "test_acc": 50.0}], "plugins": {}}


# ---------------------------------------------------------------- checkpoint writes


@pytest.fixture
def good_last(tmp_path) -> Path:
    path = tmp_path / "checkpoints" / "last.pt"
    atomic_save(small_checkpoint(), path)
    return path


def cut_writer(cut: int, error: BaseException):
    """A torch.save that writes the first ``cut`` bytes of the real file, then fails like a crash or a full disk."""
    real = torch.save

    def save(obj, handle, *args, **kwargs):
        buffer = io.BytesIO()
        real(obj, buffer, *args, **kwargs)
        handle.write(buffer.getvalue()[:cut])
        handle.flush()
        raise error

    return save


@pytest.mark.parametrize("cut", [0, 1, 100, 1000, -1])
@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_interrupted_write_never_replaces_good_last(good_last, monkeypatch, cut, error):
    before = good_last.read_bytes()
    newer = small_checkpoint() | {"epoch": 2}
    size = len(before)
    monkeypatch.setattr(torch, "save", cut_writer(size + cut if cut < 0 else cut, error))
    if isinstance(error, OSError):
        with pytest.raises(CheckpointError) as info:
            atomic_save(newer, good_last)
        message = str(info.value)
        assert "\n" not in message and str(good_last) in message and "No space left on device" in message
    else:
        with pytest.raises(KeyboardInterrupt):
            atomic_save(newer, good_last)
    monkeypatch.undo()
    assert good_last.read_bytes() == before
    assert load_checkpoint(good_last)["epoch"] == 1
    assert os.listdir(good_last.parent) == ["last.pt"]  # the temporary file is gone


def test_rename_is_the_commit_point_and_happens_only_on_a_complete_file(good_last, monkeypatch):
    """The new file is renamed over ``last`` from the same folder (one filesystem, so the rename is atomic) and
    only once it is complete and on disk; if the rename fails, the old file is what remains."""
    real_replace, seen = os.replace, []

    def checking_replace(src, dst):
        seen.append(Path(src).parent == Path(dst).parent)
        assert load_checkpoint(Path(src))["epoch"] == 2  # complete before it becomes ``last``
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", checking_replace)
    atomic_save(small_checkpoint() | {"epoch": 2}, good_last)
    assert seen == [True] and load_checkpoint(good_last)["epoch"] == 2

    def failing_replace(*_):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(CheckpointError, match="Input/output error"):
        atomic_save(small_checkpoint() | {"epoch": 3}, good_last)
    assert load_checkpoint(good_last)["epoch"] == 2
    assert os.listdir(good_last.parent) == ["last.pt"]


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("ckpt") / "whole.pt"
    atomic_save(small_checkpoint(), path)
    return path.read_bytes()


@FUZZ
@given(data=st.data())
def test_a_truncated_checkpoint_is_refused_in_one_line_naming_it(checkpoint_bytes, tmp_path_factory, data):
    cut = data.draw(st.integers(0, len(checkpoint_bytes) - 1), label="cut")
    path = tmp_path_factory.mktemp("cut") / "last.pt"
    path.write_bytes(checkpoint_bytes[:cut])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------- checkpoints never run code


class Payload:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",))


@pytest.mark.parametrize("style", ["zip", "legacy", "raw-pickle"])
def test_pickle_carrying_checkpoint_is_refused_and_never_runs(tmp_path, style):
    marker, path = tmp_path / "marker", tmp_path / "last.pt"
    checkpoint = {"format": 1, "model": {}, "epoch": 1, "evil": Payload(marker)}
    if style == "raw-pickle":
        path.write_bytes(pickle.dumps(checkpoint, protocol=2))
    else:
        torch.save(checkpoint, path, _use_new_zipfile_serialization=style == "zip")
    with pytest.raises(CheckpointError, match="corrupt or unsafe"):
        load_checkpoint(path)
    assert not marker.exists()
    if style == "raw-pickle":  # the payload is live: plain unpickling would have run it
        pickle.loads(path.read_bytes())
        assert marker.read_text() == "code ran"


# ---------------------------------------------------------------- recipes and overrides (hypothesis)

REGISTRY = create_plugin_manager()[1]
BASE = {"name": "fuzz", "epochs": 1, "data": {"name": "synthetic"}, "model": {"name": "dsconv"},
        "loader": {"name": "albumentations"}, "optimizer": {"name": "sgd"}, "schedule": {"name": "onecycle"},
        "plugins": ["metrics", "checkpoint"]}
SCALARS = st.none() | st.booleans() | st.integers(-3, 10**12) | st.floats(allow_nan=True) | st.text(max_size=12)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                             max_size=3), max_leaves=6)
FIELDS = sorted({*BASE, "seed", "device", "threads", "precision", "channels_last", "compile", "deterministic",
                 "label_smoothing", "grad_clip", "sync_batchnorm", "bogus"})
OPTION_NAMES = sorted({"name", "bogus", *(o for kind in REGISTRY.all().values() for c in kind.values() for o in c.options)})
SECTIONS = st.dictionaries(st.sampled_from(OPTION_NAMES), VALUES, max_size=4)
KEYS = st.sampled_from([*FIELDS, *(f"{s}.{o}" for s in ("data", "model", "loader", "optimizer", "schedule")
                                   for o in ("name", "batch_size", "lr", "bogus", "augment", "workers"))])


def check_resolves_or_recipe_error(raw, from_cli=None, original=None) -> None:
    """Either a recipe error with a message, or a valid recipe: one that saves and reloads as itself."""
    try:
        recipe = resolve_recipe(raw, REGISTRY, from_cli, original)
    except MicrotrainError as exc:
        assert str(exc).strip()
        return
    again = resolve_recipe(parse_recipe_text(dump_recipe(recipe)), REGISTRY)
    assert json.dumps(again, sort_keys=True) == json.dumps(recipe, sort_keys=True)


@FUZZ
@given(st.text(max_size=300))
def test_any_recipe_text_parses_or_fails_with_a_recipe_error(text):
    try:
        raw = parse_recipe_text(text)
    except MicrotrainError as exc:
        assert str(exc).strip()
        return
    assert isinstance(raw, dict)
    check_resolves_or_recipe_error(raw)


@pytest.mark.parametrize("text", ["a: 2001-02-30", "a: !!bool maybe", "a: !!timestamp 1", "a: !!int x", "[" * 1500,
                                  "a: !!python/object/apply:os.system [echo]", "? [a]\n: b", "\x00"])
def test_yaml_values_pyyaml_cannot_build_are_recipe_errors(text):
    with pytest.raises(MicrotrainError, match="malformed YAML"):
        parse_recipe_text(text)


@FUZZ
@given(st.dictionaries(st.sampled_from(FIELDS), VALUES | SECTIONS, max_size=6))
def test_any_recipe_structure_resolves_or_fails_with_a_recipe_error(changes):
    check_resolves_or_recipe_error({**BASE, **changes})


@FUZZ
@given(st.lists(st.one_of(st.text(max_size=40), st.builds(lambda k, v: f"{k}={v}", KEYS, st.text(max_size=20))), max_size=4))
def test_any_override_applies_or_fails_with_a_recipe_error(overrides):
    try:
        raw, from_cli = apply_overrides(BASE, overrides)
    except MicrotrainError as exc:
        assert str(exc).strip()
        return
    check_resolves_or_recipe_error(raw, from_cli, BASE)


@pytest.mark.parametrize("name", ["", "../escape", "/abs", "a/b", ".", "..", "a\\b"])
def test_recipe_name_cannot_point_a_run_dir_elsewhere(name):
    with pytest.raises(MicrotrainError, match="cannot be a folder name"):
        resolve_recipe({**BASE, "name": name}, REGISTRY)


# ---------------------------------------------------------------- archives


def make_tar(path: Path, members: list[tarfile.TarInfo], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as archive:
        for info in members:
            data = b"payload" if info.isfile() else None
            if data is not None:
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


MALICIOUS = {
    "parent traversal": [entry("../evil.txt")],
    "nested traversal": [entry("ok/../../evil.txt")],
    "absolute path": [entry("/tmp/microtrain-evil-absolute.txt")],
    "symlink out": [entry("link", tarfile.SYMTYPE, "../outside")],
    "absolute symlink": [entry("link", tarfile.SYMTYPE, "/etc")],
    "write through symlinked dir": [entry("d", tarfile.SYMTYPE, ".."), entry("d/evil.txt")],
    "symlink chain": [entry("d", tarfile.SYMTYPE, "."), entry("x", tarfile.SYMTYPE, "d/.."), entry("x/evil.txt")],
    "hard link out": [entry("h", tarfile.LNKTYPE, "../outside.txt")],
    "device file": [entry("dev", tarfile.CHRTYPE)],
}


@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_malicious_archive_is_refused_and_nothing_escapes(tmp_path, case):
    sandbox = tmp_path / "sandbox"
    target = sandbox / "inner" / "target"
    target.mkdir(parents=True)
    (sandbox / "outside.txt").write_text("secret")
    archive = make_tar(tmp_path / "evil.tar.gz", MALICIOUS[case], "w:gz")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(DataError, match="refusing archive member"):
        extract_tar_safely(archive, target)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written at all
    assert not Path("/tmp/microtrain-evil-absolute.txt").exists()


def test_benign_archive_with_inner_link_extracts(tmp_path):
    archive = make_tar(tmp_path / "ok.tar", [entry("a", tarfile.DIRTYPE), entry("a/x.txt"),
                                             entry("a/y.txt", tarfile.SYMTYPE, "x.txt")])
    extract_tar_safely(archive, tmp_path / "out")
    assert (tmp_path / "out" / "a" / "y.txt").read_text() == "payload"


def test_corrupt_archive_is_one_data_error(tmp_path):
    archive = tmp_path / "broken.tar.gz"
    archive.write_bytes(b"\x1f\x8b\x08not really gzip")
    with pytest.raises(DataError, match="corrupt"):
        extract_tar_safely(archive, tmp_path / "out")


# ---------------------------------------------------------------- the CIFAR-10 download path


def tiny_cifar_archive(folder: Path, records: int = 10, extra: list[tarfile.TarInfo] = ()) -> tuple[str, str]:
    """A tar.gz of ``cifar-10-batches-bin/`` with ``records`` images per batch file; returns (file:// URL, MD5)."""
    source = folder / "src" / cifar10.FOLDER
    source.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [*cifar10.TRAIN_FILES, cifar10.TEST_FILE]:
        labels = (np.arange(records) % 10)[:, None]
        np.concatenate([labels, rng.integers(0, 256, (records, 3072))], axis=1).astype(np.uint8).tofile(source / name)
    archive = folder / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname=cifar10.FOLDER)
        for info in extra:
            tar.addfile(info, io.BytesIO(b"payload"))
    return archive.resolve().as_uri(), hashlib.md5(archive.read_bytes()).hexdigest()


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_download_is_checked_then_extracted(tmp_path):
    url, md5 = tiny_cifar_archive(tmp_path)
    root = tmp_path / "data"
    data = cifar10.build_cifar10(root=str(root), url=url, archive_md5=md5, verify=False)
    assert data.train_images.shape == (50, 32, 32, 3) and data.test_images.shape == (10, 32, 32, 3)
    assert leftovers(root) == [cifar10.FOLDER]  # the archive and temporary folder are gone
    again = cifar10.build_cifar10(root=str(root), url="file:///nowhere", archive_md5="0", verify=False)
    assert np.array_equal(again.train_images, data.train_images)  # found on disk: no second download


def test_wrong_checksum_extracts_nothing(tmp_path):
    url, md5 = tiny_cifar_archive(tmp_path)
    root = tmp_path / "data"
    with pytest.raises(DataError, match="checksum mismatch") as info:
        cifar10.build_cifar10(root=str(root), url=url, archive_md5="0" * 32, verify=False)
    assert "nothing was extracted" in str(info.value)
    assert leftovers(root) == []


def test_unreachable_source_says_where_it_looked(tmp_path):
    root = tmp_path / "data"
    url = (tmp_path / "offline" / "cifar-10-binary.tar.gz").as_uri()
    with pytest.raises(DataError) as info:
        cifar10.build_cifar10(root=str(root), url=url, verify=False)
    message = str(info.value)
    assert str(root / cifar10.FOLDER) in message and url in message and "data.root" in message
    assert leftovers(root) == []


def test_download_cut_short_is_one_data_error(tmp_path):
    """An HTTP body shorter than its Content-Length (a dropped connection) is a clear error, not a traceback."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve():
        connection, _ = server.accept()
        connection.recv(65536)
        connection.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10)
        connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}/cifar-10-binary.tar.gz"
    try:
        with pytest.raises(DataError, match="failed .*closed after 10 of 100000 bytes"):
            cifar10.build_cifar10(root=str(tmp_path / "data"), url=url, verify=False)
    finally:
        thread.join(5)
        server.close()
    assert leftovers(tmp_path / "data") == []


def test_tampered_archive_with_matching_checksum_still_cannot_escape(tmp_path):
    url, md5 = tiny_cifar_archive(tmp_path, extra=[entry("../../escaped.txt")])
    root = tmp_path / "data"
    with pytest.raises(DataError, match="refusing archive member"):
        cifar10.build_cifar10(root=str(root), url=url, archive_md5=md5, verify=False)
    assert not list(tmp_path.rglob("escaped.txt"))
    assert leftovers(root) == []


def test_files_that_are_not_the_official_ones_fail_verification(tmp_path):
    url, md5 = tiny_cifar_archive(tmp_path)
    with pytest.raises(DataError, match="checksum mismatch for .*SHA-256"):
        cifar10.build_cifar10(root=str(tmp_path / "data"), url=url, archive_md5=md5, verify=True)


def test_an_incomplete_data_folder_is_reported_not_deleted(tmp_path):
    folder = tmp_path / "data" / cifar10.FOLDER
    folder.mkdir(parents=True)
    (folder / "data_batch_1.bin").write_bytes(b"mine")
    with pytest.raises(DataError, match="incomplete .*data_batch_2.bin"):
        cifar10.build_cifar10(root=str(tmp_path / "data"), url="file:///nowhere", verify=False)
    assert (folder / "data_batch_1.bin").read_bytes() == b"mine"


# ---------------------------------------------------------------- run dirs (in-process CLI runs)

TINY = {"name": "hard", "epochs": 1, "device": "cpu", "threads": 1, "deterministic": True,
        "data": {"name": "synthetic", "train_size": 128, "test_size": 64, "image_size": 16},
        "model": {"name": "dsconv", "width": 0.5},
        "loader": {"name": "albumentations", "batch_size": 64, "workers": 0},
        "optimizer": {"name": "sgd", "lr": 0.05}, "schedule": {"name": "constant"},
        "plugins": ["metrics", {"checkpoint": {"every_steps": 1}}]}


@pytest.fixture
def tiny(tmp_path) -> Path:
    path = tmp_path / "hard.yaml"
    path.write_text(yaml.safe_dump(TINY, sort_keys=False))
    return path


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_cifar10_download_options_work_from_the_command_line(tmp_path, tiny, capsys):
    url, md5 = tiny_cifar_archive(tmp_path)
    run_dir = tmp_path / "run"
    assert main(["run", str(tiny), "data.name=cifar10", f"data.root={tmp_path / 'data'}", f"data.url={url}",
                 f"data.archive_md5={md5}", "data.verify=false", "loader.batch_size=25", "--run-dir", str(run_dir)]) == 0
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    assert main(["run", str(tiny), "data.name=cifar10", f"data.root={tmp_path / 'data2'}", f"data.url={url}",
                 "data.archive_md5=deadbeef", "data.verify=false", "--run-dir", str(tmp_path / "run2")]) == 2
    assert "checksum mismatch" in one_error_line(capsys)


def test_unwritable_run_dir_fails_before_training(tmp_path, tiny, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["run", str(tiny), "--run-dir", str(blocker / "run")]) == 2
    assert "is not writable" in one_error_line(capsys)


def test_too_little_disk_space_fails_before_training(tmp_path, tiny, monkeypatch, capsys):
    import shutil

    from microtrain_plugins.callbacks import checkpointing

    run_dir = tmp_path / "run"
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(1 << 30, 1 << 30, 1000))
    assert main(["run", str(tiny), "--run-dir", str(run_dir)]) == 2
    assert "MiB free but the checkpoints need about" in one_error_line(capsys)
    assert json.loads((run_dir / "status.json").read_text())["status"] == "failed"
    assert not (run_dir / "checkpoints" / "last.pt").exists()
    assert not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text()  # no epoch ran


def test_disk_full_during_training_keeps_last_and_says_so(tmp_path, tiny, monkeypatch, capsys):
    run_dir, real, calls = tmp_path / "run", torch.save, []

    def save(obj, handle, *args, **kwargs):  # the second checkpoint write finds the disk full half-way
        calls.append(1)
        if len(calls) == 2:
            cut_writer(500, OSError(errno.ENOSPC, "No space left on device"))(obj, handle, *args, **kwargs)
        return real(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    assert main(["run", str(tiny), "--run-dir", str(run_dir)]) == 2
    line = one_error_line(capsys)
    assert "No space left on device" in line and "best.pt" in line  # step 1's last.pt, then epoch 1's best.pt
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["batch_index"] == 1
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["last.pt"]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "failed"


def test_resume_with_changed_recipe_is_refused_naming_fields(tmp_path, tiny, capsys):
    from microtrain.assembly import prepare_recipe

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text(dump_recipe(prepare_recipe(tiny, [])[0]))
    assert main(["run", str(tiny), "epochs=3", "loader.batch_size=32", "--resume", str(run_dir)]) == 2
    line = one_error_line(capsys)
    assert "differs" in line and "epochs" in line and "loader.batch_size" in line and "--force" in line
    assert not (run_dir / "status.json").exists()  # refused before anything was written
