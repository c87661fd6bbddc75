"""Chat-templated prompts: the prompt text `P` and the end-of-turn marker `E` of the spec.

The tokenizer's own chat template is the authority; no model name is hard-coded. Two presets
reproduce the original release's templates for users of Qwen and Baichuan models whose tokenizer
ships without a template.
"""

from __future__ import annotations

from dataclasses import dataclass

import jinja2
from transformers import PreTrainedTokenizerBase

from threeds.errors import ThreedsError, first_line

PRESETS: dict[str, str] = {
    # ChatML as LlamaFactory's `qwen` template renders it, default system prompt included.
    "qwen": (
        "{% set sys = messages[0]['content'] if messages[0]['role'] == 'system' else 'You are a helpful assistant.' %}"
        "<|im_start|>system\n{{ sys }}<|im_end|>\n"
        "{% for m in messages if m['role'] != 'system' %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    # Baichuan2 chat: reserved tokens 195 (<reserved_106>) and 196 (<reserved_107>) mark the turns.
    "baichuan": (
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% endif %}"
        "{% for m in messages if m['role'] != 'system' %}"
        "{% if m['role'] == 'user' %}<reserved_106>{{ m['content'] }}"
        "{% else %}<reserved_107>{{ m['content'] }}</s>{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}<reserved_107>{% endif %}"
    ),
}

_PROBE = "\x00threeds-probe\x00"


class TemplateError(ThreedsError, ValueError):
    """The tokenizer has no usable chat template; the message names the fix."""


@dataclass(frozen=True)
class PromptFormat:
    """Renders `P` and knows `E` for one tokenizer (+ optional preset and system prompt)."""

    tokenizer: PreTrainedTokenizerBase
    template: str | None = None
    system: str | None = None

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        if self.system is not None:
            messages = [{"role": "system", "content": self.system}, *messages]
        if self.template is None and not getattr(self.tokenizer, "chat_template", None):
            raise TemplateError("the tokenizer has no chat template: pass --template qwen|baichuan")
        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.template, tokenize=False, add_generation_prompt=generation_prompt
            )
        except (jinja2.TemplateError, ValueError, TypeError, KeyError) as exc:  # a template that fails or raises
            raise TemplateError(f"the chat template fails ({first_line(exc)}): pass --template qwen|baichuan") from exc

    def prompt(self, instruction: str) -> str:
        """`P`: the single user turn, templated, with the generation prompt added."""
        return self._render([{"role": "user", "content": instruction}], generation_prompt=True)

    @property
    def end_of_turn(self) -> str:
        """`E`: what the template writes right after an assistant message, trailing whitespace dropped."""
        text = self._render(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": _PROBE}], generation_prompt=False
        )
        after = text[text.index(_PROBE) + len(_PROBE) :].rstrip()
        if not after:
            raise TemplateError("the chat template writes no end-of-turn marker after an assistant message")
        return after


def prompt_format(
    tokenizer: PreTrainedTokenizerBase, preset: str | None = None, system: str | None = None
) -> PromptFormat:
    """The prompt format for a tokenizer; `preset` overrides its template ("qwen" or "baichuan")."""
    if preset is not None and preset not in PRESETS:
        raise TemplateError(f"unknown template preset {preset!r}; choose from {sorted(PRESETS)}")
    return PromptFormat(tokenizer, PRESETS[preset] if preset else None, system)
