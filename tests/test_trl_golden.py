"""trl golden check: our DPO loss and metrics equal trl.DPOTrainer's on the same models and batch.

Generator: trl itself, run in this test (no stored constants). A tiny random HF Llama policy and a
perturbed copy as reference (so rewards are non-zero) go through `trl.DPOTrainer._compute_loss` on
one batch from trl's own dataloader; the same token ids, converted to our batch layout, go through
`pair_logps` → `sigmoid_dpo` / `preference_metrics` on the checkpoints loaded with `from_pretrained`.
"""
import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from hf_reference import TINY, tiny_hf_model  # noqa: E402
from pdpo_jax.models import from_pretrained  # noqa: E402
from pdpo_jax.train import losses  # noqa: E402
from pdpo_jax.train.steps import pair_logps  # noqa: E402

BETA = 0.5
PAIRS = 4
PAD, EOS, UNK = 0, 1, 2
FIRST_WORD = 3
# Tolerances (fp32 throughout). A log-prob sum adds ≤ 8 token log-probs of magnitude ~log(97) ≈ 4.6,
# each a logsumexp over 97 logits after a 2-layer forward. torch (MKL GEMMs, trl's chunked fused
# head) and XLA accumulate in different orders: fp32 rounding of ~1e-7 relative on sums of ~30
# gives differences of a few 1e-6 (observed ≤ 6e-6). 1e-4 on log-probs is a ~20x margin and still
# catches any wrong token: a misplaced, missing or extra token moves a sum by ~1 or more.
# Rewards/margins are β = 0.5 times a difference of two such sums (≲ 2e-5 expected, observed ~1e-6)
# and the loss −log σ(margin) moves by at most the margin's error (|d log σ(x)/dx| ≤ 1): 5e-5.
# Accuracy must match exactly.
ATOL_LOGPS = 1e-4
ATOL_REWARDS = 5e-5
# Seed of the reference's perturbation, chosen so exactly 1 of the 4 pairs has a positive margin:
# a mean accuracy of 0.25 cannot come from a tied or symmetric batch (seeds 1-3 give 0.5).
REF_SEED = 4


def _tokenizer():
    """Offline WordLevel tokenizer: word `w{i}` is id i, so ids are readable and cover the vocab."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "</s>": EOS, "<unk>": UNK}
    vocab.update({f"w{i}": i for i in range(FIRST_WORD, TINY["vocab_size"])})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                 unk_token="<unk>")
    assert (hf.pad_token_id, hf.eos_token_id, hf.unk_token_id) == (PAD, EOS, UNK)
    return hf


def _texts(seed: int = 0):
    """Prompts and replies of different lengths, so both padding and prompt/reply boundaries vary."""
    rng = np.random.default_rng(seed)
    words = lambda n: " ".join(f"w{i}" for i in rng.integers(FIRST_WORD, TINY["vocab_size"], n))  # noqa: E731
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for p, c, r in [(5, 3, 6), (8, 7, 2), (3, 1, 4), (6, 5, 5)]:
        rows["prompt"].append(words(p))
        rows["chosen"].append(" " + words(c))  # trl appends "</s>" to both replies
        rows["rejected"].append(" " + words(r))
    return rows


def _models():
    policy = tiny_hf_model("llama", seed=0)
    ref = copy.deepcopy(policy)
    torch.manual_seed(REF_SEED)
    with torch.no_grad():  # a nearby reference: rewards of order 0.1-1, not 0 and not saturated
        for p in ref.parameters():
            p.add_(0.03 * torch.randn_like(p))
    for p in ref.parameters():
        p.requires_grad_(False)
    return policy, ref.eval()


def _trl_run(policy, ref, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    cfg = DPOConfig(output_dir=str(tmp_path / "trl"), beta=BETA, loss_type=["sigmoid"], bf16=False,
                    activation_checkpointing=False, report_to=[], use_cpu=True,
                    per_device_train_batch_size=PAIRS, per_device_eval_batch_size=PAIRS,
                    max_length=TINY["positions"], dataloader_num_workers=0, seed=0,
                    disable_tqdm=True, save_strategy="no")
    # trl defaults both to True; `activation_checkpointing` is the non-deprecated name in transformers 5
    assert cfg.bf16 is False and cfg.gradient_checkpointing is False
    trainer = DPOTrainer(model=policy, ref_model=ref, args=cfg,
                         train_dataset=Dataset.from_dict(_texts()), processing_class=_tokenizer())
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()  # no dropout anyway (attention_dropout=0); logs under _metrics["eval"]
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
        # trl's own per-sequence sums (the code path its reference forward uses), per pair
        per_pair = {name: [x.numpy() for x in trainer.compute_ref_log_probs(m, batch)]
                    for name, m in (("policy", trainer.model), ("ref", trainer.ref_model))}
    metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    batch = {k: v.numpy() for k, v in batch.items()}
    return loss, metrics, per_pair, batch


def _our_batch(trl_batch):
    """trl's [chosen; rejected] right-padded rows → our chosen_*/rejected_* fields."""
    ids, attn, comp = trl_batch["input_ids"], trl_batch["attention_mask"], trl_batch["completion_mask"]
    fields = {
        "tokens": ids.astype(np.int32),
        "positions": np.maximum(np.cumsum(attn, axis=1) - 1, 0).astype(np.int32),
        "attention_mask": attn.astype(bool),
        "loss_mask": comp.astype(bool),
    }
    b = ids.shape[0] // 2
    mb = {}
    for f, v in fields.items():
        mb["chosen_" + f], mb["rejected_" + f] = jnp.asarray(v[:b]), jnp.asarray(v[b:])
    return mb


