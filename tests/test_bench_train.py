"""bench/bench_train.py's correctness, not its speed: the padding each layout of the workload
reports (against hand-counted batches), the hand-written PyTorch step's SFT and DPO losses
against pdpo_jax's step on the same batches (packed and bucketed, two steps, so the optimizers
agree too), on tiny random Llamas; the harness (rows, report) with canned workers; and the
profiler's reading of compiled HLO (kinds and dot FLOPs)."""
import json
import os
import sys
import types

import numpy as np
import pytest
from bench_modules import bench_modules


@pytest.fixture(scope="module")
def bench():
    """The bench modules as the scripts import them (tests/bench_modules.py)."""
    with bench_modules("common", "bench_dpo", "train_workload", "bench_train", "torch_train",
                       "profile_train") as modules:
        yield modules


def settings(**kw) -> dict:
    s = dict(config="tiny", template="chat", max_total_tokens=16, max_response_tokens=4,
             truncation="truncate", buckets=[8, 16], max_train_records=None, seed=0, sft_batch=2,
             dpo_batch=2, sft_pack_length=16, dpo_pack_length=32, sft_lr=1e-2, dpo_lr=1e-2, beta=0.5,
             share_prompt=True, precompute_ref=False, dtype="float32", param_dtype="float32",
             unroll_layers=True, remat="none", weight_decay=0.1, clip_norm=1.0)
    s.update(kw)
    return s


def encoded(lengths, seed=0, vocab=64):
    """SFT examples of (prompt, response) lengths, or pairs of (prompt, chosen, rejected)."""
    from pdpo_jax.data.encode import Encoded, EncodedPair
    rng = np.random.default_rng(seed)
    ids = lambda n: rng.integers(3, vocab, n).astype(np.int32)  # noqa: E731  (0-2: pad, bos, eos)
    return [Encoded(ids(n[0]), ids(n[1])) if len(n) == 2 else EncodedPair(ids(n[0]), ids(n[1]), ids(n[2]))
            for n in lengths]


def test_padding_shares_of_each_layout(bench):
    tw = bench.train_workload
    # one batch each. SFT: records of 3 + 2 and 7 + 3 tokens; DPO: pairs of prompt 4, 6 and
    # replies 2/3 and 4/1
    w = tw.assemble(settings(), 0, encoded([(3, 2), (7, 3)]), encoded([(4, 2, 3), (6, 4, 1)]), 1)
    assert sorted(w["sft_plan"][0]) == [0, 1] and sorted(w["dpo_plan"][0]) == [0, 1]
    sft, dpo = w["layouts"]["sft"], w["layouts"]["dpo"]
    # bucketed: both records in the 16 bucket (the longest is 10): 2 x 16 slots, 15 real
    assert sft["ours-bucketed"] == dict(slots=32, real=15, useful=15, padding_share=round(17 / 32, 4),
                                        non_useful_share=round(17 / 32, 4))
    # packed: 5 + 10 tokens in one row of 16
    assert sft["ours-packed"]["slots"] == 16 and sft["ours-packed"]["padding_share"] == round(1 / 16, 4)
    # PyTorch: two rows of the longest, 10
    assert sft["torch-dynamic"]["slots"] == 20 and sft["torch-dynamic"]["padding_share"] == 0.25
    # DPO bucketed: pair lengths prompt + longer reply = 7, 10 -> the 16 bucket; shared-prompt
    # rows of 16 + window 4 columns: [prompt | chosen | rejected], 9 + 11 = 20 real of 40
    assert dpo["ours-bucketed"]["slots"] == 2 * (16 + 4) and dpo["ours-bucketed"]["real"] == 20
    assert dpo["ours-bucketed"]["padding_share"] == 0.5
    # packed: both pairs' groups (9 and 11 tokens) in one row of 32
    assert dpo["ours-packed"]["slots"] == 32 and dpo["ours-packed"]["real"] == 20
    # PyTorch: chosen rows 6 and 10, rejected rows 7 and 7, all padded to 10; prompts twice
    assert dpo["torch-dynamic"] == dict(slots=40, real=30, useful=20, padding_share=0.25,
                                        non_useful_share=0.5)


