"""An in-memory Cloud Storage server on 127.0.0.1 that speaks the JSON API, for tests.

A `gs://` workdir is reached by three clients: gcsfs (etils.epath and TensorBoard's files),
google-cloud-storage (Orbax's question about the bucket's layout) and TensorStore's own `gcs`
kvstore driver (Orbax's arrays). Each takes another endpoint from the environment
(`STORAGE_EMULATOR_HOST` for the first two, `TENSORSTORE_GCS_HTTP_URL` for TensorStore), so one
server holds one store that all three see, and a checkpoint written through TensorStore is found
by epath and restored through TensorStore again.

The server implements the part of the JSON API those clients use, with Cloud Storage's semantics
(https://cloud.google.com/storage/docs/json_api/v1): object generations and the
`ifGenerationMatch` / `ifGenerationNotMatch` preconditions (TensorStore's OCDBT manifest is
written conditionally and its reads revalidate with them), byte ranges, listing with `prefix`,
`delimiter`, `startOffset`, `endOffset` and pages, media, multipart and resumable uploads,
copies, deletes and batched deletes. Any other request is answered 501 and recorded in
`unsupported`, so a test can assert that the clients asked for nothing the server lacks.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import http.server
import itertools
import json
import re
import sys
import threading
from urllib.parse import parse_qs, quote, unquote, urlsplit


@dataclasses.dataclass
class _Object:
  data: bytes
  generation: int
  content_type: str
  updated: str
  metadata: dict


class _Failure(Exception):
  """An HTTP error answer: status and message."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


def _now() -> str:
  return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class FakeGcs:
  """The server: `FakeGcs(["bucket"])` starts it on a free port; `close()` stops it.

  Attributes:
    url: `http://127.0.0.1:PORT`, the endpoint to give the clients (see `environment`).
    buckets: bucket name -> {object name -> object}; `names(bucket)` lists them.
    unsupported: `"METHOD path"` of each request the server could not answer.
  """

  def __init__(self, buckets: list[str]):
    self.buckets: dict[str, dict[str, _Object]] = {b: {} for b in buckets}
    self.unsupported: list[str] = []
    self.lock = threading.Lock()
    self._generations = itertools.count(1)
    self.uploads: dict[str, dict] = {}  # resumable uploads in progress, by id
    self.upload_ids = itertools.count()
    handler = type("Handler", (_Handler,), {"gcs": self})
    self._server = _Server(("127.0.0.1", 0), handler)
    self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
    self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
    self._thread.start()

  def environment(self) -> dict[str, str]:
    """The variables that point gcsfs, google-cloud-storage and TensorStore at this server and
    keep every client from looking for real credentials."""
    return {
        "STORAGE_EMULATOR_HOST": self.url,
        "TENSORSTORE_GCS_HTTP_URL": self.url,
        # No metadata server: TensorStore then writes without credentials instead of waiting
        # on metadata.google.internal.
        "GCE_METADATA_ROOT": "127.0.0.1:1",
        "GOOGLE_CLOUD_PROJECT": "test",
        # gcsfs without credentials, and its plain file system: the extended one first asks
        # the bucket's type over gRPC (the Storage Control API), which this server does not serve.
        "FSSPEC_GCS_TOKEN": "anon",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }

  def names(self, bucket: str) -> list[str]:
    with self.lock:
      return sorted(self.buckets[bucket])

  def close(self) -> None:
    self._server.shutdown()
    self._server.server_close()
    self._thread.join()

  # The JSON API on the store; the handler calls these holding `lock`.

  def objects(self, name: str) -> dict[str, _Object]:
    if name not in self.buckets:
      raise _Failure(404, f"bucket {name} not found")
    return self.buckets[name]

  def get(self, bucket: str, name: str) -> _Object:
    obj = self.objects(bucket).get(name)
    if obj is None:
      raise _Failure(404, f"object {bucket}/{name} not found")
    return obj

  @staticmethod
  def check_preconditions(obj: _Object | None, query: dict, *, read: bool = False) -> None:
    """Cloud Storage's generation preconditions; generation 0 stands for "no live object"."""
    generation = obj.generation if obj else 0
    if "ifGenerationMatch" in query and int(query["ifGenerationMatch"]) != generation:
      raise _Failure(412, "precondition ifGenerationMatch failed")
    if "ifGenerationNotMatch" in query and int(query["ifGenerationNotMatch"]) == generation:
      raise _Failure(304 if read else 412, "precondition ifGenerationNotMatch failed")

  def resource(self, bucket: str, name: str, obj: _Object) -> dict:
    """The object resource as the JSON API returns it (numbers as strings)."""
    return {
        "kind": "storage#object", "bucket": bucket, "name": name,
        "id": f"{bucket}/{name}/{obj.generation}",
        "selfLink": f"{self.url}/storage/v1/b/{bucket}/o/{quote(name, safe='')}",
        "mediaLink": (f"{self.url}/download/storage/v1/b/{bucket}/o/{quote(name, safe='')}"
                      f"?generation={obj.generation}&alt=media"),
        "generation": str(obj.generation), "metageneration": "1",
        "contentType": obj.content_type, "size": str(len(obj.data)),
        "md5Hash": base64.b64encode(hashlib.md5(obj.data).digest()).decode(),
        "etag": f"{obj.generation}", "storageClass": "STANDARD",
        "timeCreated": obj.updated, "updated": obj.updated, "metadata": obj.metadata,
    }

  def put(self, bucket: str, name: str, data: bytes, query: dict, *,
          content_type: str = "application/octet-stream", metadata: dict | None = None) -> dict:
    objects = self.objects(bucket)
    if not name:
      raise _Failure(400, "object name is required")
    self.check_preconditions(objects.get(name), query)
    obj = _Object(data, next(self._generations), content_type, _now(), dict(metadata or {}))
    objects[name] = obj
    return self.resource(bucket, name, obj)

  def delete(self, bucket: str, name: str, query: dict) -> None:
    obj = self.get(bucket, name)
    if "generation" in query and int(query["generation"]) != obj.generation:
      raise _Failure(404, f"object {bucket}/{name}#{query['generation']} not found")
    self.check_preconditions(obj, query)
    del self.objects(bucket)[name]

  def list_objects(self, bucket: str, query: dict) -> dict:
    prefix = query.get("prefix", "")
    delimiter = query.get("delimiter", "")
    start, end = query.get("startOffset", ""), query.get("endOffset")
    names = [n for n in sorted(self.objects(bucket)) if n.startswith(prefix) and n >= start
             and (end is None or n < end)]
    entries: list[tuple[str, str | None]] = []  # (name or prefix, "prefix" for a prefix)
    seen_prefixes = set()
    for n in names:
      cut = n.find(delimiter, len(prefix)) if delimiter else -1
      if cut >= 0:
        p = n[:cut + len(delimiter)]
        if p not in seen_prefixes:
          seen_prefixes.add(p)
          entries.append((p, "prefix"))
      else:
        entries.append((n, None))
    after = query.get("pageToken", "")
    entries = [e for e in entries if e[0] > after]
    size = int(query.get("maxResults", 1000))
    page, rest = entries[:size], entries[size:]
    out = {"kind": "storage#objects",
           "items": [self.resource(bucket, n, self.objects(bucket)[n]) for n, k in page if not k],
           "prefixes": [n for n, k in page if k]}
    if rest:
      out["nextPageToken"] = page[-1][0]
    return out

  def copy(self, bucket: str, name: str, dest_bucket: str, dest_name: str, query: dict) -> dict:
    obj = self.get(bucket, name)
    return self.put(dest_bucket, dest_name, obj.data, query, content_type=obj.content_type,
                    metadata=obj.metadata)


