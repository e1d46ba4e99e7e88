"""Exit methods by name: each is registered once with its knob, and every front end derives from this.

CLI choices (`generate --exit`, `eval --methods`), the knob flags and their help, eval's grid
parsing, the server's validation and every "unknown method" message read `METHODS`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lynx_exit.decision_points import DEFAULT_POINTS, points_key
from lynx_exit.engine.types import Decision, ExitPolicy, Step, TrialKind

if TYPE_CHECKING:
    from lynx_exit.models import LoadedModel


class BasePolicy:
    """Defaults for the `ExitPolicy` attributes a method does not use."""

    name: str = ""
    decision_points: tuple[str, ...] = DEFAULT_POINTS
    feature_spec: Any = None
    scorer: Any = None
    banned_token_ids: frozenset[int] = frozenset()
    trial_tokens: int = 0
    confidence_top_k: int = 0
    exit_prefix: str | None = None  # what an exit keeps; None: the paper's (`decision_points.EXIT_PREFIXES`)
    # whether `trial_at` may ask a trial decode (the engine calls it only then): a method that keeps the
    # default `trial_at` asks none
    asks_trials: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "asks_trials" not in cls.__dict__:
            cls.asks_trials = cls.trial_at is not BasePolicy.trial_at

    def reset(self) -> None:
        self.trial_tokens = 0

    def trial_at(self, step: Step) -> TrialKind | None:
        return None

    def observe(self, step: Step) -> Decision:
        return Decision.CONTINUE


def first_exit(policy: ExitPolicy, steps: Iterable[Step]) -> int | None:
    """Offline replay: index of the first step of a recorded trajectory where `policy` exits."""
    policy.reset()
    for step in steps:
        if step.phase == "think" and policy.observe(step) in (Decision.EXIT, Decision.GIVE_UP):
            return step.index
    return None


@dataclass(frozen=True)
class Knob:
    """The one setting that traces a method's curve (δ, λ, a budget, an interval)."""

    name: str  # option name: the builder's keyword, the server's `exit` field
    flag: str  # single value, e.g. generate's --delta
    grid_flag: str  # comma-separated values, e.g. eval's --deltas
    parse: Callable[[str], dict[str, Any]]  # one value as typed -> options (the knob under `name`)
    help: str
    default: str | None = None  # for `flag`
    default_grid: str = ""  # for `grid_flag`

    def parse_value(self, text: str, source: str) -> dict[str, Any]:
        try:
            return self.parse(text.strip())
        except ValueError as exc:
            raise ValueError(f"{source}: bad {self.name} {text.strip()!r}: {exc}") from exc


# Bounds of whole-number settings: a window of answers or tokens, and a count of tokens. Nothing
# unbounded reaches a policy (a deque's maxlen, a tensor) from a request or a flag.
MAX_WINDOW = 4096
MAX_TOKENS = 2**31 - 1


def whole_number(value: Any, low: int, high: int) -> int:
    """`value` (an int, or text spelling one) as an int in [low, high]; ValueError saying why not."""
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError(f"must be a whole number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"must be in [{low}, {high}], got {value}")
    return value


def positive_int(text: str) -> int:
    return whole_number(text, 1, MAX_TOKENS)


@dataclass(frozen=True)
class Option:
    """A setting a method takes besides its knob, parsed and bounded like the knob is."""

    name: str
    parse: Callable[
        [Any], Any
    ]  # the value as given (JSON or flag text) -> the value the policy gets; ValueError if bad
    help: str


def window_option(name: str, help: str, low: int = 1) -> Option:
    return Option(name, lambda value: whole_number(value, low, MAX_WINDOW), help)


def choice_option(name: str, allowed: tuple[str, ...], help: str) -> Option:
    def parse(value: Any) -> str:
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}, got {value!r}")
        return str(value)

    return Option(name, parse, help)