@pytest.mark.slow
def test_dpo_loss_and_metrics_match_trl(tmp_path):
    policy, ref = _models()
    policy.save_pretrained(tmp_path / "policy")
    ref.save_pretrained(tmp_path / "ref")
    trl_loss, trl_metrics, trl_pairs, batch = _trl_run(policy, ref, tmp_path)

    # The batch is what we think it is: [chosen; rejected], right-padded, prompt first, every
    # completion ending in EOS, no unknown words, lengths varying across rows.
    ids, attn, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    assert ids.shape[0] == 2 * PAIRS and not (ids == UNK).any()
    assert (attn[:, :-1] >= attn[:, 1:]).all(), "trl no longer right-pads"
    assert not (comp & ~attn).any()
    starts, ends = comp.argmax(1), attn.sum(1)
    for row in range(ids.shape[0]):
        assert comp[row].sum() == ends[row] - starts[row] > 0  # reply contiguous, after the prompt
        assert ids[row, ends[row] - 1] == EOS
    for c in range(PAIRS):  # chosen row c and rejected row PAIRS + c share their prompt
        assert starts[c] == starts[PAIRS + c]
        np.testing.assert_array_equal(ids[c, :starts[c]], ids[PAIRS + c, :starts[c]])
    assert len(set(ends.tolist())) > 2, "padding must be exercised"

    mb = _our_batch(batch)
    graphdef, params = nnx.split(from_pretrained(tmp_path / "policy"))
    logps = jax.jit(lambda params: pair_logps(graphdef, params, mb, window=None, chunk=8))
    pc, pr, nc, nr = logps(params)
    _, ref_params = nnx.split(from_pretrained(tmp_path / "ref"))
    rc, rr, _, _ = logps(ref_params)
    lp = losses.PairLogps(pc, pr, rc, rr, nc, nr)
    np.testing.assert_array_equal(np.concatenate([nc, nr]), comp.sum(1))

    # Per pair, against trl's own sequence log-prob sums.
    pair_diff = 0.0
    for ours, theirs, what in [(pc, trl_pairs["policy"][0], "policy chosen"),
                               (pr, trl_pairs["policy"][1], "policy rejected"),
                               (rc, trl_pairs["ref"][0], "ref chosen"),
                               (rr, trl_pairs["ref"][1], "ref rejected")]:
        np.testing.assert_allclose(np.asarray(ours), theirs, atol=ATOL_LOGPS, rtol=0, err_msg=what)
        pair_diff = max(pair_diff, float(np.max(np.abs(np.asarray(ours) - theirs))))
    (tpc, tpr), (trc, trr) = trl_pairs["policy"], trl_pairs["ref"]
    np.testing.assert_array_equal(losses.preference_metrics(lp, BETA)["rewards/accuracies"],
                                  ((tpc - trc) > (tpr - trr)).astype(np.float32))

    # Batch means, against what trl logs.
    ours = {k: float(jnp.mean(v)) for k, v in losses.preference_metrics(lp, BETA).items()}
    ours["loss"] = float(jnp.mean(losses.sigmoid_dpo(lp, BETA)))
    theirs = {k: trl_metrics[k] for k in losses.METRIC_NAMES} | {"loss": trl_loss}
    tol = {"logps/chosen": ATOL_LOGPS, "logps/rejected": ATOL_LOGPS, "rewards/accuracies": 0.0}
    diffs = {k: abs(ours[k] - theirs[k]) for k in theirs}
    bad = {k: (ours[k], theirs[k]) for k in theirs if diffs[k] > tol.get(k, ATOL_REWARDS)}
    assert not bad, f"ours vs trl differ: {bad}; all |diff|: {diffs}"

    # Not vacuous: the reference differs from the policy, pairs disagree, the loss is not log 2.
    rewards = losses.preference_metrics(lp, BETA)
    assert np.all(np.abs(np.asarray(rewards["rewards/chosen"])) > 1e-3)
    assert np.all(np.abs(np.asarray(rewards["rewards/rejected"])) > 1e-3)
    # Mixed pairs, and not the 0.5 a degenerate (tied or symmetric) batch would give; no margin
    # so close to 0 that rounding could flip its accuracy bit.
    assert theirs["rewards/accuracies"] in (0.25, 0.75)
    assert np.all(np.abs(np.asarray(rewards["rewards/margins"])) > 1e-3)
    assert abs(theirs["loss"] - np.log(2.0)) > 1e-3
    print("max |ours - trl|:", {"per-pair logps": f"{pair_diff:.2e}"}
          | {k: f"{v:.2e}" for k, v in diffs.items()})
