"""User-facing errors: one message that names the problem and the fix, never a traceback."""


# What running a stopped command again does, per command (an interruption's line, a lost rank's fix): only run,
# and export dense shard by shard, keeps finished work.
RERUN = {"run": "finished blocks are kept; run the same command again to resume",
         "export": "run the same command again (`export dense` keeps its finished shards)",
         "eval": "nothing of the evaluation is kept; run the same command again to start it over",
         "profile": "a profile is not resumable; run the same command again to make it from the start",
         "quantize": "run the same command again: it starts NEW_DIR over",
         "import-gguf": "run the same command again: it starts the conversion over",
         "verify": "nothing was checked to the end; run the same command again",
         "plan": "nothing was written; run the same command again"}


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