@dataclass
class MethodContext:
    """What a method may need to build itself: the model and the shared, loaded artifacts."""

    lm: LoadedModel | None = None
    probe: str | None = None  # probe folder for the LYNX methods
    deepconf: str | None = None  # warm-up folder for deepconf
    shared: dict[str, Any] = field(default_factory=dict)  # loaded once per context (probes, banned ids)
    assistant: LoadedModel | None = None  # Speculative Thinking's larger model (`--assistant-model`)
    assist: Any = None  # its AssistConfig (None: the official values)

    def need_lm(self, method: str) -> LoadedModel:
        if self.lm is None:
            raise ValueError(f"exit method {method!r} needs the model to build itself")
        return self.lm

    def loaded_probe(self) -> tuple[Any, Any]:
        """The context's probe as (`ProbeBundle`, `ProbeScorer`): loaded once, checked against the model (any
        task's probe is accepted if it lives in this model's feature space at its own layers) and moved to its
        device."""
        from lynx_exit.probe import ProbeScorer, load_probe
        from lynx_exit.probe.sharing import locate_probe

        if self.probe is None:
            raise ValueError("the LYNX methods need a probe (--probe DIR or a Hub repo id OWNER/NAME)")
        key = f"probe:{self.probe}"
        if key not in self.shared:
            bundle = load_probe(locate_probe(self.probe))
            if self.lm is not None:
                bundle.spec.check_compatible(
                    self.lm.feature_spec(bundle.spec.layers), what=f"probe {self.probe!r}"
                )
                bundle.probe.to(self.lm.device)
            self.shared[key] = (bundle, ProbeScorer(bundle.probe))
        return self.shared[key]  # type: ignore[no-any-return]


