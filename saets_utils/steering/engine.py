"""Our own steered decode step over TransformerLens's weights (``effects.engine: static``).

The same arithmetic as TransformerLens's forward on a KV cache, organised for decoding:

- a static KV cache ``[rows, kv_head, total_tokens, d_head]`` per layer, allocated once; each step
  writes its position's keys (rotated once, when written) and values in place, where
  TransformerLens concatenates the cache and rotates every cached key again at every step;
- each norm once per sublayer (TransformerLens normalises the attention input once each for q, k, v);
- grouped-query attention as one batched product of each key/value head with its group of query
  heads, with no repeated or copied cache;
- TransformerLens's parameters read in place: in the layout ``load_model`` gives them
  (:mod:`~saets_utils.models.weight_layout`) every projection is a view of its parameter; a model
  laid out otherwise is copied into that layout once, when the decoder is built;
- the steering add and the activation capture at the hook write into fixed buffers, and the next
  token comes from :func:`~saets_utils.steering.sampling.sample_from_logits` with the row's own
  uniform for that position, as in :func:`~saets_utils.steering.generation.generate_aligned`;
- every step reads its inputs from buffers and syncs nothing with the host, so on CUDA its layer
  functions are compiled and the step is replayed from CUDA graphs (:mod:`.step_graphs`);
- on the CPU (eager steps), rows that compute the same thing inside their prompts are computed once
  (:func:`shared_steps`): every row of a vector starts with the same start token, and a prompt's
  samples read the same prompt under the same steering; only rows that sample are unembedded.

Supported (:func:`unsupported` names anything else): rotary positions, LayerNorm or RMSNorm (folded
or not), norms before and after each sublayer (Gemma-2), plain or gated MLPs, attention and output
soft-capping, local (sliding window) and global attention, grouped-query attention. Gemma's
embedding scale (``sqrt(d_model)``) is folded into TransformerLens's ``W_E`` by its weight
conversion, so the embedding is a lookup here as there. Tested equal to TransformerLens in
``tests/steering/test_engine.py``.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from saets_utils.config import SamplingConfig
from saets_utils.steering.sampling import sample_from_logits
from saets_utils.steering.step_graphs import StepRunner, attended_positions

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

ENGINES = ("tl", "static")
HOOK_POINTS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")


class EngineUnsupported(ValueError):
    """The model or hook uses something the static engine does not implement (the message says what)."""


# --- the arithmetic of one layer, as module-level functions (compiled once for every layer) ----------


class Consts(NamedTuple):
    """The architecture's constants; equal for every layer, so a compiled layer function is shared."""

    norm: str  # ln1 / ln2: "LN", "LNPre", "RMS", "RMSPre" or "none"
    post_norm: str  # ln1_post / ln2_post (Gemma-2) or "none"
    final_norm: str
    eps: float
    dtype: torch.dtype
    n_kv: int
    group: int  # query heads per key/value head
    d_head: int
    rotary_dim: int
    adjacent_pairs: bool
    attn_scale: float
    attn_cap: float  # 0: no soft-capping
    logit_cap: float
    gated: bool
    act: Callable[[Tensor], Tensor]


def _norm(x: Tensor, kind: str, w: Tensor | None, b: Tensor | None, eps: float, dtype: torch.dtype) -> Tensor:
    """TransformerLens's LayerNorm / RMSNorm (and their folded ``Pre`` forms), op for op."""
    if kind == "none":
        return x
    if dtype not in (torch.float32, torch.float64):
        x = x.to(torch.float32)
    if kind in ("LN", "LNPre"):
        x = x - x.mean(-1, keepdim=True)
    scale = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    x = (x / scale).to(dtype)
    if kind in ("LN", "RMS"):
        assert w is not None
        x = x * w
    if kind == "LN":
        assert b is not None
        x = x + b
    return x


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, rotary_dim: int, adjacent_pairs: bool) -> Tensor:
    """Rotary embedding of ``x [..., d_head]`` at one position (``cos``, ``sin``: ``[1, rotary_dim]``),
    as TransformerLens's ``apply_rotary`` (GPT-NeoX halves, or GPT-J adjacent pairs)."""
    x_rot = x[..., :rotary_dim]
    if adjacent_pairs:
        flip = torch.stack((-x_rot[..., 1::2], x_rot[..., ::2]), dim=-1).flatten(-2)
    else:
        n = rotary_dim // 2
        flip = torch.cat((-x_rot[..., n:], x_rot[..., :n]), dim=-1)
    out = x_rot * cos + flip * sin
    return out if rotary_dim == x.shape[-1] else torch.cat((out, x[..., rotary_dim:]), dim=-1)


def _softcap(x: Tensor, cap: float) -> Tensor:
    """``cap * tanh(x / cap)`` (Gemma-2), or ``x`` when ``cap`` is 0."""
    return cap * torch.tanh(x / cap) if cap > 0 else x


