"""Fidelity to the reference code: its loss chunking, judge template, combined vectors, EOS cut,
weight processing on Gemma-2, and the pairwise battle judge with Bradley-Terry ratings."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from saets_utils.config import JudgeConfig
from saets_utils.judges.base import JudgeRequest, score_requests
from saets_utils.judges.battle import (
    OfflineBattleJudge,
    OpenAIBattleJudge,
    bradley_terry,
    judge_battles,
    plan_battles,
)
from saets_utils.judges.cache import JudgeCache
from saets_utils.judges.offline import OfflineJudge
from saets_utils.judges.openai_judge import OpenAIJudge, build_messages
from saets_utils.models import loading

DOCS = [f"Document {i} says {'abc ' * (i % 5 + 1)}and then ends." for i in range(60)]


def _tokenizer_with_pad(tmp_path):
    """The tiny character tokenizer, but with a pad token distinct from EOS (as Gemma's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from saets_utils.models.tiny import TINY_VOCAB

    vocab = {"<eot>": 0, "<bos>": 1, "<pad>": 2, **{ch: i + 3 for i, ch in enumerate(TINY_VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<eot>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eot>", pad_token="<pad>")
    fast.save_pretrained(tmp_path)
    return AutoTokenizer.from_pretrained(tmp_path)


def test_concatenated_chunks_match_transformer_lens(tmp_path):
    """Same rows, in the same shuffled order, as TransformerLens tokenize_and_concatenate + shuffle(42)
    (for a character tokenizer the reference's 2.x slicing and today's per-document join agree)."""
    from datasets import Dataset
    from transformer_lens.utils import tokenize_and_concatenate

    tok = _tokenizer_with_pad(tmp_path)
    ours = loading.concatenated_chunks(tok, DOCS, 32, bos=tok.bos_token_id, docs_per_batch=25)
    ours = ours[torch.from_numpy(loading.shuffled_rows(len(ours), 42))]
    ds = Dataset.from_dict({"text": DOCS})
    tl = tokenize_and_concatenate(ds, tok, max_length=32, num_proc=None)
    tl = torch.stack([r["tokens"] for r in tl.shuffle(seed=42)])
    # datasets.map batches 1000 documents; with 60 documents one batch: compare on one batch
    ours_one = loading.concatenated_chunks(tok, DOCS, 32, bos=tok.bos_token_id)
    ours_one = ours_one[torch.from_numpy(loading.shuffled_rows(len(ours_one), 42))]
    assert torch.equal(ours_one, tl)
    assert (ours[:, 0] == tok.bos_token_id).all() and ours.shape[1] == 32
    starts = {d[:31] for d in DOCS}
    n_aligned = sum(tok.decode(r[1:]) in starts for r in ours_one)
    assert n_aligned < len(ours_one) / 2  # most rows start mid-document, unlike loss_chunking: documents


def test_cut_loss_tokens_switch(tmp_path, tiny_model):
    from helpers import build_run_cfg

    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(DOCS))
    base = {"text": {"source": "local", "path": str(text)}, "effects": {"loss_chunks": 6, "loss_chunk_tokens": 16}}
    docs = loading.cut_loss_tokens(build_run_cfg(tmp_path, base), tiny_model, 1)
    conc = loading.cut_loss_tokens(
        build_run_cfg(tmp_path, base, effects={"loss_chunking": "concatenate"}), tiny_model, 1
    )
    assert docs.shape == conc.shape == (6, 16) and (conc[:, 0] == 1).all()
    assert not torch.equal(docs, conc)
    assert all(tiny_model.tokenizer.decode(r[1:]).startswith("Document") for r in docs)


def test_combined_vectors_follow_the_reference(tmp_path):
    from helpers import build_run_cfg
    from saets_utils.effects.vector_sources import build_vectors

    d = 32
    w = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0)))[0][:4]  # 4 orthonormal rows
    sae = type("S", (), {"W_dec": w})()
    run = build_run_cfg(tmp_path, effects={"vectors": {"source": "combined", "count": 64}})
    _, vecs = build_vectors(run, sae, d)
    coef = vecs @ w.T  # coordinates in the rows' basis
    nonzero = (coef.abs() > 1e-5).sum(-1)
    assert (coef > -1e-5).all() and (nonzero <= 2).all()
    assert (nonzero == 1).any()  # a row drawn twice (repeats allowed)
    two = coef[nonzero == 2]
    ratios = (two.max(-1).values / two.clamp(min=1e-9).topk(2).values[:, 1]).numpy()
    assert np.ptp(ratios) > 0.5  # independent U(0, 1) weights, not equal ones
    assert torch.allclose(vecs.norm(dim=-1), torch.ones(64), atol=1e-5)


