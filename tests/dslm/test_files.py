import pytest

from dslm.files import atomic_copy, atomic_path, atomic_write_text, holders, tmp_path


def test_a_folder_appears_only_when_complete_and_a_failed_write_leaves_nothing(tmp_path_factory):
    root = tmp_path_factory.mktemp("atomic")
    final = root / "export"
    tmp_path(final).mkdir()
    (tmp_path(final) / "stale").write_text("left by a crash")
    with atomic_path(final) as tmp:
        tmp.mkdir()  # the crash's leftover is gone: the block starts from nothing
        (tmp / "a").write_text("1")
        assert not final.exists()
    assert sorted(p.name for p in final.iterdir()) == ["a"] and not tmp_path(final).exists()

    with pytest.raises(RuntimeError), atomic_path(root / "other") as tmp:
        tmp.mkdir()
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in root.iterdir()) == ["export"]


def test_a_file_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "sub" / "f.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    atomic_copy(target, tmp_path / "copy.txt")
    assert (tmp_path / "copy.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.txt", "sub"]


def test_the_holders_of_a_file_are_the_processes_that_hold_it_open_or_mapped(shm_tmp, hold_open):
    opened, mapped, free, replaced = (shm_tmp / name for name in ("opened", "mapped", "free", "replaced"))
    for path in (opened, mapped, free, replaced):
        path.write_bytes(bytes(4096))
    by_descriptor, by_mapping = hold_open(opened), hold_open(mapped, "map")
    hold_open(replaced)
    replaced.unlink()
    replaced.write_bytes(bytes(4096))  # a new file of the same name: no process holds this one
    assert holders([opened, mapped, free, replaced]) == {opened: by_descriptor.pid, mapped: by_mapping.pid}
