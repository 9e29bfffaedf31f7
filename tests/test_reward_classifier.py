"""The NLI classifier's train step: it follows HF BERT + torch Adam step for step, it learns a
rule-generated task, and the sharded (8 fake devices) and accumulated steps equal the plain one."""
import functools

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from pdpo_jax import sharding
from pdpo_jax.config import OptimizerConfig
from pdpo_jax.data.batches import EncodedText, classification_batch
from pdpo_jax.models import ModelConfig, from_pretrained
from pdpo_jax.reward.classifier import cross_entropy, make_classifier_eval, make_classifier_step
from pdpo_jax.train import optim, state as st

LABELS = ("entailment", "neutral", "contradiction")
# Token ids of a tiny rule-generated NLI language: [CLS] I HAVE obj [SEP] hypothesis [SEP].
PAD, CLS, SEP, I, HAVE, OWN, LIKE, DO, NOT, OBJ = range(10)
VOCAB, OBJECTS = 24, range(OBJ, 24)
CFG = ModelConfig(arch="bert", hf_model_type="bert", vocab_size=VOCAB, d_model=32, num_layers=2,
                  num_heads=4, num_kv_heads=4, head_dim=8, mlp_dim=64, norm_eps=1e-12,
                  max_positions=16, type_vocab_size=2, labels=LABELS, pad_token_id=PAD)


def _example(rng) -> EncodedText:
    """Premise "I have X"; entailment "I have/own X", contradiction "I do not have X", neutral
    "I like Y"."""
    label = int(rng.integers(3))
    obj, other = rng.choice(OBJECTS, 2, replace=False)
    hypothesis = {0: [I, int(rng.choice([HAVE, OWN])), obj], 1: [I, LIKE, other],
                  2: [I, DO, NOT, HAVE, obj]}[label]
    ids = [CLS, I, HAVE, obj, SEP, *hypothesis, SEP]
    return EncodedText(np.asarray(ids, np.int32), np.asarray([0] * 5 + [1] * (len(ids) - 5), np.int32),
                       label)


def _batch(seed: int, rows: int, A: int = 1, padding_rows: int = 2) -> dict:
    """A classification batch [A, rows/A, ...] of rule-generated pairs (the last rows padding)."""
    rng = np.random.default_rng(seed)
    examples = [_example(rng) for _ in range(rows - padding_rows)] + [None] * padding_rows
    batch = classification_batch(examples, 12, PAD)
    return {k: v.reshape(A, rows // A, *v.shape[1:]) for k, v in batch.items() if k != "index"}


LEARN = OptimizerConfig(lr=3e-3, warmup_ratio=0.1, schedule="constant", weight_decay=0.0)


def _setup(mesh_shape=(1, 1, 1), opt=LEARN, total=100, cfg=CFG, params=None):
    mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
    graphdef, init = st.init_params(cfg, mesh, seed=0)
    tx, lr = optim.make_optimizer(opt, total)
    state, state_sh = st.create_state(init if params is None else params, tx, mesh)
    step = st.jit_sft_step(make_classifier_step(graphdef, tx, lr), state_sh, mesh)
    return mesh, graphdef, state, step


def test_cross_entropy_against_numpy():
    logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [5.0, 5.0, 5.0]], np.float32)
    labels = np.array([0, 2, -1], np.int32)
    nll, valid = cross_entropy(logits, labels)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(nll), [-logp[0, 0], -logp[1, 2], 0.0], rtol=1e-6)
    assert np.asarray(valid).tolist() == [True, True, False]


