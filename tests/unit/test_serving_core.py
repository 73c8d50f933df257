"""deploy/requests.py: request limits shared by REST and gRPC."""

from __future__ import annotations

import pytest

from deploy.requests import LIMITS, GenerationRequest, InvalidInput, check_texts


@pytest.mark.parametrize(
    "texts, message",
    [
        ("def f(): pass", "texts: expected a list of strings, got str"),
        ([], "texts: empty list; send at least one text"),
        (["ok", 3], "texts[1]: expected a string, got int"),
        (["ok", " \t\n"], "texts[1]: empty or only whitespace"),
        (
            ["a" * (LIMITS.max_text_chars + 1)],
            f"texts[0]: {LIMITS.max_text_chars + 1} characters, at most {LIMITS.max_text_chars}",
        ),
        (
            ["a"] * (LIMITS.max_items + 1),
            f"texts: {LIMITS.max_items + 1} items, at most {LIMITS.max_items} per request",
        ),
        (["ok", "ab\ud800"], "texts[1]: not valid Unicode: unpaired surrogate '\\ud800' at character 2"),
    ],
)
def test_check_texts_names_the_item_and_the_bound(texts, message):
    with pytest.raises(InvalidInput) as e:
        check_texts(texts)
    assert str(e.value) == message


def test_check_texts_accepts_the_bounds():
    texts = ["a" * LIMITS.max_text_chars] + ["b"] * (LIMITS.max_items - 1)
    assert check_texts(texts) == texts


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt": " "}, "prompt: empty"),
        ({"prompt": "x" * (LIMITS.max_prompt_chars + 1)}, f"prompt: {LIMITS.max_prompt_chars + 1} characters"),
        ({"max_new_tokens": 0}, "max_new_tokens: 0, must be 1..256"),
        ({"max_new_tokens": True}, "max_new_tokens: expected an integer"),
        ({"max_new_tokens": 2.5}, "max_new_tokens: expected an integer"),
        ({"temperature": -0.1}, "temperature: -0.1, must be 0..2.0"),
        ({"temperature": float("inf")}, "temperature: expected a number"),
        ({"top_k": 1001}, "top_k: 1001, must be 0..1000"),
        ({"top_p": 0.0}, "top_p: 0.0, must be 0.001..1"),
        ({"stop": ("a",) * 9}, "stop: at most 8 strings"),
        ({"stop": ("",)}, "stop[0]: must be a non-empty string"),
        ({"seed": -1}, "seed: -1, must be an integer"),
        ({"seed": 2**64}, "must be an integer 0..2^63-1"),
        ({"prompt": "\udc80"}, "prompt: not valid Unicode"),
        ({"stop": ("\ud800",)}, "stop[0]: not valid Unicode"),
    ],
)
def test_generation_requests_outside_the_limits_name_the_field(kwargs, message):
    with pytest.raises(InvalidInput) as e:
        GenerationRequest(**{"prompt": "def f(", **kwargs})
    assert message in str(e.value), str(e.value)


def test_generation_defaults_match_the_rest_api():
    from deploy.service import GenerateInput

    rest = GenerateInput.model_fields
    for name in ("max_new_tokens", "temperature", "top_k", "top_p", "seed"):
        assert rest[name].default == getattr(GenerationRequest("x"), name), name
