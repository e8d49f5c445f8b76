"""Running the benchmark's cells: every mode on the same prompts and seeds, one run at a time.

A *cell* is one mode at one setting: temperature always, γ for the modes that draft
(speculative, inprocess, assisted), RTT for the networked modes (speculative, cloud-only). A run
is one generation of one cell on one prompt in one iteration. Runs are interleaved prompt-major
(for each iteration, for each prompt, every cell), so a slow spell of the machine hits all
modes alike instead of one.

Compute placement (DESIGN §7): this process (the edge) is pinned to one core with one torch
thread; the worker process to another core, one thread. The in-process modes (inprocess,
assisted, edge-only) run both models in this process, on the edge's core, one thread: draft
and verify never overlap in a speculative round anyway, so every model forward in every mode
runs on one thread of one core and the modes differ only in what is around the compute.

Draft backends (``--draft-backend torch,llama.cpp``): every mode that drafts runs once per
backend, on the same prompts and seeds; its cell key then names the backend (``[llama.cpp]``).
"""

from __future__ import annotations

import contextlib
import itertools
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from bench.assisted import run_assisted
from bench.inprocess import InProcessPair
from edge_agent.drafter import Drafter, make_drafter
from edge_agent.results import collect
from edge_agent.speculative import GenerateOptions, RoundStats, SessionState, generate
from shared.link import VerifierLink
from shared.models import LoadedModel
from shared.protocol import Close, Open
from shared.sampling import SamplingParams

# `speculative` drafts the next block while the worker verifies (the loop's default);
# `speculative-seq` is the same over MQTT with sequential drafting, the like-for-like partner of
# `inprocess`, which always drafts sequentially: in one process on one core there is nothing to
# overlap, and drafting ahead would only steal the verify's core.
MODES = ("speculative", "speculative-seq", "cloud-only", "edge-only", "inprocess", "assisted")
NETWORK_MODES = frozenset({"speculative", "speculative-seq", "cloud-only"})
GAMMA_MODES = frozenset({"speculative", "speculative-seq", "inprocess", "assisted"})
DRAFT_MODES = frozenset({"speculative", "speculative-seq", "edge-only", "inprocess"})  # run per backend
TARGET_MODES = frozenset({"speculative", "speculative-seq", "cloud-only", "inprocess", "assisted"})
PIPELINED_MODES = frozenset({"speculative"})
_LOOP_MODE = {"speculative": "speculative", "speculative-seq": "speculative", "inprocess": "speculative",
              "cloud-only": "cloud-only", "edge-only": "edge-only"}  # fmt: skip


@dataclass(frozen=True, order=True)
class Cell:
    """One mode at one setting; ``gamma``/``rtt_ms`` are None where the mode does not use them."""

    mode: str
    temperature: float
    gamma: int | str | None = None  # a fixed γ or "auto" (the adaptive controller)
    rtt_ms: float | None = None
    backend: str | None = None  # the draft backend, when several are compared

    @property
    def key(self) -> str:
        parts = [self.mode + (f"[{self.backend}]" if self.backend else ""), f"T={self.temperature:g}"]
        if self.gamma is not None:
            parts.append(f"γ={self.gamma}")
        if self.rtt_ms is not None:
            parts.append(f"rtt={self.rtt_ms:g}ms")
        return " ".join(parts)

    def comparable(self, other: Cell) -> bool:
        """Same temperature, and the same γ / RTT wherever both cells have one."""
        if self.temperature != other.temperature:
            return False
        if self.gamma is not None and other.gamma is not None and self.gamma != other.gamma:
            return False
        return not (self.rtt_ms is not None and other.rtt_ms is not None and self.rtt_ms != other.rtt_ms)

    def as_dict(self) -> dict:
        return {"key": self.key, "mode": self.mode, "temperature": self.temperature,
                "gamma": self.gamma, "rtt_ms": self.rtt_ms, "backend": self.backend}  # fmt: skip


