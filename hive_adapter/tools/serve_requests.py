"""What a `/v1/chat/completions` body must look like before `hive-serve` does any work for it.

`check_chat_request(body, limits)` refuses, with a `RequestRefused` naming the field (OpenAI's `param`), every body
transformers' handler would otherwise turn into an HTTP 500 or act on unsafely: missing or empty `messages`,
content parts without a `type` or a `url`, parts of a kind a HIVE model does not read (video, audio), more
pictures than `--limit-mm-per-prompt`, a client's `chat_template_kwargs` or `generation_config` (either could
change the template, the tokenisation or the image size), `n` other than 1, and sampling values out of range.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_ERROR_CHARS = 500
ROLES = ("system", "developer", "user", "assistant", "tool")
DEFAULT_IMAGES_PER_REQUEST = 4
DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024


class RequestRefused(Exception):
    """A request the server will not run: HTTP `status` with OpenAI's error body naming `param`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


@dataclass(frozen=True)
class RequestLimits:
    images_per_request: int = DEFAULT_IMAGES_PER_REQUEST
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES


def capped(message: str, limit: int = MAX_ERROR_CHARS) -> str:
    """`message` cut to `limit` characters: an error never carries a client's payload back in full."""
    return message if len(message) <= limit else message[: limit - 15] + " ... (cut)"


def check_chat_request(body: dict, limits: RequestLimits) -> list[tuple[str, str]]:
    """Refuse what is malformed or unsafe in `body`; the `(field, url)` of every picture, in order."""
    for name in ("chat_template_kwargs", "generation_config"):
        if body.get(name) is not None:
            raise RequestRefused(
                f"{name} is not accepted by this server: it could change the chat template, the tokenisation or "
                "the image size; send the conversation as messages",
                param=name,
            )
    _check_model_and_options(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestRefused("messages must be a non-empty list of {role, content} objects", param="messages")
    images = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise RequestRefused(f"{where} must be an object with role and content", param=where)
        if message.get("role") not in ROLES:
            raise RequestRefused(f"{where}.role must be one of {', '.join(ROLES)}", param=f"{where}.role")
        images += _check_content(message.get("content"), f"{where}.content")
    if len(images) > limits.images_per_request:
        raise RequestRefused(
            f"the request holds {len(images)} pictures; this server takes at most {limits.images_per_request} per "
            "request (--limit-mm-per-prompt)",
            param="messages",
        )
    return images


def _check_content(content, where: str) -> list[tuple[str, str]]:
    if content is None or isinstance(content, str):
        return []
    if not isinstance(content, list):
        raise RequestRefused(f"{where} must be a string or a list of content parts", param=where)
    images = []
    for index, part in enumerate(content):
        at = f"{where}[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise RequestRefused(f"{at}.text must be a string", param=f"{at}.text")
        elif kind == "image_url":
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else None
            if not isinstance(url, str) or not url:
                raise RequestRefused(f"{at}.image_url.url must be a string (a data: URL)", param=f"{at}.image_url.url")
            images.append((f"{at}.image_url", url))
        elif kind is None:
            raise RequestRefused(f"{at} must be an object with a type ('text' or 'image_url')", param=f"{at}.type")
        else:
            raise RequestRefused(
                f"{at}.type must be 'text' or 'image_url' (a HIVE model reads pictures and text), not "
                f"{capped(str(kind), 40)!r}",
                param=f"{at}.type",
            )
    return images


def _check_model_and_options(body: dict) -> None:
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise RequestRefused("model must be a string: the served directory as given at start", param="model")
    if body.get("n") not in (None, 1):
        raise RequestRefused("n must be 1: this server generates one choice per request", param="n")
    for name in ("max_tokens", "max_completion_tokens"):
        if body.get(name) is not None and (not _is_int(body[name]) or body[name] < 1):
            raise RequestRefused(f"{name} must be a whole number of at least 1", param=name)
    if body.get("seed") is not None and not _is_int(body["seed"]):
        raise RequestRefused("seed must be a whole number", param="seed")
    _check_number(body, "temperature", 0.0, 2.0, low_open=False)
    _check_number(body, "top_p", 0.0, 1.0, low_open=True)
    _check_number(body, "frequency_penalty", -1.0, 2.0, low_open=True)
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise RequestRefused("stream must be true or false", param="stream")
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not 1 <= len(stops) <= 4 or not all(isinstance(s, str) and s for s in stops):
            raise RequestRefused("stop must be a string or a list of 1 to 4 non-empty strings", param="stop")
    bias = body.get("logit_bias")
    if bias is not None and (
        not isinstance(bias, dict)
        or not all(str(k).isdigit() and isinstance(v, (int, float)) and -100 <= v <= 100 for k, v in bias.items())
    ):
        raise RequestRefused("logit_bias must map token ids to numbers from -100 to 100", param="logit_bias")


def _check_number(body: dict, name: str, low: float, high: float, *, low_open: bool) -> None:
    value = body.get(name)
    if value is None:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or value > high
        or value < low
        or (low_open and value == low)
    ):
        bounds = f"{'above' if low_open else 'from'} {low:g} {'up ' if low_open else ''}to {high:g}"
        raise RequestRefused(f"{name} must be a number {bounds}", param=name)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
