"""The from-scratch GPT: config validation, forward/loss, KV cache, sampling, activation checkpointing."""

import pytest
import torch

from align.model import GPT, GPTConfig, PRESETS, preset, sample_next_token
from align.model.gpt import linear_cross_entropy
from conftest import tiny_config


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(n_embd=66, n_head=4), "n_embd"),
        (dict(n_head=4, n_kv_head=3), "n_kv_head"),
        (dict(norm="batchnorm"), "norm"),
        (dict(position="alibi"), "position"),
        (dict(mlp="relu"), "mlp"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(dropout=1.5), "dropout"),
        (dict(n_layer=True), "n_layer"),
        (dict(intermediate_size="big"), "intermediate_size"),
        (dict(rope_theta=0.0), "rope_theta"),
        (dict(norm_eps=-1e-5), "norm_eps"),
        (dict(norm_eps=float("inf")), "norm_eps must be a positive finite number"),  # all-zero logits
        (dict(rope_theta=float("nan")), "rope_theta"),
        (dict(tie_embeddings="yes"), "tie_embeddings"),
    ],
)
def test_invalid_config_names_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**fields)


def test_presets():
    assert {"tiny", "gpt2-124m", "llama-124m", "llama-1b"} <= set(PRESETS)
    assert PRESETS["gpt2-124m"].family == "gpt2" and PRESETS["llama-1b"].family == "llama"
    assert 120e6 < PRESETS["gpt2-124m"].num_params(non_embedding=False) < 130e6
    assert 120e6 < PRESETS["llama-124m"].num_params(non_embedding=False) < 130e6
    assert preset("tiny", vocab_size=300).vocab_size == 300
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("gpt5")
    model = GPT(preset("tiny"))
    assert sum(p.numel() for p in model.parameters()) == model.config.num_params(non_embedding=False)


def test_config_round_trips_through_json(tmp_path):
    config = tiny_config(norm="layernorm", position="learned", mlp="gelu")
    config.save(tmp_path / "c.json")
    assert GPTConfig.load(tmp_path / "c.json") == config
    with pytest.raises(ValueError, match="unknown GPTConfig field"):
        GPTConfig.from_dict({**config.to_dict(), "n_layers": 3})
    import numpy as np

    from_numpy = tiny_config(n_layer=np.int64(2), intermediate_size=np.int32(96))  # sizes computed with numpy
    assert type(from_numpy.n_layer) is int and type(from_numpy.intermediate_size) is int
    floats = tiny_config(dropout=np.float32(0.25), norm_eps=np.float32(1e-5), rope_theta=np.int64(20000))
    assert (type(floats.dropout), type(floats.norm_eps), type(floats.rope_theta)) == (float, float, float)
    assert (floats.dropout, floats.rope_theta) == (0.25, 20000.0)
    floats.save(tmp_path / "floats.json")
    assert GPTConfig.load(tmp_path / "floats.json") == floats
    from_numpy.save(tmp_path / "numpy.json")
    assert GPTConfig.load(tmp_path / "numpy.json") == from_numpy


def test_intermediate_size_defaults():
    assert GPTConfig(n_embd=64, n_head=4, mlp="gelu").intermediate_size == 256
    swiglu = GPTConfig(n_embd=96, n_head=4, mlp="swiglu").intermediate_size
    assert swiglu % 64 == 0 and abs(swiglu - 8 * 96 / 3) < 64


def test_forward_shapes_and_loss():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx = torch.randint(0, 512, (2, 16))
    logits, loss = model(idx)
    assert logits.shape == (2, 16, 512) and loss is None
    logits, loss = model(idx[:, :-1], idx[:, 1:])
    assert loss.item() == pytest.approx(torch.log(torch.tensor(512.0)).item(), rel=0.1)  # near-uniform at init
    assert logits.shape == (2, 15, 512)
    targets = idx[:, 1:].clone()
    targets[:, :8] = -100
    logits_short, masked = model(idx[:, :-1], targets)
    expected = torch.nn.functional.cross_entropy(logits_short[:, 8:].reshape(-1, 512), idx[:, 9:].reshape(-1))
    torch.testing.assert_close(masked, expected)
    no_logits, fused = model(idx[:, :-1], targets, return_logits=False)  # the training step's loss
    assert no_logits is None
    torch.testing.assert_close(fused, expected)