def make_cells(
    modes: list[str],
    temperatures: list[float],
    gammas: list[int | str],
    rtts: list[float],
    backends: list[str] | None = None,
) -> list[Cell]:
    """Every distinct cell of the sweep (a mode that ignores γ or RTT appears once per value of the
    rest). With two or more ``backends``, each drafting mode appears once per backend."""
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {', '.join(unknown)}: choose from {', '.join(MODES)}")
    cells: list[Cell] = []
    for mode, temp in itertools.product(modes, temperatures):
        gs: list[int | str | None] = list(gammas) if mode in GAMMA_MODES else [None]
        rs: list[float | None] = list(rtts) if mode in NETWORK_MODES else [None]
        bs: list[str | None] = (
            list(backends) if backends and len(backends) > 1 and mode in DRAFT_MODES else [None]
        )
        for g, r, b in itertools.product(gs, rs, bs):
            cell = Cell(mode, float(temp), g, None if r is None else float(r), b)
            if cell not in cells:
                cells.append(cell)
    return cells


def round_record(r: RoundStats) -> dict:
    """The per-round figures the report breaks down (milliseconds and bytes)."""
    return {
        "gamma": r.gamma,
        "n_acc": r.n_acc,
        "draft_ms": round(r.draft_ms, 3),
        "codec_ms": round(r.codec_ms, 3),
        "net_ms": round(max(0.0, r.network_ms - r.queue_ms), 3),  # network + broker, without the queue
        "queue_ms": round(r.queue_ms, 3),
        "verify_ms": round(r.verify_ms, 3),
        "link_ms": round(r.link_ms, 3),
        "noncompute_ms": round(r.link_ms - r.verify_ms, 3),  # encode + network + broker + queue + decode
        "prefetched": r.prefetched,  # drafts made ahead during the previous verify
        "pred_tokens": round(r.pred_tokens, 3),  # the γ controller's prediction for this round
        "pred_ms": round(r.pred_ms, 3),
        "overhang_ms": round(r.overhang_ms, 3),  # pipelined: a draft-ahead forward outlived the verdict
        "gamma_reason": r.gamma_reason,
        "bytes_up": r.bytes_up,
        "bytes_down": r.bytes_down,
    }


