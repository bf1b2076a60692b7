"""The Ray Serve application: a FastAPI ingress over the registered classifier.

    POST /v1/classify          one image: multipart field `file`, or the raw body (image/jpeg, image/png, application/dicom)
    POST /v1/classify/batch    several images: multipart, one field `file` per image
    GET  /v1/model             the version being served, its label set and prompts
    GET  /healthz              liveness (no auth)
    GET  /readyz               readiness: model loaded; registry reachable or not; degraded and why (no auth)
    GET  /                     the upload page;  GET /docs: OpenAPI
Built by `python -m serve` or, from serve/config.yaml, by `serve run` / `serve deploy` (`build`).
The pieces (limits, parsing, the alias-following model holder) are in pneumoray.serving.
"""


import asyncio
import logging
import time
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from pydantic import BaseModel
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from pneumoray import serving
from pneumoray.ood import INTENDED_USE
from pneumoray.serving import ClientError

PAGE = (Path(__file__).with_name("page.html")).read_text()
log = logging.getLogger("ray.serve")


class Prediction(BaseModel):
    label: str
    probabilities: dict[str, float]
    in_distribution: bool | None
    ood_score: float | None
    warning: str | None
    intended_use: str
    model: str | None
    version: str | None
    alias: str | None
    latency_ms: float


class BatchItem(BaseModel):
    filename: str | None
    label: str
    probabilities: dict[str, float]
    in_distribution: bool | None
    ood_score: float | None
    warning: str | None


class BatchPrediction(BaseModel):
    results: list[BatchItem]
    intended_use: str
    model: str | None
    version: str | None
    alias: str | None
    latency_ms: float


class ErrorBody(BaseModel):
    error: str


ERRORS = {code: {"model": ErrorBody, "description": text} for code, text in {
    400: "empty, malformed or missing upload", 401: "bearer token missing or wrong",
    408: "the request body did not arrive within serve.body_timeout_s",
    413: "body, image or batch too large", 415: "content type or image format not accepted",
    422: "an image that cannot be decoded (corrupt or truncated)"}.items()}
_IMAGE_BODY = {"schema": {"type": "string", "format": "binary"}}
SINGLE_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": {"type": "string", "format": "binary"}}}},
    "image/jpeg": _IMAGE_BODY, "image/png": _IMAGE_BODY, "application/dicom": _IMAGE_BODY}}}
BATCH_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}}

api = FastAPI(
    title="pneumoray classifier",
    version="1",
    description="Pediatric chest X-ray classification (CLIP + LoRA) served from the MLflow registry. "
                "Research use only: not a medical device, not for diagnosis. Every answer names the model "
                "version that produced it and says whether the image looks like the training X-rays "
                "(in_distribution, ood_score, warning).",
)
# Documents the Authorization header (the Authorize button in /docs); the check is check_bearer.
bearer_doc = HTTPBearer(auto_error=False, description="the server's PNEUMORAY_SERVE_TOKEN, else its run folder's "
                                                    "serve-token file (auth is on unless started with --no-auth)")


@api.exception_handler(ClientError)
async def _upload_error(request: Request, exc: ClientError):
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    message = {404: f"no such endpoint {request.url.path}: see /docs",
               405: f"{request.method} is not allowed on {request.url.path}: see /docs"}.get(exc.status_code, str(exc.detail))
    return JSONResponse({"error": message}, status_code=exc.status_code, headers=getattr(exc, "headers", None))


