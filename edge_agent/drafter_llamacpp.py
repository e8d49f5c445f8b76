"""The draft model as a GGUF file run by llama.cpp (through llama-cpp-python), on the edge.

Same contract as :class:`edge_agent.drafter.Drafter` (reset, propose, extend, commit, rollback),
which keeps the sampling: q is ``logits_to_probs`` of llama.cpp's logits, sparsified and
quantized, and the edge samples from exactly that sparse q. Only the forward pass and the KV
rollback live here:

- ``Llama.eval`` feeds tokens after ``Llama.n_tokens`` and first removes every cached position
  from ``n_tokens`` on through llama.cpp's per-sequence memory removal (``llama_memory_seq_rm``).
  Rolling back is therefore setting ``n_tokens`` to the kept length before the next feed.
- The logits of the last fed position are read with ``llama_get_logits_ith(ctx, -1)``; the
  context is created without ``logits_all``, so no per-position logits buffer grows.
- Every llama.cpp call is a ``ctypes.CDLL`` call, which releases the GIL: while the draft runs
  ahead (pipelining), the thread waiting for the verdict keeps running.
- Resident memory (docs/BENCHMARKS.md §5.3). llama.cpp maps the GGUF and prefetches it: right
  after loading, every page of the file is resident, also those no forward reads (the source of
  the tensors repacked into llama.cpp's own buffer, the embedding rows of tokens not fed yet). On
  Linux the loader drops the file's pages from this process (``madvise(MADV_DONTNEED)`` of the
  read-only mapping; they stay in the page cache) and runs one warm-up forward, which maps back
  what a forward reads; an embedding row comes back when its token is first fed. The target's
  tokenizer is kept without the Python copies of its vocabulary and merges, and the heap its
  loading freed goes back to the system (``malloc_trim``). Weights, logits and drafts are the same.

One llama.cpp context holds one sequence. Drafters of concurrent generations share it under the
model lock; the one that used it last owns the cached positions, and another one re-feeds its
own sequence first (correct, only slower when generations interleave).

Tokens: the prompt is tokenized by the target's tokenizer (a transformers tokenizer, chat
template included); :func:`check_gguf_vocab` checks that every id means the same token text to
llama.cpp, so draft ids and target ids agree.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_agent.drafter import Drafter
from shared.errors import ModelLoadError, TokenizerMismatchError
from shared.memory import libc as _libc_handle
from shared.memory import trim_heap
from shared.models import tokenizer_fingerprint
from shared.sampling import DEFAULT_SPARSE_K

log = logging.getLogger(__name__)

BACKEND = "llama.cpp"
DEFAULT_N_CTX = 4096  # tokens (prompt + generation) the KV cache holds: ~48 MB for the 0.5B demo draft
INSTALL_HINT = (
    "the llama.cpp drafter needs llama-cpp-python: pip install 'spececd[llamacpp]' (see README, "
    "'Install'), or choose --draft-backend torch"
)


def import_llama_cpp() -> Any:
    """The ``llama_cpp`` module, or ``ModelLoadError`` saying how to install it."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise ModelLoadError("llama_cpp", ["import llama_cpp"], INSTALL_HINT) from exc
    return llama_cpp


def llama_cpp_available() -> bool:
    """True when llama-cpp-python can be imported."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class LlamaCppDraft:
    """A GGUF draft model loaded by llama.cpp, with the target's tokenizer.

    Quacks like ``shared.models.LoadedModel`` where the edge and the bench read it
    (``tokenizer``, ``name``, ``vocab_size``, ``eos_token_ids``, ``tokenizer_fingerprint``)."""

    llama: Any  # llama_cpp.Llama, created with logits_all=False
    tokenizer: Any  # transformers tokenizer of the target (or the GGUF's own)
    name: str
    source: str  # the GGUF path
    threads: int
    n_ctx: int
    eos_ids: frozenset[int]
    tokenizer_source: str  # where the tokenizer came from
    owner: Any = field(default=None, repr=False)  # the drafter whose sequence the KV cache holds
    backend: str = BACKEND

    @property
    def model(self) -> None:
        """No torch module: code that needs one (transformers' assisted generation) must say so."""
        return None

    @cached_property
    def vocab_size(self) -> int:
        """Width of llama.cpp's logits (``n_vocab``; may exceed the tokenizer's size: padding)."""
        return int(self.llama.n_vocab())

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.eos_ids

    @cached_property
    def tokenizer_fingerprint(self) -> str:
        return tokenizer_fingerprint(self.tokenizer)

    def close(self) -> None:
        """Free llama.cpp's model and context now (else when garbage-collected)."""
        self.llama.close()


MADV_DONTNEED = 4  # <sys/mman.h> on Linux: drop the pages; a file mapping reads them back on access


def release_file_pages(path: str | os.PathLike[str]) -> int:
    """Drop this process's resident pages of every mapping of the file ``path``; the bytes advised.

    Only read-only mappings are touched, for which this is safe: the next access maps the page
    back from the page cache (or the file), with the same contents. Linux only (0 elsewhere, and
    when nothing maps it)."""
    if not sys.platform.startswith("linux"):
        return 0
    st = os.stat(path)
    real = os.path.realpath(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    libc = _libc_handle()
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    released = 0
    with open("/proc/self/maps") as maps:
        lines = maps.readlines()
    for line in lines:
        fields = line.split(maxsplit=5)  # range perms offset dev inode [path]
        if len(fields) < 6 or "w" in fields[1]:  # a writable mapping could hold changed pages
            continue
        same_inode = fields[3] == dev and fields[4] == str(st.st_ino)
        if not same_inode and fields[5].rstrip("\n") != real:
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if libc.madvise(start, end - start, MADV_DONTNEED) != 0:
            log.debug("madvise of %s failed: %s", path, os.strerror(ctypes.get_errno()))
            continue
        released += end - start
    return released


def release_unread_weights(llama: Any, path: str) -> None:
    """Drop the GGUF's pages llama.cpp prefetched, then map back what a forward reads: one
    warm-up forward, forgotten at once (``n_tokens`` 0: the next feed removes its position)."""
    if not release_file_pages(path):
        return
    token = int(llama.token_bos())
    llama.eval([token if 0 <= token < llama.n_vocab() else 0])
    llama.n_tokens = 0


def load_tokenizer(spec: str) -> Any:
    """A transformers tokenizer from a folder, a hub id in the local cache, or a GGUF's metadata."""
    from transformers import AutoTokenizer

    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    else:
        tok = AutoTokenizer.from_pretrained(str(path) if path.is_dir() else spec, local_files_only=True)
    drop_python_vocab(tok)
    return tok


def drop_python_vocab(tokenizer: Any) -> None:
    """Forget the Python copies of the vocabulary and merges that a transformers tokenizer keeps
    once its ``tokenizers`` backend is built from them (``_vocab``, ``_merges``: ~65 MB for a
    151,936-token BPE). Only the constructor reads them: encoding, decoding and ``get_vocab`` go
    through the backend (tests/test_llamacpp_drafter.py checks them against a fresh tokenizer)."""
    from tokenizers import Tokenizer

    if not isinstance(getattr(tokenizer, "_tokenizer", None), Tokenizer):
        return  # a pure-Python tokenizer: its vocabulary is what it encodes with
    for name in ("_vocab", "_merges"):
        if name in vars(tokenizer):
            delattr(tokenizer, name)


def _config_eos(spec: str | None) -> set[int]:
    """End-of-sequence ids in the generation_config.json / config.json of a local model folder."""
    ids: set[int] = set()
    if not spec or not Path(spec).expanduser().is_dir():
        return ids
    for name in ("generation_config.json", "config.json"):
        try:
            value = json.loads((Path(spec).expanduser() / name).read_text()).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        if value is not None:
            ids.update(int(v) for v in (value if isinstance(value, list) else [value]))
    return ids


def check_gguf_vocab(llama: Any, tokenizer: Any, *, spec: str, tokenizer_source: str) -> None:
    """Raise ``TokenizerMismatchError`` unless every id of ``tokenizer`` has the same token text
    in the GGUF (llama.cpp's ``llama_vocab_get_text``), and the GGUF has logits for all of them.

    Both sides store byte-level BPE tokens ("Ġthe") or SentencePiece pieces ("▁the") as text,
    special tokens by their content, so equal texts at every id mean equal vocabularies."""
    import llama_cpp

    specs = f"{spec} / tokenizer of {tokenizer_source}"
    n_vocab = int(llama.n_vocab())
    vocab = tokenizer.get_vocab()  # token text -> id
    if len(vocab) > n_vocab or (vocab and max(vocab.values()) >= n_vocab):
        raise TokenizerMismatchError(
            specs,
            ["compare vocabulary sizes"],
            f"the tokenizer has {len(vocab)} entries but the GGUF only {n_vocab} tokens. "
            "Pick a draft GGUF from the target's model family.",
        )
    vocab_ptr = llama_cpp.llama_model_get_vocab(llama.model)
    for text, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        got = llama_cpp.llama_vocab_get_text(vocab_ptr, i).decode("utf-8", errors="replace")
        if got != text:
            raise TokenizerMismatchError(
                specs,
                ["compare token texts id by id"],
                f"token id {i} is {got!r} in the GGUF but {text!r} in the tokenizer ({n_vocab} vs "
                f"{len(vocab)} entries). Pick a draft GGUF from the target's model family, or pass "
                "the target whose tokenizer it shares (--target).",
            )


def load_llamacpp_draft(
    gguf: str | os.PathLike[str],
    *,
    threads: int = 0,
    tokenizer: str | None = None,
    n_ctx: int = DEFAULT_N_CTX,
) -> LlamaCppDraft:
    """Load ``gguf`` with llama.cpp and the tokenizer that ids must agree with.

    ``threads`` 0 means one per core this process may run on. ``tokenizer`` is the target (a
    folder or hub id in the local cache): its tokenizer encodes prompts, as the target's would;
    when it is None or cannot be loaded, the tokenizer stored in the GGUF is used. Raises
    ``ModelLoadError`` (with what to do) when llama.cpp cannot load the file,
    ``TokenizerMismatchError`` when the GGUF's vocabulary differs from the tokenizer's."""
    spec = os.fspath(gguf)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ModelLoadError(spec, [f"file {path}"], "no such GGUF file; pass the path of a .gguf draft")
    llama_cpp = import_llama_cpp()
    threads = threads or len(os.sched_getaffinity(0))
    tried = [f"llama.cpp (llama-cpp-python {llama_cpp.__version__}) on {path}"]
    try:
        llama = llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
            logits_all=False, verbose=False,
        )  # fmt: skip
    except (ValueError, RuntimeError, OSError) as exc:
        raise ModelLoadError(
            spec,
            tried,
            f"llama.cpp could not load it ({exc}): is it a complete GGUF of an architecture this "
            "llama.cpp supports? Re-download it, upgrade llama-cpp-python, or use --draft-backend torch",
        ) from exc
    try:
        release_unread_weights(llama, str(path))
    except (ValueError, RuntimeError, OSError) as exc:
        llama.close()
        raise ModelLoadError(
            spec, tried, f"llama.cpp loaded it but its first forward failed ({exc}): re-download it, "
            "upgrade llama-cpp-python, or use --draft-backend torch",
        ) from exc  # fmt: skip
    tok, tok_source = None, spec
    for source in [s for s in (tokenizer,) if s] + [spec]:
        try:
            tok, tok_source = load_tokenizer(source), source
            break
        except Exception as exc:  # a missing folder, no local cache, a GGUF without a usable vocab
            tried.append(f"tokenizer of {source}: {type(exc).__name__}: {exc}")
            log.info("no tokenizer from %s (%s); trying the next source", source, exc)
    if tok is None:
        llama.close()
        raise ModelLoadError(
            spec,
            tried,
            "no tokenizer: pass the target (--target, a folder or cached hub id) the draft shares",
        )
    try:
        check_gguf_vocab(llama, tok, spec=spec, tokenizer_source=tok_source)
    except TokenizerMismatchError:
        llama.close()
        raise
    eos = {int(tok.eos_token_id)} if tok.eos_token_id is not None else set()
    eos |= _config_eos(tok_source) | {int(llama.token_eos())} - {-1}
    trim_heap()  # the tokenizer's parse and the vocabulary check freed ~40 MB the heap keeps
    return LlamaCppDraft(
        llama=llama, tokenizer=tok, name=path.stem, source=str(path), threads=threads, n_ctx=n_ctx,
        eos_ids=frozenset(eos), tokenizer_source=tok_source,
    )  # fmt: skip


class LlamaCppDrafter(Drafter):
    """:class:`Drafter` whose forward pass is llama.cpp's; sampling and bookkeeping are shared."""

    def __init__(
        self,
        draft: LlamaCppDraft,
        *,
        sparse_k: int = DEFAULT_SPARSE_K,
        lock: threading.Lock | None = None,
    ) -> None:
        super().__init__(draft, sparse_k=sparse_k, lock=lock)  # type: ignore[arg-type]
        self.draft = draft

    def _init_backend(self) -> None:
        pass  # the KV cache lives in llama.cpp's context; cache_len 0 makes the next feed start over

    def _logits(self, seq: list[int]) -> torch.Tensor:
        """Feed ``seq[cache_len:]`` through llama.cpp; the logits ``[V]`` after ``seq``."""
        import llama_cpp

        draft = self.draft
        if len(seq) > draft.n_ctx:
            raise ValueError(
                f"the sequence has {len(seq)} tokens, more than the llama.cpp draft's context of "
                f"{draft.n_ctx}: shorten the prompt or max_new_tokens"
            )
        with self.lock:
            llm = draft.llama
            if draft.owner is not self:  # another generation's tokens are in the cache
                draft.owner, self.cache_len = self, 0
            llm.n_tokens = self.cache_len  # eval() drops cached positions from here (seq_rm)
            llm.eval(seq[self.cache_len :])
            ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
            logits = np.ctypeslib.as_array(ptr, shape=(self.vocab_size,)).copy()  # [V]
        self.cache_len = len(seq)
        return torch.from_numpy(logits)

    def _crop(self, keep: int) -> None:
        # The positions are removed from llama.cpp's memory by the next eval (see _logits).
        self.cache_len = min(self.cache_len, keep)


def token_texts(draft: LlamaCppDraft, ids: Iterable[int]) -> list[str]:
    """llama.cpp's token text of each id (for messages and tests)."""
    return [draft.llama._model.token_get_text(int(i)) for i in ids]
