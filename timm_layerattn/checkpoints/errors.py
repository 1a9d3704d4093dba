"""The errors of unusable pretrained weights: one class per kind of problem, each naming the file.

Every class is a `UserError` too, so the command line prints it as one line, and the file-not-found ones
are also the built-in / huggingface_hub types that timm and the Hub client raise for the same problem, so
callers that catch those keep working.
"""
from typing import Optional

from .._utils.errors import UserError

try:
    from huggingface_hub.errors import LocalEntryNotFoundError as _HubNotCached
except ImportError:  # huggingface_hub < 0.24 keeps its errors in `utils`
    try:
        from huggingface_hub.utils import LocalEntryNotFoundError as _HubNotCached
    except ImportError:
        _HubNotCached = FileNotFoundError

__all__ = ['PretrainedWeightsError', 'CheckpointError', 'CheckpointNotFoundError', 'CheckpointNotCachedError',
           'CheckpointMismatchError']


class PretrainedWeightsError(RuntimeError, UserError):
    """`pretrained=True` cannot load weights: the tag has none, or its checkpoint is unusable (subclasses).

    A `UserError` too, so the command line prints it as one line.
    """


class CheckpointError(PretrainedWeightsError):
    """A pretrained checkpoint cannot be used; the message names the file (or Hub repo) and the problem."""

    def __init__(self, message: str, path: Optional[str] = None):
        super().__init__(message)
        self.path = path


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file, or a weights file in a `local-dir:` folder, does not exist.

    Also a `FileNotFoundError`, which is what timm raises (with an empty message) in this case.
    """


class CheckpointNotCachedError(CheckpointNotFoundError, _HubNotCached):
    """Hub weights are not in the local cache and cannot be downloaded (offline mode or no connection).

    Also huggingface_hub's `LocalEntryNotFoundError`, which is what it raises in this case.
    """


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's tensors do not fit the model (missing / unexpected keys, shape mismatches)."""
