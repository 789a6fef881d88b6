"""The tokenizer's chat rendering: template options reach the template (with a real tokenizer,
the default model's, under a chat template that uses them), reserved names are refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from server import models
from server.config import Settings
from server.errors import InvalidRequest
from server.tokenizer import Tokenizer

TEMPLATE = (
    "{% if documents %}{% for d in documents %}[doc {{ d.title }}: {{ d.text }}]{% endfor %}{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}{% if m.reasoning %} (thought: {{ m.reasoning }})"
    "{% endif %}<|im_end|>\n{% endfor %}{% if style %}style={{ style }}\n{% endif %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    "{% if refuse %}{{ raise_exception('this template refuses it') }}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    src = models.resolve(Settings())
    folder = tmp_path_factory.mktemp("tok")
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(Path(src) / name, folder / name)
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    return Tokenizer(folder)


HI = [{"role": "user", "content": "hi"}]


def test_chat_template_kwargs_reach_the_template(tokenizer: Tokenizer) -> None:
    assert "style=" not in tokenizer.render_chat(HI)
    assert "style=terse\n<|im_start|>assistant\n" in tokenizer.render_chat(HI, template_kwargs={"style": "terse"})


def test_documents_reach_the_template(tokenizer: Tokenizer) -> None:
    text = tokenizer.render_chat(HI, documents=[{"title": "A", "text": "alpha"}])
    assert text.startswith("[doc A: alpha]")


def test_reasoning_of_earlier_turns_reaches_the_template(tokenizer: Tokenizer) -> None:
    text = tokenizer.render_chat([*HI, {"role": "assistant", "content": "hello", "reasoning": "be kind"}, *HI])
    assert "hello (thought: be kind)" in text


def test_continue_final_message_leaves_the_last_turn_open(tokenizer: Tokenizer) -> None:
    text = tokenizer.render_chat([*HI, {"role": "assistant", "content": "Hel"}], add_generation_prompt=False,
                                 continue_final_message=True)
    assert text.endswith("<|im_start|>assistant\nHel")


@pytest.mark.parametrize("name", ["tokenize", "messages", "add_generation_prompt", "chat_template"])
def test_reserved_template_kwargs_are_refused(tokenizer: Tokenizer, name: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        tokenizer.render_chat(HI, template_kwargs={name: True})
    assert e.value.param == "chat_template_kwargs"


def test_a_template_error_is_a_400(tokenizer: Tokenizer) -> None:
    # a template's own raise_exception (templates use it to refuse roles they do not know)
    with pytest.raises(InvalidRequest) as e:
        tokenizer.render_chat(HI, template_kwargs={"refuse": True})
    assert "this template refuses it" in e.value.message