@serve.deployment(name="PneumoniaClassifier")
@serve.ingress(api)
class PneumoniaClassifier:
    def __init__(self, settings: dict):
        self.settings = settings
        serving.harden_pil(settings["max_pixels"])
        self.torch_threads = serving.set_torch_threads(settings.get("torch_threads", 0), settings.get("use_gpu", False))
        self.holder = serving.ModelHolder(settings["model"], settings["tracking_uri"], settings["poll_s"],
                                          settings.get("last_known_good_dir"))
        self.holder.start()
        self.body_limit = int(float(settings["max_body_mb"]) * 2**20)
        self.max_pixels = int(settings["max_pixels"])
        self.max_files = int(settings["max_batch_files"])
        self.max_request_pixels = int(settings["max_request_pixels"])
        self.max_batch = int(settings["max_batch_size"])
        self._active = 0  # classify requests in this replica now (reading, decoding or in the model)
        self._infer.set_max_batch_size(int(settings["max_batch_size"]))
        self._infer.set_batch_wait_timeout_s(float(settings["batch_wait_ms"]) / 1000)
        self.token_env = settings.get("token_env") or serving.TOKEN_ENV
        self.token_sha256 = settings.get("token_sha256")  # None only when the server was started with --no-auth
        self._decode_slots = asyncio.Semaphore(int(settings["decode_concurrency"]))
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.stats = {"requests": 0, "images": 0, "rejected": 0, "aborted": 0, "unbatched": 0, "batches": 0, "largest_batch": 0,
                      "bodies_prefetched": 0}
        served = self.holder.current
        log.info("replica %s serving %s (version %s, alias %s); auth %s", self.replica, served.name,
                 served.version, served.alias, "on" if self.token_sha256 else "off")

    def check_health(self):
        if not self.holder.alive():
            raise RuntimeError("the alias poll thread died")

    def __del__(self):
        holder = getattr(self, "holder", None)
        if holder is not None:
            holder.stop()

    # ------------------------------------------------------------------ pieces

    def _authorize(self, request: Request) -> None:
        serving.check_bearer(request.headers.get("authorization"), self.token_sha256, self.token_env)

    async def _body(self, request: Request) -> bytes:
        prefetched = request.scope.get(serving.PREFETCHED)  # read before dispatch (serving.PrefetchBody)
        if prefetched is not None:
            if len(prefetched) > self.body_limit:
                raise serving.too_large(self.body_limit)
            self.stats["bodies_prefetched"] += 1
            return prefetched
        return await serving.read_limited(request.stream(), request.headers.get("content-length"), self.body_limit,
                                          float(self.settings["body_timeout_s"]))

    async def _prepare(self, served: serving.Served, data: bytes):
        async with self._decode_slots:  # bounds the memory of decoding at once
            return await asyncio.to_thread(serving.prepare, served.model, data, self.max_pixels)

    async def _predict(self, items: list) -> list:
        """Model results for [(served, pixels)], batched with other requests' while there are any.

        With nothing else in flight, a batch window would only add its wait (20 ms) to a lone request:
        it runs at once. While other requests are in flight, their images join one dynamic batch.
        """
        if self._active <= 1:
            self.stats["unbatched"] += 1
            out = []
            for i in range(0, len(items), self.max_batch):
                out += await self._model_call(items[i:i + self.max_batch])
            return out
        return await asyncio.gather(*(self._infer(item) for item in items))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _infer(self, items: list) -> list:
        return await self._model_call(items)

    async def _model_call(self, items: list) -> list:
        results = await asyncio.to_thread(serving.infer_batch, items)
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(items))
        return results

    @staticmethod
    def _answer(served: serving.Served, result: dict, started: float) -> dict:
        return {"label": result["label"], "probabilities": result["probabilities"],
                **{k: result.get(k) for k in ("in_distribution", "ood_score", "warning")},
                "intended_use": INTENDED_USE, "model": served.name,
                "version": served.version, "alias": served.alias,
                "latency_ms": round((time.perf_counter() - started) * 1000, 2)}

    async def _guard(self, work):
        self._active += 1
        try:
            return await work
        except ClientError:
            self.stats["rejected"] += 1
            raise
        except serving.ClientAborted as e:  # the client's doing, and nobody to answer: one line, no traceback
            self.stats["aborted"] += 1
            log.info("client abort: %s", e)
            return Response(status_code=499)  # nginx's "client closed request", for the access log
        except asyncio.CancelledError:  # Serve cancels the request when it sees the client leave first
            self.stats["aborted"] += 1
            log.info("client abort: the client closed the connection; Serve cancelled the request")
            raise  # a cancellation must stay one (Serve logs it as CANCELLED, 499)
        except Exception as e:  # our fault, not the client's: a JSON 500, the traceback in the replica log
            log.exception("request failed")
            return JSONResponse({"error": f"internal error ({type(e).__name__}); see the replica log"}, status_code=500)
        finally:
            self._active -= 1

    # ------------------------------------------------------------------ routes

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self):
        return HTMLResponse(PAGE)

    @api.get("/healthz", summary="Liveness: the replica is up and has a model")
    async def healthz(self):
        served = self.holder.current
        return {"status": "ok", "model": served.name, "version": served.version, "replica": self.replica}

    @api.get("/readyz", summary="Readiness: the model is loaded; whether the registry is reachable; degraded or not")
    async def readyz(self):
        served = self.holder.current  # a constructed replica always has a model: ready, perhaps degraded
        return {**self.holder.state(), "model": served.name, "version": served.version, "replica": self.replica}

    @api.get("/v1/model", summary="The model being served", dependencies=[Depends(bearer_doc)], responses={401: ERRORS[401]})
    async def model_info(self, request: Request):
        self._authorize(request)
        return {**self.holder.current.describe(), "source": self.holder.uri, "follows_alias": self.holder.follows_alias,
                "poll_s": self.holder.poll_s, "swaps": self.holder.swaps, **self.holder.state(),
                "replica": self.replica, "stats": {**self.stats, "in_flight": self._active},
                "limits": {"max_body_mb": self.settings["max_body_mb"], "max_pixels": self.max_pixels,
                           "max_request_pixels": self.max_request_pixels, "max_batch_files": self.max_files,
                           "body_timeout_s": self.settings["body_timeout_s"]}, "torch_threads": self.torch_threads}

    @api.post("/v1/classify", summary="Classify one chest X-ray (JPEG, PNG or DICOM)", response_model=Prediction,
              responses=ERRORS, openapi_extra=SINGLE_BODY, dependencies=[Depends(bearer_doc)])
    async def classify(self, request: Request):
        return await self._guard(self._classify(request))

    async def _classify(self, request: Request):
        started = time.perf_counter()
        self._authorize(request)
        content_type = request.headers.get("content-type")
        kind = serving.body_kind(content_type)  # 415 before reading a byte of the body
        body = await self._body(request)
        if kind == "multipart":
            parts = serving.parse_multipart(body, content_type, serving.SINGLE_ROUTE_MAX_PARTS, single=True)
            part = serving.files_from(parts, single=True)[0]
            data = bytes(part.data)
            if not data:
                raise ClientError(400, f"the uploaded file {part.filename or ''!r} is empty (0 bytes): send the file's content")
        else:
            data = body
            if not data:
                raise ClientError(400, "empty request body: " + serving.HOW_TO_SEND)
        served = self.holder.current  # this version answers the request, whatever happens meanwhile
        pixels = await self._prepare(served, data)
        (result,) = await self._predict([(served, pixels)])
        self.stats["requests"] += 1
        self.stats["images"] += 1
        return JSONResponse(self._answer(served, result, started))

    @api.post("/v1/classify/batch", summary="Classify several chest X-rays in one request", response_model=BatchPrediction,
              responses=ERRORS, openapi_extra=BATCH_BODY, dependencies=[Depends(bearer_doc)])
    async def classify_batch(self, request: Request):
        return await self._guard(self._classify_batch(request))

    async def _classify_batch(self, request: Request):
        started = time.perf_counter()
        self._authorize(request)
        content_type = request.headers.get("content-type")
        serving.body_kind(content_type, batch=True)
        body = await self._body(request)
        files = serving.files_from(serving.parse_multipart(body, content_type, self.max_files + 1), single=False)
        if len(files) > self.max_files:
            raise ClientError(413, f"{len(files)} images in one request: send at most {self.max_files} per request "
                                   "(split the batch)")

        def named(i, f, e: ClientError) -> ClientError:  # all or nothing, naming the first bad file
            return ClientError(e.status, f"file {i + 1} of {len(files)} ({f.filename or 'no filename'}): {e.message}")

        declared = 0
        for i, f in enumerate(files):  # headers only: the decode cost is bounded before any pixel is decoded
            try:
                declared += serving.checked_image(bytes(f.data), self.max_pixels)[1]
            except ClientError as e:
                raise named(i, f, e) from None
        if declared > self.max_request_pixels:
            raise ClientError(413, f"the {len(files)} images declare {declared / 1e6:.1f} megapixels in all, over the "
                                   f"{self.max_request_pixels / 1e6:.0f} megapixel limit of one request: send fewer "
                                   "images per request, or downscale them")
        served = self.holder.current
        prepared = []
        for i, f in enumerate(files):  # one decode slot at a time: a large batch never holds every slot
            try:
                prepared.append(await self._prepare(served, bytes(f.data)))
            except ClientError as e:
                raise named(i, f, e) from None
        results = await self._predict([(served, p) for p in prepared])
        self.stats["requests"] += 1
        self.stats["images"] += len(files)
        answer = self._answer(served, {"label": None, "probabilities": None}, started)
        items = [{"filename": f.filename, "label": r["label"], "probabilities": r["probabilities"],
                  **{k: r.get(k) for k in ("in_distribution", "ood_score", "warning")}} for f, r in zip(files, results)]
        return JSONResponse({"results": items, **{k: answer[k] for k in ("intended_use", "model", "version", "alias",
                                                                          "latency_ms")}})


