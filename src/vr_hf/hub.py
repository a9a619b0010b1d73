"""Where a checkpoint a user names comes from: a local folder, or the Hub."""

import os
import re


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def check_checkpoint_source(name: str, what: str = "the checkpoint") -> None:
    """Refuse a name that is neither a folder here nor a Hub id (`owner/name`): a mistyped local path, which the Hub
    would answer with a connection or not-found error that names neither."""
    if not os.path.exists(name) and not HUB_ID.fullmatch(name):
        raise ValueError(f"{what} {name!r} is no folder here, nor a Hub id (owner/name): check the path.")
