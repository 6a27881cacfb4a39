"""The held-out generation scores what the model answered, with a chat template whose
end-of-turn marker the model spells in characters (as Gemma's ``<end_of_turn>`` under a text
template): generation stops at that text, a marker the budget cut is not part of the answer,
the default budget covers the longest answer and its marker, and answers that used the whole
budget are counted. A tiny Llama memorises the answers first, so the generations are real."""

from __future__ import annotations

import pytest

from bigscale.config.schema import EvalConfig
from bigscale.dist.env import DistEnv
from bigscale.generation import answer_end, strip_partial
from bigscale.train import task_eval
from tests.text_markers import MARKER, ROWS, memorised_model, text_marker_tokenizer, write_test_set


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return text_marker_tokenizer(tmp_path_factory.mktemp("text_markers"))


@pytest.fixture(scope="module")
def examples(tmp_path_factory: pytest.TempPathFactory) -> list[task_eval.Example]:
    return write_test_set(tmp_path_factory.mktemp("test_set"))


@pytest.fixture(scope="module")
def model(tokenizer, examples: list[task_eval.Example]):
    return memorised_model(tokenizer, examples)


def generate(model, tokenizer, examples, max_new_tokens: int | None) -> task_eval.Generations:
    cfg = EvalConfig(max_new_tokens=max_new_tokens, batch_size=8)
    return task_eval.generate(model, tokenizer, examples, cfg, DistEnv(), synced=False)


def test_a_text_marker_ends_answers_and_is_not_a_token(tokenizer) -> None:
    end = answer_end(tokenizer, chat=True)
    assert end.marker == MARKER
    assert end.stop_texts == (MARKER,)
    assert end.eos_ids == (tokenizer.eos_token_id,)  # the marker is 13 tokens, not one
    spelled = tokenizer("1999-07-02<end_of_turn>\n<start_of_turn>user", add_special_tokens=False)
    assert end.answer(tokenizer, spelled["input_ids"]) == ("1999-07-02", True)
    # The budget ran out inside the marker: the answer is whole, the partial marker goes.
    cut = tokenizer("1999-07-02<end_of", add_special_tokens=False)["input_ids"]
    assert end.answer(tokenizer, cut) == ("1999-07-02", False)
    cut = tokenizer("1999-07-", add_special_tokens=False)["input_ids"]
    assert end.answer(tokenizer, cut) == ("1999-07-", False)


def test_strip_partial_removes_only_a_beginning_of_the_marker() -> None:
    assert strip_partial("42<end_of_t", MARKER) == "42"
    assert strip_partial("42<", MARKER) == "42"
    assert strip_partial("42>", MARKER) == "42>"
    assert strip_partial("42<start", MARKER) == "42<start"


def test_default_budget_covers_the_longest_answer_and_its_marker(tokenizer, examples) -> None:
    end = answer_end(tokenizer, chat=True)
    n = task_eval.budget(tokenizer, examples, EvalConfig(max_new_tokens=None), end)
    longest = max(len(tokenizer(ex.answer + MARKER)["input_ids"]) for ex in examples)
    assert n >= longest == len("1999-07-02") + len(MARKER)
    # What the template writes after the marker (a newline) is the only slack.
    assert n == longest + 1
    assert task_eval.budget(tokenizer, examples, EvalConfig(max_new_tokens=5), end) == 5


def test_generation_stops_at_the_text_marker_with_the_cache_on(model, tokenizer, examples) -> None:
    forwards: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: forwards.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        out = generate(model, tokenizer, examples, max_new_tokens=60)
    finally:
        hook.remove()
    assert out.answers == [a for _, a in ROWS]
    assert out.budget_hits == 0
    # The longest answer and its marker, then stop: not the 60 allowed.
    assert len(forwards) == len("1999-07-02") + len(MARKER)
    # With the cache every step after the prompt feeds one new token.
    assert forwards[1:] == [1] * (len(forwards) - 1)


def test_the_default_budget_scores_right_answers_right(model, tokenizer, examples) -> None:
    auto = generate(model, tokenizer, examples, max_new_tokens=None)
    assert auto.answers == [a for _, a in ROWS]
    assert auto.budget_hits == 0
    assert task_eval.score(auto.answers, examples, EvalConfig(), DistEnv()) == {"exact_match": 1.0}


def test_a_budget_inside_the_marker_keeps_the_answer_and_counts_the_hit(
    model, tokenizer, examples
) -> None:
    # "42" and its 13-token marker fit in 15; the date is cut 5 characters into the marker
    # and still reads as the right answer.
    out = generate(model, tokenizer, examples, max_new_tokens=15)
    assert out.answers == [a for _, a in ROWS]
    assert out.budget_hits == 1
    # The old default of 8 cuts the date itself (the SmolLM2 report: 1999-07-02 -> 1999-07-).
    short = generate(model, tokenizer, examples, max_new_tokens=8)
    assert short.answers == ["1999-07-", "42"]
    assert short.budget_hits == 2
