"""Hugging Face export and import: logits and greedy-generation parity, round trips, the exported directory."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    pipeline,
)

from align.model import GPT, export, from_hf, load_checkpoint, save_checkpoint, to_hf
from conftest import tiny_config

LLAMA = dict(norm="rmsnorm", position="rope", mlp="swiglu")
GPT2 = dict(norm="layernorm", position="learned", mlp="gelu")
CASES = {
    "llama-gqa-tied": dict(**LLAMA, n_kv_head=2, tie_embeddings=True),
    "llama-gqa-untied": dict(**LLAMA, n_kv_head=2, tie_embeddings=False),
    "llama-mha-bias": dict(**LLAMA, n_kv_head=4, bias=True, rope_theta=500000.0, norm_eps=1e-6),
    "llama-mqa": dict(**LLAMA, n_kv_head=1, tie_embeddings=False, intermediate_size=96),
    "gpt2-tied-bias": dict(**GPT2, n_kv_head=4, tie_embeddings=True, bias=True),
    "gpt2-untied-nobias": dict(**GPT2, n_kv_head=4, tie_embeddings=False, bias=False, norm_eps=1e-6),
}


def randomized(config_fields, seed=0):
    """A GPT whose norms and biases are random too, so that a mapping mistake cannot hide behind ones/zeros."""
    torch.manual_seed(seed)
    model = GPT(tiny_config(**config_fields))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_logits_parity_with_exported_model(case):
    model = randomized(CASES[case])
    hf = to_hf(model)
    assert type(hf) is (GPT2LMHeadModel if case.startswith("gpt2") else LlamaForCausalLM)
    idx = torch.randint(0, 512, (3, 50))
    with torch.no_grad():
        diff = (model(idx)[0] - hf(idx).logits).abs().max().item()
    assert diff <= 1e-4
    assert hf.config.tie_word_embeddings == model.config.tie_embeddings


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_training_gradients_match_exported_model(case):
    """The same loss gives the same gradient for every weight (the RoPE and SwiGLU backward passes are ours)."""
    model = randomized(CASES[case]).train()
    hf = to_hf(model).train()
    idx = torch.randint(0, 512, (3, 41))
    model(idx[:, :-1], idx[:, 1:], return_logits=False)[1].backward()
    hf(input_ids=idx, labels=idx).loss.backward()
    ours = {name: p.grad for name, p in model.named_parameters()}
    as_hf = _hf_state_dict_of_grads(model, ours)
    for name, p in hf.named_parameters():
        if name.endswith(".bias") and not model.config.bias:
            continue  # GPT-2 always has biases; a bias-free GPT exports them as zeros that it never trains
        torch.testing.assert_close(as_hf[name], p.grad, atol=1e-6, rtol=1e-4, msg=f"gradient of {name}")


def _hf_state_dict_of_grads(model, grads):
    """Our gradients under HF's parameter names, through the export's own weight mapping."""
    from align.model.hf import _hf_state_dict

    with torch.no_grad():
        saved = {name: p.detach().clone() for name, p in model.named_parameters()}
        for name, p in model.named_parameters():
            p.copy_(grads[name])
        mapped = _hf_state_dict(model)
        mapped = {name: t.clone() for name, t in mapped.items()}
        for name, p in model.named_parameters():
            p.copy_(saved[name])
    return mapped


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_greedy_generation_matches_transformers(case):
    model = randomized(CASES[case], seed=1)
    hf = to_hf(model)
    prompt = torch.randint(2, 512, (1, 9))  # never the pad id: HF's generate masks pad tokens in a prompt out
    ours = model.generate(prompt, max_new_tokens=40, temperature=0)
    theirs = hf.generate(prompt, max_new_tokens=40, do_sample=False, pad_token_id=1, eos_token_id=None)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("case", ["llama-gqa-tied", "gpt2-tied-bias"])
def test_batched_greedy_generation_with_eos_and_pad_matches_transformers(case):
    """A row that finishes early is padded with pad_token_id while the other goes on, as in HF generate."""
    model = randomized(CASES[case], seed=2)
    with torch.no_grad():  # larger weights than the init's, so that greedy text does not repeat one token
        for p in model.parameters():
            p.mul_(10.0) if p.dim() > 1 else None
    hf = to_hf(model)
    torch.manual_seed(3)
    prompt = torch.randint(2, 512, (2, 6))  # never the pad id (1)
    free = model.generate(prompt, 12, temperature=0)[:, 6:]
    # eos: the first token that row 0 emits at some step j >= 1 and neither row emitted before, so row 0 stops first
    j = next(j for j in range(1, 8) if free[0, j].item() not in free[0, :j].tolist() + free[1, : j + 1].tolist())
    eos = free[0, j].item()
    ours = model.generate(prompt, 12, temperature=0, eos_token_id=eos, pad_token_id=1)
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=1)
    assert torch.equal(ours, theirs)
    assert ours[0, 6 + j + 1 :].eq(1).all() and not ours[1, 6 + j + 1 :].eq(1).all()


def test_to_hf_leaves_the_model_as_it_was():
    model = randomized(CASES["llama-gqa-tied"]).to(torch.bfloat16)
    hf = to_hf(model)
    assert model.wte.weight.dtype == torch.bfloat16 and hf.model.embed_tokens.weight.dtype == torch.float32


@pytest.mark.parametrize("case", ["llama-gqa-tied", "llama-mha-bias"])  # the second: rope_theta 500000
def test_rope_tables_stay_exact_through_a_bf16_round_trip(case):
    """model.bfloat16().float() must not leave the RoPE tables rounded: transformers recomputes them in fp32
    (remade with the model's own rope_theta, not the default)."""
    model = randomized(CASES[case])
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())  # weights that survive the round trip exactly
    reference = model(torch.arange(64)[None] % 512)[0].detach()
    model.to(torch.bfloat16).float()
    idx = torch.arange(64)[None] % 512
    with torch.no_grad():
        assert torch.equal(model(idx)[0], reference)
        assert (model(idx)[0] - to_hf(model)(idx).logits).abs().max().item() <= 1e-4
    with torch.inference_mode():  # an eval helper's .to(): the tables must stay ordinary tensors
        model.to("cpu")
    model(idx, idx)[1].backward()