@pytest.fixture(scope="module")
def tiny_llamas(tmp_path_factory):
    """Two random tiny Llama folders (tied embeddings, GQA, as SmolLM2): policy and reference."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
                      rope_theta=1e4, tie_word_embeddings=True, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        folder = tmp_path_factory.mktemp(f"tiny_llama{seed}")
        LlamaForCausalLM(cfg).save_pretrained(folder)
        out.append(str(folder))
    return out


def jax_losses(bench, w, task, layout, precision, ref_dir):
    """pdpo_jax's loss on the plan's batches, one step each, as the bench worker trains."""
    import jax

    from pdpo_jax.models import from_pretrained
    from pdpo_jax.models.layers import frozen_forward_params
    from pdpo_jax.sharding import make_mesh
    mesh = make_mesh(devices=jax.devices()[:1])
    args = types.SimpleNamespace(task=task, layout=layout, precision=precision, remat=None, unroll=None)
    step, state, extra, batches, _ = bench.bench_train.build_jax_step(args, w, len(w[f"{task}_plan"]), mesh)
    if task == "dpo":  # a reference unlike the policy, so the DPO loss is not log 2
        dtype = "bfloat16" if precision == "bf16" else "float32"
        extra = (frozen_forward_params(from_pretrained(ref_dir, mesh=mesh, dtype=dtype)),)
    out = []
    for b in batches:
        state, metrics = step(state, *extra, b)
        assert bool(metrics["finite"])
        out.append(float(metrics["loss"]))
    return out


def torch_losses(bench, w, task, precision, ref_dir):
    """The hand-written PyTorch step's loss on the same batches (bench/torch_train.py)."""
    import torch
    from transformers import AutoModelForCausalLM
    tt, tw, s = bench.torch_train, bench.train_workload, w["settings"]
    torch.manual_seed(0)
    policy = tt.load_model().train()
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, attn_implementation="sdpa").eval().requires_grad_(False)
    opt = tt.optimizer(policy, s[f"{task}_lr"], s["weight_decay"])
    step = tt.make_step(policy, ref, opt, task, precision, s["beta"], s["clip_norm"])
    return [step(tt.padded(tw.dynamic_rows(w, task, row), w["pad_id"])) for row in w[f"{task}_plan"]]


@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_torch_step_loss_equals_pdpo_jax_loss(bench, tiny_llamas, monkeypatch, task):
    policy_dir, ref_dir = tiny_llamas
    monkeypatch.setenv("PDPO_SMOLLM2_DIR", policy_dir)
    rng = np.random.default_rng(1)
    if task == "sft":  # 8 records of 2-11 prompt + 1-4 response tokens: buckets 8 and 16
        shapes = [(int(rng.integers(2, 12)), int(rng.integers(1, 5))) for _ in range(8)]
    else:
        shapes = [(int(rng.integers(2, 12)), int(rng.integers(1, 5)), int(rng.integers(1, 5))) for _ in range(8)]
    ex = encoded(shapes, seed=2)
    sft = ex if task == "sft" else encoded([(4, 2)] * 4)  # the other task's: not trained here
    dpo = ex if task == "dpo" else encoded([(4, 2, 2)] * 4)
    w = bench.train_workload.assemble(settings(), 0, sft, dpo, 2)
    # the reference: two steps (lr 1e-2), so the second loss checks the AdamW updates alike
    ref = torch_losses(bench, w, task, "fp32", ref_dir)
    for layout in ("bucketed", "packed"):
        ours = jax_losses(bench, w, task, layout, "fp32", ref_dir)
        np.testing.assert_allclose(ours, ref, rtol=2e-5, err_msg=f"{task} {layout} fp32")
    # bf16: the same function under autocast vs bf16 compute; the rounding differs, not the loss
    ours = jax_losses(bench, w, task, "packed", "bf16", ref_dir)
    np.testing.assert_allclose(ours, torch_losses(bench, w, task, "bf16", ref_dir), rtol=3e-2)


def _record(bench, cmd: list[str]) -> dict:
    """A canned worker record: pdpo_jax packed 1.5x bucketed, bf16 1.2x fp32, torch 200 tok/s."""
    script = os.path.basename(cmd[0])
    if script == "matmul_peak.py":
        return {"bench": "matmul_peak", "machine_fp32": 2e11, "machine_bf16": 4e11}
    value = lambda name, default=None: cmd[cmd.index(name) + 1] if name in cmd else default  # noqa: E731
    framework = value("--framework", "pdpo_jax") if script == "torch_train.py" else "pdpo_jax"
    task, precision, layout = value("--task"), value("--precision"), value("--layout", "dynamic")
    rate = ({"pdpo_jax": 300.0, "torch": 200.0}[framework] * (1.5 if layout == "packed" else 1.0)
            * (1.2 if precision == "bf16" else 1.0))
    label = (f"pdpo_jax-{task}-{layout}-{precision}" if framework == "pdpo_jax"
             else f"{framework}-{task}-{precision}")
    record = dict(bench="train", framework=framework, label=label, task=task, layout=layout,
                  precision=precision, last_layer_selected=framework == "pdpo_jax", compile_s=None,
                  load1_start=0.1, others_cpu_frac=0.0, cpu_steal_frac=0.0)
    steps = [dict(useful=1000, slots=1200, real=1100, head=200), dict(useful=500, slots=600, real=550, head=100)]
    times = [s["useful"] / rate for s in steps]
    return bench.train_workload.finish(record, times, steps, 0.5, {"machine_fp32": 2e11, "machine_bf16": 4e11})


