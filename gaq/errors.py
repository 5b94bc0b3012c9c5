"""User-facing errors: one line that says what to change."""


class GaqError(Exception):
    """Bad input or state the user can fix. The CLI prints ``gaq: error: <message>`` and exits 2.

    The message must fit on one line and say what to change (a config key, a path, a value range).
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def check(condition: bool, message: str) -> None:
    """Raise :class:`GaqError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise GaqError(message)
