"""What `lfm2vl generate` shows while the user waits: a status line on an interactive stderr while it
compiles, erased at the first token, nothing of it in piped output; a Ctrl-C while loading leaves the
"interrupted" line last (the loading bar closed before it, never redrawn after)."""

from __future__ import annotations

import gc
import io
import sys

from lfm2vl_jax.checkpoint import hf
from lfm2vl_jax.cli import main


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def generate_argv(checkpoint) -> list[str]:
    return ["generate", "--model", str(checkpoint), "--prompt", "Describe", "--max-new-tokens", "3"]


def test_status_line_while_compiling_is_erased_and_stays_out_of_stdout(tiny_checkpoint, capsys, monkeypatch):
    assert main(generate_argv(tiny_checkpoint)) == 0
    piped = capsys.readouterr()
    assert "compiling" not in piped.err  # stderr is not a terminal here

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(generate_argv(tiny_checkpoint)) == 0
    assert capsys.readouterr().out == piped.out  # the answer alone, as when piped
    shown = terminal.getvalue()
    status = shown[shown.index("\r\x1b[Kcompiling the decoder for batch 1") :]
    assert status.endswith("\r\x1b[K") and status.count("\r\x1b[K") == 2, repr(status)  # shown once, erased


def test_ctrl_c_while_loading_leaves_interrupted_as_the_last_line(tiny_checkpoint, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)  # in the test: pytest sets its own around each phase
    read = hf.CheckpointReader.read
    calls = []

    def interrupted_read(self, key):
        calls.append(key)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return read(self, key)

    monkeypatch.setattr(hf.CheckpointReader, "read", interrupted_read)
    assert main(generate_argv(tiny_checkpoint)) == 130
    gc.collect()  # an unclosed bar would redraw itself when collected
    shown = terminal.getvalue()
    assert "loading" in shown and shown.endswith("lfm2vl generate: interrupted\n"), repr(shown[-300:])