@pytest.mark.parametrize("chunk_rows", [None, 7, 64])
def test_linear_cross_entropy_matches_full_logits(chunk_rows):
    """Chunked loss and gradients equal F.cross_entropy over the full logits, ignored targets included."""
    torch.manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    targets[::5] = -100
    loss = linear_cross_entropy(h, weight, targets, chunk_rows)
    grads = torch.autograd.grad(3 * loss, (h, weight))
    expected = torch.nn.functional.cross_entropy(h @ weight.t(), targets, ignore_index=-100)
    expected_grads = torch.autograd.grad(3 * expected, (h, weight))
    torch.testing.assert_close(loss, expected)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


def test_linear_cross_entropy_with_no_targets_gives_zero_gradients():
    """As F.cross_entropy: every target ignored gives a NaN mean but zero, not NaN, gradients."""
    h = torch.randn(8, 16, requires_grad=True)
    weight = torch.randn(32, 16, requires_grad=True)
    loss = linear_cross_entropy(h, weight, torch.full((8,), -100))
    loss.backward()
    assert loss.isnan()
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(weight.grad, torch.zeros_like(weight))


def test_training_loss_gradients_match_full_logits():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx = torch.randint(0, 512, (2, 17))
    model(idx[:, :-1], idx[:, 1:], return_logits=False)[1].backward()
    fused = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits, _ = model(idx[:, :-1])
    torch.nn.functional.cross_entropy(logits.reshape(-1, 512), idx[:, 1:].reshape(-1)).backward()
    for got, param in zip(fused, model.parameters()):
        torch.testing.assert_close(got, param.grad, atol=1e-6, rtol=1e-5)


def test_hand_written_backward_passes_pass_gradcheck():
    from align.model.gpt import Rotation, SwiGLU, rope_tables

    torch.manual_seed(0)
    cos, sin = (t.double() for t in rope_tables(8, 5, 10000.0))
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(Rotation.apply, (x, cos, sin))
    assert torch.autograd.gradcheck(Rotation.apply, (x.transpose(1, 2), cos[:, None], sin[:, None]))
    h = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SwiGLU.apply, (h,))


def test_causal_mask_future_tokens_do_not_leak():
    torch.manual_seed(0)
    for fields in (dict(), dict(norm="layernorm", position="learned", mlp="gelu", n_kv_head=4)):
        model = GPT(tiny_config(**fields)).eval()
        idx = torch.randint(0, 512, (1, 20))
        changed = idx.clone()
        changed[0, 12:] = (changed[0, 12:] + 1) % 512
        torch.testing.assert_close(model(idx)[0][:, :12], model(changed)[0][:, :12])


def test_sequence_longer_than_block_size_is_refused():
    model = GPT(tiny_config(block_size=16))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="block_size"):
        model.generate(torch.zeros(1, 10, dtype=torch.long), max_new_tokens=10)


def test_loss_falls_when_overfitting_one_batch():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx = torch.randint(0, 512, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_tied_embeddings_share_storage():
    tied = GPT(tiny_config(tie_embeddings=True))
    assert tied.lm_head.weight.data_ptr() == tied.wte.weight.data_ptr()
    untied = GPT(tiny_config(tie_embeddings=False))
    assert untied.lm_head.weight.data_ptr() != untied.wte.weight.data_ptr()


def test_residual_projections_use_scaled_init():
    torch.manual_seed(0)
    model = GPT(tiny_config(n_layer=8, n_embd=128, intermediate_size=512))
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.blocks[0].mlp.proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.1)
    for block in model.blocks:  # both residual projections of every block: attention's output and the MLP's
        for proj in (block.attn.proj, block.mlp.proj):
            assert proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.1)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx = torch.randint(0, 512, (2, 17))
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.activation_checkpointing = flag
        model(idx[:, :-1], idx[:, 1:])[1].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "fields",
    [dict(), dict(n_kv_head=1), dict(norm="layernorm", position="learned", mlp="gelu", n_kv_head=4, bias=True)],
    ids=["gqa-rope", "mqa", "gpt2"],
)
def test_kv_cache_generation_equals_no_cache(fields):
    torch.manual_seed(0)
    model = GPT(tiny_config(**fields))
    prompt = torch.randint(0, 512, (3, 7))
    greedy = model.generate(prompt, 30, temperature=0)
    assert torch.equal(greedy, model.generate(prompt, 30, temperature=0, use_cache=False))
    sampled = [
        model.generate(prompt, 30, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(3), use_cache=c)
        for c in (True, False)
    ]
    assert torch.equal(*sampled)