def _group_queries(q: Tensor, c: Consts) -> Tensor:
    """``q [rows, head * d_head]`` -> ``[rows, kv_head, group, d_head]``: query head ``h`` reads key/value
    head ``h // group``, as after TransformerLens's ``repeat_interleave``. A view, no copy."""
    return q.view(q.shape[0], c.n_kv, c.group, c.d_head)


def _window_mask(positions: Tensor, pos: Tensor, window: int | None) -> Tensor:
    """Which cached ``positions`` the query at ``pos`` sees: all up to it, within ``window`` if local."""
    seen = positions <= pos
    return seen if window is None else seen & (positions > pos - window)


def _qkv(
    x: Tensor,
    ln_w: Tensor | None,
    ln_b: Tensor | None,
    W_Q: Tensor,
    b_Q: Tensor | None,
    W_K: Tensor,
    b_K: Tensor | None,
    W_V: Tensor,
    b_V: Tensor | None,
    cos: Tensor,
    sin: Tensor,
    c: Consts,
) -> tuple[Tensor, Tensor, Tensor]:
    """Queries ``[rows, kv_head, group, d_head]``, keys and values ``[rows, kv_head, d_head]`` of ``x
    [rows, d_model]`` at one position; queries and keys rotated. The norm runs once."""
    h = _norm(x, c.norm, ln_w, ln_b, c.eps, c.dtype)
    q = _group_queries(F.linear(h, W_Q, b_Q), c)
    k = F.linear(h, W_K, b_K).view(x.shape[0], c.n_kv, c.d_head)
    v = F.linear(h, W_V, b_V).view(x.shape[0], c.n_kv, c.d_head)
    return _rotate(q, cos, sin, c.rotary_dim, c.adjacent_pairs), _rotate(k, cos, sin, c.rotary_dim, c.adjacent_pairs), v


def _attend(
    x: Tensor,
    q: Tensor,
    K: Tensor,
    V: Tensor,
    seen: Tensor,
    W_O: Tensor,
    b_O: Tensor | None,
    post_w: Tensor | None,
    c: Consts,
) -> Tensor:
    """``x`` plus the attention output of queries ``q`` over the cached ``K``, ``V`` ``[rows, kv_head,
    n, d_head]`` where ``seen [n]``; scaled, soft-capped and masked in TransformerLens's order."""
    scores = torch.matmul(q, K.transpose(-1, -2)) / c.attn_scale  # [rows, kv_head, group, n]
    scores = torch.where(seen, _softcap(scores, c.attn_cap), float("-inf"))
    z = torch.matmul(scores.softmax(-1).to(V.dtype), V).reshape(x.shape[0], -1)
    out = _norm(F.linear(z, W_O, b_O), c.post_norm, post_w, None, c.eps, c.dtype)
    return x + out


def _mlp(
    x: Tensor,
    ln_w: Tensor | None,
    ln_b: Tensor | None,
    W_gate: Tensor | None,
    W_in: Tensor,
    b_in: Tensor | None,
    W_out: Tensor,
    b_out: Tensor | None,
    post_w: Tensor | None,
    c: Consts,
) -> Tensor:
    """``x`` plus the MLP output: gated as TransformerLens's ``GatedMLP`` (``b_in`` after the product;
    skipped when zero), else its ``MLP``'s two ``addmm``. The gate's activation and product are
    written in place (the same values, two ``[rows, d_mlp]`` buffers fewer)."""
    h = _norm(x, c.norm, ln_w, ln_b, c.eps, c.dtype)
    if c.gated:
        assert W_gate is not None
        gate = F.linear(h, W_gate)
        post = (F.silu(gate, inplace=True) if c.act is F.silu else c.act(gate)).mul_(F.linear(h, W_in))
        out = F.linear(post if b_in is None else post + b_in, W_out, b_out)
    else:
        assert b_in is not None and b_out is not None  # the plain MLP keeps its biases (addmm)
        out = torch.addmm(b_out, c.act(torch.addmm(b_in, h, W_in)), W_out)
    return x + _norm(out, c.post_norm, post_w, None, c.eps, c.dtype)


def _logits(x: Tensor, ln_w: Tensor | None, ln_b: Tensor | None, W_U: Tensor, b_U: Tensor | None, c: Consts) -> Tensor:
    """Final norm, unembedding and output soft-cap: ``[rows, d_vocab]``."""
    return _softcap(F.linear(_norm(x, c.final_norm, ln_w, ln_b, c.eps, c.dtype), W_U, b_U), c.logit_cap)


def _compiled(backend: str) -> tuple[Callable[..., Any], ...]:
    """The layer functions compiled with ``backend``. ``fullgraph``: a graph break fails instead of
    leaving parts eager. Every layer and decoder shares one compiled graph per function; a model,
    dtype or batch shape of its own recompiles it, so the recompile limit is raised above Dynamo's 8
    (past the limit Dynamo would run the function eagerly, correct but slow)."""
    config: Any = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 64)
    return tuple(torch.compile(f, backend=backend, fullgraph=True) for f in (_qkv, _attend, _mlp, _logits))


