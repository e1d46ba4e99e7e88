"""Speculative Thinking as an engine plug-in: a larger model of the same family (the assistant) writes the
reflective steps of the running model (the thinker). See `assist` for the schedule and its knobs.

At a paragraph break the thinker writes a short look-ahead, kept aside; if it holds a keyword, the thinker is
rolled back to the break and the assistant writes the next tokens (it first reads, in one pass, what the
request holds and it has not seen); otherwise the look-ahead is committed token by token as if read one per
step (cues, features, the policy, an exit). After too many negative takeovers the recap sentence is queued and
the assistant writes on from it. The engine calls the hooks of `EnginePlugin`; nothing in its core knows of an
assistant."""

from __future__ import annotations

from typing import Any

import torch

from lynx_exit.engine.assist import AssistConfig, AssistState, Buffered, contains_any, ends_paragraph
from lynx_exit.engine.backend import Backend
from lynx_exit.engine.plugin import EnginePlugin
from lynx_exit.engine.postprocess import Postprocessor
from lynx_exit.engine.request import Batch, Request
from lynx_exit.engine.runner import Runner
from lynx_exit.engine.types import Step
from lynx_exit.models import LoadedModel, tokenizer_fingerprint


def check_same_tokenizer(thinker: LoadedModel, assistant: LoadedModel) -> None:
    """Speculative Thinking hands token ids from one model to the other: their tokenizers must be the same."""
    if tokenizer_fingerprint(thinker.tokenizer) != tokenizer_fingerprint(assistant.tokenizer):
        raise ValueError(
            f"the assistant model {assistant.model_id!r} does not share the tokenizer of "
            f"{thinker.model_id!r} "
            "(their token ids differ): choose a larger model of the same family"
        )


