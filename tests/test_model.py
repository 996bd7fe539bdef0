"""The model contract (loss / score / topk), zero-shot equivalence at init, freezing and LoRA."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bundlerec.model.collate import Collator, history_tensors
from bundlerec.hub import ModelNotFoundError, load_tokenizer, resolve_model_path
from bundlerec.model.two_tower import TwoTower, build_encoder
from tests.support import pickled_files, tiny_model_dir

MODEL = "all-MiniLM-L6-v2"
TEXTS = ["Lumix pro zoom lens | category: photography > camera lenses", "Kestrel travel tripod | category: tripods",
         "Crema espresso roast beans | category: coffee beans", "Bruhaus burr grinder | category: coffee grinders",
         "Stride trail running shoes | category: running shoes", "Velo compression socks | category: sports socks"]


@pytest.fixture(scope="module")
def tokens():
    enc = load_tokenizer(MODEL)(TEXTS, padding=True, return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def _batch(collate, hist, targets):
    return collate({"hist_items": hist, "hist_types": [[0] * len(h) for h in hist],
                    "hist_age_hours": [[1.0] * len(h) for h in hist], "targets": [[t] for t in targets]})


def test_untrained_model_is_the_zero_shot_mean_of_history(tokens):
    torch.manual_seed(0)
    m = TwoTower(build_encoder(resolve_model_path(MODEL)), 0.05).eval()
    ids, mask = map(torch.as_tensor, tokens)
    idx = m.index_items(ids, mask)
    b = history_tensors({"hist_items": [[0, 1]], "hist_types": [[0, 2]], "hist_age_hours": [[5.0, 1.0]]}, 4, "cpu")
    expected = F.normalize(idx[[0, 1]].mean(0), dim=0) @ idx.T / 0.05
    assert torch.allclose(m.score(b)[0], expected, atol=1e-4)
    scores, top = m.topk(b, 3)
    assert top.shape == (1, 3) and torch.all(scores[:, :-1] >= scores[:, 1:])


def test_loss_falls_on_a_fixed_batch_and_grads_reach_both_towers(tokens):
    torch.manual_seed(0)
    m = TwoTower(build_encoder(resolve_model_path(MODEL), freeze_layers=4), 0.05)
    collate = Collator(*tokens, popularity=np.ones(6), history_len=4, sampled_negatives=2)
    batch = _batch(collate, [[0], [2], [4]], [1, 3, 5])  # lens -> tripod, beans -> grinder, shoes -> socks
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(8):
        loss = m.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] * 0.7, losses
    assert m.user_tower.proj.weight.grad is not None and m.encoder.encoder.layer[5].attention.self.query.weight.grad is not None
    assert all(p.grad is None for p in m.encoder.embeddings.parameters())  # frozen


def test_lora_trains_adapters_only():
    enc = build_encoder(resolve_model_path(MODEL), lora_rank=4)
    trainable = [n for n, p in enc.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert sum(p.numel() for n, p in enc.named_parameters() if p.requires_grad) < 0.05 * sum(p.numel() for p in enc.parameters())


def test_missing_model_gives_a_clear_hint(tmp_path):
    with pytest.raises(ModelNotFoundError, match="local copy|does not exist"):
        resolve_model_path("some-org/not-in-cache-model")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope"))


def test_itemknn_cooccurrence_counts_history_to_target_and_same_basket():
    import pandas as pd

    from bundlerec.data.statistics import cooccurrence

    t = pd.Timestamp("2026-01-01", tz="UTC")
    train = pd.DataFrame({"user_id": ["u", "u", "v"], "target_time": [t, t, t],
                          "hist_items": [[0, 1, 1], [0, 1, 1], [2]], "targets": [[3], [4], [3]]})
    C = cooccurrence(train, 5).toarray()
    expected = np.zeros((5, 5))
    expected[[0, 1, 0, 1, 2], [3, 3, 4, 4, 3]] = 1  # history item -> bought item (duplicates in a history count once)
    expected[3, 4] = expected[4, 3] = 1  # 3 and 4 were bought in the same basket of u
    np.testing.assert_array_equal(C, expected)


def _logit_batch(tokens, targets, log_q):
    """Two users (histories 0 and 2) with the given target items; candidates = the targets."""
    collate = Collator(*tokens, popularity=np.ones(6), history_len=4, sampled_negatives=0)
    batch = _batch(collate, [[0], [2]], targets)
    batch["cand_log_q"] = torch.as_tensor(log_q, dtype=torch.float32)
    return batch


def test_logq_correction_subtracts_log_sampling_probability(tokens):
    torch.manual_seed(0)
    m = TwoTower(build_encoder(resolve_model_path(MODEL)), 0.05).eval()
    with torch.no_grad():
        plain = m.logits(_logit_batch(tokens, [1, 3], [0.0, 0.0]))
        corrected = m.logits(_logit_batch(tokens, [1, 3], [np.log(0.9), np.log(0.1)]))
    # a popular candidate (q = 0.9) is pushed up less than a rare one (q = 0.1): logit - log q
    assert torch.allclose(corrected, plain - torch.tensor([np.log(0.9), np.log(0.1)]).float(), atol=1e-4)
    # and the loss changes with it (the correction is used, not only computed)
    assert not torch.isclose(F.cross_entropy(plain, torch.arange(2)), F.cross_entropy(corrected, torch.arange(2)))


def test_accidental_hits_are_masked_not_counted_as_negatives(tokens):
    torch.manual_seed(0)
    m = TwoTower(build_encoder(resolve_model_path(MODEL)), 0.05).eval()
    with torch.no_grad():
        same = m.logits(_logit_batch(tokens, [1, 1], [0.0, 0.0]))  # both users bought item 1
        diff = m.logits(_logit_batch(tokens, [1, 3], [0.0, 0.0]))
        loss_same = m.loss(_logit_batch(tokens, [1, 1], [0.0, 0.0]))
    # the other row's column holds the same item: masked, so each row's softmax has only its positive
    assert same[0, 1] == -1e4 and same[1, 0] == -1e4 and same[0, 0] > -1e3 and same[1, 1] > -1e3
    assert (diff > -1e3).all()  # distinct items stay negatives
    assert float(loss_same) < 1e-3  # without the mask two identical columns would cost log(2)


def test_recent_baseline_repeats_the_history_carts_first_and_nothing_else():
    from bundlerec.data.statistics import Recent
    from bundlerec.model.collate import history_tensors

    # user 0: viewed 3, carted 1, viewed 2 (most recent); user 1: no history
    batch = history_tensors({"hist_items": [[3, 1, 2], []], "hist_types": [[0, 2, 0], []],
                             "hist_age_hours": [[3.0, 2.0, 1.0], []]}, 8, "cpu")
    s = Recent(n_items=6).score(batch)
    assert s.shape == (2, 6)
    assert s[0].argsort(descending=True)[:3].tolist() == [1, 2, 3]  # cart first, then the more recent view
    assert (s[0, [0, 4, 5]] == 0).all() and (s[1] == 0).all()  # never an item outside the history


def test_export_round_trips_without_pickle(tmp_path):
    """The export's weights are safetensors (HF encoder and user tower): loading runs no code."""
    import torch

    from bundlerec.model.export import load_export, save_export
    from bundlerec.hub import load_tokenizer
    from bundlerec.model.two_tower import TwoTower, build_encoder
    from tests.support import tiny_encoder

    model = TwoTower(build_encoder(tiny_encoder()), temperature=0.07)
    with torch.no_grad():
        for p in model.user_tower.parameters():
            p.normal_()
    save_export(model, load_tokenizer(tiny_encoder()), str(tmp_path), {"history_len": 4})
    names = {p.name for p in tmp_path.rglob("*") if p.is_file()}
    assert "user_tower.safetensors" in names and not any(n.endswith((".pt", ".bin", ".pkl")) for n in names), names
    assert pickled_files(tmp_path) == []  # by content, not by name
    loaded, meta = load_export(str(tmp_path))
    assert meta["temperature"] == 0.07
    for (k, a), (_, b) in zip(model.user_tower.state_dict().items(), loaded.user_tower.state_dict().items()):
        assert torch.equal(a, b), k


