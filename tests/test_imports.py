"""The training step, the sampler and the model code import no data-pipeline, checkpoint, plotting
or tokenizer libraries: `pdpo_jax.data` and `pdpo_jax.eval` load their submodules on first use.
(Measured: importing the step path took 64 MiB of RSS, now 19; a DPO bench worker peaks at
~712 or ~912 MiB instead of ~770 or ~975.)"""
import subprocess
import sys

import pytest

HEAVY = ("grain", "orbax.checkpoint", "matplotlib", "transformers", "torch")


def test_step_and_sampler_imports_stay_light():
    code = ("import sys\n"
            "import pdpo_jax.config, pdpo_jax.train.steps, pdpo_jax.train.state, "
            "pdpo_jax.train.optim, pdpo_jax.sampling, pdpo_jax.models\n"
            f"print([m for m in {HEAVY!r} if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_lazy_package_attributes_resolve():
    import pdpo_jax.data as data
    import pdpo_jax.eval as evaluation
    for package in (data, evaluation):
        for name in package.__all__:
            assert getattr(package, name) is not None, name
        assert set(package.__all__) <= set(dir(package))
    with pytest.raises(AttributeError, match="no_such_name"):
        data.no_such_name