# --- reading TransformerLens's model -------------------------------------------------------------------


def unsupported(model: HookedTransformer) -> str | None:
    """Why the static engine cannot run ``model`` (None when it can)."""
    from transformer_lens.components import (
        MLP,
        Attention,
        GatedMLP,
        GroupedQueryAttention,
        LayerNorm,
        LayerNormPre,
        RMSNorm,
        RMSNormPre,
    )

    cfg = model.cfg
    flags = {
        "non-rotary positions": cfg.positional_embedding_type != "rotary",
        "split q/k/v inputs": cfg.use_split_qkv_input or cfg.use_attn_in,
        "4-bit weights": cfg.load_in_4bit,
        "q/k norms": cfg.use_qk_norm,
        "q/k/v clipping": getattr(cfg, "clip_qkv", None) is not None,
        "log-n attention scaling": getattr(cfg, "use_logn_attn", False),
        "dynamic NTK rotary": getattr(cfg, "use_dynamic_ntk_rope", False),
        "attention sinks": getattr(cfg, "use_attention_sinks", False),
        "parallel attention and MLP": cfg.parallel_attn_mlp,
        "attention-only blocks": cfg.attn_only,
        "a norm after the embedding": cfg.post_embedding_ln,
        "non-causal attention": cfg.attention_dir != "causal",
        "several devices": cfg.n_devices > 1,
        "a normalised activation (SoLU)": cfg.is_layer_norm_activation(),
    }
    norms = (LayerNorm, LayerNormPre, RMSNorm, RMSNormPre, torch.nn.Identity)
    blocks = list(model.blocks)
    flags["another attention module"] = any(type(b.attn) not in (Attention, GroupedQueryAttention) for b in blocks)
    flags["another MLP (e.g. mixture of experts)"] = any(type(b.mlp) not in (MLP, GatedMLP) for b in blocks)
    flags["another norm"] = any(
        type(m) not in norms
        for b in blocks
        for n in ("ln1", "ln2", "ln1_post", "ln2_post")
        if (m := getattr(b, n, None)) is not None
    )
    flags["hooks attached to the model"] = any(hp._forward_hooks for hp in model.hook_dict.values())
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    flags["post-norm blocks"] = cfg.original_architecture in POST_NORM_ARCHITECTURES
    found = [name for name, on in flags.items() if on]
    return ", ".join(found) if found else None


def _linear_weight(w: Tensor, perm: tuple[int, ...], shape: tuple[int, int]) -> Tensor:
    """``w.permute(perm)`` as the contiguous ``shape`` matrix ``F.linear`` reads: a view of ``w``'s
    storage when it is laid out so (``load_model``), else one copy, made now."""
    p = w.permute(*perm)
    return (p if p.is_contiguous() else p.contiguous()).reshape(shape)


def nonzero_bias(b: Tensor) -> Tensor | None:
    """``b``, or None where it is all zeros: TransformerLens gives bias-free models zero biases, and
    ``F.linear`` with one copies it into the output before the product (the same values without)."""
    return b if bool(b.any()) else None


def _norm_of(module: torch.nn.Module | None) -> tuple[str, Tensor | None, Tensor | None]:
    if module is None or isinstance(module, torch.nn.Identity):
        return "none", None, None
    kind = {"LayerNorm": "LN", "LayerNormPre": "LNPre", "RMSNorm": "RMS", "RMSNormPre": "RMSPre"}[type(module).__name__]
    return kind, getattr(module, "w", None), getattr(module, "b", None)


@dataclass(frozen=True)
class Layer:
    """One block's tensors, in the layouts the layer functions read (views of the model's parameters)."""

    norms: tuple[str, str, str, str]  # kinds of ln1, ln1_post, ln2, ln2_post
    ln1: tuple[Tensor | None, Tensor | None]
    qkv: tuple[Tensor, Tensor | None, Tensor, Tensor | None, Tensor, Tensor | None]  # W_Q, b_Q, W_K, b_K, W_V, b_V
    out: tuple[Tensor, Tensor | None, Tensor | None]  # W_O, b_O (None: zero), ln1_post w
    ln2: tuple[Tensor | None, Tensor | None]
    mlp: tuple[
        Tensor | None, Tensor, Tensor | None, Tensor, Tensor | None, Tensor | None
    ]  # gate, in, b_in, out, b_out, post
    rotary: int  # index into the decoder's rotary tables
    window: int | None
    attn_scale: float


def _rotary_table(attn: Any, total_tokens: int) -> tuple[Tensor, Tensor]:
    """The ``(cos, sin)`` tables TransformerLens's ``attn`` rotates with (in place), extended with its
    own function when shorter than ``total_tokens`` (as its forward would extend them)."""
    cos, sin = attn.rotary_cos, attn.rotary_sin
    if cos.shape[0] >= total_tokens:
        return cos, sin
    cfg = attn.cfg
    sin2, cos2 = attn.calculate_sin_cos_rotary(cfg.rotary_dim, total_tokens, base=attn._rotary_base(), dtype=cfg.dtype)
    return cos2.to(cos.device), sin2.to(sin.device)


