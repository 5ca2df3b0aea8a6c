"""The download stage: local directories, an http://127.0.0.1 mirror (resume, corrupt shards, 404),
file:// mirrors, the embedded offline source, and the stage entry point as the engines run it."""

import gzip
import hashlib
import http.server
import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from daychat.data import sources
from daychat.data.textshards import iter_texts, read_manifest, shard_paths, write_manifest
from daychat.errors import UserError
from daychat.params import ParamsError, parse_section

ROOT = Path(__file__).resolve().parents[1]
MIXED = ROOT.parent / "shared/data/corpus/mixed"


def params(**values):
    return parse_section("download", values)


def build(p, out: Path, cache: Path) -> sources.Download:
    """What the stage does, in process: shards + manifest into `out`; no backoff sleeps."""
    result = sources.download(p, out, cache, backoff_s=0)
    write_manifest(out, result.shards, **result.about)
    return result


def parquet_bytes(tmp_path: Path, name: str, texts: list[str], layout: str = "full") -> bytes:
    """A parquet file with the textshards columns (`full`) or only a text column (`text`)."""
    columns = {"id": [f"{name}-{i}" for i in range(len(texts))], "text": texts, "source": ["fixture"] * len(texts)}
    if layout == "text":
        columns = {"text": texts}
    path = tmp_path / f"{name}.build.parquet"
    pq.write_table(pa.table(columns), path, compression="zstd")
    return path.read_bytes()


def texts_of(index: int, n: int = 40) -> list[str]:
    return [f"shard {index} document {i}: " + "lorem ipsum dolor sit amet " * (i % 7 + 1) for i in range(n)]


# ----------------------------------------------------------------------------------------------------
# An HTTP mirror on 127.0.0.1 that honours Range requests and logs what it was asked


class Mirror(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), MirrorHandler)
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []  # (file name, Range header)
        self.truncate_times: dict[str, int] = {}  # serve this file cut in half this many more times
        self.drop_times: dict[str, int] = {}  # announce the whole file, then hang up halfway this many times
        self.ignore_range = False
        self.sha_header = False  # state the sha256 as Hugging Face does (X-Linked-ETag)
        self.claimed_sha: dict[str, str] = {}  # state this sha256 instead of the file's
        self.url = f"http://127.0.0.1:{self.server_address[1]}/data"

    def gets(self, name: str) -> list[str | None]:
        return [rng for n, rng in self.requests if n == name]