class Edge:
    """The edge side of a run: the draft model (one per draft backend), the target when an
    in-process mode needs it, and one MQTT link per RTT for the networked modes."""

    def __init__(
        self,
        draft: LoadedModel | dict[str, Any],
        target: LoadedModel | None,
        links: dict[float, VerifierLink],
        *,
        max_new_tokens: int,
        top_k: int = 0,
        top_p: float = 1.0,
        draft_name: str = "",
        target_name: str = "",
        pipeline: bool = True,
    ) -> None:
        # {backend: draft}; the first is the default, a torch one (if loaded) serves `assisted`
        self.drafts = draft if isinstance(draft, dict) else {"torch": draft}
        self.draft = self.drafts.get("torch") or next(iter(self.drafts.values()))
        self.target = target
        self.links = links
        self.max_new_tokens = max_new_tokens
        self.top_k, self.top_p = top_k, top_p
        self.draft_name, self.target_name = draft_name, target_name
        self.pipeline = pipeline  # `speculative` drafts the next block while the current one is verified
        self.drafters: dict[str, Drafter] = {b: make_drafter(d) for b, d in self.drafts.items()}
        self.default_backend = next(iter(self.drafts))
        self.drafter = self.drafters[self.default_backend]
        self.pair = InProcessPair.from_models(self.draft, target) if target is not None else None
        if self.pair is not None:
            self.pair.drafter = self.drafter  # one draft KV cache for all modes
        self.eos_ids = self.draft.eos_token_ids  # the same set for every mode (one tokenizer)

    def options(self, cell: Cell, seed: int, max_new_tokens: int | None = None) -> GenerateOptions:
        params = SamplingParams(temperature=cell.temperature, top_k=self.top_k, top_p=self.top_p, seed=seed)
        return GenerateOptions(
            mode=_LOOP_MODE.get(cell.mode, "speculative"),
            gamma=cell.gamma or 1,
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            params=params,
            on_cloud_unreachable="fail",
            draft_model=self.draft_name,
            target_model=self.target_name,
            pipeline=self.pipeline and cell.mode in PIPELINED_MODES,
        )

    def barrier(self, link: VerifierLink, token: int) -> None:
        """Wait (untimed) until the worker has finished everything queued before now.

        A cloud-only run asks for tokens in chunks; when it stops mid-chunk (max_new_tokens,
        EOS) the worker still decodes the rest of the chunk before it reads the `close`, which
        would otherwise be charged to the next run. The worker takes jobs in order, so the
        answer to a one-token `open` means the queue is empty."""
        sid = f"barrier-{uuid.uuid4().hex[:12]}"
        link.open(Open(sid=sid, epoch=0, ctx=(token,), sampling=SamplingParams(), draft_model=self.draft_name,
                       target_model=self.target_name, max_new=1, mode="cloud"))  # fmt: skip
        with contextlib.suppress(Exception):
            link.close(Close(sid=sid, epoch=0))

    def run(self, cell: Cell, prompt_ids: list[int], seed: int, *, max_new_tokens: int | None = None) -> dict:
        """One generation of ``cell``; returns its summary, tokens and rounds."""
        opts = self.options(cell, seed, max_new_tokens)
        if cell.mode == "assisted":
            if self.target is None:
                raise RuntimeError("assisted mode needs the target model in this process")
            if getattr(self.draft, "model", None) is None:
                raise RuntimeError("assisted mode needs the torch draft: add torch to --draft-backend")
            res = run_assisted(self.draft, self.target, prompt_ids, opts)
            return {**res.summary(), "token_ids": res.token_ids, "text": res.text, "rounds": []}
        link: VerifierLink | None
        if cell.mode in NETWORK_MODES:
            assert cell.rtt_ms is not None
            link = self.links[cell.rtt_ms]
        elif cell.mode == "inprocess":
            if self.pair is None:
                raise RuntimeError("inprocess mode needs the target model in this process")
            link = self.pair.link
        else:
            link = None
        state = SessionState()
        drafter = self.drafters[cell.backend or self.default_backend]
        events = generate(drafter, link, prompt_ids, opts, eos_ids=self.eos_ids, state=state)
        result = collect(events, state=state)
        if cell.mode in NETWORK_MODES:
            self.barrier(link, prompt_ids[-1])
        text = self.draft.tokenizer.decode(result.token_ids, skip_special_tokens=True)
        rounds = [round_record(r) for r in result.rounds]
        backend = cell.backend or self.default_backend if cell.mode in DRAFT_MODES else None
        return {**result.summary(), "token_ids": result.token_ids, "text": text, "rounds": rounds,
                "draft_backend": backend}  # fmt: skip


@dataclass(frozen=True)
class Prompt:
    index: int
    category: str
    text: str
    ids: tuple[int, ...]


def schedule(
    cells: list[Cell], prompts: list[Prompt], iterations: int, seed: int
) -> Iterator[tuple[int, Prompt, Cell, int]]:
    """(iteration, prompt, cell, seed) in run order: prompt-major, every cell per prompt."""
    for it in range(iterations):
        for prompt in prompts:
            for cell in cells:
                yield it, prompt, cell, seed + 1000 * it + prompt.index


def run_all(
    edge: Edge,
    cells: list[Cell],
    prompts: list[Prompt],
    *,
    iterations: int,
    seed: int,
    progress: Callable[[dict], None] | None = None,
    warmup_tokens: int = 4,
) -> list[dict]:
    """Warm every (mode, RTT) up once, then run the whole schedule; one record per run."""
    if warmup_tokens > 0 and prompts:
        seen: set[tuple[str, float | None]] = set()
        for cell in cells:
            if (cell.mode, cell.rtt_ms) not in seen:
                seen.add((cell.mode, cell.rtt_ms))
                edge.run(cell, list(prompts[0].ids), seed, max_new_tokens=warmup_tokens)
    records = []
    for it, prompt, cell, run_seed in schedule(cells, prompts, iterations, seed):
        out = edge.run(cell, list(prompt.ids), run_seed)
        rec = {"cell": cell.key, **cell.as_dict(), "prompt": prompt.index, "category": prompt.category,
               "iteration": it, "seed": run_seed, **out}  # fmt: skip
        rec.pop("key", None)
        records.append(rec)
        if progress is not None:
            progress(rec)
    return records