def test_cut_at_eos():
    from saets_utils.evaluation.evaluate import cut_at_eos

    assert cut_at_eos(torch.tensor([5, 6, 0, 7, 0]), 0).tolist() == [5, 6]
    assert cut_at_eos(torch.tensor([5, 6]), 0).tolist() == [5, 6]
    assert cut_at_eos(torch.tensor([5, 0]), None).tolist() == [5, 0]


def test_reference_template_is_minimal_and_keyed_apart():
    req = JudgeRequest("anger", "SAE", 20.0, "behaviour", "The text uses angry words.", "I think", "I think so.")
    sys_msg, user = build_messages(req, "reference")
    assert "The text uses angry words." in sys_msg["content"] and '"score"' in sys_msg["content"]
    assert user["content"] == 'Prompt:\n\nI think\n\nCompletion:\n"""\nI think so.\n"""\n'
    assert "grammar" not in sys_msg["content"] + user["content"]
    ref = OpenAIJudge(JudgeConfig(kind="openai", template="reference"), JudgeCache(None), api_key="k" * 10)
    proj = OpenAIJudge(JudgeConfig(kind="openai"), JudgeCache(None), api_key="k" * 10)
    assert ref.cache_key(req) != proj.cache_key(req)


def test_gemma2_weight_processing_only_moves_logits_through_the_softcap():
    """What the reference's weight processing (from_pretrained) does to a Gemma-2 model, and why the
    Gemma params may skip it: activations at the hook are unchanged (RMSNorm: norm weights are
    folded exactly, writing weights are not centred), and so are the logits without
    ``center_unembed``. Centring the unembedding shifts each position's logits by a constant, which
    the logit soft-cap does not ignore: the log-probs move a little."""
    from transformer_lens import HookedTransformer

    from saets_utils.models.tiny import tiny_gemma2_model

    raw = tiny_gemma2_model(n_layers=4)
    with torch.no_grad():  # non-trivial norm weights (so folding them is tested); no unembedding bias, as Gemma
        for name, p in raw.named_parameters():
            if name.endswith(".w"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
        raw.b_U.zero_()
    tokens = torch.tensor([[1, *range(5, 30)]])
    hook = "blocks.2.hook_resid_post"
    logits, cache = raw.run_with_cache(tokens, names_filter=hook)
    gap = {}
    for center_unembed in (False, True):
        m = HookedTransformer(raw.cfg, tokenizer=raw.tokenizer)
        m.load_and_process_state_dict(
            raw.state_dict(), fold_ln=True, center_writing_weights=True, center_unembed=center_unembed
        )
        out, c = m.run_with_cache(tokens, names_filter=hook)
        assert torch.allclose(cache[hook], c[hook], atol=1e-4)
        gap[center_unembed] = (out.log_softmax(-1) - logits.log_softmax(-1)).abs().max().item()
    assert gap[False] < 1e-4 < gap[True]


# ---- battles and ratings


def _simulated(strength: dict[str, float], n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    names = list(strength)
    rows = []
    for _ in range(n):
        a, b = rng.choice(names, 2, replace=False)
        p = 1 / (1 + np.exp(-(strength[a] - strength[b])))
        rows.append({"method_a": a, "method_b": b, "winner": "A" if rng.random() < p else "B"})
    return pd.DataFrame(rows)


def test_bradley_terry_recovers_strengths():
    truth = {"SAE-TS": 1.0, "CAA": 0.0, "SAE": -1.0}
    r = bradley_terry(_simulated(truth, 3000), n_boot=20).set_index("method")
    elo = 400 / np.log(10)
    for m, s in truth.items():
        assert r.loc[m, "rating"] == pytest.approx(1000 + elo * s, abs=40)
        assert r.loc[m, "ci_low"] <= r.loc[m, "rating"] <= r.loc[m, "ci_high"]
    assert r.index.tolist() == ["SAE-TS", "CAA", "SAE"]
    assert r["rating"].mean() == pytest.approx(1000)


def test_bradley_terry_ties_and_errors():
    df = pd.DataFrame(
        {"method_a": ["CAA", "CAA", "SAE"], "method_b": ["SAE", "SAE", "CAA"], "winner": ["tie", None, "tie"]}
    )
    r = bradley_terry(df, n_boot=0).set_index("method")
    assert r["rating"].tolist() == pytest.approx([1000, 1000])  # ties only: equal ratings
    assert r["battles"].tolist() == [2, 2]  # the failed battle is left out
    undefeated = bradley_terry(pd.DataFrame({"method_a": ["A"] * 5, "method_b": ["B"] * 5, "winner": ["A"] * 5}))
    assert np.isfinite(undefeated["rating"]).all() and undefeated["method"].iloc[0] == "A"


def _eval_tables():
    rows = []
    for m in ("CAA", "SAE", "prompt"):
        for s in (0.0, 20.0, 40.0) if m != "prompt" else (0.0,):
            for i in range(3):
                rows.append(
                    {
                        "task": "anger",
                        "method": m,
                        "scale": s,
                        "sample": i,
                        "text": f"I think {m} {s} {i}",
                        "prompt": "I think",
                    }
                )
    samples = pd.DataFrame(rows)
    summary = pd.DataFrame({"task": "anger", "method": ["CAA", "SAE", "prompt"], "best_scale": [20.0, 40.0, 0.0]})
    return samples, summary


def test_plan_battles_uses_best_scales_and_both_sides():
    samples, summary = _eval_tables()
    plan = plan_battles(samples, summary, per_pair=20, seed=0)
    assert len(plan) == 3 * 20
    assert plan["text_a"].str.contains("CAA 20.0|SAE 40.0|prompt 0.0").all()
    assert plan["text_b"].str.contains("CAA 20.0|SAE 40.0|prompt 0.0").all()
    assert (plan["method_a"] == "CAA").any() and (plan["method_b"] == "CAA").any()
    assert plan.equals(plan_battles(samples, summary, per_pair=20, seed=0))


def test_openai_battle_judge_cached_and_errors_counted():
    from fake_openai_server import FakeOpenAIServer

    samples, summary = _eval_tables()
    plan = plan_battles(samples, summary, per_pair=3, seed=0)
    plan.loc[0, "text_a"] += " [[rangex99]]"  # this battle never gets a valid verdict
    criteria = {"anger": {"behaviour": "The text is angry."}}
    with FakeOpenAIServer() as server:
        cfg = JudgeConfig(kind="openai", base_url=server.base_url, max_retries=0)
        cache = JudgeCache(None)
        judge = OpenAIBattleJudge(cfg, cache)
        v = judge_battles(judge, plan, criteria, "I think", progress=False)
        assert pd.isna(v.loc[0, "winner"]) and "malformed" in v.loc[0, "error"]
        assert v["winner"].iloc[1:].isin(["A", "B", "tie"]).all()
        assert judge.stats.errors["malformed"] == 1
        sent = server.requests[-1]["body"]["messages"]
        assert "The text is angry." in sent[0]["content"] and 'Text A:\n"""' in sent[1]["content"]
        n = server.n_requests
        again = OpenAIBattleJudge(cfg, cache)
        v2 = judge_battles(again, plan, criteria, "I think", progress=False)
        assert server.n_requests == n + 1  # only the failed battle is asked again
        assert v2["winner"].iloc[1:].tolist() == v["winner"].iloc[1:].tolist()
    assert len(bradley_terry(v, n_boot=10)) == 3


def test_offline_battle_judge_prefers_the_higher_score():
    def embed(texts):
        return np.array([[1.0, 0.0] if "angry" in t else [0.0, 1.0] for t in texts])

    scorer = OfflineJudge(
        JudgeCache(None),
        examples={"anger": {"positive": ["so angry"], "negative": ["calm"]}},
        mean_logprob_fn=lambda ts: [-3.0] * len(ts),
        embed_fn=embed,
    )
    judge = OfflineBattleJudge(scorer)
    plan = pd.DataFrame(
        {
            "task": "anger",
            "method_a": ["CAA", "SAE"],
            "method_b": ["SAE", "CAA"],
            "prompt": "I think",
            "text_a": ["I think I am angry", "I think it is calm"],
            "text_b": ["I think it is calm", "I think calm"],
        }
    )
    v = judge_battles(judge, plan, {"anger": {"behaviour": "angry", "coherence": "fluent"}}, "I think", progress=False)
    assert v["winner"].tolist() == ["A", "tie"]
    assert score_requests(judge, [], progress=False) == []


def test_adam_reference_init_keeps_unmoved_features_random():
    """init='reference' starts as the reference's LinearAdapter (Kaiming-uniform W, zero b), so a
    feature no training vector moved keeps a random column (its SAE-TS vector is defined);
    init='mean' leaves it at zero."""
    from saets_utils.approximator.fits import fit_adam

    X = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))
    Y = torch.zeros(20, 5)
    Y[:, 0] = X[:, 0]
    ref, _ = fit_adam(X, Y, epochs=2, init="reference")
    mean, _ = fit_adam(X, Y, epochs=2, init="mean")
    bound = (6 / 5) ** 0.5  # kaiming_uniform_ on [d_model, d_sae]: fan_in = d_sae
    assert 0 < ref.W[:, 3].abs().max() <= bound and mean.W[:, 3].abs().max() == 0
    with pytest.raises(ValueError, match="init"):
        fit_adam(X, Y, epochs=1, init="zeros")
