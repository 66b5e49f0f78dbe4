"""One error type for everything a user can get wrong: scripts print its message on one line and exit 2."""
import argparse
import functools
import sys


class VLMError(Exception):
    """A problem with user input (a file, a record, a flag); the message names it."""


def exit_on_user_error(main):
    """Decorate a script's main(): a VLMError becomes `error: <message>` on stderr and exit code 2, no
    traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except VLMError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    return wrapper


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are VLMErrors: one `error:` line and exit 2, like every other user error."""

    def error(self, message):
        raise VLMError(message)


def json_kind(value):
    """What a JSON value is, for errors about the file's structure."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "true/false"
    return "null" if value is None else "a number"
