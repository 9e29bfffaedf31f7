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


def test_run_report_draws_the_reward_model_and_ppo_curves(tmp_path):
    """The run report's curves section covers the rl stage and its reward model as it does SFT
    and DPO: a PNG each, and the last evaluation's numbers in the text."""
    from pdpo_jax.run_report import _curves
    rows = {"reward": [{"step": 10, "train/loss": 1.1}, {"step": 20, "eval/loss": 0.9,
                                                          "eval/accuracy": 0.61}],
            "rl": [{"step": 1, "train/objective/scores": 0.1, "train/objective/kl": 0.0,
                    "train/policy/approxkl": 0.01, "train/policy/clipfrac": 0.2,
                    "train/val/vf_loss": 0.3},
                   {"step": 2, "train/objective/scores": 0.2, "train/objective/kl": 0.05},
                   {"step": 2, "eval/scores": 0.125}]}
    for stage, stage_rows in rows.items():
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "metrics.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in stage_rows))
    (tmp_path / "report").mkdir()
    text = "\n".join(_curves(tmp_path, tmp_path / "report"))
    assert "### NLI reward model curves" in text and "### RL (PPO) curves" in text
    assert "Last evaluation (step 20): eval/loss 0.9, eval/accuracy 0.61." in text
    assert "Last evaluation (step 2): eval/scores 0.125." in text
    for stage in rows:
        assert (tmp_path / "report" / f"{stage}_curves.png").read_bytes()[:4] == b"\x89PNG"
        assert not (tmp_path / "report" / f"{stage}_metrics.jsonl").exists()
