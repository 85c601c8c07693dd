"""The from-scratch GPT: embeddings, RoPE or learned positions, pre-norm blocks, KV-cache generation.

One file, read top to bottom: norms -> rotary embedding -> KV cache -> attention -> MLP -> block -> loss ->
model -> sampling.
Weights are laid out so that `align.model.hf` can map them one to one onto transformers' LlamaForCausalLM
and GPT2LMHeadModel; the only difference is that q/k/v (and SwiGLU's gate/up) are fused into one matmul.
"""

from __future__ import annotations

import math
import numbers
import operator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from align.model.config import GPTConfig


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 like Llama's (no mean subtraction, no bias)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype)


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def rope_tables(head_dim: int, length: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (length, head_dim) in the half-split layout HF Llama uses."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim))
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+D/2}) by position-dependent angles; x is (B, H, T, D), cos/sin (T, D).

    The textbook form, x * cos + cat(-x2, x1) * sin, costs eager PyTorch five passes over q and k and as many in
    backward; `Rotation` makes two each way (the gradient of a rotation is the rotation by minus the angle)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    # Generation records no graph: there the rotation is applied without an autograd.Function's overhead per call.
    return Rotation.apply(x, cos, sin) if torch.is_grad_enabled() else rotate(x, cos, sin)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
    """x * cos + cat(-x2, x1) * sin * sign, with the second term added in place half by half."""
    half = x.size(-1) // 2
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-sign)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:], value=sign)
    return out


class Rotation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return rotate(grad, cos, sin, sign=-1.0), None, None


class KVCache:
    """Preallocated keys and values for every layer: (n_layer, B, n_kv_head, max_len, head_dim)."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype):
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def update(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor):
        end = pos + k.size(2)
        self.k[layer, :, :, pos:end] = k
        self.v[layer, :, :, pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.qkv = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * self.head_dim, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x, rope=None, cache: KVCache | None = None, pos: int = 0):
        B, T, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.qkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, pos, k, v)
        # The causal mask: token t attends to tokens <= t. A fresh sequence uses SDPA's built-in mask; a chunk
        # appended after cached tokens sees all of the cache plus the causal part of itself; one new token
        # sees everything before it, so needs no mask at all.
        mask, is_causal = None, T > 1
        if cache is not None and pos > 0 and T > 1:
            mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(diagonal=pos)
            is_causal = False
        # GQA/MQA: each group of n_head // n_kv_head query heads shares one key/value head; SDPA broadcasts
        # them itself, without materialising the repeated keys and values.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


def swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up for h = [gate | up], the output of the fused projection.

    Autograd would compute the two halves of the gradient separately and then copy them into one tensor for the
    fused matmul; this backward writes them into that tensor directly, saving a pass over the MLP's widest
    activation."""

    @staticmethod
    def forward(ctx, h):
        gate, up = h.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(h, act)
        return act * up

    @staticmethod
    def backward(ctx, grad):
        h, act = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        grad_h = torch.empty_like(h)
        grad_gate, grad_up = grad_h.chunk(2, dim=-1)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        torch.mul(grad, act, out=grad_up)
        return grad_h


