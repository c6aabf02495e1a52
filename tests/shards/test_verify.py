import shutil
import subprocess
import sys
import tarfile

from dslm_shards.verify import count_samples, verify_build


def copy_build(tiny_shards, tmp_path):
    src, manifest = tiny_shards
    out = tmp_path / "build"
    shutil.copytree(src, out)
    return out, manifest


def cut_after_member(path, keep):
    """Truncate a tar right after its `keep`-th member: tarfile still reads it without error."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    last = members[keep - 1]
    end = last.offset_data + (last.size + 511) // 512 * 512
    with open(path, "r+b") as f:
        f.truncate(end)


def test_intact_build_verifies(tiny_shards):
    out, _ = tiny_shards
    assert verify_build(out) == []


def test_truncated_corrupted_and_missing_shards_are_named(tiny_shards, tmp_path):
    out, manifest = copy_build(tiny_shards, tmp_path)
    train = manifest.split("train")
    cut_after_member(out / train[0].name, keep=20)  # 10 samples of 2 members (tokens, language)
    assert count_samples(out / train[0].name) == 10  # reads "fine": only the count reveals it
    with open(out / train[1].name, "r+b") as f:
        f.seek(2000)
        f.write(b"\xff")
    (out / manifest.split("val")[0].name).unlink()
    problems = verify_build(out)
    assert len(problems) == 3
    assert problems[0].startswith(f"{train[0].name}: ")
    assert problems[1] == f"{train[1].name}: sha256 differs from the manifest"
    assert problems[2] == f"{manifest.split('val')[0].name}: missing"


def test_verify_cli_exit_status(tiny_shards, tmp_path):
    out, manifest = copy_build(tiny_shards, tmp_path)
    ok = subprocess.run([sys.executable, "-m", "dslm_shards.cli", "verify", str(out)], capture_output=True, text=True)
    assert ok.returncode == 0 and "match the manifest" in ok.stdout
    name = manifest.split("train")[0].name
    cut_after_member(out / name, keep=2)
    bad = subprocess.run([sys.executable, "-m", "dslm_shards.cli", "verify", str(out)], capture_output=True, text=True)
    assert bad.returncode == 2 and f"BAD {name}:" in bad.stdout
    assert bad.stderr.strip().count("\n") == 0 and "do not match" in bad.stderr


def test_inspect_prints_stats_and_samples(tiny_shards):
    out, manifest = tiny_shards
    proc = subprocess.run(
        [sys.executable, "-m", "dslm_shards.cli", "inspect", str(out), "--show", "1"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "tokens/byte" in proc.stdout and "--- sample 0\n<bos>" in proc.stdout
