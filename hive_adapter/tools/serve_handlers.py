"""transformers serve's model manager, chat handler and generate manager, as `hive-serve` runs them.

Subclasses of transformers' own classes (passed in as `base`; transformers' serving modules import FastAPI, an
optional dependency), changing only what HIVE or safety needs:
- `HiveModelManager`: loads HIVE checkpoints (transformers' loader knows no `HiveForConditionalGeneration`), calls
  them VLMs, and lists the served model in `/v1/models` (transformers' scans the HF cache, a 500 without one);
- `HiveChatHandler`: checks a body before any work (`serve_requests`), reads its pictures off the event loop under
  the media policy (`serve_media`), renders the chat template off the event loop with the server's own template
  only, refuses `prompt + max_tokens` beyond the model's positions (naming both; without `max_tokens` it
  generates up to them), samples when `temperature` > 0 or `top_p` < 1, and answers a streamed request whose
  generation fails before its first token with an HTTP error, later with an error event the openai client raises;
- `HiveGenerateManager`: `generate` on transformers' one inference thread, seeded there (`seed`), with the
  tokenizer `stop` strings need, and a non-streaming generation stopped once its client has hung up.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from transformers import StoppingCriteria

from .serve_app import client_gone, error_body
from .serve_media import MediaPolicy, load_image
from .serve_requests import RequestLimits, RequestRefused, capped, check_chat_request

logger = logging.getLogger(__name__)

MEDIA_THREADS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="hive-serve-media")
TEMPLATE_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hive-serve-template")  # tokenizers: one
DISCONNECT_POLL_SECONDS = 0.25


@dataclass
class GenerationRequest:
    """What the generate manager needs to know of the request it runs (set by the handler for its task)."""

    seed: int | None = None
    stops: tuple[str, ...] = ()
    error: Exception | None = None


_generation_request: contextvars.ContextVar = contextvars.ContextVar("hive_generation_request", default=None)


def hive_model_manager(base: type) -> type:
    from pathlib import Path

    from transformers.cli.serving.utils import Modality

    class HiveModelManager(base):
        def _load_model(self, model_id_and_revision, tqdm_class=None, progress_callback=None, gguf_file=None):
            model_id = model_id_and_revision.split("@", 1)[0]
            config_file = Path(model_id, "config.json")
            if gguf_file is None and config_file.is_file():
                if json.loads(config_file.read_text()).get("model_type") == "hive":
                    from transformers import AutoModelForImageTextToText

                    dtype = self.dtype if self.dtype is not None else "auto"
                    model = AutoModelForImageTextToText.from_pretrained(
                        model_id, dtype=dtype, attn_implementation=self.attn_implementation
                    )
                    return model.to(device_for(self.device)).eval()
            return super()._load_model(model_id_and_revision, tqdm_class, progress_callback, gguf_file)

        @staticmethod
        def get_model_modality(model, processor=None):
            if getattr(getattr(model, "config", None), "model_type", None) == "hive":
                return Modality.VLM
            return base.get_model_modality(model, processor=processor)

        def get_gen_models(self, cache_dir=None) -> list[dict]:
            if self.force_model is None:
                return base.get_gen_models(cache_dir)
            created = int(Path(self.force_model).stat().st_mtime) if Path(self.force_model).exists() else 0
            return [{"id": self.force_model, "object": "model", "created": created, "owned_by": "hive-serve"}]

    return HiveModelManager


def device_for(device):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)


def hive_chat_handler(base: type, media: MediaPolicy, limits: RequestLimits) -> type:
    class HiveChatHandler(base):
        async def handle_request(self, body: dict, request_id: str):
            pictures = check_chat_request(body, limits)
            self._validate_request(body)  # transformers': fields the OpenAI schema does not have are a 422
            model_id, model, processor = self._resolve_model(body)
            gen_manager = self.generation_state.get_manager(model_id, use_cb=False)
            loop = asyncio.get_running_loop()
            images = await asyncio.gather(
                *(loop.run_in_executor(MEDIA_THREADS, load_image, url, media, where) for where, url in pictures)
            )
            conversation = _conversation(body["messages"], iter(images))
            inputs = await loop.run_in_executor(TEMPLATE_THREAD, self._render, processor, conversation)
            inputs = inputs.to(model.device)
            gen_config = self._build_generation_config(body, model.generation_config)
            _fit_positions(body, gen_config, inputs["input_ids"].shape[-1], model.config)
            stop = body.get("stop")
            stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
            _generation_request.set(GenerationRequest(seed=body.get("seed"), stops=stops))
            if body.get("stream"):
                response = self._streaming(request_id, model, processor, model_id, inputs, gen_config, gen_manager)
                return await _first_token_or_error(response)
            return await self._non_streaming(request_id, model, processor, model_id, inputs, gen_config, gen_manager)

        def _build_completion(self, request_id, content, *args, **kwargs):
            request = _generation_request.get()
            if request is not None and request.stops:
                trimmer = StopTrimmer(request.stops)  # OpenAI's answer ends before the stop string
                content = trimmer.feed(content) + trimmer.flush()
            return super()._build_completion(request_id, content, *args, **kwargs)

        def _render(self, processor, conversation):
            return processor.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
                **self.chat_template_kwargs,  # the operator's --chat-template-kwargs, never a client's
            )  # fmt: skip

        def _build_generation_config(self, body, model_generation_config, use_cb=False):
            # seeded on the inference thread right before this request's generate; `stop` checked by StopStrings
            seed, stop = body.pop("seed", None), body.pop("stop", None)
            if body.get("logit_bias"):  # generate takes float biases only; JSON's 5 is an int
                body["logit_bias"] = {token: float(bias) for token, bias in body["logit_bias"].items()}
            try:
                config = super()._build_generation_config(body, model_generation_config, use_cb=use_cb)
            finally:
                body.update({key: value for key, value in (("seed", seed), ("stop", stop)) if value is not None})
            temperature, top_p = body.get("temperature"), body.get("top_p")
            if (temperature is not None and temperature > 0) or (top_p is not None and top_p < 1):
                config.do_sample = True
            if config.do_sample and temperature == 0:
                config.do_sample = False
            return config

    return HiveChatHandler


def _conversation(messages: list[dict], images) -> list[dict]:
    """OpenAI messages as the processor's chat messages, each picture part replaced by its decoded image."""
    conversation = []
    for message in messages:
        content = message.get("content") or []
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        parts = [
            {"type": "text", "text": part["text"]}
            if part["type"] == "text"
            else {"type": "image", "image": next(images)}
            for part in content
        ]
        conversation.append({"role": message["role"], "content": parts})
    return conversation


