"""The allowed values of a setting: an interval, a set of names, or (for paths, names and flags,
which their type already bounds) anything of the setting's type; and the rules that settings
must keep with each other.

A config schema declares one domain per leaf key in a table (`config.DOMAINS`,
`finetune.config.DOMAINS`); `check_domains` holds a loaded config to it, so a value outside its
meaning (a negative temperature, a mask ratio of 1.5, a NaN learning rate) stops at load time,
before anything is computed or written, with one line naming the key and what it allows.
Beside each table of domains a schema declares its `Rule`s (`rules.RULES`,
`finetune.config.RULES`): values each fine alone that contradict each other (a warmup longer
than the run, a width its heads do not divide), refused by `check_rules` right after the domains,
in one line naming every setting involved.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .errors import UserError


@dataclass(frozen=True)
class Range:
    """A finite number in an interval; `None` bounds are open-ended, `*_open` excludes that end.
    A setting typed Optional may also be None (its default rule applies)."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

    def allows(self, value: Any) -> bool:
        if value is None:
            return True
        if not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.high is None:
            return f"a value {'>' if self.low_open else '>='} {low}"
        if self.low is None:
            return f"a value {'<' if self.high_open else '<='} {high}"
        return f"a value in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


def _number(x: Optional[float]) -> str:
    """A bound as written: integers in full, other numbers short."""
    if x is None:
        return ""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclass(frozen=True)
class OneOf:
    """One of a fixed set of names."""

    values: tuple

    def allows(self, value: Any) -> bool:
        return value in self.values

    def __str__(self) -> str:
        return f"one of {', '.join(map(str, self.values))}"


@dataclass(frozen=True)
class Free:
    """Any value of the setting's type (a path, a model name, a flag): its type is checked on
    load, and what it names is checked where it is opened."""

    what: str

    def allows(self, value: Any) -> bool:
        return True

    def __str__(self) -> str:
        return self.what


Domain = Range | OneOf | Free
COUNT = Range(1)  # an integer >= 1
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, low_open=True)
PROBABILITY = Range(0, 1)
BETA = Range(0, 1, high_open=True)  # Adam's moment decay, momentum
FLAG = Free("true or false")
SEED = Range(0, 2**32 - 1)  # numpy's SeedSequence takes no negative seed


def vit_arch(prefix: str) -> dict[str, Domain]:
    """The domains of a `config.ViTArch` at `prefix` (e.g. "model.arch"): a timm name, positive sizes."""
    return {f"{prefix}.name": Free("a timm ViT name"),
            **{f"{prefix}.{size}": COUNT for size in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")}}


def check_domains(select: Callable[[str], Any], domains: dict[str, Domain], error=UserError) -> None:
    """Raise `error` naming the first key (in table order) whose value, `select(key)`, is outside
    its domain."""
    for key, domain in domains.items():
        value = select(key)
        if not domain.allows(value):
            finite = isinstance(value, float) and not math.isfinite(value)
            raise error(f"{key}={value}: expected {'a finite number, ' if finite else ''}{domain}")


@dataclass(frozen=True)
class Rule:
    """Settings that must agree: `holds(*values)` of the dotted `keys` (in order) is True, or the
    config is refused with `need`, what must hold, in words. A rule whose settings are not all
    set (a None: the default rule applies, e.g. the timm architecture's own size) is checked where
    that default is resolved (`check_rules` again on the resolved values)."""

    keys: tuple[str, ...]
    holds: Callable[..., bool]
    need: str


def check_rules(select: Callable[[str], Any], rules: tuple[Rule, ...], error=UserError) -> None:
    """Raise `error` naming every setting of the first rule (in table order) that `select(key)`'s
    values break: ``a=1, b=2: need ...``."""
    for rule in rules:
        values = [select(key) for key in rule.keys]
        if any(value is None for value in values):
            continue
        if not rule.holds(*values):
            named = ", ".join(f"{key}={_shown(value)}" for key, value in zip(rule.keys, values))
            raise error(f"{named}: {rule.need}")


def _shown(value: Any) -> str:
    """A value as an override writes it: true / false, 5 for 5.0."""
    if isinstance(value, bool):
        return str(value).lower()
    return _number(value) if isinstance(value, float) else str(value)
