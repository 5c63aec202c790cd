"""KV-cache generation: token-identical to HF generate (greedy), cache logits equal full recompute."""

from __future__ import annotations

import pytest
import torch

from model import GPT2LMHeadModel
from model.generation import filter_logits
from modules.attention import KVCache
from tests.conftest import PAD, VOCAB


def test_greedy_32_tokens_equal_hf(small_ckpt):
    path, hf = small_ckpt
    ours = GPT2LMHeadModel.from_pretrained(path).eval()
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    ref = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=32,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=PAD,
    )
    mine = ours.generate(ids, max_new_tokens=32, eos_token_id=None)
    assert mine.shape == (2, 39)
    assert torch.equal(mine, ref)


def test_greedy_left_padded_batch_equals_hf_and_single(model_ckpt):
    path, hf = model_ckpt
    ours = GPT2LMHeadModel.from_pretrained(path).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :8] = 0
    ids = ids.masked_fill(mask == 0, PAD)
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=PAD)
    mine = ours.generate(ids, attention_mask=mask, max_new_tokens=32, eos_token_id=None)
    assert torch.equal(mine, ref)
    for row in range(3):
        alone = ours.generate(ids[row][mask[row].bool()][None], max_new_tokens=32, eos_token_id=None)
        assert torch.equal(alone[0, -32:], mine[row, -32:])


def test_kv_cache_logits_equal_full_recompute(small_ckpt):
    ours = GPT2LMHeadModel.from_pretrained(small_ckpt[0]).eval()
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(2))
    cfg = ours.config
    with torch.no_grad():
        full = ours(ids).logits
        cache = KVCache(cfg.n_layer, 2, cfg.n_head, 20, cfg.head_dim, torch.float32, ids.device)
        pieces = [ours(ids[:, :12], kv_cache=cache).logits]
        pieces.append(ours(ids[:, 12:15], kv_cache=cache).logits)  # multi-token step on a cache
        for t in range(15, 20):
            pieces.append(ours(ids[:, t : t + 1], kv_cache=cache).logits)
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= 1e-5


def test_stops_per_sequence_at_eos(model_ckpt):
    ours = GPT2LMHeadModel.from_pretrained(model_ckpt[0]).eval()
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    free = ours.generate(ids, max_new_tokens=10, eos_token_id=None)
    eos = int(free[0, 7])  # the third token row 0 emits becomes the EOS id
    out = ours.generate(ids, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    row0 = out[0, 5:].tolist()
    stop = row0.index(eos)
    assert all(token == 0 for token in row0[stop + 1 :])
    assert out[0, 5 : 5 + stop].tolist() == free[0, 5 : 5 + stop].tolist()
    if eos not in free[1, 5:].tolist():  # row 1 never emits it: it runs to max_new_tokens unchanged
        assert torch.equal(out[1], free[1, : out.shape[1]])


def test_sampling_is_seeded_and_respects_top_k(model_ckpt):
    ours = GPT2LMHeadModel.from_pretrained(model_ckpt[0]).eval()
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    a = ours.generate(ids, max_new_tokens=8, do_sample=True, top_k=1, generator=torch.Generator().manual_seed(0))
    greedy = ours.generate(ids, max_new_tokens=8, eos_token_id=None)
    assert torch.equal(a[:, : a.shape[1]], greedy[:, : a.shape[1]])  # top_k=1 sampling is greedy
    b = ours.generate(
        ids, max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9, generator=torch.Generator().manual_seed(7)
    )
    c = ours.generate(
        ids, max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9, generator=torch.Generator().manual_seed(7)
    )
    assert torch.equal(b, c)


def test_filter_logits_top_p_keeps_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, None, 0.8))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits, 3, None))
    assert kept.tolist() == [[True, True, True, False]]


def test_row_seeds_make_a_rows_sample_independent_of_its_batch(model_ckpt):
    """Sampling with per-row seeds: a prompt sampled alone equals the same prompt (same seed) sampled
    in a left-padded batch with another, so sharding prompts over processes cannot change a sonnet."""
    ours = GPT2LMHeadModel.from_pretrained(model_ckpt[0]).eval()
    gen = torch.Generator().manual_seed(3)
    short, long = torch.randint(0, VOCAB, (1, 4), generator=gen), torch.randint(0, VOCAB, (1, 9), generator=gen)
    kwargs = {"max_new_tokens": 20, "do_sample": True, "temperature": 1.5, "eos_token_id": None}
    alone = ours.generate(short, row_seeds=[11], **kwargs)[0, 4:]
    ids = torch.cat([torch.full((1, 5), PAD), short], dim=1)
    batch = torch.cat([ids, long])
    mask = torch.ones_like(batch)
    mask[0, :5] = 0
    together = ours.generate(batch, attention_mask=mask, row_seeds=[11, 12], **kwargs)
    assert torch.equal(together[0, 9:], alone)
    assert not torch.equal(ours.generate(short, row_seeds=[12], **kwargs)[0, 4:], alone)  # the seed matters


