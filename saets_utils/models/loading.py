"""Load the language model and the text corpus named by a :class:`RunConfig`, and the start token.

Model paths: the embedded SmolLM2 (offline), any TransformerLens name (hub), a local
transformers folder. SAEs load in :mod:`saets_utils.models.sae_loading` (a trained SAE needs this
module's model and text first).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from saets_utils.config import ConfigError, ModelConfig, RunConfig, TextConfig
from saets_utils.models.grouped_attention import grouped_attention
from saets_utils.models.weight_layout import linear_layout

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``."""
    return _DTYPES[name]


def load_hooked_from_hf_folder(
    folder: str | Path, architecture_hint: str, device: str, dtype: torch.dtype
) -> HookedTransformer:
    """Load a local transformers folder into a HookedTransformer without touching the hub.

    ``HookedTransformer.from_pretrained`` fetches configs from the hub even with ``hf_model``;
    this builds the config from the folder and processes the state dict ourselves.
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import convert_hf_model_config, get_pretrained_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = str(folder)
    cfg_dict = convert_hf_model_config(folder)
    cfg_dict.update(dtype=dtype, device=device)
    cfg_dict.setdefault("original_architecture", architecture_hint)
    cfg = HookedTransformerConfig(
        **{k: v for k, v in cfg_dict.items() if k in HookedTransformerConfig.__dataclass_fields__}
    )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = HookedTransformer(cfg, tokenizer, move_to_device=False, default_padding_side="right")
    state_dict = get_pretrained_state_dict(folder, cfg, hf_model, dtype=torch.float32)
    del hf_model
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=True,
        center_writing_weights=True,
        center_unembed=True,
        fold_value_biases=True,
        refactor_factored_attn_matrices=False,
    )
    model.to(device)
    if dtype != torch.float32:
        model.to(dtype)
    model.eval()
    return model


def load_model(cfg: ModelConfig, device: str = "cpu") -> HookedTransformer:
    """The configured LM as an eval-mode HookedTransformer on ``device``, its weights laid out for
    TransformerLens's forward (:func:`~saets_utils.models.weight_layout.linear_layout`: same values,
    no weight copy per forward) and grouped-query attention that does not repeat the key/value
    cache (:func:`~saets_utils.models.grouped_attention.grouped_attention`)."""
    dtype = torch_dtype(cfg.dtype)
    if cfg.source == "smollm2":
        from saets_utils.models.assets import prepare_smollm2

        model = load_hooked_from_hf_folder(prepare_smollm2(), "LlamaForCausalLM", device, dtype)
    elif cfg.source == "tiny":
        from saets_utils.models.tiny import tiny_model

        model = tiny_model(seed=0, dtype=dtype).to(device)
    elif cfg.source == "tiny_gemma2":
        from saets_utils.models.tiny import tiny_gemma2_model

        model = tiny_gemma2_model(seed=0, dtype=dtype).to(device)
    elif cfg.source == "local":
        folder = Path(cfg.path or "")
        if not (folder / "config.json").is_file():
            raise ConfigError(f"model.path {cfg.path!r} is not a transformers folder (no config.json)")
        model = load_hooked_from_hf_folder(folder, cfg.name, device, dtype)
    else:
        from transformer_lens import HookedTransformer

        model = (
            HookedTransformer.from_pretrained(cfg.name, device=device, dtype=dtype)
            if cfg.process_weights or dtype == torch.float32
            else HookedTransformer.from_pretrained_no_processing(cfg.name, device=device, dtype=dtype)
        )
        model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    linear_layout(model)
    grouped_attention(model)
    return model


def bos_id(model: HookedTransformer, cfg: ModelConfig) -> int:
    """Token every sequence starts with (``model.bos_token_id`` param or the tokenizer's BOS)."""
    if cfg.bos_token_id is not None:
        return cfg.bos_token_id
    assert model.tokenizer is not None and model.tokenizer.bos_token_id is not None, "tokenizer has no BOS"
    return int(model.tokenizer.bos_token_id)


def validate_against_model(run: RunConfig, model: HookedTransformer) -> None:
    """Fail early if the SAE hook, layer or BOS token do not fit the model."""
    layer = run.sae.layer
    if not 0 <= layer < model.cfg.n_layers:
        raise ConfigError(
            f"sae.hook_name {run.sae.hook_name!r}: layer {layer} out of range; "
            f"{model.cfg.model_name} has layers 0..{model.cfg.n_layers - 1}"
        )
    if run.sae.hook_name not in model.hook_dict:
        raise ConfigError(
            f"sae.hook_name {run.sae.hook_name!r} is not a hook of {model.cfg.model_name}; "
            f"use e.g. blocks.{layer}.hook_resid_post"
        )
    if run.model.bos_token_id is not None and not 0 <= run.model.bos_token_id < model.cfg.d_vocab:
        raise ConfigError(f"model.bos_token_id {run.model.bos_token_id} outside vocab 0..{model.cfg.d_vocab - 1}")


def load_texts(cfg: TextConfig) -> list[str]:
    """Documents of the text corpus: Gutenberg books split into paragraphs, a HF dataset column, or
    a local text file split at blank lines."""
    if cfg.source == "local":
        from saets_utils.config import REPO_ROOT

        path = Path(cfg.path or "")
        path = path if path.is_absolute() else REPO_ROOT / path
        if not path.is_file():
            raise ConfigError(f"text.path {cfg.path!r} does not exist; point it at a .txt file")
        return [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    if cfg.source == "gutenberg":
        from saets_utils.models.assets import prepare_gutenberg

        docs: list[str] = []
        for book in sorted((prepare_gutenberg() / "books").glob("*.txt")):
            text = book.read_text(encoding="utf-8", errors="replace")
            paras = [" ".join(p.split()) for p in text.split("\n\n")]
            docs.extend(p for p in paras if len(p) > 200)
        return docs
    from datasets import load_dataset

    ds = load_dataset(cfg.hf_dataset, split=cfg.hf_split)
    if cfg.hf_column not in ds.column_names:
        raise ConfigError(f"text.hf_column {cfg.hf_column!r} not in {cfg.hf_dataset} columns {ds.column_names}")
    return [t for t in ds[cfg.hf_column] if t]


def tokenize_chunks(
    model: HookedTransformer,
    texts: list[str],
    chunk_tokens: int,
    n_chunks: int | None,
    *,
    bos: int,
    seed: int = 0,
    align_docs: bool = False,
) -> torch.Tensor:
    """Token chunks ``[n_chunks, chunk_tokens]``, each ``bos`` then ``chunk_tokens - 1`` text tokens.

    Documents are concatenated (separated by ``bos``) and cut into chunks; a seeded shuffle of
    documents first so a small ``n_chunks`` still spans the corpus. ``align_docs``: every chunk
    starts at a document start (a document's tail past the chunk end is dropped), because a chunk
    that starts mid-sentence (e.g. ``bos ,``) makes position 1 a second attention sink on SmolLM2.
    """
    assert model.tokenizer is not None
    order = np.random.default_rng(seed).permutation(len(texts))
    body = chunk_tokens - 1
    chunks: list[list[int]] = []
    buf: list[int] = []
    for i in order:
        buf.extend(model.tokenizer.encode(texts[i], add_special_tokens=False))
        buf.append(bos)
        if align_docs and len(buf) >= body:
            chunks.append([bos] + buf[:body])
            buf = []
        while len(buf) >= body:
            chunks.append([bos] + buf[:body])
            buf = buf[body:]
        if n_chunks is not None and len(chunks) >= n_chunks:
            break
    if n_chunks is not None and len(chunks) < n_chunks:
        raise ConfigError(f"text corpus gives only {len(chunks)} chunks of {chunk_tokens} tokens; need {n_chunks}")
    out = torch.tensor(chunks[: n_chunks or len(chunks)], dtype=torch.long)
    return out


def concatenated_chunks(
    tokenizer, texts: list[str], chunk_tokens: int, bos: int, *, docs_per_batch: int = 1000, pieces: int = 20
) -> torch.Tensor:
    """All rows ``[n, chunk_tokens]`` of TransformerLens's ``tokenize_and_concatenate`` as the
    reference code ran it (TransformerLens 2.x), before any shuffle.

    Per batch of ``docs_per_batch`` documents (``datasets.map`` batching): the documents joined
    with the EOS string, the string cut into ``pieces`` equal character slices, each tokenised with
    the tokenizer's default special tokens (Gemma's adds a BOS to each slice), pad ids dropped, the
    stream cut into rows of ``chunk_tokens - 1`` (the remainder of each batch dropped), ``bos``
    prepended to every row. Most rows start mid-document.
    """
    assert tokenizer.eos_token is not None, "the tokenizer needs an EOS token"
    body = chunk_tokens - 1
    pad = tokenizer.pad_token_id
    rows: list[np.ndarray] = []
    for start in range(0, len(texts), docs_per_batch):
        full = tokenizer.eos_token.join(texts[start : start + docs_per_batch])
        size = (len(full) - 1) // pieces + 1
        ids = [tid for i in range(pieces) for tid in tokenizer(full[i * size : (i + 1) * size])["input_ids"]]
        stream = np.asarray([t for t in ids if t != pad], dtype=np.int64)
        n = len(stream) // body
        if n:
            rows.append(np.concatenate([np.full((n, 1), bos), stream[: n * body].reshape(n, body)], axis=1))
    if not rows:
        return torch.zeros(0, chunk_tokens, dtype=torch.long)
    return torch.from_numpy(np.concatenate(rows))


def shuffled_rows(n: int, seed: int = 42) -> np.ndarray:
    """Row order of ``datasets.Dataset.shuffle(seed)`` for ``n`` rows (numpy's default_rng permutation)."""
    return np.random.default_rng(seed).permutation(n)


# The reference code shuffles the concatenated rows with this seed (``tokenized_data.shuffle(42)``).
REFERENCE_SHUFFLE_SEED = 42


def cut_loss_tokens(run: RunConfig, model: HookedTransformer, bos: int) -> torch.Tensor:
    """The loss chunks of scale calibration, ``[effects.loss_chunks, effects.loss_chunk_tokens]``,
    cut as ``effects.loss_chunking`` says (document starts, or the reference's concatenation)."""
    e = run.effects
    texts = load_texts(run.text)
    if e.loss_chunking == "documents":
        return tokenize_chunks(
            model, texts, e.loss_chunk_tokens, e.loss_chunks, bos=bos, seed=run.seed + 1, align_docs=True
        )
    rows = concatenated_chunks(model.tokenizer, texts, e.loss_chunk_tokens, bos)
    if rows.shape[0] < e.loss_chunks:
        raise ConfigError(
            f"text corpus gives only {rows.shape[0]} concatenated rows of {e.loss_chunk_tokens} tokens; "
            f"need effects.loss_chunks = {e.loss_chunks}"
        )
    order = shuffled_rows(rows.shape[0], REFERENCE_SHUFFLE_SEED)[: e.loss_chunks]
    return rows[torch.from_numpy(order)]
