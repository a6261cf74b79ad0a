"""Reading a prediction request's images: the body within its byte limit, then multipart files or
raw image bytes; every refusal is an ApiError with the status a client can act on."""

from __future__ import annotations

import hmac
import io
from dataclasses import dataclass

import torch
from PIL import Image

from headstart.core.options import option
from headstart.data.images import explain_failure, load_image
from headstart.models.tta import TTA_CHOICES

RAW_TYPES = ("image/", "application/octet-stream")


@dataclass
class ServeConfig:
    """What `headstart serve` takes besides the run and the address: engine, batching and limits."""

    engine: str = option(
        "torch",
        choices=("torch", "onnx"),
        help="torch: the run folder; onnx: RUN/model.onnx (see `headstart export`)",
    )
    device: str = option("auto", help="torch engine: auto (CUDA, then MPS, then CPU), cpu, cuda, mps")
    tta: str | None = option(
        None,
        choices=TTA_CHOICES,
        help="torch engine: test-time views (default: as trained); none halves the work of an hflip "
        "model and turns its prediction sets and rejection off",
    )
    max_batch: int = option(32, min=1, help="images per forward pass, gathered from concurrent requests")
    max_wait_ms: float = option(5.0, min=0, help="how long the first image of a batch waits for others")
    api_key: str | None = option(
        None,
        help="required on /v1/* and /metrics (or $HEADSTART_API_KEY); needed "
        "with a --host other than loopback",
    )
    max_upload_mb: float = option(20.0, above=0, help="largest request body, in MiB")
    max_pixels: int = option(
        40_000_000, min=1, help="largest image, in pixels (decompression bombs are refused)"
    )
    max_images: int = option(16, min=1, help="images per request")
    timeout_s: float = option(30.0, above=0, help="longest a request may take, in seconds")
    top_k: int = option(3, min=1, help="labels per image unless the request asks ?top_k=")


class ApiError(Exception):
    """A request the service refuses: HTTP status, a stable code and a sentence."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def decode(data: bytes, name: str, predictor, max_pixels: int) -> torch.Tensor:
    """Upload bytes -> the model's input tensor, or an ApiError that names the file and the problem."""
    if not data:
        raise ApiError(400, "empty", f"{name}: the upload is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except Exception as e:  # noqa: BLE001 - explained below, like a bad file in a dataset
        raise ApiError(422, "not_an_image", f"{name}: {explain_failure(name, e)}") from e
    if w * h > max_pixels:
        raise ApiError(
            413, "too_many_pixels", f"{name}: {w}x{h} = {w * h:,} pixels, the limit is {max_pixels:,}"
        )
    try:
        image = load_image(io.BytesIO(data), draft=predictor.preprocess.resize_size)
        return predictor.transform(image)
    except Exception as e:  # noqa: BLE001 - truncated, corrupt, ...
        raise ApiError(422, "unreadable_image", f"{name}: {explain_failure(name, e)}") from e


def authorised(headers, key: str | None) -> bool:
    """The request carries the API key (Authorization: Bearer KEY, or X-API-Key: KEY)."""
    if key is None:
        return True
    given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ").strip()
    return hmac.compare_digest(given.encode(), key.encode())


async def read_body(request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes (Content-Length first)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "too_large", f"the request is {int(declared):,} bytes; the limit is {limit:,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "too_large", f"the request is over the limit of {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_images(request, cfg: ServeConfig) -> list[tuple[str, bytes]]:
    """(name, bytes) of every uploaded image: multipart/form-data files, or one raw image body."""
    from starlette.datastructures import Headers, UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limit = int(cfg.max_upload_mb * 2**20)
    if kind.startswith(RAW_TYPES):
        return [("body", await read_body(request, limit))]
    if kind != "multipart/form-data":
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type {kind or 'none'!r}: send multipart/form-data files, or one image as "
            "image/* or application/octet-stream",
        )
    body = await read_body(request, limit)

    async def stream():
        yield body

    try:
        form = await MultiPartParser(
            Headers(raw=request.headers.raw), stream(), max_files=cfg.max_images, max_fields=cfg.max_images
        ).parse()
    except MultiPartException as e:
        raise ApiError(400, "bad_multipart", f"the multipart body cannot be read: {e.message}") from e
    files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
    if not files:
        raise ApiError(400, "no_images", "no files in the form: send each image as a file field")
    if len(files) > cfg.max_images:
        raise ApiError(
            413, "too_many_images", f"{len(files)} images; the limit is {cfg.max_images} per request"
        )
    out = []
    for i, f in enumerate(files):
        out.append((f.filename or f"file {i + 1}", await f.read()))
        await f.close()
    return out
