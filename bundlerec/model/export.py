"""The serving export: one directory that holds everything inference needs, written once per run.

    export/encoder/            HF encoder + tokenizer (LoRA adapters merged)
    export/user_tower.safetensors   user-tower weights (safetensors: loading runs no code)
    export/bundlerec.json      metadata (base model, history_len, temperature, ...)
    export/item_index.npy      (N, d) item embeddings
    export/items.parquet       the catalog (ids, text fields, price)
    export/popularity.npy      training purchase counts (cold start)
    export/latest.parquet      each user's most recent history in the snapshot
    export/copurchase*.{npz,npy,txt}   co-purchase counts of training baskets (bundle compatibility)

Added beside it by later stages (optional; see bundlerec.bundles.engine / bundlerec.pricing.demand):

    export/bundle_engine.json  the bundle engine's chosen parameters (fusion weights, compatibility, threshold)
    export/item_index_pretrained.npy, lexical.json, lexical_items.npz   the engine's extra text channels
    export/pricing.json, pricing.skops, pricing_context.json   the fitted pricing model (no pickle)
    export/training.json       a bundle evaluation's record of the training (rows: the baselines' budget)

:func:`export` turns a DeepSpeed checkpoint (any ZeRO stage) into this directory; :func:`load_export`
reads the model back.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from bundlerec.config import PipelineConfig
from bundlerec.model.two_tower import TwoTower

log = logging.getLogger(__name__)

USER_TOWER = "user_tower.safetensors"


def save_export(model: TwoTower, tokenizer, out_dir: str, meta: dict) -> None:
    """Consolidated export: HF encoder dir + user tower weights + metadata."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    enc = model.encoder
    if hasattr(enc, "merge_and_unload"):  # LoRA -> plain weights for serving
        enc = enc.merge_and_unload()
    enc.save_pretrained(out / "encoder")
    tokenizer.save_pretrained(out / "encoder")
    # safetensors: loading it runs no code (a pickled .pt would; issue 13 "unsafe loading")
    save_file({k: v.contiguous() for k, v in model.user_tower.state_dict().items()}, out / USER_TOWER)
    (out / "bundlerec.json").write_text(json.dumps({**meta, "temperature": model.temperature,
                                                    "pooling": model.pooling}, indent=2))


def load_export(export_dir: str) -> tuple[TwoTower, dict]:
    from bundlerec.model.two_tower import load_backbone

    d = Path(export_dir)
    meta = json.loads((d / "bundlerec.json").read_text())
    model = TwoTower(load_backbone(str(d / "encoder")), temperature=meta["temperature"],
                     pooling=meta.get("pooling", "mean"))
    if (d / USER_TOWER).exists():
        model.user_tower.load_state_dict(load_file(d / USER_TOWER))
    else:  # exports written before 2026-11-30: tensors only, never arbitrary objects
        model.user_tower.load_state_dict(torch.load(d / "user_tower.pt", map_location="cpu", weights_only=True))
    model.eval()
    return model, meta


def consolidated_state_dict(ckpt_dir: str) -> dict:
    """fp32 weights from a DeepSpeed checkpoint of any ZeRO stage."""
    tag = open(os.path.join(ckpt_dir, "latest")).read().strip()
    files = os.listdir(os.path.join(ckpt_dir, tag))
    if any("optim_states" in f and "zero" in f for f in files):
        from deepspeed.utils.zero_to_fp32 import (
            get_fp32_state_dict_from_zero_checkpoint,
        )

        return get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    state = torch.load(os.path.join(ckpt_dir, tag, "mp_rank_00_model_states.pt"), map_location="cpu",
                       weights_only=False)
    return {k: v.float() for k, v in state["module"].items()}


def export(cfg: PipelineConfig, ckpt_dir: str, prep_dir: str, export_dir: str) -> str:
    """DeepSpeed checkpoint -> consolidated model -> serving export (see :func:`write_export`)."""
    from bundlerec.hub import resolve_model_path
    from bundlerec.model.pretrained import resolve_pooling
    from bundlerec.model.two_tower import build_encoder

    mc = cfg.model
    path = resolve_model_path(mc.name_or_path)
    model = TwoTower(build_encoder(path, mc.random_init, 0, mc.lora_rank, mc.lora_targets), mc.temperature,
                     resolve_pooling(path, mc.pooling))
    missing, unexpected = model.load_state_dict(consolidated_state_dict(ckpt_dir), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match the model: missing={missing[:5]} unexpected={unexpected[:5]}")
    return write_export(model, cfg, prep_dir, export_dir)


def write_export(model, cfg: PipelineConfig, prep_dir: str, export_dir: str) -> str:
    """Everything serving needs, in one directory: HF encoder + tokenizer, user tower, metadata,
    item index (N, d), items table, training popularity (cold start), users' latest histories.
    Written in a staging folder, sealed with a manifest (sizes + SHA-256) and swapped in whole
    (bundlerec.integrity): a crash leaves the previous export, never a mix."""
    from bundlerec.integrity import staged

    with staged(export_dir) as tmp:
        _write_export(model, cfg, prep_dir, tmp)
    log.info("train: exported %s", export_dir)
    return export_dir


def _write_export(model, cfg: PipelineConfig, prep_dir: str, export_dir: str) -> None:
    from bundlerec.data.catalog import load_items, padded_tokens
    from bundlerec.data.examples import load_split
    from bundlerec.data.statistics import CoStats, basket_groups, popularity
    from bundlerec.hub import load_tokenizer
    from bundlerec.privacy import SCHEME, ensure_user_key, pseudonym

    model.eval()
    save_export(model, load_tokenizer(cfg.model.name_or_path), export_dir,
                {"base_model": cfg.model.name_or_path, "history_len": cfg.data.history_len,
                 "item_max_tokens": cfg.data.item_max_tokens, "user_ids": SCHEME})
    items = load_items(prep_dir)
    ids, mask = padded_tokens(items)
    from bundlerec.model.batch_encode import index_catalog

    # a large catalog: Ray Data actors run the encoder just saved (what serving loads)
    index = index_catalog(model, os.path.join(export_dir, "encoder"), ids, mask, cfg.train, "export: encode catalog")
    np.save(os.path.join(export_dir, "item_index.npy"), index.astype(np.float32))
    items.drop(columns=["input_ids", "attention_mask"]).to_parquet(os.path.join(export_dir, "items.parquet"))
    train = load_split(prep_dir, "train")
    np.save(os.path.join(export_dir, "popularity.npy"), popularity(train, len(items)))
    latest = load_split(prep_dir, "latest")[["user_id", "hist_items", "hist_types", "hist_age_hours", "target_time"]]
    key = ensure_user_key(cfg.serve.user_key_file)  # no clear user id in the artifact (bundlerec.privacy)
    latest["user_id"] = [pseudonym(u, key) for u in latest["user_id"]]
    latest.to_parquet(os.path.join(export_dir, "latest.parquet"))
    # co-purchase statistics for bundle compatibility: items bought in the same training basket
    CoStats.from_groups(basket_groups(train), len(items)).save(export_dir)

    log.info("train: export written (%d items indexed)", len(items))
