#!/usr/bin/env python3
"""A tiny stand-in for the Hugging Face hub, started by tests/unit/io/test_hub.cpp on 127.0.0.1.

Serves ROOT/<org>/<name>/<file> as /<org>/<name>/resolve/<main|COMMIT>/<file> with the headers the
real hub sends (X-Repo-Commit, ETag; files >= --lfs-min-size redirect to /cdn/<sha256> with
X-Linked-Etag/X-Linked-Size like LFS files), honours Range with 206, answers 404 for missing
files and 401 without the --require-token bearer token. Every request is logged as one JSON line.
Standard library only.
"""
import argparse
import hashlib
import http.server
import json
import os
import re
import sys
import threading


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--commit", default="0123456789abcdef0123456789abcdef01234567")
    ap.add_argument("--port-file", required=True, help="written (atomically) with the bound port when ready")
    ap.add_argument("--log", required=True, help="JSON lines, one per request")
    ap.add_argument("--manifest", help="writes {repo/file: {etag, sha256, size, lfs}}")
    ap.add_argument("--require-token", default="")
    ap.add_argument("--lfs-min-size", type=int, default=1 << 62)
    args = ap.parse_args()

    files = {}  # "org/name/file" -> (bytes, sha256, git-style etag, lfs?)
    for dirpath, _, names in os.walk(args.root):
        for n in names:
            full = os.path.join(dirpath, n)
            rel = os.path.relpath(full, args.root).replace(os.sep, "/")
            data = open(full, "rb").read()
            sha = hashlib.sha256(data).hexdigest()
            git = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            files[rel] = (data, sha, git, len(data) >= args.lfs_min_size)
    by_sha = {v[1]: v[0] for v in files.values()}
    log_lock = threading.Lock()
    logf = open(args.log, "a", buffering=1)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):  # quiet stderr; the JSON log is the record
            pass

        def _log(self, status):
            with log_lock:
                logf.write(json.dumps({"method": self.command, "path": self.path, "status": status,
                                       "range": self.headers.get("Range"),
                                       "auth": self.headers.get("Authorization")}) + "\n")

        def _send(self, status, headers, body=b""):
            self._log(status)
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _content(self, data, headers):
            rng = self.headers.get("Range")
            m = re.fullmatch(r"bytes=(\d+)-", rng or "")
            if m:
                start = int(m.group(1))
                if start >= len(data):
                    return self._send(416, {"Content-Range": "bytes */%d" % len(data)})
                headers = dict(headers, **{"Content-Range": "bytes %d-%d/%d" % (start, len(data) - 1, len(data))})
                return self._send(206, headers, data[start:])
            return self._send(200, headers, data)

        def do_HEAD(self):
            self.do_GET()

        def do_GET(self):
            if self.path.startswith("/cdn/"):
                data = by_sha.get(self.path[5:])
                if data is None:
                    return self._send(404, {})
                return self._content(data, {"ETag": '"%s"' % self.path[5:]})
            m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.path)
            if not m:
                return self._send(404, {"X-Error-Code": "RepoNotFound"})
            if args.require_token and self.headers.get("Authorization") != "Bearer " + args.require_token:
                return self._send(401, {"X-Error-Code": "GatedRepo"}, b'{"error":"Access restricted"}')
            repo, rev, name = m.groups()
            common = {"X-Repo-Commit": args.commit}
            if rev not in ("main", args.commit):
                return self._send(404, dict(common, **{"X-Error-Code": "RevisionNotFound"}))
            entry = files.get(repo + "/" + name)
            if entry is None:
                return self._send(404, dict(common, **{"X-Error-Code": "EntryNotFound"}))
            data, sha, git, lfs = entry
            if lfs:
                port = self.server.server_address[1]
                return self._send(302, dict(common, **{
                    "Location": "http://127.0.0.1:%d/cdn/%s" % (port, sha),
                    "ETag": '"%s"' % git, "X-Linked-Etag": '"%s"' % sha, "X-Linked-Size": str(len(data))}))
            return self._content(data, dict(common, **{"ETag": '"%s"' % git}))

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if args.manifest:
        with open(args.manifest, "w") as f:
            json.dump({k: {"etag": v[1] if v[3] else v[2], "sha256": v[1], "size": len(v[0]), "lfs": v[3]}
                       for k, v in files.items()}, f)
    tmp = args.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(server.server_address[1]))
    os.replace(tmp, args.port_file)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
