"""Speculative Thinking on the engine: the schedule on scripted models, hand-computed; caches and batching on
tiny real models; the tokenizer check."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import CORPUS, make_tiny_lm
from transformers import LlamaConfig, LlamaForCausalLM

from lynx_exit.engine import Engine, GenerationConfig
from lynx_exit.engine.assist import AssistConfig
from lynx_exit.models import LoadedModel
from lynx_exit.models.profile import resolve_profile
from lynx_exit.reference.problems import make_problems
from lynx_exit.reference.tokenizer import train_tokenizer

GREEDY = GenerationConfig(max_new_tokens=60, temperature=0)
PROBLEMS = [p.question() for p in make_problems("test", 3)]


class Scripted:
    """A backend whose next token is `script[k]` for the k-th generated position, whatever it has read; it
    records every call, so a test sees what each model read and when."""

    def __init__(self, script: list[int], vocab: int, eos: int, prompt_len: int) -> None:
        self.script, self.vocab, self.eos = script, vocab, eos
        self.tokens: dict[int, list[int]] = {}
        self.prompt_len = prompt_len
        self.calls: list[tuple] = []

    def _logits(self, request_ids) -> torch.Tensor:
        out = torch.full((len(request_ids), self.vocab), -30.0)
        for i, request_id in enumerate(request_ids):
            k = len(self.tokens[request_id]) - self.prompt_len
            out[i, self.script[k] if k < len(self.script) else self.eos] = 30.0
        return out

    def prefill(self, request_ids, prompts):
        self.calls.append(("prefill", list(request_ids), [list(p) for p in prompts]))
        for request_id, prompt in zip(request_ids, prompts, strict=True):
            self.tokens[request_id] = list(prompt)
        return self._logits(request_ids)

    def decode(self, request_ids, token_ids):
        self.calls.append(("decode", list(request_ids), list(token_ids)))
        for request_id, token in zip(request_ids, token_ids, strict=True):
            self.tokens[request_id].append(int(token))
        return self._logits(request_ids)

    def extend(self, request_ids, chunks):
        self.calls.append(("extend", list(request_ids), [list(c) for c in chunks]))
        for request_id, chunk in zip(request_ids, chunks, strict=True):
            self.tokens[request_id] += list(chunk)
        return self._logits(request_ids)

    def truncate(self, request_id, length):
        self.calls.append(("truncate", request_id, length))
        self.tokens[request_id] = self.tokens[request_id][:length]

    def capture(self, layers):
        pass

    def hidden_states(self, request_ids):
        return torch.zeros(len(request_ids), 4)

    def fork(self, *args, **kwargs):
        raise AssertionError("no trials in these tests")

    def release(self, request_id):
        self.tokens.pop(request_id, None)

    def compact(self, drop_rows):
        pass


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return make_tiny_lm()


def ids(lm: LoadedModel, text: str) -> list[int]:
    return lm.tokenizer.encode(text, add_special_tokens=False)


def expected(
    thinker: list[int],
    assistant: list[int],
    breaks: set[int],
    keyword_at: set[int],
    config: AssistConfig,
    verify_at: set[int] = frozenset(),
) -> list[int]:
    """The official schedule, by hand: position-indexed scripts; after a break at position k (the token at k-1
    ends a paragraph) the look-ahead k..k+L-1 is the thinker's; with a keyword in it, the assistant writes
    k..k+T-1 (+E when its text has a verify word), else the look-ahead is kept."""
    out: list[int] = []
    k = 0
    while k < len(thinker):
        if k in breaks:
            if k in keyword_at:
                length = config.takeover + (config.verify_extension if k in verify_at else 0)
                out += assistant[k : k + length]
                k += length
                continue
            out += thinker[k : k + config.lookahead]
            k += config.lookahead
            continue
        out.append(thinker[k])
        k += 1
    return out


def run_scripted(lm, thinker_text: str, assistant_text: str, config: AssistConfig, max_new_tokens: int = 60):
    eos = lm.tokenizer.eos_token_id
    thinker_ids, assistant_ids = ids(lm, thinker_text), ids(lm, assistant_text)
    vocab = lm.model.config.vocab_size
    prompt = lm.prompt_ids("What is 3+4?")
    thinker, assistant = (
        Scripted(script, vocab, eos, len(prompt)) for script in (thinker_ids, assistant_ids)
    )
    engine = Engine(lm, max_batch_size=2, backend=thinker, assistant=lm, assistant_backend=assistant)
    config_gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0)
    request_id = engine.add_request(prompt, config_gen, assist=config)
    list(engine.stream())
    return engine.result(request_id), thinker, assistant, thinker_ids, assistant_ids, prompt


def test_a_keyword_in_the_lookahead_hands_the_next_tokens_to_the_assistant(lm):
    config = AssistConfig(lookahead=4, takeover=5, verify_extension=0, trigger=".")
    # The thinker's paragraph ends at "." (the trigger here); its look-ahead starts with "Wait": a keyword.
    thinker_text = "Tom has 3 apples. Wait, let me check: 3 + 4 = 7 apples and 12 - 5 = 7 apples"
    assistant_text = "Tom has 3 apples. so we count 3 + 4 = 7, then 7 * 2 = 14 and 12 - 5 = 7 apples and"
    result, thinker, assistant, t_ids, a_ids, prompt = run_scripted(lm, thinker_text, assistant_text, config)
    first_break = next(k + 1 for k in range(len(t_ids)) if "." in lm.tokenizer.decode(t_ids[: k + 1])[-2:])
    want = t_ids[:first_break] + a_ids[first_break : first_break + 5]
    assert result.token_ids[: len(want)] == want
    # the assistant read the prompt and the thinker's paragraph in one pass, then one token per step
    assert assistant.calls[0] == ("prefill", [0], [prompt + t_ids[:first_break]])
    # the thinker's look-ahead was rolled back to the break with the truncate verb, not re-read from scratch
    assert ("truncate", 0, len(prompt) + first_break) in thinker.calls
    assert not [c for c in thinker.calls[1:] if c[0] == "prefill"]
    report = result.assist
    assert report["takeovers"] >= 1 and report["assistant_tokens"] >= 5
    assert report["assistant_read_tokens"] >= len(prompt) + first_break
    assert report["lookahead_tokens_discarded"] >= 4


def test_the_schedule_matches_the_hand_computed_one(lm):
    """Several paragraphs: with and without keywords, a verify extension, kept look-aheads."""
    config = AssistConfig(lookahead=3, takeover=4, verify_extension=3, trigger="\n\n")
    paragraphs = [
        "Tom has 3 apples.",
        "Hmm, he buys 4 more.",
        "Wait, 3 + 4 = 7.",
        "So 7 apples in all.",
        "Alternatively count them: 7.",
        "Final Answer: 7",
    ]
    thinker_text = "\n\n".join(paragraphs)
    t_ids = ids(lm, thinker_text)
    assistant_words = ["check", "it", "now", "so", "we", "count", "apples", "and", "pears", "twelve", "five"]
    a_ids = [ids(lm, " " + assistant_words[i % len(assistant_words)])[0] for i in range(len(t_ids) + 40)]
    result, *_ = run_scripted(
        lm, thinker_text, lm.tokenizer.decode(a_ids), config, max_new_tokens=len(t_ids) + 30
    )
    a_ids = ids(lm, lm.tokenizer.decode(a_ids))  # what the scripted assistant writes, as token ids
    # Breaks, keywords and verify words found the way the engine finds them, on the hand side.
    decode = lm.tokenizer.decode
    breaks, keyword_at, verify_at = set(), set(), set()
    out, k = [], 0
    while k < len(t_ids):  # walk the schedule, recording where each decision falls
        out_text = decode(out)
        if out and "\n\n" in out_text[-(len(decode(out[-1:])) + 1) :] and k not in breaks:
            breaks.add(k)
            look = decode(t_ids[k : k + config.lookahead])
            if config.keywords.search(look):
                keyword_at.add(k)
                taken = a_ids[k : k + config.takeover]
                if re.search(r"\bcheck\b", decode(taken)):
                    verify_at.add(k)
                    taken = a_ids[k : k + config.takeover + config.verify_extension]
                out += taken
                k += len(taken)
            else:
                out += t_ids[k : k + config.lookahead]
                k += config.lookahead
            continue
        out.append(t_ids[k])
        k += 1
    assert keyword_at and len(breaks) > len(keyword_at)  # both kinds of paragraph happen
    want = expected(t_ids, a_ids, breaks, keyword_at, config, verify_at)
    assert result.token_ids[: len(want)] == want


def test_a_dropped_lookahead_is_rewritten_by_the_thinker_in_the_official_mode(lm):
    config = AssistConfig(lookahead=3, takeover=4, keep_lookahead=False, trigger=".")
    thinker_text = "Tom has 3 apples. He buys 4 more apples and now has 7 apples in all"
    result, thinker, assistant, t_ids, _, prompt = run_scripted(lm, thinker_text, "x", config)
    # the same paragraph again (the scripted thinker writes by position), then its end of sequence
    assert result.token_ids == t_ids + [lm.tokenizer.eos_token_id]
    assert assistant.calls == []  # no keyword: the assistant never ran
    assert result.assist["lookahead_tokens_discarded"] >= 3 and result.assist["takeovers"] == 0


def test_too_many_negative_takeovers_write_the_recap_sentence(lm):
    config = AssistConfig(
        lookahead=2, takeover=2, verify_extension=0, recap_after=1, recap_tokens=3, trigger="."
    )
    thinker_text = "A. Wait b. Wait c. Wait d. Wait e. Wait f"
    assistant_text = (
        "wait wait wait wait wait wait wait wait wait wait wait wait wait wait wait wait wait wait"
    )
    result, *_ = run_scripted(lm, thinker_text, assistant_text, config)
    assert result.assist["recaps"] >= 1
    assert config.recap_text in result.text


def test_mismatched_tokenizers_are_refused(lm):
    other_tokenizer = train_tokenizer(CORPUS[:2] * 3, vocab_size=280)
    config = LlamaConfig(
        vocab_size=len(other_tokenizer),
        hidden_size=36,
        intermediate_size=52,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=3,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config).eval()
    other = LoadedModel(
        model=model,
        tokenizer=other_tokenizer,
        model_id="other",
        profile=resolve_profile(model, other_tokenizer),
    )
    with pytest.raises(ValueError, match="does not share the tokenizer"):
        Engine(lm, assistant=other)
    with pytest.raises(ValueError, match="built without one"):
        Engine(lm).add_request(lm.prompt_ids("Hi"), GREEDY, assist=AssistConfig())
    with pytest.raises(ValueError, match="lookahead"):
        AssistConfig(lookahead=0)


# The shipped reference pair (one tokenizer), in float64 so that batched and single rows agree to the bit: the
# small model writes "Hmm, ..." and "Wait, ..." re-checks on lines of their own, so with a line break as the
# trigger its look-aheads often hold a keyword.
FREQUENT = AssistConfig(lookahead=6, takeover=8, verify_extension=4, trigger="\n")


@pytest.fixture(scope="module")
def pair():
    from lynx_exit.models import load_model

    return load_model("reference", dtype="float64"), load_model("reference-large", dtype="float64")


def test_both_caches_equal_a_fresh_prefill_of_the_final_tokens(pair):
    thinker, assistant = pair
    engine = Engine(thinker, max_batch_size=2, assistant=assistant)
    config = GenerationConfig(max_new_tokens=200, temperature=0.6)
    prompt = thinker.prompt_ids(PROBLEMS[0])
    request_id = engine.add_request(prompt, config, seed=3, assist=FREQUENT, hold=True)
    list(engine.stream())
    result = engine.result(request_id)
    assert result.assist["takeovers"] >= 1 and result.assist["assistant_tokens"] >= 4
    tokens = prompt + result.token_ids
    for model, backend in ((thinker, engine.backend), (assistant, engine.assistant_backend)):
        held = backend.length(request_id)  # the thinker read everything; the assistant up to its last turn
        assert len(tokens) - 1 <= held <= len(tokens) if model is thinker else 0 < held <= len(tokens)
        with torch.inference_mode():
            out = model.model(input_ids=torch.tensor([tokens[:held]]), use_cache=True)
        fresh = getattr(out, "cache", None) or out.past_key_values  # transformers 5.2x renamed it
        slot = backend.rows[request_id]
        for layer in range(model.model.config.num_hidden_layers):
            torch.testing.assert_close(backend.store.keys[layer][slot, :, :held], fresh.layers[layer].keys[0])
            torch.testing.assert_close(
                backend.store.values[layer][slot, :, :held], fresh.layers[layer].values[0]
            )


def test_batching_invariance_with_some_rows_assisted_and_some_not(pair):
    thinker, assistant = pair
    config = GenerationConfig(max_new_tokens=200, temperature=0.6)
    texts = PROBLEMS
    plans = [(texts[0], FREQUENT), (texts[1], None), (texts[2], FREQUENT)]

    def alone(text, assist, seed):
        engine = Engine(thinker, max_batch_size=1, assistant=assistant)
        request_id = engine.add_request(thinker.prompt_ids(text), config, seed=seed, assist=assist)
        list(engine.stream())
        return engine.result(request_id)

    engine = Engine(thinker, max_batch_size=3, assistant=assistant)
    request_ids = [
        engine.add_request(thinker.prompt_ids(text), config, seed=i, assist=assist)
        for i, (text, assist) in enumerate(plans)
    ]
    list(engine.stream())
    for i, (request_id, (text, assist)) in enumerate(zip(request_ids, plans, strict=True)):
        together, single = engine.result(request_id), alone(text, assist, i)
        assert together.token_ids == single.token_ids
        assert together.assist == single.assist
    assert engine.result(request_ids[0]).assist["takeovers"] >= 1
    assert engine.result(request_ids[1]).assist is None


def test_generate_with_an_assistant_model_reports_what_each_model_wrote(capsys):
    import json

    from lynx_exit.cli import main

    question = make_problems("test", 1)[0].question()
    assert (
        main(
            [
                "generate",
                question,
                "--model",
                "reference",
                "--assistant-model",
                "reference-large",
                "--assist-trigger",
                "\\n",
                "--assist-lookahead",
                "6",
                "--assist-negative-words",
                "wait,hmm",
                "--assist-to-break",
                "--temperature",
                "0.6",
                "--seed",
                "2",
                "--json",
            ]
        )
        == 0
    )
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["assistant_model"] == "reference-large"
    assist = record["assist"]
    assert assist["thinker_tokens"] + assist["assistant_tokens"] == record["generated_tokens"]
    assert assist["lookaheads"] >= 1


def test_a_takeover_to_the_break_ends_with_the_assistants_paragraph(lm):
    config = AssistConfig(lookahead=3, takeover=2, verify_extension=30, trigger=".", to_break=True)
    thinker_text = "Tom has 3 apples. Wait, he buys 4 more and has 7 apples in all and so on"
    assistant_text = "Tom has 3 apples. so we count them again. then we are done and so on"
    result, thinker, assistant, t_ids, a_ids, prompt = run_scripted(lm, thinker_text, assistant_text, config)
    decode = lm.tokenizer.decode
    brk = next(k + 1 for k in range(len(t_ids)) if decode(t_ids[: k + 1]).endswith("."))
    end = next(k + 1 for k in range(brk + config.takeover - 1, len(a_ids)) if "." in decode(a_ids[k : k + 1]))
    assert result.token_ids[:end] == t_ids[:brk] + a_ids[brk:end]  # the assistant's sentence, whole
    assert result.assist["assistant_spans"][0] == [brk, end]
    assert result.token_ids[end] == t_ids[end]  # then the thinker again


def test_eval_runs_speculative_thinking_beside_the_small_model_alone(pair, tmp_path):
    from lynx_exit.evaluate import run_eval
    from lynx_exit.exits import parse_methods
    from lynx_exit.tasks import Problem

    thinker, assistant = pair
    problems = [
        Problem(task="arith", problem_id=str(i), question=p.question(), gold=str(p.answer))
        for i, p in enumerate(make_problems("test", 4))
    ]
    settings = parse_methods(["never", "speculative-thinking"])
    generation = GenerationConfig(max_new_tokens=200, temperature=0.6)
    with pytest.raises(ValueError, match="needs an assistant model"):
        run_eval(thinker, problems, settings, generation, tmp_path / "no-assistant", progress=False)
    summary = run_eval(
        thinker,
        problems,
        settings,
        generation,
        tmp_path / "eval",
        progress=False,
        assistant=assistant,
        assist=FREQUENT,
    )
    rows = {row["setting"]: row for row in summary["settings"]}
    assert rows["never"]["n"] == rows["speculative-thinking"]["n"] == 4
    assert "assistant_share" not in rows["never"]
    assert (
        0 < rows["speculative-thinking"]["assistant_share"] < 1
        and rows["speculative-thinking"]["mean_takeovers"] > 0
    )


def test_serve_runs_speculative_thinking_per_request(pair):
    import httpx
    from conftest import BOUND_S, serving

    from lynx_exit.serve import Server, ServerOptions

    thinker, assistant = pair
    options = ServerOptions(
        model_name="reference",
        defaults=GenerationConfig(max_new_tokens=120, temperature=0.6),
        max_batch_size=4,
    )
    body = {
        "model": "reference",
        "prompt": PROBLEMS[1],
        "max_tokens": 120,
        "seed": 4,
        "exit": {"method": "speculative-thinking"},
    }
    with serving(Server(thinker, options, assistant=assistant, assist=FREQUENT)) as url:
        answers = [
            httpx.post(url + "/v1/completions", json=b, timeout=BOUND_S)
            for b in (body, {**body, "exit": {"method": "never"}})
        ]
    assert [a.status_code for a in answers] == [200, 200], answers[0].text
    assert answers[0].json()["choices"][0]["text"]
    with serving(Server(thinker, options)) as url:  # no assistant on this server
        refused = httpx.post(url + "/v1/completions", json=body, timeout=BOUND_S)
    assert refused.status_code == 400 and "assistant" in refused.json()["error"]["message"]
