"""Prompt encoding at admission, with and without the tokenizer's chat template."""

from __future__ import annotations

import pytest

from learner.admission import encode_prompt
from pipeline.errors import ConfigError
from toy.kit import build_tokenizer


def test_chat_template_gives_token_ids_whatever_transformers_returns() -> None:
    """transformers 5 returns a BatchEncoding from apply_chat_template (iterating it gave the
    dict's keys, and the learner crashed at its first prompt)."""
    tok = build_tokenizer()
    plain = encode_prompt(tok, "12+3", chat_template=False)
    assert plain == tok("12+3")["input_ids"] and all(isinstance(i, int) for i in plain)
    with pytest.raises(ConfigError, match="has no chat template"):
        encode_prompt(tok, "12+3", chat_template=True)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}="
    templated = encode_prompt(tok, "12+3", chat_template=True)
    assert templated == tok("12+3=")["input_ids"]
    assert all(isinstance(i, int) for i in templated)