def test_harness_runs_every_row_and_compares_the_layouts(bench, tmp_path, monkeypatch):
    bt, calls = bench.bench_train, []
    layouts = {"sft": {"ours-packed": dict(slots=10, real=9, useful=9, padding_share=0.1, non_useful_share=0.1)}}
    monkeypatch.setattr(bt.tw, "build", lambda path, n, config: {"layouts": layouts, "sft_encode": "",
                                                                  "dpo_encode": ""})
    monkeypatch.setattr(bt.tw, "settings", lambda config: settings(sft_pack_length=192))

    def fake_run(cmd, **kw):
        calls.append(cmd)
        out = json.dumps(_record(bench, cmd[1:]))
        return types.SimpleNamespace(returncode=0, stdout="log line\n" + out + "\n", stderr="")
    monkeypatch.setattr(bench.bench_dpo.subprocess, "run", fake_run)
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--alloc", "glibc", "--results", str(tmp_path),
                                      "--retries", "0"])
    bt.main()
    rows = bt.rows(["sft", "dpo"], ["torch-bf16"])
    assert len(rows) == 2 * (4 + 1) and len(calls) == 1 + len(rows)  # the GEMM peak, then every row
    out = json.loads(next(tmp_path.glob("train-*.json")).read_text())
    rec = {r["label"]: r for r in out["records"]}
    # tok/s = useful tokens / summed time: 1500 / (1500 / rate) = rate
    assert rec["pdpo_jax-sft-packed-bf16"]["tok_s"] == pytest.approx(300 * 1.5 * 1.2)
    assert rec["torch-dpo-bf16"]["s_per_step"] == pytest.approx((1000 + 500) / 240 / 2)
    assert rec["torch-dpo-bf16"]["padding_share"] == pytest.approx(1 - 1650 / 1800, abs=1e-4)
    c = out["summary"]["comparisons"]
    assert set(c) == {"sft-bf16", "sft-fp32", "dpo-bf16", "dpo-fp32"}
    assert c["dpo-bf16"]["packed_over_bucketed"] == pytest.approx(1.5) and c["dpo-bf16"]["packing_faster"]
    assert c["sft-bf16"]["best_over_torch"] == pytest.approx(450 * 1.2 / 240) and "torch_tok_s" not in c["sft-fp32"]
    assert out["summary"]["machine_start"]["cpus"] == os.cpu_count()
    md = next(tmp_path.glob("train-*.md")).read_text()
    assert "**1.50×**" in md and "FAILED" not in md and "load average" in md


def test_profiler_classifies_thunks_and_counts_dot_flops(bench):
    """profile_train reads XLA:CPU's optimized HLO, where a dot's operands are printed by name
    (and fused computations reuse `param_*` names): its FLOPs are 2·B·T·D·F per einsum."""
    import jax
    import jax.numpy as jnp
    B, T, D, F = 2, 8, 16, 32
    fn = jax.jit(lambda a, w1, w2: jnp.tanh(jnp.einsum("btd,df->btf", a, w1)) @ w2)
    text = fn.lower(jnp.ones((B, T, D)), jnp.ones((D, F)), jnp.ones((F, D))).compile().as_text()
    instrs, comps = bench.profile_train.parse_hlo(text)
    entry = comps[next(c for c in comps if c.startswith("main"))]
    kinds = [bench.profile_train.classify(name, instrs, comps) for name in entry]
    matmuls = sorted(flops for kind, flops in kinds if kind == "matmul")
    assert matmuls == [2 * B * T * D * F, 2 * B * T * F * D]
    others = {kind for kind, _ in kinds} - {"matmul"}
    assert others <= {"elementwise", "transpose/copy", "other", "reduce"}
