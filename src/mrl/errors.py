"""User-facing errors: raised for bad input and printed as one paragraph by the command-line tools."""


class MRLError(Exception):
    """A problem with the user's input (config, data, checkpoint, environment).

    The message says what is wrong and what to do; the CLI prints it without a traceback
    (set HYDRA_FULL_ERROR=1 to see one) and exits non-zero.
    """


def user_message(err: MRLError) -> str:
    """The message of ``err`` as raised. One raised in a DataLoader worker process reaches the main
    process re-raised by torch with the worker's traceback text in front of it; that text is dropped."""
    text = str(err)
    if text.startswith("Caught ") and "Original Traceback" in text:
        marker = f"{type(err).__module__}.{type(err).__qualname__}: "
        if marker in text:
            return text.rsplit(marker, 1)[1].strip()
    return text
