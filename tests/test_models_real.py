"""The Llama port on a real checkpoint: SmolLM2-135M-Instruct (30 layers, GQA 9/3, tied, theta 1e5).

Tolerance: over 30 fp32 layers the two frameworks sum in different orders; the logits (max
|logit| ~39) then differ by ~1e-4 absolute, i.e. ~3e-6 relative to the logit scale, which is
the size of fp32 rounding (6e-8 per op) compounded through the depth. We assert 5e-4
absolute (and 2e-5 relative to the scale), plus identical argmax at every position; a real
port bug (a wrong RoPE half, a missing bias, a norm eps) moves logits by 1e-2 or more.
"""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from pdpo_jax.models import from_pretrained, save_pretrained

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def chat_ids(smollm2_dir):
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    msgs = [{"role": "system", "content": "You are a friendly person who loves hiking and has two dogs."},
            {"role": "user", "content": "hi ! what do you like to do on weekends ?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_smollm2_logits_match_transformers(smollm2_dir, chat_ids, tmp_path):
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([chat_ids])).logits.numpy()[0]
    model = from_pretrained(smollm2_dir)
    assert model.cfg.num_kv_heads == 3 and model.cfg.tie_embeddings and model.cfg.rope_theta == 1e5
    n = len(chat_ids)
    logits, _ = model(jnp.asarray([chat_ids]), jnp.arange(n)[None], jnp.ones((1, n), bool))
    ours = np.asarray(logits)[0]
    err = np.abs(ours - ref).max()
    scale = np.abs(ref).max()
    print(f"SmolLM2-135M fp32 logits: max |ours - HF| = {err:.2e}, max |logit| = {scale:.1f}")
    assert err < 5e-4 and err / scale < 2e-5
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))

    # Export: transformers reads our checkpoint back bit-identical.
    out = save_pretrained(model, tmp_path / "export")
    again = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for key, tensor in hf.state_dict().items():
        assert torch.equal(again.state_dict()[key], tensor), key


def test_smollm2_dnli_scores_match_transformers(smollm2_dir):
    """Dialogue-NLI on the real model through the chat template: every candidate of one example,
    scored as the eval stage scores (the prompt's KV cache computed once, the candidates in
    short rows after it), equals HF PyTorch's Σ log p(candidate | prompt) from one full row per
    candidate."""
    from pdpo_jax import data as pdata
    from pdpo_jax.eval.dnli_scoring import score_dnli
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    examples = pdata.read_dnli_files(pdata.default_paths().dnli)
    example = min(examples, key=lambda e: len(" ".join(e.history)))
    result = score_dnli(from_pretrained(smollm2_dir), tok, "chat", [example], batch_size=1,
                        progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    worst = 0.0
    for c in result.scores[::4]:  # every 4th candidate: ~8 HF forwards
        enc = pdata.encode_pair(tok, "chat", example.persona, example.history, c.candidate)
        ids = torch.as_tensor([list(enc.prompt_ids) + list(enc.response_ids)])
        with torch.no_grad():
            logp = torch.log_softmax(hf(input_ids=ids).logits.double(), -1)[0]
        P = len(enc.prompt_ids)
        want = float(logp[P - 1:-1].gather(-1, ids[0, P:, None]).sum())
        worst = max(worst, abs(c.score_sum - want))
        np.testing.assert_allclose(c.score_sum, want, rtol=1e-5, atol=5e-4)
    print(f"SmolLM2 DNLI: max |ours - HF| summed log-prob = {worst:.2e} nats")
