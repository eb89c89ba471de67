"""Functions the local task YAMLs name (through the `<task>_utils.py` file written next to each YAML).

Prompting and scoring are lmms-eval's own (imported from its built-in MME, ScienceQA, OK-VQA and GQA
tasks), so a local copy scores exactly like the hub version; only the data loading differs. GQA's
built-in `process_docs` downloads its image table from the hub; `attach_images` reads it from local
parquet files instead.
"""

from __future__ import annotations

from collections.abc import Sequence


def _builtin(task: str):
    import importlib

    return importlib.import_module(f"lmms_eval.tasks.{task}.utils")


def mme_doc_to_visual(doc):
    return _builtin("mme").mme_doc_to_visual(doc)


def mme_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return _builtin("mme").mme_doc_to_text(doc, lmms_eval_specific_kwargs)


def mme_process_results(doc, results):
    return _builtin("mme").mme_process_results(doc, results)


def mme_aggregate_results(results):
    return _builtin("mme").mme_aggregate_results(results)


def sqa_doc_to_visual(doc):
    return _builtin("scienceqa").sqa_doc_to_visual(doc)


def sqa_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return _builtin("scienceqa").sqa_doc_to_text(doc, lmms_eval_specific_kwargs)


def sqa_doc_to_target(doc):
    return _builtin("scienceqa").sqa_doc_to_target(doc)


def sqa_process_results(doc, results):
    return _builtin("scienceqa").sqa_process_results(doc, results)


def ok_vqa_doc_to_visual(doc):
    return _builtin("ok_vqa").ok_vqa_doc_to_visual(doc)


def ok_vqa_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return _builtin("ok_vqa").ok_vqa_doc_to_text(doc, lmms_eval_specific_kwargs)


def ok_vqa_process_results(doc, results):
    return {"exact_match": _builtin("ok_vqa").ok_vqa_process_results(doc, results)["exact_match"]}


def gqa_doc_to_visual(doc):
    return _builtin("gqa").gqa_doc_to_visual(doc)


def gqa_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return _builtin("gqa").gqa_doc_to_text(doc, lmms_eval_specific_kwargs)


def attach_images(dataset, image_files: Sequence[str]):
    """GQA's `process_docs`, offline: give each question the image its `imageId` names, from local
    parquet files with columns `id` and `image` (the hub's `testdev_balanced_images` table)."""
    import datasets

    images = datasets.load_dataset("parquet", data_files={"images": list(image_files)}, split="images")
    row_of = {image_id: row for row, image_id in enumerate(images["id"])}
    missing = sorted({doc_id for doc_id in dataset["imageId"] if doc_id not in row_of})
    if missing:
        raise ValueError(f"{len(missing)} questions name images missing from {list(image_files)}: {missing[:5]}")
    return dataset.map(lambda doc: {"image": images[row_of[doc["imageId"]]]["image"].convert("RGB")})
