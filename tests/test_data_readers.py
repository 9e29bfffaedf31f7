"""Readers on the real files (counts cross-checked independently) and on bad input files."""
import collections
import csv
import gzip
import hashlib
import io
import json
import re

import pytest

import pdpo_jax.data as D
from pdpo_jax.data.defaults import DATA_DIR


@pytest.fixture(scope="module")
def personachat_path(shared_dir):
    return shared_dir / "data" / "personachat" / "valid_self_original_no_cands.txt.gz"


# ---------------------------------------------------------------- PersonaChat FbDialog

def test_personachat_valid_counts_and_first_records(personachat_path):
    records = D.read_fbdialog(personachat_path)
    assert len(records) == 7801
    assert len({r.dialogue_id for r in records}) == 1000
    # Independent counts: every dialogue line has a tab; persona lines total 4,483 (shared README).
    lines = gzip.open(personachat_path, "rt", encoding="utf-8").read().split("\n")
    assert sum("\t" in line for line in lines) == 7801
    personas = {r.dialogue_id: r.persona for r in records}
    assert sum(len(p) for p in personas.values()) == 4483
    first, second = records[0], records[1]
    assert first.persona == ("i read twenty books a year.", "i'm a stunt double as my second job.",
                             "i only eat kosher.", "i was raised in a single parent household.")
    assert first.history == ("hello what are doing today ?",)
    assert first.response == "i am good , i just got off work and tired , i have two jobs ."
    assert second.history == (first.history[0], first.response, "i just got done watching a horror movie")
    assert second.response == "i rather read , i've read about 20 books this year ."
    assert records[-1].dialogue_id == "valid_self_original_no_cands/999"
    assert all(len(r.history) % 2 == 1 for r in records)  # partner always speaks last


def test_fbdialog_variants(tmp_path):
    text = ("1 your persona: i like cats.\n2 partner's persona: i like dogs.\n"
            "3 your persona: i am a nurse.\n4 __SILENCE__\thi there !\t\tno|hi there !\n"
            "5 hello ! what do you do ?\ti am a nurse .\t\tyes|i am a nurse .\n"
            "1 your persona: i surf.\n2 hey\tyo .\n")
    path = tmp_path / "both_original.txt"
    path.write_text(text, encoding="utf-8")
    records = D.read_fbdialog(path)
    assert [r.response for r in records] == ["hi there !", "i am a nurse .", "yo ."]
    assert records[0].persona == ("i like cats.", "i am a nurse.")  # partner persona is not the bot's
    assert records[0].history == ()  # bot opens: __SILENCE__ is no history
    assert records[1].history == ("hi there !", "hello ! what do you do ?")
    assert records[2].dialogue_id == "both_original/1" and records[2].persona == ("i surf.",)


def test_hf_personachat_json(tmp_path):
    dialogue = {"personality": ["i like cats.", "i am a nurse."],
                "utterances": [{"history": ["__ SILENCE __"], "candidates": ["no .", "hi !"]},
                               {"history": ["__ SILENCE __", "hi !", "what do you do ?"],
                                "candidates": ["cats .", "i am a nurse ."]}]}
    path = tmp_path / "personachat_self_original.json"
    path.write_text(json.dumps({"train": [dialogue], "valid": [dialogue, dialogue]}))
    records = D.read_hf_personachat(path, split="valid")
    assert len(records) == 4
    assert records[1] == D.PersonaTurn("personachat_self_original/valid/0", ("i like cats.", "i am a nurse."),
                                       ("hi !", "what do you do ?"), "i am a nurse .")
    assert records[0].history == () and records[0].response == "hi !"
    with pytest.raises(D.DataFormatError, match="pass split="):
        D.read_hf_personachat(path)
    train = D.read_turns(path, split="train")
    assert [(r.history, r.response) for r in train] == [(r.history, r.response) for r in records[:2]]


# ---------------------------------------------------------------- Synthetic-Persona-Chat

def _independent_spc_count(path):
    """Bot turns = tagged lines minus same-speaker continuations, from the csv module alone."""
    rows = list(csv.DictReader(io.TextIOWrapper(gzip.open(path), encoding="utf-8", newline="")))
    turns = conversations = 0
    for row in rows:
        speakers = [m.group(1) for line in row["Best Generated Conversation"].split("\n")
                    if (m := re.match(r"\W*User ([12]):", line))]
        turns += sum(1 for i, s in enumerate(speakers) if i == 0 or speakers[i - 1] != s)
        conversations += bool(speakers)
    return len(rows), conversations, turns


@pytest.mark.parametrize("split, rows, conversations, turns",
                         [("test", 968, 966, 26516), ("valid", 1000, 1000, 27734)])
