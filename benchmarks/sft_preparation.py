"""How long `hive-train --stage sft` prepares its conversations before step 1, at LLaVA-665k's size.

    python -m benchmarks.sft_preparation                          # 665,000 conversations (minutes on one core)
    python -m benchmarks.sft_preparation --size 20000 --label quick

The preparation is `hive_adapter.data.conversations.drop_cut_images`: every conversation rendered by the chat
template and tokenised, to find the ones that truncation would cut. The conversations are synthetic and shaped
like LLaVA-1.5's mix (`llava_v1_5_mix665k.json`): one `<image>` in the first human turn of most entries, one to
five rounds, about one entry in eight text-only; the words are the toy tokenizer's (`instruction_vocabulary`),
so the tokenizer is a word-level fast tokenizer and the time is the library's, not a large vocabulary's.

The figure (seconds, conversations per second) is added to `benchmarks/results/sft_preparation/times.json`
under `--label`, with the commit it measured. Measured (issue 43, 665,000 conversations, before and after side by
side on a shared 2-core host): 382.7 s before (each conversation rendered and tokenised twice, one at a time),
323.8 s after (one batched call per 2048, rendered once). Only the public API that existed before and after the batching
(issue 43) is used, so the same script measures both.
"""

from __future__ import annotations

import json
import platform
import random
import subprocess
import tempfile
import time
from pathlib import Path

from hive_adapter.utils.flags import FullFlagParser

OUTPUT = Path(__file__).parent / "results" / "sft_preparation" / "times.json"


def synthetic_llava_records(size: int, seed: int = 0):
    """`size` LLaVA-style conversation records over the instruction vocabulary (deterministic by seed)."""
    from hive_adapter.data.conversations import ConversationRecord, instruction_vocabulary

    words = [word for word in instruction_vocabulary() if word not in ("USER:", "ASSISTANT:")]
    rng = random.Random(seed)
    records = []
    for index in range(size):
        rounds = rng.choice((1, 1, 2, 2, 3, 4, 5))
        text_only = index % 8 == 7
        turns = []
        for number in range(rounds):
            question = " ".join(rng.choices(words, k=rng.randint(4, 16)))
            answer = " ".join(rng.choices(words, k=rng.randint(1, 40)))
            if number == 0 and not text_only:
                question = f"<image>\n{question}"
            turns += [("user", question), ("assistant", answer)]
        images = () if text_only else (f"{index:012d}.jpg",)
        records.append(ConversationRecord(f"llava-{index}", images, tuple(turns)))
    return records


def commit() -> str:
    completed = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return completed.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = FullFlagParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=665_000, help="conversations (LLaVA-1.5's mix: 665,000)")
    parser.add_argument("--max_text_length", type=int, default=2048, help="hive-train's sft default")
    parser.add_argument("--label", default="measured", help="name of this figure in times.json (e.g. before/after)")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)

    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    from hive_adapter.data.conversations import ConversationDataset, drop_cut_images, instruction_vocabulary
    from hive_adapter.model.processing_hive import HiveProcessor
    from hive_adapter.tools.toy_models import write_toy_models

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as scratch:
        vision, language = write_toy_models(Path(scratch) / "toy", instruction_vocabulary())
        processor = HiveProcessor(AutoImageProcessor.from_pretrained(vision), AutoTokenizer.from_pretrained(language))
    started = time.perf_counter()
    records = synthetic_llava_records(args.size)
    built = time.perf_counter() - started
    dataset = ConversationDataset(records, ".")
    started = time.perf_counter()
    kept = drop_cut_images(dataset, processor, args.max_text_length)
    seconds = time.perf_counter() - started
    figure = {
        "label": args.label,
        "commit": commit(),
        "conversations": args.size,
        "kept": len(kept),
        "max_text_length": args.max_text_length,
        "preparation_seconds": round(seconds, 1),
        "conversations_per_second": round(args.size / seconds),
        "records_built_seconds": round(built, 1),
        "machine": f"{platform.machine()}, 1 thread (OMP_NUM_THREADS=1), shared 2-core host",
        "transformers": transformers.__version__,
    }
    print(json.dumps(figure), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    figures = json.loads(args.output.read_text()) if args.output.is_file() else []
    if isinstance(figures, dict):  # the committed file: {"note", "final", "earlier"}; new figures go to "final"
        figures["final"] = [f for f in figures["final"] if f["label"] != args.label] + [figure]
    else:
        figures = [f for f in figures if f["label"] != args.label] + [figure]
    args.output.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
