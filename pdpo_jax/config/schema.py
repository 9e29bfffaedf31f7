"""The run-config schema: typed, frozen dataclasses, one per YAML section.

A field exists because a shipped config changes it; derived values are properties. Numeric fields
that have a valid range say so with `Annotated[..., Range(...)]`, and loading refuses values
outside it (`pdpo_jax.config.loading`). Hyperparameters default to the paper's Appendix B.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Annotated, Literal


@dataclasses.dataclass(frozen=True)
class Range:
    """Allowed values of a numeric field: low ≤ x ≤ high (either end open or absent), or one of
    `also` (e.g. -1 for "the rest of the devices")."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    also: tuple[float, ...] = ()

    def contains(self, x: float) -> bool:
        if x in self.also:
            return True
        if isinstance(x, float) and math.isnan(x):
            return False
        above = self.low is None or (x > self.low if self.low_open else x >= self.low)
        below = self.high is None or (x < self.high if self.high_open else x <= self.high)
        return above and below

    def __str__(self) -> str:
        lo = "(-inf" if self.low is None else ("(" if self.low_open else "[") + f"{self.low:g}"
        hi = "inf)" if self.high is None else f"{self.high:g}" + (")" if self.high_open else "]")
        extra = "".join(f" or {v:g}" for v in self.also)
        return f"{lo}, {hi}{extra}"


Count = Annotated[int, Range(1)]                  # steps, batch sizes, token budgets: >= 1
NonNegativeInt = Annotated[int, Range(0)]
NonNegative = Annotated[float, Range(0)]
Positive = Annotated[float, Range(0, low_open=True)]
Fraction = Annotated[float, Range(0, 1, high_open=True)]   # [0, 1)
TopP = Annotated[float, Range(0, 1, low_open=True)]        # (0, 1]
Seed = Annotated[int, Range(0, 2**32, high_open=True)]
MeshAxis = Annotated[int, Range(1, also=(-1,))]


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with warmup then cosine/linear decay to 0 and global-norm clipping (paper App. B)."""
    lr: NonNegative = 1e-5
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: Fraction = 0.05
    weight_decay: NonNegative = 0.1
    b1: Fraction = 0.9
    b2: Fraction = 0.999
    eps: Positive = 1e-8
    clip_norm: Positive = 1.0


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Start from an HF `checkpoint` folder, or from random weights of `architecture`
    (HF config.json keys). With both, the architecture must match the checkpoint's."""
    checkpoint: str | None = None
    architecture: dict | None = None
    tokenizer: str | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    remat: Literal["none", "full", "dots_saveable"] = "none"
    unroll_layers: bool = False  # unrolled layer loop: faster training on CPU, slower compile

    def runtime(self, stage: "StageSection | None" = None) -> dict:
        """What this section (and a training stage's `remat`) sets on the ModelConfig read from
        config.json (the keyword arguments of `from_pretrained` and `ModelConfig.replace`)."""
        remat = self.remat if stage is None or stage.remat is None else stage.remat
        return dict(dtype=self.dtype, param_dtype=self.param_dtype, remat=remat,
                    unroll_layers=self.unroll_layers)


@dataclasses.dataclass(frozen=True)
class DataSection:
    """Persona-dialogue files (format picked by name: .txt FbDialog, .csv Synthetic-Persona-Chat,
    .json HF PersonaChat, .jsonl generic; optionally .gz). Empty: the embedded default data."""
    train: str = ""
    dev: str = ""
    template: str = "english"
    max_total_tokens: Count = 512
    max_response_tokens: Count = 64  # EOS included; longer replies are dropped and counted
    buckets: tuple[Count, ...] = (128, 256, 512)
    # A seeded uniform sample of the file's records (run.seed; pdpo_jax.data.subsets), not the
    # first N; None: every record.
    max_train_records: Count | None = None
    max_dev_records: Count | None = None
    # A prompt over budget loses its oldest history turns (`truncate`), or the record is
    # dropped and counted (`drop`), in every training stage (sft, negatives, dpo); each stage
    # writes the counts to <run>/<stage>/data_stats.json.
    truncation: Literal["truncate", "drop"] = "truncate"
    # Training rows hold several records (SFT) or pairs (DPO), first-fit into rows of
    # pack_length tokens (default: the largest bucket, or twice it for DPO pairs, whose rows
    # hold prompt + chosen + rejected); the same examples per step and the same loss as one
    # row each. true / false: every training stage; auto: each stage takes the layout whose
    # epoch needs at most 0.9x the other's token slots, else the one with fewer compiled
    # shapes (train/stages.choose_packing).
    packing: bool | Literal["auto"] = "auto"
    pack_length: Count | None = None

    def packed_row_length(self, pairs: bool) -> int:
        return self.pack_length or (2 if pairs else 1) * max(self.buckets)


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """Device mesh axes; one of them may be -1: the devices left over."""
    data: MeshAxis = 1
    fsdp: MeshAxis = -1
    tensor: MeshAxis = 1


