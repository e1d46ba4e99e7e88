"""Random sequences of the backend's cache verbs, each checked against the model's own forward pass (shared by
the CPU store tests and the GPU tests)."""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

Fresh = Callable[
    [list[int]], torch.Tensor
]  # a token list -> the model's next-token logits from a fresh forward


def exercise_cache_verbs(
    backend,
    vocab: int,
    fresh: Fresh,
    tolerance: float,
    rounds: int = 40,
    seed: int = 11,
    longest_prompt: int = 14,
) -> None:
    """prefill, decode, extend (several tokens in one pass), truncate (any number), release, compact and fork:
    after each, every live request's next-token logits equal `fresh` over its token list, and each fork's
    greedy tokens are the argmax of `fresh` over its prefix."""
    rng = random.Random(seed)
    held: dict[int, list[int]] = {}
    next_id = 0

    def check(request_ids, logits):
        for request_id, row in zip(request_ids, logits, strict=True):
            torch.testing.assert_close(
                row, fresh(held[request_id]).to(row.dtype), rtol=tolerance, atol=tolerance
            )

    for _round in range(rounds):
        verb = rng.choice(["prefill", "decode", "decode", "extend", "truncate", "release", "fork"])
        if verb == "prefill" or not held:
            ids = list(range(next_id, next_id + rng.randint(1, 3)))
            next_id += len(ids)
            prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(1, longest_prompt))] for _ in ids]
            held.update(zip(ids, prompts, strict=True))
            check(ids, backend.prefill(ids, prompts))
        elif verb == "decode":
            ids = rng.sample(sorted(held), rng.randint(1, len(held)))
            tokens = [rng.randrange(3, vocab) for _ in ids]
            for request_id, token in zip(ids, tokens, strict=True):
                held[request_id].append(token)
            check(ids, backend.decode(ids, tokens))
        elif verb == "extend":
            ids = rng.sample(sorted(held), rng.randint(1, len(held)))
            chunks = [[rng.randrange(3, vocab) for _ in range(rng.randint(1, 9))] for _ in ids]
            for request_id, chunk in zip(ids, chunks, strict=True):
                held[request_id] += chunk
            check(ids, backend.extend(ids, chunks))
        elif verb == "truncate":
            request_id = rng.choice(sorted(held))
            length = rng.randint(1, len(held[request_id]))
            backend.truncate(request_id, length)
            held[request_id] = held[request_id][:length]
            token = rng.randrange(3, vocab)
            held[request_id].append(token)
            check([request_id], backend.decode([request_id], [token]))
        elif verb == "release":
            request_id = rng.choice(sorted(held))
            backend.release(request_id)
            del held[request_id]
            backend.compact(drop_rows=False)
            assert sorted(backend.rows.values()) == list(range(len(held)))  # dense again
        else:
            request_id = rng.choice(sorted(held))
            keep = rng.randint(1, len(held[request_id]))
            forced = [rng.randrange(3, vocab) for _ in range(3)]
            ((tokens, _, _),) = backend.fork([(request_id, keep)], forced, 4, set(), lambda _i, _t: False)
            prefix = held[request_id][:keep] + forced
            for token in tokens:  # greedy continuation of the prefix, by the model alone
                assert token == int(fresh(prefix).argmax())
                prefix.append(token)
        for request_id, tokens in held.items():
            assert backend.length(request_id) == len(tokens)
