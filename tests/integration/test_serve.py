"""`lfm2vl serve` (serving/): the OpenAI-compatible server on a free port with a tiny random checkpoint,
driven by the real `openai` client (sync, async, streaming) and raw HTTP.

Greedy answers equal `model.generate` on the same conversation token for token; concurrent clients each
get their answer alone; a client that disconnects frees its slot; every refusal is OpenAI's error object
with its status; /metrics parses as Prometheus text.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import http.server
import io
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import jax
import numpy as np
import openai
import pytest
import uvicorn
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from tiny_checkpoints import write_chat_checkpoint

from lfm2vl_jax import Lfm2VlForConditionalGeneration, Lfm2VlProcessor
from lfm2vl_jax.cli import build_parser, main
from lfm2vl_jax.serving.app import create_app
from lfm2vl_jax.serving.chat import ServerSettings

API_KEY = "test-key"
MODEL = "tiny-lfm2-vl"
LONG = 700  # new tokens of the requests that a client abandons


@dataclasses.dataclass
class Server:
    url: str
    model: Lfm2VlForConditionalGeneration
    processor: Lfm2VlProcessor
    app: object
    media: Path  # --allowed-local-media-path

    @property
    def service(self):
        return self.app.state.service

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0, **kwargs)

    def post(self, body, headers=None, **kwargs) -> httpx.Response:
        headers = {"Authorization": f"Bearer {API_KEY}", **(headers or {})}
        content = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return httpx.post(
            f"{self.url}/v1/chat/completions", content=content, headers=headers, timeout=60, **kwargs
        )


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    checkpoint = write_chat_checkpoint(tmp_path_factory.mktemp("serve") / "model")
    media = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (60, 80, 3), np.uint8)).save(media / "a.png")
    Image.fromarray(rng.integers(0, 255, (90, 40, 3), np.uint8)).save(media / "b.png")
    model = Lfm2VlForConditionalGeneration.from_pretrained(checkpoint, progress=False)
    processor = Lfm2VlProcessor.from_pretrained(checkpoint)
    settings = ServerSettings(
        model_name=MODEL,
        max_model_len=1024,
        slots=4,
        max_queue=16,
        decode_chunk=4,
        api_key=API_KEY,
        allowed_local_media_path=media,
        max_body_bytes=2**20,
    )
    app = create_app(model, processor, settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uvicorn_server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=uvicorn_server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uvicorn_server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield Server(f"http://127.0.0.1:{sock.getsockname()[1]}", model, processor, app, media)
    uvicorn_server.should_exit = True
    thread.join(30)


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def user(*parts: str | Path) -> dict:
    """A user message of text and image parts (images as base64 data: URLs)."""
    content = [
        {"type": "image_url", "image_url": {"url": data_url(p)}}
        if isinstance(p, Path)
        else {"type": "text", "text": p}
        for p in parts
    ]
    return {"role": "user", "content": content}


def as_processor_messages(messages: list[dict]) -> list[dict]:
    """The same conversation for `processor.apply_chat_template` (images by path)."""

    def block(part):
        if part["type"] == "image_url":
            raw = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
            return {
                "type": "image",
                "image": np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")),
            }
        return part

    return [
        {**m, "content": [block(p) for p in m["content"]] if isinstance(m["content"], list) else m["content"]}
        for m in messages
    ]


def generate_alone(server: Server, messages: list[dict], max_new_tokens: int) -> list[int]:
    """`model.generate`'s greedy tokens, up to and including eos."""
    inputs = server.processor.apply_chat_template(
        as_processor_messages(messages), add_generation_prompt=True, tokenize=True, return_dict=True
    )
    tokens = server.model.generate(**inputs, max_new_tokens=max_new_tokens)[0].tolist()
    return tokens[: tokens.index(7) + 1] if 7 in tokens else tokens


