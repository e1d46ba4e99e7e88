"""Each reasoning family with a tiny random model whose tokenizer and chat template have that family's shape.

The templates are written here from the families' public formats; nothing is downloaded. A
scripted sampler makes the random model "write" a chosen text, so the test controls where the
thinking block opens and closes while the engine, the detector and the exit run for real.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import lynx_exit.engine.runner as engine_module
from lynx_exit.engine import Engine, GenerationConfig
from lynx_exit.exits import TokenBudget
from lynx_exit.models import LoadedModel
from lynx_exit.models.profile import ProfileOverrides, resolve_profile
from lynx_exit.serve.text import ChoiceText
from lynx_exit.tasks.grading import grade

CORPUS = ["Hmm, wait, 3 + 4 = 7. Let me check. The answer is 7. Final Answer: \\boxed{7}"] * 4


def _loop(open_: str, close: str, body: str) -> str:
    return "{% for m in messages %}" + open_ + body + close + "{% endfor %}"


# name: (special tokens, bos, eos, chat template, expected family, expected start, thinking open/close as
# the model writes them)
FAMILY_SHAPES = {
    "deepseek-r1": (
        [
            "<｜begin▁of▁sentence｜>",
            "<｜end▁of▁sentence｜>",
            "<｜User｜>",
            "<｜Assistant｜>",
            "<think>",
            "</think>",
        ],
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}<｜User｜>{{ m.content }}{% endif "
        "%}{% endfor %}"
        "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}",
        "think",
        "template",
        "",
        "</think>",
    ),
    "qwen3": (
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
        None,
        "<|im_end|>",
        _loop("<|im_start|>", "<|im_end|>\n", "{{ m.role }}\n{{ m.content }}")
        + "{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif "
        "%}{% endif %}",
        "qwen3",
        "model",
        "<think>\n",
        "</think>",
    ),
    "phi4-reasoning": (
        ["<|endoftext|>", "<|im_start|>", "<|im_sep|>", "<|im_end|>", "<think>", "</think>"],
        None,
        "<|im_end|>",
        "<|im_start|>system<|im_sep|>You are Phi. Reason inside <think> </think>, then answer.<|im_end|>"
        + _loop("<|im_start|>", "<|im_end|>", "{{ m.role }}<|im_sep|>{{ m.content }}")
        + "{% if add_generation_prompt %}<|im_start|>assistant<|im_sep|>{% endif %}",
        "phi4-reasoning",
        "model",
        "<think>",
        "</think>",
    ),
    "nemotron": (
        ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
        "<|begin_of_text|>",
        "<|eot_id|>",
        "{{ bos_token }}{% if messages[0].role != 'system' %}<|start_header_id|>system<|end_header_id|>\n\n"
        "detailed thinking off<|eot_id|>{% endif %}"
        + _loop("<|start_header_id|>", "<|eot_id|>", "{{ m.role }}<|end_header_id|>\n\n{{ m.content }}")
        + "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
        "nemotron",
        "model",
        "<think>\n",
        "</think>",
    ),
    "magistral": (
        ["<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[THINK]", "[/THINK]"],
        "<s>",
        "</s>",
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}[SYSTEM_PROMPT]{{ m.content "
        "}}[/SYSTEM_PROMPT]"
        "{% elif m.role == 'user' %}[INST]{{ m.content }}[/INST]{% endif %}{% endfor %}",
        "magistral",
        "model",
        "[THINK]",
        "[/THINK]",
    ),
    "gpt-oss": (
        ["<|startoftext|>", "<|return|>", "<|start|>", "<|end|>", "<|message|>", "<|channel|>"],
        None,
        "<|return|>",
        _loop("<|start|>", "<|end|>", "{{ m.role }}<|message|>{{ m.content }}")
        + "{% if add_generation_prompt %}<|start|>assistant{% endif %}",
        "gpt-oss",
        "model",
        "<|channel|>analysis<|message|>",
        "<|end|><|start|>assistant<|channel|>final<|message|>",
    ),
    "smollm2": (
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        None,
        "<|im_end|>",
        _loop("<|im_start|>", "<|im_end|>\n", "{{ m.role }}\n{{ m.content }}")
        + "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        "generic",
        "template",
        "",
        "\n",
    ),
}


def family_lm(name: str, overrides: ProfileOverrides | None = None) -> LoadedModel:
    specials, bos, eos, template, *_ = FAMILY_SHAPES[name]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=eos)
    tokenizer.chat_template = template
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=20,
        intermediate_size=28,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_id=f"tiny-{name}",
        profile=resolve_profile(model, tokenizer, overrides),
    )


def run_scripted(monkeypatch, lm, written: str, answer: str = "7}", policy=None, config=None):
    """Run the engine on a real prompt while the sampler "writes" `written`, then `answer` after a forced
    exit."""
    think_ids, answer_ids = lm.encode(written), lm.encode(answer)
    engine = Engine(lm, max_batch_size=1)

    def scripted_sample(logits, params, generators):
        request = next(r for r in engine._requests.values() if r.finish_reason is None)
        if request.phase in ("think", "answer"):
            position = request.index + 1
            token = think_ids[position] if position < len(think_ids) else lm.tokenizer.eos_token_id
        elif request.phase == "exit_cue" and request.forced:
            token = 0  # ignored: the exit cue is forced
        else:
            position = 0 if request.phase == "exit_cue" else request.answer_tokens + 1
            token = answer_ids[min(position, len(answer_ids) - 1)]
        return torch.tensor([token] * logits.shape[0])

    monkeypatch.setattr(engine_module, "sample", scripted_sample)
    config = config or GenerationConfig(
        max_new_tokens=len(think_ids) + 4, temperature=0.0, answer_max_tokens=6
    )
    prompt = lm.prompt_ids("Wait, what is 3 + 4? Hmm.")  # cue words in the prompt are never events
    request_id = engine.add_request(prompt, config, policy=policy)
    steps = [s for s in engine.stream() if s.phase != "end"]
    return steps, engine.result(request_id)


@pytest.mark.parametrize("name", list(FAMILY_SHAPES))
def test_family_is_recognised_and_thinking_read_from_its_template(name):
    _, _, _, _, family, start, *_ = FAMILY_SHAPES[name]
    lm = family_lm(name)
    assert (lm.profile.family, lm.profile.thinking) == (family, start), lm.profile.reason
    assert family in lm.profile.reason


@pytest.mark.parametrize("name", list(FAMILY_SHAPES))
def test_natural_end_of_thinking_cues_only_inside_and_the_grader_reads_the_answer(monkeypatch, name):
    *_, opens, closes = FAMILY_SHAPES[name]
    lm = family_lm(name)
    thinking = "Hmm, 3 + 4 = 7. Wait, let me check."
    answer = " Wait: the answer is \\boxed{7}"  # a cue word in the answer is not an event
    if lm.profile.think_end is None:  # no markers: all generated text is thinking
        written = thinking + answer
    else:
        # Where the model opens thinking itself, text before the marker is not thinking either.
        written = ("Wait. " if lm.profile.thinking == "model" else "") + opens + thinking + closes + answer
    steps, result = run_scripted(monkeypatch, lm, written)
    cues = [s.cue for s in steps if s.cue is not None]
    expected = ["hmm", "wait", "wait"] if lm.profile.think_end is None else ["hmm", "wait"]
    assert cues == expected
    assert result.finish_reason == "eos" and grade("gsm8k", result.text, "7")
    if lm.profile.think_end is not None:
        end = written.index(lm.profile.think_end) + len(lm.profile.think_end)
        thinking_tokens = len(lm.encode(written[:end]))
        assert result.reasoning_tokens == thinking_tokens
        assert all(s.phase == "think" for s in steps[:thinking_tokens])
        assert all(s.phase == "answer" for s in steps[thinking_tokens:])


@pytest.mark.parametrize("name", list(FAMILY_SHAPES))
def test_an_exit_writes_the_family_format_and_the_grader_reads_it(monkeypatch, name):
    *_, opens, closes = FAMILY_SHAPES[name]
    lm = family_lm(name)
    written = opens + "Hmm, 3 + 4 = 7. " * 6
    budget = len(lm.encode(opens)) + 5
    steps, result = run_scripted(monkeypatch, lm, written, policy=TokenBudget(budget))
    assert result.finish_reason == "exit" and result.exit_index == budget - 1
    cue_text = lm.profile.exit_cue_text("boxed")
    assert cue_text.startswith(closes) and cue_text.endswith("Final Answer: \\boxed{")
    assert cue_text in result.text and result.text.endswith(cue_text + "7}")
    assert grade("gsm8k", result.text, "7")
    marker = lm.profile.think_end
    if marker in lm.tokenizer.get_added_vocab():  # the marker goes in as the family's own token, not as text
        assert lm.tokenizer.convert_tokens_to_ids(marker) in lm.exit_cue_ids("boxed")


def test_qwen3_thinking_switched_off_has_no_thinking_region(monkeypatch):
    lm = family_lm("qwen3", ProfileOverrides(template_kwargs={"enable_thinking": False}))
    assert lm.profile.thinking == "off" and "switched off" in lm.profile.reason
    assert lm.tokenizer.decode(lm.prompt_ids("hi")).endswith("<think>\n\n</think>\n\n")
    steps, result = run_scripted(monkeypatch, lm, "Wait, the answer is \\boxed{7}", policy=TokenBudget(2))
    assert all(s.phase == "answer" and s.cue is None for s in steps)
    assert result.finish_reason == "eos" and result.reasoning_tokens == 0 and grade("gsm8k", result.text, "7")


def test_nemotron_adds_its_system_prompt_and_overrides_replace_any_field():
    lm = family_lm("nemotron")
    assert "detailed thinking on" in lm.tokenizer.decode(lm.prompt_ids("hi"))
    custom = family_lm("deepseek-r1", ProfileOverrides(think_end="</reasoning>", exit_close="</reasoning>\n"))
    assert custom.profile.exit_cue_text("boxed") == "</reasoning>\nFinal Answer: \\boxed{"
    assert custom.profile.exit_cue_text("So the answer is \\boxed{") == "So the answer is \\boxed{"


def test_a_probe_built_under_one_profile_is_refused_under_another():
    lm = family_lm("qwen3")
    other = family_lm("qwen3", ProfileOverrides(template_kwargs={"enable_thinking": False}))
    with pytest.raises(ValueError, match=r"profile thinking 'model' vs 'off'"):
        lm.feature_spec().check_compatible(other.feature_spec(), what="probe")
    lm.feature_spec().check_compatible(family_lm("qwen3").feature_spec())


def test_readme_family_table_is_the_output_of_lynx_exit_profiles(capsys):
    from pathlib import Path

    from lynx_exit.cli import main

    assert main(["profiles"]) == 0
    printed = capsys.readouterr().out
    readme = (Path(__file__).parents[1] / "docs" / "families.md").read_text(encoding="utf-8")
    table = readme.split("<!-- profiles:start -->\n", 1)[1].split("<!-- profiles:end -->", 1)[0]
    assert table and printed.startswith(table)
    assert all(f"| {name} |" in table for name in FAMILY_FAMILIES)


FAMILY_FAMILIES = ("gpt-oss", "magistral", "nemotron", "phi4-reasoning", "qwen3", "think", "generic")


ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        {"num_local_experts": 2, "num_experts_per_tok": 1, "head_dim": 8},
    ),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"bos_token_id": 0, "eos_token_id": 0}),
}


@pytest.mark.parametrize("kind", list(ARCHITECTURES))
def test_hidden_state_taps_match_output_hidden_states_for_every_family_architecture(kind):
    import transformers

    from lynx_exit.models import HiddenStateCapture

    config_name, model_name, extra = ARCHITECTURES[kind]
    sizes = {
        "vocab_size": 53,
        "hidden_size": 24,
        "intermediate_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 3,
        "num_key_value_heads": 3,
        "max_position_embeddings": 64,
        "n_embd": 24,
        "n_layer": 3,
        "n_head": 3,
        "n_positions": 64,
    }
    config = getattr(transformers, config_name)(**sizes, **extra)
    torch.manual_seed(1)
    model = getattr(transformers, model_name)(config).eval()
    ids = torch.randint(0, 53, (2, 7))
    layers = (
        (1, 2, 3) if kind == "gpt2" else (0, 1, 2, 3)
    )  # GPT-2's layer 0 adds position embeddings: refused
    with torch.no_grad(), HiddenStateCapture(model, layers) as capture:
        hidden = model(ids, output_hidden_states=True).hidden_states
        got = capture.features()
    want = torch.cat([hidden[layer][:, -1, :] for layer in layers], dim=-1).float()
    torch.testing.assert_close(got, want)
    if kind == "gpt2":
        with pytest.raises(ValueError, match="position embeddings"):
            HiddenStateCapture(model, (0, 3))


def served(lm, steps):
    """(reasoning_content, content) of a chat response, pushed as the server's worker pushes steps."""
    text = ChoiceText.for_profile(lm.profile)
    for step in steps:
        if step.text and not (step.exit and step.cue is not None):
            text.push(step.text, step.phase)
        text.take()
    text.take(final=True)
    return text.reasoning, text.content


