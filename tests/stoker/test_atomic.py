"""The atomic-write helper every package uses: whole files or nothing, never a stray temp."""

import json
import multiprocessing

import pytest

from stoker.atomic import atomic_file, write_json, write_text


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    write_json(target, {"epoch": 1})
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text('{"epoch": 2, "trunc')
        raise RuntimeError("crashed half way")
    assert json.loads(target.read_text()) == {"epoch": 1}
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]


def test_suffix_lets_writers_pick_the_format_by_extension(tmp_path):
    with atomic_file(tmp_path / "plot.png", suffix=".png") as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path
        tmp.write_bytes(b"\x89PNG")
    assert (tmp_path / "plot.png").read_bytes() == b"\x89PNG"


def _writer(path: str, index: int) -> None:
    for _ in range(200):
        write_text(path, f"{index}\n" * 1000)


def test_concurrent_writers_never_show_a_reader_a_mixed_file(tmp_path):
    target = tmp_path / "shared.txt"
    write_text(target, "0\n" * 1000)
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_writer, args=(str(target), i)) for i in (1, 2)]
    for writer in writers:
        writer.start()
    seen = set()
    while any(w.is_alive() for w in writers):
        lines = target.read_text().splitlines()
        assert len(lines) == 1000 and len(set(lines)) == 1
        seen.add(lines[0])
    for writer in writers:
        writer.join()
    assert not [p for p in tmp_path.iterdir() if p.name != "shared.txt"]


def test_a_directory_appears_whole_and_a_failed_one_leaves_the_old(tmp_path):
    import pytest

    from stoker.atomic import atomic_directory

    target = tmp_path / "out"
    with atomic_directory(target) as staging:
        (staging / "a.txt").write_text("first")
        assert not target.exists()  # nothing at the target until the block ends
    assert (target / "a.txt").read_text() == "first"
    with pytest.raises(RuntimeError), atomic_directory(target) as staging:
        (staging / "b.txt").write_text("half")
        raise RuntimeError("stopped half way")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    with atomic_directory(target) as staging:
        (staging / "c.txt").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["c.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or moved-aside copy left