def wait_until_idle(server: Server, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while server.service.accepted or server.service.driver.engine.busy_slots:
        assert time.monotonic() < deadline, "the slot was not freed"
        time.sleep(0.02)


def test_a_client_that_disconnects_frees_its_slot(server):
    """Streaming or not, within a few decode steps of the client closing its connection (a raw socket, so
    that it closes exactly once the request is decoding). (First in the module: its long requests grow
    the cache to the capacity every later test then uses, compiling the decode program for it once.)"""
    engine = server.service.driver.engine
    host, port = server.url.removeprefix("http://").split(":")
    for stream in (True, False):
        wait_until_idle(server)
        body = json.dumps(
            {
                "model": MODEL,
                "messages": [user("Write a long story.")],
                "max_completion_tokens": LONG,
                "temperature": 0,
                "stream": stream,
            }
        ).encode()
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        with socket.create_connection((host, int(port))) as connection:
            connection.sendall(head.encode() + body)
            deadline = time.monotonic() + 60
            while not engine.stats.decode_steps or not engine.busy_slots:  # decoding has begun
                assert time.monotonic() < deadline, "the request never started"
                time.sleep(0.002)
            steps = engine.stats.decode_steps
        wait_until_idle(server)
        assert engine.stats.decode_steps - steps < LONG // 2, stream


def ask_greedy(server: Server, messages: list[dict], max_tokens: int):
    """A greedy completion through the openai client, with each choice's token ids (vLLM's extra)."""
    return server.client().chat.completions.create(
        model=MODEL,
        messages=messages,
        max_completion_tokens=max_tokens,
        temperature=0,
        extra_body={"return_token_ids": True},
    )


def test_greedy_answers_equal_generate_token_for_token(server):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        user("What is shown here?", server.media / "a.png", "And here?", server.media / "b.png"),
        {"role": "assistant", "content": "Two pictures."},
        user("Describe the first one."),
    ]
    expected = generate_alone(server, messages, 12)
    response = ask_greedy(server, messages, 12)
    (choice,) = response.choices
    assert choice.model_extra["token_ids"] == expected
    assert choice.message.content == server.processor.decode(expected, skip_special_tokens=True)
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    prompt = server.processor.apply_chat_template(
        as_processor_messages(messages), add_generation_prompt=True, tokenize=True
    )
    assert response.usage.prompt_tokens == prompt.shape[1] and response.usage.completion_tokens == 12
    assert response.usage.total_tokens == prompt.shape[1] + 12 and response.model == MODEL

    # A stop token ends it with "stop"; `max_tokens` (the older name) limits it where max_completion_tokens
    # is absent.
    stop_id = expected[5]
    stopped = server.client().chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0, extra_body={"stop_token_ids": [stop_id]}
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens == expected.index(stop_id) + 1


def test_image_budget_per_request(server):
    """`detail: "low"` is one tile of at most the checkpoint's minimum image tokens: the answer is
    `generate`'s with a processor set so; budgets above the checkpoint's are refused."""
    messages = [user(server.media / "a.png", "What is it?")]
    for part in messages[0]["content"][:1]:
        part["image_url"]["detail"] = "low"
    ours = server.processor.image_processor
    low = Lfm2VlProcessor.from_pretrained(
        server.model.source_dir,
        do_image_splitting=False,
        min_image_tokens=1,
        max_image_tokens=ours.min_image_tokens,
    )
    inputs = low.apply_chat_template(
        as_processor_messages(messages), add_generation_prompt=True, tokenize=True, return_dict=True
    )
    expected = server.model.generate(**inputs, max_new_tokens=6)[0].tolist()
    response = ask_greedy(server, messages, 6)
    assert response.choices[0].model_extra["token_ids"] == expected
    assert response.usage.prompt_tokens == inputs["input_ids"].shape[1]
    same = server.client().chat.completions.create(
        model=MODEL,
        messages=[user(server.media / "a.png", "What is it?")],
        max_completion_tokens=6,
        temperature=0,
        extra_body={
            "do_image_splitting": False,
            "min_image_tokens": 1,
            "max_image_tokens": ours.min_image_tokens,
        },
    )
    assert same.choices[0].message.content == response.choices[0].message.content
    error = error_of(server.post(text_request(max_image_tokens=ours.max_image_tokens + 1)), 400)
    assert error["param"] == "max_image_tokens" and "checkpoint" in error["message"]


