import pytest

from lynx_exit.tasks.grading import answers_match, extract_boxed, grade, gsm8k_gold


def test_balanced_boxed_extraction():
    assert extract_boxed(r"so \boxed{\frac{3}{4}} done") == r"\frac{3}{4}"
    assert extract_boxed(r"\boxed{1} then \boxed{2}") == "2"
    assert extract_boxed(r"\boxed{unclosed") is None
    assert extract_boxed("no box") is None


def test_gsm8k_gold():
    assert gsm8k_gold("blah\n#### 1,234") == "1234"
    with pytest.raises(ValueError, match="####"):
        gsm8k_gold("no marker")


@pytest.mark.parametrize(
    "answer,gold",
    [
        (r"\frac{1}{4}", r"\frac{3}{4}"),
        (r"3\sqrt{5}", r"2\sqrt{5}"),
        ("(2,7)", "(3,7)"),
        ("x^2+4", "x^2+5x+4"),
    ],
)
def test_official_checker_false_positives_are_wrong(answer, gold):
    assert not answers_match(answer, gold)


@pytest.mark.parametrize(
    "answer,gold",
    [
        (r"\frac{3}{4}", "0.75"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\pi/2)"),
        ("72.0", "72"),
        ("1,000", "1000"),
        (r"\$18", "18"),
    ],
)
def test_equivalent_answers_are_right(answer, gold):
    assert answers_match(answer, gold)


def test_grade_full_response_and_choices():
    assert grade("gsm8k", r"... </think> Final Answer: \boxed{18}", "18")
    assert not grade("gsm8k", "no box 18", "18")
    assert grade("csqa", r"\boxed{B}", "B")
    assert not grade("csqa", r"\boxed{A}", "B")


@pytest.mark.parametrize(
    "answer,gold",
    [
        ("-21", "-2,1"),  # a MATH answer with two solutions is a list, not a number
        ("1,2", "12"),
        (r"5\text{ and }6", "56"),
        ("2000001", "2000000"),  # integers match exactly, however large
        ("123456789", "123456790"),
        ("2.5", "2.6"),
    ],
)
def test_lists_and_near_integers_are_wrong(answer, gold):
    assert not answers_match(answer, gold)


@pytest.mark.parametrize(
    "answer,gold",
    [
        ("1,-2", "-2,1"),
        ("1" * 400, "1" * 400),  # no overflow to inf
        (r"\textbf{(073)}", "73"),  # AIME style
        ("(073)", "73"),
        (r"18\text{ cm}", "18"),
        ("e", "e"),  # the constant, not a choice letter
        ("0.3333333", "0.33333333"),  # non-integers keep a relative tolerance
    ],
)
def test_list_forms_big_integers_and_aime_forms_are_right(answer, gold):
    assert answers_match(answer, gold)


def test_gold_e_is_the_constant_not_a_letter():
    assert not answers_match("E", "2") and not answers_match("2.718", "e")
    assert grade("math", r"\boxed{e}", "e")


@pytest.mark.parametrize(
    "boxed", ["B", "(B)", "B.", "B)", "b", r"\text{B}", r"\mathrm{B}", r"\textbf{(B)}", r"\text{(B)}", "$B$"]
)
def test_csqa_accepts_the_usual_forms_of_the_right_letter(boxed):
    assert grade("csqa", rf"answer: \boxed{{{boxed}}}", "B")
    assert not grade("csqa", rf"answer: \boxed{{{boxed}}}", "C")


@pytest.mark.parametrize("boxed", ["bank", "Bank", "B bank", "", "AB"])
def test_csqa_rejects_words(boxed):
    assert not grade("csqa", rf"\boxed{{{boxed}}}", "B")


def test_symbolic_time_limit_holds_off_the_main_thread():
    import threading
    import time

    results: list[tuple[bool, float]] = []

    def work() -> None:
        started = time.monotonic()
        results.append((answers_match(r"9^{9^{9^9}}", "5", timeout_s=1), time.monotonic() - started))
        results.append((answers_match(r"\frac{3}{4}", "0.75", timeout_s=1), 0.0))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(timeout=90)
    assert not thread.is_alive(), "grading hung in a worker thread"
    assert results[0][0] is False and results[1][0] is True
