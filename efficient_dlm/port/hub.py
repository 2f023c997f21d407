"""Checks for `edlm export-hf --push_to_hub` that run before any work (repo id, extra, offline, token).

Kept out of the verb module so the checks can be imported without defining the verb's absl flags.
"""
from __future__ import annotations

import os
import re

from efficient_dlm.errors import UserError

_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def check_push_args(repo_id: str):
    """Validates an upload before any work: repo id syntax, huggingface_hub installed, online, a token."""
    if not _REPO_ID.match(repo_id) or ".." in repo_id or len(repo_id) > 96:
        raise UserError(f"--push_to_hub {repo_id!r}: not a valid Hugging Face repo id (expected namespace/name)")
    try:
        import huggingface_hub
    except ImportError:
        raise UserError("--push_to_hub needs huggingface_hub: pip install 'efficient_dlm[hub]'") from None
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise UserError("--push_to_hub: HF_HUB_OFFLINE is set; unset it to upload")
    if huggingface_hub.get_token() is None:
        raise UserError("--push_to_hub: no Hugging Face token; run `hf auth login` or set HF_TOKEN")
    return huggingface_hub
