"""Sequence classifiers vs Hugging Face PyTorch: BERT, RoBERTa and the decoders' score heads.

Tiny random HF models built offline (tests/hf_reference.py), fp32, logits within 1e-4 with
padding; the export round trip gives back bit-identical tensors that transformers loads, with
id2label/label2id kept.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from hf_reference import NLI_LABELS, right_padded_pairs, tiny_hf_classifier
from pdpo_jax.errors import UserError
from pdpo_jax.models import from_pretrained, save_pretrained

CASES = {"bert": "bert", "roberta": "roberta", "llama_cls": "llama", "gpt2_cls": "gpt2"}
ENCODERS = ("bert", "roberta")


@pytest.fixture(params=sorted(CASES), scope="module")
def case(request, tmp_path_factory):
    hf = tiny_hf_classifier(CASES[request.param])
    folder = tmp_path_factory.mktemp(request.param) / "hf"
    hf.save_pretrained(folder)
    return request.param, hf, folder


def _batch(hf, lengths, seed):
    """Right-padded rows; token types only where the model has two segments."""
    rng = np.random.default_rng(seed)
    tokens, mask, positions, types = right_padded_pairs(rng, hf.config.vocab_size, lengths,
                                                        pad_id=hf.config.pad_token_id)
    if getattr(hf.config, "type_vocab_size", 0) < 2:
        types = np.zeros_like(types)
    return tokens, mask, positions, types


def _hf(hf, tokens, mask, positions, types, name):
    kwargs = dict(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                  attention_mask=torch.as_tensor(mask, dtype=torch.long))
    if name in ENCODERS:  # BERT counts positions 0..T-1, RoBERTa from the pad id: both default
        kwargs["token_type_ids"] = torch.as_tensor(types, dtype=torch.long)
    else:
        kwargs["position_ids"] = torch.as_tensor(positions, dtype=torch.long)
    with torch.no_grad():
        return hf(**kwargs).logits.float().numpy()


@jax.jit
def _classify(graphdef, params, tokens, mask, positions, types):
    return nnx.merge(graphdef, params).classify(tokens, positions, mask, types)


def _ours(model, tokens, mask, positions, types):
    graphdef, params = nnx.split(model)
    return np.asarray(_classify(graphdef, params, *map(jnp.asarray, (tokens, mask, positions, types))))


def test_classifier_logits_match_hf_with_padding(case):
    name, hf, folder = case
    model = from_pretrained(folder)
    assert model.cfg.labels == NLI_LABELS
    batch = _batch(hf, [12, 7, 3], seed=0)
    ours = _ours(model, *batch)
    assert ours.shape == (3, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, _hf(hf, *batch, name), atol=1e-4, rtol=0, err_msg=name)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_unstacked_layers_classify_alike(family, tmp_path):
    """One module per layer (the Python loop over layers) gives the stacked model's logits."""
    hf = tiny_hf_classifier(family)
    hf.save_pretrained(tmp_path)
    stacked, unstacked = from_pretrained(tmp_path), from_pretrained(tmp_path, stack_layers=False)
    assert isinstance(unstacked.layers, nnx.List)
    batch = _batch(hf, [9, 4], seed=4)
    np.testing.assert_allclose(_ours(unstacked, *batch), _ours(stacked, *batch), atol=1e-5, rtol=0)


def test_padding_does_not_change_a_row(case):
    """A padded row classifies as the same row alone without padding."""
    name, hf, folder = case
    model = from_pretrained(folder)
    tokens, mask, positions, types = _batch(hf, [12, 5], seed=1)
    padded = _ours(model, tokens, mask, positions, types)
    alone = _ours(model, tokens[1:2, :5], mask[1:2, :5], positions[1:2, :5], types[1:2, :5])
    np.testing.assert_allclose(padded[1], alone[0], atol=1e-5, rtol=0, err_msg=name)


def test_decoder_classifier_left_padding_matches_hf(case):
    """Decoders pool the last real token, so left padding (positions from each row's first real
    token) gives HF's logits too."""
    name, hf, folder = case
    if name in ENCODERS:
        pytest.skip("encoders pool the first token of right-padded rows")
    model = from_pretrained(folder)
    tokens, mask, positions, types = _batch(hf, [9, 4], seed=2)
    tokens, mask = tokens[:, ::-1].copy(), mask[:, ::-1].copy()
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    np.testing.assert_allclose(_ours(model, tokens, mask, positions, types),
                               _hf(hf, tokens, mask, positions, types, name), atol=1e-4, rtol=0)


def test_classifier_export_round_trip_is_bit_identical(case, tmp_path):
    name, hf, folder = case
    model = from_pretrained(folder)
    out = save_pretrained(model, tmp_path / "export")
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(
        out, attn_implementation="eager")
    assert type(reloaded) is type(hf), name
    original, exported = hf.state_dict(), reloaded.state_dict()
    assert set(exported) == set(original), name
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), f"{name}: {key} differs after the round trip"
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {str(i): label for i, label in enumerate(NLI_LABELS)}
    assert config["label2id"] == {label: i for i, label in enumerate(NLI_LABELS)}
    assert reloaded.config.pad_token_id == hf.config.pad_token_id
    assert not (out / "generation_config.json").exists()
    batch = _batch(hf, [10, 6], seed=3)
    np.testing.assert_allclose(_hf(reloaded, *batch, name), _hf(hf, *batch, name), atol=0, rtol=0)


def test_encoder_without_classification_head_is_refused(tmp_path):
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=4, intermediate_size=64)
    transformers.BertForMaskedLM(cfg).save_pretrained(tmp_path)
    with pytest.raises(UserError, match=r"architectures=\['BertForMaskedLM'\] is not implemented.*"
                                        r"only BertForSequenceClassification is ported"):
        from_pretrained(tmp_path)