def _fit_positions(body: dict, gen_config, prompt_tokens: int, config) -> None:
    """`prompt + max_tokens` within the model's positions; without `max_tokens`, generate up to them."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    positions = getattr(text_config, "max_position_embeddings", None)
    if positions is None:
        return
    asked_field = next((name for name in ("max_completion_tokens", "max_tokens") if body.get(name) is not None), None)
    room = positions - prompt_tokens
    if asked_field is None:
        if room < 1:
            raise RequestRefused(
                f"the prompt is {prompt_tokens} tokens; the model has {positions} positions, none left to answer in",
                param="messages",
            )
        gen_config.max_new_tokens = min(gen_config.max_new_tokens, room)
    elif prompt_tokens + body[asked_field] > positions:
        raise RequestRefused(
            f"the prompt ({prompt_tokens} tokens) + {asked_field} ({body[asked_field]}) is over the model's "
            f"{positions} positions; ask for at most {max(room, 0)} tokens or send a shorter prompt",
            param=asked_field,
        )


async def _first_token_or_error(response):
    """transformers' SSE response, started only once generation has produced something: a failure before that
    is an HTTP error; one after it an OpenAI-shaped error event (`{"error": {"message": ...}}`)."""
    from fastapi.responses import JSONResponse, StreamingResponse

    request = _generation_request.get()
    events = response.body_iterator
    first = [await anext(events)]  # the role chunk
    second = await anext(events, None)
    if second is not None and '"error"' in second and request.error is not None:
        await events.aclose()
        status = 400 if isinstance(request.error, ValueError) else 500
        kind = "invalid_request_error" if status == 400 else "server_error"
        return JSONResponse(error_body(_describe(request.error), kind=kind), status_code=status)
    if second is not None:
        first.append(second)

    trimmer = StopTrimmer(request.stops) if request.stops else None

    async def stream():
        try:
            for chunk in first:
                yield _trimmed(chunk, trimmer)
            async for chunk in events:
                if '"error"' in chunk and request.error is not None:
                    head = _trimmed(chunk.split('data: {"error": ', 1)[0], trimmer)
                    yield head + f"data: {json.dumps(error_body(_describe(request.error), kind='server_error'))}\n\n"
                    return
                yield _trimmed(chunk, trimmer)
        finally:
            await events.aclose()  # a client that hangs up cancels the generation (transformers' streamer)

    return StreamingResponse(stream(), media_type="text/event-stream")


class StopTrimmer:
    """Text fed piece by piece, given back up to (not including) the first of `stops`: generate stops on the token
    that completes a stop string and keeps it; OpenAI's answer ends before it. Holds back a tail that could still
    become a stop string."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.pending, self.stopped = stops, "", False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self.pending += text
        hits = [index for stop in self.stops if (index := self.pending.find(stop)) >= 0]
        if hits:
            self.stopped = True
            return self.pending[: min(hits)]
        held = max(
            (n for stop in self.stops for n in range(1, len(stop)) if self.pending.endswith(stop[:n])), default=0
        )
        given, self.pending = self.pending[: len(self.pending) - held], self.pending[len(self.pending) - held :]
        return given

    def flush(self) -> str:
        given, self.pending = ("" if self.stopped else self.pending), ""
        return given


