"""ravit.outputs: the one atomic-write path (a temporary file next to the target, renamed over it)."""

from __future__ import annotations

import json
import os
import stat

import pytest

from ravit import outputs
from ravit.outputs import atomic_open, write_bytes, write_json, write_text


def test_a_crash_mid_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = write_text(tmp_path / "result.txt", "old")
    with pytest.raises(RuntimeError, match="killed"), atomic_open(path, "w") as f:
        f.write("new, half-")
        f.flush()
        assert path.read_text() == "old" and len(list(tmp_path.iterdir())) == 2  # the new bytes go to a temp file
        raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.txt"]


def test_a_failing_rename_leaves_no_temp(tmp_path, monkeypatch):
    path = write_bytes(tmp_path / "a.bin", b"old")

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs.os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_bytes(path, b"new")
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_get_the_mode_open_gives(tmp_path, umask):
    old = os.umask(umask)
    try:
        written = write_bytes(tmp_path / "atomic.bin", b"x")
        with open(tmp_path / "plain.bin", "wb") as f:
            f.write(b"x")
    finally:
        os.umask(old)
    assert written.stat().st_mode & 0o777 == 0o666 & ~umask == (tmp_path / "plain.bin").stat().st_mode & 0o777


def test_parent_folders_are_created_and_json_is_indented(tmp_path):
    path = write_json(tmp_path / "a" / "b" / "r.json", {"top1": 91.5, "name": "fan"})
    assert path == tmp_path / "a" / "b" / "r.json"
    text = path.read_text()
    assert json.loads(text) == {"top1": 91.5, "name": "fan"} and text.endswith("}\n") and '\n  "top1"' in text


def test_text_is_utf8_without_newline_translation(tmp_path):
    path = write_text(tmp_path / "t.csv", "a,b\r\nä,ß\n")
    assert path.read_bytes() == "a,b\r\nä,ß\n".encode()


def test_fsync_flushes_the_data_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    synced = []
    real_fsync, real_replace = os.fsync, os.replace

    def spy_fsync(fd):
        info = os.fstat(fd)
        synced.append("folder" if stat.S_ISDIR(info.st_mode) else info.st_size)
        real_fsync(fd)

    def spy_replace(src, dst):
        synced.append("renamed")
        real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "fsync", spy_fsync)
    monkeypatch.setattr(outputs.os, "replace", spy_replace)
    with atomic_open(tmp_path / "c.pth", "wb", fsync=True) as f:
        f.write(b"12345")
    assert synced == [5, "renamed", "folder"], "data synced, renamed, then the rename made durable"
    synced.clear()
    write_bytes(tmp_path / "d.bin", b"1")
    assert synced == ["renamed"]


def test_only_whole_file_modes(tmp_path):
    with pytest.raises(ValueError, match="mode 'wb' or 'w'"), atomic_open(tmp_path / "x", "a"):
        pass
    assert list(tmp_path.iterdir()) == []