class MirrorHandler(http.server.BaseHTTPRequestHandler):
    server: Mirror

    def do_GET(self):
        name = self.path.removeprefix("/data/")
        rng = self.headers.get("Range")
        self.server.requests.append((name, rng))
        body = self.server.files.get(name)
        if body is None:
            self.send_error(404)
            return
        sha = self.server.claimed_sha.get(name) or hashlib.sha256(body).hexdigest()
        if self.server.truncate_times.get(name, 0) > 0:
            self.server.truncate_times[name] -= 1
            body = body[: len(body) // 2]
        start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1)) if rng and not self.server.ignore_range else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        if self.server.sha_header:
            self.send_header("X-Linked-ETag", f'"{sha}"')
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if self.server.drop_times.get(name, 0) > 0:
            self.server.drop_times[name] -= 1
            self.wfile.write(body[start:len(body) // 2])
            self.close_connection = True
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def mirror(tmp_path):
    server = Mirror()
    for i in range(4):
        server.files[f"shard_{i:05d}.parquet"] = parquet_bytes(tmp_path, f"s{i}", texts_of(i))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def url_params(server: Mirror, **values):
    return params(**{"source": "url", "url": server.url, "shards": 3, "workers": 2, "retries": 2, "timeout_s": 5,
                     **values})


def test_http_mirror_full_download_then_cached_then_only_new_shards(tmp_path, mirror):
    out, cache = tmp_path / "raw", tmp_path / "cache"
    result = build(url_params(mirror), out, cache)
    shards = read_manifest(out)
    assert [s.split for s in shards] == ["train", "train", "val"]
    assert [s.origin.rsplit("/", 1)[1] for s in shards] == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    for s in shards:  # the mirror's files already have the layout: linked as they are
        assert s.sha256 == hashlib.sha256(mirror.files[s.origin.rsplit("/", 1)[1]]).hexdigest()
    m = result.metrics()
    assert m["shards"] == 3 and m["val_shards"] == 1 and m["docs"] == 120 and m["cached_shards"] == 0
    assert m["download_bytes"] == sum(len(mirror.files[f"shard_{i:05d}.parquet"]) for i in range(3))

    again = build(url_params(mirror), tmp_path / "raw2", cache)
    assert again.metrics()["download_bytes"] == 0 and again.metrics()["cached_shards"] == 3
    more = build(url_params(mirror, shards=4), tmp_path / "raw3", cache)
    assert more.metrics()["cached_shards"] == 3
    assert len(mirror.requests) == 4 and mirror.gets("shard_00003.parquet") == [None]


def test_resumes_a_partial_download_with_a_range_request(tmp_path, mirror):
    cache = tmp_path / "cache"
    name = "shard_00000.parquet"
    body = mirror.files[name]
    half = len(body) // 2
    folder = sources.cache_folder(cache, mirror.url)
    folder.mkdir(parents=True)
    (folder / f"{name}.part").write_bytes(body[:half])

    result = build(url_params(mirror), tmp_path / "raw", cache)
    assert mirror.gets(name) == [f"bytes={half}-"]
    assert read_manifest(tmp_path / "raw")[0].sha256 == hashlib.sha256(body).hexdigest()
    assert result.metrics()["download_bytes"] == len(body) - half + sum(
        len(mirror.files[f"shard_{i:05d}.parquet"]) for i in (1, 2))
    assert not list(folder.glob("*.part"))


def test_a_dropped_connection_resumes_in_the_same_run(tmp_path, mirror):
    name = "shard_00002.parquet"
    mirror.drop_times[name] = 1
    result = build(url_params(mirror), tmp_path / "raw", tmp_path / "cache")
    assert mirror.gets(name) == [None, f"bytes={len(mirror.files[name]) // 2}-"]
    assert read_manifest(tmp_path / "raw")[2].sha256 == hashlib.sha256(mirror.files[name]).hexdigest()
    assert result.metrics()["retries"] == 1


def test_a_server_that_ignores_range_restarts_the_download(tmp_path, mirror):
    mirror.ignore_range = True
    cache = tmp_path / "cache"
    name = "shard_00000.parquet"
    folder = sources.cache_folder(cache, mirror.url)
    folder.mkdir(parents=True)
    (folder / f"{name}.part").write_bytes(mirror.files[name][:100])
    build(url_params(mirror), tmp_path / "raw", cache)
    assert mirror.gets(name) == ["bytes=100-"]  # answered with the whole file (200): written from the start
    assert read_manifest(tmp_path / "raw")[0].sha256 == hashlib.sha256(mirror.files[name]).hexdigest()


def test_a_shard_served_truncated_once_is_fetched_again(tmp_path, mirror):
    mirror.truncate_times["shard_00001.parquet"] = 1
    result = build(url_params(mirror), tmp_path / "raw", tmp_path / "cache")
    assert len(mirror.gets("shard_00001.parquet")) == 2
    assert mirror.gets("shard_00001.parquet")[1] is None  # the corrupt file was deleted, not resumed
    assert result.metrics()["retries"] == 1
    good = hashlib.sha256(mirror.files["shard_00001.parquet"]).hexdigest()
    assert read_manifest(tmp_path / "raw")[1].sha256 == good


def test_a_shard_that_is_always_corrupt_is_reported_by_name(tmp_path, mirror):
    mirror.truncate_times["shard_00001.parquet"] = 99
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match=r"shard_00001\.parquet failed 3 attempts .*http://127\.0\.0\.1:\d+/data/shard_00001\.parquet"):
        build(url_params(mirror), tmp_path / "raw", cache)
    folder = sources.cache_folder(cache, mirror.url)
    assert not (folder / "shard_00001.parquet").exists() and not (folder / "shard_00001.parquet.part").exists()


def test_the_servers_sha256_is_checked(tmp_path, mirror):
    mirror.sha_header = True
    build(url_params(mirror), tmp_path / "raw", tmp_path / "cache")  # an honest server: passes
    # Now it states the real file's sha256 but serves another (valid) parquet file.
    mirror.claimed_sha["shard_00003.parquet"] = hashlib.sha256(mirror.files["shard_00003.parquet"]).hexdigest()
    mirror.files["shard_00003.parquet"] = parquet_bytes(tmp_path, "other", ["not the shard " * 20])
    with pytest.raises(UserError, match=r"shard_00003\.parquet failed 3 attempts \(sha256 differs"):
        build(url_params(mirror, shards=4), tmp_path / "raw2", tmp_path / "cache")


def test_a_missing_shard_is_a_one_line_error_naming_the_url(tmp_path, mirror):
    with pytest.raises(UserError, match=r"HTTP 404 .*: http://127\.0\.0\.1:\d+/data/shard_00009\.parquet$"):
        build(url_params(mirror, shards=3, val_shard=9), tmp_path / "raw", tmp_path / "cache")
    assert mirror.gets("shard_00009.parquet") == [None]  # a 404 is not retried


def test_upstream_shards_with_only_text_are_rewritten_with_ids_and_source(tmp_path, mirror):
    for i in range(3):
        mirror.files[f"shard_{i:05d}.parquet"] = parquet_bytes(tmp_path, f"t{i}", texts_of(i, 5), layout="text")
    out = tmp_path / "raw"
    build(url_params(mirror), out, tmp_path / "cache")
    table = pq.read_table(shard_paths(out, "val")[0])
    assert table.column_names == ["id", "text", "source"]
    assert table["id"].to_pylist()[:2] == ["shard_00002/0", "shard_00002/1"]
    assert set(table["source"].to_pylist()) == {"data"}  # the mirror's name
    assert table["text"].to_pylist() == texts_of(2, 5)


def test_file_url_mirror(tmp_path):
    folder = tmp_path / "mirror"
    folder.mkdir()
    for i in range(3):
        (folder / f"shard_{i:05d}.parquet").write_bytes(parquet_bytes(tmp_path, f"f{i}", texts_of(i, 3)))
    result = build(params(source="url", url=folder.as_uri(), shards=3), tmp_path / "raw", tmp_path / "cache")
    assert [s.split for s in read_manifest(tmp_path / "raw")] == ["train", "train", "val"]
    assert result.metrics()["docs"] == 9
    with pytest.raises(UserError, match="not found: file://"):
        build(params(source="url", url=folder.as_uri(), shards=5), tmp_path / "raw2", tmp_path / "cache")


def test_hf_presets_plan_the_datasets_last_shard_as_validation():
    plan, about = sources.remote_plan(params(source="hf", dataset="fineweb-edu", shards=3))
    assert [s.index for s in plan] == [0, 1, 1822] and [s.split for s in plan] == ["train", "train", "val"]
    assert plan[2].url == "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_01822.parquet"
    assert "ODC-By" in about["licence"]
    plan, about = sources.remote_plan(params(source="hf", dataset="climbmix", shards=2))
    assert [s.index for s in plan] == [0, 6542] and "non-commercial" in about["licence"]
    with pytest.raises(ParamsError, match="download.shards must be <= 1823"):
        sources.remote_plan(params(source="hf", shards=5000))


# ----------------------------------------------------------------------------------------------------
# local


def test_local_parquet_directory_maps_one_to_one(tmp_path):
    out = tmp_path / "raw"
    result = build(params(source="local", path=str(MIXED)), out, tmp_path / "cache")
    shards = read_manifest(out)
    assert [s.split for s in shards] == ["train", "val"]
    assert [s.rows for s in shards] == [pq.ParquetFile(f).metadata.num_rows for f in sorted(MIXED.glob("*.parquet"))]
    assert shards[1].sha256 == hashlib.sha256((MIXED / "shard_00001.parquet").read_bytes()).hexdigest()
    assert result.about["dataset"] == "mixed"


def test_local_jsonl_and_txt_are_resharded_with_bad_utf8_replaced(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    docs = [{"text": f"document {i} " + "words and more words " * 20} for i in range(30)]
    (src / "a.jsonl").write_text("\n".join(json.dumps(d) for d in docs[:20]) + "\n\n", encoding="utf-8")
    with gzip.open(src / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(d) for d in docs[20:]) + '\n{"text": "lone \\ud800 surrogate"}\n')
    (src / "c.txt").write_bytes(b"a plain text file with bad bytes \xff\xfe here and a real \xef\xbf\xbd one " * 10)
    (src / "d.txt").write_bytes(b"   \n")  # empty: skipped
    (src / "notes.md").write_text("not an input")

    out = tmp_path / "raw"
    result = build(params(source="local", path=str(src), shard_chars=4000), out, tmp_path / "cache")
    shards = read_manifest(out)
    assert len(shards) >= 3 and [s.split for s in shards] == ["train"] * (len(shards) - 1) + ["val"]
    texts = list(iter_texts(shard_paths(out)))
    assert len(texts) == 32 and texts[0] == docs[0]["text"]
    ids = pq.read_table(shard_paths(out, "val")[0])["id"].to_pylist()
    assert ids[-1] == "c.txt" and ids[-2] == "b.jsonl.gz:11"
    m = result.metrics()
    assert m["replaced_chars"] == 2 * 10 + 1 and m["bad_utf8_docs"] == 2 and m["skipped_docs"] == 1
    assert m["chars"] == sum(map(len, texts))


def test_local_max_chars_caps_and_a_lone_shard_is_split_for_validation(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"body": f"doc {i} " * 50}) for i in range(20)), encoding="utf-8")
    result = build(params(source="local", path=str(src), text_field="body", max_chars=2500), tmp_path / "raw",
                   tmp_path / "cache")
    shards = read_manifest(tmp_path / "raw")
    assert [s.split for s in shards] == ["train", "val"] and result.metrics()["chars"] == 2500
    assert shards[1].chars < shards[0].chars


