"""A Llama-shaped forward pass over a paged KV cache with per-row adapters (batched heterogeneous LoRA).

Served families (:data:`SUPPORTED_MODEL_TYPES`): Llama, Mistral and Qwen2 -- one decoder shape
(RMSNorm, rotary attention with grouped K/V heads, SwiGLU MLP); projection biases (Qwen2's q/k/v,
Llama's ``attention_bias``/``mlp_bias``) are added, and sliding-window attention (Mistral's
``sliding_window``, Qwen2's ``sliding_attention`` layers) masks keys older than the window, as
transformers does. Any other family raises :class:`UnsupportedModelError` naming these.

The weights are those of a transformers causal LM whose Linear layers were quantized
to 4 bits (:func:`~lightning_qlora.quantization.convert.quantize_linears`); this module only runs
them differently from ``model.forward``: a step takes any mix of sequences (a prompt being
prefilled, many sequences decoding one token), reads and writes their K/V in pool pages through
per-sequence page tables, and adds each row's own adapter to every adaptable projection with one
``lightning_qlora::bgmv`` call per projection on top of the fused 4-bit base product:

    y = x @ dequant(W_nf4)^T + scale_s * (x @ A_s^T) @ B_s^T      (s = the row's adapter slot)

Numerics follow transformers' Llama (RMSNorm in float32, rotary embedding from the model's own
``rotary_emb``, softmax attention with grouped K/V heads); sums differ in order only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lightning_qlora.ops import backend, op
from lightning_qlora.ops._extension import cpu_extension
from lightning_qlora.ops.schemas import check_dequantize_4bit_args
from lightning_qlora.quantization.linear import Linear4bit
from lightning_qlora.serving.errors import ServerConfigError, UnsupportedModelError
from lightning_qlora.serving.lm_head import CompactHead
from lightning_qlora.serving.pool import PagePool

#: ``config.model_type`` of the families the engine runs (one decoder shape).
SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2")

#: The projections of a Llama block that adapters may target, in table order.
ADAPTABLE_PROJECTIONS: tuple[str, ...] = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@dataclass
class StepLoRA:
    """The adapter tables of one step: slot ``s`` of the step is one resident adapter.

    Attributes:
        a_rows / b_rows: ``(M, S, R)`` int64 pool offsets; ``ranks`` ``(M, S)``; ``scales`` ``(M, S)`` float32.
        row_slots: ``(N,)`` int64 slot of each token row (-1 = base model only).
        active: ``(M,)`` bool, whether any slot adapts module ``m`` (else the BGMV call is skipped).
    """

    a_rows: torch.Tensor
    b_rows: torch.Tensor
    ranks: torch.Tensor
    scales: torch.Tensor
    row_slots: torch.Tensor
    active: list[bool]


@dataclass
class SequenceStep:
    """One sequence's share of a step.

    Attributes:
        tokens: ``(q,)`` new token ids (the prompt when prefilling, one token when decoding).
        past: tokens already in its KV cache.
        page_table: ``(num_layers, blocks)`` int64 pool pages of its KV cache.

    Its adapter is given per row by the step's :class:`StepLoRA`.
    """

    tokens: torch.Tensor
    past: int
    page_table: torch.Tensor


def check_supported(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` unless ``model`` is a causal LM of a served family."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"serving runs {', '.join(SUPPORTED_MODEL_TYPES)} models (one decoder shape); got model_type="
            f"{model_type!r} ({type(model).__name__}). Merge the adapter and use transformers' generate() for it."
        )


def adaptable_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """``(in, out)`` of every adaptable projection of a served model (the rows the pool pages must hold)."""
    check_supported(model)
    return [
        (m.in_features, m.out_features)
        for layer in model.model.layers
        for m in (layer.get_submodule(p) for p in ADAPTABLE_PROJECTIONS)
    ]


def _sliding_windows(config: object, num_layers: int) -> list[int | None]:
    """Per layer: the attention window (keys with ``position > query - window`` are seen) or None."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None:
        return [None] * num_layers
    if layer_types is not None:
        return [window if kind == "sliding_attention" else None for kind in layer_types[:num_layers]]
    return [window] * num_layers  # Mistral: every layer slides


