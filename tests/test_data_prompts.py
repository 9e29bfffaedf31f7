"""encode_pair with every real tokenizer in ../shared/data/tokenizers."""
import numpy as np
import pytest

import pdpo_jax.data as D

PERSONA = ("i read twenty books a year.", "i'm a stunt double as my second job.")
HISTORY = ("hello what are doing today ?", "i am good , i just got off work .",
           "i just got done watching a horror movie")
RESPONSE = "i rather read , i've read about 20 books this year ."
JA_PERSONA = ("私は猫が好きです。", "私は看護師です。")
JA_HISTORY = ("こんにちは。", "こんにちは!お元気ですか?", "元気です。ペットは飼っていますか?")
JA_RESPONSE = "はい、猫を二匹飼っています。"


@pytest.fixture(scope="module")
def toks(tokenizers_dir):
    from transformers import AutoTokenizer, GPT2TokenizerFast, LlamaTokenizer, Qwen2Tokenizer, T5Tokenizer
    return {
        "gpt2": GPT2TokenizerFast.from_pretrained(tokenizers_dir / "gpt2"),
        # Mistral's own tokenizer_config sets add_bos_token; the bare .model here does not.
        "mistral": LlamaTokenizer.from_pretrained(tokenizers_dir / "mistral_v1", add_bos_token=True),
        "mistral_nobos": LlamaTokenizer.from_pretrained(tokenizers_dir / "mistral_v1"),
        "qwen2": Qwen2Tokenizer.from_pretrained(tokenizers_dir / "qwen2"),
        "smollm2": AutoTokenizer.from_pretrained(tokenizers_dir / "smollm2"),
        "rinna": T5Tokenizer.from_pretrained(tokenizers_dir / "rinna_japanese_gpt2"),
    }


def _nospace(text):
    return "".join(text.split())


TEXT_CASES = [("gpt2", "english", 0), ("mistral", "english", 1), ("mistral_nobos", "english", 0),
              ("qwen2", "english", 0), ("smollm2", "english", 0), ("rinna", "japanese", 0)]


@pytest.mark.parametrize("name, template, n_bos", TEXT_CASES, ids=[c[0] for c in TEXT_CASES])
def test_text_template_boundary_bos_eos_and_mask(toks, name, template, n_bos):
    tok = toks[name]
    persona, history, response = ((JA_PERSONA, JA_HISTORY, JA_RESPONSE) if template == "japanese"
                                  else (PERSONA, HISTORY, RESPONSE))
    enc = D.encode_pair(tok, template, persona, history, response)
    bos, eos = D.special_ids(tok)
    # BOS exactly when the tokenizer adds one, once; the response ends with EOS, once.
    assert (bos is not None) == bool(n_bos)
    assert list(enc.prompt_ids[:n_bos]) == ([tok.bos_token_id] if n_bos else [])
    assert enc.response_ids[-1] == eos == tok.eos_token_id
    assert eos not in enc.prompt_ids and eos not in enc.response_ids[:-1]
    # Separate tokenization == tokenizing the joined text: the sampler continues what training saw.
    tpl = D.get_template(template)
    prompt_text = D.render_prompt(tpl, persona, history)
    joined = tok(prompt_text + tpl.response_prefix + response, add_special_tokens=False)["input_ids"]
    assert joined == enc.prompt_ids[n_bos:].tolist() + enc.response_ids[:-1].tolist()
    # Decoding gives back persona, history and response.
    decoded = _nospace(tok.decode(enc.prompt_ids))
    for line in (*persona, *history):
        assert _nospace(line) in decoded
    assert _nospace(tok.decode(enc.response_ids[:-1])) == _nospace(response)
    # The loss mask covers exactly the response ids, EOS included.
    batch = D.sft_batch([enc], 128, D.pad_id(tok))
    np.testing.assert_array_equal(batch["tokens"][0][batch["loss_mask"][0]], enc.response_ids)


