"""One exception hierarchy for clipseek (both packages).

    ClipseekError          anything clipseek raises on purpose; the message says what to do
    └── ModelError         a model cannot be built or its weights cannot be found
        └── CheckpointError  a checkpoint file is missing, unreadable, unsafe or does not fit

Library code raises these; only the CLI and HTTP edges turn them into messages and exit codes.
"""


class ClipseekError(Exception):
    """Base of every error clipseek raises on purpose; its message is meant for the user."""


class ModelError(ClipseekError):
    """A model cannot be built, or its weights are not available here."""


class CheckpointError(ModelError):
    """A checkpoint file is missing, unreadable, unsafe to load, or does not fit the architecture."""
