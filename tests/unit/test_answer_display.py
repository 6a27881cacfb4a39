"""What chat and generate show of generated tokens: cut at the end-of-turn marker, a marker
still being spelled held back while streaming, template tokens never shown."""

from __future__ import annotations

from bigscale.commands.evaluate import flat_scores
from bigscale.commands.sampling import visible
from bigscale.generation import answer_end
from tests.text_markers import MARKER, text_marker_tokenizer


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_text_marker_is_cut_and_held_back(tmp_path) -> None:
    tok = text_marker_tokenizer(tmp_path)
    ends = answer_end(tok, chat=True)
    assert ends.stop_texts == (MARKER,)  # spelled in characters by this model
    # Streaming: "42<end_of" may be the start of the marker, so only "42" shows yet.
    assert visible(tok, ends, ids(tok, "42<end_of"), final=False) == "42"
    done = ids(tok, f"42{MARKER}\n<start_of_turn>user\nmore")
    assert visible(tok, ends, done, final=False) == "42"
    assert visible(tok, ends, done, final=True) == "42"
    # A special token the model emits mid-answer is never shown.
    assert visible(tok, ends, [*ids(tok, "4<|im_start|>2"), tok.eos_token_id, 9], True) == "42"


def test_special_token_marker(char_tokenizer) -> None:
    ends = answer_end(char_tokenizer, chat=True)  # ChatML: <|im_end|> is one token here
    assert not ends.stop_texts
    out = ids(char_tokenizer, "hi<|im_end|>\n<|im_start|>user")
    assert visible(char_tokenizer, ends, out, final=False) == "hi"


def test_harness_scores_are_flattened() -> None:
    results = {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "em,strict": 1.0}}
    assert flat_scores(results) == {"harness/t/acc": 0.5, "harness/t/em/strict": 1.0}
