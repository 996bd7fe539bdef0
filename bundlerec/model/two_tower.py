"""The two-tower model and its contract: ``loss(batch)``, ``score(batch)``, ``topk(batch, k)``.

* Item tower: the pretrained transformer over item text, mean-pooled and L2-normalised.
* User tower: the user's recent events -- item-tower embeddings of the history items plus
  event-type, position and recency embeddings -- pooled by additive attention, with a residual
  projection. All user-tower weights that shape the output start at zero, so the untrained model
  scores with the mean of the history embeddings: exactly the zero-shot baseline.
* Score: cosine(user, item) / temperature.

Training (``loss``) encodes every distinct item of a batch (history, targets, sampled negatives)
in **one** encoder forward -- ZeRO-3 gathers parameters per forward, and DDP requires one.
Scoring (``score``/``topk``) uses a precomputed item index (``index_items``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from bundlerec.data.schema import EVENT_TYPES

N_RECENCY = 16  # log2(1 + hours) buckets: up to ~2^15 h ≈ 3.7 years
MAX_POSITIONS = 512


def recency_bucket(age_hours: torch.Tensor) -> torch.Tensor:
    return torch.log2(1.0 + age_hours.clamp(min=0)).floor().long().clamp(0, N_RECENCY - 1)


POOLINGS = ("mean", "cls", "last")


def _model_kwargs(config) -> dict:
    """``add_pooling_layer=False`` for the architectures that have a pooler (BERT, RoBERTa, MPNet ...:
    unused, it would break DDP/ZeRO gradient reduction); nothing for the others (decoders)."""
    import inspect

    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    cls = MODEL_MAPPING.get(type(config), None)
    return {"add_pooling_layer": False} if cls and "add_pooling_layer" in inspect.signature(cls.__init__).parameters else {}


def load_backbone(model_dir: str, random_init: bool = False, attn_implementation: Optional[str] = None):
    """Any Hugging Face encoder or decoder (``AutoModel``: the transformer without its LM head);
    ``attn_implementation``: eager | sdpa | flash_attention_2 (None: transformers' default)."""
    from transformers import AutoConfig, AutoModel

    conf = AutoConfig.from_pretrained(model_dir)
    kw = {**_model_kwargs(conf), **({"attn_implementation": attn_implementation} if attn_implementation else {})}
    if random_init:
        return AutoModel.from_config(conf, **kw)
    return AutoModel.from_pretrained(model_dir, **kw)


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer blocks, whatever the architecture calls it (``encoder.layer``
    in BERT, ``layers`` in Llama/Qwen/Mistral, ``h`` in GPT-2 ...): its longest ModuleList."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"{type(model).__name__}: no stack of transformer blocks found")
    return max(lists, key=len)


def input_embeddings(model: nn.Module) -> nn.Module:
    """The embedding layer (BERT-like: words, positions, types and their LayerNorm; decoders: tokens)."""
    emb = getattr(model, "embeddings", None)
    return emb if isinstance(emb, nn.Module) else model.get_input_embeddings()


def build_encoder(model_dir: str, random_init: bool = False, freeze_layers: int = 0, lora_rank: int = 0,
                  lora_targets: Optional[list] = None, attn_implementation: Optional[str] = None,
                  gradient_checkpointing: bool = False):
    """The item tower's transformer (any HF encoder or decoder, without pooler or LM head), optionally
    with its input embeddings and lowest ``freeze_layers`` blocks frozen, or with LoRA adapters of rank
    ``lora_rank`` on ``lora_targets`` (module names; None = PEFT's default for the architecture);
    ``gradient_checkpointing`` recomputes block activations in backward."""
    enc = load_backbone(model_dir, random_init, attn_implementation)
    if gradient_checkpointing:
        if hasattr(enc, "activation_checkpointing_enable"):  # transformers >= 5.2 (the old name is deprecated)
            enc.activation_checkpointing_enable({"use_reentrant": False})
        else:
            enc.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if freeze_layers:
        for p in input_embeddings(enc).parameters():
            p.requires_grad_(False)
        for layer in transformer_blocks(enc)[:freeze_layers]:
            for p in layer.parameters():
                p.requires_grad_(False)
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        enc = get_peft_model(enc, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                             target_modules=list(lora_targets) if lora_targets else None))
    return enc