def _trimmed(chunk: str, trimmer: StopTrimmer | None) -> str:
    """SSE events of transformers' handler with their content cut by `trimmer` (unchanged without one)."""
    if trimmer is None or not chunk:
        return chunk
    events = []
    for event in chunk.split("\n\n"):
        if not event.startswith("data: {"):
            events.append(event)
            continue
        data = json.loads(event[len("data: ") :])
        choice = (data.get("choices") or [{}])[0]
        delta = choice.get("delta") or {}
        if choice.get("finish_reason") is not None:
            delta["content"] = (delta.get("content") or "") + trimmer.flush()
        elif delta.get("content"):
            delta["content"] = trimmer.feed(delta["content"])
        if "delta" in choice:
            choice["delta"] = {key: value for key, value in delta.items() if value not in ("", None)}
            if not choice["delta"] and choice.get("finish_reason") is None:
                continue
        events.append("data: " + json.dumps(data))
    return "\n\n".join(events)


def _describe(error: Exception) -> str:
    return capped(f"{type(error).__name__}: {error}")


def hive_generate_manager(base: type) -> type:
    from transformers.cli.serving.utils import DirectStreamer, _GenerationCancelled, _StreamError

    class HiveGenerateManager(base):
        def generate_streaming(self, model, processor, inputs, gen_config, request_id, response_parser=None):
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue = asyncio.Queue()
            streamer = DirectStreamer(processor.tokenizer._tokenizer, loop, queue, response_parser=response_parser)
            request = _generation_request.get() or GenerationRequest()
            kwargs = {**inputs, "streamer": streamer, "generation_config": gen_config, "tokenizer": processor.tokenizer,
                      "stopping_criteria": _criteria(request, processor.tokenizer, inputs)}  # fmt: skip

            def run() -> None:
                try:
                    _seed(request.seed)
                    model.generate(**kwargs)
                except _GenerationCancelled:
                    loop.call_soon_threadsafe(queue.put_nowait, None)
                except Exception as error:  # reported to the client by _first_token_or_error
                    request.error = error
                    logger.warning("streamed generation failed: %s", _describe(error))
                    loop.call_soon_threadsafe(queue.put_nowait, _StreamError("generation failed"))

            self.submit(run)
            return queue, streamer

        async def generate_non_streaming(self, model, processor, inputs, gen_config, request_id):
            request = _generation_request.get() or GenerationRequest()
            abandoned = threading.Event()

            def run():
                if abandoned.is_set():  # hung up while waiting for the inference thread
                    return None
                _seed(request.seed)
                criteria = _criteria(request, processor.tokenizer, inputs, _Abandoned(abandoned))
                return model.generate(
                    **inputs, generation_config=gen_config, tokenizer=processor.tokenizer, stopping_criteria=criteria
                )

            future = self.async_submit(run)
            try:
                while not future.done():
                    await asyncio.wait([future], timeout=DISCONNECT_POLL_SECONDS)
                    if not future.done() and await client_gone():
                        abandoned.set()
                        logger.warning("request %s: the client hung up; its generation is stopped", request_id)
            except asyncio.CancelledError:
                abandoned.set()
                raise
            sequences = future.result()
            input_len = inputs["input_ids"].shape[-1]
            if sequences is None:
                return "", input_len, []
            generated_ids = sequences[0, input_len:]
            return processor.decode(generated_ids, skip_special_tokens=True), input_len, generated_ids

    return HiveGenerateManager


class _Abandoned(StoppingCriteria):
    """Every sequence is done once `flag` is set (the client hung up)."""

    def __init__(self, flag: threading.Event):
        self.flag = flag

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.flag.is_set(), dtype=torch.bool, device=input_ids.device)


class StopStrings(StoppingCriteria):
    """Done once the answer's text holds one of `stops`: its last tokens decoded, which works for every tokenizer
    (generate's own `stop_strings` walks the vocabulary and fails on word-level ones)."""

    def __init__(self, stops: tuple[str, ...], tokenizer, prompt_tokens: int):
        self.stops, self.tokenizer, self.prompt_tokens = stops, tokenizer, prompt_tokens
        self.window = max(len(stop) for stop in stops) + 4  # tokens: every token spells at least one character

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        tails = input_ids[:, max(self.prompt_tokens, input_ids.shape[1] - self.window) :]  # (batch, <= window)
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        done = [any(stop in text for stop in self.stops) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _criteria(request: GenerationRequest, tokenizer, inputs, *more):
    from transformers import StoppingCriteriaList

    stops = [StopStrings(request.stops, tokenizer, inputs["input_ids"].shape[-1])] if request.stops else []
    return StoppingCriteriaList([*stops, *more])


def _seed(seed: int | None) -> None:
    if seed is not None:
        import torch

        torch.manual_seed(seed)
