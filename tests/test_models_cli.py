import json

import pytest
import torch

from lynx_exit.cli import main
from lynx_exit.models import FeatureSpec, HiddenStateCapture, default_layers, load_model


def test_default_layer_rule():
    assert default_layers(28) == (7, 14, 21, 28)
    assert default_layers(4) == (1, 2, 3, 4)
    assert default_layers(1) == (1,)
    with pytest.raises(ValueError, match="num_layers"):
        default_layers(0)


def test_local_folder_round_trip_and_spec(tiny_lm, tmp_path):
    tiny_lm.model.save_pretrained(tmp_path / "m")
    tiny_lm.tokenizer.save_pretrained(tmp_path / "m")
    lm = load_model(str(tmp_path / "m"), dtype="float64")
    assert lm.profile.think_end == "</think>"
    spec = lm.feature_spec()
    assert spec.tokenizer_hash == tiny_lm.feature_spec().tokenizer_hash
    assert FeatureSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    ids = lm.prompt_ids("hi")
    torch.testing.assert_close(
        lm.model(torch.tensor([ids])).logits, tiny_lm.model(torch.tensor([ids])).logits
    )


def test_load_errors_name_the_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("./no/such/folder")
    with pytest.raises(ValueError, match="dtype"):
        load_model("x", dtype="int8")


def test_capture_rejects_bad_layer(tiny_lm):
    with pytest.raises(ValueError, match="out of range"):
        HiddenStateCapture(tiny_lm.model, [7])


def test_cli_generate_json_on_local_model(tiny_lm, tmp_path, capsys):
    tiny_lm.model.save_pretrained(tmp_path / "m")
    tiny_lm.tokenizer.save_pretrained(tmp_path / "m")
    code = main(
        [
            "generate",
            "--model",
            str(tmp_path / "m"),
            "--json",
            "--max-new-tokens",
            "12",
            "--exit",
            "token-budget",
            "--budget",
            "5",
            "--answer-max-tokens",
            "3",
            "What is 2+2?",
        ]
    )
    assert code == 0
    record = json.loads(capsys.readouterr().out)
    assert record["exit_index"] == 4 and record["finish_reason"] == "exit"
    assert (
        main(
            [
                "generate",
                "--model",
                str(tmp_path / "m"),
                "--task",
                "gsm8k",
                "--index",
                "1",
                "--max-new-tokens",
                "5",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "gold '3'" in out


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope.gguf"), "hi"]) == 2
    assert "nope.gguf" in capsys.readouterr().err
    assert main(["generate", "--exit", "token-budget", "--model", str(tmp_path), "hi"]) == 2


@pytest.mark.slow
def test_smollm2_gguf_generates_offline():
    lm = load_model("smollm2")
    assert lm.profile.think_end is None and lm.num_layers == 30
    from lynx_exit.engine import DecodeLoop, GenerationConfig

    ids = lm.prompt_ids("What is 7*8?")
    result = DecodeLoop(
        lm, [ids], GenerationConfig(max_new_tokens=16, temperature=0), layers=lm.feature_spec().layers
    ).run()[0]
    reference = lm.model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=16,
        do_sample=False,
    )
    assert (
        result.token_ids == reference[0, len(ids) :].tolist()
    )  # a real LM, not a reasoner: check the loop, not the math
    assert "7" in result.text
    assert lm.exit_cue_ids() == lm.encode("\nFinal Answer: \\boxed{")


@pytest.mark.hub
def test_hub_id_loads():  # deselected by default: needs network
    lm = load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert lm.num_layers == 30


def test_prompt_longer_than_the_context_is_refused_naming_both_lengths(tiny_lm):
    """Reproduction: a 32,509-token prompt against 1,024 positions ran silently and printed garbage."""
    from lynx_exit.engine import Engine

    context = tiny_lm.context_length
    engine = Engine(tiny_lm)
    with pytest.raises(ValueError, match=rf"{context + 5} tokens .* context of {context} positions"):
        engine.add_request([5] * (context + 5))
    assert engine.num_waiting == 0


def test_lone_surrogate_in_a_prompt_is_a_clear_error(tiny_lm):
    """Reproduction: `generate $'\\xed\\xa0\\x80'` ended in a tokenizer TypeError traceback."""
    with pytest.raises(ValueError, match="lone surrogate"):
        tiny_lm.prompt_ids("What is \ud800 3+4?")
    with pytest.raises(ValueError, match="position 2"):
        tiny_lm.encode("ab\udcff")


def test_arith_task_refuses_a_data_file_and_train_reference_writes_under_the_working_directory(capsys):
    """Reproductions: `--task arith --data F` ignored F; `train-reference` without --out wrote into the
    package."""
    from lynx_exit.cli import build_parser, main

    assert main(["eval", "--task", "arith", "--data", "some.jsonl", "--methods", "never", "--out", "x"]) == 2
    assert "takes no --data" in capsys.readouterr().err
    args = build_parser().parse_args(["train-reference"])
    assert args.out == "runs/reference"


@pytest.mark.parametrize(
    "flag,value", [("--temperature", "nan"), ("--temperature", "inf"), ("--top-p", "nan")]
)
def test_non_finite_sampling_flags_are_refused_naming_the_field(capsys, flag, value):
    """Reproduction: `--temperature nan` ended in a traceback; `inf` sampled uniformly."""
    assert main(["generate", flag, value, "--max-new-tokens", "4", "What is 2+2?"]) == 2
    err = capsys.readouterr().err
    assert flag.lstrip("-").replace("-", "_") in err and value in err and "Traceback" not in err
