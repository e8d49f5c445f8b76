"""A check shared by the batched-verification tests: one forward over several sessions' jobs
answers each of them as the unbatched path does."""

from __future__ import annotations

import torch

from cloud_worker.verifier import Step, Verifier
from shared.models import LoadedModel
from shared.protocol import Decode, Draft, Open, Tokens, Verdict
from shared.sampling import SamplingParams, sparsify


def assert_one_forward_answers_as_alone(target: LoadedModel, params: SamplingParams) -> None:
    """Drafts of different γ, a decode and an open share one forward of ``target``; every answer
    equals the answer of the unbatched path (verdicts: n_acc, next, alpha; the decode's tokens)."""
    batched, single = Verifier(target), Verifier(target)
    ctxs = {"a": (5, 17, 42), "b": (7, 8, 9, 10, 11, 12), "c": (3, 4)}
    for verifier in (batched, single):
        for sid, ctx in ctxs.items():
            verifier.open(
                Open(sid=sid, epoch=0, ctx=ctx, sampling=params, draft_model="", target_model="", max_new=20)
            )

    def q_for(tok):
        if params.greedy:
            return None
        return tuple(sparsify(torch.softmax(torch.randn(target.vocab_size, generator=torch.Generator().manual_seed(t)), -1).index_fill(0, torch.tensor([t]), 0.5)) for t in tok)  # fmt: skip

    reqs = [
        Draft(sid="a", epoch=0, seq=0, pos=3, tok=(1, 2, 3, 4), q=q_for((1, 2, 3, 4))),
        Draft(sid="b", epoch=0, seq=0, pos=6, tok=(9,), q=q_for((9,))),
        Decode(sid="c", epoch=0, seq=0, pos=2, n=3),
        Open(
            sid="d", epoch=0, ctx=(1, 2, 3, 4, 5), sampling=params, draft_model="", target_model="", max_new=8
        ),
    ]
    steps = [batched.prepare(r) for r in reqs]
    assert all(isinstance(s, Step) for s in steps)
    answers = {s.key: replies for s, replies in batched.run(steps)}
    assert all(s.batch == 4 for s in steps)
    for r in reqs[:2]:
        want = single.verify(r)
        got = answers[r.sid][0]
        assert isinstance(got, Verdict) and (got.n_acc, got.next, got.alpha) == (
            want.n_acc,
            want.next,
            want.alpha,
        )
    parts: list[Tokens] = []
    single.decode(reqs[2], parts.append)
    assert answers["c"][0].tok == parts[0].tok and steps[2].more  # the decode's next step goes back
    assert answers["d"][0].pos == 5 and "d" in batched.sessions