def fit_vocab(logits: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The assistant's logits over the thinker's vocabulary and dtype (same token ids; a head may be padded
    wider)."""
    vocab = like.shape[-1]
    if logits.shape[-1] < vocab:
        logits = torch.nn.functional.pad(logits, (0, vocab - logits.shape[-1]), value=float("-inf"))
    return logits[..., :vocab].to(like.dtype)


class SpeculativeThinking(EnginePlugin):
    hooked = True

    def __init__(
        self,
        lm: LoadedModel,
        backend: Backend,
        assistant_backend: Backend,
        runner: Runner,
        post: Postprocessor,
    ) -> None:
        self.lm, self.backend, self.assistant_backend = lm, backend, assistant_backend
        self.runner, self.post = runner, post
        self.eos_ids = lm.eos_token_ids

    def state(self, options: Any) -> AssistState | None:
        if options is not None and not isinstance(options, AssistConfig):
            raise TypeError(f"assist must be an AssistConfig, got {type(options).__name__}")
        return AssistState(options) if options is not None else None

    # -- the step's passes ------------------------------------------------------------------------------
    def before_step(self, running: list[Request]) -> None:
        """A thinker that takes its turn back without a token to read (its look-ahead was dropped, official
        schedule) re-reads its last token to sample the next one."""
        for request in running:
            if (
                request.assist is not None
                and request.assist.resume == "thinker"
                and request.finish_reason is None
            ):
                tokens = len(request.prompt_ids) + len(request.kept_ids)
                self.backend.truncate(request.request_id, tokens - 1)
                request.feed = (request.prompt_ids + request.kept_ids)[-1]

    def extra_pass(self, batch: Batch, running: list[Request]) -> None:
        """The assistant reads, in one pass, what each request it writes for holds and it has not seen; its
        logits replace the thinker's for those rows (or add a row for a request that has no token fed)."""
        rows = [
            r
            for r in running
            if r.assist is not None
            and r.assist.driver == "assistant"
            and r.finish_reason is None
            and not r.forced
            and (r.feed >= 0 or r.assist.resume == "assistant")
        ]
        if not rows:
            return
        logits_by_id = self._assistant_read(rows)
        like = batch.parts[0] if batch.parts else next(iter(logits_by_id.values()))
        fed_ids = [r.request_id for r in batch.fed]
        if batch.parts and any(request_id in logits_by_id for request_id in fed_ids):
            decoded = batch.parts[0].clone()
            for i, request_id in enumerate(fed_ids):
                if request_id in logits_by_id:
                    decoded[i] = fit_vocab(logits_by_id[request_id], like)
            batch.parts[0] = decoded
        resumed = [r for r in rows if r.request_id not in fed_ids and r.request_id in logits_by_id]
        if resumed:
            batch.parts.append(torch.stack([fit_vocab(logits_by_id[r.request_id], like) for r in resumed]))
            batch.resumed += resumed
        for request in resumed:
            request.assist.resume = None

    def _assistant_read(self, rows: list[Request]) -> dict[int, torch.Tensor]:
        """One assistant pass (a first read is a prefill, later ones extend); a row that fails fails alone."""
        out: dict[int, torch.Tensor] = {}
        groups = {
            first: [r for r in rows if (r.assist.synced == 0) == first] for first in (True, False)
        }  # before reading
        for first, group in groups.items():
            read = self.assistant_backend.prefill if first else self.assistant_backend.extend
            items = []
            for request in group:
                tokens = request.prompt_ids + request.kept_ids + ([request.feed] if request.feed >= 0 else [])
                if request.assist.synced >= len(
                    tokens
                ):  # it holds everything already: re-read the last token
                    request.assist.synced = len(tokens) - 1
                    self.assistant_backend.truncate(request.request_id, request.assist.synced)
                items.append((request, tokens[request.assist.synced :]))
            lengths = {r.request_id: len(chunk) for r, chunk in items}
            for members, logits in self.runner.read_chunks(items, read, prompt=False):
                for i, request in enumerate(members):
                    if not request.assist.takeover_ids:  # the first pass of a takeover: a hand-over read
                        request.assist.assistant_read += lengths[request.request_id]
                    request.assist.synced += lengths[request.request_id]
                    out[request.request_id] = logits[i]
        return out

    # -- per token --------------------------------------------------------------------------------------
    def intercept(self, request: Request, candidate: int) -> list[Step] | None:
        assist = request.assist
        if assist is None:
            return None
        if assist.resume == "thinker":  # it re-read its last token: nothing new
            assist.resume = None
            return self.post.next(request, candidate)
        if assist.lookahead is not None and request.phase == "think":
            return self._buffer(request, candidate)
        return None

    def after_sample(self, request: Request, candidate: int) -> None:
        """Count what the assistant wrote; end its takeover (or extend it once for a verify word)."""
        assist = request.assist
        if (
            assist is None
            or assist.driver != "assistant"
            or request.forced
            or request.finish_reason is not None
        ):
            return
        assist.assistant_tokens += 1
        assist.wrote(request.index)
        assist.takeover_ids.append(candidate)
        assist.left -= 1
        config = assist.config
        written = len(assist.takeover_ids)
        if written < config.takeover if config.to_break else assist.left > 0:
            return
        decode = self.lm.tokenizer.decode
        text = decode(assist.takeover_ids, skip_special_tokens=True)
        if (
            config.to_break
        ):  # on to the end of the paragraph: `takeover` tokens at least, the extension at most
            if (
                not ends_paragraph(text, decode([candidate]), config.trigger)
                and written < config.takeover + config.verify_extension
            ):
                return
        elif not assist.extended and config.verify_extension and contains_any(text, config.verify_words):
            assist.left, assist.extended = config.verify_extension, True
            assist.verify_extensions += 1
            return
        if config.sentiment(text) < 0:
            assist.negatives += 1
        assist.driver, assist.takeover_ids, assist.extended = "thinker", [], False

    def after_commit(self, request: Request, step: Step, candidate: int) -> None:
        if request.assist is not None:
            self._maybe_assist(request, step)
            self.after_sample(request, candidate)

    def _maybe_assist(self, request: Request, step: Step) -> None:
        """After the thinker commits a token: at a paragraph break while thinking, start a look-ahead, or
        (after too many negative takeovers) queue the recap sentence and hand over."""
        assist = request.assist
        config = assist.config
        if (
            assist.driver != "thinker"
            or assist.lookahead is not None
            or step.phase != "think"
            or request.feed < 0
            or request.phase != "think"
            or not ends_paragraph(request.text, step.text, config.trigger)
        ):
            return
        if assist.negatives >= assist.recap_after:  # too much reflection: a recap, written by the assistant
            recap = self.lm.tokenizer.encode(config.recap_text, add_special_tokens=False)
            request.feed = recap[0]
            request.forced.clear()
            request.forced.extend(recap[1:])
            assist.driver, assist.left, assist.takeover_ids, assist.extended = (
                "assistant",
                assist.recap_tokens,
                [],
                True,
            )
            assist.negatives = 0
            assist.recap_tokens = min(
                assist.recap_tokens + config.recap_tokens_growth, config.recap_tokens_max
            )
            assist.recap_after = min(assist.recap_after + config.recap_after_growth, config.recap_after_max)
            assist.recaps += 1
            assist.takeovers += 1
            return
        assist.lookahead = []
        assist.lookaheads += 1

    def _buffer(self, request: Request, candidate: int) -> list[Step]:
        """A look-ahead token was read: keep it aside; when the look-ahead is complete, decide."""
        assist = request.assist
        features = self.backend.hidden_states([request.request_id])[0] if request.layers else None
        assist.lookahead.append(Buffered(request.feed, request.index, request.feed_confidence, features))
        written = len(request.kept_ids) + len(assist.lookahead)
        full = (
            len(assist.lookahead) >= assist.config.lookahead
            or candidate in self.eos_ids
            or written >= request.config.max_new_tokens
        )
        if not full:
            request.index += 1
            request.feed = candidate
            request.feed_confidence, request.candidate_confidence = request.candidate_confidence, None
            return []
        buffered, assist.lookahead = assist.lookahead, None
        text = self.lm.tokenizer.decode([b.token_id for b in buffered], skip_special_tokens=True)
        keyword = assist.config.keywords.search(text) is not None
        if keyword or not assist.config.keep_lookahead:  # roll the thinker back to the paragraph break
            self.backend.truncate(request.request_id, len(request.prompt_ids) + len(request.kept_ids))
            assist.lookahead_tokens_discarded += len(buffered)
            request.feed, request.index = -1, len(request.kept_ids) - 1
            request.feed_confidence = request.candidate_confidence = None
            if keyword:
                assist.driver, assist.left, assist.takeover_ids, assist.extended = (
                    "assistant",
                    assist.config.takeover,
                    [],
                    False,
                )
                assist.resume = "assistant"
                assist.takeovers += 1
            else:
                assist.resume = "thinker"
            return []
        return self._commit(request, buffered, candidate)

    def _commit(self, request: Request, buffered: list[Buffered], candidate: int) -> list[Step]:
        """Commit a kept look-ahead token by token, as if read one per step (cues, features, policy, exit)."""
        steps: list[Step] = []
        for j, item in enumerate(buffered):
            after = buffered[j + 1].token_id if j + 1 < len(buffered) else candidate
            request.feed, request.index, request.feed_confidence = item.token_id, item.index, item.confidence
            steps += self.post.advance([request], [after], features=[item.features], hooks=False)
            if request.finish_reason is not None or not request.sampling:  # failed, finished or exited
                break
        return steps

    # -- the end of a request -----------------------------------------------------------------------------
    def on_exit(self, request: Request) -> None:
        if request.assist is not None:  # the answer after an exit is the thinker's
            request.assist.driver, request.assist.left, request.assist.lookahead = "thinker", 0, None

    def pending(self, request: Request) -> int:
        return len(request.assist.lookahead) if request.assist is not None and request.assist.lookahead else 0

    def free(self, request: Request, force: bool) -> bool:
        if request.assist is not None and request.assist.synced and (force or not request.hold):
            request.assist.synced = 0
            self.assistant_backend.release(request.request_id)
            return True
        return False

    def compact(self, drop_rows: bool) -> None:
        self.assistant_backend.compact(drop_rows=drop_rows)

    def report(self, request: Request, generated: int) -> dict[str, Any] | None:
        return request.assist.report(generated) if request.assist is not None else None
