"""The reward: its formulas against numpy, `NLIReward` against the classifier run pair by pair,
and the CLI that trains the classifier (tiny_reward.yaml) into a folder NLIReward and
transformers load."""
import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from pdpo_jax import sharding
from pdpo_jax.errors import UserError
from pdpo_jax.models import ModelConfig, build_model, save_pretrained
from pdpo_jax.reward.functions import FUNCTIONS
from pdpo_jax.reward.nli_data import encode_texts
from pdpo_jax.reward.nli_reward import NLIReward, label_roles

REPO = pathlib.Path(__file__).resolve().parents[1]
# Fixed probabilities of 3 replies against up to 4 persona sentences; reply 2 has none.
P_ENTAIL = np.array([[0.7, 0.1, 0.2, 0.9], [0.3, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
P_CONTRA = np.array([[0.1, 0.6, 0.3, 0.05], [0.2, 0.1, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
MASK = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], bool)


def _numpy_reward(name, pe, pc, mask):
    """The formulas of pdpo_jax.reward.functions, one reply at a time."""
    out = []
    for e, c, m in zip(pe, pc, mask):
        e, c = e[m], c[m]
        if not m.any():
            out.append(0.0)
        elif name == "song2020":  # entailment of the most contradicted persona sentence
            out.append(e[np.argmax(c)])
        elif name == "entail_minus_contradict":
            out.append(np.sum(e - c))
        else:
            out.append(e.max() - c.max())
    return np.asarray(out, np.float32)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_reward_functions_against_numpy(name):
    got = jax.jit(FUNCTIONS[name])(jnp.asarray(P_ENTAIL), jnp.asarray(P_CONTRA), jnp.asarray(MASK))
    np.testing.assert_allclose(np.asarray(got), _numpy_reward(name, P_ENTAIL, P_CONTRA, MASK), atol=1e-7)
    if name == "song2020":  # by hand: reply 0 contradicts sentence 1 most (0.6) -> its p_entail
        np.testing.assert_allclose(np.asarray(got), [0.1, 0.3, 0.0], atol=1e-7)


def test_label_roles():
    assert label_roles(("entailment", "neutral", "contradiction")) == (0, 2)
    assert label_roles(("CONTRADICTION", "NEUTRAL", "ENTAILMENT")) == (2, 0)  # an MNLI-style head
    assert label_roles(("negative", "neutral", "positive")) == (2, 0)        # DNLI's names
    assert label_roles(("LABEL_0", "LABEL_1", "LABEL_2"), ("contradiction", "entailment", "neutral")) == (1, 0)
    with pytest.raises(UserError, match="name no NLI classes"):
        label_roles(("LABEL_0", "LABEL_1"))


LABELS = ("contradiction", "neutral", "entailment")  # not the default order on purpose


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, demo_tokenizer) -> pathlib.Path:
    """A random 2-layer BERT NLI classifier over the demo vocabulary, with its tokenizer."""
    cfg = ModelConfig(arch="bert", hf_model_type="bert", vocab_size=4096, d_model=32, num_layers=2,
                      num_heads=4, num_kv_heads=4, head_dim=8, mlp_dim=64, norm_eps=1e-12,
                      max_positions=64, type_vocab_size=2, labels=LABELS, pad_token_id=0)
    folder = tmp_path_factory.mktemp("nli") / "best"
    save_pretrained(build_model(cfg, seed=3), folder, tokenizer=demo_tokenizer)
    return folder


PERSONAS = [["I have a dog.", "I love to cook.", "I work as a nurse."], ["I live in Ohio."], [],
            ["I am tall.", "My favorite color is blue."]]
REPLIES = ["My dog and I went for a walk.", "I have never been to Ohio.", "Hello there!",
           "I am not tall, but blue is my favorite."]


@functools.partial(jax.jit, static_argnums=0)
def _classify_one(graphdef, params, ids, types, length):
    """One pair alone: a single row, right-padded to 48 (padding invariance is tested in
    test_models_classifier_parity.py), so every pair shares one compiled program."""
    mask = jnp.arange(48)[None] < length
    return nnx.merge(graphdef, params).classify(ids, jnp.where(mask, jnp.arange(48)[None], 0), mask, types)


@pytest.fixture(scope="module")
def scored(classifier_dir):
    reward = NLIReward(classifier_dir, max_length=48)
    return reward, reward.score(PERSONAS, REPLIES)


def test_nli_reward_equals_the_classifier_pair_by_pair(scored):
    """One padded batch of all pairs gives what classifying each (persona sentence, reply)
    alone gives, and the reward is song2020 of those probabilities (entailment and
    contradiction found by label name)."""
    reward, scores = scored
    graphdef, params = nnx.split(reward.model)
    for r, (persona, reply) in enumerate(zip(PERSONAS, REPLIES)):
        assert scores.probabilities[r].shape == (len(persona), 3)
        for s, sentence in enumerate(persona):
            (e,) = encode_texts(reward.tokenizer, [(sentence, reply)], max_length=48)
            ids, types = (np.pad(x, (0, 48 - e.length))[None] for x in (e.ids, e.types))
            logits = _classify_one(graphdef, params, ids, types, e.length)
            np.testing.assert_allclose(scores.probabilities[r][s], jax.nn.softmax(logits[0]), atol=2e-6)
    pe = np.zeros((4, 3), np.float32)
    pc = np.zeros((4, 3), np.float32)
    mask = np.zeros((4, 3), bool)
    for r, probs in enumerate(scores.probabilities):
        pe[r, :len(probs)], pc[r, :len(probs)], mask[r, :len(probs)] = probs[:, 2], probs[:, 0], True
    np.testing.assert_allclose(scores.rewards, _numpy_reward("song2020", pe, pc, mask), atol=1e-6)
    np.testing.assert_array_equal(reward(PERSONAS, REPLIES), scores.rewards)
    assert scores.rewards.dtype == np.float32 and scores.rewards[2] == 0.0 and scores.labels == LABELS


def test_nli_reward_on_a_mesh_equals_one_device(classifier_dir, scored):
    """The pairs sharded over 8 fake devices (data axis) score as on one device."""
    sharded = NLIReward(classifier_dir, max_length=48, mesh=sharding.make_mesh(8, 1, 1)).score(PERSONAS, REPLIES)
    np.testing.assert_allclose(sharded.rewards, scored[1].rewards, atol=1e-6)
    for got, want in zip(sharded.probabilities, scored[1].probabilities):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_nli_reward_refuses_bad_input(classifier_dir, tiny_sft_model):
    with pytest.raises(UserError, match="not a sequence classifier"):
        NLIReward(tiny_sft_model)
    reward = NLIReward(classifier_dir, function="entail_minus_contradict")
    with pytest.raises(ValueError, match="one persona per reply"):
        reward(PERSONAS, REPLIES[:2])
    with pytest.raises(ValueError, match="persona 0 must be a list of sentences"):
        reward(["I have a dog."], ["hi"])
    assert reward([[]], ["hi"]).tolist() == [0.0]


def _cli(args, capsys):
    from pdpo_jax.reward.__main__ import main
    status = main(args)
    return status, capsys.readouterr()


def test_cli_trains_a_classifier_that_nli_reward_and_transformers_load(tmp_path):
    """tiny_reward.yaml for 100 steps on the substitute set (pairs cut to 32 tokens, one
    shape to compile): dev accuracy well above chance (1/3), the best model exported with its
    tokenizer and labels. In a subprocess on one CPU device: the session's 8 fake devices
    would make each step of this 8-way sharded run several times slower."""
    cache = jax.config.jax_compilation_cache_dir
    env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0",
           **({"JAX_COMPILATION_CACHE_DIR": cache} if cache else {}),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "pdpo_jax.reward", "train", "--config", "configs/tiny_reward.yaml",
         f"run.out_dir={tmp_path}", "rl.reward.max_steps=100", "rl.reward.eval_every=50",
         "rl.reward.max_length=32"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    best = tmp_path / "reward" / "best"
    assert f"reward model: {best}" in done.stdout
    evals = [json.loads(line) for line in (tmp_path / "reward" / "metrics.jsonl").read_text().splitlines()
             if '"eval/accuracy"' in line]
    assert [e["step"] for e in evals] == [0, 50, 100]
    assert evals[-1]["eval/accuracy"] >= 0.45, evals
    assert (tmp_path / "reward" / "data" / "nli_substitute_train.jsonl").is_file()
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(best)
    assert type(hf).__name__ == "BertForSequenceClassification"
    assert hf.config.id2label == {0: "entailment", 1: "neutral", 2: "contradiction"}
    rewards = NLIReward(best)(PERSONAS, REPLIES)
    assert rewards.shape == (4,) and np.all((rewards >= 0) & (rewards <= 1))


@pytest.mark.parametrize("setup, fragment", [
    (lambda tmp: (tmp / "bad.jsonl").write_text('{"premise": "a", "hypothesis": "b", "label": "yes"}\n')
     and [f"rl.reward.train={tmp / 'bad.jsonl'}", f"rl.reward.dev={tmp / 'bad.jsonl'}"],
     "bad.jsonl:1: unknown label 'yes'"),
    (lambda tmp: [f"rl.reward.train={tmp / 'x.jsonl'}"], "rl.reward.train is set but rl.reward.dev is not"),
    (lambda tmp: ["rl.reward.tokenizer=/nonexistent/tok"], "rl.reward.tokenizer: /nonexistent/tok is not a folder"),
    (lambda tmp: ["rl.reward.architecture.vocab_size=100"], "vocab_size=100 but the tokenizer has 4096 tokens"),
    (lambda tmp: ["rl.reward.batch_size=0"], "rl.reward.batch_size: 0 is out of range"),
])
def test_cli_user_mistakes_are_one_line_and_status_2(tmp_path, capsys, setup, fragment):
    status, out = _cli(["train", "--config", str(REPO / "configs/tiny_reward.yaml"),
                        f"run.out_dir={tmp_path / 'run'}", *setup(tmp_path)], capsys)
    lines = [line for line in out.err.splitlines() if line.startswith("error: ")]
    assert status == 2 and len(lines) == 1 and fragment in lines[0], out.err
    assert "Traceback" not in out.err
