"""Persona-dialogue data: readers, the one prompt encoder, and grain batch pipelines.

    records = read_turns("data/synthetic_persona_chat/Synthetic-Persona-Chat_test.csv.gz")
    encoded, stats = encode_records(tokenizer, "english", records, max_total_tokens=512)
    batches = sft_batches(encoded, batch_size=32, pad_id=pad_id(tokenizer), num_epochs=None)
    it = batches.iterator()            # it.get_state() / it.set_state(state) to checkpoint
    batch = next(it)                   # tokens/positions/attention_mask/loss_mask [B/hosts, T]

Batch layouts are documented in `pdpo_jax.data.batches`.
"""
from pdpo_jax._lazy import lazy_exports

# Each name imports its submodule on first use (see pdpo_jax._lazy).
__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    ".batches": ("DEFAULT_BUCKETS", "EncodedText", "bucket_length", "classification_batch",
        "left_pad", "preference_batch", "prompt_batch", "round_up", "sft_batch"),
    ".defaults": ("DefaultPaths", "default_paths"),
    ".dialogue_jsonl": ("read_dialogue_jsonl",),
    ".dnli": ("read_dnli", "read_dnli_files"),
    ".packing": ("PackedRow", "pack_continuations", "packed_batch"),
    ".encode": ("DoesNotFit", "Encoded", "EncodedPair", "EncodeStats", "encode_pair",
        "encode_preference", "encode_records", "pad_id", "special_ids"),
    ".personachat": ("read_fbdialog", "read_hf_personachat"),
    ".loader": ("BatchIterator", "Batches", "Packing", "classification_batches", "plan_epoch",
        "preference_batches", "prompt_batches", "sft_batches"),
    ".preferences": ("read_preference_jsonl", "write_preference_jsonl"),
    ".readers": ("read_turns",),
    ".records": ("DataFormatError", "DnliExample", "PersonaTurn", "PreferencePair"),
    ".splits": ("split_dialogues",),
    ".subsets": ("disjoint_indices", "sample_indices"),
    ".synthetic": ("read_spc_conversations", "read_synthetic_persona_chat"),
    ".templates": ("TEMPLATES", "PromptTemplate", "chat_messages", "get_template",
        "render_prompt"),
})
