"""Persona-dialogue data: readers, the one prompt encoder, and grain batch pipelines.

    records = read_turns("data/synthetic_persona_chat/Synthetic-Persona-Chat_test.csv.gz")
    encoded, stats = encode_records(tokenizer, "english", records, max_total_tokens=512)
    batches = sft_batches(encoded, batch_size=32, pad_id=pad_id(tokenizer), num_epochs=None)
    it = batches.iterator()            # it.get_state() / it.set_state(state) to checkpoint
    batch = next(it)                   # tokens/positions/attention_mask/loss_mask [B/hosts, T]

Batch layouts are documented in `pdpo_jax.data.batches`.
"""
import importlib

# name -> submodule; imported on first use (PEP 562), so that importing one light submodule
# (e.g. the config sections) does not pull in every dependency of the package.
_WHERE = {
    "DEFAULT_BUCKETS": "pdpo_jax.data.batches",
    "bucket_length": "pdpo_jax.data.batches",
    "preference_batch": "pdpo_jax.data.batches",
    "prompt_batch": "pdpo_jax.data.batches",
    "sft_batch": "pdpo_jax.data.batches",
    "DefaultPaths": "pdpo_jax.data.defaults",
    "default_paths": "pdpo_jax.data.defaults",
    "read_dialogue_jsonl": "pdpo_jax.data.dialogue_jsonl",
    "read_dnli": "pdpo_jax.data.dnli",
    "read_dnli_files": "pdpo_jax.data.dnli",
    "DoesNotFit": "pdpo_jax.data.encode",
    "Encoded": "pdpo_jax.data.encode",
    "EncodedPair": "pdpo_jax.data.encode",
    "EncodeStats": "pdpo_jax.data.encode",
    "encode_pair": "pdpo_jax.data.encode",
    "encode_preference": "pdpo_jax.data.encode",
    "encode_records": "pdpo_jax.data.encode",
    "pad_id": "pdpo_jax.data.encode",
    "special_ids": "pdpo_jax.data.encode",
    "read_fbdialog": "pdpo_jax.data.personachat",
    "read_hf_personachat": "pdpo_jax.data.personachat",
    "BatchIterator": "pdpo_jax.data.pipeline",
    "Batches": "pdpo_jax.data.pipeline",
    "plan_epoch": "pdpo_jax.data.pipeline",
    "preference_batches": "pdpo_jax.data.pipeline",
    "prompt_batches": "pdpo_jax.data.pipeline",
    "sft_batches": "pdpo_jax.data.pipeline",
    "read_preference_jsonl": "pdpo_jax.data.preferences",
    "write_preference_jsonl": "pdpo_jax.data.preferences",
    "read_turns": "pdpo_jax.data.readers",
    "DataFormatError": "pdpo_jax.data.records",
    "DnliExample": "pdpo_jax.data.records",
    "PersonaTurn": "pdpo_jax.data.records",
    "PreferencePair": "pdpo_jax.data.records",
    "split_dialogues": "pdpo_jax.data.splits",
    "read_spc_conversations": "pdpo_jax.data.synthetic",
    "read_synthetic_persona_chat": "pdpo_jax.data.synthetic",
    "TEMPLATES": "pdpo_jax.data.templates",
    "PromptTemplate": "pdpo_jax.data.templates",
    "chat_messages": "pdpo_jax.data.templates",
    "get_template": "pdpo_jax.data.templates",
    "render_prompt": "pdpo_jax.data.templates",
}


__all__ = [
    "DEFAULT_BUCKETS", "BatchIterator", "Batches", "DataFormatError", "DefaultPaths", "DnliExample",
    "DoesNotFit", "EncodeStats", "Encoded", "EncodedPair", "PersonaTurn", "PreferencePair",
    "PromptTemplate", "TEMPLATES", "bucket_length", "chat_messages", "default_paths", "encode_pair",
    "encode_preference", "encode_records", "get_template", "pad_id", "plan_epoch",
    "preference_batch", "preference_batches", "prompt_batch", "prompt_batches", "read_dialogue_jsonl",
    "read_dnli", "read_dnli_files", "read_fbdialog", "read_hf_personachat", "read_preference_jsonl",
    "read_spc_conversations", "read_synthetic_persona_chat", "read_turns", "render_prompt",
    "sft_batch", "sft_batches", "special_ids", "split_dialogues", "write_preference_jsonl",
]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
