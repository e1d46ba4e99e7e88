"""The seam between the engine and a model: a small protocol with named cache verbs.

The engine never calls the model or touches a KV cache; it speaks to a `Backend` in
requests (integer ids) and token ids. `StoreBackend` (a KV store written in place, `store_backend`)
is the implementation; the first one (one left-padded `DynamicCache`) lives on in
`benchmarks/legacy_backend.py` as the baseline the store is measured and tested against.

What another inference engine would have to provide to stand behind this protocol:
- `prefill`/`decode` as one scheduler step each, returning the last position's logits of
  every request it was given, in the order given; requests keep their own KV cache between
  steps until `release`.
- `capture(layers)` + `hidden_states(ids)`: the hidden state of the token each request just
  read, at those layers, for the requests asked (`[n, len(layers) * hidden]`). vLLM exposes no per-step
  intermediate hidden states: it would need a plugin model class that reads those layers inside its forward
  pass (and could score the LYNX probe there), plus a logits processor that forces the exit cue.
- `truncate`: roll one request back to a shorter prefix (the cue token at an exit, a look-ahead);
  `extend`: append several known tokens to requests in one pass (chunked prefill, a hand-over).
- `fork`: greedy continuations of several requests from a prefix of their own cache plus a
  few forced tokens, leaving the requests untouched (prefix caching / copy-on-write blocks in
  vLLM and SGLang).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch


class CacheFull(RuntimeError):
    """A backend cannot hold what a request needs (the context limit or the memory budget).

    `request_ids` names the requests that do not fit, when a decode step knows them (the others do): the
    engine fails those alone and decodes the rest."""

    def __init__(self, message: str, request_ids: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.request_ids = request_ids


def token_budget(backend: Backend) -> int | None:
    """Tokens of KV cache a backend may hold (None: as many as the requests need). Optional in a backend:
    `token_budget()` and `fits(count, longest)` (whether `count` requests of up to `longest` tokens fit
    together)."""
    method = getattr(backend, "token_budget", None)
    return method() if method is not None else None


def fits(backend: Backend, count: int, longest: int) -> bool:
    method = getattr(backend, "fits", None)
    return bool(method(count, longest)) if method is not None else True


class Backend(Protocol):
    """What the engine needs from a model. Requests are identified by the engine's ids."""

    def prefill(self, request_ids: Sequence[int], prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Read each prompt into a new request's cache; returns last-position logits [n, vocab]."""
        ...

    def decode(self, request_ids: Sequence[int], token_ids: Sequence[int]) -> torch.Tensor:
        """Feed one token to each request in one forward pass; returns logits [n, vocab]."""
        ...

    def capture(self, layers: Sequence[int]) -> None:
        """Hidden-state layers to keep from each `decode` from now on (output_hidden_states index
        convention)."""
        ...

    def hidden_states(self, request_ids: Sequence[int]) -> torch.Tensor:
        """Float32 hidden states [n, len(layers) * hidden] of the token each request read in the last
        `decode`."""
        ...

    def truncate(self, request_id: int, length: int) -> None:
        """Roll a request back to its first `length` tokens: later tokens neither see nor count the rest."""
        ...

    def extend(self, request_ids: Sequence[int], chunks: Sequence[Sequence[int]]) -> torch.Tensor:
        """Append several known tokens to each request in one pass; returns logits [n, vocab] after each
        chunk."""
        ...

    def fork(
        self,
        items: Sequence[tuple[int, int]],
        forced_ids: Sequence[int],
        max_new_tokens: int,
        stop_ids: set[int],
        done: Callable[[int, list[int]], bool],
    ) -> list[tuple[list[int], list[float], float]]:
        """Greedy continuations; item i continues request `items[i][0]` from its first `items[i][1]`
        tokens followed by `forced_ids`. Item i stops at a token in `stop_ids` (not kept), when
        `done(i, tokens)` holds or after `max_new_tokens` (0: none, only the forced tokens are read).
        Returns (token ids, their probabilities, the entropy in nats of the distribution right
        after the forced tokens)."""
        ...

    def release(self, request_id: int) -> None:
        """Free a request's cache."""
        ...

    def compact(self, drop_rows: bool) -> None:
        """Reclaim what released requests left; keep free rows for waiting requests unless `drop_rows`."""
        ...


def greedy_continuations(
    logits: torch.Tensor,
    max_new_tokens: int,
    stop_ids: set[int],
    done: Callable[[int, list[int]], bool],
    step: Callable[[torch.Tensor, list[int], int], torch.Tensor],
) -> list[tuple[list[int], list[float], float]]:
    """The greedy loop of `fork`, over any backend: `logits` [n, vocab] follow the forced tokens; `step(ids,
    host_ids, t)` reads the n chosen ids (every row, finished or not) and returns the next logits. One host
    sync per token."""
    n = logits.shape[0]
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    entropy = -(log_probs.exp() * log_probs).nansum(-1)  # [n], after the forced tokens
    if max_new_tokens == 0:
        return [([], [], value) for value in entropy.tolist()]
    outputs: list[list[int]] = [[] for _ in range(n)]
    probs_out: list[list[float]] = [[] for _ in range(n)]
    entropies: list[float] = []
    active = list(range(n))
    for t in range(max_new_tokens):
        probs = torch.softmax(logits.float(), dim=-1)
        next_ids = probs.argmax(-1)  # [n]
        chosen = probs.gather(-1, next_ids[:, None])[:, 0]
        host: list[torch.Tensor] = [next_ids.double(), chosen.double()] + (
            [entropy.double()] if t == 0 else []
        )
        ids_host, probs_host, *first = torch.stack(host).tolist()  # one sync
        entropies = first[0] if t == 0 else entropies
        still = []
        for i in active:
            token = int(ids_host[i])
            if token in stop_ids:
                continue
            outputs[i].append(token)
            probs_out[i].append(float(probs_host[i]))
            if not done(i, outputs[i]):
                still.append(i)
        active = still
        if not active or t + 1 == max_new_tokens:
            break
        logits = step(next_ids, [int(i) for i in ids_host], t)
    return list(zip(outputs, probs_out, entropies, strict=True))


def check_fork(
    items: Sequence[tuple[int, int]], forced_ids: Sequence[int], held: Callable[[int], int]
) -> None:
    """What every backend's `fork` refuses: no forced token, or a prefix longer than the request holds."""
    if not forced_ids:
        raise ValueError("fork needs at least one forced token")
    for request_id, keep in items:
        if not 0 < keep <= held(request_id):
            raise ValueError(f"request {request_id} holds {held(request_id)} tokens, cannot keep {keep}")
