"""hijack: move a live Linux process to another machine without breaking its connections."""

__version__ = "0.1.0"