class PagedLlama:
    """Runs a (4-bit) Llama / Mistral / Qwen2 causal LM over a :class:`PagePool` KV cache.

    Args:
        model: a transformers causal LM of a served family (any Linear may be :class:`Linear4bit`).
        pool: the page pool shared with the adapters.

    Raises:
        UnsupportedModelError: another family (the message names the served ones).
    """

    def __init__(self, model: nn.Module, pool: PagePool) -> None:
        check_supported(model)
        config = model.config
        self.model = model.eval()
        self.pool = pool
        self.layers = model.model.layers
        self.num_layers = len(self.layers)
        attention = self.layers[0].self_attn
        self.head_dim = attention.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = attention.scaling
        self.kv_dim = self.num_kv_heads * self.head_dim
        self.max_positions = int(config.max_position_embeddings)
        self.tokens_per_page = pool.page_size // (2 * self.kv_dim)
        if self.tokens_per_page < 1:
            raise ServerConfigError(
                f"pool pages of {pool.page_size} floats cannot hold one token's K and V of one layer "
                f"({2 * self.kv_dim} floats); use page_size >= {2 * self.kv_dim}."
            )
        self.windows = _sliding_windows(config, self.num_layers)
        self.head = CompactHead(model.lm_head)  # an exact int8/bf16 copy of the head when there is one
        self.module_names: list[str] = []
        self.module_shapes: dict[str, tuple[int, int]] = {}
        self._modules: list[nn.Module] = []
        self._weight_args: dict[int, tuple] = {}
        for index, layer in enumerate(self.layers):
            for projection in ADAPTABLE_PROJECTIONS:
                module = layer.get_submodule(projection)
                name = f"model.layers.{index}.{projection}"
                self.module_names.append(name)
                self.module_shapes[name] = (module.in_features, module.out_features)
                self._modules.append(module)
                if isinstance(module, Linear4bit):  # decode the double-quantized absmax once
                    w = module.weight
                    args = (w.packed, w.block_absmax(), w.code, w.blocksize, list(w.shape))
                    check_dequantize_4bit_args(*args)  # once here: the step calls the kernel unchecked
                    self._weight_args[len(self._modules) - 1] = args
        self._gemv_4bit = _gemv_4bit_kernel(self._weight_args.values())

    def kv_pages_for(self, tokens: int) -> int:
        """Pool pages the KV cache of a sequence of ``tokens`` tokens occupies (all layers)."""
        return self.num_layers * -(-tokens // self.tokens_per_page)

    # -- pieces --------------------------------------------------------------------------------
    def _linear(self, m: int, x: torch.Tensor, lora: StepLoRA | None) -> torch.Tensor:
        module = self._modules[m]
        args = self._weight_args.get(m)
        if args is not None:
            y = self._gemv_4bit(x, *args)
            if module.bias is not None:
                y = y + module.bias
        else:
            y = module(x)
        if lora is not None and lora.active[m]:
            y = y + op("bgmv")(
                x,
                self.pool.data,
                lora.a_rows[m],
                lora.b_rows[m],
                lora.ranks[m],
                lora.scales[m],
                lora.row_slots,
                y.shape[-1],
            )
        return y

    def _attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: _StepPlan
    ) -> torch.Tensor:
        """``q (N, H, d)``, new ``k, v (N, Hkv, d)`` -> ``(N, H * d)``; writes k, v to the pool first.

        Grouped K/V heads are never repeated: the ``H / Hkv`` query heads that share a K/V head are
        stacked as extra query rows of that head (query head ``h`` reads K/V head ``h // groups``, as
        transformers' ``repeat_kv``), so attention reads each cached key once.
        """
        flat = self.pool.data
        rows, groups = len(plan.sequences), self.num_heads // self.num_kv_heads
        kv = torch.cat([k.reshape(-1, self.kv_dim), v.reshape(-1, self.kv_dim)], dim=1)  # (N, 2 * kv_dim)
        flat[plan.write_offsets[layer].unsqueeze(1) + plan.kv_arange] = kv
        pages = self.pool.data.view(self.pool.num_pages, self.pool.page_size)[plan.read_pages[:, layer]]
        cache = pages[..., : self.tokens_per_page * 2 * self.kv_dim].reshape(
            rows, -1, 2, self.num_kv_heads, self.head_dim
        )
        keys = cache[:, : plan.max_keys, 0].transpose(1, 2)  # (n, Hkv, K, d)
        values = cache[:, : plan.max_keys, 1].transpose(1, 2)
        if plan.max_queries == 1:  # decode only: row i is sequence i's one token
            queries = q.view(rows, 1, self.num_heads, self.head_dim)
        else:
            queries = q.new_zeros(rows * plan.max_queries, self.num_heads, self.head_dim)
            queries[plan.query_rows] = q
            queries = queries.view(rows, plan.max_queries, self.num_heads, self.head_dim)
        # (n, Q, Hkv * G, d) -> (n, Hkv, G * Q, d): query row g * Q + t of K/V head j is head j * G + g at t
        grouped = queries.view(rows, plan.max_queries, self.num_kv_heads, groups, self.head_dim)
        grouped = grouped.permute(0, 2, 3, 1, 4).reshape(rows, self.num_kv_heads, -1, self.head_dim)
        mask = plan.mask if self.windows[layer] is None else plan.window_mask(self.windows[layer])
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=self.scaling)
        out = out.view(rows, self.num_kv_heads, groups, plan.max_queries, self.head_dim).permute(0, 3, 1, 2, 4)
        out = out.reshape(rows * plan.max_queries, self.num_heads * self.head_dim)
        return out if plan.max_queries == 1 else out[plan.query_rows]

    @torch.inference_mode()
    def forward(self, sequences: list[SequenceStep], lora: StepLoRA | None) -> torch.Tensor:
        """Run one step; returns the float32 logits ``(len(sequences), vocab)`` of each sequence's last token."""
        plan = _StepPlan.build(sequences, self)
        hidden = self.model.model.embed_tokens(plan.tokens)  # (N, hidden)
        cos, sin = self.model.model.rotary_emb(hidden.unsqueeze(0), plan.positions.unsqueeze(0))
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # (N, 1, d)
        per_layer = len(ADAPTABLE_PROJECTIONS)
        for index, layer in enumerate(self.layers):
            base = index * per_layer
            x = layer.input_layernorm(hidden)
            q = self._linear(base + 0, x, lora).view(-1, self.num_heads, self.head_dim)
            k = self._linear(base + 1, x, lora).view(-1, self.num_kv_heads, self.head_dim)
            v = self._linear(base + 2, x, lora).view(-1, self.num_kv_heads, self.head_dim)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            hidden = hidden + self._linear(base + 3, self._attention(index, q, k, v, plan), lora)
            x = layer.post_attention_layernorm(hidden)
            gate = layer.mlp.act_fn(self._linear(base + 4, x, lora)) * self._linear(base + 5, x, lora)
            hidden = hidden + self._linear(base + 6, gate, lora)
        last = self.model.model.norm(hidden[plan.last_rows])
        return self.head(last)


