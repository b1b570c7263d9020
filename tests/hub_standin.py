"""A minimal Hugging Face Hub stand-in for tests (stdlib only), plus raw files of git repositories.

Serves local files as if they were files of Hub repos pinned at a commit, enough for
huggingface_hub.hf_hub_download (HEAD + GET /resolve), snapshot_download with a 40-hex revision
(GET /api/{type}s/{repo}/tree/{rev}?recursive=...), and repo_info for branch names
(GET /api/{type}s/{repo}/revision/{rev}).

Usage as a library (tests):
    srv = HubStandin()                       # binds 127.0.0.1 on a free port
    srv.add_file("dataset", "zhwang/HPDv2", COMMIT, "test.json", b"...", lfs=False)
    srv.add_file("dataset", "zhwang/HPDv2", COMMIT, "test.tar.gz", data, lfs=True)
    srv.add_branch("dataset", "zhwang/HPDv2", "main", COMMIT)
    srv.start(); endpoint = srv.endpoint      # "http://127.0.0.1:<port>"
    ... hf_hub_download(..., endpoint=endpoint) or HF_ENDPOINT=endpoint set BEFORE importing huggingface_hub
    srv.stop()

Raw git files (as raw.githubusercontent.com serves them): ``add_raw(repo_id, commit, path, data)``
is served at ``{endpoint}/raw/{repo_id}/{commit}/{path}``.

Faults for download tests: ``truncate[path] = [n, ...]`` makes the next GETs of a URL path
(e.g. ``/cdn/<sha256>``) announce the full length but send only ``n`` bytes and close the
connection (one list entry per GET). ``requests`` logs ``(method, path, range header)``.

CLI:  python hub_standin.py --port 8765 --repo dataset zhwang/HPDv2 <40-hex commit> <dir> [--lfs]
      (every file under <dir> becomes a repo file; --lfs serves them as LFS files via a redirect)

Protocol (huggingface_hub 2.4.0, file_download.get_hf_file_metadata/_get_metadata_or_catch_error):
  * URL: {endpoint}/{'datasets/'|'spaces/'|''}{repo_id}/resolve/{quote(revision)}/{quote(filename)}
  * HEAD must answer with X-Repo-Commit (40-hex; used as the snapshot folder) and an ETag
    (X-Linked-Etag preferred, quotes and W/ stripped; becomes the blob file name); size from
    X-Linked-Size or, on a non-redirect response, Content-Length.  No X-Xet-Hash header => plain HTTP.
  * Redirects to the same origin (or HF_ENDPOINT's origin) are followed for HEAD and the *final*
    response must carry the headers; a redirect to another origin stops the HEAD there, the metadata
    is read from the 302 itself (X-Repo-Commit, X-Linked-Etag, X-Linked-Size, Location) and the GET
    goes straight to Location (auth header dropped).  LFS mode emulates this by redirecting to
    http://localhost:<port>/... while the endpoint is http://127.0.0.1:<port>.
  * GET: 200 with body and Content-Length; Range "bytes=N-" answered with 206 + Content-Range (resume).
  * Errors: 404 + X-Error-Code: EntryNotFound / RevisionNotFound / RepoNotFound.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

_PREFIX = {"dataset": "datasets/", "space": "spaces/", "model": ""}
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Repo:
    def __init__(self):
        self.commits: dict[str, dict[str, dict]] = {}   # commit -> path -> entry
        self.refs: dict[str, str] = {}                   # branch/tag -> commit


class HubStandin:
    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.repos: dict[tuple[str, str], _Repo] = {}
        self.blobs: dict[str, bytes] = {}                # sha256 -> bytes (LFS "CDN")
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range) log
        self.truncate: dict[str, list[int]] = {}          # URL path -> bytes to send, per GET
        self.raw: dict[str, bytes] = {}                   # "/raw/<repo>/<commit>/<path>" -> bytes
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):                 # keep test output quiet
                pass

            def do_HEAD(self):
                standin._handle(self, head=True)

            def do_GET(self):
                standin._handle(self, head=False)

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.port = self.httpd.server_address[1]
        self.endpoint = f"http://{host}:{self.port}"
        self._thread: threading.Thread | None = None

    # ---- registry -------------------------------------------------------------------------
    def add_file(self, repo_type: str, repo_id: str, commit: str, path: str, data: bytes, lfs: bool = False):
        assert _COMMIT_RE.match(commit), "commit must be 40 lowercase hex digits"
        repo = self.repos.setdefault((repo_type, repo_id), _Repo())
        sha256 = hashlib.sha256(data).hexdigest()
        repo.commits.setdefault(commit, {})[path] = {
            "data": data, "sha256": sha256, "sha1": git_blob_sha1(data), "lfs": lfs}
        if lfs:
            self.blobs[sha256] = data

    def add_dir(self, repo_type: str, repo_id: str, commit: str, directory: str, lfs: bool = False):
        for root, _, files in os.walk(directory):
            for name in files:
                full = os.path.join(root, name)
                rel = os.path.relpath(full, directory).replace(os.sep, "/")
                with open(full, "rb") as f:
                    self.add_file(repo_type, repo_id, commit, rel, f.read(), lfs=lfs)

    def add_raw(self, repo_id: str, commit: str, path: str, data: bytes):
        self.raw[f"/raw/{repo_id}/{commit}/{path}"] = data

    def add_branch(self, repo_type: str, repo_id: str, name: str, commit: str):
        self.repos.setdefault((repo_type, repo_id), _Repo()).refs[name] = commit

    def start(self):
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    # ---- HTTP -----------------------------------------------------------------------------
    def _send(self, h, status, headers=None, body=b"", head=False):
        h.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Length", str(len(body)))
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        if not head and body:
            h.wfile.write(body)

    def _error(self, h, code, error_code, head, commit=None):
        headers = {"X-Error-Code": error_code, "Content-Type": "application/json"}
        if commit:
            headers["X-Repo-Commit"] = commit
        self._send(h, code, headers, json.dumps({"error": error_code}).encode(), head)

    def _resolve_commit(self, repo: _Repo, revision: str):
        if revision in repo.commits:
            return revision
        return repo.refs.get(revision)

    def _send_bytes(self, h, data: bytes, headers: dict, head: bool):
        rng = h.headers.get("Range")
        cut = self.truncate.get(urlsplit(h.path).path)
        if cut and not head:                              # announce everything, send a part, hang up
            start = int(re.match(r"bytes=(\d+)-", rng).group(1)) if rng else 0
            part = data[start:start + cut.pop(0)]
            h.send_response(206 if rng else 200)
            h.send_header("Content-Length", str(len(data) - start))
            if rng:
                h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            h.end_headers()
            h.wfile.write(part)
            h.wfile.flush()
            h.close_connection = True
            return None
        headers = dict(headers, **{"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"})
        m = re.match(r"bytes=(\d+)-(\d*)$", rng or "")
        if m and not head:
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else len(data) - 1
            part = data[start:end + 1]
            headers["Content-Range"] = f"bytes {start}-{start + len(part) - 1}/{len(data)}"
            return self._send(h, 206, headers, part, head)
        headers["Content-Length"] = str(len(data))
        h.send_response(200)
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        if not head:
            h.wfile.write(data)

    def _handle(self, h, head: bool):
        parts = urlsplit(h.path)
        path = parts.path
        self.requests.append(("HEAD" if head else "GET", h.path, h.headers.get("Range")))

        if path.startswith("/raw/"):                      # raw.githubusercontent.com stand-in
            if path not in self.raw:
                return self._send(h, 404, {"Content-Type": "text/plain"}, b"404: Not Found", head)
            return self._send_bytes(h, self.raw[path], {}, head)

        if path.startswith("/cdn/"):                      # LFS "CDN" (other origin)
            sha = path[len("/cdn/"):]
            if sha not in self.blobs:
                return self._error(h, 404, "EntryNotFound", head)
            return self._send_bytes(h, self.blobs[sha], {"ETag": f'"{sha}"'}, head)

        if path.startswith("/api/"):
            return self._handle_api(h, path, parse_qs(parts.query), head)

        m = re.match(r"^/(datasets/|spaces/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if not m:
            return self._error(h, 404, "RepoNotFound", head)
        repo_type = {"datasets/": "dataset", "spaces/": "space", None: "model"}[m.group(1)]
        repo_id, revision, filename = m.group(2), unquote(m.group(3)), unquote(m.group(4))
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            return self._error(h, 404, "RepoNotFound", head)
        commit = self._resolve_commit(repo, revision)
        if commit is None:
            return self._error(h, 404, "RevisionNotFound", head)
        entry = repo.commits[commit].get(filename)
        if entry is None:
            return self._error(h, 404, "EntryNotFound", head, commit)
        if entry["lfs"]:
            # Hub style: 302 to a CDN on another origin, metadata carried by the redirect itself.
            location = f"http://localhost:{self.port}/cdn/{entry['sha256']}"
            return self._send(h, 302, {
                "Location": location,
                "X-Repo-Commit": commit,
                "X-Linked-Etag": f'"{entry["sha256"]}"',
                "X-Linked-Size": str(len(entry["data"])),
                "ETag": f'"{entry["sha1"]}"',
            }, b"", head)
        return self._send_bytes(h, entry["data"], {"X-Repo-Commit": commit, "ETag": f'"{entry["sha1"]}"'}, head)

    def _handle_api(self, h, path, query, head):
        m = re.match(r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)/(revision|tree)/([^/]+)(/.*)?$", path)
        if not m:
            return self._error(h, 404, "RepoNotFound", head)
        repo_type = m.group(1)[:-1]
        repo = self.repos.get((repo_type, m.group(2)))
        if repo is None:
            return self._error(h, 404, "RepoNotFound", head)
        commit = self._resolve_commit(repo, unquote(m.group(4)))
        if commit is None:
            return self._error(h, 404, "RevisionNotFound", head)
        files = repo.commits[commit]
        if m.group(3) == "revision":
            body = {"id": m.group(2), "sha": commit,
                    "siblings": [{"rfilename": p} for p in sorted(files)]}
        else:
            sub = unquote(m.group(5) or "").strip("/")
            recursive = query.get("recursive", ["False"])[0].lower() == "true"
            body, dirs = [], set()
            for p in sorted(files):
                if sub and not p.startswith(sub + "/"):
                    continue
                rest = p[len(sub) + 1:] if sub else p
                if "/" in rest and not recursive:
                    dirs.add((sub + "/" if sub else "") + rest.split("/")[0])
                    continue
                if recursive:
                    for i in range(rest.count("/")):
                        dirs.add((sub + "/" if sub else "") + "/".join(rest.split("/")[:i + 1]))
                e = files[p]
                item = {"type": "file", "path": p, "size": len(e["data"]), "oid": e["sha1"]}
                if e["lfs"]:
                    item["lfs"] = {"oid": e["sha256"], "size": len(e["data"]), "pointerSize": 134}
                body.append(item)
            body = [{"type": "directory", "path": d, "oid": "0" * 40, "size": 0} for d in sorted(dirs)] + body
        data = json.dumps(body).encode()
        self._send(h, 200, {"Content-Type": "application/json", "X-Repo-Commit": commit}, data, head)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--repo", nargs=4, action="append", metavar=("TYPE", "REPO_ID", "COMMIT", "DIR"), default=[])
    ap.add_argument("--branch", default="main", help="branch name pointing at each repo's commit")
    ap.add_argument("--lfs", action="store_true")
    args = ap.parse_args()
    srv = HubStandin(args.host, args.port)
    for repo_type, repo_id, commit, directory in args.repo:
        srv.add_dir(repo_type, repo_id, commit, directory, lfs=args.lfs)
        srv.add_branch(repo_type, repo_id, args.branch, commit)
    print(f"serving on {srv.endpoint}", flush=True)
    srv.httpd.serve_forever()


if __name__ == "__main__":
    main()