def test_the_pickle_check_reads_contents_not_names(tmp_path):
    """pickled_files (what the no-pickle assertions use) finds a pickle under any name, torch.save's
    zip, an object array; and leaves safetensors, JSON and plain arrays alone."""
    import pickle

    import numpy as np
    import torch
    from safetensors.torch import save_file

    pickle.dump({"a": 1}, open(tmp_path / "weights.json", "wb"))
    torch.save({"w": torch.ones(2)}, tmp_path / "model.safetensors")
    np.save(tmp_path / "objects.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    clean = tmp_path / "clean"
    clean.mkdir()
    save_file({"w": torch.ones(2)}, str(clean / "model.safetensors"))
    (clean / "meta.json").write_text("{}")
    np.save(clean / "index.npy", np.ones(3))
    assert pickled_files(tmp_path) == sorted(str(tmp_path / n) for n in ("model.safetensors", "objects.npy", "weights.json"))
    assert pickled_files(clean) == []


@pytest.mark.parametrize("family,pooling", [("bert", "mean"), ("roberta", "cls"), ("llama", "last"),
                                            ("qwen2", "last")])
def test_any_encoder_or_decoder_family_trains_freezes_and_takes_lora(family, pooling, tmp_path_factory, tokens):
    """The item tower loads encoders and decoder LLMs alike (no BERT-only arguments or names): the
    lowest blocks and the input embeddings freeze by the architecture's own block stack, LoRA goes on
    PEFT's default modules of that architecture, the configured pooling embeds items, gradients reach
    what trains, and the export round-trips with its pooling."""
    from bundlerec.model.export import load_export, save_export
    from bundlerec.hub import load_tokenizer
    from bundlerec.model.two_tower import transformer_blocks

    path = tiny_model_dir(family, tmp_path_factory.getbasetemp() / "families")
    enc = build_encoder(path, freeze_layers=2)
    blocks = transformer_blocks(enc)
    assert len(blocks) == 3
    frozen = {n for n, p in enc.named_parameters() if not p.requires_grad}
    assert all(not p.requires_grad for b in blocks[:2] for p in b.parameters())
    assert all(p.requires_grad for p in blocks[2].parameters())
    assert all(not p.requires_grad for p in enc.get_input_embeddings().parameters()) and frozen
    m = TwoTower(enc, 0.05, pooling)
    ids, mask = (torch.as_tensor(x) for x in tokens)
    emb = m.encode_items(ids, mask)
    assert emb.shape == (ids.shape[0], 32) and torch.allclose(emb.norm(dim=-1), torch.ones(len(emb)), atol=1e-5)
    emb.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in blocks[2].parameters())

    lora = build_encoder(path, lora_rank=2)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable), trainable[:5]
    model = TwoTower(lora, 0.05, pooling).eval()
    with torch.no_grad():
        before = model.encode_items(ids, mask)
    out = tmp_path_factory.mktemp(f"export-{family}")
    save_export(model, load_tokenizer(path), str(out), {"base_model": family})
    loaded, meta = load_export(str(out))  # adapters merged into plain weights
    assert meta["pooling"] == pooling and loaded.pooling == pooling
    assert not any("lora_" in n for n, _ in loaded.encoder.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_items(ids, mask), before, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family,pooling,attention", [("bert", "mean", "eager"), ("roberta", "cls", "sdpa"),
                                                      ("llama", "last", "eager"), ("qwen2", "last", "sdpa")])
