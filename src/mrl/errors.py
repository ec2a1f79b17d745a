"""User-facing errors: raised for bad input and printed as one paragraph by the command-line tools."""


class MRLError(Exception):
    """A problem with the user's input (config, data, checkpoint, environment).

    The message says what is wrong and what to do; the CLI prints it without a traceback
    (set HYDRA_FULL_ERROR=1 to see one) and exits non-zero.
    """
