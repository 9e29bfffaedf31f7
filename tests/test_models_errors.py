"""Bad checkpoints and configs give one clear ValueError naming the file/key and the fix."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_reference import tiny_hf_model
from pdpo_jax.models import from_pretrained


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    tiny_hf_model("llama").save_pretrained(folder)
    return folder


def _copy(good, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(good, folder)
    return folder


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_missing_config(good, tmp_path):
    folder = _copy(good, tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(ValueError, match=r"config\.json: missing"):
        from_pretrained(folder)


def test_unknown_model_type(good, tmp_path):
    folder = _copy(good, tmp_path)
    _edit_config(folder, model_type="falcon")
    with pytest.raises(ValueError, match=r"config\.json: model_type='falcon' is not supported"):
        from_pretrained(folder)


@pytest.mark.parametrize("changes, key", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_parameters.rope_type"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
])
def test_unsupported_attribute_is_refused_by_name(good, tmp_path, changes, key):
    folder = _copy(good, tmp_path)
    _edit_config(folder, **changes)
    with pytest.raises(ValueError, match=rf"config\.json: {key}=.* is not implemented"):
        from_pretrained(folder)


def test_missing_tensor(good, tmp_path):
    folder = _copy(good, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is missing"):
        from_pretrained(folder)


def test_misshaped_tensor(good, tmp_path):
    folder = _copy(good, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 32)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' "
                                         r"has shape \(8, 32\), but config\.json implies \(32, 32\)"):
        from_pretrained(folder)


def test_unexpected_tensor(good, tmp_path):
    folder = _copy(good, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(32)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"o_proj\.bias.*have no place"):
        from_pretrained(folder)


def test_pickle_needs_opt_in(good, tmp_path):
    folder = _copy(good, tmp_path)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="allow_pickle=True"):
        from_pretrained(folder)
    model = from_pretrained(folder, allow_pickle=True)
    assert model.cfg.num_layers == 2
