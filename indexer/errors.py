"""One exception hierarchy for clipseek (both packages).

    ClipseekError          anything clipseek raises on purpose; the message says what to do
    ├── ModelError         a model cannot be built or its weights cannot be found
    │   └── CheckpointError  a checkpoint file is missing, unreadable, unsafe or does not fit
    ├── BadFileError       one input file cannot be read: recorded with its reason and skipped
    ├── PixelBudgetError   a picture from others declares more pixels than its reader allows
    ├── QueryError         a query cannot be answered as asked (empty, unreadable image, bad k, ...)
    │   └── ItemNotFoundError  the query names an item id that is not in the index
    ├── PolicyError        a moderation policy file is unreadable or malformed
    └── StoreError         an index cannot be used as asked
        ├── IndexNotFoundError   there is no index there
        ├── IndexLockedError     another process is writing to it
        └── ModelMismatchError   it was made with another model

Library code raises these; only the CLI and HTTP edges turn them into messages and exit codes.
What clipseek works around but a user should know of (a damaged model export made again) is a
ClipseekWarning, shown by the CLI as a one-line warning.
"""


class ClipseekError(Exception):
    """Base of every error clipseek raises on purpose; its message is meant for the user."""


class ModelError(ClipseekError):
    """A model cannot be built, or its weights are not available here."""


class DeviceError(ModelError):
    """The device asked for is not on this machine, or nothing installed here can use it."""


class CheckpointError(ModelError):
    """A checkpoint file is missing, unreadable, unsafe to load, or does not fit the architecture."""


class BadFileError(ClipseekError):
    """One input file cannot be read; the message is the reason recorded for it."""


class PixelBudgetError(ClipseekError):
    """A picture declares more pixels than the caller's budget; refused from its header, before decoding."""


class StoreError(ClipseekError):
    """An index cannot be used as asked (missing, busy, made by another model or clipseek)."""


class IndexNotFoundError(StoreError):
    """There is no index at the given place."""


class IndexLockedError(StoreError):
    """Another process is writing to the index; one writer at a time."""


class ModelMismatchError(StoreError):
    """The index was made with another model than the one asked for."""


class QueryError(ClipseekError):
    """A query cannot be answered as asked: empty, an unreadable image, an unknown item, bad k."""


class ItemNotFoundError(QueryError):
    """The query names an item id that is not in the index."""


class PolicyError(ClipseekError):
    """A moderation policy is unreadable or malformed; the message names the field and the fix."""


class ClipseekWarning(UserWarning):
    """Something clipseek worked around that the user should hear of; the message says what happened."""