def _gemv_4bit_kernel(weight_args: Iterable[tuple]) -> Callable[..., torch.Tensor]:
    """The fused 4-bit product the step calls: the compiled CPU kernel itself when every weight is on
    the CPU and the extension is loaded (no dispatcher or per-call Python validation -- 210 calls per
    token on SmolLM2, ~6 us each), else the ``lightning_qlora::linear_4bit`` op (CUDA, reference)."""
    on_cpu = all(args[0].device.type == "cpu" for args in weight_args)
    if on_cpu and backend() == "cpp":
        return cpu_extension().linear_4bit
    return op("linear_4bit")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class _StepPlan:
    """Index tensors of one step, shared by every layer."""

    sequences: list[SequenceStep]
    tokens: torch.Tensor
    positions: torch.Tensor
    write_offsets: torch.Tensor  # (L, N) pool offset of each new token's K|V
    kv_arange: torch.Tensor
    read_pages: torch.Tensor  # (n, L, blocks) padded page tables
    query_rows: torch.Tensor  # (N,) row of each token in the padded (n * Qmax) query batch
    last_rows: torch.Tensor  # (n,) flat row of each sequence's last token
    mask: torch.Tensor  # (n, 1, G * Qmax, Kmax) bool, rows as the grouped queries of _attention
    max_queries: int
    max_keys: int
    query_positions: torch.Tensor  # (n, 1, G * Qmax, 1) position of each padded (grouped) query
    _window_masks: dict[int, torch.Tensor] = field(default_factory=dict)

    def window_mask(self, window: int) -> torch.Tensor:
        """The causal mask that also hides keys at ``position <= query - window`` (transformers' rule)."""
        if window not in self._window_masks:
            keys = torch.arange(self.max_keys).view(1, 1, 1, -1)
            self._window_masks[window] = self.mask & (keys > self.query_positions - window)
        return self._window_masks[window]

    @staticmethod
    def build(sequences: list[SequenceStep], runner: PagedLlama) -> _StepPlan:
        tpp, page_size = runner.tokens_per_page, runner.pool.page_size
        lengths = [s.tokens.numel() for s in sequences]
        max_queries = max(lengths)
        max_keys = max(s.past + q for s, q in zip(sequences, lengths))
        blocks = max(s.page_table.shape[1] for s in sequences)
        read_pages = torch.zeros(len(sequences), runner.num_layers, blocks, dtype=torch.int64)
        positions, query_rows, writes = [], [], []
        for row, (s, q) in enumerate(zip(sequences, lengths)):
            if s.past + q > s.page_table.shape[1] * tpp:
                raise ValueError(
                    f"sequence needs {s.past + q} KV slots but its page table holds {s.page_table.shape[1] * tpp}."
                )
            read_pages[row, :, : s.page_table.shape[1]] = s.page_table
            pos = torch.arange(s.past, s.past + q)
            positions.append(pos)
            query_rows.append(row * max_queries + torch.arange(q))
            page = s.page_table[:, pos // tpp]  # (L, q)
            writes.append(page * page_size + (pos % tpp) * 2 * runner.kv_dim)
        positions_t = torch.cat(positions)
        key_index = torch.arange(max_keys)
        query_index = torch.arange(max_queries)
        past = torch.tensor([s.past for s in sequences]).view(-1, 1, 1)
        # (n, G * Qmax, 1): the attention's query rows, the G query heads of a K/V group one after another
        groups = runner.num_heads // runner.num_kv_heads
        query_positions = (past + query_index.view(1, -1, 1)).repeat(1, groups, 1)
        mask = (key_index.view(1, 1, -1) <= query_positions).unsqueeze(1)
        last_rows = torch.tensor(lengths).cumsum(0) - 1
        return _StepPlan(
            sequences,
            torch.cat([s.tokens for s in sequences]),
            positions_t,
            torch.cat(writes, dim=1),
            torch.arange(2 * runner.kv_dim),
            read_pages,
            torch.cat(query_rows),
            last_rows,
            mask,
            max_queries,
            max_keys,
            query_positions.unsqueeze(1),
        )