@dataclasses.dataclass(frozen=True)
class StageSection:
    """One training stage (SFT or DPO): its schedule, batch and model selection."""
    epochs: Count = 1
    max_steps: Count | None = None
    batch_size: Count = 8
    grad_accum: Count = 1
    eval_every: Count = 100
    log_every: Count = 10
    optimizer: OptimizerConfig = OptimizerConfig()
    # Gradient checkpointing for this stage (None: model.remat), e.g. the paper's DPO only.
    remat: Literal["none", "full", "dots_saveable"] | None = None


@dataclasses.dataclass(frozen=True)
class SftSection(StageSection):
    pass


# The preference losses (pdpo_jax.train.losses.PREFERENCE_LOSSES; docs/guide.md "The loss menu").
LossName = Literal["sigmoid", "cdpo", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
                   "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop",
                   "sigmoid_norm", "sft", "simpo", "orpo"]


@dataclasses.dataclass(frozen=True)
class DpoSection(StageSection):
    """A loss, or a list of losses summed with `loss_weights` (trl's `loss_type`/`loss_weights`).
    A loss-specific hyperparameter left at its default is unread by the other losses; set
    away from it while no selected loss reads it, it is an error (`DpoObjective`)."""
    beta: Positive = 0.5
    loss: LossName | tuple[LossName, ...] = "sigmoid"
    loss_weights: tuple[NonNegative, ...] | None = None  # one per loss; default all 1.0
    # ε of cdpo, robust, exo_pair, aot, aot_unpaired and simpo
    label_smoothing: Annotated[float, Range(0, 0.5, high_open=True)] = 0.0
    rpo_alpha: NonNegative = 0.0
    simpo_gamma: NonNegative = 0.5    # SimPO's target margin γ (trl CPOConfig default)
    discopop_tau: Positive = 0.05     # DiscoPOP's temperature τ (the paper's value)
    orpo_lambda: NonNegative = 0.1    # ORPO's λ on the odds-ratio term (the paper's value)
    # Optional separate preference file (trl-style JSONL); default: the negatives stage output.
    pairs: str | None = None
    dev_pairs: str | None = None
    # Compute reference log-probs once (cached on disk) and hold one copy of the weights.
    precompute_ref: bool = False
    # Run each pair's prompt once: chosen and rejected packed in one row [prompt | chosen |
    # rejected] with a segment mask (P + 2R tokens per pair instead of 2(P + R)); the same
    # log-probs up to fp32 summation order.
    share_prompt: bool = True

    def __post_init__(self):
        names = (self.loss,) if isinstance(self.loss, str) else self.loss
        if not names:
            raise ValueError("loss: an empty list; name at least one loss")
        if self.loss_weights is not None and len(self.loss_weights) != len(names):
            raise ValueError(f"loss_weights: {len(self.loss_weights)} weight(s) for {len(names)} "
                             f"loss(es) {list(names)}; give one weight per loss")


