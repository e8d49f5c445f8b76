"""The llama.cpp drafter (issue 12): a tiny GGUF draft run by llama-cpp-python, a torch target.

The draft is a tiny random qwen2 model written as a GGUF by ``tests/tiny_gguf.py``; the target
is another tiny qwen2 with the same tokenizer, verified in this process (``LocalLink``). The
exactness rule is checked end to end through the speculative loop: greedy output equals the
target's own greedy decoding, and at T > 0 the emitted (x1, x2) pairs follow the target's joint
distribution (chi-square at significance 1e-3, fixed seeds, so the outcome is deterministic;
the same counts are also tested against the draft's own distribution, which they must reject,
so the test has the power to fail).
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
import os
import sys
import threading
import time

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (extra [llamacpp])")

from bench.inprocess import InProcessPair  # noqa: E402
from edge_agent.agent import EdgeAgent  # noqa: E402
from edge_agent.drafter import Drafter, load_draft, make_drafter, resolve_backend  # noqa: E402
from edge_agent.drafter_llamacpp import (  # noqa: E402
    LlamaCppDraft,
    LlamaCppDrafter,
    load_llamacpp_draft,
    load_tokenizer,
    release_file_pages,
)
from edge_agent.speculative import GenerateOptions  # noqa: E402
from shared.errors import ModelLoadError, TokenizerMismatchError  # noqa: E402
from shared.models import load_model, tokenizer_fingerprint  # noqa: E402
from shared.sampling import SamplingParams, logits_to_probs  # noqa: E402
from tests.test_speculative import chi2_pvalue  # noqa: E402
from tests.tiny import make_tiny_model_dir  # noqa: E402
from tests.tiny_gguf import write_tiny_gguf  # noqa: E402

PROMPTS = [[5, 17, 42], [100, 3, 250, 7, 9, 11], [1]]
GREEDY = SamplingParams(temperature=0.0)
SIGNIFICANCE = 1e-3


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(draft folder, draft GGUF, target folder): tiny qwen2 models sharing one tokenizer."""
    root = tmp_path_factory.mktemp("llamacpp")
    draft_dir = make_tiny_model_dir(root / "draft", arch="qwen2", seed=1, layers=1)
    gguf = write_tiny_gguf(draft_dir, root / "draft.gguf")
    target_dir = make_tiny_model_dir(root / "target", arch="qwen2", seed=2)
    return draft_dir, gguf, target_dir


@pytest.fixture(scope="module")
def pair(models) -> InProcessPair:
    _, gguf, target_dir = models
    draft = load_llamacpp_draft(gguf, threads=1, tokenizer=str(target_dir))
    return InProcessPair.from_models(draft, load_model(str(target_dir)))