@pytest.mark.parametrize("setup, path, message", [
    (None, "missing", r"download\.path: .*missing does not exist"),
    ("empty", "empty", r"has no \.parquet, \.jsonl, \.jsonl\.gz, \.txt files"),
    (None, "nothing/*.jsonl", r"no files match nothing/\*\.jsonl"),
    ("notext", "notext", r"notext/b\.parquet has no 'text' column \(columns: body\)"),
    ("corrupt", "corrupt", r"corrupt/b\.parquet is not a readable parquet file"),
    ("badjson", "badjson", r"badjson/a\.jsonl:2: not valid JSON"),
    ("blank", "blank", r"no text found"),
])
def test_local_input_errors_are_one_line(tmp_path, monkeypatch, setup, path, message):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / path
    if setup:
        folder.mkdir()
    if setup == "notext":
        pq.write_table(pa.table({"text": ["x" * 10]}), folder / "a.parquet")
        pq.write_table(pa.table({"body": ["x" * 10]}), folder / "b.parquet")
    if setup == "corrupt":
        pq.write_table(pa.table({"text": ["x" * 10]}), folder / "a.parquet")
        (folder / "b.parquet").write_bytes((folder / "a.parquet").read_bytes()[:-20])
    if setup == "badjson":
        (folder / "a.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    if setup == "blank":
        (folder / "a.txt").write_text("\n\n")
    with pytest.raises(UserError, match=message) as e:
        build(params(source="local", path=path), tmp_path / "raw", tmp_path / "cache")
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------------
# embedded


def test_embedded_is_deterministic_with_validation_last(tmp_path):
    p = params(source="embedded", include=["stdlib", "packages"], shard_chars=20_000, max_chars=50_000)
    first = build(p, tmp_path / "a", tmp_path / "cache")
    build(p, tmp_path / "b", tmp_path / "cache")
    a, b = read_manifest(tmp_path / "a"), read_manifest(tmp_path / "b")
    assert len(a) >= 2 and a[-1].split == "val" and all(s.split == "train" for s in a[:-1])
    assert [s.sha256 for s in a] == [s.sha256 for s in b]
    assert first.metrics()["chars"] == 50_000


def test_embedded_sources_yield_real_text():
    stdlib = next(d for d in sources.stdlib_documents() if d.id.startswith("python-stdlib/"))
    assert stdlib.source == "python-stdlib" and len(stdlib.text) > 0
    packages = list(sources.package_documents())
    names = [d.id for d in packages]
    assert names == sorted(names) and "python-packages/pyarrow" in names


# ----------------------------------------------------------------------------------------------------
# the stage, as the engines run it


def run_stage(workspace: Path, download: dict) -> subprocess.CompletedProcess:
    workspace.mkdir(exist_ok=True)
    (workspace / "params.yaml").write_text(yaml.safe_dump({"download": download}))
    return subprocess.run([sys.executable, str(ROOT / "stages/download.py"), "--out", "data/raw",
                           "--cache", ".cache/download", "--metrics", "reports/metrics/download.json"],
                          cwd=workspace, capture_output=True, text=True)


def test_stage_bad_input_exits_2_with_one_error_line(tmp_path):
    proc = run_stage(tmp_path / "ws", {"source": "local", "path": "nowhere"})
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "nowhere does not exist" in errors[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "ws/data/raw").exists()


def test_stage_writes_shards_manifest_and_metrics(tmp_path):
    proc = run_stage(tmp_path / "ws", {"source": "local", "path": str(MIXED)})
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "ws/reports/metrics/download.json").read_text())
    assert {"shards", "train_shards", "val_shards", "docs", "chars", "bytes", "download_bytes",
            "cached_shards", "seconds", "mb_per_s"} <= metrics.keys()
    assert metrics["shards"] == 2 and metrics["val_shards"] == 1
    assert len(read_manifest(tmp_path / "ws/data/raw")) == 2
    assert [p.name for p in (tmp_path / "ws/data").iterdir()] == ["raw"]  # no temporary folder left