@pytest.mark.parametrize("name", [name for name, shape in FAMILY_SHAPES.items() if shape[4] != "generic"])
def test_the_server_splits_thinking_and_answer_without_the_family_markers(monkeypatch, name):
    *_, opens, closes = FAMILY_SHAPES[
        name
    ]  # markerless models: test_serve_text (all text is thinking until an exit)
    lm = family_lm(name)
    thinking = "Hmm, 3 + 4 = 7."
    # gpt-oss's `closes` opens the final channel too: the model writes the header itself
    steps, _ = run_scripted(monkeypatch, lm, opens + thinking + closes + "The answer is \\boxed{7}")
    reasoning, content = served(lm, steps)
    assert reasoning.strip() == thinking and content == "The answer is \\boxed{7}"

    written = opens + "Hmm, 3 + 4 = 7. " * 6
    steps, _ = run_scripted(monkeypatch, lm, written, policy=TokenBudget(len(lm.encode(opens)) + 5))
    reasoning, content = served(lm, steps)
    assert not any(marker in reasoning for marker in (lm.profile.think_start, lm.profile.think_end))
    assert written.removeprefix(opens).startswith(reasoning.strip()) and content == "Final Answer: \\boxed{7}"


def test_a_request_switches_qwen3_thinking_off_with_chat_template_kwargs():
    import openai
    from test_serve import BOUND_S, serving

    from lynx_exit.serve import Server, ServerOptions

    lm = family_lm("qwen3")
    defaults = GenerationConfig(max_new_tokens=12, min_new_tokens=12, temperature=1.0, cue_regex="e")
    options = ServerOptions(model_name="tiny-qwen3", defaults=defaults, max_batch_size=2, max_queue=4)
    messages = [{"role": "user", "content": "What is 3 + 4?"}]
    with serving(Server(lm, options)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=BOUND_S, max_retries=0)

        def ask(**extra):
            return client.chat.completions.create(
                model="tiny-qwen3", messages=messages, seed=1, extra_body=extra
            )

        thinking, direct = ask(), ask(chat_template_kwargs={"enable_thinking": False})
        with pytest.raises(openai.BadRequestError) as error:
            ask(chat_template_kwargs={"tokenize": True})
    off = lm.chat_ids(messages, {"enable_thinking": False})
    assert (
        lm.tokenizer.decode(off).endswith("<think>\n\n</think>\n\n")
        and lm.thinking_with({"enable_thinking": False}) == "off"
    )
    assert direct.usage.prompt_tokens == len(off) and thinking.usage.prompt_tokens == len(
        lm.chat_ids(messages)
    )
    # A tiny random model never writes `<think>`: with thinking on, all it writes is thinking; switched
    # off, none is.
    assert (thinking.choices[0].message.model_extra or {}).get("reasoning_content") and not thinking.choices[
        0
    ].message.content
    assert direct.choices[0].message.content and not (direct.choices[0].message.model_extra or {}).get(
        "reasoning_content"
    )
    assert direct.usage.completion_tokens_details.reasoning_tokens == 0
    assert error.value.body["param"] == "chat_template_kwargs.tokenize"


def test_the_server_adds_the_family_system_prompt_only_when_the_messages_bring_none():
    lm = family_lm("nemotron")
    assert "detailed thinking on" in lm.tokenizer.decode(lm.chat_ids([{"role": "user", "content": "hi"}]))
    own = lm.tokenizer.decode(
        lm.chat_ids([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    )
    assert "be brief" in own and "detailed thinking" not in own
