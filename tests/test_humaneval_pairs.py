"""Reading the judge's pairs, the instructions shown to annotators, and the CLI's one-line errors."""
import json
import os
import subprocess
import sys

import pytest
from humaneval_data import MODEL_A, MODEL_B, english_pairs, pair_row, write_judge_folder

from pdpo_jax.eval.judge import load_template
from pdpo_jax.humaneval.pairs import PairsError, load_pairs, pairs_digest, speaker_labels
from pdpo_jax.humaneval.texts import texts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pairs_from_a_judge_folder_a_run_folder_or_a_file(tmp_path):
    rows = english_pairs(3)
    folder = write_judge_folder(tmp_path / "run" / "eval" / "judge", rows)
    for where in (folder, tmp_path / "run", folder / "comparisons.jsonl"):
        pairs = load_pairs(where)
        assert [p.id for p in pairs] == [0, 1, 2]
    p = pairs[1]
    assert (p.first, p.second, p.verdict, p.history) == (MODEL_A, MODEL_B, 2, 101)
    assert p.persona == tuple(rows[1]["persona"]) and p.dialogue == tuple(rows[1]["dialogue"])
    assert p.shown(False) == (rows[1]["response_first"], rows[1]["response_second"])
    assert p.shown(True) == (rows[1]["response_second"], rows[1]["response_first"])


def test_a_pure_human_study_needs_no_verdict(tmp_path):
    row = pair_row(0)
    del row["verdict"], row["answer"], row["winner"]
    assert load_pairs(write_judge_folder(tmp_path, [row]))[0].verdict is None


def test_the_digest_ignores_the_judge_verdicts(tmp_path):
    a = load_pairs(write_judge_folder(tmp_path / "a", english_pairs(3, verdicts=(1,))))
    b = load_pairs(write_judge_folder(tmp_path / "b", english_pairs(3, verdicts=(3,))))
    c = load_pairs(write_judge_folder(tmp_path / "c", english_pairs(4)))
    assert pairs_digest(a) == pairs_digest(b) != pairs_digest(c)


BAD_LINES = [
    ("{not json", "not JSON"),
    ("[1, 2]", "expected a JSON object, got [1, 2]"),
    (json.dumps({k: v for k, v in pair_row(5).items() if k != "persona"}), "field 'persona' missing"),
    (json.dumps({**pair_row(5), "persona": "I like cats"}),
     "field 'persona' = \"I like cats\"; expected a non-empty list of strings"),
    (json.dumps({**pair_row(5), "index": -1}), "field 'index' = -1; expected an integer >= 0"),
    (json.dumps({**pair_row(5), "index": "5"}), "field 'index' = \"5\"; expected an integer"),
    (json.dumps({**pair_row(5), "second": MODEL_A}), "'first' and 'second' are both"),
    (json.dumps({**pair_row(5), "verdict": 4}), "field 'verdict' = 4; expected 1, 2, 3"),
    (json.dumps({**pair_row(5), "response_second": None}), "field 'response_second' = null"),
    (json.dumps(pair_row(1)), "field 'index' = 1 repeats line 2"),
]


@pytest.mark.parametrize("line,message", BAD_LINES)
def test_a_bad_line_names_file_line_field_and_value(tmp_path, line, message):
    path = tmp_path / "pairs.jsonl"
    good = "".join(json.dumps(r) + "\n" for r in english_pairs(2))
    path.write_text(good + "\n" + line + "\n", encoding="utf-8")  # a blank line 3: line 4 is bad
    with pytest.raises(PairsError) as e:
        load_pairs(path)
    assert str(e.value).startswith(f"{path}:4: ")
    assert message in str(e.value)