# ----------------------------------------------------------------------------------------------------
# per shard: list, one job per shard, gather == the plain run


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def per_shard(p, parts: Path, out: Path, cache: Path) -> sources.Download:
    """What the stage's --list, --shard NAME (one per listed shard) and --gather do, in process."""
    plan = sources.plan_shards(p)
    parts.mkdir()
    (parts / sources.PLAN).write_text(json.dumps(plan))
    for shard in reversed(plan["shards"]):  # any order: the jobs are independent
        (parts / shard["name"]).mkdir()
        sources.download_part(p, parts, shard["name"], parts / shard["name"], cache, backoff_s=0)
    out.mkdir()
    result = sources.gather_parts(p, parts, out)
    write_manifest(out, result.shards, **result.about)
    return result


def stream_corpus(tmp_path: Path) -> Path:
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "a.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i} " + "some words " * (i % 9 + 3)})
                                           for i in range(60)) + "\n", encoding="utf-8")
    (src / "b.txt").write_bytes(b"bad bytes \xff here " * 20)
    (src / "c.txt").write_bytes(b"  \n")  # empty: skipped
    return src


@pytest.mark.parametrize("source", ["url", "local-parquet", "local-stream", "local-lone-shard", "embedded"])
def test_list_shards_gather_equals_the_plain_run(tmp_path, mirror, source):
    if source == "url":
        for i in range(4):
            mirror.files[f"shard_{i:05d}.parquet"] = parquet_bytes(tmp_path, f"s{i}", texts_of(i, 5), "text")
        p = url_params(mirror, shards=4)
    elif source == "local-parquet":
        p = params(source="local", path=str(MIXED))
    elif source == "local-stream":
        p = params(source="local", path=str(stream_corpus(tmp_path)), shard_chars=1500)
    elif source == "local-lone-shard":  # max_chars cuts a document; one shard is split into train | val
        p = params(source="local", path=str(stream_corpus(tmp_path) / "a.jsonl"), max_chars=2000)
    else:  # the package descriptions alone: the same code path as the demo's, in a fraction of a second
        p = params(source="embedded", include=["packages"], shard_chars=200_000, max_chars=700_000)
    plain = build(p, tmp_path / "plain", tmp_path / "cache-plain")
    gathered = per_shard(p, tmp_path / "parts", tmp_path / "raw", tmp_path / "cache")
    assert len(plain.shards) >= 2 and file_hashes(tmp_path / "raw") == file_hashes(tmp_path / "plain")
    timing = {"seconds", "mb_per_s"}
    assert {k: v for k, v in gathered.metrics().items() if k not in timing} == \
        {k: v for k, v in plain.metrics().items() if k not in timing}
    assert gathered.notes == plain.notes and gathered.summary().split(";")[0] == plain.summary().split(";")[0]
    if source == "local-stream":
        assert plain.metrics()["replaced_chars"] == 20 and plain.metrics()["skipped_docs"] == 1
    if source == "url":  # the shard jobs went through their cache: a second round fetches nothing
        assert gathered.metrics()["download_bytes"] > 0
        again = per_shard(p, tmp_path / "parts2", tmp_path / "raw2", tmp_path / "cache")
        assert again.metrics()["download_bytes"] == 0 and again.metrics()["cached_shards"] == 4


