import errno
from pathlib import Path

from dslm.checkpoint.save import OUT_OF_SPACE, KeptWrites


class Inner:
    zipfile_serialization = True


def kept_error(raise_it, folder: Path) -> KeptWrites:
    writes = KeptWrites(Inner())
    with writes.kept(folder / "mp_rank_00_model_states.pt"):
        raise_it()
    return writes


def test_a_full_disk_is_named_with_the_space_left(tmp_path):
    def full():
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 4288 vs 4180") from e

    writes = kept_error(full, tmp_path)
    assert writes.out_of_space
    assert writes.error.startswith("writing mp_rank_00_model_states.pt: [Errno 28] No space left on device (")
    assert "bytes free" in writes.error


def test_a_write_that_fails_for_another_reason_names_that_reason_and_not_space(tmp_path):
    """Issue 27: a stop signal to the process group killed the loader's workers in the middle of a
    save; the SIGCHLD handler's error broke torch's writer ("unexpected pos"), which was reported as a
    full disk with 77 GB free."""

    def interrupted():
        try:
            raise RuntimeError("DataLoader worker (pid 123) is killed by signal: Terminated.")
        except RuntimeError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 4288 vs 4180")

    writes = kept_error(interrupted, tmp_path)
    assert not writes.out_of_space
    assert writes.error == (
        "writing mp_rank_00_model_states.pt: RuntimeError: DataLoader worker (pid 123) is killed by signal: Terminated."
    )
    io = kept_error(lambda: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")), tmp_path)
    assert not io.out_of_space and io.error.endswith("[Errno 5] Input/output error")


def test_every_space_errno_counts_as_out_of_space(tmp_path):
    for code in OUT_OF_SPACE:
        writes = kept_error(lambda: (_ for _ in ()).throw(OSError(code, "full")), tmp_path)
        assert writes.out_of_space and writes.error.endswith("bytes free)"), writes.error