def _layer(block: Any, rotary: int) -> Layer:
    """``block``'s tensors as :class:`Layer` (views of its parameters where laid out for ``F.linear``)."""
    from transformer_lens.components import GatedMLP, GroupedQueryAttention

    attn, mlp, cfg = block.attn, block.mlp, block.cfg
    d, h, dh = cfg.d_model, cfg.n_heads, cfg.d_head
    if type(attn) is GroupedQueryAttention and not cfg.ungroup_grouped_query_attention:
        W_K, b_K, W_V, b_V = attn._W_K, attn._b_K, attn._W_V, attn._b_V
    else:
        W_K, b_K, W_V, b_V = attn.W_K, attn.b_K, attn.W_V, attn.b_V
    n_kv = W_K.shape[0]
    ln1, ln2 = _norm_of(block.ln1), _norm_of(block.ln2)
    post1, post2 = _norm_of(getattr(block, "ln1_post", None)), _norm_of(getattr(block, "ln2_post", None))
    d_mlp = mlp.W_in.shape[1]
    mlp_w: tuple[Tensor | None, Tensor, Tensor | None, Tensor, Tensor | None, Tensor | None]
    if type(mlp) is GatedMLP:
        mlp_w = (
            _linear_weight(mlp.W_gate, (1, 0), (d_mlp, d)),
            _linear_weight(mlp.W_in, (1, 0), (d_mlp, d)),
            nonzero_bias(mlp.b_in),  # TransformerLens adds a zero bias of width d_mlp
            _linear_weight(mlp.W_out, (1, 0), (d, d_mlp)),
            nonzero_bias(mlp.b_out),
            post2[1],
        )
    else:  # TransformerLens's MLP: addmm(b_in, x, W_in), weights as stored
        mlp_w = (None, mlp.W_in, mlp.b_in, mlp.W_out, mlp.b_out, post2[1])
    return Layer(
        norms=(ln1[0], post1[0], ln2[0], post2[0]),
        ln1=(ln1[1], ln1[2]),
        qkv=(
            _linear_weight(attn.W_Q, (0, 2, 1), (h * dh, d)),
            nonzero_bias(attn.b_Q.reshape(h * dh)),
            _linear_weight(W_K, (0, 2, 1), (n_kv * dh, d)),
            nonzero_bias(b_K.reshape(n_kv * dh)),
            _linear_weight(W_V, (0, 2, 1), (n_kv * dh, d)),
            nonzero_bias(b_V.reshape(n_kv * dh)),
        ),
        out=(_linear_weight(attn.W_O, (2, 0, 1), (d, h * dh)), nonzero_bias(attn.b_O), post1[1]),
        ln2=(ln2[1], ln2[2]),
        mlp=mlp_w,
        rotary=rotary,
        window=cfg.window_size if attn.attn_type == "local" else None,
        attn_scale=float(attn.attn_scale),
    )


def _read_model(model: HookedTransformer, total_tokens: int) -> tuple[Consts, list[Layer], list[tuple[Tensor, Tensor]]]:
    """The architecture's constants, every layer's tensors and the distinct rotary tables."""
    from transformer_lens.components import GatedMLP

    cfg = model.cfg
    blocks: list[Any] = list(model.blocks)
    tables: list[tuple[Tensor, Tensor]] = []
    table_ids: dict[tuple[int, float], int] = {}
    layers = []
    for block in blocks:
        key = (block.attn.rotary_cos.data_ptr(), float(block.attn._rotary_base()))
        if key not in table_ids:
            table_ids[key] = len(tables)
            tables.append(_rotary_table(block.attn, total_tokens))
        layers.append(_layer(block, table_ids[key]))
    norms = {L.norms for L in layers}
    if len(norms) != 1 or any(n[0] != n[2] or n[1] != n[3] for n in norms):
        raise EngineUnsupported("layers with different norms")
    if len({L.attn_scale for L in layers}) != 1:
        raise EngineUnsupported("layers with different attention scales")
    norm, post_norm, _, _ = layers[0].norms
    n_kv = layers[0].qkv[2].shape[0] // cfg.d_head
    caps = [
        float(c) if c is not None and c > 0 else 0.0 for c in (cfg.attn_scores_soft_cap, cfg.output_logits_soft_cap)
    ]
    consts = Consts(
        norm=norm,
        post_norm=post_norm,
        final_norm=_norm_of(getattr(model, "ln_final", None))[0],
        eps=float(cfg.eps),
        dtype=cfg.dtype,
        n_kv=n_kv,
        group=cfg.n_heads // n_kv,
        d_head=cfg.d_head,
        rotary_dim=int(cfg.rotary_dim or cfg.d_head),
        adjacent_pairs=bool(cfg.rotary_adjacent_pairs),
        attn_scale=layers[0].attn_scale,
        attn_cap=caps[0],
        logit_cap=caps[1],
        gated=type(blocks[0].mlp) is GatedMLP,
        act=blocks[0].mlp.act_fn,
    )
    return consts, layers, tables