def test_cache_prefill_in_chunks_matches_full_forward():
    from align.model import KVCache

    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    idx = torch.randint(0, 512, (2, 24))
    full = model.lm_head(model.hidden_states(idx))
    cache = KVCache(model.config, 2, 24, "cpu", torch.float32)
    first = model.lm_head(model.hidden_states(idx[:, :10], cache, 0))
    second = model.lm_head(model.hidden_states(idx[:, 10:], cache, 10))
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, atol=1e-5, rtol=1e-5)


def test_generation_stops_at_eos_and_pads_finished_rows():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    prompt = torch.randint(0, 512, (2, 5))
    free = model.generate(prompt, 20, temperature=0)
    eos = int(free[0, 7])  # the third generated token of row 0 becomes "eos"
    out = model.generate(prompt, 20, temperature=0, eos_token_id=eos)
    assert out[0, 7] == eos and (out[0, 7:] == eos).all()
    if not (out[1, 5:] == eos).any():
        assert out.shape[1] == free.shape[1]  # row 1 never finished, so generation ran to the end


def test_top_k_one_is_greedy_and_temperature_zero_is_argmax():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    prompt = torch.randint(0, 512, (2, 6))
    greedy = model.generate(prompt, 15, temperature=0)
    topk1 = model.generate(prompt, 15, temperature=1.3, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy, topk1)


def test_top_p_keeps_only_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log().repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    drawn = sample_next_token(logits, temperature=1.0, top_p=0.75, generator=gen)
    # {0, 1} cover 0.8 >= 0.75, so tokens 2 and 3 are outside the nucleus
    assert set(drawn.tolist()) == {0, 1}
    share0 = (drawn == 0).float().mean().item()
    assert share0 == pytest.approx(0.5 / 0.8, abs=0.03)  # renormalised within the nucleus
    assert set(sample_next_token(logits, top_p=0.4, generator=gen).tolist()) == {0}
    assert len(set(sample_next_token(logits, top_p=1.0, generator=gen).tolist())) == 4


@pytest.fixture
def sampled_from(monkeypatch):
    """{"probs": ...}: the distribution the last sample_next_token drew from (torch.multinomial spied on)."""
    seen = {}
    multinomial = torch.multinomial

    def spy(probs, num_samples, generator=None):
        seen["probs"] = probs
        return multinomial(probs, num_samples, generator=generator)

    monkeypatch.setattr(torch, "multinomial", spy)
    return seen


def test_top_p_keeps_the_tokens_transformers_keeps_and_all_of_them_at_one(sampled_from):
    """Over a wide vocabulary with a long tail: the nucleus is transformers' `TopPLogitsWarper`'s, and top_p=1
    filters nothing (a running sum from the top reaches 1.0 in fp32 before the tail's mass is counted)."""
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = torch.randn(64, 512, generator=torch.Generator().manual_seed(0)) * 4
    for top_p in (1.0, 0.9999, 0.99, 0.9, 0.5, 1e-6):
        sample_next_token(logits, top_p=top_p)
        kept = TopPLogitsWarper(top_p)(None, logits.clone()) > float("-inf")
        assert torch.equal(sampled_from["probs"] > 0, kept), top_p
    assert (sampled_from["probs"] > 0).sum(dim=-1).eq(1).all()  # a tiny top_p keeps the top token only
    sample_next_token(logits, top_p=1.0)
    assert (sampled_from["probs"] > 0).all()