class _Server(http.server.ThreadingHTTPServer):
  daemon_threads = True

  def handle_error(self, request, client_address):
    """A client that hung up (a retry, a closed pool) is no error of the server's."""
    if not isinstance(sys.exc_info()[1], ConnectionError):
      super().handle_error(request, client_address)


def _split_multipart(body: bytes, content_type: str) -> list[tuple[dict, bytes]]:
  """The parts `(headers, content)` of a multipart body (CRLF or LF line ends, as the clients
  send them)."""
  m = re.search(r'boundary="?([^";]+)"?', content_type)
  if not m:
    raise _Failure(400, "multipart body without a boundary")
  delimiter = b"--" + m.group(1).encode()
  parts = []
  for chunk in body.split(delimiter)[1:]:
    if chunk.startswith(b"--"):
      break
    eol = b"\r\n" if chunk.startswith(b"\r\n") else b"\n"
    head, _, content = chunk[len(eol):].partition(eol + eol)
    content = content.removesuffix(eol)
    headers = {}
    for line in head.decode().splitlines():
      key, _, value = line.partition(":")
      headers[key.strip().lower()] = value.strip()
    parts.append((headers, content))
  return parts


def _json_answer(status: int, obj) -> tuple[int, bytes]:
  return status, json.dumps(obj).encode()


_OBJECT = r"/b/(?P<bucket>[^/]+)/o/(?P<name>.+?)"