def test_the_frozen_prefix_cache_gives_the_full_forwards_embeddings_and_gradients(family, pooling, attention,
                                                                                tmp_path_factory, tokens):
    """With the embeddings and the lowest blocks frozen, their output is computed once per item and the
    step runs only the trainable blocks: item embeddings and the trainable blocks' gradients are those
    of the full forward (eval mode: no dropout), for encoders and decoders, eager or SDPA attention,
    and with gradient checkpointing; clearing the cache runs every block again."""
    from bundlerec.model.two_tower import frozen_prefix_depth, transformer_blocks

    path = tiny_model_dir(family, tmp_path_factory.getbasetemp() / "families")
    ids, mask = (torch.as_tensor(x) for x in tokens)
    rows = torch.tensor([4, 1, 3])  # a step's distinct items, in any order, trimmed to their longest text
    L = int(mask[rows].sum(1).max())

    def run(cached: bool, checkpointing: bool = False):
        torch.manual_seed(0)
        enc = build_encoder(path, freeze_layers=2, attn_implementation=attention,
                            gradient_checkpointing=checkpointing)
        m = TwoTower(enc, 0.05, pooling).eval()
        assert frozen_prefix_depth(enc) == 2
        if cached:
            assert m.cache_frozen_prefix(ids, mask) == 2
        emb = m.encode_items(ids[rows, :L], mask[rows, :L], rows)
        (emb * torch.linspace(-1, 1, emb.shape[1])).sum().backward()
        grads = [p.grad.clone() for p in transformer_blocks(enc)[2].parameters()]
        return m, emb.detach(), grads

    _, full, g_full = run(False)
    m, cached, g_cached = run(True)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-4)
    for a, b in zip(g_cached, g_full):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    _, ckpt, g_ckpt = run(True, checkpointing=True)
    torch.testing.assert_close(ckpt, full, atol=1e-5, rtol=1e-4)
    for a, b in zip(g_ckpt, g_full):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with pytest.raises(RuntimeError, match="item ids"):
        m.encode_items(ids, mask)
    torch.testing.assert_close(m.index_items(ids, mask)[rows], full, atol=1e-5, rtol=1e-4)  # validation path
    m.clear_frozen_prefix()
    with torch.no_grad():
        torch.testing.assert_close(m.encode_items(ids[rows, :L], mask[rows, :L]), full, atol=1e-5, rtol=1e-4)
    assert frozen_prefix_depth(build_encoder(path, lora_rank=2)) == 0  # LoRA on every block: nothing to skip


