"""Atomic single-file writes (dtq_kernels.fileio): results, caches and reports are never left torn."""
import pytest

from dtq_kernels.fileio import replaced_atomically, write_atomically


def test_write_replaces_whole_file(tmp_path):
    target = tmp_path / "sub" / "report.json"
    write_atomically(target, "old")
    write_atomically(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in target.parent.iterdir()] == ["report.json"]  # no temporary left behind


def test_interrupted_write_keeps_old_content(tmp_path):
    target = tmp_path / "quality.md"
    target.write_text("the complete old report")
    with pytest.raises(KeyboardInterrupt):
        with replaced_atomically(target) as tmp:
            tmp.write_text("half of the new")
            raise KeyboardInterrupt
    assert target.read_text() == "the complete old report"
    assert [p.name for p in tmp_path.iterdir()] == ["quality.md"]


def test_temporary_keeps_the_suffix(tmp_path):
    # PIL and numpy choose the format from the suffix of the path they are given
    with replaced_atomically(tmp_path / "grid.png") as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path
        tmp.write_bytes(b"png")
    assert (tmp_path / "grid.png").read_bytes() == b"png"
