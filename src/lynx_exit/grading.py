"""Answer extraction and grading (LYNX spec §8): balanced braces, symbolic equivalence, no last-number hacks."""

from __future__ import annotations

import re
import threading

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_CHOICE = re.compile(r"^\(?([A-Ea-e])\)?[.:]?$")


def extract_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None if absent."""
    for marker in ("\\boxed{", "\\fbox{"):
        start = text.rfind(marker)
        while start >= 0:
            depth, i = 1, start + len(marker)
            while i < len(text) and depth:
                depth += (text[i] == "{") - (text[i] == "}")
                i += 1
            if depth == 0:
                return text[start + len(marker) : i - 1].strip()
            start = text.rfind(marker, 0, start)
    return None


def gsm8k_gold(solution: str) -> str:
    """The GSM8K gold answer after `####`, with thousands separators removed."""
    if "####" not in solution:
        raise ValueError(f"GSM8K answer has no '####' marker: {solution[-80:]!r}")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def _as_number(text: str) -> float | None:
    cleaned = text.strip().strip("$").replace("\\$", "").replace("\\%", "").replace("%", "").replace("\\!", "")
    cleaned = re.sub(r"\\text\{[^}]*\}", "", cleaned).strip().rstrip(".")
    if _NUMBER.fullmatch(cleaned):
        return float(cleaned.replace(",", ""))
    return None


def _symbolic_equal(answer: str, gold: str, timeout_s: int) -> bool:
    from math_verify import parse, verify

    # math-verify's timeouts use SIGALRM, which only works on the main thread.
    timeout: int | None = timeout_s if threading.current_thread() is threading.main_thread() else None
    parsed_gold = parse(f"${gold}$", parsing_timeout=timeout)  # type: ignore[arg-type]
    parsed_answer = parse(f"${answer}$", parsing_timeout=timeout)  # type: ignore[arg-type]
    if not parsed_gold or not parsed_answer:
        return False
    return bool(verify(parsed_gold, parsed_answer, timeout_seconds=timeout))


def answers_match(answer: str | None, gold: str, timeout_s: int = 5) -> bool:
    """True if `answer` equals `gold`: numbers with tolerance, choice letters exactly, else symbolically."""
    if answer is None or not answer.strip():
        return False
    gold = gold.strip()
    number_answer, number_gold = _as_number(answer), _as_number(gold)
    if number_answer is not None and number_gold is not None:
        return abs(number_answer - number_gold) <= 1e-6 * max(1.0, abs(number_gold))
    choice_gold = _CHOICE.match(gold)
    if choice_gold:
        choice_answer = _CHOICE.match(answer.strip())
        return bool(choice_answer) and choice_answer.group(1).upper() == choice_gold.group(1).upper()  # type: ignore[union-attr]
    return _symbolic_equal(answer.strip(), gold, timeout_s)


def grade(task: str, response: str, gold: str) -> bool:
    """Grade a full model response of `task`: its last `\\boxed{}` against `gold`."""
    answer = extract_boxed(response)
    if task == "csqa":
        return answer is not None and answer.strip().strip("()").upper()[:1] == gold.strip().upper()
    return answers_match(answer, gold)