def test_last_token_pooling_reads_the_last_valid_token_with_either_padding_side():
    from bundlerec.model.two_tower import pool

    h = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert pool(h, right, "last").flatten().tolist() == [1.0, 7.0]
    assert pool(h, left, "last").flatten().tolist() == [3.0, 7.0]
    assert pool(h, right, "cls").flatten().tolist() == [0.0, 4.0]
    assert pool(h, right, "mean").flatten().tolist() == [0.5, 5.5]
    with pytest.raises(ValueError, match="pooling"):
        TwoTower(torch.nn.Linear(1, 1), pooling="max")


def test_training_refuses_items_tokenized_by_another_tokenizer_and_pads_with_the_tokenizers_pad_id(tmp_path):
    """Prep records its tokenizer's fingerprint (vocabulary, special tokens, pad id); a model whose
    tokenizer differs is refused before any compute, with what to do; the pad id is the tokenizer's
    (its end-of-text token when it has no pad token, as decoder LLMs often do)."""
    import pandas as pd

    from bundlerec.data.catalog import pad_id, padded_tokens, tokenizer_fingerprint
    from bundlerec.data.examples import PrepMismatch, check_prepared
    from bundlerec.hub import load_tokenizer
    from tests.support import tiny_encoder

    minilm = load_tokenizer(MODEL)
    same = tokenizer_fingerprint(load_tokenizer(tiny_encoder()))  # the tiny test encoder reuses MiniLM's
    manifest = {"examples": {"val": 5}, "tokenizer": MODEL, "tokenizer_fingerprint": tokenizer_fingerprint(minilm)}
    check_prepared(manifest, 4, same)
    other = load_tokenizer(MODEL)
    other.add_tokens(["<shop-token>"])
    with pytest.raises(PrepMismatch, match="Re-run prep with this model.name_or_path"):
        check_prepared(manifest, 4, tokenizer_fingerprint(other))
    other.pad_token = None
    assert pad_id(minilm) == minilm.pad_token_id and pad_id(other) in (other.eos_token_id, 0)
    items = pd.DataFrame({"input_ids": [[5, 6, 7], [8]]})
    items.attrs["pad_token_id"] = 9
    ids, mask = padded_tokens(items)
    assert ids.tolist() == [[5, 6, 7], [8, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_train_flops_count_what_a_step_computes(tmp_path_factory):
    """2 FLOPs per weight forward, +2 for activation gradients where something below trains, +2 for
    weight gradients where the block trains; blocks replaced by the frozen-prefix cache cost 0."""
    import torch

    from bundlerec.model.two_tower import TwoTower, build_encoder, transformer_blocks
    from bundlerec.train.flops import train_flops_per_token
    from tests.support import tiny_model_dir

    model_dir = tiny_model_dir("bert", tmp_path_factory.getbasetemp() / "families")
    enc = build_encoder(model_dir, freeze_layers=1)
    per_block = [sum(p.numel() for p in b.parameters()) for b in transformer_blocks(enc)]
    assert train_flops_per_token(enc) == 2 * per_block[0] + 6 * sum(per_block[1:])  # frozen embeddings + block 0
    tower = TwoTower(enc, 0.05, "mean")
    ids = torch.randint(5, 100, (10, 6))
    tower.cache_frozen_prefix(ids, torch.ones_like(ids))
    assert train_flops_per_token(enc) == 6 * sum(per_block[1:])  # block 0 comes from the cache
    tower.clear_frozen_prefix()
    for p in enc.parameters():
        p.requires_grad_(False)
    for p in transformer_blocks(enc)[0].parameters():  # trainable at the bottom: gradients flow through the rest
        p.requires_grad_(True)
    assert train_flops_per_token(enc) == 6 * per_block[0] + 4 * sum(per_block[1:])


def test_auto_pooling_follows_a_sentence_transformers_folder_else_the_architecture(tmp_path_factory):
    """`model.pooling=auto`: the Pooling module of a sentence-transformers folder (modules.json ->
    1_Pooling/config.json), else last token for decoders and mean for encoders; a pooling bundlerec does
    not have is refused with the fix; an explicit choice wins."""
    import shutil

    from bundlerec.hub import resolve_model_path
    from bundlerec.model.pretrained import resolve_pooling
    from tests.support import tiny_model_dir

    assert resolve_pooling(resolve_model_path("all-MiniLM-L6-v2")) == "mean"  # the packaged ST folder
    families = tmp_path_factory.getbasetemp() / "families"
    assert resolve_pooling(tiny_model_dir("qwen2", families)) == "last"
    assert resolve_pooling(tiny_model_dir("llama", families)) == "last"
    assert resolve_pooling(tiny_model_dir("roberta", families)) == "mean"
    st = tmp_path_factory.mktemp("st") / "bert-st"
    shutil.copytree(tiny_model_dir("bert", families), st)
    (st / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (st / "1_Pooling").mkdir()
    for mode, want in (("pooling_mode_cls_token", "cls"), ("pooling_mode_lasttoken", "last"),
                       ("pooling_mode_mean_tokens", "mean")):
        (st / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, mode: True}))
        assert resolve_pooling(str(st)) == want
        assert resolve_pooling(str(st), "cls") == "cls"
    (st / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(ValueError, match="set model.pooling explicitly"):
        resolve_pooling(str(st))


def test_collation_in_ray_datas_threads_draws_the_same_negatives_whichever_thread_collates():
    """The streamed ingest collates in Ray Data's prefetch threads: each batch's sampled negatives
    depend on the seed and the batch, not on call order, so a deterministic data order gives the same
    batches run after run; another epoch's seed draws others."""
    from bundlerec.model.collate import Collator

    ids, mask = np.arange(50 * 4).reshape(50, 4) % 97 + 5, np.ones((50, 4), dtype=np.int64)
    c = Collator(ids, mask, np.arange(50, dtype=np.float64), 3, sampled_negatives=6)

    def batch(targets):
        b = {"hist_items": np.empty(2, dtype=object), "hist_types": np.empty(2, dtype=object),
             "hist_age_hours": np.empty(2, dtype=object), "targets": np.empty(2, dtype=object)}
        for i, t in enumerate(targets):
            b["hist_items"][i], b["hist_types"][i], b["hist_age_hours"][i] = [1, 2], [0, 2], [3.0, 1.0]
            b["targets"][i] = [t]
        return b

    a, b = batch([7, 9]), batch([11, 13])
    first = c.in_threads(0, 0, 1)
    fa, fb = first(a)["cand_item"], first(b)["cand_item"]
    again = c.in_threads(0, 0, 1)
    assert torch.equal(again(b)["cand_item"], fb) and torch.equal(again(a)["cand_item"], fa)  # order-free
    assert not torch.equal(c.in_threads(0, 0, 2)(a)["cand_item"], fa)  # another epoch, other negatives


def test_mask_mates_keeps_bundle_mates_and_history_out_of_the_negatives(tokens):
    """model.mask_mates: a column holding one of the row's other positives (targets[1:]) or one of its
    history items is masked for that row; with it off only the same item id is."""
    torch.manual_seed(0)
    m = TwoTower(build_encoder(resolve_model_path(MODEL)), 0.05).eval()
    # row 0: history [0], target 1, mate 3; row 1: history [2], target 3; row 2: history [1], target 5
    batch = {"hist_items": [[0], [2], [1]], "hist_types": [[0], [0], [0]], "hist_age_hours": [[1.0]] * 3,
             "targets": [[1, 3], [3], [5]]}
    with torch.no_grad():
        plain = m.logits(Collator(*tokens, popularity=np.ones(6), history_len=4)(batch))
        masked = m.logits(Collator(*tokens, popularity=np.ones(6), history_len=4, mask_mates=True)(batch))
    assert (plain > -1e3).all()  # three distinct targets: nothing masked without group masking
    assert masked[0, 1] == -1e4  # row 0's mate (item 3) is row 1's target: not row 0's negative
    assert masked[2, 0] == -1e4  # row 2's history (item 1) is row 0's target: not row 2's negative
    assert masked[1, 0] > -1e3 and masked[1, 2] > -1e3 and masked[0, 2] > -1e3  # the rest stay negatives
    assert torch.equal(masked.diagonal(), plain.diagonal())  # positives untouched


def test_uniform_negatives_are_drawn_label_free_and_corrected_by_their_expected_count(tokens):
    """model.negatives=uniform: the sampled negatives ignore popularity (an item never trained on is
    drawn as often as the most popular), and logQ uses B*q + S/N per column."""
    pop = np.array([1000.0, 0, 0, 0, 0, 0])
    batch = {"hist_items": [[0], [2]], "hist_types": [[0], [0]], "hist_age_hours": [[1.0]] * 2, "targets": [[1], [3]]}
    draws = {kind: np.concatenate([Collator(*tokens, popularity=pop, history_len=4, sampled_negatives=50, seed=s,
                                            negatives=kind)(batch)["cand_item"][2:].numpy() for s in range(20)])
             for kind in ("popularity", "uniform")}
    assert (draws["popularity"] == 0).mean() > 0.9  # popularity sampling draws the popular item
    counts = np.bincount(draws["uniform"], minlength=6) / len(draws["uniform"])
    assert np.all(np.abs(counts - 1 / 6) < 0.05), counts
    c = Collator(*tokens, popularity=pop, history_len=4, sampled_negatives=4, negatives="uniform")
    b = c(batch)
    expected = np.log(2 * c.q[b["cand_item"].numpy()] + 4 / 6)
    assert np.allclose(b["cand_log_q"].numpy(), expected, atol=1e-6)
    with pytest.raises(ValueError, match="popularity or uniform"):
        Collator(*tokens, popularity=pop, history_len=4, negatives="hard")