class MLP(nn.Module):
    """SwiGLU (Llama): proj(silu(gate(x)) * up(x)), with gate and up fused in `fc`; or GELU (GPT-2)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        hidden = config.intermediate_size * (2 if self.swiglu else 1)
        self.fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)

    def forward(self, x):
        h = self.fc(x)
        if self.swiglu:
            h = SwiGLU.apply(h) if torch.is_grad_enabled() else swiglu(h)
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's "gelu_new"
        return self.proj(h)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.norm_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.norm_2 = make_norm(config)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, cache=None, pos=0):
        x = x + self.dropout(self.attn(self.norm_1(x), rope, cache, pos))
        return x + self.dropout(self.mlp(self.norm_2(x)))


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `h @ weight.T` against targets (-100 ignored), without the (N, vocab) logits.

    The logits are made a chunk of rows at a time and turned into their gradient on the spot
    (d loss / d logits = (softmax - onehot(target)) / n_targets), which is multiplied straight into the
    gradients of h and weight. Training thus never holds the full logits nor their gradient (2 x 128 MB at
    16 x 256 tokens and an 8K vocabulary, 2 x 3.3 GB at GPT-2's 16 x 1024 x 50K), and the softmax runs on
    chunks that stay in cache: ~8% faster per training step on CPU than F.cross_entropy over the full logits.
    Same loss and gradients as `F.cross_entropy(F.linear(h, weight), targets, ignore_index=-100)`."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows):
        n_targets = (targets != -100).sum()
        n_scale = n_targets.clamp(min=1)  # no targets at all: zero gradients (and a NaN loss, as F.cross_entropy)
        dtype = torch.promote_types(weight.dtype, torch.float32)  # the softmax and sums: fp32 at least
        loss = torch.zeros((), device=h.device, dtype=dtype)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=dtype) if ctx.needs_input_grad[1] else None
        for start in range(0, h.size(0), chunk_rows):
            h_chunk, t_chunk = h[start : start + chunk_rows], targets[start : start + chunk_rows]
            has_target = t_chunk != -100
            t_chunk = t_chunk.masked_fill(~has_target, 0)
            logits = (h_chunk @ weight.t()).to(dtype)
            target_logit = logits.gather(1, t_chunk[:, None])
            row_max = logits.amax(dim=1, keepdim=True)
            probs = logits.sub_(row_max).exp_()  # in place: the chunk's logits become unnormalised softmax
            sum_exp = probs.sum(dim=1, keepdim=True)
            loss += ((sum_exp.log() + row_max - target_logit).squeeze(1) * has_target).sum()
            scale = has_target[:, None].to(dtype) / n_scale
            grad_logits = probs.mul_(scale / sum_exp).scatter_add_(1, t_chunk[:, None], -scale)
            if grad_h is not None:
                grad_h[start : start + chunk_rows] = grad_logits.to(weight.dtype) @ weight
            if grad_weight is None:
                continue
            if torch.is_autocast_enabled(h.device.type):
                grad_weight += grad_logits.t() @ h_chunk  # autocast runs this in bf16; an in-place addmm_ would not
            else:
                grad_weight.addmm_(grad_logits.t(), h_chunk.to(dtype))
        ctx.save_for_backward(grad_h, None if grad_weight is None else grad_weight.to(weight.dtype))
        return loss / n_targets

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_weight = ctx.saved_tensors
        return (
            None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype),
            None if grad_weight is None else grad_weight * grad_loss.to(grad_weight.dtype),
            None,
            None,
        )


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int | None = None):
    """`LinearCrossEntropy` over h (N, d), weight (vocab, d), targets (N,); chunks of ~4M logits by default."""
    chunk_rows = chunk_rows or max(256, 2**22 // weight.size(0))
    return LinearCrossEntropy.apply(h, weight, targets, chunk_rows)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.activation_checkpointing = False
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.position == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if config.position == "rope":
            cos, sin = rope_tables(config.head_dim, config.block_size, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def _apply(self, fn, recurse=True):
        # .bfloat16(), .half(), .to(dtype) cast buffers too: RoPE tables cast away from fp32 are remade in fp32, so
        # that a round trip (m.bfloat16().float()) does not leave them rounded (transformers recomputes its tables
        # in fp32 on every forward; ours must stay as exact to match it). Moves keep the values as they are.
        super()._apply(fn, recurse)
        if self.config.position == "rope" and self.rope_cos.dtype != torch.float32:
            with torch.inference_mode(False):  # ordinary tensors even if cast inside inference mode
                self.rope_cos, self.rope_sin = rope_tables(self.config.head_dim, self.config.block_size,
                                                           self.config.rope_theta, device=self.rope_cos.device)
        return self

    def reset_parameters(self):
        """GPT-2 init: N(0, 0.02), zero biases, residual projections scaled by 1/sqrt(2 * n_layer)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, (RMSNorm, nn.LayerNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=residual_std)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if self.wpe is not None else 0)
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:
        B, T = idx.shape
        if pos + T > self.config.block_size:
            raise ValueError(
                f"sequence of {pos + T} tokens is longer than the model's block_size ({self.config.block_size})"
            )
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(pos, pos + T, device=idx.device))
        x = self.drop(x)
        rope = (self.rope_cos[pos : pos + T], self.rope_sin[pos : pos + T]) if self.config.position == "rope" else None
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope, cache, pos)
        return self.norm_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, return_logits: bool = True):
        """Logits (B, T, vocab) and, when targets are given, the mean cross-entropy (targets of -100 ignored).

        A training step that needs only the loss passes return_logits=False: the loss then comes from
        `linear_cross_entropy`, which never makes the full logits, and the logits returned are None."""
        h = self.hidden_states(idx)
        if targets is not None and not return_logits and torch.is_grad_enabled():
            return None, linear_cross_entropy(h.view(-1, h.size(-1)), self.lm_head.weight, targets.reshape(-1))
        logits = self.lm_head(h)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue each row of idx (B, T) by up to max_new_tokens. temperature=0 is greedy.

        A row that has emitted an eos token is padded with pad_token_id (default: the first eos id, as
        transformers does without a pad token) while the others finish; generation stops early once every row
        has finished. Returns (B, T + generated)."""
        if idx.dim() != 2 or idx.size(0) == 0 or idx.size(1) == 0:
            raise ValueError(f"idx must be a (batch, time) tensor of token ids with at least one row and at least "
                             f"one token per row, got shape {tuple(idx.shape)}")
        try:  # any integer type (numpy's, a 0-d tensor), but not a bool, a float or a 1-d tensor
            one_d = isinstance(max_new_tokens, torch.Tensor) and max_new_tokens.dim() > 0
            n_new = None if isinstance(max_new_tokens, bool) or one_d else operator.index(max_new_tokens)
        except TypeError:
            n_new = None
        if n_new is None or n_new < 0:
            raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        max_new_tokens = n_new
        check_sampling_args(temperature, top_k, top_p)
        B, T = idx.shape
        # The last new token is never fed back, so the positions used are T + max_new_tokens - 1.
        if T + max_new_tokens - 1 > self.config.block_size:
            raise ValueError(
                f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds block_size ({self.config.block_size}) + 1"
            )
        eos = None
        if isinstance(eos_token_id, torch.Tensor):
            eos_token_id = eos_token_id.flatten().tolist()
        if eos_token_id is not None:
            eos_list = list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
            if not eos_list or any(isinstance(t, bool) or int(t) != t for t in eos_list):
                raise ValueError(f"eos_token_id must be a token id or a non-empty list of them, got {eos_token_id!r}")
            eos_list = [int(t) for t in eos_list]
            eos = torch.tensor(eos_list, device=idx.device)
            pad = eos_list[0] if pad_token_id is None else pad_token_id
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                cache = None
                if use_cache:
                    cache = KVCache(self.config, B, T + max_new_tokens, idx.device, self.wte.weight.dtype)
                finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
                out, pos, step_input = idx, 0, idx
                for _ in range(max_new_tokens):
                    if cache is not None:
                        logits = self.lm_head(self.hidden_states(step_input, cache, pos)[:, -1])
                        pos += step_input.size(1)
                    else:
                        logits = self.lm_head(self.hidden_states(out)[:, -1])
                    next_token = sample_next_token(logits, temperature, top_k, top_p, generator)
                    if eos is not None:
                        next_token = torch.where(finished, pad, next_token)
                        finished |= torch.isin(next_token, eos)
                    out = torch.cat([out, next_token[:, None]], dim=1)
                    step_input = next_token[:, None]
                    if finished.all():
                        break
        finally:
            self.train(was_training)
        return out.clone()  # made outside inference mode: a normal tensor, which may be scored with gradients (RL)


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if isinstance(temperature, (str, bool)) or not isinstance(temperature, (numbers.Real, torch.Tensor)) \
            or not temperature >= 0 or math.isinf(temperature):  # also refuses NaN
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, (str, bool)) or not isinstance(top_k, (numbers.Real, torch.Tensor))
                              or not math.isfinite(top_k) or int(top_k) != top_k or top_k < 1):  # int(inf) raises
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, (str, bool)) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of logits (B, vocab): greedy at temperature 0, else top-k / nucleus sampling."""
    check_sampling_args(temperature, top_k, top_p)
    # A temperature below fp32's smallest number (~1e-45) is 0 in the division below (0 / 0 = NaN): greedy too.
    if temperature == 0 or torch.tensor(float(temperature), dtype=torch.float32) == 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    # Shifted so that the largest logit is 0 before dividing: a tiny temperature then gives -inf, not inf - inf.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(int(top_k), logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        # Drop a token when it and every less likely token hold at most 1 - top_p of the mass (so the tokens
        # ranked above it already cover top_p); the top token always stays. Summed from the least likely up,
        # as transformers does: a running sum from the top reaches 1.0 in fp32 before the tail, and would cut
        # tokens even at top_p = 1.
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        outside = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        outside[:, -1] = False
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
