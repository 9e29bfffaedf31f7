"""Builds data/tokenizer_demo: a 4,096-token byte-level BPE trained on the embedded SPC test split.

The demo trains a tiny model from scratch on 2 CPU cores; a 50k vocabulary would spend most of
its compute in the LM head, so it gets its own small tokenizer. Deterministic: same data, same
files. Run: .venv/bin/python tools/build_demo_tokenizer.py
"""
import pathlib

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from pdpo_jax.data import default_paths, read_spc_conversations

OUT = pathlib.Path(__file__).resolve().parents[1] / "data" / "tokenizer_demo"
EOS = "<|endoftext|>"


def texts():
    conversations, _ = read_spc_conversations(default_paths().train)
    for conv in conversations:
        for persona in conv.personas:
            yield from persona
        for _, text in conv.turns:
            yield text


def main():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS,
                                   model_max_length=1024)
    OUT.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(OUT)
    print(OUT, len(fast))


if __name__ == "__main__":
    main()