def test_top_k_keeps_the_k_most_likely():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]]).repeat(2000, 1)
    drawn = sample_next_token(logits, temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {1, 3}
    # each row is cut at its own k-th logit, not at another row's
    rows = torch.tensor([[0.0, 3.0, 1.0, 2.0], [3.0, 0.0, 1.5, 1.0]]).repeat(1000, 1)
    drawn = sample_next_token(rows, temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(drawn[0::2].tolist()) == {1, 3} and set(drawn[1::2].tolist()) == {0, 2}


def test_temperature_scales_the_logits_before_top_k_and_top_p_cut_them(sampled_from):
    """As transformers' warpers in generate's order (temperature, top-k, top-p): a high temperature flattens the
    distribution, so more tokens make up the nucleus; the tokens kept and their probabilities are the same."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(64, 512, generator=torch.Generator().manual_seed(0)) * 4
    for temperature, top_k, top_p in ((2.0, None, 0.9), (0.5, None, 0.9), (3.0, 50, 0.8), (0.7, 20, None)):
        sample_next_token(logits, temperature=temperature, top_k=top_k, top_p=top_p)
        expected = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k is not None:
            expected = TopKLogitsWarper(top_k)(None, expected)
        if top_p is not None:
            expected = TopPLogitsWarper(top_p)(None, expected)
        got = sampled_from["probs"]
        assert torch.equal(got > 0, expected > float("-inf")), (temperature, top_k, top_p)
        torch.testing.assert_close(got, expected.softmax(dim=-1))


def test_bad_sampling_arguments():
    logits = torch.zeros(1, 4)
    for kwargs, message in ((dict(temperature=-1), "temperature"), (dict(top_k=0), "top_k"),
                            (dict(top_p=1.5), "top_p")):
        with pytest.raises(ValueError, match=message):
            sample_next_token(logits, **kwargs)


def test_bad_generate_arguments_are_refused_up_front_and_keep_training_mode():
    model = GPT(tiny_config()).train()
    idx = torch.randint(0, 512, (1, 4))
    for kwargs, message in ((dict(temperature=-1), "temperature"), (dict(temperature=0, top_k=0), "top_k"),
                            (dict(temperature=0, top_p=1.5), "top_p")):
        with pytest.raises(ValueError, match=message):
            model.generate(idx, 3, **kwargs)
        assert model.training
    with pytest.raises(ValueError, match="batch, time"):
        model.generate(idx[0], 3)
    with pytest.raises(ValueError, match="at least one token per row"):
        model.generate(idx[:, :0], 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(idx, -1)
    with pytest.raises(ValueError, match="at least one row"):
        model.generate(idx[:0], 3)
    for kwargs, message in ((dict(eos_token_id=[]), "eos_token_id"), (dict(temperature=float("nan")), "temperature"),
                            (dict(temperature=float("inf")), "temperature"), (dict(top_k=2.5), "top_k"),
                            (dict(temperature=None), "temperature"), (dict(temperature="1"), "temperature"),
                            (dict(top_p="0.5"), "top_p"), (dict(top_k="2"), "top_k"),
                            (dict(top_k=float("inf")), "top_k"), (dict(top_k=float("nan")), "top_k"),
                            (dict(top_k=[3]), "top_k")):
        with pytest.raises(ValueError, match=message):
            model.generate(idx, 3, **kwargs)
    for bad_length in (True, 2.0, "3", torch.tensor([2])):
        with pytest.raises(ValueError, match="max_new_tokens must be a non-negative integer"):
            model.generate(idx, bad_length)


def test_eos_as_a_tensor_and_a_tiny_temperature_behave():
    import numpy as np

    model = GPT(tiny_config())
    idx = torch.randint(0, 512, (2, 4))
    greedy = model.generate(idx, 6, temperature=0)
    eos = int(greedy[0, 5])
    for same in (torch.tensor(eos), np.int64(eos), [eos]):
        assert torch.equal(model.generate(idx, 6, temperature=0, eos_token_id=same),
                           model.generate(idx, 6, temperature=0, eos_token_id=eos))
    assert model.generate(idx, np.int64(3), temperature=0).shape == model.generate(idx, torch.tensor(3)).shape == (2, 7)
    sampled = model.generate(idx, 6, top_k=5.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, model.generate(idx, 6, top_k=5, generator=torch.Generator().manual_seed(0)))
    # Dividing raw logits by 1e-45 overflows to inf (and inf - inf = NaN in the softmax); it must act as greedy.
    assert torch.equal(model.generate(idx, 6, temperature=1e-45, generator=torch.Generator().manual_seed(0)), greedy)
    for below_fp32 in (1e-46, 1e-300, 5e-324):  # 0 once cast to fp32: the shifted top logit would be 0 / 0 = NaN
        assert torch.equal(model.generate(idx, 6, temperature=below_fp32, generator=torch.Generator().manual_seed(0)),
                           greedy)


def test_generated_tokens_can_be_scored_with_gradients():
    model = GPT(tiny_config())
    out = model.generate(torch.randint(0, 512, (2, 4)), 5, temperature=1.0,
                         generator=torch.Generator().manual_seed(0))
    model.train()
    _, loss = model(out[:, :-1], out[:, 1:])
    loss.backward()
    assert model.wte.weight.grad is not None


def test_generation_may_fill_the_context_exactly():
    """The last new token is never fed back: block_size + 1 tokens in all, as transformers allows."""
    model = GPT(tiny_config(block_size=16))
    out = model.generate(torch.randint(0, 512, (1, 10)), 7, temperature=0)
    assert out.shape == (1, 17)
    assert torch.equal(out, model.generate(out[:, :10], 7, temperature=0, use_cache=False))
    with pytest.raises(ValueError, match="block_size"):
        model.generate(out[:, :10], 8, temperature=0)
