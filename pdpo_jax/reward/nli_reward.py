"""`NLIReward`: the reward a PPO trainer asks for, one number per reply.

    reward = NLIReward("runs/x/reward/best")                  # any HF NLI sequence classifier
    r = reward(personas, replies)                              # float32 [R]
    details = reward.score(personas, replies)                  # + per-sentence probabilities

Every (persona sentence, reply) pair of the call (premise = the persona sentence, hypothesis =
the reply) goes into ONE right-padded batch; one jitted program classifies the pairs, gathers
their probabilities into a [R, S, C] grid (S: the most persona sentences of a reply) and applies
the reward function (`functions`, Song et al. 2020 by default). Pair count, length and grid
are padded to buckets, so a PPO run compiles the program a handful of times.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pdpo_jax import sharding as shd
from pdpo_jax.config.schema import NLI_LABELS
from pdpo_jax.data.batches import bucket_length, classification_batch, round_up
from pdpo_jax.data.encode import pad_id
from pdpo_jax.errors import UserError
from pdpo_jax.models import from_pretrained
from pdpo_jax.reward.classifier import class_probabilities
from pdpo_jax.reward.functions import reward_function
from pdpo_jax.reward.nli_data import canonical_label, encode_texts, label_index, load_tokenizer


@dataclasses.dataclass(frozen=True)
class NliScores:
    """rewards float32 [R]; probabilities[r] float32 [S_r, C]: reply r against each of its
    persona sentences, columns in `labels` order (the classifier's)."""

    rewards: np.ndarray
    probabilities: list[np.ndarray]
    labels: tuple[str, ...]


def label_roles(model_labels: Sequence[str], fallback: Sequence[str] = NLI_LABELS) -> tuple[int, int]:
    """(entailment index, contradiction index) of a classifier's outputs: from its own label
    names when they are NLI names (entailment / ENTAILMENT / positive …), else from `fallback`
    (the output order the config states, for checkpoints labelled LABEL_0, LABEL_1, …)."""
    names = model_labels
    if not {"entailment", "contradiction"} <= {canonical_label(n) for n in names}:
        if len(fallback) != len(model_labels):
            raise UserError(f"the classifier's labels {list(model_labels)} name no NLI classes and "
                            f"rl.reward.labels {list(fallback)} has another length; set it to the "
                            "classifier's output order")
        names = fallback
    index = label_index(names)
    return index["entailment"], index["contradiction"]


class NLIReward:
    """Persona-consistency reward of replies from an NLI sequence classifier (HF folder)."""

    def __init__(self, checkpoint_dir: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
                 function: str = "song2020", labels: Sequence[str] = NLI_LABELS,
                 max_length: int = 128, mesh: Mesh | None = None, dtype: str = "float32",
                 unroll_layers: bool = False):
        """checkpoint_dir: an HF `…ForSequenceClassification` folder (BERT, RoBERTa, Llama or
        GPT-2 family); tokenizer: its folder (default: checkpoint_dir); function: a name of
        `functions.FUNCTIONS`; labels: output order when the checkpoint's id2label names no NLI
        classes; max_length: tokens per pair (longer pairs are cut); mesh: shard the pairs
        over its batch axes (parameters replicated per the sampling rules); dtype: compute
        dtype; unroll_layers: see ModelConfig (faster on CPU)."""
        self.model = from_pretrained(checkpoint_dir, dtype=dtype, mesh=mesh, rules=shd.SAMPLING_RULES,
                                     unroll_layers=unroll_layers)
        cfg = self.model.cfg
        if not cfg.labels:
            raise UserError(f"{checkpoint_dir}: not a sequence classifier (its config.json has no "
                            "…ForSequenceClassification architecture); pass an NLI classifier")
        self.tokenizer = load_tokenizer(tokenizer or checkpoint_dir, "rl.reward.tokenizer")
        self.labels = cfg.labels
        self.entail, self.contradict = label_roles(cfg.labels, labels)
        self.max_length, self.mesh = max_length, mesh
        self._pad = pad_id(self.tokenizer)
        self._graphdef, self._params = nnx.split(self.model)
        self._program = jax.jit(functools.partial(
            _reward_program, self._graphdef, reward_function(function), self.entail, self.contradict))

    def __call__(self, personas: Sequence[Sequence[str]], replies: Sequence[str]) -> np.ndarray:
        """float32 [R]: the reward of replies[r] under persona personas[r] (a list of sentences)."""
        return self.score(personas, replies).rewards

    def score(self, personas: Sequence[Sequence[str]], replies: Sequence[str]) -> NliScores:
        """Rewards and every pair's class probabilities (for logging)."""
        pairs, slots = _pairs(personas, replies)
        if not pairs:  # no persona sentence at all: nothing to reward
            empty = np.zeros((0, len(self.labels)), np.float32)
            return NliScores(np.zeros((len(replies),), np.float32), [empty] * len(replies), self.labels)
        encoded = encode_texts(self.tokenizer, pairs, max_length=self.max_length,
                               token_types=self.model.cfg.type_vocab_size > 1)
        batch, grid = self._layout(encoded, slots, len(replies))
        rewards, probs = jax.device_get(self._program(self._params, batch, grid))
        counts = [len(p) for p in personas]
        return NliScores(np.asarray(rewards[:len(replies)], np.float32),
                         [np.asarray(probs[r, :n], np.float32) for r, n in enumerate(counts)],
                         self.labels)

    def _layout(self, encoded, slots, num_replies: int):
        """The padded pair batch (rows a power of two, a multiple of the mesh's batch split)
        and the [R, S] grid of pair indices (-1 where reply r has no sentence s)."""
        lengths = [e.length for e in encoded]
        seq_len = bucket_length(max(lengths), _length_buckets(self.max_length))
        split = shd.batch_divisor(self.mesh)
        rows = round_up(max(8, 1 << (len(encoded) - 1).bit_length()), split)
        batch = classification_batch([*encoded, *[None] * (rows - len(encoded))], seq_len, self._pad)
        batch = {k: v for k, v in batch.items() if k not in ("index", "labels")}
        S = round_up(max(s for _, s in slots) + 1, 4)
        R = round_up(max(8, 1 << (num_replies - 1).bit_length()), split)
        grid = np.full((R, S), -1, np.int32)
        for pair, (r, s) in enumerate(slots):
            grid[r, s] = pair
        if self.mesh is not None:
            batch = {k: jax.device_put(v, shd.row_sharding(self.mesh, v.ndim)) for k, v in batch.items()}
            grid = jax.device_put(grid, shd.row_sharding(self.mesh, 2))
        return batch, grid


def _length_buckets(max_length: int) -> tuple[int, ...]:
    return tuple(b for b in (16, 32, 64, 128, 256) if b < max_length) + (max_length,)


def _pairs(personas: Sequence[Sequence[str]], replies: Sequence[str]):
    """(premise, hypothesis) pairs and their (reply, sentence) slots; inputs checked."""
    if isinstance(replies, str) or len(personas) != len(replies):
        raise ValueError(f"need one persona per reply: got {len(personas)} personas and "
                         f"{len(replies)} replies")
    pairs, slots = [], []
    for r, (persona, reply) in enumerate(zip(personas, replies)):
        if isinstance(persona, str) or not all(isinstance(s, str) for s in persona):
            raise ValueError(f"persona {r} must be a list of sentences, got {persona!r:.80}")
        for s, sentence in enumerate(persona):
            pairs.append((sentence, reply))
            slots.append((r, s))
    return pairs, slots


def _reward_program(graphdef, function, entail: int, contradict: int, params, batch, grid_RS):
    """(rewards [R], probabilities [R, S, C]) of one padded pair batch."""
    probs_PC = class_probabilities(graphdef, params, batch)
    mask_RS = grid_RS >= 0
    probs_RSC = jnp.where(mask_RS[..., None], probs_PC[jnp.maximum(grid_RS, 0)], 0.0)
    rewards = function(probs_RSC[..., entail], probs_RSC[..., contradict], mask_RS)
    return rewards, probs_RSC
