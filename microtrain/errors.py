"""The one exception type a user sees as a single line: what is wrong and how to fix it."""


class MicrotrainError(Exception):
    """A problem with the user's input or environment; the CLI prints it as one line and exits 2."""


class RecipeError(MicrotrainError):
    """The recipe (file or overrides) is invalid."""


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