def test_missing_and_empty_pairs_are_errors(tmp_path):
    with pytest.raises(PairsError, match="no pairs there; pass a pairs JSONL"):
        load_pairs(tmp_path / "nowhere")
    (tmp_path / "comparisons.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(PairsError, match="holds no pairs"):
        load_pairs(tmp_path)


@pytest.mark.parametrize("lang,template", [("en", "english"), ("ja", "japanese")])
def test_instructions_are_the_judge_prompt_without_format_or_placeholders(lang, template):
    t, judge = texts(lang), load_template(template)
    assert len(t.instructions) == 2
    for paragraph in t.instructions:
        assert paragraph in judge.text.replace("\n", "") or all(
            sentence in judge.text for sentence in paragraph.split(". "))
        for banned in ("[[", "{", "explain", "説明"):
            assert banned not in paragraph
    first_paragraph = judge.text.split("\n\n")[0].replace("\\\n", "")
    assert t.instructions[0] == first_paragraph
    assert set(t.headings) == {"persona", "history", "response_1", "response_2"}
    assert f"[{t.headings['response_1']}]" in judge.text


def test_speaker_labels_follow_the_judge():
    judge = load_template("english")
    dialogue = ["a", "b", "c", "d"]
    rendered = judge.render(["p"], dialogue, "x", "y")
    history = rendered.split("[Conversation]\n")[1].split("\n\n")[0].splitlines()
    assert [line.split(":")[0] for line in history] == speaker_labels(4, judge.speakers)
    assert speaker_labels(3, ("U", "A")) == ["U", "A", "U"]


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pdpo_jax.humaneval", *args], check=False, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True,
                          timeout=timeout)


def test_cli_mistakes_are_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(pair_row(0)) + "\n" + json.dumps({**pair_row(1), "verdict": 7}) + "\n")
    db = str(tmp_path / "a.sqlite")
    cases = [
        (["serve", "--pairs", str(bad), "--db", db], f"{bad}:2: field 'verdict' = 7"),
        (["serve", "--pairs", str(tmp_path / "none"), "--db", db], "no pairs there"),
        (["serve", "--pairs", str(bad), "--db", db, "--per-pair", "two"], "invalid int value"),
        (["serve", "--pairs", str(bad), "--db", db, "--annotators", "alice"],
         "--annotators entry 'alice': expected name:token"),
        (["serve", "--pairs", str(bad), "--db", db, "--lang", "fr"], "invalid choice: 'fr'"),
        (["serve", "--db", db], "the following arguments are required: --pairs"),
        (["report", "--db", db, "--judge", str(bad), "--a", MODEL_A], "give both --a and --b"),
        (["bogus"], "invalid choice: 'bogus'"),
    ]
    for args, message in cases:
        result = _cli(*args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (args, result.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, lines)
        assert "Traceback" not in result.stderr


def test_cli_refuses_a_database_of_other_pairs_and_a_busy_port(tmp_path):
    from pdpo_jax import asgi
    from pdpo_jax.humaneval.store import Store

    one, two = (write_judge_folder(tmp_path / n, english_pairs(k)) for n, k in (("one", 2), ("two", 3)))
    Store(tmp_path / "a.sqlite", load_pairs(one))
    result = _cli("serve", "--pairs", str(two), "--db", str(tmp_path / "a.sqlite"))
    assert result.returncode == 2 and "holds a study of other pairs" in result.stderr
    taken = asgi.bind("127.0.0.1", 0)
    port = str(taken.getsockname()[1])
    result = _cli("serve", "--pairs", str(one), "--db", str(tmp_path / "a.sqlite"), "--port", port)
    taken.close()
    assert result.returncode == 2 and f"error: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


MODEL_CODE = ("jax", "flax", "pdpo_jax.train", "pdpo_jax.sampling", "pdpo_jax.models")


@pytest.mark.parametrize("modules,heavy", [
    ("pdpo_jax.humaneval.__main__, pdpo_jax.humaneval.app, pdpo_jax.humaneval.store",
     (*MODEL_CODE, "matplotlib")),                                  # serve
    ("pdpo_jax.humaneval.report, pdpo_jax.humaneval.analysis", MODEL_CODE),  # report
])
def test_the_human_evaluation_loads_no_jax_and_no_model_code(modules, heavy):
    code = f"import sys\nimport {modules}\nprint(sorted(m for m in {heavy!r} if m in sys.modules))\n"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": REPO}, check=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout
