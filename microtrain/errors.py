"""Every exception microtrain raises on purpose: ``MicrotrainError`` and its kinds (the CLI prints them as
one line naming the problem and the fix, exit status 2), and the stops a signal asks for (``Interrupted``,
``Signalled``: KeyboardInterrupts, so a run dir is marked ``interrupted``, not ``failed``)."""


class MicrotrainError(Exception):
    """A problem with the user's input or environment; the CLI prints it as one line and exits 2."""


class RecipeError(MicrotrainError):
    """The recipe (file or overrides) is invalid."""


class OptionTypeError(RecipeError):
    """A recipe value is not of its option's type (as opposed to a value of the right type that breaks a rule): a
    union type tries its next member on this, and reports a rule's own message on any other RecipeError."""


class DataError(MicrotrainError):
    """The dataset is missing, corrupt or unreadable."""


class PluginError(MicrotrainError):
    """A plugin could not be loaded, or a plugin's hook raised."""


class TrainingStopped(MicrotrainError):
    """Training stopped on purpose (NaN loss, signal); the run dir keeps what was written."""


def did_you_mean(word: str, choices) -> str:
    """Return ' (did you mean X?)' for the closest choice, or '' when nothing is close."""
    import difflib

    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class CheckpointError(MicrotrainError):
    """A checkpoint is missing, corrupt, or not a microtrain checkpoint."""


class PluginHookError(PluginError):
    """A hook implementation raised; names the plugin and the hook."""

    def __init__(self, plugin: str, hook: str, error: BaseException):
        self.plugin, self.hook, self.original = plugin, hook, error
        super().__init__(f"plugin '{plugin}' failed in hook '{hook}': {type(error).__name__}: {error}")


class Interrupted(KeyboardInterrupt):
    """A stop asked for by a signal (Ctrl-C, SIGTERM), raised where the state is consistent: after a training
    step (``mid_epoch``: a checkpoint resumes at the next batch) or after an epoch's hooks."""

    def __init__(self, signum: int, mid_epoch: bool):
        super().__init__(f"signal {signum}")
        self.signum, self.mid_epoch = signum, mid_epoch


class Signalled(KeyboardInterrupt):
    """A second Ctrl-C/SIGTERM, or one in a distributed run: stop at once, abandoning the step in progress."""
