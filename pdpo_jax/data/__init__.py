"""Persona-dialogue data: readers, the one prompt encoder, and grain batch pipelines.

    records = read_turns("data/synthetic_persona_chat/Synthetic-Persona-Chat_test.csv.gz")
    encoded, stats = encode_records(tokenizer, "english", records, max_total_tokens=512)
    batches = sft_batches(encoded, batch_size=32, pad_id=pad_id(tokenizer), num_epochs=None)
    it = batches.iterator()            # it.get_state() / it.set_state(state) to checkpoint
    batch = next(it)                   # tokens/positions/attention_mask/loss_mask [B/hosts, T]

Batch layouts are documented in `pdpo_jax.data.batches`.
"""
from pdpo_jax.data.batches import (DEFAULT_BUCKETS, bucket_length, preference_batch, prompt_batch,
                                   sft_batch)
from pdpo_jax.data.defaults import DefaultPaths, default_paths
from pdpo_jax.data.dialogue_jsonl import read_dialogue_jsonl
from pdpo_jax.data.dnli import read_dnli, read_dnli_files
from pdpo_jax.data.encode import (DoesNotFit, Encoded, EncodedPair, EncodeStats, encode_pair,
                                  encode_preference, encode_records, pad_id, special_ids)
from pdpo_jax.data.personachat import read_fbdialog, read_hf_personachat
from pdpo_jax.data.pipeline import (BatchIterator, Batches, plan_epoch, preference_batches,
                                    prompt_batches, sft_batches)
from pdpo_jax.data.preferences import read_preference_jsonl, write_preference_jsonl
from pdpo_jax.data.readers import read_turns
from pdpo_jax.data.records import DataFormatError, DnliExample, PersonaTurn, PreferencePair
from pdpo_jax.data.splits import split_dialogues
from pdpo_jax.data.synthetic import read_spc_conversations, read_synthetic_persona_chat
from pdpo_jax.data.templates import (TEMPLATES, PromptTemplate, chat_messages, get_template,
                                     render_prompt)

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
