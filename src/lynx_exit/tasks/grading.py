"""Answer extraction and grading (how-it-works §8): balanced braces, symbolic equivalence, no last-number
hacks.

Rules (README "Grading"): plain numbers are compared exactly when both are integers and with a
relative tolerance of 1e-6 otherwise; a comma inside a number is a thousands separator only in
groups of three (`1,000`), so `-2,1` is the list {-2, 1}; anything else goes to math-verify under
a time limit that holds in any thread; multiple-choice answers are graded by their letter only.
"""

from __future__ import annotations

import json
import logging
import re
import select
import subprocess
import sys
import threading
from decimal import Decimal, InvalidOperation

logger = logging.getLogger(__name__)

# A plain number: optional sign, digits with optional thousands groups of exactly three, optional decimals.
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
# A unit or word after a number (`18\text{ cm}`); only at the end, so `5\text{ and }6` stays a list.
_TRAILING_TEXT = re.compile(r"\\(?:text|mbox|mathrm)\{\s*[A-Za-z][A-Za-z ]*\}$")
# Formatting macros that may wrap a whole answer: `\textbf{(073)}`, `\text{B}`, `\mathrm{B}`.
_WRAPPER = re.compile(r"^\\(?:text|textbf|textit|textrm|mathbf|mathrm|mathit|mbox|boxed)\{(.*)\}$", re.DOTALL)
_CHOICE_LETTER = re.compile(r"^\(?([A-Za-z])\)?[.:)]?$")
CHOICE_LABELS = "ABCDE"


BOXED_MARKERS = ("\\boxed{", "\\fbox{")


def boxed_spans(text: str, marker: str) -> list[tuple[int, int]]:
    """(start, end after the closing brace) of every `marker` (e.g. `\\boxed{`) whose braces close in
    `text`."""
    spans = []
    start = text.find(marker)
    while start >= 0:
        depth, i = 1, start + len(marker)
        while i < len(text) and depth:
            depth += (text[i] == "{") - (text[i] == "}")
            i += 1
        if depth == 0:
            spans.append((start, i))
        start = text.find(marker, start + 1)
    return spans


def extract_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None if absent."""
    for marker in BOXED_MARKERS:
        spans = boxed_spans(text, marker)
        if spans:
            start, end = spans[-1]
            return text[start + len(marker) : end - 1].strip()
    return None


def gsm8k_gold(solution: str) -> str:
    """The GSM8K gold answer after `####`, with thousands separators removed."""
    if "####" not in solution:
        raise ValueError(f"GSM8K answer has no '####' marker: {solution[-80:]!r}")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def _unwrap(text: str) -> str:
    """`text` without surrounding `$`, whitespace and whole-answer formatting macros."""
    previous = None
    while text != previous:
        previous = text
        text = text.strip().strip("$").strip()
        wrapped = _WRAPPER.match(text)
        if wrapped and _balanced(wrapped.group(1)):
            text = wrapped.group(1)
    return text


def _balanced(text: str) -> bool:
    depth = 0
    for char in text:
        depth += (char == "{") - (char == "}")
        if depth < 0:
            return False
    return depth == 0


def _plain_number(text: str) -> str | None:
    """The digits of `text` if it is one plain number (units, `$`, `%`, parentheses allowed), else None."""
    cleaned = _unwrap(text).replace("\\$", "").replace("\\%", "").replace("%", "").replace("\\!", "")
    cleaned = _TRAILING_TEXT.sub("", cleaned).strip().strip("$").strip().rstrip(".")
    if cleaned.startswith("(") and cleaned.endswith(")") and "," not in cleaned:
        cleaned = cleaned[1:-1].strip()  # AIME-style `(073)`; `(2,700)` stays a pair
    if not _PLAIN_NUMBER.fullmatch(cleaned):
        return None
    return cleaned.replace(",", "")


def _numbers_equal(answer: str, gold: str) -> bool:
    """Integers exactly (any size); otherwise within a relative tolerance of 1e-6, in exact decimals."""
    if "." not in answer and "." not in gold:
        return int(answer) == int(gold)
    try:
        answer_value, gold_value = Decimal(answer), Decimal(gold)
    except InvalidOperation:
        return False
    return abs(answer_value - gold_value) <= Decimal("1e-6") * max(Decimal(1), abs(gold_value))


def answers_match(answer: str | None, gold: str, timeout_s: int = 5) -> bool:
    """True if math answer `answer` equals `gold`: plain numbers exactly (see module doc), else
    symbolically."""
    if answer is None or not answer.strip():
        return False
    number_answer, number_gold = _plain_number(answer), _plain_number(gold)
    if number_answer is not None and number_gold is not None:
        return _numbers_equal(number_answer, number_gold)
    return symbolic_equal(_unwrap(answer), _unwrap(gold), timeout_s)


def choice_letter(answer: str | None) -> str | None:
    """The choice letter of a multiple-choice answer (`B`, `(B)`, `B.`, `\\text{B}`, `\\textbf{(B)}`), else
    None."""
    if answer is None:
        return None
    letter = _CHOICE_LETTER.match(_unwrap(answer))
    return letter.group(1).upper() if letter else None


def grade(task: str, response: str, gold: str) -> bool:
    """Grade a full model response of `task`: its last `\\boxed{}` against `gold`.

    CSQA is graded by the choice letter alone: a word (`\\boxed{bank}`) is wrong even if it is
    the right choice's text, because the prompt asks for the letter.
    """
    answer = extract_boxed(response)
    if task == "csqa":
        letter = choice_letter(answer)
        return letter is not None and letter == gold.strip().upper()
    return answers_match(answer, gold)


# --- symbolic equivalence under a time limit that holds in any thread ---------------------------

# math-verify's time limits use SIGALRM, which only the main thread can set. Other threads (the
# server's worker, a thread pool) send the comparison to a child process that runs it on its own
# main thread; a child that misses the deadline (stuck in C code no signal can reach) is killed.
_CHILD_SOURCE = """
import json, sys
from math_verify import parse, verify
sys.stdout.write("ready\\n")
sys.stdout.flush()
for line in sys.stdin:
    request = json.loads(line)
    timeout = request["timeout_s"]
    try:
        gold = parse("$" + request["gold"] + "$", parsing_timeout=timeout)
        answer = parse("$" + request["answer"] + "$", parsing_timeout=timeout)
        result = bool(gold and answer and verify(gold, answer, timeout_seconds=timeout))
    except Exception:
        result = False
    sys.stdout.write("1\\n" if result else "0\\n")
    sys.stdout.flush()
