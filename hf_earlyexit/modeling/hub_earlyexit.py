"""Sharing heads on the Hub: repo ids, the checks before a push, the one-commit upload and the model card.

Portable: stdlib and huggingface_hub (a dependency of transformers, so always installed beside it), so a model
loaded with `trust_remote_code=True` can push too. The full model card comes from the renderer the hf-earlyexit
package registers as an entry point when it is installed; remote code without it writes a short card and says so in
the log. The folder layout and its checks live in `folder_earlyexit.py`.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from .folder_earlyexit import CARD_FILE, check_folder_files

logger = logging.getLogger(__name__)

# entry point group through which an installed package offers the full model card renderer
CARD_RENDERERS = "hf_earlyexit.model_card"
CARD_MARKER = "<!-- hf-earlyexit model card: rendered from the folder on save and push; edit the template -->"


def check_repo_id(repo_id: Any) -> str:
    """Return `repo_id` when it is a valid Hub model id (`"name"` or `"namespace/name"`), else raise `ValueError`."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"repo_id={repo_id!r} is not a Hub repo id; give 'user/name' or 'org/name'")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"repo_id={repo_id!r} is not a valid Hub repo id ('user/name' or 'org/name'): {err}") from None
    return repo_id


def hub_base_model(name: str | None) -> str | None:
    """`name` when it can be a Hub model id (for the card's `base_model`), `None` for local paths and the embedded."""
    if not name or name == "embedded" or Path(name).exists():
        return None
    try:
        return check_repo_id(name)
    except ValueError:
        return None


def license_metadata(base_name: str | None, license: str | None = None) -> dict[str, str]:
    """Card license fields: `license` if given, else the embedded Gemma's `gemma`, else `other` pointing to the base
    model (heads derived from its weights fall under its license)."""
    license = license or ("gemma" if base_name == "embedded" else "other")
    fields = {"license": license}
    if license == "other":
        fields["license_name"] = "same-as-base-model"
        base = hub_base_model(base_name)
        if base:
            fields["license_link"] = f"https://huggingface.co/{base}"
    return fields


def check_pushable(config: Any, force: bool = False) -> None:
    """Refuse untrained heads (unless `force`); warn when they carry no thresholds (they would never exit)."""
    if not config.training and not force:
        raise ValueError(
            "these heads were never trained (config.training is empty): pushing them would publish random heads. "
            "Train them first (`hf-earlyexit train`), or pass force=True (`--force`) to push them anyway"
        )
    if not config.training:
        logger.warning("Pushing UNTRAINED heads (force=True): the model card says so")
    if not config.thresholds:
        logger.warning(
            "These heads have no calibrated thresholds: they never exit (generate with eps refuses until "
            "`hf-earlyexit calibrate` has run); the model card says so"
        )


def upload_heads_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    merged: bool = False,
):
    """Create `repo_id` (if needed) and upload `folder` in one commit; returns huggingface_hub's `CommitInfo`.

    Args:
        revision: branch to commit to; created from the default branch when absent.
        merged: the folder holds a full copy of the base model under `base/` and may upload it.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    check_repo_id(repo_id)
    check_folder_files(folder, merged)
    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    repo_id = getattr(url, "repo_id", None) or repo_id  # a bare name becomes "user/name"
    if revision and not revision.startswith("refs/pr/"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    message = commit_message or ("Upload early-exit heads and base model copy" if merged else "Upload early-exit heads")
    info = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), commit_message=message, revision=revision, create_pr=create_pr,
        ignore_patterns=["__pycache__/*", ".*"],
    )
    logger.info("Uploaded %s to %s", folder, getattr(info, "commit_url", repo_id))
    return info


def write_card(folder: Path, config: Any, repo_id: str | None = None) -> None:
    """Write `README.md` into a freshly written heads folder, unless the caller supplied one: the full card from the
    renderer an installed package registers (entry point group `CARD_RENDERERS`), else a short one."""
    path = folder / CARD_FILE
    if path.exists():
        return
    render = card_renderer()
    if render is None:  # remote code without the hf-earlyexit package: a short card, and the log says why
        logger.info("no model card renderer is installed: writing a short model card (install hf-earlyexit for the "
                    "full card)")
        path.write_text(short_card(config, repo_id), encoding="utf-8")
        return
    path.write_text(render(folder, repo_id=repo_id), encoding="utf-8")


def card_renderer():
    """The full card renderer `(folder, repo_id=...) -> str` an installed package offers, or `None`."""
    for entry in entry_points(group=CARD_RENDERERS):
        try:
            return entry.load()
        except ImportError as err:  # registered but not importable here
            logger.info("model card renderer %s is not importable (%s)", entry.value, err)
    return None


def short_card(config: Any, repo_id: str | None = None) -> str:
    """A minimal valid card: metadata, what the heads are and how to load them."""
    import json

    base = hub_base_model(config.base_model_name_or_path)
    meta = {"library_name": "transformers", "pipeline_tag": "text-generation",
            "tags": ["hf-earlyexit", "early-exit", "self-speculative-decoding", "custom_code"],
            **license_metadata(config.base_model_name_or_path)}
    if base:
        meta["base_model"] = base
    yaml = "\n".join(f"{key}: {json.dumps(value)}" for key, value in meta.items())  # JSON values are valid YAML
    name = repo_id or "<this repo>"
    return (
        f"---\n{yaml}\n---\n\n{CARD_MARKER}\n\n# Early-exit heads for {config.base_model_name_or_path}\n\n"
        f"Exits after layers {list(config.exit_layers)} ({config.head_type} heads), "
        f"{'calibrated' if config.thresholds else 'not calibrated'}, "
        f"{'trained' if config.training else 'UNTRAINED'}.\n\n"
        f"```python\nfrom transformers import AutoModelForCausalLM\n\n"
        f"model = AutoModelForCausalLM.from_pretrained({name!r}, trust_remote_code=True)\n```\n"
    )
