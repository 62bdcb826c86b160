"""The one base class for errors whose message is meant for the person running SkinGPT."""


class UserFacingError(Exception):
    """Says what happened and what to do; the CLI prints it without a traceback."""