@pytest.mark.parametrize("name", ["qwen2", "smollm2"])
def test_chat_template_response_is_the_assistant_turn(toks, name):
    tok = toks[name]
    enc = D.encode_pair(tok, "chat", PERSONA, HISTORY, RESPONSE)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert enc.response_ids[-1] == im_end and im_end not in enc.response_ids[:-1]
    assert tok.decode(enc.response_ids) == RESPONSE + "<|im_end|>"
    messages = D.chat_messages(D.get_template("chat"), PERSONA, HISTORY, RESPONSE)
    full = tok.apply_chat_template(messages, tokenize=False)
    full = full[:full.rindex("<|im_end|>") + len("<|im_end|>")]
    assert tok(full, add_special_tokens=False)["input_ids"] == enc.tokens.tolist()
    prompt = tok.decode(enc.prompt_ids)
    assert "<|im_start|>system\n" + D.templates.persona_text(D.get_template("chat"), PERSONA) in prompt
    assert prompt.endswith("<|im_start|>user\n" + HISTORY[-1] + "<|im_end|>\n<|im_start|>assistant\n")


def test_chat_history_starts_with_user_and_needs_a_partner_turn(toks):
    tok = toks["smollm2"]
    enc = D.encode_pair(tok, "chat", PERSONA, HISTORY[1:], RESPONSE)  # 2 turns: oldest is the bot's
    prompt = tok.decode(enc.prompt_ids)
    assert HISTORY[1] not in prompt and "<|im_start|>assistant\n" + HISTORY[1] not in prompt
    assert enc.history_dropped == 0
    with pytest.raises(D.DoesNotFit, match="no_partner_turn"):
        D.encode_pair(tok, "chat", PERSONA, (), RESPONSE)


def test_truncation_drops_oldest_turns_only(shared_dir, toks):
    tok = toks["gpt2"]
    records = D.read_fbdialog(shared_dir / "data/personachat/valid_self_original_no_cands.txt.gz")
    rec = max(records, key=lambda r: len(r.history))
    full = D.encode_pair(tok, "english", rec.persona, rec.history, rec.response)
    budget = full.length - 60
    enc = D.encode_pair(tok, "english", rec.persona, rec.history, rec.response, max_total_tokens=budget)
    assert enc.length <= budget and enc.history_dropped > 0
    np.testing.assert_array_equal(enc.response_ids, full.response_ids)
    kept = rec.history[enc.history_dropped:]
    expected = D.encode_pair(tok, "english", rec.persona, kept, rec.response)
    np.testing.assert_array_equal(enc.prompt_ids, expected.prompt_ids)
    # Minimal: keeping one more turn would not fit.
    one_more = D.encode_pair(tok, "english", rec.persona, rec.history[enc.history_dropped - 1:], rec.response)
    assert one_more.length > budget
    decoded = tok.decode(enc.prompt_ids)
    assert all(p in decoded for p in rec.persona) and rec.history[-1] in decoded
    persona_and_last = D.encode_pair(tok, "english", rec.persona, rec.history[-1:], rec.response).length
    with pytest.raises(D.DoesNotFit, match="prompt_too_long"):
        D.encode_pair(tok, "english", rec.persona, rec.history, rec.response,
                      max_total_tokens=persona_and_last - 1)
    with pytest.raises(D.DoesNotFit, match="response_too_long"):
        D.encode_pair(tok, "english", rec.persona, rec.history, rec.response,
                      max_response_tokens=len(full.response_ids) - 1)


def test_chat_truncation_keeps_user_first(toks):
    tok = toks["qwen2"]
    history = tuple(f"turn number {i} of a long chat about books and movies ." for i in range(9))
    full = D.encode_pair(tok, "chat", PERSONA, history, RESPONSE)
    enc = D.encode_pair(tok, "chat", PERSONA, history, RESPONSE, max_total_tokens=full.length - 20)
    assert enc.history_dropped == 2  # pairs, so the first message stays a user turn
    prompt = tok.decode(enc.prompt_ids)
    assert "turn number 1 " not in prompt and "<|im_start|>user\nturn number 2 " in prompt