def test_synthetic_persona_chat_counts(shared_dir, split, rows, conversations, turns):
    path = shared_dir / "data" / "synthetic_persona_chat" / f"Synthetic-Persona-Chat_{split}.csv.gz"
    assert _independent_spc_count(path) == (rows, conversations, turns)
    records = D.read_synthetic_persona_chat(path)
    assert len(records) == turns
    assert len({r.dialogue_id for r in records}) == conversations
    convs, cleaning = D.read_spc_conversations(path)
    assert cleaning.conversations == conversations
    assert cleaning.tagged_lines - cleaning.merged_same_speaker_lines == turns


def test_synthetic_persona_chat_content(shared_dir):
    path = shared_dir / "data" / "synthetic_persona_chat" / "Synthetic-Persona-Chat_test.csv.gz"
    records = D.read_synthetic_persona_chat(path)
    user1 = ("I just bought a brand new house.", "I like to dance at the club.",
             "I run a dog obedience school.", "I have a big sweet tooth.", "I like taking and posting selkies.")
    user2 = ("I love to meet new people.", "I have a turtle named timothy.",
             "My favorite sport is ultimate frisbee.", "My parents are living in bora bora.",
             "Autumn is my favorite season.")
    first = [r for r in records if r.dialogue_id == "Synthetic-Persona-Chat_test/0"]
    assert len(first) == 23
    assert first[0] == D.PersonaTurn("Synthetic-Persona-Chat_test/0", user1, (),
                                     "Hi, I'm [User 1's name]. What's your name?")
    assert first[1].persona == user2 and first[1].history == (first[0].response,)
    assert first[1].response == "Hi, I'm [User 2's name]. It's nice to meet you."
    assert first[-1].persona == user1 and first[-1].response == "Bye." and len(first[-1].history) == 22
    only_user2 = D.read_synthetic_persona_chat(path, speakers=(2,))
    assert all(len(r.history) % 2 == 1 for r in only_user2 if r.dialogue_id.endswith("/0"))
    # Markdown-decorated tags (`* * User 1: * * text`) keep only the text.
    assert not any(r.response.startswith("*") for r in records)


# ---------------------------------------------------------------- Dialogue NLI

def test_dnli_counts_and_content(shared_dir):
    paths = [shared_dir / "data" / "dnli_eval" / f"valid_{g}.jsonl.gz" for g in D.records.DNLI_GROUPS]
    examples = D.read_dnli_files(paths)
    assert len(examples) == 542
    assert collections.Counter(e.group for e in examples) == {"attributes": 88, "havenot": 268,
                                                              "likedislike": 186}
    assert {len(e.candidates) for e in examples} == {32, 33}
    for e in examples:
        counts = collections.Counter(c for _, c in e.candidates)
        assert counts["hits"] == 1 and counts["contradict"] == 10 and counts["random"] == 11
        assert counts["entail"] in (10, 11)
        assert e.candidates[0] == (e.gold, "hits")
    first = examples[0]
    assert first.example_id == "attributes/0"
    assert first.persona[0] == "my favourite music is country music ."
    assert first.history[0] == "good evening from alabama ! where are you at ?" and len(first.history) == 7
    assert first.gold == "really ? i cut my hair like hers short and brown ."
    assert first.triple == ("i", "physical_attribute", "brunette")
    assert first.as_turn().response == first.gold


# ---------------------------------------------------------------- generic JSONL, splits, preferences

def test_dialogue_jsonl_speakers(tmp_path):
    dialogue = ["こんにちは。", "こんにちは!", "猫は好き?", "大好きです。"]
    lines = [{"persona": ["私は猫が好きです。"], "dialogue": dialogue},
             {"persona": ["p0"], "dialogue": ["a", "b", "c"], "persona_speaker": 0, "id": "x"},
             {"personas": [["p0"], ["p1"]], "dialogue": ["a", "b", "c"]}]
    path = tmp_path / "jpersonachat.jsonl"
    path.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n", encoding="utf-8")
    records = D.read_turns(path)
    default = [r for r in records if r.dialogue_id == "jpersonachat/0"]
    assert [(r.history, r.response) for r in default] == [
        (tuple(dialogue[:1]), dialogue[1]), (tuple(dialogue[:3]), dialogue[3])]
    assert [r.response for r in records if r.dialogue_id == "x"] == ["a", "c"]
    both = [(r.persona, r.response) for r in records if r.dialogue_id == "jpersonachat/2"]
    assert both == [(("p0",), "a"), (("p1",), "b"), (("p0",), "c")]


