"""The sequence classifier's training step and evaluation: cross-entropy on labelled texts.

Batches are `data.classification_batch` layouts with a leading micro-batch axis, [A, B, ...]
(`train.loop` splits them); rows with label -1 are padding. The step is built like SFT's and
DPO's (`train.steps`): gradients summed over micro-batches and normalised once by the global
count of labelled rows, a non-finite loss or gradient leaves the state untouched.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pdpo_jax.train.steps import TrainState, accumulate, apply_update


def class_logits(graphdef: nnx.GraphDef, params, batch) -> jnp.ndarray:
    """fp32 logits [B, C] of the rows of one batch [B, ...]."""
    model = nnx.merge(graphdef, params)
    types = batch["token_types"] if model.cfg.type_vocab_size > 1 else None
    return model.classify(batch["tokens"], batch["positions"], batch["attention_mask"], types)


def cross_entropy(logits_BC, labels_B):
    """(−log p(label) [B] in fp32, valid [B]); rows with label -1 count 0 and are not valid."""
    valid = labels_B >= 0
    logp = jax.nn.log_softmax(logits_BC.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, jnp.maximum(labels_B, 0)[:, None], axis=-1)[:, 0]
    return jnp.where(valid, -picked, 0.0), valid


def make_classifier_step(graphdef: nnx.GraphDef, tx, lr_schedule: Callable):
    """step(state, batch) -> (state, metrics): mean cross-entropy over the labelled rows;
    metrics loss, accuracy, examples, learning_rate, finite and the norms."""
    def loss_of(params, mb):
        logits = class_logits(graphdef, params, mb)
        nll, valid = cross_entropy(logits, mb["labels"])
        hits = jnp.sum((jnp.argmax(logits, axis=-1) == mb["labels"]) & valid)
        return jnp.sum(nll), (jnp.sum(valid), hits.astype(jnp.float32))

    def step(state: TrainState, batch):
        def body(carry, mb):
            grads, nll_sum, count, correct = carry
            (micro, (n, hits)), g = jax.value_and_grad(loss_of, has_aux=True)(state.params, mb)
            return (jax.tree.map(jnp.add, grads, g), nll_sum + micro, count + n, correct + hits), None

        zero = jnp.zeros((), jnp.float32)
        init = (jax.tree.map(jnp.zeros_like, state.params), zero, jnp.zeros((), jnp.int32), zero)
        grads, nll_sum, count, correct = accumulate(body, init, batch)
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = nll_sum / denom
        finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
        lr = lr_schedule(state.step)
        state, norms = apply_update(state, tx, grads, finite)
        return state, {"loss": loss, "accuracy": correct / denom, "examples": count,
                       "learning_rate": lr, "finite": finite, **norms}

    return step


def make_classifier_eval(graphdef: nnx.GraphDef, num_labels: int):
    """eval(params, batch [B, ...]) -> {"nll": sum, "count_C": labelled rows per true class,
    "correct_C": correct ones per true class, "confusion_CC": [true, predicted] counts}."""
    def evaluate(params, batch):
        logits = class_logits(graphdef, params, batch)
        nll, valid = cross_entropy(logits, batch["labels"])
        onehot_true = jax.nn.one_hot(batch["labels"], num_labels) * valid[:, None]
        onehot_pred = jax.nn.one_hot(jnp.argmax(logits, axis=-1), num_labels)
        confusion = jnp.einsum("BT,BP->TP", onehot_true, onehot_pred)
        return {"nll": jnp.sum(nll), "count_C": jnp.sum(onehot_true, axis=0),
                "correct_C": jnp.diagonal(confusion), "confusion_CC": confusion}
    return evaluate


def class_probabilities(graphdef: nnx.GraphDef, params, batch) -> jnp.ndarray:
    """Softmax probabilities [B, C] in fp32."""
    return jax.nn.softmax(class_logits(graphdef, params, batch), axis=-1)