"""
_CHILD_GRACE_S = 2.0
_CHILD_START_S = 60.0  # importing sympy on a loaded 2-core machine


class _SymbolicChild:
    """One long-lived child process that compares answers; restarted after a kill."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[str] | None = None

    def _started(self) -> subprocess.Popen[str]:
        if self._process is None or self._process.poll() is not None:
            self._process = subprocess.Popen(
                [sys.executable, "-c", _CHILD_SOURCE],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                bufsize=1,
            )
            assert self._process.stdout is not None
            ready, _, _ = select.select([self._process.stdout], [], [], _CHILD_START_S)
            if not ready or self._process.stdout.readline().strip() != "ready":
                self._process.kill()
                self._process.wait()
                self._process = None
                raise RuntimeError(
                    f"the math-verify grading process did not start within {_CHILD_START_S:.0f} s"
                )
        return self._process

    def equal(self, answer: str, gold: str, timeout_s: int) -> bool:
        with self._lock:
            process = self._started()
            assert process.stdin is not None and process.stdout is not None
            request = json.dumps({"answer": answer, "gold": gold, "timeout_s": timeout_s})
            try:
                process.stdin.write(request + "\n")
                process.stdin.flush()
                # Parsing and verifying each get `timeout_s` in the child; the grace covers its start-up.
                ready, _, _ = select.select([process.stdout], [], [], 3 * timeout_s + _CHILD_GRACE_S)
                reply = process.stdout.readline() if ready else ""
            except (BrokenPipeError, OSError):
                reply = ""
            if reply.strip() in ("0", "1"):
                return reply.strip() == "1"
            logger.warning(
                "symbolic comparison of %r and %r timed out after %d s: graded wrong", answer, gold, timeout_s
            )
            process.kill()
            process.wait()
            self._process = None
            return False


_CHILD = _SymbolicChild()


def symbolic_equal(answer: str, gold: str, timeout_s: int) -> bool:
    """math-verify's equivalence of two LaTeX answers; False if it takes longer than about `timeout_s`."""
    if threading.current_thread() is not threading.main_thread():
        return _CHILD.equal(answer, gold, timeout_s)
    from math_verify import parse, verify

    parsed_gold = parse(f"${gold}$", parsing_timeout=timeout_s)
    parsed_answer = parse(f"${answer}$", parsing_timeout=timeout_s)
    if not parsed_gold or not parsed_answer:
        return False
    return bool(verify(parsed_gold, parsed_answer, timeout_seconds=timeout_s))
