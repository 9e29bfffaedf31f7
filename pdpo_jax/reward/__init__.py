"""The NLI reward model of the +RL(DialogueNLI) baseline (paper §4.1; Song et al., 2020).

    reward = NLIReward("runs/x/reward/best")       # an HF NLI sequence classifier folder
    r = reward(personas, replies)                  # float32 [R], one reward per reply

Modules: `nli_data` (NLI readers, tokenizing pairs), `contradict` and `substitute` (the
heuristic substitute NLI set from SPC test), `classifier` (the jitted train step and dev
evaluation), `functions` (reward formulas), `nli_reward` (NLIReward), `train` (training with
the shared loop), `__main__` (`python -m pdpo_jax.reward train|build-substitute`).
"""
from pdpo_jax._lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    ".functions": ("FUNCTIONS", "reward_function"),
    ".nli_data": ("NliPair", "canonical_label", "encode_nli", "encode_texts", "load_tokenizer",
                  "read_nli", "write_nli_jsonl"),
    ".nli_reward": ("NLIReward", "NliScores", "label_roles"),
    ".substitute": ("SubstituteSet", "build_substitute", "write_substitute"),
    ".train": ("reward_dir", "train_classifier"),
})
