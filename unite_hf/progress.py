"""Progress bars: shown when the caller asks (``show_progress``) and the environment does not turn
them off (``HF_HUB_DISABLE_PROGRESS_BARS=1`` as for huggingface_hub, ``TQDM_DISABLE=1`` as for tqdm)."""

from __future__ import annotations

from unite_hf_cli import progress_disabled_by_environment


def progress_enabled(show_progress: bool) -> bool:
    """``show_progress``, unless ``HF_HUB_DISABLE_PROGRESS_BARS`` or ``TQDM_DISABLE`` is set to a true value."""
    return bool(show_progress) and not progress_disabled_by_environment()
