"""The `rl` stage end to end on tiny models: an NLI reward classifier trained on the substitute
set, PPO of a tiny SFT model against it, then Dialogue-NLI of SFT vs RL."""
import json

from pdpo_jax import pipeline
from pdpo_jax.config import load_config


def test_rl_stage_trains_exports_and_is_evaluated(tmp_path, tiny_sft_model):
    cfg = load_config("configs/tiny_rl.yaml", (
        f"run.out_dir={tmp_path}", "run.stages=[rl, eval]", f"model.checkpoint={tiny_sft_model}",
        "model.architecture=null", "data.max_train_records=64", "data.max_dev_records=16",
        "rl.reward.max_steps=12", "rl.reward.eval_every=12", "rl.max_rollouts=2", "rl.eval_every=1",
        "rl.rollout_batch=16", "rl.minibatch=8", "rl.ppo_epochs=1", "rl.max_new_tokens=8",
        "rl.eval_prompts=8",
        f"eval.checkpoints=[sft={tiny_sft_model}, rl]", "eval.max_examples=3"))
    pipeline.run(cfg)
    assert (tmp_path / "reward" / "best" / "config.json").is_file()
    assert (tmp_path / "rl" / "best" / "config.json").is_file()
    rows = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/objective/scores" in r]
    assert len(train) == 2 and {"train/objective/kl", "train/policy/approxkl", "train/policy/clipfrac",
                                "train/val/vf_loss", "train/objective/kl_coef"} <= set(train[-1])
    assert [r["step"] for r in rows if "eval/scores" in r] == [1, 2]
    report = (tmp_path / "eval" / "dnli" / "report.md").read_text()
    assert "| sft |" in report and "| rl |" in report
