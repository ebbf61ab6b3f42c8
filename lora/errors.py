"""The errors `impasto.lora` raises.

Both are ValueErrors so a caller that only wants "bad input" can catch that; the server turns
them into INVALID_ARGUMENT with the message as is, so every message names the file, key or
module at fault.
"""


class AdapterFormatError(ValueError):
    """The file is not an adapter we can read: wrong container, unknown keys, unsupported kind."""


class AdapterMismatchError(ValueError):
    """The adapter does not fit the base model: unmatched targets or wrong shapes."""


def list_keys(keys, limit: int = 20) -> str:
    """Keys for an error message: sorted, the first `limit`, and how many more there are."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    more = len(keys) - limit
    return shown + (f" … and {more} more" if more > 0 else "")
