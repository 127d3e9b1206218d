"""The user-facing error type."""


class SmoosegError(RuntimeError):
    """A problem the user can fix; the message is one line naming the thing and the fix."""
