"""NLI data: the Dialogue NLI and plain readers, their errors, and the substitute NLI set
(deterministic, disjoint from the DNLI eval files, label counts as data/README.md documents)."""
import hashlib
import json
import pathlib

import pytest

from pdpo_jax.data import default_paths, read_dnli_files
from pdpo_jax.data.records import DataFormatError
from pdpo_jax.reward.contradict import contradict
from pdpo_jax.reward.nli_data import NliPair, read_nli
from pdpo_jax.reward.substitute import DEV_FILE, STATS_FILE, TRAIN_FILE, normalized

# Two records as Dialogue NLI releases them (dialogue_nli_train.jsonl is one JSON array).
DNLI_RECORDS = [
    {"dtype": "matchingtriple_up", "id": "train_1", "label": "positive",
     "sentence1": "i have two dogs .", "sentence2": "i have two dogs and a cat .",
     "triple1": ["i", "have_pet", "dog"], "triple2": ["i", "have_pet", "dog"]},
    {"dtype": "negation_pp", "id": "train_2", "label": "negative",
     "sentence1": "i love to cook .", "sentence2": "i hate cooking .",
     "triple1": ["i", "like_activity", "cook"], "triple2": ["i", "dislike", "cook"]},
    {"dtype": "misc_up", "id": "train_3", "label": "neutral",
     "sentence1": "i work as a nurse .", "sentence2": "my favorite color is blue .",
     "triple1": ["i", "has_profession", "nurse"], "triple2": ["i", "favorite_color", "blue"]},
]
WANT = [("i have two dogs .", "i have two dogs and a cat .", "entailment"),
        ("i love to cook .", "i hate cooking .", "contradiction"),
        ("i work as a nurse .", "my favorite color is blue .", "neutral")]


@pytest.mark.parametrize("layout", ["json_array", "json_lines", "plain"])
def test_readers(tmp_path, layout):
    path = tmp_path / "nli.jsonl"
    if layout == "json_array":
        path.write_text(json.dumps(DNLI_RECORDS))  # one line, as released
    elif layout == "json_lines":
        path.write_text("".join(json.dumps(r) + "\n" for r in DNLI_RECORDS))
    else:
        labels = {"positive": "entailment", "negative": "contradiction", "neutral": "neutral"}
        path.write_text("".join(json.dumps({"premise": r["sentence1"], "hypothesis": r["sentence2"],
                                            "label": labels[r["label"]], "rule": "x"}) + "\n"
                                for r in DNLI_RECORDS))
    pairs = read_nli(path)
    assert [(p.premise, p.hypothesis, p.label) for p in pairs] == WANT
    if layout != "plain":
        assert pairs[0].extra["dtype"] == "matchingtriple_up" and pairs[1].extra["id"] == "train_2"


ARRAY_WITH_BAD_LABEL = ('[\n{"sentence1": "a", "sentence2": "b", "label": "positive"},\n'
                        '{"sentence1": "a", "sentence2": "b", "label": "maybe"}\n]\n')


@pytest.mark.parametrize("text, message", [
    (('{"premise": "a", "hypothesis": "b", "label": "entailment"}\n'
      '{"premise": "a", "hypothesis": "b", "label": "maybe"}\n'),
     (r"nli.jsonl:2: unknown label 'maybe'; use positive/neutral/negative \(Dialogue NLI\) or "
      r"entailment/neutral/contradiction")),
    ('{"premise": "a", "label": "neutral"}\n', r"nli.jsonl:1: field 'hypothesis' must be a non-empty string"),
    ('{"premise": "a", "hypothesis": "b"}\n', r"nli.jsonl:1: field 'label' is missing"),
    ('{"premise": "a", "hypothesis": "b", "label": "neutral"}\n{"premise": \n',
     r"nli.jsonl:2: not JSON"),
    ('{"text": "a", "label": "neutral"}\n', (r"nli.jsonl:1: record has fields \['label', 'text'\], "
                                              r"neither sentence1/sentence2 nor premise/hypothesis")),
    (ARRAY_WITH_BAD_LABEL, r"nli.jsonl:3: unknown label 'maybe'"),
    ('[\n{"sentence1": "a", "sentence2": "b", "label": "positive"},\n["x"]\n]', r"nli.jsonl:3: expected a JSON object"),
    ('[\n{"sentence1": "a", "sentence2": "b", "label": "positive"},\n{"sentence1": \n',
     r"nli.jsonl:4: not JSON"),
])
def test_reader_errors_name_file_line_value_and_fix(tmp_path, text, message):
    path = tmp_path / "nli.jsonl"
    path.write_text(text)
    with pytest.raises(DataFormatError, match=message):
        read_nli(path)