def test_a_compiled_model_exports_and_saves_like_the_model(tmp_path):
    model = randomized(CASES["llama-gqa-tied"])
    compiled = torch.compile(model)  # a wrapper whose state_dict keys carry `_orig_mod.`; nothing compiles here
    idx = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert (model(idx)[0] - to_hf(compiled)(idx).logits).abs().max().item() <= 1e-4
    save_checkpoint(compiled, tmp_path / "ckpt")
    torch.testing.assert_close(load_checkpoint(tmp_path / "ckpt")(idx)[0], model(idx)[0].detach())


def test_dropout_that_transformers_cannot_express_is_warned_about():
    with pytest.warns(UserWarning, match="attention dropout only"):
        to_hf(randomized(dict(dropout=0.1)))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.1, attn_pdrop=0.1))
    with pytest.warns(UserWarning, match="takes resid_pdrop"):
        assert from_hf(gpt2).config.dropout == 0.0


def test_round_trip_from_transformers_llama_and_gpt2():
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=96, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 20000.0}, bos_token_id=0, eos_token_id=0,
    )).eval()
    gpt2 = GPT2LMHeadModel(GPT2Config(
        vocab_size=300, n_positions=96, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0,
        layer_norm_epsilon=1e-6,
    )).eval()
    idx = torch.randint(0, 300, (2, 40))
    for hf in (llama, gpt2):
        ours = from_hf(hf)
        with torch.no_grad():
            assert (ours(idx)[0] - hf(idx).logits).abs().max().item() <= 1e-4
        back = to_hf(ours)
        for key, value in hf.state_dict().items():
            if key in back.state_dict():
                torch.testing.assert_close(back.state_dict()[key], value, atol=0, rtol=0)
    assert from_hf(llama).config.rope_theta == 20000.0 and from_hf(llama).config.n_kv_head == 2
    assert from_hf(llama).config.norm_eps == from_hf(gpt2).config.norm_eps == 1e-6