def test_streaming_chunks_are_openai_s_and_equal_the_answer(server):
    messages = [user(server.media / "a.png", "What is this?")]
    options = {"model": MODEL, "messages": messages, "max_completion_tokens": 20, "temperature": 0}
    whole = server.client().chat.completions.create(**options)
    text = whole.choices[0].message.content
    chunks = list(
        server.client().chat.completions.create(
            **options, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == text
    assert not any(d.endswith("\ufffd") for d in deltas[:-1])  # no character split across deltas
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "length"
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1]) and len({c.id for c in chunks}) == 1

    # On the wire: `data: {json}` events, blank-line separated, ending with `data: [DONE]`.
    raw = server.post({**options, "stream": True}).text
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: {") for e in events[:-2])
    assert "usage" not in json.loads(events[0][len("data: ") :])

    # A stop string (matched on the text) ends the answer before it, streamed or not.
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = server.client().chat.completions.create(**options, stop=[stop, "never-there"])
    assert cut.choices[0].message.content == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens < 20
    streamed = server.client().chat.completions.create(**options, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text[: text.find(stop)]


def test_concurrent_clients_each_get_their_answer_alone(server):
    """8 requests (images or not, streaming or not, greedy or sampled from a seed) through the async client
    at once: each gets what it got alone."""
    images = [server.media / "a.png", server.media / "b.png"]
    requests = []
    for i in range(8):
        parts = [images[i % 2], f"Question {i}: what is this?"] if i % 3 else [f"Tell me about {i}."]
        sampling = {"temperature": 0.8, "top_p": 0.9, "seed": i} if i % 4 == 1 else {"temperature": 0}
        requests.append({"messages": [user(*parts)], "max_completion_tokens": 4 + i, **sampling})
    alone = [
        server.client().chat.completions.create(model=MODEL, **r).choices[0].message.content for r in requests
    ]

    async def ask(client: openai.AsyncOpenAI, i: int, request: dict) -> str:
        if i % 2:
            stream = await client.chat.completions.create(model=MODEL, stream=True, **request)
            return "".join([c.choices[0].delta.content or "" async for c in stream])
        response = await client.chat.completions.create(model=MODEL, **request)
        return response.choices[0].message.content

    async def together() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0) as client:
            return await asyncio.gather(*(ask(client, i, r) for i, r in enumerate(requests)))

    assert asyncio.run(together()) == alone


def test_n_choices_sample_from_consecutive_seeds(server):
    messages = [user("Pick a number.")]
    options = {"model": MODEL, "messages": messages, "max_completion_tokens": 6, "temperature": 1.0}
    both = server.client().chat.completions.create(**options, n=2, seed=5)
    first = server.client().chat.completions.create(**options, seed=5)
    second = server.client().chat.completions.create(**options, seed=6)
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.message.content for c in both.choices] == [
        first.choices[0].message.content,
        second.choices[0].message.content,
    ]
    assert both.usage.completion_tokens == 12


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def text_request(**fields) -> dict:
    return {"model": MODEL, "messages": [user("hi")], "max_completion_tokens": 2, **fields}


def image_part_request(image_url: dict | None, part_type: str = "image_url") -> dict:
    part = {"type": part_type, **({} if image_url is None else {"image_url": image_url})}
    return text_request(messages=[{"role": "user", "content": [part]}])


