"""The eval: config section and how checkpoint entries resolve to folders."""
import pytest

from pdpo_jax.config import ConfigError, EvalSection, build
from pdpo_jax.errors import UserError
from pdpo_jax.eval import resolve_checkpoints


def _ckpt(folder):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    return folder


def test_section_builds_from_yaml_mapping():
    cfg = build(EvalSection, {"checkpoints": ["sft", "base=/x"], "max_examples": 20,
                              "normalise": "mean", "judge": {"backend": "local", "comparisons": 50},
                              "responses": {"num_histories": 10}}, "eval")
    assert cfg.checkpoints == ("sft", "base=/x") and cfg.normalisations == ("mean",)
    assert cfg.judge.backend == "local" and cfg.judge.comparisons == 50
    assert cfg.judge.concurrency == 8 and cfg.responses.num_histories == 10
    assert EvalSection().normalisations == ("sum", "mean")
    with pytest.raises(ConfigError, match="did you mean 'comparisons'"):
        build(EvalSection, {"judge": {"comparison": 5}}, "eval")
    with pytest.raises(ConfigError, match="not one of"):
        build(EvalSection, {"judge": {"backend": "anthropic"}}, "eval")


def test_base_url_comes_from_the_environment(monkeypatch):
    cfg = EvalSection().judge
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    assert cfg.base_url == "https://api.openai.com/v1"
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1")
    assert cfg.base_url == "http://127.0.0.1:8000/v1"


def test_resolve_checkpoints(tmp_path):
    run = tmp_path / "run"
    sft = _ckpt(run / "sft" / "best")
    other = _ckpt(tmp_path / "llama-7b")
    got = resolve_checkpoints(["sft", f"base={other}", str(other / ".." / "llama-7b")], run)
    assert got == {"sft": sft, "base": other, "llama-7b": other / ".." / "llama-7b"}
    assert resolve_checkpoints([str(sft)]) == {"sft": sft}  # a stage's best/ is named after it
    with pytest.raises(UserError, match="'dpo'.*finished stage name"):
        resolve_checkpoints(["dpo"], run)
    with pytest.raises(ValueError, match="two entries are labelled 'llama-7b'"):
        resolve_checkpoints([str(other), f"llama-7b={sft}"])