@pytest.mark.parametrize("sentence, want, rule", [
    ("I have a dog.", "I do not have a dog.", "have_negated"),
    ("I am an old man.", "I am a young man.", "be_antonym"),
    ("I'm a vegan.", "I am not a vegan.", "be_negated"),
    ("I love rap music.", "I hate rap music.", "love_to_hate"),
    ("I only drink water.", "I do not drink water.", "verb_negated"),
    ("I do not want kids.", "I want kids.", "do_not_removed"),
    ("I graduated from college.", "I never graduated from college.", "past_never"),
    ("My mom works at a bank.", "My mom does not work at a bank.", "my_verb_negated"),
    ("Autumn is my favorite season.", "Autumn is not my favorite season.", "favorite_negated"),
    ("Do you have a dog?", None, None),
])
def test_contradiction_rules(sentence, want, rule):
    edit = contradict(sentence)
    assert (edit and edit.text, edit and edit.rule) == (want, rule)


def _documented() -> dict[str, dict]:
    """The split table of data/README.md's "Substitute NLI set" section: conversations, label
    counts and the JSONL's sha256 per split (seed 0)."""
    text = (pathlib.Path(__file__).resolve().parents[1] / "data" / "README.md").read_text()
    section = text.split("## Substitute NLI set", 1)[1]
    out = {}
    for line in section.splitlines():
        cells = [c.strip().strip("`").replace(",", "") for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] in ("train", "dev"):
            out[cells[0]] = {"conversations": int(cells[1]), "sha256": cells[5],
                             "labels": dict(zip(("entailment", "neutral", "contradiction"),
                                                map(int, cells[2:5])))}
    assert set(out) == {"train", "dev"}, "data/README.md lost the substitute set's table"
    return out


@pytest.fixture(scope="module")
def substitute_dir(tmp_path_factory) -> pathlib.Path:
    """The substitute set written by the CLI (seed 0)."""
    from pdpo_jax.reward.__main__ import main
    out = tmp_path_factory.mktemp("substitute")
    assert main(["build-substitute", str(out)]) == 0
    return out


def test_substitute_set_is_as_documented_and_deterministic(substitute_dir):
    stats, documented = json.loads((substitute_dir / STATS_FILE).read_text()), _documented()
    for split, name in (("train", TRAIN_FILE), ("dev", DEV_FILE)):
        assert stats[split]["labels"] == documented[split]["labels"], split
        assert stats["conversations"][split] == documented[split]["conversations"], split
        # the same bytes in any process (PYTHONHASHSEED does not matter)
        assert hashlib.sha256((substitute_dir / name).read_bytes()).hexdigest() == \
            documented[split]["sha256"], name
    train, dev = read_nli(substitute_dir / TRAIN_FILE), read_nli(substitute_dir / DEV_FILE)
    assert all(isinstance(p, NliPair) and p.extra["rule"] for p in train + dev)
    keys = {(normalized(p.premise), normalized(p.hypothesis)) for p in train}
    assert len(keys) == len(train)  # no repeats
    assert not keys & {(normalized(p.premise), normalized(p.hypothesis)) for p in dev}


def test_substitute_set_shares_no_sentence_with_dnli_eval(substitute_dir):
    dnli = set()
    for ex in read_dnli_files(default_paths().dnli):
        texts = (*ex.persona, *ex.history, *(t for t, _ in ex.candidates), ex.gold,
                 ex.relevant_persona_sentence)
        dnli.update(normalized(t) for t in texts)
    pairs = read_nli(substitute_dir / TRAIN_FILE) + read_nli(substitute_dir / DEV_FILE)
    overlap = {s for p in pairs for s in (p.premise, p.hypothesis) if normalized(s) in dnli}
    assert not overlap, sorted(overlap)[:5]