def test_bert_training_follows_torch_step_for_step(tmp_path):
    """20 Adam steps of our BERT classifier step from HF's initialisation give torch's losses
    and weights (BertForSequenceClassification, torch.optim.Adam, no dropout). Later the two
    part: a post-LN BERT this small sits on a plateau where fp32 rounding decides when it
    leaves (seen at step ~75), so the comparison stops before."""
    torch.manual_seed(0)
    hf_cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=16, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, pad_token_id=PAD,
                                     id2label=dict(enumerate(LABELS)))
    hf = transformers.BertForSequenceClassification(hf_cfg)
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    opt = OptimizerConfig(lr=1e-3, warmup_ratio=0.0, schedule="constant", weight_decay=0.0, clip_norm=1e9)
    mesh, graphdef, state, step = _setup(opt=opt, total=20, cfg=model.cfg, params=nnx.split(model)[1])
    torch_opt = torch.optim.Adam(hf.parameters(), lr=1e-3)
    for k in range(20):
        batch = _batch(k, 32, padding_rows=0)
        state, metrics = step(state, st.shard_batch(batch, mesh))
        b = {key: torch.as_tensor(v[0], dtype=torch.long) for key, v in batch.items()}
        out = hf(input_ids=b["tokens"], attention_mask=b["attention_mask"],
                 token_type_ids=b["token_types"], labels=b["labels"])
        torch_opt.zero_grad()
        out.loss.backward()
        torch_opt.step()
        np.testing.assert_allclose(float(metrics["loss"]), out.loss.item(), rtol=1e-5, err_msg=f"step {k}")
    ours = nnx.merge(graphdef, jax.device_get(state.params))
    want = hf.bert.encoder.layer[1].attention.self.query.weight.detach().numpy()
    got = np.asarray(ours.layers.attn.q_DNH[...][1]).reshape(32, 32).T
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(np.asarray(ours.classifier_DC[...]).T,
                               hf.classifier.weight.detach().numpy(), atol=2e-5)


def test_classifier_learns_rule_generated_nli():
    """A pre-norm classifier (Llama family) reaches ≥ 95% dev accuracy on every class within 100
    steps of 30 pairs (seconds). The task's cues are lexical, as the substitute set's largely
    are; it checks that data, step, optimizer and head learn. (The post-LN BERT of the same
    size lingers on a plateau here for hundreds of steps, as HF's does: see the test above.)"""
    cfg = ModelConfig(arch="llama", vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4,
                      num_kv_heads=4, head_dim=8, mlp_dim=64, norm_eps=1e-5, max_positions=16,
                      labels=LABELS, pad_token_id=PAD)
    mesh, graphdef, state, step = _setup(total=100, cfg=cfg)
    losses = []
    for k in range(100):
        state, metrics = step(state, st.shard_batch(_batch(k, 32), mesh))
        losses.append(float(metrics["loss"]))
    dev = {k: v[0] for k, v in _batch(10_000, 256).items()}
    out = jax.device_get(jax.jit(make_classifier_eval(graphdef, 3))(state.params, dev))
    per_class = out["correct_C"] / out["count_C"]
    assert out["count_C"].sum() == 254  # the padding rows are not counted
    assert np.mean(losses[-10:]) < 0.1 * losses[0]
    assert per_class.min() >= 0.95, per_class


@functools.cache
def _one_device_run():
    return _run((1, 1, 1), A=1)


def _run(mesh_shape, A):
    opt = OptimizerConfig(lr=1e-2, warmup_ratio=0.0, schedule="constant", eps=1e-3)  # see test_train_steps
    mesh, _, state, step = _setup(mesh_shape, opt=opt, total=10)
    history = []
    for k in range(2):
        state, metrics = step(state, st.shard_batch(_batch(k, 16, A), mesh))
        history.append({key: float(v) for key, v in jax.device_get(metrics).items()})
    return history, jax.device_get(state.params)


# fp32 on CPU: sharded matmuls reduce partial sums in another order (test_train_steps.py).
@pytest.mark.parametrize("mesh_shape, A", [((2, 2, 2), 1), ((1, 1, 1), 2)])
def test_sharded_and_accumulated_steps_equal_one_device(mesh_shape, A):
    ref_history, ref_params = _one_device_run()
    history, params = _run(mesh_shape, A)
    for key in ("loss", "accuracy", "examples", "grad_norm"):
        np.testing.assert_allclose([h[key] for h in history], [h[key] for h in ref_history],
                                   rtol=1e-5, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params, ref_params)
