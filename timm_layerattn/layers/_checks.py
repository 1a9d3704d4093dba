"""Argument checks for constructors and configs: one message format for every family.

A bad argument fails where it is given, with `'<owner>: <name> must be <allowed>, got <value>'`, instead of
as a `ZeroDivisionError`, a negative-size error from torch or a silently wrong model later. A value of the
wrong type (a string, a float or bool where an integer is needed) is a `TypeError`, a value out of its range
(including NaN) a `ValueError`, as Python's own builtins do.
"""
import math
import numbers
from typing import Any, Collection, Iterable, List, Optional, Sequence

__all__ = [
    'check_bool', 'check_choice', 'check_divisor', 'check_float', 'check_int', 'check_rate', 'divisors', 'fmt_ints',
]


def _fail(exc: type, owner: str, name: str, allowed: str, value: Any) -> None:
    raise exc(f'{owner}: {name} must be {allowed}, got {value!r}')


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(owner: str, name: str, value: Any, minimum: int = 1, allowed: Optional[str] = None) -> int:
    """An integer >= `minimum` (bools refused: `True` for a width is a mistake, not 1)."""
    allowed = allowed or ('a positive integer' if minimum == 1 else
                          'a non-negative integer' if minimum == 0 else f'an integer >= {minimum}')
    if not _is_int(value):
        _fail(TypeError, owner, name, allowed, value)
    if value < minimum:
        _fail(ValueError, owner, name, allowed, value)
    return int(value)


def check_float(
        owner: str,
        name: str,
        value: Any,
        low: float = 0.,
        high: float = math.inf,
        high_inclusive: bool = False,
        low_inclusive: bool = True,
        allowed: Optional[str] = None,
) -> float:
    """A finite real number in the interval given (NaN is refused: it passes every `<` test)."""
    if allowed is None:
        lo, hi = '[' if low_inclusive else '(', ']' if high_inclusive else ')'
        allowed = f'a number in {lo}{low:g}, {high:g}{hi}' if math.isfinite(high) else (
            f'a number >= {low:g}' if low_inclusive else f'a number > {low:g}')
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        _fail(TypeError, owner, name, allowed, value)
    value = float(value)
    ok = not math.isnan(value) and (value >= low if low_inclusive else value > low) and (
        value <= high if high_inclusive else value < high)
    if not ok:
        _fail(ValueError, owner, name, allowed, value)
    return value


def check_rate(owner: str, name: str, value: Any) -> float:
    """A dropout / drop-path probability in [0, 1) (1 would drop everything)."""
    return check_float(owner, name, value, 0., 1., allowed='a probability in [0, 1)')


def check_bool(owner: str, name: str, value: Any) -> bool:
    """A bool (a string such as 'no' would otherwise read as True)."""
    if not isinstance(value, bool):
        _fail(TypeError, owner, name, 'True or False', value)
    return value


def check_choice(owner: str, name: str, value: Any, choices: Collection[Any]) -> Any:
    """One of `choices`."""
    if value not in choices:
        _fail(ValueError, owner, name, f'one of {tuple(choices)}', value)
    return value


def divisors(n: int) -> List[int]:
    """Positive divisors of `n` in increasing order."""
    return [d for d in range(1, n + 1) if n % d == 0]


def fmt_ints(values: Iterable[int]) -> str:
    return ', '.join(str(v) for v in values)


def check_divisor(owner: str, name: str, value: Any, valid: Sequence[int], why: str) -> int:
    """A positive integer from `valid` (the values that split every width concerned), explained by `why`."""
    allowed = f'one of {fmt_ints(valid)} ({why})' if valid else f'a positive integer ({why}; no value does)'
    value = check_int(owner, name, value, allowed=allowed)
    if value not in valid:
        _fail(ValueError, owner, name, allowed, value)
    return value