class _Handler(http.server.BaseHTTPRequestHandler):
  """One request: route by method and path, answer JSON or media."""

  protocol_version = "HTTP/1.1"  # keep-alive, and `Expect: 100-continue` for curl's uploads
  gcs: FakeGcs

  def log_message(self, format, *args):
    del format, args

  def _body(self) -> bytes:
    if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
      data = b""
      while True:
        size = int(self.rfile.readline().split(b";")[0], 16)
        chunk = self.rfile.read(size + 2)[:size]
        if not size:
          break
        data += chunk
      return data
    return self.rfile.read(int(self.headers.get("Content-Length") or 0))

  def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
            content_type: str = "application/json") -> None:
    self.send_response(status)
    for key, value in (headers or {}).items():
      self.send_header(key, value)
    if status not in (204, 304):
      self.send_header("Content-Type", content_type)
      self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    if status not in (204, 304) and self.command != "HEAD":
      self.wfile.write(body)

  def _json(self, status: int, obj) -> None:
    self._send(status, json.dumps(obj).encode())

  def do_GET(self):
    self._dispatch()

  do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_GET

  def _dispatch(self) -> None:
    url = urlsplit(self.path)
    query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
    body = self._body()
    try:
      with self.gcs.lock:
        answer = self._route(self.command, url.path, query, body, self.headers)
    except _Failure as e:
      self._json(e.status, {"error": {"code": e.status, "message": str(e)}})
      return
    if answer is None:
      self.gcs.unsupported.append(f"{self.command} {url.path}?{url.query}")
      self._json(501, {"error": {"code": 501, "message": f"{self.command} {url.path}"}})
      return
    self._send(*answer)

  def _route(self, method: str, path: str, query: dict, body: bytes, headers
             ) -> tuple | None:
    """`(status, body, headers, content_type)` of one request, None where unsupported."""
    gcs = self.gcs
    if path == "/batch/storage/v1" and method == "POST":
      return self._batch(body, headers.get("Content-Type", ""))
    m = re.fullmatch(r"/storage/v1" + _OBJECT + r"/(?:copyTo|rewriteTo)/b/(?P<dest_bucket>[^/]+)"
                     r"/o/(?P<dest>[^/]+)", path)
    if m and method == "POST":
      resource = gcs.copy(m["bucket"], unquote(m["name"]), m["dest_bucket"], unquote(m["dest"]),
                          query)
      if "/rewriteTo/" in path:
        size = resource["size"]
        return _json_answer(200, {"kind": "storage#rewriteResponse", "done": True,
                                 "totalBytesRewritten": size, "objectSize": size,
                                 "resource": resource})
      return _json_answer(200, resource)
    m = re.fullmatch(r"/storage/v1" + _OBJECT + r"/moveTo/o/(?P<dest>[^/]+)", path)
    if m and method == "POST":
      resource = gcs.copy(m["bucket"], unquote(m["name"]), m["bucket"], unquote(m["dest"]), query)
      gcs.delete(m["bucket"], unquote(m["name"]), {})
      return _json_answer(200, resource)
    m = re.fullmatch(r"/(?:download/)?storage/v1" + _OBJECT, path)
    if m:
      bucket, name = m["bucket"], unquote(m["name"])
      if method in ("GET", "HEAD"):
        obj = gcs.get(bucket, name)
        if "generation" in query and int(query["generation"]) != obj.generation:
          raise _Failure(404, f"object {bucket}/{name}#{query['generation']} not found")
        gcs.check_preconditions(obj, query, read=True)
        if query.get("alt") != "media":
          return _json_answer(200, gcs.resource(bucket, name, obj))
        return self._media(obj, headers.get("Range"))
      if method == "DELETE":
        gcs.delete(bucket, name, query)
        return 204, b""
      return None
    m = re.fullmatch(r"/storage/v1/b/(?P<bucket>[^/]+)/o", path)
    if m and method == "GET":
      return _json_answer(200, gcs.list_objects(m["bucket"], query))
    m = re.fullmatch(r"/storage/v1/b/(?P<bucket>[^/]+)", path)
    if m and method == "GET":
      gcs.objects(m["bucket"])
      return _json_answer(200, {"kind": "storage#bucket", "name": m["bucket"], "id": m["bucket"],
                               "location": "US", "storageClass": "STANDARD",
                               "metageneration": "1", "timeCreated": _now(), "updated": _now(),
                               "hierarchicalNamespace": {"enabled": False}})
    m = re.fullmatch(r"/upload/storage/v1/b/(?P<bucket>[^/]+)/o", path)
    if m:
      return self._upload(method, m["bucket"], query, body, headers)
    return None

  def _media(self, obj: _Object, byte_range: str | None) -> tuple:
    headers = {"x-goog-generation": str(obj.generation), "x-goog-metageneration": "1",
               "x-goog-stored-content-length": str(len(obj.data)),
               "x-goog-hash": "md5=" + base64.b64encode(hashlib.md5(obj.data).digest()).decode(),
               "ETag": str(obj.generation)}
    m = re.fullmatch(r"bytes=(\d*)-(\d*)", byte_range or "")
    if not m:
      return 200, obj.data, headers, obj.content_type
    size = len(obj.data)
    if m[1]:
      first, last = int(m[1]), min(int(m[2]) if m[2] else size - 1, size - 1)
    else:  # a suffix: the last N bytes
      first, last = max(size - int(m[2]), 0), size - 1
    if first >= size:
      raise _Failure(416, f"range {byte_range} beyond the object's {size} bytes")
    headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    return 206, obj.data[first:last + 1], headers, obj.content_type

  def _upload(self, method: str, bucket: str, query: dict, body: bytes, headers) -> tuple | None:
    gcs = self.gcs
    kind = query.get("uploadType")
    if method == "POST" and kind == "media":
      return 200, json.dumps(gcs.put(bucket, query.get("name", ""), body, query,
                                     content_type=headers.get("Content-Type") or
                                     "application/octet-stream")).encode()
    if method == "POST" and kind == "multipart":
      (_, meta), (part_headers, data) = _split_multipart(body, headers.get("Content-Type", ""))
      meta = json.loads(meta)
      return 200, json.dumps(gcs.put(
          bucket, meta.get("name") or query.get("name", ""), data, query,
          content_type=meta.get("contentType") or part_headers.get("content-type") or
          "application/octet-stream", metadata=meta.get("metadata"))).encode()
    if method == "POST" and kind == "resumable" and "upload_id" not in query:
      meta = json.loads(body) if body else {}
      upload_id = f"u{next(gcs.upload_ids)}"
      gcs.uploads[upload_id] = {
          "name": meta.get("name") or query.get("name", ""), "data": b"", "query": query,
          "content_type": meta.get("contentType") or
          headers.get("X-Upload-Content-Type") or "application/octet-stream",
          "metadata": meta.get("metadata")}
      location = (f"{self.gcs.url}/upload/storage/v1/b/{bucket}/o?uploadType=resumable"
                  f"&upload_id={upload_id}")
      return 200, b"", {"Location": location}
    if method in ("PUT", "POST") and "upload_id" in query:
      upload = gcs.uploads.get(query["upload_id"])
      if upload is None:
        raise _Failure(404, f"no upload {query['upload_id']}")
      m = re.fullmatch(r"bytes (?:(\d+)-(\d+)|\*)/(\d+|\*)", headers.get("Content-Range", "")
                       ) if headers.get("Content-Range") else None
      if m and m[1] is not None:
        if int(m[1]) != len(upload["data"]):
          raise _Failure(400, f"chunk at {m[1]}, upload holds {len(upload['data'])} bytes")
        upload["data"] += body
      elif not m:
        upload["data"] += body
      total = m[3] if m else str(len(upload["data"]))
      if total != "*" and int(total) == len(upload["data"]):
        del gcs.uploads[query["upload_id"]]
        return 200, json.dumps(gcs.put(bucket, upload["name"], upload["data"], upload["query"],
                                       content_type=upload["content_type"],
                                       metadata=upload["metadata"])).encode()
      done = {"Range": f"bytes=0-{len(upload['data']) - 1}"} if upload["data"] else {}
      return 308, b"", done
    return None

  def _batch(self, body: bytes, content_type: str) -> tuple:
    """A batch of DELETE requests (gcsfs removes many objects in one); each part's answer is an
    HTTP response in a multipart/mixed body."""
    boundary = "batch_answer"
    out = []
    for part_headers, request in _split_multipart(body, content_type):
      line = request.decode().splitlines()[0]
      method, target, _ = line.split(" ", 2)
      url = urlsplit(target)
      query = {k: v[-1] for k, v in parse_qs(url.query).items()}
      m = re.fullmatch(r"/storage/v1" + _OBJECT, url.path)
      if method != "DELETE" or not m:
        self.gcs.unsupported.append(f"batch {line}")
        status, reason = 501, "Not Implemented"
      else:
        try:
          self.gcs.delete(m["bucket"], unquote(m["name"]), query)
          status, reason = 204, "No Content"
        except _Failure as e:
          status, reason = e.status, str(e)
      content_id = part_headers.get("content-id", "").replace("<", "<response-")
      out.append(f"--{boundary}\r\nContent-Type: application/http\r\nContent-ID: {content_id}"
                 f"\r\n\r\nHTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\n\r\n")
    return (200, ("".join(out) + f"--{boundary}--\r\n").encode(), {},
            f"multipart/mixed; boundary={boundary}")
