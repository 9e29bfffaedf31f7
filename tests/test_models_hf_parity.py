"""Ports vs Hugging Face PyTorch: logits, left padding, and the export round trip."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.torch import load_file

from hf_reference import hf_logits, left_padded_batch, tiny_hf_model
from pdpo_jax.models import from_pretrained, save_pretrained

CASES = {
    "gpt2": dict(family="gpt2"),
    "llama_mha": dict(family="llama"),
    "mistral_gqa_window": dict(family="mistral", sliding_window=5),
    "qwen2_untied": dict(family="qwen2"),
    "qwen2_tied": dict(family="qwen2", tie_word_embeddings=True),
}


def _ours(model, tokens, mask, positions):
    logits, _ = model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask))
    return np.asarray(logits)


@pytest.fixture(params=sorted(CASES), scope="module")
def case(request, tmp_path_factory):
    spec = dict(CASES[request.param])
    family = spec.pop("family")
    hf = tiny_hf_model(family, **spec)
    folder = tmp_path_factory.mktemp(request.param) / "hf"
    hf.save_pretrained(folder)
    return request.param, hf, folder


@pytest.mark.parametrize("stack_layers", [True, False])
def test_logits_match_hf(case, stack_layers):
    name, hf, folder = case
    model = from_pretrained(folder, stack_layers=stack_layers)
    assert isinstance(model.layers, nnx.List) != stack_layers
    rng = np.random.default_rng(0)
    tokens, mask, positions = left_padded_batch(rng, hf.config.vocab_size, [12, 12])
    np.testing.assert_allclose(_ours(model, tokens, mask, positions), hf_logits(hf, tokens),
                               atol=1e-4, rtol=0, err_msg=name)


def test_left_padded_logits_match_hf(case):
    name, hf, folder = case
    model = from_pretrained(folder)
    rng = np.random.default_rng(1)
    tokens, mask, positions = left_padded_batch(rng, hf.config.vocab_size, [12, 7, 3])
    ours = _ours(model, tokens, mask, positions)
    ref = hf_logits(hf, tokens, mask)
    np.testing.assert_allclose(ours[mask], ref[mask], atol=1e-4, rtol=0, err_msg=name)
    # A padded row must equal the same prompt run alone, unpadded.
    alone = _ours(model, tokens[1:2, 5:], mask[1:2, 5:], positions[1:2, 5:])
    np.testing.assert_allclose(ours[1, 5:], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("stack_layers", [True, False])
def test_export_round_trip_is_bit_identical(case, tmp_path, stack_layers):
    name, hf, folder = case
    model = from_pretrained(folder, stack_layers=stack_layers)
    out = save_pretrained(model, tmp_path / "export")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    original = hf.state_dict()
    exported = reloaded.state_dict()
    assert set(exported) == set(original), name
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), f"{name}: {key} differs after the round trip"
    rng = np.random.default_rng(2)
    tokens, mask, _ = left_padded_batch(rng, hf.config.vocab_size, [10, 6])
    np.testing.assert_allclose(hf_logits(reloaded, tokens, mask)[mask],
                               hf_logits(hf, tokens, mask)[mask], atol=1e-5, rtol=0)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == hf.config.model_type
    if config["model_type"] != "gpt2":
        assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 5000.0
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == hf.config.eos_token_id


def test_sharded_export_has_index_and_reloads(tmp_path):
    hf = tiny_hf_model("llama")
    hf.save_pretrained(tmp_path / "hf")
    model = from_pretrained(tmp_path / "hf")
    out = save_pretrained(model, tmp_path / "export", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    tensors = {}
    for shard in shards:
        tensors.update(load_file(out / shard))
    assert set(tensors) == set(hf.state_dict())
    again = from_pretrained(out)
    rng = np.random.default_rng(3)
    tokens, mask, positions = left_padded_batch(rng, hf.config.vocab_size, [9])
    np.testing.assert_array_equal(_ours(again, tokens, mask, positions),
                                  _ours(model, tokens, mask, positions))


def test_bf16_export_and_load(tmp_path):
    hf = tiny_hf_model("qwen2")
    hf.save_pretrained(tmp_path / "hf")
    model = from_pretrained(tmp_path / "hf")
    out = save_pretrained(model, tmp_path / "bf16", dtype="bfloat16")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    for key, tensor in hf.state_dict().items():
        assert reloaded.state_dict()[key].dtype == torch.bfloat16
        assert torch.equal(reloaded.state_dict()[key], tensor.to(torch.bfloat16)), key
    ours_bf16 = from_pretrained(out, param_dtype="bfloat16", dtype="bfloat16")
    assert ours_bf16.embed_VD[...].dtype == jnp.bfloat16
