import pytest

from lynx_exit.grading import answers_match, extract_boxed, grade, gsm8k_gold


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
    [(r"\frac{1}{4}", r"\frac{3}{4}"), (r"3\sqrt{5}", r"2\sqrt{5}"), ("(2,7)", "(3,7)"), ("x^2+4", "x^2+5x+4")],
)
def test_official_checker_false_positives_are_wrong(answer, gold):
    assert not answers_match(answer, gold)


@pytest.mark.parametrize(
    "answer,gold",
    [(r"\frac{3}{4}", "0.75"), (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\pi/2)"), ("72.0", "72"), ("1,000", "1000"), (r"\$18", "18")],
)
def test_equivalent_answers_are_right(answer, gold):
    assert answers_match(answer, gold)


def test_grade_full_response_and_choices():
    assert grade("gsm8k", r"... </think> Final Answer: \boxed{18}", "18")
    assert not grade("gsm8k", "no box 18", "18")
    assert grade("csqa", r"\boxed{B}", "B")
    assert not grade("csqa", r"\boxed{A}", "B")
