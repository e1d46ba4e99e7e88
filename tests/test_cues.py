import pytest

from lynx_exit.cues import CueDetector, IncrementalDetokenizer, compile_cue_pattern


def run(pieces, think_end="</think>", **kw):
    words = kw.get("words", ("hmm", "wait", "alternatively"))
    max_chars = None if "regex" in kw else max(len(w) for w in words)
    full = _run(CueDetector(compile_cue_pattern(**kw), think_end=think_end), pieces)
    windowed = _run(
        CueDetector(compile_cue_pattern(**kw), think_end=think_end, max_cue_chars=max_chars), pieces
    )
    assert windowed == full
    if "regex" not in kw:  # told its words, the detector skips the scan of text that completes none
        skipping = CueDetector(
            compile_cue_pattern(**kw), think_end=think_end, max_cue_chars=max_chars, cue_words=words
        )
        assert _run(skipping, pieces) == full
    return full


def _run(detector, pieces):
    hits = []
    for i, piece in enumerate(pieces):
        lookahead = pieces[i + 1] if i + 1 < len(pieces) else ""
        cue = detector.step(piece, lookahead)
        if cue:
            hits.append((i, cue))
    return hits


def test_cue_split_across_tokens_reports_completing_token():
    assert run(["So", " wa", "it", ",", " ok"]) == [(2, "wait")]


def test_waiting_and_await_are_not_cues():
    assert run(["I", " wait", "ing", " to", " await", " you", "."]) == []


def test_case_insensitive_and_all_default_words():
    assert run(["Hmm", ".", " WAIT", "!", " Alternatively", ",", " x"]) == [
        (0, "hmm"),
        (2, "wait"),
        (4, "alternatively"),
    ]


def test_boundary_inside_same_token():
    assert run(["ok", " wait,", " then"]) == [(1, "wait")]


def test_cue_after_think_end_ignored_but_cue_right_before_counts():
    assert run(["wait", "</think>", " wait", "."]) == [(0, "wait")]
    assert run(["x", "</", "think>", " hmm", "."]) == []


def test_custom_words_and_regex():
    assert run(["a", " check", ".", " wait", "."], words=["check"]) == [(1, "check")]
    assert run(["step one.", "\n\n", "step two"], regex=r"\n\n") == [(1, "\n\n")]


def test_bad_cue_config_raises():
    with pytest.raises(ValueError, match="regex"):
        compile_cue_pattern(regex="(")
    with pytest.raises(ValueError, match="non-empty"):
        compile_cue_pattern(words=["wait", " "])


def test_long_stream_keeps_detecting_after_tail_trim():
    pieces = [" step"] * 100 + [" wait", "."]
    assert run(pieces) == [(100, "wait")]


def test_incremental_detokenizer_multibyte(tiny_lm):
    text = "café wait 你好 wait."
    ids = tiny_lm.encode(text)
    detok = IncrementalDetokenizer(tiny_lm.tokenizer)
    deltas = []
    for token in ids:
        peeked = detok.peek(token)
        delta = detok.push(token)
        assert peeked == delta
        deltas.append(delta)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_random_streams_match_whole_text_regex():
    import random
    import re

    rng = random.Random(0)
    vocab = ["wait", "Wait", "waiting", "hmm", "Hmm,", "alternatively", "x", "await", ".", "ok", "hmmm", "\n"]
    for _ in range(200):
        text = " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 30))) + " end"
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 40))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        expected = [m.end() - 1 for m in re.finditer(r"(?i)(?<!\w)(?:alternatively|wait|hmm)(?=\W)", text)]
        owner = [i for i, p in enumerate(pieces) for _ in p]  # char -> piece index
        # a piece holding two cue words reports one event (a token completes at most one cue event)
        assert [i for i, _ in run(pieces)] == sorted({owner[e] for e in expected})


def test_skipping_the_scan_equals_scanning_when_the_look_ahead_is_not_what_comes_next():
    """The engine may feed another token than the one it peeked at (a forced recap, an exit cue): a cue word
    the wrong look-ahead left unconfirmed is still found by the next step, with or without skipping."""
    import random

    rng = random.Random(1)
    words = ("hmm", "wait", "alternatively")
    vocab = ["wait", " Wait", "ing", ",", " x", "", "hmm", " alternatively", ".", " ok", "\n", "</think>"]
    vocab.append("é")
    for _ in range(300):
        pieces = [rng.choice(vocab) for _ in range(rng.randint(1, 25))]
        looks = [
            rng.choice(vocab) if rng.random() < 0.3 else (pieces[i + 1] if i + 1 < len(pieces) else "")
            for i in range(len(pieces))
        ]
        results = []
        for cue_words in (None, words):
            detector = CueDetector(compile_cue_pattern(words), max_cue_chars=13, cue_words=cue_words)
            steps = zip(pieces, looks, strict=True)
            results.append([(detector.step(p, a), detector.thinking) for p, a in steps])
        assert results[0] == results[1], (pieces, looks)


def test_detokenizer_reading_whole_tokens_from_their_table_equals_decoding(tiny_lm):
    """A byte-level tokenizer's whole-character tokens skip the decode of a peek: on random streams (special
    tokens, bytes of split characters, peeks at tokens never pushed) every peek and push is what decoding
    says."""
    import random

    rng = random.Random(3)
    tokenizer = tiny_lm.tokenizer
    fast = IncrementalDetokenizer(tokenizer)
    assert fast._whole is not None  # the tiny tokenizer is byte-level: the table is used
    split = tiny_lm.encode("café 你好 ∑ wait")  # tokens that are parts of a character
    vocab = list(range(len(tokenizer))) + split * 20
    for _ in range(60):
        fast, slow = IncrementalDetokenizer(tokenizer), IncrementalDetokenizer(tokenizer)
        slow._whole = None
        for _ in range(rng.randint(1, 40)):
            token = rng.choice(vocab)
            for other in (rng.choice(vocab), token):
                assert fast.peek(other) == slow.peek(other)
            assert fast.push(token) == slow.push(token)
        assert fast.token_ids == slow.token_ids
