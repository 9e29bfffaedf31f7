"""What the server tests share: a tiny random Llama saved with the SmolLM2 tokenizer (its
ChatML template), and a server over it on loopback."""
from __future__ import annotations

import contextlib
import pathlib
import threading
import time

from hf_reference import tiny_hf_model

NAME = "tiny-chat"
SLOTS, MAX_MODEL_LEN = 4, 256
EOS = 2  # <|im_end|> in the SmolLM2 vocabulary: the tokenizer's EOS
SYSTEM = {"role": "system", "content": "Be brief."}  # short: a chat prompt stays under 64 tokens


def build_checkpoint(folder: pathlib.Path, tokenizers_dir: pathlib.Path) -> pathlib.Path:
    """A random 2-layer Llama over SmolLM2's 49,152-token vocabulary, saved with its tokenizer."""
    import transformers
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizers_dir / "smollm2")
    model = tiny_hf_model("llama", vocab_size=len(tokenizer), max_position_embeddings=512,
                          bos_token_id=1, eos_token_id=EOS)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_server(folder: pathlib.Path, *, max_queue: int = 8, engine=None):
    """A ModelServer over the checkpoint (or over `engine`, sharing its weights)."""
    from pdpo_jax.serve import ModelServer
    if engine is None:
        return ModelServer.load(folder, name=NAME, slots=SLOTS, max_model_len=MAX_MODEL_LEN,
                                max_queue=max_queue, max_top_k=20)
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return ModelServer(engine, tokenizer, name=NAME, max_model_len=MAX_MODEL_LEN,
                       max_queue=max_queue, eos_ids=(EOS,))


def client(url: str):
    import openai
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)


def chat(text: str) -> list[dict]:
    return [SYSTEM, {"role": "user", "content": text}]


def wait_until(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout} s")
        time.sleep(0.01)


@contextlib.contextmanager
def gated(scheduler):
    """Holds the engine thread before each scheduler step until the gate opens (a threading
    Event the block yields), so requests pile up deterministically."""
    gate, step = threading.Event(), scheduler.step

    def held_step():
        if not gate.wait(30):
            raise TimeoutError("the test never opened the gate")
        return step()

    scheduler.step = held_step
    try:
        yield gate
    finally:
        gate.set()
        scheduler.step = step