def test_unexpressible_configs_are_refused():
    for fields in (dict(norm="layernorm", position="rope", mlp="swiglu"), dict(**GPT2, n_kv_head=2),
                   dict(norm="rmsnorm", position="learned", mlp="gelu")):
        with pytest.raises(ValueError, match="no transformers class"):
            to_hf(GPT(tiny_config(**fields)))
    scaled = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                 "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="rope_type"):
        from_hf(LlamaForCausalLM(scaled))
    from transformers import LlamaModel

    with pytest.raises(ValueError, match="from_hf needs a LlamaForCausalLM .* got LlamaModel"):
        from_hf(LlamaModel(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4)))


def test_from_hf_refuses_weights_it_would_drop_and_unmerged_adapters():
    small = dict(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    with pytest.raises(ValueError, match="add_cross_attention"):
        from_hf(GPT2LMHeadModel(GPT2Config(**small, add_cross_attention=True)))
    gpt2 = GPT2LMHeadModel(GPT2Config(**small))
    gpt2.transformer.h[0].register_parameter("extra", torch.nn.Parameter(torch.zeros(3)))  # a part we cannot hold
    with pytest.raises(ValueError, match=r"1 weights our GPT cannot hold \(e.g. transformer.h.0.extra\)"):
        from_hf(gpt2)
    del gpt2.transformer.h[0].extra
    del gpt2.transformer.h[0].ln_2.bias
    with pytest.raises(ValueError, match=r"no weight 'transformer.h.0.ln_2.bias'"):
        from_hf(gpt2)

    from peft import LoraConfig, get_peft_model

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4))
    lora = get_peft_model(llama, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    for wrapped in (lora, lora.get_base_model()):
        with pytest.raises(ValueError, match=r"LoRA adapters attached; merge them .*merge_and_unload"):
            from_hf(wrapped)
    merged = lora.merge_and_unload()
    assert (from_hf(merged)(torch.arange(8)[None])[0] - merged(torch.arange(8)[None]).logits).abs().max() < 1e-4

    with torch.device("meta"):
        on_meta = LlamaForCausalLM(llama.config)
    with pytest.raises(ValueError, match="meta device"):
        from_hf(on_meta)


def test_from_hf_refuses_a_tied_config_whose_head_differs_and_an_align_checkpoint(tmp_path):
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, tie_word_embeddings=True))
    llama.lm_head.weight = torch.nn.Parameter(llama.lm_head.weight.detach() + 0.5)  # untied, the flag left as it was
    with pytest.raises(ValueError, match="tie_word_embeddings=True but its lm_head differs"):
        from_hf(llama)
    llama.config.tie_word_embeddings = False
    with torch.no_grad():
        assert (from_hf(llama)(torch.arange(8)[None])[0] - llama(torch.arange(8)[None]).logits).abs().max() < 1e-4
    save_checkpoint(GPT(tiny_config()), tmp_path / "ckpt")
    with pytest.raises(ValueError, match="an align checkpoint.*load_checkpoint"):
        from_hf(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        from_hf(tmp_path / "nowhere")


def test_from_hf_takes_swish_for_silu_and_warns_about_attention_dropout():
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      hidden_act="swish", attention_dropout=0.1)
    llama = LlamaForCausalLM(cfg).eval()
    with pytest.warns(UserWarning, match="attention_dropout=0.1: our model has one dropout rate"):
        ours = from_hf(llama)
    idx = torch.arange(10)[None]
    with torch.no_grad():
        assert (ours(idx)[0] - llama(idx).logits).abs().max() <= 1e-4