def parse_hook(hook_name: str, n_layers: int) -> tuple[int, str]:
    """``blocks.6.hook_resid_post`` -> ``(6, "hook_resid_post")``; the engine steers and captures on
    the residual stream only."""
    parts = hook_name.split(".")
    if len(parts) != 3 or parts[0] != "blocks" or not parts[1].isdigit() or parts[2] not in HOOK_POINTS:
        raise EngineUnsupported(
            f"hook {hook_name!r}: the static engine steers at blocks.<layer>.{{{', '.join(HOOK_POINTS)}}}; "
            "use effects.engine: tl for other hooks"
        )
    layer = int(parts[1])
    if not 0 <= layer < n_layers:
        raise EngineUnsupported(f"hook {hook_name!r}: the model has layers 0..{n_layers - 1}")
    return layer, parts[2]


# --- rows that compute the same thing -----------------------------------------------------------------


@dataclass(frozen=True)
class SharedStep:
    """One position's rows in groups that compute the same keys, values, activation and logits: the
    same steering and the same prompt tokens up to and including the position (a row past its prompt
    is a group of its own). ``rep [g]``: one row per group, the rows the step computes; ``expand
    [rows]``: each row's group (an index into ``rep``); ``sample [m]``: the rows whose next token is
    sampled (not forced); ``logit_groups [k]``: the groups those rows are in (only their logits are
    computed); ``sample_at [m]``: each sampled row's index into ``logit_groups``.

    Before the steering is added, the steering does not matter: the layers up to the hook compute
    the coarser groups of the same prompt tokens so far, whatever the steering (``pre_rep [g0]``,
    ``pre_expand [rows]``), and ``pre_to_post [g]`` is each group's index into them (None where the
    two groupings are the same, as without steering)."""

    rep: Tensor
    expand: Tensor
    sample: Tensor
    logit_groups: Tensor
    sample_at: Tensor
    pre_rep: Tensor
    pre_expand: Tensor
    pre_to_post: Tensor | None


# Fewer rows than this and sgemm may take other kernels (matrix-vector, small-batch) whose sums round
# differently from the full batch's: every shared step computes at least this many (or every) rows.
MIN_SHARED_ROWS = 16


def _groups(keys: list[tuple]) -> tuple[list[int], list[int]]:
    """``(rep, expand)`` of rows with equal ``keys``: each group's first row, and each row's group.
    ``rep`` is padded with copies of its first row up to :data:`MIN_SHARED_ROWS` rows (or as many
    as there are keys, if fewer); no row's group is a padding row."""
    index: dict[tuple, int] = {}
    rep: list[int] = []
    expand: list[int] = []
    for r, key in enumerate(keys):
        g = index.setdefault(key, len(index))
        if g == len(rep):
            rep.append(r)
        expand.append(g)
    return rep + rep[:1] * (min(MIN_SHARED_ROWS, len(keys)) - len(rep)), expand


def shared_steps(tokens: Tensor, forced: Tensor, delta: Tensor | None) -> list[SharedStep | None]:
    """For positions ``0 .. total-2`` of ``tokens [rows, total]`` (prompt tokens where ``forced``) and
    ``delta`` (``[rows, d_model]``, ``[d_model]`` or None), the :class:`SharedStep` of each position
    where some rows share a group or some next token is forced; None where every row computes, and
    samples, its own.

    01's rows share a lot inside their prompts: every row starts with the same start token, and a
    prompt's samples read the same prompt; below the hook, so do the rows of every vector. Groups
    only split as positions advance, so the search stops at the first position where no group has
    two rows and no next token is forced (with forced prompts, as
    :func:`~saets_utils.steering.generation.generate_aligned` passes, none is forced later)."""
    rows, total = tokens.shape
    tok, frc = tokens.cpu(), forced.cpu()
    if delta is None or delta.dim() == 1:
        steer = [0] * rows
    else:
        steer = torch.unique(delta.detach().cpu(), dim=0, return_inverse=True)[1].tolist()
    steps: list[SharedStep | None] = [None] * (total - 1)
    prefix_forced = frc.cumprod(1).bool()  # [rows, total]: forced at every position so far
    dev = tokens.device
    for p in range(total - 1):
        prefix = [tuple(tok[r, : p + 1].tolist()) if prefix_forced[r, p] else (-1, r) for r in range(rows)]
        pre_rep, pre_expand = _groups(prefix)
        rep, expand = _groups([(steer[r], *key) for r, key in enumerate(prefix)])
        sample = (~frc[:, p + 1]).nonzero()[:, 0]
        if max(pre_expand) + 1 == rows and sample.numel() == rows:  # every row a group of its own
            break
        exp = torch.tensor(expand, dtype=torch.long)
        logit_groups, sample_at = torch.unique(exp[sample], return_inverse=True)
        same = rep == pre_rep  # the padding is the first row in both
        steps[p] = SharedStep(
            torch.tensor(rep, dtype=torch.long, device=dev),
            exp.to(dev),
            sample.to(dev),
            logit_groups.to(dev),
            sample_at.to(dev),
            torch.tensor(pre_rep, dtype=torch.long, device=dev),
            torch.tensor(pre_expand, dtype=torch.long, device=dev),
            None if same else torch.tensor([pre_expand[r] for r in rep], dtype=torch.long, device=dev),
        )
    return steps