def test_split_dialogues_is_seeded_and_dialogue_level(personachat_path):
    records = D.read_fbdialog(personachat_path)
    train, dev, test = D.split_dialogues(records, (8, 1, 1), seed=0)
    ids = [{r.dialogue_id for r in s} for s in (train, dev, test)]
    assert [len(i) for i in ids] == [800, 100, 100]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert len(train) + len(dev) + len(test) == len(records)
    assert D.split_dialogues(records, (8, 1, 1), seed=0) == (train, dev, test)
    assert D.split_dialogues(records, (8, 1, 1), seed=1)[1] != dev
    assert [len(s) for s in D.split_dialogues(list(range(10)), (8, 1, 1), seed=3)] == [8, 1, 1]


def test_preference_jsonl_round_trip(tmp_path):
    pairs = [D.PreferencePair(("i like cats.",), ("hi !",), "hello , i love cats .", "i hate cats .",
                              "p0", {"prompt": "Your persona: ...", "negative_persona": ["i surf."]})]
    for name in ("pairs.jsonl", "pairs.jsonl.gz"):
        assert D.write_preference_jsonl(tmp_path / name, pairs) == 1
        back = D.read_preference_jsonl(tmp_path / name)
        assert back == pairs and back[0].metadata == pairs[0].metadata


# ---------------------------------------------------------------- embedded data

def test_embedded_data_matches_readme_and_stays_apart_from_dnli():
    paths = D.default_paths()
    readme = (DATA_DIR / "README.md").read_text()
    for path in (paths.train, paths.dev, *paths.dnli):
        assert hashlib.sha256(path.read_bytes()).hexdigest() in readme, path
    train = D.read_synthetic_persona_chat(paths.train)
    assert len(train) == 26516
    dnli = D.read_dnli_files(paths.dnli)
    assert len(dnli) == 542

    def norm(s):
        return re.sub(r"[^a-z0-9]", "", s.lower())
    train_utterances = {norm(u) for r in train for u in (*r.history, r.response)}
    dnli_utterances = {norm(u) for e in dnli for u in (*e.history, e.gold)}
    assert not {u for u in train_utterances & dnli_utterances if len(u) >= 25}


# ---------------------------------------------------------------- bad input

BAD_FILES = [
    ("a.txt", "1 your persona: i like cats.\nhello there\tyo\n", D.read_fbdialog, ":2:", "hello there"),
    ("b.txt", "1 your persona: i like cats.\n2 hello there yo\n", D.read_fbdialog, ":2:", "no tab"),
    ("c.txt", "1 hi\tyo .\n", D.read_fbdialog, ":1:", "empty persona"),
    ("d.txt", "1 your persona: a.\n3 hi\tyo\n", D.read_fbdialog, ":2:", "turn number 3"),
    ("e.csv", '"user 1 personas","user 2 personas","Best Generated Conversation"\n'
              '"I surf.","I ski.","User 1: hi\nUser 2: yo"\n"I run."\n',
     D.read_synthetic_persona_chat, ":4:", "no value for columns"),
    ("f.csv", '"user 1 personas","conversation"\n"a","b"\n', D.read_synthetic_persona_chat, ":1:",
     "lacks columns"),
    ("g.csv", '"user 1 personas","user 2 personas","Best Generated Conversation"\n'
              '"I surf.","  \n","User 1: hi"\n', D.read_synthetic_persona_chat, ":2:", "empty"),
    ("h.jsonl", '{"persona": ["a"], "dialogue": ["x", "y"]}\n{"persona": ["a"], "dialogue": [\n',
     D.read_dialogue_jsonl, ":2:", "not JSON"),
    ("i.jsonl", '{"persona": [], "dialogue": ["x", "y"]}\n', D.read_dialogue_jsonl, ":1:", "empty persona"),
    ("j.jsonl", '{"persona": ["a"], "history": ["x"], "chosen": "y"}\n', D.read_preference_jsonl, ":1:",
     "rejected"),
    ("valid_attributes.jsonl", '{"persona": ["a"], "prefix": ["x"], "candidates": {"label": ["y"]}}\n',
     D.read_dnli, ":1:", "candidates"),
]


@pytest.mark.parametrize("name, text, reader, line, problem", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_files_name_file_line_and_problem(tmp_path, name, text, reader, line, problem):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(D.DataFormatError, match=re.escape(problem)) as err:
        reader(path)
    assert f"{path}{line}" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "sjis.txt.gz"
    path.write_bytes(gzip.compress("1 your persona: a.\n2 こんにちは\tはい\n".encode("cp932")))
    with pytest.raises(D.DataFormatError, match=r"sjis\.txt\.gz:2: .*not UTF-8.*iconv"):
        D.read_fbdialog(path)


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown persona-dialogue format '.xlsx'"):
        D.read_turns(tmp_path / "japanese_persona_chat.xlsx")