def frozen_prefix_depth(encoder: nn.Module) -> int:
    """How many lowest blocks are frozen entirely, together with the input embeddings (0 when the
    embeddings train): their output depends on the item only and can be computed once."""
    if any(p.requires_grad for p in input_embeddings(encoder).parameters()):
        return 0
    k = 0
    for block in transformer_blocks(encoder):
        if any(p.requires_grad for p in block.parameters()):
            break
        k += 1
    return k


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """(N, L, d) token states -> (N, d): the mean over valid tokens, the first token (``cls``), or the
    last valid token (``last``: decoders, whose last token has seen the whole text; right or left
    padding alike)."""
    if how == "mean":
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    if how == "cls":
        return hidden[:, 0]
    if how == "last":
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask.long() * (positions + 1)).argmax(1)  # index of the last 1 in each row
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"pooling must be one of {POOLINGS}, not {how!r}")


class UserTower(nn.Module):
    """Attention pooling over history item embeddings + event-type/position/recency embeddings."""

    def __init__(self, d: int):
        super().__init__()
        self.type_emb = nn.Embedding(len(EVENT_TYPES), d)
        self.pos_emb = nn.Embedding(MAX_POSITIONS, d)
        self.rec_emb = nn.Embedding(N_RECENCY, d)
        self.attn = nn.Linear(d, d)
        self.attn_v = nn.Linear(d, 1)
        self.proj = nn.Linear(d, d)
        for m in (self.type_emb, self.pos_emb, self.rec_emb):
            nn.init.zeros_(m.weight)
        for m in (self.attn_v, self.proj):  # zero -> uniform attention, identity output at init
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, hist_emb, hist_types, hist_age, hist_valid):
        # hist_emb (B, H, d); hist_types (B, H) long; hist_age (B, H) hours; hist_valid (B, H) bool
        B, H, _ = hist_emb.shape
        pos = (hist_valid.long().sum(1, keepdim=True) - 1 - torch.arange(H, device=hist_emb.device)).clamp(0, MAX_POSITIONS - 1)
        h = hist_emb + self.type_emb(hist_types) + self.pos_emb(pos) + self.rec_emb(recency_bucket(hist_age))
        logits = self.attn_v(torch.tanh(self.attn(h))).squeeze(-1)  # (B, H)
        logits = logits.float().masked_fill(~hist_valid, -1e4)
        a = torch.softmax(logits, dim=-1).to(h.dtype).unsqueeze(-1)  # (B, H, 1)
        pooled = (a * h).sum(1)  # (B, d)
        return F.normalize(pooled + self.proj(pooled), dim=-1)


