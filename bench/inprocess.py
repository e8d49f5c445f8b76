"""Both sides in one process: the drafter and a verifier joined by ``LocalLink`` (no network).

This is the "in-process speculative" mode of the benchmark and the reference the networked
modes are compared against; target-only and draft-only runs go through the same loop.
"""

from __future__ import annotations

from dataclasses import dataclass

from cloud_worker.local_link import LocalLink
from cloud_worker.verifier import DEFAULT_MAX_SESSIONS, Verifier
from edge_agent.drafter import Drafter, make_drafter
from edge_agent.results import GenerationResult, collect
from edge_agent.speculative import GenerateOptions, SessionState, generate
from shared.models import LoadedModel, check_tokenizers_compatible, encode_prompt, load_model


@dataclass
class InProcessPair:
    """A draft and a target model wired together in this process."""

    draft: LoadedModel  # or a LlamaCppDraft (edge_agent.drafter_llamacpp): both quack alike here
    target: LoadedModel
    drafter: Drafter
    verifier: Verifier
    link: LocalLink

    @classmethod
    def load(
        cls, draft_spec: str, target_spec: str, *, device: str = "auto", dtype: str = "auto"
    ) -> InProcessPair:
        draft = load_model(draft_spec, device=device, dtype=dtype)
        target = load_model(target_spec, device=device, dtype=dtype)
        return cls.from_models(draft, target)

    @classmethod
    def from_models(
        cls, draft: LoadedModel, target: LoadedModel, *, max_sessions: int = DEFAULT_MAX_SESSIONS
    ) -> InProcessPair:
        check_tokenizers_compatible(draft, target)
        verifier = Verifier(target, worker_id="in-process", max_sessions=max_sessions)
        return cls(draft, target, make_drafter(draft), verifier, LocalLink(verifier))

    def encode_prompt(self, prompt: str, *, chat: bool = True) -> list[int]:
        return encode_prompt(self.draft.tokenizer, prompt, chat=chat)

    def run(self, prompt_ids: list[int], opts: GenerateOptions) -> GenerationResult:
        """One generation in ``opts.mode``; the text is decoded without special tokens."""
        state = SessionState()
        events = generate(
            self.drafter, self.link, prompt_ids, opts, eos_ids=self.target.eos_token_ids, state=state
        )
        result = collect(events, state=state)
        result.text = self.draft.tokenizer.decode(result.token_ids, skip_special_tokens=True)
        return result
