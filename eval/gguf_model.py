"""A `dslm-export --format gguf` file run by llama.cpp itself, through llama-cpp-python (its
Python binding, built from llama.cpp's source): the parity check, dslm-eval on a GGUF export and
the tests compare what llama.cpp computes with dslm's own model."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import unicodedata
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dslm.errors import DslmError


def import_llama_cpp():
    """The llama_cpp module. Raises DslmError, saying how to install it, where it is missing."""
    try:
        import llama_cpp
    except ImportError:
        raise DslmError(
            "running a GGUF file needs llama.cpp's Python binding: pip install llama-cpp-python "
            "(it builds llama.cpp from source with CMake and a C++ compiler)"
        ) from None
    return llama_cpp


@contextlib.contextmanager
def quiet_stderr():
    """llama.cpp's log away from the terminal: what its C++ writes to file descriptor 2 and what
    llama-cpp-python's log callback prints to sys.stderr (which a command's LibraryOutput points at
    the terminal itself) both go to /dev/null."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class GgufModel:
    """One GGUF file loaded by llama.cpp on the CPU, with a context of `n_ctx` tokens (at most the
    model's block size) and `threads` threads (0: one per core), for the prompt's pass too. Raises
    DslmError for a file llama.cpp cannot load, with llama.cpp's reason where it gives one."""

    def __init__(self, path: Path, n_ctx: int, threads: int = 0):
        llama_cpp = import_llama_cpp()
        if not path.is_file():
            raise DslmError(f"{path} does not exist")
        try:
            with quiet_stderr():
                self.llm = llama_cpp.Llama(
                    model_path=str(path),
                    n_ctx=n_ctx,
                    n_batch=n_ctx,
                    n_threads=threads or os.cpu_count(),
                    n_threads_batch=threads or os.cpu_count(),  # the prompt's pass: else one per core
                    logits_all=True,
                    verbose=False,
                )
        except ValueError as e:  # llama-cpp-python's "Failed to load model from file"
            raise DslmError(f"{path}: llama.cpp cannot load it ({e})") from None
        # llama.cpp's log goes through this logger once loaded; its warnings (a context rounded up
        # past the model's) are not the command's output
        logging.getLogger("llama-cpp-python").setLevel(logging.CRITICAL)
        self.n_ctx = n_ctx

    def close(self) -> None:
        """Free llama.cpp's model and context now (left to interpreter exit, llama-cpp-python's
        finalizer fails there with a TypeError)."""
        self.llm.close()

    def __enter__(self) -> GgufModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def tokenize(self, text: str, add_bos: bool = False, nfkc: bool = True) -> list[int]:
        """llama.cpp's ids for `text` (special tokens written in it stay text, as dslm encodes a
        prompt); with `add_bos`, <bos> first where the file asks for it. With `nfkc`, `text` is
        normalized first as dslm's tokenizer normalizes it (llama.cpp does not: dslm.gguf_export),
        which makes the ids dslm's; without it, llama.cpp's ids for the raw text, as llama-cli's."""
        text = unicodedata.normalize("NFKC", text) if nfkc else text
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Next-token logits at every position of `ids` (T,) int, from an empty cache: (T, V) float32.
        Raises DslmError when T exceeds the context."""
        if len(ids) > self.n_ctx:
            raise DslmError(f"{len(ids)} tokens do not fit llama.cpp's context of {self.n_ctx}")
        self.llm.reset()
        self.llm.eval([int(i) for i in ids])
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(
        self,
        ids: list[int],
        max_new_tokens: int,
        stop: int | None = None,
        stopped: Callable[[list[int]], bool] | None = None,
    ) -> list[int]:
        """The greedy continuation of `ids`: up to `max_new_tokens` ids, through llama.cpp's KV cache
        (the prompt in one pass, then one token per pass), ending after `stop`, or once
        `stopped(new ids)` is true (dslm_local.decoding.Stopper.stopped: a stop string)."""
        self.llm.reset()
        self.llm.eval(list(ids))
        new: list[int] = []
        while len(new) < max_new_tokens and len(ids) + len(new) < self.n_ctx:
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            new.append(token)
            if token == stop or (stopped is not None and stopped(new)):
                break
            self.llm.eval([token])
        return new
