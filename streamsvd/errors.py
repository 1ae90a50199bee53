"""User-facing errors: one message that names the problem and the fix, never a traceback."""


class StreamSVDError(Exception):
    """A problem with the user's input or environment that the user can fix."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem}\n  fix: {fix}")


class UnsupportedArchitecture(StreamSVDError):
    pass


class CheckpointError(StreamSVDError):
    pass


class JobMismatch(StreamSVDError):
    pass