def test_export_of_a_one_token_context_model_loads(tmp_path, tiny_tokenizer):
    """The generation config's default length is half the context, and at least one token."""
    model = GPT(tiny_config(vocab_size=len(tiny_tokenizer), block_size=1))
    export(model, tiny_tokenizer, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.generation_config.max_new_tokens == 1


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def exported(request, tmp_path_factory, tiny_tokenizer):
    fields = dict(tie_embeddings=True) if request.param == "llama" else dict(**GPT2, n_kv_head=4, bias=True)
    model = randomized(fields)
    out = tmp_path_factory.mktemp("export") / request.param
    export(model, tiny_tokenizer, out)
    return model, out


def test_exported_directory_contents(exported, tiny_tokenizer):
    _, out = exported
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md"} <= names
    assert not any(n.endswith(".bin") for n in names)
    config = json.loads((out / "config.json").read_text())
    assert config["pad_token_id"] == tiny_tokenizer.pad_token_id != config["eos_token_id"]
    assert config["eos_token_id"] == tiny_tokenizer.eos_token_id
    assert config["bos_token_id"] == tiny_tokenizer.bos_token_id
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tiny_tokenizer.eos_token_id
    # The saved tokenizer knows the context (truncation=True cuts there); the caller's tokenizer is unchanged.
    model, _ = exported
    assert AutoTokenizer.from_pretrained(out).model_max_length == model.config.block_size
    assert tiny_tokenizer.model_max_length != model.config.block_size
    assert generation["pad_token_id"] == tiny_tokenizer.pad_token_id
    assert generation["bos_token_id"] == tiny_tokenizer.bos_token_id


def test_exported_directory_loads_as_causal_lm_with_same_logits(exported):
    model, out = exported
    hf = AutoModelForCausalLM.from_pretrained(out)
    idx = torch.randint(0, 512, (2, 30))
    with torch.no_grad():
        assert (model(idx)[0] - hf(idx).logits).abs().max().item() <= 1e-4


def test_exported_directory_loads_as_reward_model(exported, tiny_tokenizer):
    _, out = exported
    rm = AutoModelForSequenceClassification.from_pretrained(out, num_labels=1)
    batch = tiny_tokenizer(["<|user|>hi<|assistant|>yes<|endoftext|>", "short"], padding=True, return_tensors="pt")
    with torch.no_grad():
        scores = rm(**batch).logits
    assert scores.shape == (2, 1) and torch.isfinite(scores).all()


def test_exported_directory_generates_through_pipeline_with_chat_template(exported):
    _, out = exported
    generate = pipeline("text-generation", model=str(out), device="cpu")
    result = generate([{"role": "user", "content": "What is 2 + 3?"}], max_new_tokens=8, do_sample=False)
    chat = result[0]["generated_text"]
    assert chat[0]["content"] == "What is 2 + 3?" and chat[-1]["role"] == "assistant"
    text = generate("To be, or not", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("To be, or not")


def test_export_refuses_non_empty_directory_and_keeps_it(tmp_path, tiny_tokenizer):
    out = tmp_path / "model"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    model = GPT(tiny_config())
    with pytest.raises(FileExistsError, match="--overwrite"):
        export(model, tiny_tokenizer, out)
    assert (out / "precious.txt").read_text() == "keep me"
    export(model, tiny_tokenizer, out, overwrite=True)
    assert (out / "config.json").is_file() and not (out / "precious.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary directories left behind


def test_a_failed_export_leaves_no_temporary_directory_and_a_symlink_keeps_pointing_at_the_export(
        tmp_path, tiny_tokenizer, monkeypatch):
    model = GPT(tiny_config())
    out = tmp_path / "model"
    with pytest.raises(FileNotFoundError):  # an extra file in a directory that does not exist: fails mid-write
        export(model, tiny_tokenizer, out, extra_files={"missing/notes.txt": "x"})
    assert list(tmp_path.iterdir()) == []
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for kind in ("tmp", "old"):  # what an export killed part-way left, by a process no longer running
        (tmp_path / f".model.{kind}-{dead.stdout.strip()}").mkdir()
    (tmp_path / f".model.tmp-{os.getppid()}").mkdir()  # a running process's: not touched
    export(model, tiny_tokenizer, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".model.tmp-{os.getppid()}", "model"]
    for p in tmp_path.iterdir():
        shutil.rmtree(p)

    target, link = tmp_path / "real", tmp_path / "link"
    export(model, tiny_tokenizer, target)
    link.symlink_to(target, target_is_directory=True)
    (target / "old.txt").write_text("replaced")
    assert export(model, tiny_tokenizer, link, overwrite=True) == link
    assert link.is_symlink() and (link / "config.json").is_file() and not (target / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]

    from align.cli import export_main
    from align.model import hf as hf_module

    save_checkpoint(model, tmp_path / "run" / "checkpoints" / "step-000001")
    tiny_tokenizer.save_pretrained(tmp_path / "run" / "tokenizer")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf_module, "_set_model_max_length", disk_full)
    assert export_main([str(tmp_path / "run" / "checkpoints" / "step-000001"), "--out", str(tmp_path / "x")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real", "run"]


def test_export_refuses_tokenizer_without_distinct_pad(tmp_path, tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token = tok.eos_token
    with pytest.raises(ValueError, match="pad token distinct from eos"):
        export(GPT(tiny_config()), tok, tmp_path / "m")
    with pytest.raises(ValueError, match="vocab_size"):
        export(GPT(tiny_config(vocab_size=100)), tiny_tokenizer, tmp_path / "m")


def test_checkpoint_round_trip_and_export_command(tmp_path, tiny_tokenizer):
    model = randomized(dict(tie_embeddings=True))
    ckpt = tmp_path / "run" / "checkpoints" / "step-000010"
    save_checkpoint(model, ckpt)
    tiny_tokenizer.save_pretrained(tmp_path / "run" / "tokenizer")
    loaded = load_checkpoint(ckpt)
    idx = torch.randint(0, 512, (1, 20))
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0])
    assert loaded.lm_head.weight.data_ptr() == loaded.wte.weight.data_ptr()
    result = subprocess.run(
        [sys.executable, "-m", "align.cli", "export", str(ckpt), "--out", str(tmp_path / "hf")],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)[0]).abs().max().item() <= 1e-4
    with pytest.raises(FileNotFoundError, match="gpt_config.json"):
        load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="step-000200: no such checkpoint directory .* holds step-000010"):
        load_checkpoint(ckpt.parent / "step-000200")  # a step that was never saved, or was pruned


def test_export_command_bad_input_is_a_clear_error_without_traceback(tmp_path, tiny_tokenizer):
    model = randomized(dict(tie_embeddings=True))
    ckpt = tmp_path / "run" / "checkpoints" / "step-000010"
    save_checkpoint(model, ckpt)
    tiny_tokenizer.save_pretrained(tmp_path / "run" / "tokenizer")
    (ckpt / "model.safetensors").write_bytes(b"garbage")
    corrupt = subprocess.run([sys.executable, "-m", "align.cli", "export", str(ckpt), "--out", str(tmp_path / "a")],
                             capture_output=True, text=True)
    missing_tok = subprocess.run([sys.executable, "-m", "align.cli", "export", str(ckpt), "--out",
                                  str(tmp_path / "b"), "--tokenizer", str(tmp_path / "nowhere")],
                                 capture_output=True, text=True)
    save_checkpoint(model, ckpt)
    (tmp_path / "run" / "tokenizer" / "tokenizer.json").write_text("{garbage")
    bad_tok = subprocess.run([sys.executable, "-m", "align.cli", "export", str(ckpt), "--out", str(tmp_path / "c")],
                             capture_output=True, text=True)
    (ckpt / "gpt_config.json").write_text("null")
    null_config = subprocess.run([sys.executable, "-m", "align.cli", "export", str(ckpt), "--out",
                                  str(tmp_path / "d")], capture_output=True, text=True)
    for result, needle in ((corrupt, "model.safetensors does not hold the weights"), (missing_tok, "nowhere"),
                           (bad_tok, "cannot load the tokenizer in"), (null_config, "gpt_config.json: expected")):
        assert result.returncode == 2 and needle in result.stderr and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("align export: error:"), result.stderr
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_export_warns_of_a_tokenizer_other_than_the_runs_and_memory_is_not_corruption(tmp_path, tiny_tokenizer,
                                                                                    capsys, monkeypatch):
    from align.cli import export_main
    from align.model import hf as hf_module
    from align.tokenizer import train_tokenizer

    model = randomized(dict(tie_embeddings=True))
    ckpt = tmp_path / "run" / "checkpoints" / "step-000010"
    save_checkpoint(model, ckpt)
    tiny_tokenizer.save_pretrained(tmp_path / "run" / "tokenizer")
    tiny_tokenizer.save_pretrained(tmp_path / "copy")
    train_tokenizer(["the cat sat on the mat"] * 50, vocab_size=300).save_pretrained(tmp_path / "other")
    assert export_main([str(ckpt), "--out", str(tmp_path / "a"), "--tokenizer", str(tmp_path / "copy")]) == 0
    assert "warning" not in capsys.readouterr().err  # the same tokenizer, elsewhere
    assert export_main([str(ckpt), "--out", str(tmp_path / "b"), "--tokenizer", str(tmp_path / "other")]) == 0
    assert "is not the tokenizer of the run this checkpoint comes from" in capsys.readouterr().err

    def no_memory(*args, **kwargs):
        raise OSError("unable to mmap model.safetensors: Cannot allocate memory (12)")

    monkeypatch.setattr(hf_module, "load_model", no_memory)
    assert export_main([str(ckpt), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "not enough memory to load" in err and "the file may be fine" in err and "corrupt" not in err


def test_export_command_keeps_what_it_would_replace(tmp_path, tiny_tokenizer, capsys):
    """--overwrite moves the old export aside; an --out that holds the checkpoint itself is refused."""
    from align.cli import export_main

    model = randomized(dict(tie_embeddings=True))
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints" / "step-000010"
    save_checkpoint(model, ckpt)
    tiny_tokenizer.save_pretrained(run_dir / "tokenizer")
    other = run_dir / "checkpoints" / "step-000020"
    save_checkpoint(model, other)
    for out, message in ((run_dir, "holds the checkpoint"), (ckpt, "holds the checkpoint"),
                         (other, "is a pretraining checkpoint"), (".", "the current directory")):
        with pytest.raises(SystemExit) as exit_info:
            export_main([str(ckpt), "--out", str(out), "--overwrite"])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "tokenizer"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000010", "step-000020"]

    out = tmp_path / "hf"
    assert export_main([str(ckpt), "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    assert export_main([str(ckpt), "--out", str(out), "--overwrite"]) == 0
    backups = list(tmp_path.glob("hf.old-*"))
    assert len(backups) == 1 and (backups[0] / "notes.txt").read_text() == "mine"
    assert (out / "model.safetensors").is_file() and not (out / "notes.txt").exists()

    with pytest.raises(ValueError, match="is a Hugging Face directory"):
        load_checkpoint(out)
    idx = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(from_hf(out)(idx)[0], model(idx)[0], atol=1e-5, rtol=1e-5)


def test_export_command_refuses_before_moving_the_old_export_aside(tmp_path, tiny_tokenizer, capsys):
    """A model (or tokenizer) export would refuse leaves --out as it was, not moved aside for an empty directory."""
    from align.cli import export_main

    run_dir, out = tmp_path / "run", tmp_path / "hf"
    tiny_tokenizer.save_pretrained(run_dir / "tokenizer")
    save_checkpoint(GPT(tiny_config()), run_dir / "checkpoints" / "step-000010")
    assert export_main([str(run_dir / "checkpoints" / "step-000010"), "--out", str(out)]) == 0
    before = sorted(p.name for p in out.iterdir())
    for name, fields in (("step-000020", dict(norm="layernorm")), ("step-000030", dict(vocab_size=300))):
        save_checkpoint(GPT(tiny_config(**fields)), run_dir / "checkpoints" / name)
        assert export_main([str(run_dir / "checkpoints" / name), "--out", str(out), "--overwrite"]) == 2
        assert "align export: error:" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before and not list(tmp_path.glob("hf.old-*"))
