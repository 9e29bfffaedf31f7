"""Loading a checkpoint to serve: the model in the decode layout, its tokenizer, its stop ids."""
from __future__ import annotations

import logging
import pathlib

from pdpo_jax import sharding
from pdpo_jax.data.encode import pad_id
from pdpo_jax.errors import UserError
from pdpo_jax.fileio import checkpoint_fingerprint
from pdpo_jax.models import from_pretrained
from pdpo_jax.sampling import SamplingConfig, stop_ids
from pdpo_jax.sampling.engine import Engine

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16")
PROMPT_BUCKET = 64  # prompt lengths round up to this: few prefill programs compile


def load_engine(folder, *, slots: int, max_model_len: int, dtype: str = "float32",
                max_top_k: int = 50, mesh=None, steps_per_call: int = 8):
    """(Engine, tokenizer, EOS ids, checkpoint fingerprint) for an HF folder with a tokenizer.

    The weights load straight into the decode layout in `dtype` (one copy); the engine reports
    each token's log-prob and bounds top_k by `max_top_k`. Bad settings raise UserError.
    """
    import transformers

    folder = pathlib.Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise UserError(f"--checkpoint {folder}: not an HF checkpoint folder (no config.json)")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if slots < 1 or max_top_k < 0:
        raise UserError(f"--slots {slots} must be >= 1 and --max-top-k {max_top_k} >= 0")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise UserError(f"--checkpoint {folder}: no tokenizer could be loaded ({e}); save the "
                        "tokenizer beside the weights") from None
    model = from_pretrained(folder, dtype=dtype, param_dtype=dtype, stack_layers=False,
                            mesh=mesh, rules=sharding.SAMPLING_RULES)
    if max_model_len > model.cfg.max_positions or max_model_len < PROMPT_BUCKET:
        raise UserError(f"--max-model-len {max_model_len} must be in [{PROMPT_BUCKET}, "
                        f"{model.cfg.max_positions}] (the model's max_position_embeddings)")
    if len(tokenizer) > model.cfg.vocab_size:
        log.warning("the tokenizer has %d tokens, the model %d: prompts holding ids beyond the "
                    "model's are refused", len(tokenizer), model.cfg.vocab_size)
    eos_ids = stop_ids(tokenizer, model.cfg.eos_token_id, folder / "generation_config.json")
    if not eos_ids:
        raise UserError(f"{folder}: neither the tokenizer nor config.json / generation_config.json "
                        "names an EOS token; replies could never stop before max_tokens")
    cfg = SamplingConfig(max_model_len, top_k=max_top_k, eos_ids=eos_ids, pad_id=pad_id(tokenizer),
                         logprobs=True)
    engine = Engine(model, cfg, slots=slots, mesh=mesh, prompt_bucket=PROMPT_BUCKET,
                    steps_per_call=steps_per_call)
    return engine, tokenizer, eos_ids, checkpoint_fingerprint(folder)
