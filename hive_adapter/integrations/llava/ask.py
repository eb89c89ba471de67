"""`python -m hive_adapter.integrations.llava.ask`: LLaVA's `llava.eval.run_llava`, for HIVE checkpoints, on any device.

Same flags as `run_llava` (`--model-path`, `--model-base`, `--image-file`, `--query`, `--conv-mode`,
`--temperature`, `--max_new_tokens`) plus `--device` (run_llava hard-codes CUDA). Loads the model with
LLaVA's own `load_pretrained_model`, builds the prompt with its conversation templates and prints the
answer.
"""

from __future__ import annotations

from ...utils.flags import FullFlagParser


def main(argv: list[str] | None = None) -> str:
    parser = FullFlagParser(prog="python -m hive_adapter.integrations.llava.ask", description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--model-base", default=None)
    parser.add_argument("--image-file", required=True)
    parser.add_argument("--query", required=True)
    parser.add_argument("--conv-mode", default="llava_v1")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--device", default="cuda", help="cuda | cpu (fp16 weights either way, as LLaVA loads them)")
    args = parser.parse_args(argv)

    from hive_adapter.integrations.llava.patch import apply_patch

    apply_patch()
    import torch
    from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
    from llava.conversation import conv_templates
    from llava.mm_utils import (
        get_model_name_from_path,
        process_images,
        tokenizer_image_token,
    )
    from llava.model.builder import load_pretrained_model
    from PIL import Image

    tokenizer, model, processor, _ = load_pretrained_model(
        args.model_path, args.model_base, get_model_name_from_path(args.model_path), device=args.device
    )
    conversation = conv_templates[args.conv_mode].copy()
    conversation.append_message(conversation.roles[0], f"{DEFAULT_IMAGE_TOKEN}\n{args.query}")
    conversation.append_message(conversation.roles[1], None)
    ids = tokenizer_image_token(conversation.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
    image = Image.open(args.image_file).convert("RGB")
    pixels = process_images([image], processor, model.config).to(model.device, dtype=model.dtype)
    with torch.inference_mode():
        output = model.generate(
            ids[None].to(model.device),
            images=pixels,
            image_sizes=[image.size],
            do_sample=args.temperature > 0,
            temperature=args.temperature if args.temperature > 0 else None,
            max_new_tokens=args.max_new_tokens,
            use_cache=True,
        )
    answer = tokenizer.batch_decode(output, skip_special_tokens=True)[0].strip()
    print(answer)
    return answer


if __name__ == "__main__":
    main()
