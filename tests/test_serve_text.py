"""How a choice's text is split into thinking and answer, cut at stop strings, and streamed."""

import pytest

from lynx_exit.serve.text import ChoiceText


def feed(text: ChoiceText, pieces, final_each=False):
    """Push (text, phase) pieces, taking deltas after each; returns everything sent per channel."""
    sent = ["", ""]
    for piece, phase in pieces:
        text.push(piece, phase)
        reasoning, content = text.take()
        sent = [sent[0] + reasoning, sent[1] + content]
    reasoning, content = text.take(final=True)
    return sent[0] + reasoning, sent[1] + content


def test_marker_split_across_tokens_is_dropped_and_the_answer_starts_clean():
    text = ChoiceText("</think>")
    pieces = [
        ("Let me", "think"),
        (" add. </", "think"),
        ("thi", "think"),
        ("nk>", "think"),
        ("\n\nThe answer", "answer"),
        (" is 7.", "answer"),
    ]
    assert feed(text, pieces) == ("Let me add. ", "The answer is 7.")
    assert (text.reasoning, text.content) == ("Let me add. ", "The answer is 7.")


def test_exit_cue_goes_to_content_without_the_marker_and_a_split_character_stays_in_thinking():
    text = ChoiceText("</think>")
    pieces = [
        ("3 + 4 = 7", "think"),
        ("\ufffd</think>", "exit_cue"),
        (" Final Answer: \\boxed{", "exit_cue"),
        ("7}", "forced_answer"),
    ]
    assert feed(text, pieces) == ("3 + 4 = 7\ufffd", "Final Answer: \\boxed{7}")


def test_streamed_deltas_never_send_a_marker_prefix_that_turns_out_to_be_the_marker():
    text = ChoiceText("</think>")
    text.push("abc </th", "think")
    reasoning, _ = text.take()
    assert "<" not in reasoning and reasoning == "abc"[: len(reasoning)]
    text.push("ink>ok", "think")
    rest, content = text.take(final=True)
    assert reasoning + rest == "abc " and content == "ok"


@pytest.mark.parametrize("split", [True, False])
def test_stop_string_across_pieces_cuts_before_it_and_stops(split):
    text = ChoiceText("</think>", stop=("STOP",), split=split)
    pieces = [("one two ST", "think"), ("OP three", "think"), ("four", "think")]
    reasoning, content = feed(text, pieces)
    assert text.stopped
    assert (reasoning + content) == "one two "


def test_stop_string_in_the_answer_and_raw_completion_keeps_everything():
    text = ChoiceText("</think>", stop=("\n\n",))
    assert feed(text, [("think", "think"), ("</think>", "think"), ("A: 7\n\nmore", "answer")]) == (
        "think",
        "A: 7",
    )
    raw = ChoiceText("</think>", split=False)
    assert feed(raw, [("think", "think"), ("</think>", "think"), (" A: 7", "answer")]) == (
        "",
        "think</think> A: 7",
    )


def test_markerless_model_keeps_all_text_as_thinking_until_an_exit():
    text = ChoiceText(None)
    assert feed(
        text,
        [("no markers here", "think"), ("\nFinal Answer: \\boxed{", "exit_cue"), ("3}", "forced_answer")],
    ) == ("no markers here", "Final Answer: \\boxed{3}")


def test_an_opening_marker_the_model_writes_is_never_streamed_even_split_across_tokens():
    text = ChoiceText(
        "<|end|>",
        think_start="<|channel|>analysis<|message|>",
        answer_header="<|start|>assistant<|channel|>final<|message|>",
    )
    pieces = [
        ("<|channel|>ana", "think"),
        ("lysis<|mess", "think"),
        ("age|>Let me add.", "think"),
        ("<|end|><|start|>assistant", "think"),
        ("<|channel|>final<|message|>", "answer"),
        ("7", "answer"),
    ]
    sent = []
    for piece, phase in pieces:
        text.push(piece, phase)
        sent.append(text.take())
    sent.append(text.take(final=True))
    assert "".join(r for r, _ in sent) == "Let me add." and "".join(c for _, c in sent) == "7"
    assert all("<|" not in r + c for r, c in sent)


def test_a_model_that_never_opens_thinking_keeps_its_text_and_only_the_first_opening_marker_goes():
    assert feed(
        ChoiceText("</think>", think_start="<think>"), [("no marker", "think"), ("</think>A", "think")]
    ) == ("no marker", "A")
    assert feed(
        ChoiceText("</think>", think_start="<think>"),
        [("<think>a <think> b", "think"), ("</think>A", "think")],
    ) == ("a <think> b", "A")