class ExitSettingError(ValueError):
    """A bad exit setting; `param` names the field (`exit.method`, `exit.delta`, ...) and `code` the kind."""

    def __init__(self, param: str, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code

    def __reduce__(self) -> tuple[Any, ...]:  # crosses process boundaries (Ray workers) as itself
        return (ExitSettingError, (self.param, str(self), self.code))


@dataclass(frozen=True)
class ExitMethod:
    name: str
    summary: str
    build: Callable[[MethodContext, dict[str, Any]], ExitPolicy]
    knob: Knob | None = None
    fixed: tuple[tuple[str, Any], ...] = ()  # options this name pins (e.g. lynx-harm: mode=harm)
    options: tuple[Option, ...] = ()  # further settings it accepts besides the knob
    needs_probe: bool = False
    needs_deepconf: bool = False  # a warm-up folder (`--deepconf DIR`)
    assisted: bool = False  # Speculative Thinking: the assistant model writes the reflective steps

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(option.name for option in self.options)

    def resolve(self, given: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
        """The knob and options of a request's `exit` object (`given`, without "method") over `defaults`,
        parsed; `ExitSettingError` names the field at fault."""
        accepted = ({self.knob.name} if self.knob else set()) | set(self.option_names)
        unknown = sorted(set(given) - accepted)
        if unknown:
            raise ExitSettingError(
                f"exit.{unknown[0]}",
                f"exit method {self.name!r} takes {sorted(accepted) or 'no settings'} "
                f"besides 'method', got {unknown}",
            )
        options: dict[str, Any] = {}
        if self.knob is not None:
            knob, param = self.knob, f"exit.{self.knob.name}"
            value = given.get(knob.name, defaults.get(knob.name))
            if value is None:
                raise ExitSettingError(param, f"exit method {self.name!r} needs {param} ({knob.help})")
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise ExitSettingError(param, f"{param} must be a number or a string, got {value!r}")
            try:
                options.update(knob.parse_value(str(value), param))
            except ValueError as exc:
                raise ExitSettingError(param, str(exc)) from None
        for option in self.option_names:
            value = given.get(option, defaults.get(option))
            if value is None:
                continue
            try:
                options[option] = self.parse_option(option, value)  # the parsed value is what is reported
            except ValueError as exc:
                raise ExitSettingError(f"exit.{option}", f"exit.{option}: {exc}") from None
        return options

    def parse_option(self, name: str, value: Any) -> Any:
        """The parsed value of option `name`; ValueError naming the method, the option and the value."""
        option = next((o for o in self.options if o.name == name), None)
        if option is None:
            raise ValueError(f"exit method {self.name!r} takes no option {name!r}")
        try:
            return option.parse(value)
        except ValueError as exc:
            raise ValueError(f"{self.name} {name} {exc}") from None


METHODS: dict[str, ExitMethod] = {}


def register(method: ExitMethod) -> None:
    if method.name in METHODS:
        raise ValueError(f"exit method {method.name!r} is registered twice")
    METHODS[method.name] = method


def method_names() -> list[str]:
    return sorted(METHODS)


def get_method(name: str) -> ExitMethod:
    if name not in METHODS:
        raise ValueError(f"unknown exit method {name!r}; choose from {', '.join(method_names())}")
    return METHODS[name]


def knobs() -> list[Knob]:
    """Every distinct knob, once (methods may share one: the LYNX variants all take δ)."""
    seen: dict[str, Knob] = {}
    for name in method_names():
        knob = METHODS[name].knob
        if knob is not None and knob.name not in seen:
            seen[knob.name] = knob
    return list(seen.values())


def make_policy(name: str, context: MethodContext | None = None, **options: Any) -> ExitPolicy:
    """Build a registered method; `options` are its knob and options by name."""
    method = get_method(name)
    context = context or MethodContext()
    allowed = {method.knob.name} if method.knob else set()
    allowed |= set(method.option_names)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"exit method {name!r} takes {sorted(allowed) or 'no options'}, got {unknown}")
    options = {k: method.parse_option(k, v) if k in method.option_names else v for k, v in options.items()}
    if method.knob is not None and method.knob.name not in options:
        raise ValueError(f"exit method {name!r} needs {method.knob.name} ({method.knob.flag})")
    check_resources(method, context)
    return method.build(context, {**options, **dict(method.fixed)})


def check_resources(method: ExitMethod, context: MethodContext) -> None:
    """What the method needs besides its settings: an assistant model, a probe, a warm-up."""
    name = method.name
    if method.assisted and context.assistant is None:
        raise ExitSettingError(
            "exit.method", f"exit method {name!r} needs an assistant model (--assistant-model)"
        )
    if method.needs_probe and context.probe is None:
        raise ExitSettingError(
            "exit.method", f"exit method {name!r} needs a probe (--probe DIR or OWNER/NAME)"
        )
    if method.needs_deepconf and context.deepconf is None:
        raise ExitSettingError(
            "exit.method",
            f"exit method {name!r} needs a warm-up (--deepconf DIR, made by lynx-exit deepconf-warmup)",
        )


def resolve_exit_options(
    given: dict[str, Any] | None, default_method: str, defaults: dict[str, Any], context: MethodContext
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """An `exit` object ({"method": ..., knob and options}) over default settings: (method, options for
    `make_policy`, the settings to report). Checked once, here, by building the policy; `ExitSettingError`
    names the field at fault."""
    given = dict(given or {})
    name = given.pop("method", default_method)
    if not isinstance(name, str):
        raise ExitSettingError("exit.method", f"exit.method must be a string, got {name!r}")
    try:
        method = get_method(name)
    except ValueError as exc:
        raise ExitSettingError("exit.method", str(exc), code="unknown_exit_method") from None
    check_resources(method, context)
    options = method.resolve(given, defaults)
    try:
        make_policy(name, context, **options)
    except ExitSettingError:
        raise
    except ValueError as exc:  # e.g. δ not calibrated in the probe: the message lists the calibrated ones
        raise ExitSettingError(
            f"exit.{method.knob.name}" if method.knob else "exit.method", str(exc)
        ) from None
    return name, options, {**options, **dict(method.fixed)}


@dataclass(frozen=True)
class MethodSetting:
    """One point on a method's curve."""

    method: str
    knob: float | None
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def curve(self) -> str:
        """The method and the options that make another curve of it: decision points other than cues, a
        give-up."""
        options = dict(self.options)
        tags = []
        if options.get("decision_points") not in (None, DEFAULT_POINTS):
            tags.append(points_key(options["decision_points"]))
        if options.get("give_up_delta") is not None:
            tags.append(f"give-up {options['give_up_delta']:g}")
        return self.method + (f"[{', '.join(tags)}]" if tags else "")

    @property
    def label(self) -> str:
        return self.curve if self.knob is None else f"{self.curve}@{self.knob:g}"


def parse_methods(
    methods: Sequence[str],
    grids: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
    axes: dict[str, Sequence[Any]] | None = None,
) -> list[MethodSetting]:
    """Expand method names into settings, one per value of their knob's grid.

    `grids` maps a knob name to its comma-separated values (eval's --deltas, --budgets, ...);
    `extra` holds options given once for every method that accepts them (e.g. lynx's mode); `axes` options
    swept for every method that accepts them (eval's --decision-points, --give-up-deltas: parsed values, None
    = unset)."""
    grids, extra = grids or {}, extra or {}
    out: list[MethodSetting] = []
    for name in methods:
        method = get_method(name)
        fixed = {k: v for k, v in extra.items() if k in method.option_names and k not in dict(method.fixed)}
        swept = [
            (k, list(values)) for k, values in (axes or {}).items() if k in method.option_names and values
        ]
        variants = [
            {k: v for k, v in zip([k for k, _ in swept], combo, strict=True) if v is not None}
            for combo in itertools.product(*[values for _, values in swept])
        ]
        for variant in variants:
            base = {**fixed, **variant}
            if method.knob is None:
                out.append(MethodSetting(name, None, tuple(sorted(base.items()))))
                continue
            knob = method.knob
            values = [v for v in grids.get(knob.name, "").split(",") if v.strip()]
            if not values:
                raise ValueError(f"method {name} needs at least one setting ({knob.grid_flag})")
            for value in values:
                options = {**base, **knob.parse_value(value, knob.grid_flag)}
                out.append(MethodSetting(name, float(options[knob.name]), tuple(sorted(options.items()))))
    return out