@pytest.mark.parametrize(
    ("body", "status", "param", "says"),
    [
        ("{not json", 400, None, "not valid JSON"),
        ("[1, 2]", 400, None, "JSON object"),
        (text_request(temperature="hot"), 400, "temperature", "temperature"),
        (text_request(temperature=3), 400, "temperature", "less than or equal to 2"),
        (text_request(whatever=1), 400, "whatever", "Unrecognized request argument supplied: whatever"),
        (text_request(model="gpt-4o"), 404, "model", "gpt-4o"),
        (text_request(messages=[]), 400, "messages", "at least one"),
        (text_request(messages=[{"role": "user"}]), 400, "messages[0].content", "needs content"),
        (text_request(messages=[{"role": "robot", "content": "hi"}]), 400, "messages[0].role", "role"),
        (image_part_request({"detail": "auto"}), 400, "messages[0].content[0].image_url.url", "required"),
        (image_part_request(None, "input_audio"), 400, "messages[0].content[0]", "'input_audio'"),
        (text_request(n=0), 400, "n", "greater than or equal to 1"),
        (text_request(n=1000), 400, "n", "less than or equal to 16"),
        (text_request(max_completion_tokens=0), 400, "max_completion_tokens", "greater than"),
        (text_request(max_completion_tokens=5000), 400, "messages", "maximum context length is 1024"),
        (text_request(presence_penalty=0.5), 400, "presence_penalty", "not supported"),
        (text_request(frequency_penalty=1), 400, "frequency_penalty", "not supported"),
        (text_request(logprobs=True), 400, "logprobs", "not supported"),
        (
            text_request(tools=[{"type": "function", "function": {"name": "f"}}]),
            400,
            "tools",
            "not supported",
        ),
        (text_request(response_format={"type": "json_object"}), 400, "response_format", "text"),
        (text_request(top_k=5, temperature=1), 400, "top_k", "no top_k (-1)"),
        (text_request(repetition_penalty=-1), 400, "repetition_penalty", "greater than 0"),
        (text_request(stop_token_ids=[70000]), 400, None, "stop_token_ids"),
        (text_request(stop=[""]), 400, "stop", "non-empty"),
        (text_request(stream_options={"include_usage": True}), 400, "stream_options", "stream"),
    ],
)
def test_refusals_are_openai_errors(server, body, status, param, says):
    error = error_of(server.post(body), status)
    assert says in error["message"] and error["param"] == param, error


def image_request(url: str) -> dict:
    part = {"type": "image_url", "image_url": {"url": url}}
    return text_request(messages=[{"role": "user", "content": [{"type": "text", "text": "look"}, part]}])


def test_images_are_refused_unless_inline_or_under_the_allowed_path(server, tmp_path):
    param = "messages[0].content[1].image_url"
    png = base64.b64encode(b"not a png").decode()
    for url, says in [
        (f"data:image/png;base64,{png}", "not a readable image"),
        ("data:image/png;base64,@@@", "not valid base64"),
        ("data:image/png,rawdata", "base64"),
        ("https://example.com/cat.png", "not fetched"),
        ("ftp://example.com/cat.png", "scheme"),
        (f"file://{tmp_path / 'x.png'}", "outside --allowed-local-media-path"),
        (f"file://{server.media}/../{server.media.name}-other/a.png", "outside"),
        (f"file://{server.media / 'missing.png'}", "missing.png"),
    ]:
        error = error_of(server.post(image_request(url)), 400)
        assert error["param"] == param and says.lower() in error["message"].lower(), (url, error)
    # An image placeholder in the text without its image: the processor's count check.
    error = error_of(server.post(text_request(messages=[user("<image> what is it?")])), 400)
    assert "placeholder" in error["message"]
    answer = server.post(image_request(f"file://{server.media / 'a.png'}"))
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_remote_images_only_with_the_flag(server):
    """http(s) image URLs: refused by default; with --allow-remote-media fetched (the answer equals the
    one for the same image inline), a failed fetch is a 400 naming the part."""
    handler = functools.partial(_QuietFiles, directory=str(server.media))
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{files.server_address[1]}"
    service, settings = server.service, server.service.settings
    try:
        error = error_of(server.post(image_request(f"{url}/a.png")), 400)
        assert "--allow-remote-media" in error["message"]
        service.settings = dataclasses.replace(settings, allow_remote_media=True)
        fetched = server.post({**image_request(f"{url}/a.png"), "temperature": 0})
        inline = server.post({**image_request(data_url(server.media / "a.png")), "temperature": 0})
        assert fetched.status_code == 200 and fetched.json()["choices"] == inline.json()["choices"]
        error = error_of(server.post(image_request(f"{url}/missing.png")), 400)
        assert "HTTP 404" in error["message"] and error["param"] == "messages[0].content[1].image_url"
    finally:
        service.settings = settings
        files.shutdown()
        files.server_close()


