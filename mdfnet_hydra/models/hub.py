"""Hugging Face hub access that fails fast and says what to do when the hub cannot be reached.

Without network, huggingface_hub retries each lookup for tens of seconds. Here the hub is asked
only if a 3-second TCP probe reaches it (and HF_HUB_OFFLINE is not set); otherwise only the local
cache is read, and a miss raises an error naming the model, the cache searched and the option
that takes a local copy instead.
"""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from urllib.parse import urlparse


class ModelUnavailableError(FileNotFoundError):
    """Weights that are neither cached nor downloadable here."""


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@lru_cache(maxsize=1)
def hub_reachable(timeout_s: float = 3.0) -> bool:
    if hub_offline():
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def unavailable(kind: str, repo_id: str, option: str, cause: BaseException) -> ModelUnavailableError:
    from huggingface_hub import constants

    why = "HF_HUB_OFFLINE is set" if hub_offline() else "the hub is unreachable"
    return ModelUnavailableError(
        f"cannot load the {kind} '{repo_id}': it is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
        f"and {why}. On a machine with internet: `huggingface-cli download {repo_id} --local-dir <dir>`, copy "
        f"<dir> here and pass {option}. (cause: {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})"
    )


def first_line(err: BaseException) -> str:
    """`Type: first line of the message`: a library's error in a one-line refusal (the rest of a
    multi-line message, e.g. every mismatched parameter, stays in the chained exception)."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"