@dataclasses.dataclass(frozen=True)
class NegativesSection:
    """Pseudo-negatives: replies sampled from the SFT model under a swapped persona (`shuffle`),
    the original persona (`no_shuffle`), or pairs another model wrote (`external`: a folder
    with train_pairs.jsonl and dev_pairs.jsonl). Replies are at most data.max_response_tokens.
    temperature 0 decodes greedily."""
    mode: Literal["shuffle", "no_shuffle", "external"] = "shuffle"
    external: str | None = None
    temperature: NonNegative = 1.0
    top_p: TopP = 1.0
    top_k: NonNegativeInt = 0
    batch_size: Count = 32
    shard_size: Count = 512
    keep_truncated: bool = False
    # The train records replies are sampled for: `same` as SFT's (the paper: all the data), or
    # `disjoint`: records of data.train that SFT did not see. max_records draws that many
    # (seeded) from those; None: all of them. Dev pairs come from SFT's dev records either way.
    records: Literal["same", "disjoint"] = "same"
    max_records: Count | None = None
    # Where swapped personas come from: every persona of the split's file, or only those of
    # the records sampled for (`records`: the behaviour before subsets were drawn).
    persona_pool: Literal["split", "records"] = "split"
    # persona_margin: keep a pair only when the SFT model finds its rejected reply more likely
    # under the swapped persona than under the original one by more than filter_margin nats:
    # log p(y⁻ | p_swapped, x) − log p(y⁻ | p, x) > filter_margin.
    # The filter drops train pairs only unless filter_dev: dev pairs are scored (their margins
    # are reported) and kept, so a filtered run selects its DPO checkpoint on the same dev pairs
    # as the unfiltered run, and on all of them (a filtered dev set can be a few dozen pairs).
    filter: Literal["none", "persona_margin"] = "none"
    filter_margin: NonNegative = 0.0
    filter_dev: bool = False


NLI_LABELS = ("entailment", "neutral", "contradiction")
REWARD_FUNCTIONS = ("song2020", "entail_minus_contradict", "max_entail_minus_max_contradict")


@dataclasses.dataclass(frozen=True)
class RewardSection(StageSection):
    """The NLI reward model of the +RL(DialogueNLI) baseline (paper §4.1, after Song et al.,
    2020): a sequence classifier of (persona sentence, reply) pairs whose entailment and
    contradiction probabilities make the reward (`function`, see pdpo_jax.reward.functions).

    checkpoint: an HF NLI sequence-classifier folder (BERT, RoBERTa, Llama, GPT-2 families):
    used as it is, nothing is trained. Otherwise a classifier of `architecture` (HF config.json
    keys, e.g. {model_type: bert, ...}) is trained from random weights on `train` / `dev` (NLI
    JSONL: Dialogue-NLI's sentence1/sentence2/label or premise/hypothesis/label); an empty
    `train` builds the heuristic substitute set from the SPC test split (data/README.md).
    labels: the classifier's output order (a checkpoint's id2label, when it names NLI labels,
    wins). The schedule defaults are common BERT fine-tuning values, not the paper's (it gives
    none for the reward model)."""
    checkpoint: str | None = None
    train: str = ""
    dev: str = ""
    architecture: dict | None = None
    tokenizer: str | None = None
    labels: tuple[str, ...] = NLI_LABELS
    max_length: Count = 128          # tokens of a (premise, hypothesis) pair; longer pairs are cut
    unroll_layers: bool = False      # unrolled layer loop: ~3x faster steps on CPU, slower compile
    function: Literal[REWARD_FUNCTIONS] = "song2020"
    out_dir: str = ""                # empty: <run.out_dir>/reward

    @property
    def buckets(self) -> tuple[int, ...]:
        """Padded pair lengths: powers of two from 32 below max_length, then max_length."""
        return tuple(b for b in (32, 64, 128, 256) if b < self.max_length) + (self.max_length,)


@dataclasses.dataclass(frozen=True)
class RlSection:
    """The +RL(DialogueNLI) baseline (paper §4.1–4.4): PPO of the SFT model against the NLI
    reward (`reward`), as trl's PPO (train/ppo.py, train/rl.py). One rollout = `rollout_batch`
    training prompts answered once under their own persona; `ppo_epochs` passes of `minibatch`
    rows each per rollout; at most `epochs` passes over the prompts (the paper: at most 2); every
    `eval_every` rollouts the mean reward of greedy replies to `eval_prompts` dev prompts picks
    the exported model (the paper: the highest reward). KL penalty kl_coef, adaptive towards
    kl_target when set. PPO's constants are trl's defaults; the optimizer the paper's DPO one."""
    epochs: Count = 2
    max_rollouts: Count | None = None
    rollout_batch: Count = 16
    minibatch: Count = 8
    ppo_epochs: Count = 4
    max_new_tokens: Count = 48
    temperature: Positive = 1.0
    top_p: TopP = 1.0
    kl_coef: NonNegative = 0.05
    kl_target: Positive | None = None
    kl_horizon: Count = 10000
    gamma: Annotated[float, Range(0, 1)] = 1.0
    lam: Annotated[float, Range(0, 1)] = 0.95
    clip: Positive = 0.2
    clip_value: Positive = 0.2
    vf_coef: NonNegative = 0.1
    eval_every: Count = 10
    eval_prompts: Count = 64
    optimizer: OptimizerConfig = OptimizerConfig(lr=1e-6, schedule="linear")
    remat: Literal["none", "full", "dots_saveable"] | None = None
    reward: RewardSection = RewardSection(
        epochs=3, batch_size=32, eval_every=200,
        optimizer=OptimizerConfig(lr=2e-5, schedule="linear", warmup_ratio=0.1, weight_decay=0.01))


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    keep: Count = 2
    save_every: NonNegativeInt = 0  # 0: save at each evaluation only