def test_api_key_body_size_queue_and_routes(server):
    client = server.client()
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    error = error_of(httpx.post(f"{server.url}/v1/chat/completions", json=text_request()), 401)
    assert error["code"] == "invalid_api_key"
    assert [m.id for m in client.models.list()] == [MODEL] and client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    with pytest.raises(openai.BadRequestError, match="Unrecognized request argument"):
        client.chat.completions.create(model=MODEL, messages=[user("hi")], extra_body={"typo": 1})

    error_of(server.post(b"x" * (2**20 + 1)), 413)
    error_of(httpx.get(f"{server.url}/v1/nothing", headers={"Authorization": f"Bearer {API_KEY}"}), 404)

    # A full queue answers 429 at once (the admission count stands in for requests in flight).
    service = server.service
    service.accepted += service.settings.slots + service.settings.max_queue
    try:
        error = error_of(server.post(text_request()), 429)
        assert "--max-queue" in error["message"]
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model=MODEL, messages=[user("hi")], max_completion_tokens=2)
    finally:
        service.accepted -= service.settings.slots + service.settings.max_queue
    assert server.post(text_request()).status_code == 200  # and serves again


def test_an_error_after_the_stream_began_is_an_error_event(server):
    """A request over --request-timeout while streaming: the client raises the error event."""
    service = server.service
    settings = service.settings
    service.settings = dataclasses.replace(settings, request_timeout=0.3)
    try:
        stream = server.client().chat.completions.create(
            model=MODEL,
            messages=[user("Go on and on.")],
            max_completion_tokens=LONG,
            temperature=0,
            stream=True,
        )
        with pytest.raises(openai.APIError, match="request-timeout"):
            for _ in stream:
                pass
    finally:
        service.settings = settings
    wait_until_idle(server)


def test_health_and_metrics(server):
    assert httpx.get(f"{server.url}/health").status_code == 200
    response = httpx.get(f"{server.url}/metrics")
    assert response.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    for name in ("lfm2vl_num_requests_running", "lfm2vl_num_requests_waiting"):
        assert families[name].type == "gauge"
    samples = {s.name: s.value for f in families.values() for s in f.samples if not s.labels}
    assert samples["lfm2vl_generation_tokens_total"] >= 20 and samples["lfm2vl_prompt_tokens_total"] > 0
    assert samples["lfm2vl_time_to_first_token_seconds_count"] >= 1
    assert samples["lfm2vl_inter_token_latency_seconds_count"] >= 1
    assert families["lfm2vl_e2e_request_latency_seconds"].type == "histogram"
    # Compilations stall every stream: counted from the server's start (the process's, as JAX's are).
    before = samples["lfm2vl_xla_compilations_total"]
    jax.jit(lambda x: x * 3 + 1)(np.zeros((7, 13), np.float32)).block_until_ready()  # a new program
    families = text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)
    samples = {s.name: s.value for f in families for s in f.samples if not s.labels}
    assert samples["lfm2vl_xla_compilations_total"] == before + 1
    assert samples["lfm2vl_xla_compile_seconds_total"] > 0


def test_a_bug_is_a_500_with_its_message_and_the_server_goes_on(server, monkeypatch):
    def broken(request):
        raise ZeroDivisionError("a bug")

    with monkeypatch.context() as patch:
        patch.setattr(server.service, "decoding_options", broken)
        error = error_of(server.post(text_request()), 500)
    assert "ZeroDivisionError: a bug" in error["message"] and error["type"] == "server_error"
    assert server.post(text_request()).status_code == 200


def test_cli_serve_defaults_and_flag_errors(capsys):
    args = build_parser().parse_args(["serve", "--model", "some/model"])
    assert args.host == "127.0.0.1" and args.api_key is None and args.allowed_local_media_path is None
    assert args.compile_cache is None  # the command line's default cache, as the other commands
    uncached = build_parser().parse_args(["serve", "--model", "m", "--compile-cache", "off"])
    assert uncached.compile_cache == "off"
    assert main(["serve", "--model", "some/model", "--slots", "0"]) == 2
    assert "--slots must be >= 1" in capsys.readouterr().err
    assert main(["serve", "--model", "some/model", "--allowed-local-media-path", "/no/such/dir"]) == 2
    assert "not a directory" in capsys.readouterr().err