def resolve_engine(engine: str, model: HookedTransformer, hook_name: str | None) -> str:
    """``engine`` as given, or for ``auto``: ``static`` where it is tested equal to TransformerLens
    and faster (fp32 on the CPU, with a model and hook it implements), else ``tl``."""
    if engine != "auto":
        return engine
    cfg = model.cfg
    if torch.device(cfg.device or "cpu").type != "cpu" or cfg.dtype != torch.float32 or unsupported(model):
        return "tl"
    if hook_name is not None:
        try:
            parse_hook(hook_name, cfg.n_layers)
        except EngineUnsupported:
            return "tl"
    return "static"


# --- the decoder ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineOptions:
    """How the step runs. ``compile``: a ``torch.compile`` backend for the layer functions (None:
    eager); ``graphs``: replay the step from CUDA graphs; ``pos_bucket``: attended positions are
    rounded up to a multiple of it (one graph per bucket; the extra positions are masked);
    ``share_prefixes``: compute once per group the rows whose steering and prompt so far are the
    same (:func:`shared_steps`). Their batch changes with the position, so only eager steps share:
    None (the default) shares where the step is eager (no ``compile``, no ``graphs``)."""

    compile: str | None = None
    graphs: bool = False
    pos_bucket: int = 1
    share_prefixes: bool | None = None

    def __post_init__(self) -> None:
        if self.share_prefixes and (self.compile or self.graphs):
            raise ValueError("share_prefixes needs eager steps (their batch varies): not with compile or graphs")

    @property
    def shares(self) -> bool:
        """Whether the decode shares prompt prefixes."""
        eager = not self.compile and not self.graphs
        return eager if self.share_prefixes is None else self.share_prefixes

    @classmethod
    def for_device(cls, device: torch.device | str) -> EngineOptions:
        """Eager, exact-length, shared prefixes on the CPU; compiled, graphed, one bucket of 64
        positions on CUDA."""
        if torch.device(device).type == "cuda":
            return cls(compile="inductor", graphs=True, pos_bucket=64)
        return cls()


