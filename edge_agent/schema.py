"""One way to declare and check a value: config keys and MQTT command fields share these fields.

A :class:`Field` knows what it accepts (``check`` for typed values from TOML or JSON, ``parse`` for
the text of ``EDGE_AGENT_*`` variables and ``--set``), how to say so (``expected``, used in every
refusal: ``<name>: expected <expected>, got <value>``), and, for command fields, its default,
whether it is required or nullable and a line of documentation. Config keys (``edge_agent.config``)
and command fields (``edge_agent.comms.commands``) differ only in wording (``integer 1..10`` in the
config, ``an integer 1..10`` on the wire), which the command module's subclasses set.

Checks are strict on type: ``true`` is not an integer, ``1.0`` is not an integer, NaN and infinities
are not numbers; nothing is coerced except where a key asks for it (``Choice(numbers=True)``).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Callable, Iterable, Optional, Tuple, Union


class Invalid(ValueError):
    """A value a field refuses; the message is the one-line reason."""


class Field:
    """One key or field: its check, its text parser, and what it expects (for the reason text)."""

    expected = "value"

    def __init__(self, default: Any = None, required: bool = False, nullable: bool = False,
                 doc: str = "") -> None:
        self.default = default
        self.required = required
        self.nullable = nullable
        self.doc = doc

    def check(self, value: Any) -> Any:
        """The normalised value, or ValueError/TypeError."""
        raise NotImplementedError

    def parse(self, text: str) -> Any:
        """A value from override text (env var or ``--set``), then checked."""
        return self.check(text)

    def to_toml(self, value: Any) -> str:
        """The value as a TOML literal (``config show``)."""
        return json.dumps(value)

    def validate(self, name: str, value: Any, show: Callable[[Any], str] = repr) -> Any:
        """The checked value (None if nullable), or :class:`Invalid` naming ``name``."""
        if value is None and self.nullable:
            return None
        return self._apply(self.check, name, value, show, "")

    def validate_text(self, name: str, text: str, origin: str = "") -> Any:
        """The parsed value of override ``text``, or :class:`Invalid` naming ``name`` and ``origin``."""
        return self._apply(self.parse, name, text, repr, origin)

    def _apply(self, how: Callable[[Any], Any], name: str, value: Any, show: Callable[[Any], str],
               origin: str) -> Any:
        try:
            return how(value)
        except (ValueError, TypeError, KeyError):
            raise Invalid(f"{name}: expected {self.expected}, got {show(value)}{origin}") from None


def range_text(lo: Optional[float], hi: Optional[float], fmt: str = "") -> str:
    """`` 1..5``, `` >= 1``, `` <= 5`` or ``""``."""
    if lo is not None and hi is not None:
        return f" {lo:{fmt}}..{hi:{fmt}}"
    if lo is not None:
        return f" >= {lo:{fmt}}"
    if hi is not None:
        return f" <= {hi:{fmt}}"
    return ""


def _check_range(value: float, lo: Optional[float], hi: Optional[float]) -> None:
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError


class _Number(Field):
    """A number in ``lo..hi`` (either bound optional)."""

    noun = "number"

    def __init__(self, lo: Optional[float] = None, hi: Optional[float] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lo, self.hi = lo, hi
        self.expected = self.noun + range_text(lo, hi)


class Int(_Number):
    noun = "integer"

    def check(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError
        _check_range(value, self.lo, self.hi)
        return value

    def parse(self, text: str) -> int:
        return self.check(int(text.strip(), 10))

    def to_toml(self, value: Any) -> str:
        return str(value)


class Float(_Number):
    def check(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError
        _check_range(value, self.lo, self.hi)
        return float(value)

    def parse(self, text: str) -> float:
        return self.check(float(text.strip()))

    def to_toml(self, value: Any) -> str:
        return repr(float(value))


class Bool(Field):
    expected = "boolean (true/false)"
    _TEXT = {"true": True, "1": True, "yes": True, "on": True,
             "false": False, "0": False, "no": False, "off": False}

    def check(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError
        return value

    def parse(self, text: str) -> bool:
        return self._TEXT[text.strip().lower()]  # KeyError -> refused

    def to_toml(self, value: Any) -> str:
        return "true" if value else "false"


class Str(Field):
    """A string, optionally matching ``pattern`` in full (described in words by ``expected``);
    ``convert`` may turn the accepted text into something else (bytes, a lower-cased digest)."""

    def __init__(self, pattern: Optional[str] = None, expected: str = "string",
                 convert: Optional[Callable[[str], Any]] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.regex = re.compile(pattern) if pattern else None
        self.expected = expected
        self.convert = convert

    def check(self, value: Any) -> Any:
        if not isinstance(value, str) or (self.regex is not None and not self.regex.fullmatch(value)):
            raise ValueError
        return self.convert(value) if self.convert else value


class StrList(Field):
    """A list of strings each accepted by ``item`` (a TOML array; comma-separated in override
    text); kept as a tuple so that frozen configs stay hashable."""

    def __init__(self, item: Str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.item = item
        self.expected = f"list of {item.expected}"

    def check(self, value: Any) -> Tuple[Any, ...]:
        if not isinstance(value, (list, tuple)):
            raise ValueError
        return tuple(self.item.check(v) for v in value)

    def parse(self, text: str) -> Tuple[Any, ...]:
        return self.check([part.strip() for part in text.split(",") if part.strip()])

    def to_toml(self, value: Any) -> str:
        return json.dumps(list(value))


ChoicesArg = Union[str, Callable[[], Iterable[str]]]


class Choice(Field):
    """One of a fixed set of strings, or of a set computed when first needed.

    ``Choice("a", "b")`` or ``Choice(fn)``: ``fn()`` returns the allowed values and is called only
    when a value is checked or the expectation is shown (registries of runtimes and sources are
    not imported just to load a config that does not name one). ``numbers=True`` accepts a TOML
    number for a numeric-looking choice (``protocol = 5`` means ``"5"``).
    """

    def __init__(self, *choices: ChoicesArg, numbers: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if len(choices) == 1 and callable(choices[0]):
            self._choices: Callable[[], Iterable[str]] = choices[0]
        else:
            fixed = tuple(str(c) for c in choices)
            self._choices = lambda: fixed
        self.numbers = numbers

    @property
    def choices(self) -> Tuple[str, ...]:
        return tuple(self._choices())

    @property  # type: ignore[override]
    def expected(self) -> str:
        return "one of " + ", ".join(repr(c) for c in self.choices)

    def check(self, value: Any) -> str:
        if self.numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or value not in self.choices:
            raise ValueError
        return value

    def parse(self, text: str) -> str:
        return self.check(text.strip())

