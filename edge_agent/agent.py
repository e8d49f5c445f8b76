"""``EdgeAgent``: the edge's library API, used by the CLI, the local HTTP API and the benchmark.

One draft model (torch, or a GGUF run by llama.cpp: ``edge_agent.drafter.load_draft``) is shared
by every generation; each generation gets its own drafter (its own KV state) and a lock
serializes forward passes, so several requests can be in flight while
others wait on the network. Observers (metrics, logs) are told of every finished round and
generation.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING

from edge_agent.drafter import make_drafter
from edge_agent.results import GenerationResult, collect
from edge_agent.speculative import GenerateOptions, RoundStats, SessionState, TokenEvent, generate
from shared.link import VerifierLink
from shared.models import LoadedModel, encode_prompt

if TYPE_CHECKING:
    from edge_agent.drafter_llamacpp import LlamaCppDraft

log = logging.getLogger(__name__)

RoundObserver = Callable[[RoundStats], None]
ResultObserver = Callable[[GenerationResult, GenerateOptions], None]


class EdgeAgent:
    """Generates text on the edge: draft model here, verification through ``link``."""

    def __init__(
        self, draft: LoadedModel | LlamaCppDraft, link: VerifierLink | None, *, defaults: GenerateOptions
    ) -> None:
        self.draft = draft
        self.tokenizer = draft.tokenizer
        self.link = link
        self.defaults = defaults
        self.eos_ids = draft.eos_token_ids
        self._model_lock = threading.Lock()
        self.round_observers: list[RoundObserver] = []
        self.result_observers: list[ResultObserver] = []

    @property
    def context_length(self) -> int | None:
        """Most tokens (prompt + generation) the draft takes: llama.cpp's context, else the torch
        model's ``max_position_embeddings`` (None when unknown)."""
        n_ctx = getattr(self.draft, "n_ctx", None)
        if n_ctx is not None:
            return int(n_ctx)
        return getattr(getattr(self.draft.model, "config", None), "max_position_embeddings", None)

    def options(self, **overrides) -> GenerateOptions:
        """The agent's default options with some fields replaced (unknown names raise TypeError)."""
        return replace(self.defaults, **overrides)

    def encode_prompt(self, prompt: str, *, chat: bool = True) -> list[int]:
        """Token ids of ``prompt``, through the tokenizer's chat template when ``chat``."""
        return encode_prompt(self.tokenizer, prompt, chat=chat)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of a chat (OpenAI-style messages) through the tokenizer's chat template."""
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return list(ids)

    def stream(
        self, prompt_ids: list[int], opts: GenerateOptions | None = None, *, state: SessionState | None = None
    ) -> Iterator[TokenEvent]:
        """Token events of one generation, as they come. Observers see each finished round."""
        opts = opts or self.defaults
        drafter = None if opts.mode == "cloud-only" else make_drafter(self.draft, lock=self._model_lock)
        if opts.mode != "edge-only" and self.link is None:
            raise ValueError(f"mode {opts.mode!r} needs a link to the cloud; this agent has none")
        last_round = None
        for ev in generate(drafter, self.link, prompt_ids, opts, eos_ids=self.eos_ids, state=state):
            if ev.round is not None and ev.round is not last_round:
                last_round = ev.round
                for obs in self.round_observers:
                    obs(ev.round)
            yield ev

    def run(self, prompt_ids: list[int], opts: GenerateOptions | None = None) -> GenerationResult:
        """One whole generation; the text is decoded without special tokens."""
        opts = opts or self.defaults
        state = SessionState()
        result = collect(self.stream(prompt_ids, opts, state=state), state=state)
        result.text = self.decode(result.token_ids)
        for obs in self.result_observers:
            obs(result, opts)
        return result

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def close(self) -> None:
        close = getattr(self.link, "shutdown", None)
        if close is not None:
            close()