def test_hf_shards_are_listed_without_the_network():
    plan = sources.plan_shards(params(source="hf", dataset="fineweb-edu", shards=3))
    assert [s["name"] for s in plan["shards"]] == ["shard_00000", "shard_00001", "shard_00002"]
    assert plan["shards"][2]["url"].endswith("/shard_01822.parquet") and plan["shards"][2]["split"] == "val"


def stage(workspace: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "stages/download.py"), "--out", "data/raw", "--cache",
                           ".cache/download", "--metrics", "reports/metrics/download.json", *args],
                          cwd=workspace, capture_output=True, text=True)


def test_stage_per_shard_errors_are_one_line(tmp_path):
    ws = tmp_path / "ws"
    stream_corpus(ws.parent)
    assert run_stage(ws, {"source": "local", "path": "../corpus", "shard_chars": 1500}).returncode == 0
    plain = file_hashes(ws / "data/raw")
    parts = ".cache/shards/download"

    def error(*args: str) -> str:
        proc = stage(ws, *args)
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        return lines[0]

    assert "not listed yet" in error("--shard", "shard_00000", "--parts", parts)
    assert stage(ws, "--list", "--parts", parts).returncode == 0
    names = [s["name"] for s in json.loads((ws / parts / sources.PLAN).read_text())["shards"]]
    assert "shard 'nope' is not listed in" in error("--shard", "nope", "--parts", parts)
    for name in names[:-1]:
        assert stage(ws, "--shard", name, "--parts", parts).returncode == 0
    assert f"{names[-1]}/part.json not found" in error("--gather", "--parts", parts)
    assert stage(ws, "--shard", names[-1], "--parts", parts).returncode == 0
    assert stage(ws, "--gather", "--parts", parts).returncode == 0
    assert file_hashes(ws / "data/raw") == plain
    (ws / "params.yaml").write_text(yaml.safe_dump({"download": {"source": "local", "path": "../corpus"}}))
    assert "was listed for other download params" in error("--gather", "--parts", parts)
