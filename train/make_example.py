"""Material for the train/README.md walk-through, built offline: a random-weight checkpoint with the
LFM2-VL-450M shapes (our initialisation, written by our exporter, with the released processor files and
the tests' stand-in tokenizer) and small JSONL files of conversations about the images in
tests/data/images.

    python train/make_example.py runs/example      # -> runs/example/{model,data}
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import jax

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY / "tests"))
from processor_fixtures import IMAGES_DIR, make_checkpoint_dir  # noqa: E402

from lfm2vl_jax.checkpoint.export import save_hf_checkpoint  # noqa: E402
from lfm2vl_jax.config import load_config  # noqa: E402
from lfm2vl_jax.nn.params import init_params  # noqa: E402

QUESTIONS_AND_ANSWERS = {
    "grace_hopper.jpg": [
        ("Who might this be?", "A woman in a dark naval uniform with medals, in front of a flag."),
        ("What is she wearing?", "A navy officer's uniform with a white collar, a tie and several ribbons."),
    ],
    "logo2.png": [
        ("What does the image show?", "A wide logo: blue letters on a white background."),
        ("What colours are used?", "Mostly blue on white."),
    ],
    "Minduka_Present_Blue_Pack.png": [
        ("Describe this image.", "A gift box wrapped in blue paper, tied with a ribbon."),
        ("What is it for?", "It looks like a present, wrapped for a birthday or a holiday."),
    ],
}


def conversations() -> list[dict]:
    records = []
    for image, pairs in QUESTIONS_AND_ANSWERS.items():
        for question, answer in pairs:
            user = [{"type": "image", "image": f"images/{image}"}, {"type": "text", "text": question}]
            records.append(
                {
                    "messages": [
                        {"role": "system", "content": "You are a helpful assistant."},
                        {"role": "user", "content": user},
                        {"role": "assistant", "content": answer},
                    ]
                }
            )
    return records


def main(out: Path) -> None:
    model = out / "model"
    if not model.exists():
        side_files = make_checkpoint_dir(out / "processor-files", "lfm2-vl-450m")
        config = load_config(REPOSITORY / "tests" / "data" / "reference" / "lfm2-vl-450m")
        params = init_params(config, jax.random.key(0))
        save_hf_checkpoint(model, config, params, source_dir=side_files)
        shutil.rmtree(side_files)
    data = out / "data"
    shutil.copytree(IMAGES_DIR, data / "images", dirs_exist_ok=True)
    records = conversations()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (data / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[::2]))
    print(f"wrote {model} and {data}/train.jsonl ({len(records)} conversations), {data}/eval.jsonl")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/example"))
