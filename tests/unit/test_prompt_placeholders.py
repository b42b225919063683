"""`lfm2vl generate --prompt`: images go where the prompt places the checkpoint's image placeholder (one
per --image), else before the text; any other count is refused, naming both counts."""

from __future__ import annotations

import pytest
from processor_fixtures import image_path

from lfm2vl_jax.cli import main, user_content

IMAGE = {"type": "image", "path": "a.png"}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


def test_placeholders_written_in_the_prompt_are_used_where_they_stand():
    content = user_content("Compare <image> with<image>.", ["a.png", "b.png"], "<image>")
    assert content == [text("Compare "), IMAGE, text(" with"), {"type": "image", "path": "b.png"}, text(".")]
    assert user_content("<image>What is this?", ["a.png"], "<image>") == [IMAGE, text("What is this?")]
    # the checkpoint's placeholder, not a fixed string: "<image>" is then plain text
    assert user_content("<image> [IMG]", ["a.png"], "[IMG]") == [text("<image> "), IMAGE]


def test_a_prompt_without_placeholders_gets_the_images_before_the_text():
    assert user_content("What is this?", ["a.png"], "<image>") == [IMAGE, text("What is this?")]
    assert user_content("hi", [], "<image>") == [text("hi")]


@pytest.mark.parametrize(
    ("prompt", "images", "counts"), [("<image><image> hi", 1, (2, 1)), ("<image> hi", 0, (1, 0))]
)
def test_any_other_count_is_refused_before_the_model_loads(checkpoint_450m, capsys, prompt, images, counts):
    # checkpoint_450m has the processor files and no weights: the refusal comes before any weight is read
    argv = ["generate", "--model", str(checkpoint_450m), "--prompt", prompt]
    argv += ["--image", str(image_path("logo2.png"))] * images
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--prompt holds {counts[0]} <image> placeholder(s) but {counts[1]} --image file(s)" in err, err


def test_the_rendered_prompt_is_the_prompt_as_written(processor):
    prompt = "Left: <image> right: <image> which is bigger?"
    content = user_content(prompt, ["a.png", "b.png"], processor.image_token)
    rendered = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False)
    assert prompt in rendered