class StaticDecoder:
    """Decodes ``rows`` sequences to ``total_tokens`` with the model's weights read in place.

    Fill it with :meth:`load` (tokens, which positions are forced, uniforms, steering), then
    :meth:`run`; the results are in :attr:`tokens` and, with ``capture``, :attr:`acts` (the
    pre-steering activations at the hook for every position). A decoder can be loaded and run again
    (its CUDA graphs are kept).
    """

    def __init__(
        self,
        model: HookedTransformer,
        rows: int,
        total_tokens: int,
        *,
        hook_name: str | None,
        steer: bool,
        capture: bool,
        sampling: SamplingConfig | None,
        options: EngineOptions | None = None,
    ) -> None:
        why = unsupported(model)
        if why:
            raise EngineUnsupported(f"the static engine does not implement {why}; use effects.engine: tl")
        cfg = model.cfg
        self.device = torch.device(cfg.device or "cpu")
        self.options = options or EngineOptions.for_device(self.device)
        self.rows, self.total, self.sampling, self.capture = rows, total_tokens, sampling, capture
        self.hook = None if hook_name is None else parse_hook(hook_name, cfg.n_layers)
        if self.hook is None and (steer or capture):
            raise ValueError("hook_name is required to steer or capture")
        self.consts, self.layers, self.tables = _read_model(model, total_tokens)
        self.W_E = model.W_E
        lnf = _norm_of(getattr(model, "ln_final", None))
        self.final = (lnf[1], lnf[2], model.W_U.T, nonzero_bias(model.b_U))  # F.linear(x, W_U.T): no copy in any layout
        dev, dt, c = self.device, cfg.dtype, self.consts
        self.tokens = torch.zeros(rows, total_tokens, dtype=torch.long, device=dev)
        self.forced = torch.zeros(rows, total_tokens, dtype=torch.bool, device=dev)
        self.u = torch.zeros(rows, total_tokens, dtype=torch.float64, device=dev)
        self.delta = torch.zeros(rows, cfg.d_model, dtype=dt, device=dev) if steer else None
        self.acts = torch.zeros(rows, total_tokens, cfg.d_model, dtype=dt, device=dev) if capture else None
        # zeros, not empty: masked (future) positions enter the value product with weight 0
        shape = (rows, c.n_kv, total_tokens, c.d_head)
        self.K = [torch.zeros(shape, dtype=dt, device=dev) for _ in self.layers]
        self.V = [torch.zeros(shape, dtype=dt, device=dev) for _ in self.layers]
        self.positions = torch.arange(total_tokens, device=dev)
        self.compiled = _compiled(self.options.compile) if self.options.compile else None
        self.runner = StepRunner(self.step, self.device, graphs=self.options.graphs)
        self.shared: list[SharedStep | None] = [None] * (total_tokens - 1)

    def load(self, tokens: Tensor, forced: Tensor, u: Tensor, delta: Tensor | None) -> None:
        """Copy a call's inputs into the buffers: ``tokens [rows, total]`` (prompt tokens where
        ``forced``), ``u [rows, total]`` (``u[r, p]`` samples position ``p``), ``delta`` ``[rows,
        d_model]`` or ``[d_model]``."""
        self.tokens.copy_(tokens)
        self.forced.copy_(forced)
        self.u.copy_(u)
        if self.delta is not None:
            assert delta is not None
            self.delta.copy_(delta.to(self.delta.dtype).expand_as(self.delta))
        if self.options.shares:
            self.shared = shared_steps(self.tokens, self.forced, self.delta)

    def run(self, keep_logits: bool = False) -> list[Tensor]:
        """Decode positions ``1 .. total-1``, then (with ``capture``) the last position up to the hook.
        ``keep_logits``: return each step's logits ``[rows, d_vocab]`` (for tests)."""
        out = []
        bucket = self.options.pos_bucket
        for t in range(self.total - 1):
            attended = attended_positions(t, self.total, bucket)
            share = self.shared[t]
            if share is None:
                logits = self.runner(t, attended, False)
            else:  # eager (options.shares): the step's batch is this position's groups
                self.runner.pos.fill_(t)
                logits = self.step(self.runner.pos, attended, False, share=share, all_logits=keep_logits)
            if keep_logits:
                assert logits is not None
                out.append(logits.clone())
        if self.capture:
            self.runner(self.total - 1, attended_positions(self.total - 1, self.total, bucket), True)
        return out

    def _functions(self) -> tuple[Callable[..., Any], ...]:
        # looked up at call time when eager, so a test can swap a helper (mutation tests)
        return self.compiled or (_qkv, _attend, _mlp, _logits)

    def _hook(self, x: Tensor, pos: Tensor, share: SharedStep | None) -> Tensor:
        """Capture the activation before steering (as ``steering_hook``), then add the steering.
        With ``share``, ``x`` holds the groups before the hook (``pre_rep``); the result, the groups
        after it (``rep``)."""
        if self.acts is not None:
            self.acts.index_copy_(1, pos.view(1), _every_row(x, share, pre=True)[:, None])
        if share is not None and share.pre_to_post is not None:
            x = x.index_select(0, share.pre_to_post)
        if self.delta is None:
            return x
        return x + (self.delta if share is None else self.delta.index_select(0, share.rep))

    def step(
        self, pos: Tensor, attended: int, last: bool, share: SharedStep | None = None, all_logits: bool = False
    ) -> Tensor | None:
        """One position for every row: read the token at ``pos``, write its keys, values and
        activation, sample the token at ``pos + 1`` (kept where the prompt forces it). ``attended``:
        cached positions read (``>= pos + 1``); ``last``: stop at the hook (capture only).

        ``share``: compute one row per group (:class:`SharedStep`; up to the hook, its groups before
        steering) and copy its keys, values and activation to the group's rows; logits only for the
        groups with a row to sample, and returned (``[rows, d_vocab]``, every group's) only with
        ``all_logits``."""
        qkv, attend, mlp, logits_fn = self._functions()
        c, rows = self.consts, self.rows
        at = pos.view(1)
        tokens_in = self.tokens.index_select(1, at).view(rows)
        pre = self.hook is not None  # share's groups before the hook until the hook is passed
        x = F.embedding(tokens_in if share is None else tokens_in.index_select(0, _reps(share, pre)), self.W_E)
        positions = self.positions[:attended]
        masks: dict[int | None, Tensor] = {}
        rot = [(cos.index_select(0, at), sin.index_select(0, at)) for cos, sin in self.tables]
        hook_layer, point = self.hook if self.hook is not None else (-1, "")
        for i, L in enumerate(self.layers):
            if i == hook_layer and point == "hook_resid_pre":
                x, pre = self._hook(x, pos, share), False
                if last:
                    return None
            q, k, v = qkv(x, *L.ln1, *L.qkv, *rot[L.rotary], c)
            self.K[i].index_copy_(2, at, _every_row(k, share, pre)[:, :, None])
            self.V[i].index_copy_(2, at, _every_row(v, share, pre)[:, :, None])
            if L.window not in masks:
                masks[L.window] = _window_mask(positions, pos, L.window)
            K, V = self.K[i][:, :, :attended], self.V[i][:, :, :attended]
            if share is not None:
                K, V = K.index_select(0, _reps(share, pre)), V.index_select(0, _reps(share, pre))
            x = attend(x, q, K, V, masks[L.window], *L.out, c)
            if i == hook_layer and point == "hook_resid_mid":
                x, pre = self._hook(x, pos, share), False
                if last:
                    return None
            x = mlp(x, *L.ln2, *L.mlp, c)
            if i == hook_layer and point == "hook_resid_post":
                x, pre = self._hook(x, pos, share), False
                if last:
                    return None
        nxt = at + 1
        if share is not None:
            return self._sample_shared(x, nxt, share, all_logits)
        logits = logits_fn(x, *self.final, c)
        sampled = sample_from_logits(logits, self.u.index_select(1, nxt).view(rows), self.sampling)
        keep = self.forced.index_select(1, nxt).view(rows)
        new = torch.where(keep, self.tokens.index_select(1, nxt).view(rows), sampled)
        self.tokens.index_copy_(1, nxt, new[:, None])
        return logits

    def _sample_shared(self, x: Tensor, nxt: Tensor, share: SharedStep, all_logits: bool) -> Tensor | None:
        """The next token of the rows ``share.sample`` from their groups' logits (the other rows keep
        their forced token); ``x [groups, d_model]`` after the last layer."""
        logits_fn, c = self._functions()[3], self.consts
        if all_logits:
            every = logits_fn(x, *self.final, c)
            logits = every.index_select(0, share.logit_groups)
        else:
            every, logits = None, logits_fn(x.index_select(0, share.logit_groups), *self.final, c)
        if share.sample.numel():
            u = self.u.index_select(1, nxt).view(self.rows).index_select(0, share.sample)
            sampled = sample_from_logits(logits.index_select(0, share.sample_at), u, self.sampling)
            self.tokens.index_put_((share.sample, nxt.expand_as(share.sample)), sampled)
        return None if every is None else every.index_select(0, share.expand)