@dataclasses.dataclass(frozen=True)
class RunSection:
    out_dir: str = "runs/default"
    seed: Seed = 0
    stages: tuple[str, ...] = ("sft", "dpo")


@dataclasses.dataclass(frozen=True)
class ResponseSection:
    """How the compared checkpoints answer the test histories (the judge sees these);
    temperature 0 (or greedy) decodes greedily."""
    num_histories: Count = 200     # test histories drawn (seeded) from the dev/test records
    max_new_tokens: Count = 64
    temperature: NonNegative = 1.0
    top_p: TopP = 0.9
    top_k: NonNegativeInt = 0
    greedy: bool = False
    seed: Seed = 0
    batch_size: Count = 16
    max_prompt_tokens: Count = 448  # oldest history turns are dropped beyond this


@dataclasses.dataclass(frozen=True)
class JudgeSection:
    """The pairwise LLM judge and its tournament (paper Section 4.2, Appendix C)."""
    backend: Literal["openai", "local"] = "openai"
    model: str = "gpt-4o-2024-08-06"
    base_url_env: str = "OPENAI_BASE_URL"  # unset: https://api.openai.com/v1
    api_key_env: str = "OPENAI_API_KEY"
    template: str = "english"              # english | japanese | path to a template file
    comparisons: Count = 100
    concurrency: Count = 8
    timeout_s: Positive = 60.0
    max_retries: NonNegativeInt = 5        # per request, on 429 / 5xx / timeouts / bad bodies
    parse_retries: NonNegativeInt = 2      # re-asks when the answer holds no [[1]]/[[2]]/[[3]]
    seed: Seed = 0
    local_checkpoint: str = ""             # backend=local: HF folder with its tokenizer
    max_new_tokens: Count = 512
    cache: str = ""                        # SQLite file; empty: <out_dir>/judge/judgments.sqlite
    bootstrap: NonNegativeInt = 1000       # Bradley–Terry bootstrap resamples

    @property
    def base_url(self) -> str:
        return os.environ.get(self.base_url_env) or "https://api.openai.com/v1"


@dataclasses.dataclass(frozen=True)
class EvalSection:
    """Which checkpoints to evaluate and how (DNLI ranking and the judge tournament)."""
    checkpoints: tuple[str, ...] = ("sft", "dpo")
    dnli_files: tuple[str, ...] = ()       # empty: the embedded DNLI eval files
    max_examples: Count | None = None      # None: all 542
    batch_size: Count = 8                  # DNLI examples per scoring call (each prompt once, cached)
    # DNLI layout (`eval/dnli_scoring.py`): cached = each prompt's KV cache once, candidates in
    # short rows; packed = a prompt and its candidates per row; full = a row per candidate
    # (batch_size then counts rows). Same scores up to fp32 summation order.
    dnli_layout: Literal["cached", "packed", "full"] = "cached"
    normalise: Literal["sum", "mean", "both"] = "both"
    max_prompt_tokens: Count | None = None  # DNLI prompts are cut (oldest turns first) beyond this
    judge: JudgeSection = JudgeSection()
    responses: ResponseSection = ResponseSection()

    @property
    def normalisations(self) -> tuple[str, ...]:
        return ("sum", "mean") if self.normalise == "both" else (self.normalise,)


@dataclasses.dataclass(frozen=True)
class Config:
    run: RunSection = RunSection()
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    mesh: MeshSection = MeshSection()
    sft: SftSection = SftSection(optimizer=OptimizerConfig(lr=1e-5, schedule="cosine"))
    negatives: NegativesSection = NegativesSection()
    dpo: DpoSection = DpoSection(batch_size=4, optimizer=OptimizerConfig(lr=1e-6, schedule="linear"))
    eval: EvalSection = EvalSection()
    rl: RlSection = RlSection()
    checkpoint: CheckpointSection = CheckpointSection()
