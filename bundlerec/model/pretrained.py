"""How a pretrained model directory reads: its pooling and whether it is a decoder LLM (the
directory itself comes from :mod:`bundlerec.hub`)."""

from __future__ import annotations

_ST_POOLING = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_lasttoken": "last"}


def resolve_pooling(model_dir: str, pooling: str = "auto") -> str:
    """``model.pooling`` made concrete for the model in ``model_dir``. ``auto``: a sentence-transformers
    folder (``modules.json``) pools as its Pooling module's config says; any other model pools the
    last valid token when it is a decoder (its last token has read the whole text), else the mean.
    (Item embeddings are always L2-normalised, as a Normalize module would.)"""
    import json
    import os

    if pooling != "auto":
        return pooling
    modules = os.path.join(model_dir, "modules.json")
    if os.path.exists(modules):
        with open(modules) as f:
            mods = json.load(f)
        path = next((m.get("path", "") for m in mods if str(m.get("type", "")).endswith(".Pooling")), None)
        if path is not None:
            with open(os.path.join(model_dir, path, "config.json")) as f:
                conf = json.load(f)
            modes = [k for k, v in conf.items() if k.startswith("pooling_mode_") and v]
            if len(modes) != 1 or modes[0] not in _ST_POOLING:
                raise ValueError(f"{model_dir}: sentence-transformers pooling {modes} is not one bundlerec has "
                                 f"(mean, cls or last token); set model.pooling explicitly")
            return _ST_POOLING[modes[0]]
    from transformers import AutoConfig

    conf = AutoConfig.from_pretrained(model_dir)
    decoder = getattr(conf, "is_decoder", False) or any(a.endswith("ForCausalLM") for a in conf.architectures or [])
    return "last" if decoder or conf.model_type in _DECODER_TYPES else "mean"


# decoder-only families whose saved configs may not name a *ForCausalLM architecture (random-init folders)
_DECODER_TYPES = {"llama", "qwen2", "qwen3", "mistral", "mixtral", "gemma", "gemma2", "gemma3", "gemma3_text",
                  "phi", "phi3", "gpt2", "gpt_neox", "falcon", "olmo", "olmo2", "stablelm", "starcoder2", "gptj"}