def test_encode_records_counts_and_all_personachat_valid(shared_dir, toks):
    tok = toks["gpt2"]
    records = D.read_fbdialog(shared_dir / "data/personachat/valid_self_original_no_cands.txt.gz")
    encoded, stats = D.encode_records(tok, "english", records)
    assert stats == D.EncodeStats(total=7801, kept=7801, truncated=0, history_turns_dropped=0, dropped={})
    assert [e.source_index for e in encoded] == list(range(7801))
    short, stats = D.encode_records(tok, "english", records[:300], max_total_tokens=100,
                                    max_response_tokens=20)
    assert stats.kept == len(short) and stats.total == stats.kept + sum(stats.dropped.values())
    assert stats.dropped["response_too_long"] > 0 and stats.truncated > 0
    assert all(e.length <= 100 and len(e.response_ids) <= 20 for e in short)
    kept = {e.source_index for e in short}
    assert all(len(records[i].history) > 0 for i in kept)


@pytest.mark.parametrize("name", ["smollm2", "gpt2"])
def test_pad_equal_to_eos_keeps_eos_in_the_loss(toks, name):
    tok = toks[name]
    enc = D.encode_pair(tok, "english", PERSONA, HISTORY, RESPONSE)
    pad = tok.eos_token_id  # SmolLM2 ships pad == eos; GPT-2 is usually padded with eos
    batch = D.sft_batch([enc, None], 256, pad)
    n, r = enc.length, len(enc.response_ids)
    assert batch["tokens"][0, n - 1] == pad and batch["loss_mask"][0, n - 1]
    assert batch["loss_mask"][0].sum() == r and not batch["loss_mask"][0, n:].any()
    assert not batch["loss_mask"][1].any() and not batch["attention_mask"][1].any()


def test_eos_in_text_is_refused(toks):
    # transformers 5 T5Tokenizer maps unknown pieces (e.g. Latin capitals for rinna's vocab) to id 2,
    # which is rinna's </s>: a silent EOS in the middle of a prompt would corrupt training.
    tok = toks["rinna"]
    with pytest.raises(D.DoesNotFit, match="eos_in_text"):
        D.encode_pair(tok, "japanese", JA_PERSONA, JA_HISTORY, "DVDを見ます。")
    records = [D.PersonaTurn("d", JA_PERSONA, JA_HISTORY, r) for r in (JA_RESPONSE, "DVDを見ます。")]
    encoded, stats = D.encode_records(tok, "japanese", records)
    assert len(encoded) == 1 and stats.dropped == {"eos_in_text": 1}


def test_encode_preference_shares_one_prompt(toks):
    tok = toks["gpt2"]
    pair = D.PreferencePair(PERSONA, HISTORY, RESPONSE, "i do not like to read at all , i only watch tv .")
    enc = D.encode_preference(tok, "english", pair.persona, pair.history, pair.chosen, pair.rejected)
    for side, response in (("chosen_ids", pair.chosen), ("rejected_ids", pair.rejected)):
        single = D.encode_pair(tok, "english", PERSONA, HISTORY, response)
        np.testing.assert_array_equal(enc.prompt_ids, single.prompt_ids)
        np.testing.assert_array_equal(getattr(enc, side), single.response_ids)
    tight = D.encode_preference(tok, "english", PERSONA, HISTORY, pair.chosen, pair.rejected,
                                max_total_tokens=enc.length - 5)
    assert tight.history_dropped > 0 and tight.length <= enc.length - 5
    (again,), stats = D.encode_records(tok, "english", [pair])
    np.testing.assert_array_equal(again.rejected_ids, enc.rejected_ids)


def test_prompt_only_and_unknown_template(toks):
    enc = D.encode_pair(toks["gpt2"], "english", PERSONA, HISTORY)
    assert len(enc.response_ids) == 0 and toks["gpt2"].decode(enc.prompt_ids).endswith("\nYou:")
    with pytest.raises(ValueError, match="did you mean 'english'"):
        D.get_template("englsh")