def _reps(share: SharedStep, pre: bool) -> Tensor:
    """The rows that compute for the groups before the hook (``pre``) or after it."""
    return share.pre_rep if pre else share.rep


def _every_row(t: Tensor, share: SharedStep | None, pre: bool = False) -> Tensor:
    """``t [groups, ...]`` copied to every row (``[rows, ...]``), from the groups before the hook
    (``pre``) or after it; ``t`` itself without groups."""
    if share is None:
        return t
    return t.index_select(0, share.pre_expand if pre else share.expand)


# decoders kept per model on CUDA, so their CUDA graphs are captured once per shape, not per call
_KEEP = 3
_DECODERS: weakref.WeakKeyDictionary[Any, OrderedDict[tuple, StaticDecoder]] = weakref.WeakKeyDictionary()


def decoder_for(
    model: HookedTransformer,
    rows: int,
    total_tokens: int,
    *,
    hook_name: str | None,
    steer: bool,
    capture: bool,
    sampling: SamplingConfig | None,
    options: EngineOptions | None = None,
) -> StaticDecoder:
    """A :class:`StaticDecoder` for these shapes: a new one on the CPU, on CUDA the one kept from an
    earlier call with the same shapes (the last few are kept per model)."""
    make = lambda: StaticDecoder(
        model,
        rows,
        total_tokens,
        hook_name=hook_name,
        steer=steer,
        capture=capture,
        sampling=sampling,
        options=options,
    )
    if torch.device(model.cfg.device or "cpu").type != "cuda":
        return make()
    kept = _DECODERS.setdefault(model, OrderedDict())
    key = (rows, total_tokens, hook_name, steer, capture, sampling, options)
    if key not in kept:
        kept[key] = make()
        while len(kept) > _KEEP:
            kept.popitem(last=False)
    kept.move_to_end(key)
    return kept[key]


@torch.no_grad()
def decode_aligned(
    model: HookedTransformer,
    tokens: Tensor,
    forced: Tensor,
    u: Tensor,
    *,
    sampling: SamplingConfig | None,
    hook_name: str | None,
    delta: Tensor | None,
    capture: bool,
    options: EngineOptions | None = None,
) -> tuple[Tensor, Tensor | None]:
    """:func:`~saets_utils.steering.generation.generate_aligned`'s decode on the static engine:
    ``tokens [rows, total]`` (prompt tokens where ``forced``), ``u [rows, total]`` the uniform that
    samples each position. Returns the tokens and, with ``capture``, the activations at the hook."""
    rows, total = tokens.shape
    dec = decoder_for(
        model,
        rows,
        total,
        hook_name=hook_name,
        steer=delta is not None,
        capture=capture,
        sampling=sampling,
        options=options,
    )
    dec.load(tokens, forced, u, delta)
    dec.run()
    reused = dec.device.type == "cuda"  # kept decoders' buffers are overwritten by the next call
    acts = dec.acts if not reused or dec.acts is None else dec.acts.clone()
    return (dec.tokens.clone() if reused else dec.tokens), acts