def application(profile: dict, tracking_uri: str, model: str | None = None, *, token: str | None):
    """The bound application for a profile with a complete `serve` section (serving.serve_profile).

    `token` (from serving.endpoint_token) is required by name: None, auth off, must be a decision.
    """
    settings = serving.replica_settings(profile, tracking_uri, model, token)
    return PneumoniaClassifier.options(**serving.deployment_options(profile)).bind(settings)


def build(args: dict):
    """Application builder for serve/config.yaml (`serve run`, `serve deploy`).

    args: profile (default tiny), set (list of KEY=VALUE overrides), model (URI), tracking_uri
    (default: MLFLOW_TRACKING_URI, else runs/mlflow.db under PNEUMORAY_RUNS, as seen by the process
    that builds the app). The bearer token: PNEUMORAY_SERVE_TOKEN in that process's env, else the run
    folder's serve-token file (generated at first start, mode 0600). There is no opt-out here.
    """
    from pneumoray import tracking
    from pneumoray.profiles import load_profile

    args = dict(args or {})
    profile = serving.serve_profile(load_profile(args.pop("profile", "tiny")), args.pop("set", None) or ())
    tracking_uri = args.pop("tracking_uri", None) or tracking.tracking_uri()
    model = args.pop("model", None)
    if args:
        raise ValueError(f"unknown argument(s) {sorted(args)} for serve.app:build; known: profile, set, model, tracking_uri")
    token, source = serving.endpoint_token(profile["serve"]["token_env"])
    log.info("pneumoray endpoint: bearer token from %s", source)
    return application(profile, tracking_uri, model, token=token)