def gather_candidates(cand: torch.Tensor, items: torch.Tensor, log_q: torch.Tensor) -> tuple:
    """Every data-parallel worker's candidate embeddings (with their gradients: the all-gather's
    backward sends each worker its own columns' share), ids and logQ, this worker's first so that
    row b's positive stays column b; workers' batches may differ in size (padded for the collective,
    the padding dropped). Without an initialized process group of 2 or more, the inputs unchanged.
    Every worker must call it as often as the others (one call per micro-step)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return cand, items, log_q
    from torch.distributed.nn.functional import all_gather

    world, rank = dist.get_world_size(), dist.get_rank()
    n = torch.tensor([cand.shape[0]], device=cand.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(x) for x in sizes]
    pad = max(sizes) - cand.shape[0]
    padded = torch.cat([cand, cand.new_zeros(pad, cand.shape[1])]) if pad else cand
    meta = torch.stack([items.to(torch.float64), log_q.to(torch.float64)], 1)  # ids are exact in float64 below 2**53
    meta = torch.cat([meta, meta.new_zeros(pad, 2)]) if pad else meta
    embs = all_gather(padded)
    metas = [torch.zeros_like(meta) for _ in range(world)]
    dist.all_gather(metas, meta)
    order = [rank] + [r for r in range(world) if r != rank]
    out_c = torch.cat([embs[r][:sizes[r]] for r in order])
    out_m = torch.cat([metas[r][:sizes[r]] for r in order])
    return out_c, out_m[:, 0].to(items.dtype), out_m[:, 1].to(log_q.dtype)


class TwoTower(nn.Module):
    def __init__(self, encoder: nn.Module, temperature: float = 0.05, pooling: str = "mean"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, not {pooling!r}")
        self.encoder = encoder
        self.pooling = pooling
        self.user_tower = UserTower(encoder.config.hidden_size)
        self.temperature = temperature
        self._index: Optional[torch.Tensor] = None  # (N, d) item embeddings for score/topk
        self._prefix: Optional[torch.Tensor] = None  # (N, L, d) output of the frozen prefix per item
        self._prefix_items: Optional[torch.Tensor] = None  # the items of the running forward
        self.gather_negatives = False  # model.gather_negatives: candidates of every worker (training only)

    # ---------------------------------------------------------------- towers
    def encode_items(self, input_ids, attention_mask, items: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(N, L) tokens -> (N, d) normalised embeddings, pooled as ``self.pooling`` says. ``items``:
        the catalog ids of the rows, needed while the frozen prefix is cached."""
        if self._prefix is not None:
            if items is None:
                raise RuntimeError("the frozen-prefix cache is on: encode_items needs the rows' item ids")
            self._prefix_items = items
        try:
            out = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (N, L, d)
        finally:
            self._prefix_items = None
        return F.normalize(pool(out, attention_mask, self.pooling), dim=-1)

    @torch.no_grad()
    def cache_frozen_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            batch_size: int = 256, max_bytes: float = 2 * 1024**3) -> int:
        """Compute the output of the frozen prefix (input embeddings + the lowest frozen blocks,
        :func:`frozen_prefix_depth`) once for every catalog item; from then on those blocks pass their
        input through and the first returns the cached states, so a step runs the trainable blocks
        only. Works for any architecture whose blocks take and return the hidden states (transformers
        >= 5). Returns the number of blocks skipped (0: nothing frozen, or the cache would exceed
        ``max_bytes``). ZeRO-3: every rank must call it (the forwards gather parameters)."""
        self.clear_frozen_prefix()
        k = frozen_prefix_depth(self.encoder)
        blocks = transformer_blocks(self.encoder)
        N, L = input_ids.shape
        d = self.encoder.config.hidden_size
        if k == 0 or N * L * d * 4 > max_bytes:
            return 0
        was_training = self.training
        self.eval()
        captured: list = []
        hook = blocks[k - 1].register_forward_hook(
            lambda _m, _a, out: captured.append(out[0] if isinstance(out, tuple) else out))
        cache = None
        try:
            for i in range(0, N, batch_size):
                ids, m = input_ids[i:i + batch_size], attention_mask[i:i + batch_size]
                n = int(m.sum(1).max())
                self.encoder(input_ids=ids[:, :n], attention_mask=m[:, :n])
                h = captured.pop()
                if cache is None:
                    cache = torch.zeros((N, L, d), dtype=h.dtype, device=h.device)
                cache[i:i + ids.shape[0], :n] = h
        finally:
            hook.remove()
            self.train(was_training)
        self._prefix = cache

        def skip(first: bool):
            def forward(hidden_states=None, *args, **kwargs):
                h = kwargs.get("hidden_states") if hidden_states is None else hidden_states
                return self._prefix[self._prefix_items][:, :h.shape[1]].to(h.dtype) if first else h
            return forward

        for j, block in enumerate(blocks[:k]):
            block.forward = skip(j == 0)  # instance attribute: names and state dict unchanged
        return k

    def clear_frozen_prefix(self) -> None:
        """Run every block again (the cache dropped)."""
        if self._prefix is None:
            return
        for block in transformer_blocks(self.encoder):
            block.__dict__.pop("forward", None)
        self._prefix = None

    def user_embed(self, hist_emb, batch) -> torch.Tensor:
        return self.user_tower(hist_emb, batch["hist_types"], batch["hist_age"], batch["hist_valid"])

    # ---------------------------------------------------------------- contract
    def forward(self, batch: dict) -> torch.Tensor:
        return self.loss(batch)

    def loss(self, batch: dict) -> torch.Tensor:
        """Softmax over in-batch (+ sampled) negatives, logQ-corrected, accidental hits masked."""
        logits = self.logits(batch)
        return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))

    def logits(self, batch: dict) -> torch.Tensor:
        """(B, C) training logits: row b's positive is column b.

        batch (see bundlerec.model.collate.Collator): ``tokens``/``token_mask`` (U, L) for the U distinct
        items of the batch; ``hist_pos`` (B, H) and ``target_pos`` (B,) index into them;
        ``cand_pos`` (C,) candidate columns (targets then sampled), ``cand_log_q`` (C,),
        ``cand_item`` (C,) global ids and ``target_item`` (B,).

        * logQ correction: ``cos / T - log q(item)``, q = the probability that the item appears as a
          candidate (popular items are over-represented among in-batch negatives);
        * accidental hits: a column holding row b's own target item (another row bought it too, or it
          was sampled) is not a negative for row b and is masked to -1e4; with ``group_items`` (B, M)
          (``model.mask_mates``) so is a column holding any of them (bundle mates, the row's history).
        """
        emb = self.encode_items(batch["tokens"], batch["token_mask"], batch.get("items"))  # (U, d): the single forward
        user = self.user_embed(emb[batch["hist_pos"]], batch)  # (B, d)
        cand, cand_item, cand_log_q = emb[batch["cand_pos"]], batch["cand_item"], batch["cand_log_q"]  # (C, d), (C,), (C,)
        if self.gather_negatives:  # every worker's candidates (its own first): world x the negatives
            cand, cand_item, cand_log_q = gather_candidates(cand, cand_item, cand_log_q)
        logits = (user @ cand.T).float() / self.temperature  # (B, C)
        logits = logits - cand_log_q.unsqueeze(0)
        B = logits.shape[0]
        own = torch.arange(B, device=logits.device)
        hit = cand_item.unsqueeze(0) == batch["target_item"].unsqueeze(1)  # (B, C)
        if "group_items" in batch:  # (B, M): mates and history, -1 padded (never equal to an item id)
            hit |= (cand_item.view(1, -1, 1) == batch["group_items"].unsqueeze(1)).any(-1)
        hit[own, own] = False
        return logits.masked_fill(hit, -1e4)

    @torch.no_grad()
    def index_items(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int = 256,
                    progress: Optional[str] = None, items: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Encode the whole catalog into the item index used by score/topk. Returns (N, d) float32.
        ``progress``: a label to log progress lines under (bundlerec.progress), e.g. on rank 0 only.
        ``items``: the catalog ids of the rows when they are a part of the catalog (the rows are the
        catalog otherwise); the index is then theirs."""
        from bundlerec.progress import Progress

        was_training = self.training
        self.eval()
        chunks = []
        p = Progress(progress or "", input_ids.shape[0], "items", enabled=bool(progress))
        for i in range(0, input_ids.shape[0], batch_size):
            ids, m = input_ids[i:i + batch_size], attention_mask[i:i + batch_size]
            L = int(m.sum(1).max())
            rows = items[i:i + batch_size] if items is not None else torch.arange(i, i + ids.shape[0], device=ids.device)
            chunks.append(self.encode_items(ids[:, :L], m[:, :L], rows).float())
            p.update(ids.shape[0])
        p.done()
        self._index = torch.cat(chunks)
        self.train(was_training)
        return self._index

    def set_index(self, index: torch.Tensor) -> None:
        self._index = index

    @torch.no_grad()
    def score(self, batch: dict) -> torch.Tensor:
        """(B, N) scores of every catalog item for each user; ``hist_items`` (B, H) are item ids."""
        if self._index is None:
            raise RuntimeError("call index_items() (or set_index) before score()")
        return self.user_vectors(batch) @ self._index.T / self.temperature

    @torch.no_grad()
    def user_vectors(self, batch: dict) -> torch.Tensor:
        """(B, d) user embeddings from item-id histories (score = user . item / temperature)."""
        if self._index is None:
            raise RuntimeError("call index_items() (or set_index) before user_vectors()")
        hist = self._index[batch["hist_items"].clamp(min=0)]
        return self.user_embed(hist.to(next(self.user_tower.parameters()).dtype), batch).float()

    @torch.no_grad()
    def topk(self, batch: dict, k: int):
        """(scores, item ids), each (B, k)."""
        s = self.score(batch)
        return torch.topk(s, min(k, s.shape[1]), dim=1)


# -------------------------------------------------------------------- export / load


