"""``bigscale chat TARGET``: a conversation in the terminal through the model's chat template,
each reply streamed as it is generated and ended at the template's end-of-turn marker (a token
or text the model spells), so it never runs on into a turn the model makes up."""

from __future__ import annotations

import argparse
from pathlib import Path
from queue import Queue
from threading import Thread
from typing import Any

from transformers.generation.streamers import BaseStreamer

from bigscale.commands.sampling import Sampling, add_flags, visible
from bigscale.errors import DataError

HELP = "/reset starts a new conversation, /quit (or Ctrl-D) ends"


def main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bigscale chat")
    add_flags(parser, max_new_tokens=512)
    ns = parser.parse_args(args)
    sampling = Sampling.from_args(ns)
    from bigscale.target import check_dtype, load_model, load_tokenizer, resolve

    with resolve(Path(ns.target)) as target:
        tokenizer = load_tokenizer(target)
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                f"{ns.target}: the model has no chat template and its run sets no "
                "data.chat_template; use `bigscale generate --no-template` for raw prompts"
            )
        model = load_model(target, tokenizer, check_dtype(ns.dtype))
        Conversation(model, tokenizer, sampling, ns.system).loop()
    return 0


class Conversation:
    def __init__(self, model: Any, tokenizer: Any, sampling: Sampling, system: str | None):
        from transformers import set_seed

        from bigscale.generation import answer_end

        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        self.ends = answer_end(tokenizer, chat=True)
        self.opening = [{"role": "system", "content": system}] if system else []
        self.messages: list[dict[str, str]] = list(self.opening)
        set_seed(sampling.seed)

    def loop(self) -> None:
        print(HELP, flush=True)
        while True:
            try:
                line = input("you> ")
            except EOFError:
                print()
                return
            text = line.strip()
            if text == "/quit":
                return
            if text == "/reset":
                self.messages = list(self.opening)
                print("(new conversation)", flush=True)
                continue
            if not text:
                continue
            self.messages.append({"role": "user", "content": text})
            print("bot> ", end="", flush=True)
            answer = self.reply()
            self.messages.append({"role": "assistant", "content": answer})

    def reply(self) -> str:
        """Generate the next assistant turn, printing it as it grows."""
        prompt = self.tokenizer.apply_chat_template(
            self.messages, tokenize=False, add_generation_prompt=True
        )
        batch = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        batch = batch.to(self.model.device)
        width = batch["input_ids"].shape[1]
        # The streamer hands over token pieces; the shown text is recomputed from all the ids
        # so far, so a marker spelled over several tokens is never partly shown.
        streamer = _IdStreamer()
        kwargs = self.sampling.generate_kwargs(self.ends, self.tokenizer, width)
        worker = Thread(target=_generate, args=(self.model, batch, streamer, kwargs), daemon=True)
        worker.start()
        shown = ""
        ids: list[int] = []
        for piece in streamer:
            ids.extend(piece)
            text = visible(self.tokenizer, self.ends, ids, final=False)
            if text.startswith(shown) and len(text) > len(shown):
                print(text[len(shown) :], end="", flush=True)
                shown = text
        worker.join()
        if streamer.error is not None:
            raise streamer.error
        answer = visible(self.tokenizer, self.ends, ids, final=True).rstrip()
        if answer.startswith(shown):
            print(answer[len(shown) :], end="")
        print(flush=True)
        return answer


class _IdStreamer(BaseStreamer):
    """transformers' streamer interface, yielding token ids as they come (TextIteratorStreamer
    yields decoded text pieces, which cannot be re-cut where a marker spelled over several
    tokens begins)."""

    def __init__(self) -> None:
        self.queue: Queue = Queue()
        self.prompt_seen = False
        self.error: BaseException | None = None

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt
            self.prompt_seen = True
            return
        self.queue.put([int(v) for v in value.reshape(-1).tolist()])

    def end(self) -> None:
        self.queue.put(None)

    def __iter__(self) -> _IdStreamer:
        return self

    def __next__(self) -> list[int]:
        item = self.queue.get()
        if item is None:
            raise StopIteration
        return item


def _generate(model: Any, batch: Any, streamer: _IdStreamer, kwargs: dict) -> None:
    import torch

    try:
        with torch.no_grad():
            model.generate(**batch, streamer=streamer, **kwargs)
    except BaseException as exc:  # shown by the main thread, which is waiting on the stream
        streamer.error = exc
        streamer.end()