def test_kv_cache_is_allocated_in_the_compute_dtype(model_ckpt, monkeypatch):
    import model.generation as generation

    dtypes = []
    original = generation.KVCache
    monkeypatch.setattr(generation, "KVCache", lambda *a: dtypes.append(a[5]) or original(*a))
    ours = GPT2LMHeadModel.from_pretrained(model_ckpt[0]).eval()
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    ours.generate(ids, max_new_tokens=3, eos_token_id=None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours.generate(ids, max_new_tokens=3, eos_token_id=None)
    assert dtypes == [torch.float32, torch.bfloat16]


STATIC_CASES = {
    "base": {},
    "lora_kora": {"use_lora": True, "use_kora": True},
    "kan_ffn": {"use_kan": True},
    "peft_ia3": {"peft_method": "ia3"},
}


@pytest.mark.parametrize("case", list(STATIC_CASES))
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_static_cache_decoding_gives_the_default_paths_tokens(model_ckpt, case, autocast):
    """Fixed-shape decode steps (whole cache buffer under a mask, slot and positions on the device) give
    the default path's tokens: greedy and seeded sampling, a left-padded batch, an early EOS stop."""
    from tests.conftest import perturb_adapters

    model = GPT2LMHeadModel.from_pretrained(str(model_ckpt[0]), **STATIC_CASES[case]).eval()
    if model.adapter_params:
        perturb_adapters(model, scale=0.2)
    assert model.transformer.static_decode_blocker() is None
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, VOCAB, (3, 9), generator=gen)
    mask = torch.ones_like(prompts)
    mask[0, :4] = 0  # left padding
    mask[1, :2] = 0
    prompts = prompts.masked_fill(mask == 0, PAD)
    for kwargs in (
        {"do_sample": False},
        {"do_sample": True, "temperature": 1.2, "top_p": 0.9, "row_seeds": [5, 6, 7]},
        {"do_sample": False, "eos_token_id": 7},
    ):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            default, scores = model.generate(
                prompts, attention_mask=mask, max_new_tokens=24, output_scores=True, **kwargs
            )
            static, static_scores = model.generate(
                prompts, attention_mask=mask, max_new_tokens=24, static_cache=True, output_scores=True, **kwargs
            )
        if not autocast:
            assert torch.equal(static, default), kwargs
            assert (static_scores - scores).abs().max() <= 1e-4 * scores.abs().max()
            continue
        # bf16: attention over the whole masked buffer rounds differently from the prefix, so compare the
        # logits of every step both paths reached with the same tokens; a token may differ only where the
        # default path's choice was a near tie within that rounding
        for row in range(prompts.shape[0]):
            differs = (static[row, 9:] != default[row, 9:]).nonzero()
            upto = int(differs[0]) if len(differs) else static_scores.shape[1] - 1
            gap = (static_scores[row, : upto + 1] - scores[row, : upto + 1]).abs().max()
            assert gap <= 0.05 * scores[row].abs().max(), (kwargs, row, gap)
            if len(differs) and not kwargs["do_sample"]:
                top2 = scores[row, upto].topk(2).values
                assert top2[0] - top2[1] <= 2 * gap, (kwargs, row, "a greedy token changed without a near tie")
    unpadded = model.generate(prompts[2:], max_new_tokens=16, static_cache=True)
    assert torch.equal(unpadded, model.generate(prompts[2:], max_new_tokens=16))


def test_models_with_their_own_cache_state_decode_the_default_way(model_ckpt):
    graph = GPT2LMHeadModel.from_pretrained(str(model_ckpt[0]), use_graph=True).eval()
    assert "graph" in graph.transformer.static_decode_blocker()
    prompt = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    assert torch.equal(
        graph.generate(prompt, max_new_tokens=8, static_cache=True), graph.generate(prompt, max_new_tokens=8)
    )
