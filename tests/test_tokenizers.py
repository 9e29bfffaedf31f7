"""The real tokenizers in ../shared/data/tokenizers load offline through transformers and round-trip."""
import pytest
import transformers

TEXT_EN = "hi ! i love hiking with my two dogs . what do you do for fun ?"
TEXT_JA = "こんにちは。私は三重県の津市に住んでいます。"


@pytest.mark.parametrize("name, cls, text", [
    ("gpt2", transformers.GPT2Tokenizer, TEXT_EN),  # no tokenizer_config.json: name the class
    ("mistral_v1", transformers.LlamaTokenizer, TEXT_EN),
    ("qwen2", transformers.AutoTokenizer, TEXT_EN),
    ("smollm2", transformers.AutoTokenizer, TEXT_EN),
    ("rinna_japanese_gpt2", transformers.T5Tokenizer, TEXT_JA),
])
def test_tokenizer_loads_and_round_trips(tokenizers_dir, name, cls, text):
    tok = cls.from_pretrained(str(tokenizers_dir / name))
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > 3
    assert tok.decode(ids, skip_special_tokens=True).strip() == text


def test_gpt2_known_ids(tokenizers_dir):
    tok = transformers.GPT2Tokenizer.from_pretrained(str(tokenizers_dir / "gpt2"))
    assert tok.encode("Hello world") == [15496, 995]  # the ids the shared README documents
