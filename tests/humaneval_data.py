"""Fake judge folders for the human-evaluation tests: comparisons.jsonl lines as the judge stage
writes them (pdpo_jax.eval.stages.comparison_row), with distinctive model names so a test can
check that they never reach an annotator."""
from __future__ import annotations

import json
import pathlib

MODEL_A, MODEL_B = "model-alpha-7f3", "model-beta-9k2"
JAPANESE_REPLY = ("こんにちは、私は福島から引っ越してきたばかりなので、こちらでも雪がすごいですよ。"
                  "鳥取砂丘にも行ってみたいと思っていますが、なかなか時間が取れなくて困っています。" * 3)


def pair_row(index: int, *, verdict: int | None = 1, japanese: bool = False, first: str = MODEL_A,
             second: str = MODEL_B, response_first: str | None = None) -> dict:
    """One comparison line; reply texts name the pair and the judge's position, never a model."""
    if japanese:
        persona = ["私は福島から引っ越してきました。", "私のお気に入りスポットは、鳥取砂丘です。"]
        dialogue = ["こんにちは。私は三重県の津市に住んでいますが、こちらも雪がすごいですよ。"]
        replies = (JAPANESE_REPLY, f"ペア{index}の二番目の応答です。そちらの雪も経験してますよ。")
    else:
        persona = [f"I keep {index + 2} cats.", "I work night shifts at a bakery."]
        dialogue = [f"Hi there, question {index}?", "Hello! I just got home.", "What do you do?"]
        replies = (f"pair {index} first reply: I bake bread all night.",
                   f"pair {index} second reply: I like cats.")
    answer = "" if verdict is None else f"Reply {verdict} is better. [[{verdict}]]"
    return {"index": index, "history": 100 + index, "first": first, "second": second,
            "verdict": verdict, "winner": {1: first, 2: second, 3: "tie"}.get(verdict),
            "attempts": 1, "cached": False, "answer": answer, "record_id": f"rec-{index}",
            "persona": persona, "dialogue": dialogue,
            "response_first": replies[0] if response_first is None else response_first,
            "response_second": replies[1]}


def write_judge_folder(folder: pathlib.Path, rows: list[dict]) -> pathlib.Path:
    """<folder>/comparisons.jsonl holding `rows`; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "comparisons.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return folder


def english_pairs(n: int, verdicts=(1, 2, 3)) -> list[dict]:
    return [pair_row(i, verdict=verdicts[i % len(verdicts)]) for i in range(n)]