def _target_greedy(target, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(target.model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_gguf_draft_loads_with_the_targets_tokenizer(pair: InProcessPair, models) -> None:
    draft = pair.draft
    assert isinstance(draft, LlamaCppDraft) and isinstance(pair.drafter, LlamaCppDrafter)
    assert draft.tokenizer_source == str(models[2])
    assert draft.vocab_size == len(draft.tokenizer) == 320
    assert draft.eos_token_ids == pair.target.eos_token_ids
    assert draft.threads == 1


@pytest.mark.parametrize("gamma", [1, 2, 3, 5, 8])
def test_greedy_output_equals_target_only(pair: InProcessPair, gamma: int) -> None:
    for prompt in PROMPTS:
        out = pair.run(prompt, GenerateOptions(gamma=gamma, max_new_tokens=16, params=GREEDY))
        ref = _target_greedy(pair.target, prompt, 16)
        assert out.token_ids == ref[: len(out.token_ids)]
        assert len(out.token_ids) == 16 or out.token_ids[-1] in pair.target.eos_token_ids
        cloud = pair.run(prompt, GenerateOptions(mode="cloud-only", max_new_tokens=16, params=GREEDY))
        assert out.token_ids == cloud.token_ids


def test_llamacpp_and_torch_drafters_draft_the_same_tokens(models) -> None:
    """The f32 GGUF holds the same weights as the torch folder: same greedy drafts, close q."""
    draft_dir, gguf, _ = models
    ggml = make_drafter(load_llamacpp_draft(gguf, threads=1, tokenizer=str(draft_dir)))
    torch_drafter = make_drafter(load_model(str(draft_dir)))
    assert type(torch_drafter) is Drafter
    for prompt in PROMPTS:
        blocks = []
        for d in (ggml, torch_drafter):
            d.reset(prompt, GREEDY)
            blocks.append(d.propose(10).tokens)
        assert blocks[0] == blocks[1]
    sampled = SamplingParams(temperature=1.0, seed=3)
    qs = []
    for d in (ggml, torch_drafter):
        d.reset(PROMPTS[1], sampled)
        qs.append(d.propose(1).q[0])
    dense = [q.to_dense(320) for q in qs]
    assert (dense[0] - dense[1]).abs().sum() < 0.01  # quantized weights of nearly equal logits


def test_rollback_matches_a_fresh_evaluation(pair: InProcessPair) -> None:
    """After rejected drafts are dropped, next logits equal a fresh llama.cpp pass (atol 1e-4)."""
    drafter = make_drafter(pair.draft)
    drafter.reset(PROMPTS[1], GREEDY)
    block = drafter.propose(6)
    drafter.commit([*block.tokens[:2], 7])  # keep two drafts, then a correction
    assert drafter.cache_len == len(PROMPTS[1]) + 2
    cached = drafter._logits(drafter.committed)
    drafter.rollback()  # abandon a round: the last committed token leaves the cache too
    assert drafter.cache_len == len(drafter.committed) - 1
    again = drafter._logits(drafter.committed)
    drafter.reset(drafter.committed, GREEDY)
    fresh = drafter._logits(drafter.committed)
    torch.testing.assert_close(cached, fresh, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(again, fresh, atol=1e-4, rtol=1e-4)


def test_the_loaders_warm_up_forward_leaves_no_trace(models) -> None:
    """The loader drops the GGUF's prefetched pages and runs one warm-up forward (to map back what
    a forward reads): the first drafts' logits equal those of a context that never did either."""
    _, gguf, target_dir = models
    drafter = make_drafter(load_llamacpp_draft(gguf, threads=1, tokenizer=str(target_dir)))
    plain = llama_cpp.Llama(model_path=str(gguf), n_ctx=64, n_batch=512, n_threads=1, n_threads_batch=1,
                            logits_all=False, verbose=False)  # fmt: skip
    for prompt in PROMPTS:
        drafter.reset(prompt, GREEDY)
        plain.n_tokens = 0
        plain.eval(prompt)
        want = torch.from_numpy(
            np.ctypeslib.as_array(
                llama_cpp.llama_get_logits_ith(plain.ctx, -1), shape=(drafter.vocab_size,)
            ).copy()
        )
        torch.testing.assert_close(drafter._logits(prompt), want, atol=1e-5, rtol=1e-5)
    plain.close()


def _resident_kib(path) -> int:
    """Resident KiB of this process's mappings of ``path`` (/proc/self/smaps)."""
    real, total, current = os.path.realpath(path), 0, None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and ":" in fields[3]:  # a mapping's header line
                current = fields[5] if len(fields) > 5 else None
            elif fields[0] == "Rss:" and current == real:
                total += int(fields[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc/self/smaps are Linux's")
def test_release_file_pages_drops_read_only_mappings_and_keeps_their_contents(tmp_path) -> None:
    data = bytes(range(256)) * 1024  # 256 KiB, 64 pages
    ro, rw = tmp_path / "ro.bin", tmp_path / "rw.bin"
    ro.write_bytes(data)
    rw.write_bytes(data)
    with open(ro, "rb") as f_ro, open(rw, "r+b") as f_rw:
        m_ro = mmap.mmap(f_ro.fileno(), 0, access=mmap.ACCESS_READ)  # shared, read-only (as llama.cpp's)
        m_rw = mmap.mmap(f_rw.fileno(), 0, access=mmap.ACCESS_COPY)  # private, writable
        assert m_ro[:] == data and m_rw[:] == data  # every page read: resident
        m_rw[0] = 255  # a changed page, which only this mapping holds
        assert _resident_kib(ro) == len(data) // 1024
        assert release_file_pages(ro) >= len(data)
        assert _resident_kib(ro) == 0
        assert m_ro[:] == data  # mapped back on access, unchanged
        assert release_file_pages(rw) == 0  # a writable mapping is left alone
        assert m_rw[0] == 255 and _resident_kib(rw) == len(data) // 1024
        m_ro.close()
        m_rw.close()
    assert release_file_pages(ro) == 0  # nothing maps it any more


def test_the_tokenizer_without_its_python_vocabulary_encodes_as_before(models) -> None:
    """load_tokenizer drops the Python vocabulary and merges transformers keeps (~65 MB for the
    demo's 151,936 tokens); the tokenizer must still encode, decode and list its vocabulary as a
    freshly loaded one does."""
    from transformers import AutoTokenizer

    target_dir = str(models[2])
    fresh = AutoTokenizer.from_pretrained(target_dir, local_files_only=True)
    slim = load_tokenizer(target_dir)
    assert {"_vocab", "_merges"} <= set(vars(fresh))  # what there is to drop
    assert not {"_vocab", "_merges"} & set(vars(slim))  # dropped
    assert slim.get_vocab() == fresh.get_vocab()
    assert tokenizer_fingerprint(slim) == tokenizer_fingerprint(fresh)
    assert (slim.eos_token_id, slim.all_special_ids) == (fresh.eos_token_id, fresh.all_special_ids)
    for text in ("The capital of France", "def f(x):\n    return x[::-1]  # ünïcode ✓", ""):
        ids = fresh(text)["input_ids"]
        assert slim(text)["input_ids"] == ids
        assert slim.decode(ids) == fresh.decode(ids)
    for tok in (slim, fresh):  # the backend grows without the Python copies
        tok.add_tokens(["<extra>"])
    assert slim("a <extra> b")["input_ids"] == fresh("a <extra> b")["input_ids"]
    assert len(fresh) - 1 in slim("a <extra> b")["input_ids"]


def test_drafters_sharing_one_model_keep_their_own_sequences(pair: InProcessPair) -> None:
    """Two generations interleaved on one llama.cpp context draft what each would alone."""
    alone = []
    for prompt in PROMPTS[:2]:
        d = make_drafter(pair.draft)
        d.reset(prompt, GREEDY)
        alone.append([d.propose(4).tokens, None])
        d.commit(list(alone[-1][0]))
        alone[-1][1] = d.propose(4).tokens
    a, b = make_drafter(pair.draft), make_drafter(pair.draft)
    a.reset(PROMPTS[0], GREEDY)
    b.reset(PROMPTS[1], GREEDY)
    first = [a.propose(4).tokens, b.propose(4).tokens]
    a.commit(list(first[0]))
    b.commit(list(first[1]))
    assert [[first[0], a.propose(4).tokens], [first[1], b.propose(4).tokens]] == alone


@pytest.mark.parametrize(
    "params", [GREEDY, SamplingParams(temperature=0.9, top_k=50, seed=21)], ids=["greedy", "sampled"]
)
def test_pipelined_drafting_gives_the_same_tokens(pair: InProcessPair, params: SamplingParams) -> None:
    real_verify = pair.link.verify

    def slow_verify(msg):  # a remote verifier takes far longer than a tiny draft step
        time.sleep(0.02)
        return real_verify(msg)

    pair.link.verify = slow_verify
    try:
        for gamma in (1, 3, 5):
            on = pair.run(PROMPTS[1], GenerateOptions(gamma=gamma, max_new_tokens=20, params=params))
            off = pair.run(
                PROMPTS[1], GenerateOptions(gamma=gamma, max_new_tokens=20, params=params, pipeline=False)
            )
            assert on.token_ids == off.token_ids
            assert [r.n_acc for r in on.rounds] == [r.n_acc for r in off.rounds]
            assert all(r.prefetched == 0 for r in off.rounds)
    finally:
        pair.link.verify = real_verify


def test_pipelined_drafts_are_reused_when_the_block_passes(models, tmp_path) -> None:
    """The target's own weights as the GGUF draft: every block passes, and every block after the
    first was drafted (at least partly) during the previous, slowed verify."""
    _, _, target_dir = models
    gguf = write_tiny_gguf(target_dir, tmp_path / "target.gguf")
    same = InProcessPair.from_models(
        load_llamacpp_draft(gguf, threads=1, tokenizer=str(target_dir)), load_model(str(target_dir))
    )
    real_verify = same.link.verify

    def slow_verify(msg):
        time.sleep(0.05)
        return real_verify(msg)

    same.link.verify = slow_verify
    res = same.run(PROMPTS[0], GenerateOptions(gamma=3, max_new_tokens=24, params=GREEDY))
    assert res.accepted == res.drafted
    assert all(r.prefetched > 0 for r in res.rounds[1:])
    assert res.token_ids == _target_greedy(same.target, PROMPTS[0], 24)[: len(res.token_ids)]


def test_the_draft_forward_releases_the_gil(tmp_path) -> None:
    """Pipelining needs the draft's forward to let the verify thread run. Statically: llama.cpp is
    called through ctypes.CDLL functions, which release the GIL (PyDLL ones would hold it).
    Dynamically: while a ~0.2 s llama.cpp eval runs in another thread, this thread never waits
    for more than a quarter of it (holding the GIL, the eval would stall it for the whole call)."""
    for name in ("llama_decode", "llama_get_logits_ith", "llama_memory_seq_rm"):
        fn = getattr(llama_cpp.llama_cpp._lib, name)
        assert isinstance(fn, ctypes._CFuncPtr)
        assert not fn._flags_ & ctypes._FUNCFLAG_PYTHONAPI, f"{name} holds the GIL"
    wide = write_tiny_gguf(
        make_tiny_model_dir(tmp_path / "wide", arch="qwen2", hidden=256, layers=4), tmp_path / "w.gguf"
    )
    llm = llama_cpp.Llama(model_path=str(wide), n_ctx=512, n_batch=512, n_threads=1, n_threads_batch=1,
                          logits_all=False, verbose=False)  # fmt: skip
    took: list[float] = []

    def prefill() -> None:
        llm.n_tokens = 0
        t0 = time.perf_counter()
        llm.eval([i % 300 + 1 for i in range(480)])  # one llama_decode call of 480 tokens
        took.append(time.perf_counter() - t0)

    thread = threading.Thread(target=prefill)
    stamps = [time.perf_counter()]
    thread.start()
    while thread.is_alive():
        stamps.append(time.perf_counter())
    thread.join()
    longest = max(b - a for a, b in itertools.pairwise(stamps))
    assert longest < took[0] / 4, (
        f"this thread waited {longest * 1e3:.0f} ms during a {took[0] * 1e3:.0f} ms eval"
    )
    llm.close()


def _joint_target_probs(target, prompt: list[int], params: SamplingParams) -> dict[tuple[int, int], float]:
    """p(x1, x2 | prompt) of the target under ``params`` (its support only)."""
    with torch.inference_mode():
        p1 = logits_to_probs(target.model(torch.tensor([prompt])).logits[0, -1], params)  # [V]
        out = {}
        for x1 in p1.nonzero().flatten().tolist():
            p2 = logits_to_probs(target.model(torch.tensor([[*prompt, x1]])).logits[0, -1], params)  # [V]
            for x2 in p2.nonzero().flatten().tolist():
                out[(x1, x2)] = float(p1[x1] * p2[x2])
    return out


def _pooled_pvalue(counts: dict, probs: dict) -> float:
    """Chi-square p-value with every category expected under 5 counts pooled into one bin."""
    n = sum(counts.values())
    if any(k not in probs for k in counts):
        return 0.0
    big = [k for k in probs if probs[k] * n >= 5]
    rest = [k for k in probs if probs[k] * n < 5]
    obs = [counts.get(k, 0) for k in big] + [sum(counts.get(k, 0) for k in rest)]
    exp = [probs[k] for k in big] + [sum(probs[k] for k in rest)]
    return chi2_pvalue(torch.tensor(obs, dtype=torch.float64), torch.tensor(exp, dtype=torch.float64))


@pytest.mark.slow
def test_sampled_output_follows_the_target_distribution(models, tmp_path) -> None:
    """T = 1, top-k 6: over 1500 seeds, the first two emitted tokens follow the target's joint
    distribution, not the draft's (the draft is the target's weights plus noise, written as a
    GGUF: acceptance near 0.5, so accept tests, residuals and bonus tokens all occur)."""
    _, _, target_dir = models
    gguf = write_tiny_gguf(target_dir, tmp_path / "noisy.gguf", perturb=0.2, seed=7)
    pair = InProcessPair.from_models(
        load_llamacpp_draft(gguf, threads=1, tokenizer=str(target_dir)), load_model(str(target_dir))
    )
    prompt, n = PROMPTS[0], 1500
    params = SamplingParams(temperature=1.0, top_k=6)
    counts: dict[tuple[int, int], int] = {}
    drafted = accepted = 0
    for seed in range(n):
        opts = GenerateOptions(
            gamma=2, max_new_tokens=2, params=SamplingParams(temperature=1.0, top_k=6, seed=seed)
        )
        res = pair.run(prompt, opts)
        key = (res.token_ids[0], res.token_ids[1])
        counts[key] = counts.get(key, 0) + 1
        drafted, accepted = drafted + res.drafted, accepted + res.accepted
    p = _joint_target_probs(pair.target, prompt, params)
    assert _pooled_pvalue(counts, p) > SIGNIFICANCE
    # Power: the draft's own joint distribution must be rejected by the same counts.
    with torch.inference_mode():
        d = make_drafter(pair.draft)
        q1 = logits_to_probs(d._logits(prompt), params)
        q = {}
        for x1 in q1.nonzero().flatten().tolist():
            d.reset([*prompt, x1], params)
            q2 = logits_to_probs(d._logits([*prompt, x1]), params)
            q.update({(x1, x2): float(q1[x1] * q2[x2]) for x2 in q2.nonzero().flatten().tolist()})
    assert _pooled_pvalue(counts, q) < SIGNIFICANCE
    assert 0 < accepted < drafted  # drafts were both accepted and rejected


def test_edge_agent_runs_a_gguf_draft(models) -> None:
    _, gguf, target_dir = models
    draft = load_draft(str(gguf), backend="auto", threads=1, target=str(target_dir))
    assert isinstance(draft, LlamaCppDraft)
    agent = EdgeAgent(
        draft, None, defaults=GenerateOptions(mode="edge-only", max_new_tokens=8, params=GREEDY)
    )
    res = agent.run(agent.encode_prompt("The capital of France", chat=False))
    ggml = make_drafter(draft)
    ggml.reset(agent.encode_prompt("The capital of France", chat=False), GREEDY)
    assert res.token_ids == list(ggml.propose(len(res.token_ids)).tokens)


def test_backend_choice(models) -> None:
    draft_dir, gguf, _ = models
    assert resolve_backend(str(gguf)) == "llama.cpp"
    assert resolve_backend(str(draft_dir)) == "torch"
    assert resolve_backend(str(gguf), "torch") == "torch"
    with pytest.raises(ValueError, match="unknown"):
        resolve_backend(str(gguf), "onnx")
    with pytest.raises(ModelLoadError, match=r"runs a \.gguf file"):
        load_draft(str(draft_dir), backend="llama.cpp")


def test_a_file_llama_cpp_cannot_load_is_a_clear_error(tmp_path, models) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    with pytest.raises(ModelLoadError, match=r"llama\.cpp could not load it") as err:
        load_llamacpp_draft(bad, threads=1, tokenizer=str(models[2]))
    assert "--draft-backend torch" in str(err.value)
    half = tmp_path / "truncated.gguf"
    data = models[1].read_bytes()
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="complete GGUF"):
        load_llamacpp_draft(half, threads=1, tokenizer=str(models[2]))
    with pytest.raises(ModelLoadError, match="no such GGUF file"):
        load_llamacpp_draft(tmp_path / "missing.gguf", threads=1)


def test_a_gguf_with_another_vocabulary_is_a_clear_error(tmp_path, models) -> None:
    other = make_tiny_model_dir(tmp_path / "other", arch="qwen2", seed=1, layers=1, tokenizer_variant=1)
    gguf = write_tiny_gguf(other, tmp_path / "other.gguf")
    with pytest.raises(TokenizerMismatchError, match=r"token id .* in the GGUF but"):
        load_llamacpp_draft(gguf, threads=1, tokenizer=str(models[2]))


def test_a_sequence_longer_than_the_context_is_a_clear_error(models) -> None:
    _, gguf, target_dir = models
    drafter = make_drafter(load_llamacpp_draft(gguf, threads=1, tokenizer=str(target_dir), n_ctx=32))
    drafter.reset(list(range(1, 31)), GREEDY)
    drafter.propose(2)  # 30 + 1 tokens fed: fits
    with pytest.raises(ValueError, match=r"more than the llama\.cpp draft's context of 32"):
        drafter.propose(4)
