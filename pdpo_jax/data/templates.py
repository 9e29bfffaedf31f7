"""Prompt templates: how persona and history become the text a model continues.

Text templates render

    Your persona:
    - i like cats.
    - i am a nurse.

    Dialogue:
    Partner: hi !
    You: hello , how are you ?
    Partner: good . do you have pets ?
    You:

and the response follows the final self tag after `response_prefix` (" " for English BPE, so the
model continues `You:` with ` word` tokens exactly as history turns are written). Speaker tags are
assigned from the end: the last history turn is the partner's, then they alternate backwards.

Chat templates (instruct models such as SmolLM2 or Qwen2-Instruct) put the persona in the system
message and the history in alternating user/assistant messages that end with a user message,
then go through `tokenizer.apply_chat_template(..., add_generation_prompt=True)`.
"""
from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence

from pdpo_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """How (persona, history) is written; see the module docstring for the layout."""

    name: str
    persona_header: str
    dialogue_header: str = ""
    partner_tag: str = ""
    self_tag: str = ""
    bullet: str = "- "
    response_prefix: str = " "  # between a speaker tag and the utterance, history and response alike
    chat: bool = False
    end_of_turn: str | None = None  # chat: text closing the assistant turn; None = tokenizer.eos_token


TEMPLATES = {
    t.name: t for t in (
        PromptTemplate("english", "Your persona:", "Dialogue:", "Partner:", "You:"),
        # No space after the tag: Japanese has no word spaces and SentencePiece would add a "▁".
        PromptTemplate("japanese", "あなたのペルソナ:", "対話:", "相手:", "あなた:", response_prefix=""),
        PromptTemplate("chat", "Reply as the person with this persona.\nYour persona:", chat=True),
        PromptTemplate("chat_japanese", "このペルソナの人として返答してください。\nあなたのペルソナ:",
                       chat=True),
    )
}


def get_template(template: str | PromptTemplate) -> PromptTemplate:
    """A built-in template by name (english, japanese, chat, chat_japanese), or `template` itself."""
    if isinstance(template, PromptTemplate):
        return template
    if template not in TEMPLATES:
        near = difflib.get_close_matches(str(template), TEMPLATES, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise UserError(f"unknown prompt template {template!r}{hint} Known: {sorted(TEMPLATES)}")
    return TEMPLATES[template]


def persona_text(template: PromptTemplate, persona: Sequence[str]) -> str:
    """The header and one bulleted line per persona sentence."""
    return "\n".join([template.persona_header, *(template.bullet + p for p in persona)])


def render_prompt(template: PromptTemplate, persona: Sequence[str], history: Sequence[str]) -> str:
    """Text-template prompt, ending with the self tag (no trailing space)."""
    if template.chat:
        raise ValueError(f"template {template.name!r} is a chat template; use chat_messages")
    n = len(history)
    turns = [f"{_tag(template, n - 1 - j)}{template.response_prefix}{turn}"
             for j, turn in enumerate(history)]
    dialogue = "\n".join([template.dialogue_header, *turns, template.self_tag])
    return f"{persona_text(template, persona)}\n\n{dialogue}"


def chat_messages(template: PromptTemplate, persona: Sequence[str], history: Sequence[str],
                  response: str | None = None) -> list[dict[str, str]]:
    """System (persona), then history as user/assistant messages ending with user, then `response`."""
    n = len(history)
    messages = [{"role": "system", "content": persona_text(template, persona)}]
    messages += [{"role": "user" if (n - 1 - j) % 2 == 0 else "assistant", "content": turn}
                 for j, turn in enumerate(history)]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def _tag(template: PromptTemplate, turns_from_end: int) -> str:
    return template.partner_tag if turns_from_end % 2 == 0 else template.self_tag
