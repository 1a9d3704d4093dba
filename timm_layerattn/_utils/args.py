"""Command-line numbers: argparse `type=` functions, so an out-of-range value is refused at parse time with a
message naming the flag ("argument --lr: must be a finite number > 0, got 'nan'")."""
import argparse
import math
from typing import Callable, Optional

__all__ = ['int_arg', 'float_arg']


def _range_text(lo: Optional[float], hi: Optional[float], lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f'in {"(" if lo_open else "["}{lo:g}, {hi:g}{")" if hi_open else "]"}'
    if lo is not None:
        return f'{">" if lo_open else ">="} {lo:g}'
    if hi is not None:
        return f'{"<" if hi_open else "<="} {hi:g}'
    return ''


def int_arg(min: Optional[int] = None, max: Optional[int] = None) -> Callable[[str], int]:
    """An argparse type: an integer in [min, max] (either bound optional)."""
    want = ' '.join(['an integer', _range_text(min, max, False, False)]).strip()

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'must be {want}, got {text!r}') from None
        if (min is not None and value < min) or (max is not None and value > max):
            raise argparse.ArgumentTypeError(f'must be {want}, got {text!r}')
        return value

    parse.__name__ = 'int'  # argparse names the type in some messages
    return parse


def float_arg(
        min: Optional[float] = None,
        max: Optional[float] = None,
        min_open: bool = False,
        max_open: bool = False,
) -> Callable[[str], float]:
    """An argparse type: a finite number in the given range (`*_open`: the bound itself is excluded)."""
    want = ' '.join(['a finite number', _range_text(min, max, min_open, max_open)]).strip()

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'must be {want}, got {text!r}') from None
        bad = not math.isfinite(value)
        if min is not None:
            bad = bad or value < min or (min_open and value == min)
        if max is not None:
            bad = bad or value > max or (max_open and value == max)
        if bad:
            raise argparse.ArgumentTypeError(f'must be {want}, got {text!r}')
        return value

    parse.__name__ = 'float'
    return parse
